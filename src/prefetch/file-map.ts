// Which file owns which byte of a volume: every regular file of the volume's ext filesystems
// with its extents in absolute volume bytes. The link's group push asks, for each chunk it
// fetches, which files have data in that chunk (filesInChunk) and then which other chunks those
// files occupy (chunksOf).
//
// Layout for ~100k files: files keep their own extent lists (for chunksOf); a flat index of every
// extent, sorted by volume offset, lives in typed arrays (start, end, file number) with a running
// maximum of the ends, so a range query is a binary search plus a scan of the extents that
// actually overlap, and still correct if a corrupt filesystem makes extents overlap.

import type { FileExtent } from './ext4.js';

export interface FileEntry {
  path: string;
  inode: number;
  /** Byte offset (in the volume) of the filesystem holding the file. */
  fsOffset: number;
  size: number;
  /** Sorted by `logical`; offsets are absolute volume bytes. */
  extents: FileExtent[];
}

export class FileMapError extends Error {
  readonly code = 'SPW_ERR_FILE_MAP';
  constructor(message: string) {
    super(message);
    this.name = 'FileMapError';
  }
}

export interface FileMapJson {
  version: 1;
  files: Array<{ path: string; inode: number; fsOffset: number; size: number; extents: Array<[logical: number, offset: number, length: number, unwritten: 0 | 1]> }>;
}

export class FileMap {
  readonly files: readonly FileEntry[];
  private readonly starts: Float64Array;
  private readonly ends: Float64Array;
  /** maxEnd[i] = max(ends[0..i]): monotone, so binary-searchable. */
  private readonly maxEnd: Float64Array;
  private readonly owner: Uint32Array;

  constructor(files: FileEntry[]) {
    this.files = files;
    let n = 0;
    for (const f of files) n += f.extents.length;
    const order: Array<[number, number, number]> = new Array(n);
    let k = 0;
    files.forEach((f, i) => {
      for (const e of f.extents) order[k++] = [e.offset, e.offset + e.length, i];
    });
    order.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    this.starts = new Float64Array(n);
    this.ends = new Float64Array(n);
    this.maxEnd = new Float64Array(n);
    this.owner = new Uint32Array(n);
    let m = 0;
    order.forEach(([s, e, i], j) => {
      this.starts[j] = s;
      this.ends[j] = e;
      this.owner[j] = i;
      m = Math.max(m, e);
      this.maxEnd[j] = m;
    });
  }

  /** Extents indexed. */
  get extentCount(): number {
    return this.starts.length;
  }

  /** The file with data at volume byte `offset`, if any (the first by extent start if several). */
  fileAt(offset: number): FileEntry | undefined {
    return this.filesIn(offset, 1)[0];
  }

  /** Files with an extent overlapping [offset, offset + length), each once, in order of their first overlapping extent. */
  filesIn(offset: number, length: number): FileEntry[] {
    const out: FileEntry[] = [];
    if (length <= 0) return out;
    const end = offset + length;
    // first index whose running max end is > offset: nothing before it can overlap.
    let lo = 0;
    let hi = this.maxEnd.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.maxEnd[mid]! > offset) hi = mid;
      else lo = mid + 1;
    }
    const seen = new Set<number>();
    for (let i = lo; i < this.starts.length && this.starts[i]! < end; i++) {
      if (this.ends[i]! <= offset) continue;
      const f = this.owner[i]!;
      if (seen.has(f)) continue;
      seen.add(f);
      out.push(this.files[f]!);
    }
    return out;
  }

  /** Files with data in chunk `index` of `chunkSize` bytes. */
  filesInChunk(index: number, chunkSize: number): FileEntry[] {
    return this.filesIn(index * chunkSize, chunkSize);
  }

  /** Sorted unique indices of the chunks holding the file's written data (unwritten extents are skipped). */
  chunksOf(file: FileEntry, chunkSize: number): number[] {
    if (!Number.isSafeInteger(chunkSize) || chunkSize <= 0) throw new RangeError(`invalid chunk size ${chunkSize}`);
    const out: number[] = [];
    const exts = file.extents.filter((e) => !e.unwritten && e.length > 0).sort((a, b) => a.offset - b.offset);
    for (const e of exts) {
      const first = Math.floor(e.offset / chunkSize);
      const last = Math.floor((e.offset + e.length - 1) / chunkSize);
      for (let c = Math.max(first, out.length > 0 ? out[out.length - 1]! + 1 : first); c <= last; c++) out.push(c);
    }
    return out;
  }

  toJSON(): FileMapJson {
    return {
      version: 1,
      files: this.files.map((f) => ({
        path: f.path,
        inode: f.inode,
        fsOffset: f.fsOffset,
        size: f.size,
        extents: f.extents.map((e): [number, number, number, 0 | 1] => [e.logical, e.offset, e.length, e.unwritten ? 1 : 0]),
      })),
    };
  }

  /** Rebuild from toJSON() output; anything else throws FileMapError naming the first bad field. */
  static fromJSON(json: unknown): FileMap {
    const bad = (what: string): never => {
      throw new FileMapError(`invalid file map: ${what}`);
    };
    const isObj = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
    const isCount = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
    if (!isObj(json)) return bad('not an object');
    if (json.version !== 1) return bad(`version ${String(json.version)} (expected 1)`);
    if (!Array.isArray(json.files)) return bad('files is not an array');
    const files: FileEntry[] = json.files.map((f: unknown, i): FileEntry => {
      if (!isObj(f)) return bad(`files[${i}] is not an object`);
      if (typeof f.path !== 'string') return bad(`files[${i}].path is not a string`);
      for (const k of ['inode', 'fsOffset', 'size'] as const) if (!isCount(f[k])) bad(`files[${i}].${k} is not a non-negative integer`);
      if (!Array.isArray(f.extents)) return bad(`files[${i}].extents is not an array`);
      const extents = f.extents.map((e: unknown, j): FileExtent => {
        const w = `files[${i}].extents[${j}]`;
        if (!Array.isArray(e) || e.length !== 4) return bad(`${w} is not [logical, offset, length, unwritten]`);
        const [logical, offset, length, unwritten] = e as unknown[];
        if (!isCount(logical) || !isCount(offset) || !isCount(length) || length === 0) return bad(`${w} has a bad number`);
        if (!Number.isSafeInteger(offset + length) || !Number.isSafeInteger(logical + length)) return bad(`${w} ends beyond 2^53`);
        if (unwritten !== 0 && unwritten !== 1) return bad(`${w}[3] must be 0 or 1`);
        const x: FileExtent = { logical, offset, length };
        if (unwritten === 1) x.unwritten = true;
        return x;
      });
      return { path: f.path, inode: f.inode as number, fsOffset: f.fsOffset as number, size: f.size as number, extents };
    });
    return new FileMap(files);
  }
}
