// Persistence of the cache index: a redo log of records plus periodic snapshots, generation
// by generation (docs/cache.md, "On-disk format").
//
//   index.<gen>.snap   the whole index at some point after log <gen> was started (fuzzy)
//   index.<gen>.log    every record appended since log <gen> was started
//
// Every record assigns the absolute state of one key (a blob, a mapping, a name), so replaying
// log <gen> over snapshot <gen> gives the right state even though the snapshot was written
// while the cache kept changing: anything the snapshot missed or caught half-way is in the log.
// Open = the newest snapshot (checked whole first) + every log from its generation on, in
// order, stopping at the first torn record, which is cut off; then the next log of the chain
// starts (no gap, or the next open would stop before it), so a torn tail is never appended to. Appends are serialised (one write in flight), so each log is always a prefix
// of what was appended; durable appends are group-committed with one fdatasync.

import { constants as fsc } from 'node:fs';
import { open, readdir, readFile, rename, truncate, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { fsyncDir } from '../util/durable.js';
import { crc32 } from 'node:zlib';
import { CacheError } from './errors.js';
import {
  decodeFileHeader,
  decodeRecord,
  encodeFileHeader,
  encodeRecord,
  FILE_HEADER_SIZE,
  FORMAT_VERSION,
  FRAME_HEADER_SIZE,
  LOG_MAGIC,
  MAX_BODY,
  NEED_MORE,
  REC,
  recordSize,
  SNAP_MAGIC,
  type IndexRecord,
} from './records.js';

const FILE_RE = /^index\.(\d{8})\.(snap|log)$/;

function logName(gen: number): string {
  return `index.${String(gen).padStart(8, '0')}.log`;
}
function snapName(gen: number): string {
  return `index.${String(gen).padStart(8, '0')}.snap`;
}

interface Pending {
  readonly buf: Buffer;
  readonly durable: boolean;
  readonly resolve: () => void;
  readonly reject: (err: unknown) => void;
}

export interface ReplayReport {
  /** generation of the snapshot loaded, or null when none. */
  readonly snapshotGen: number | null;
  readonly logsReplayed: number;
  readonly records: number;
  /** a log ended in a torn or corrupt record (expected after a crash). */
  readonly tornTail: boolean;
}


/**
 * Apply the records of one log. Returns how many were applied, whether the file ended cleanly,
 * whether its header was valid, and the length of its valid prefix (the tear, if any).
 */
function replayLog(buf: Buffer, gen: number, apply: (rec: IndexRecord) => void): { n: number; clean: boolean; headerOk: boolean; validLength: number } {
  if (!headerMatches(buf, LOG_MAGIC, gen)) return { n: 0, clean: false, headerOk: false, validLength: 0 };
  let o = FILE_HEADER_SIZE;
  let n = 0;
  for (;;) {
    let r: ReturnType<typeof decodeRecord>;
    try {
      r = decodeRecord(buf, o);
    } catch {
      break;
    }
    if (r === NEED_MORE || r.rec.type === REC.END) break;
    apply(r.rec);
    o += r.bytesRead;
    n++;
  }
  return { n, clean: o === buf.length, headerOk: true, validLength: o };
}

/**
 * Apply the records of a snapshot, all or nothing: first walk the frames to the END record and
 * check its count and its CRC over every frame before it, then decode and apply (the per-frame
 * CRCs are covered by that one check). Returns the number of records, or null when invalid.
 */
function replaySnapshot(buf: Buffer, gen: number, apply: (rec: IndexRecord) => void): number | null {
  if (!headerMatches(buf, SNAP_MAGIC, gen)) return null;
  let o = FILE_HEADER_SIZE;
  let count = 0;
  for (;;) {
    if (buf.length - o < FRAME_HEADER_SIZE + 1) return null;
    const len = buf.readUInt32BE(o);
    if (len === 0 || len > MAX_BODY || buf.length - o - FRAME_HEADER_SIZE < len) return null;
    if (buf[o + FRAME_HEADER_SIZE] === REC.END) break;
    o += FRAME_HEADER_SIZE + len;
    count++;
  }
  let end: ReturnType<typeof decodeRecord>;
  try {
    end = decodeRecord(buf, o);
  } catch {
    return null;
  }
  if (end === NEED_MORE || end.rec.type !== REC.END || o + end.bytesRead !== buf.length) return null;
  if (end.rec.count !== count || end.rec.crc !== crc32(buf.subarray(FILE_HEADER_SIZE, o))) return null;
  for (let p = FILE_HEADER_SIZE; p < o; ) {
    const r = decodeRecord(buf, p, false);
    if (r === NEED_MORE) return null; // cannot happen: the walk above checked every length
    apply(r.rec);
    p += r.bytesRead;
  }
  return count;
}

function headerMatches(buf: Buffer, magic: Buffer, gen: number): boolean {
  const h = decodeFileHeader(buf);
  if (!h || !h.magic.equals(magic) || h.gen !== gen) return false;
  if (h.version !== FORMAT_VERSION) {
    throw new CacheError('SPW_ERR_CACHE_FORMAT', `cache index format ${h.version} is not ${FORMAT_VERSION}; use a matching spillway or an empty cache directory`);
  }
  return true;
}

export class IndexJournal {
  private fh: FileHandle;
  private logSize = FILE_HEADER_SIZE;
  /** whether the current log's directory entry is known durable. */
  private dirSynced = false;
  /** bytes of the current log known durable (fdatasync). */
  private syncedSize = 0;
  private queue: Pending[] = [];
  private pumping: Promise<void> | null = null;
  private failed: unknown = null;
  private closed = false;
  /** size of the last snapshot written, for the snapshot trigger. */
  private snapBytes = 0;

  private constructor(
    private readonly dir: string,
    private gen: number,
    fh: FileHandle,
  ) {
    this.fh = fh;
  }

  /**
   * Load the index of `dir` by calling `apply` for every record, oldest first, cut a torn log
   * tail, then start a new generation (an empty log). The caller should then write a snapshot
   * of its state (in the background: the chain of logs is clean either way).
   */
  static async open(dir: string, apply: (rec: IndexRecord) => void): Promise<{ journal: IndexJournal; report: ReplayReport }> {
    const snaps: number[] = [];
    const logs: number[] = [];
    for (const name of await readdir(dir)) {
      const m = FILE_RE.exec(name);
      if (!m) continue;
      (m[2] === 'snap' ? snaps : logs).push(Number(m[1]));
    }
    snaps.sort((a, b) => b - a);
    logs.sort((a, b) => a - b);

    // Only the newest snapshot is a valid base: an older one misses what its successor's logs
    // (now deleted) held, invalidations included. If the newest is unreadable (it was renamed
    // into place only once complete and fsynced, so this means the disk corrupted it), the
    // whole index is given up: an empty cache is safe, a stale one is not.
    let base: number | null = null;
    let records = 0;
    const newest = snaps[0];
    let discardAll = false;
    if (newest !== undefined) {
      const buf = await readFile(path.join(dir, snapName(newest)));
      // Validated whole before anything is applied, so a bad snapshot changes nothing.
      const n = replaySnapshot(buf, newest, apply);
      if (n !== null) {
        records += n;
        base = newest;
      } else {
        discardAll = true;
      }
    }
    if (discardAll) {
      for (const g of snaps) await unlink(path.join(dir, snapName(g)));
    }
    let tornTail = false;
    let logsReplayed = 0;
    const firstLog = base ?? 0;
    let expect = firstLog;
    for (const g of logs) {
      if (g < firstLog) continue; // covered by the snapshot; deleted after the next one
      const file = path.join(dir, logName(g));
      if (discardAll || tornTail || g !== expect) {
        // After a tear or a gap nothing can be applied in order; under kill -9 only a log
        // created at the instant of the kill can follow a tear, and it holds nothing.
        await unlink(file);
        continue;
      }
      const buf = await readFile(file);
      const r = replayLog(buf, g, apply);
      records += r.n;
      if (!r.headerOk) {
        // created but its header never written: as if it did not exist
        await unlink(file);
        tornTail = true;
        continue;
      }
      logsReplayed++;
      expect = g + 1;
      if (!r.clean) {
        tornTail = true;
        await truncate(file, r.validLength); // so the chain replays cleanly next time too
      }
    }
    // The new log continues the chain with no gap: a gap would hide it from the next replay.
    const gen = expect;
    const fh = await IndexJournal.createLog(dir, gen);
    const journal = new IndexJournal(dir, gen, fh);
    return { journal, report: { snapshotGen: base, logsReplayed, records, tornTail } };
  }

  /** A new, empty log. Its directory entry is made durable by the first durable append. */
  private static async createLog(dir: string, gen: number): Promise<FileHandle> {
    const fh = await open(path.join(dir, logName(gen)), fsc.O_RDWR | fsc.O_CREAT | fsc.O_TRUNC, 0o600);
    await fh.write(encodeFileHeader(LOG_MAGIC, gen), 0, FILE_HEADER_SIZE, 0);
    return fh;
  }

  get generation(): number {
    return this.gen;
  }

  /** Bytes of the current log and of the last snapshot. */
  get bytes(): number {
    return this.logSize + this.snapBytes;
  }

  /** Whether the log has grown enough that a snapshot pays for itself. */
  needsSnapshot(minLogBytes: number): boolean {
    return this.logSize > Math.max(minLogBytes, this.snapBytes);
  }

  /**
   * Queue records; resolves once they are written (and fdatasynced when `durable`). Records
   * land in the order append() was called.
   */
  append(recs: readonly IndexRecord[], durable = false): Promise<void> {
    if (this.closed) return Promise.reject(new CacheError('SPW_ERR_CACHE_CLOSED', 'the cache index is closed'));
    if (this.failed) return Promise.reject(this.failed);
    let size = 0;
    for (const r of recs) size += recordSize(r);
    const buf = Buffer.allocUnsafe(size);
    let o = 0;
    for (const r of recs) o += encodeRecord(buf, o, r);
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ buf, durable, resolve, reject });
      if (!this.pumping) this.pumping = this.pump();
    });
  }

  private async pump(): Promise<void> {
    while (this.queue.length > 0) {
      const batch = this.queue;
      this.queue = [];
      const fh = this.fh;
      const buf = batch.length === 1 ? (batch[0] as Pending).buf : Buffer.concat(batch.map((p) => p.buf));
      const at = this.logSize;
      this.logSize += buf.length;
      try {
        let done = 0;
        while (done < buf.length) {
          const { bytesWritten } = await fh.write(buf, done, buf.length - done, at + done);
          done += bytesWritten;
        }
        if (batch.some((p) => p.durable)) {
          if (!this.dirSynced) {
            await fsyncDir(this.dir);
            this.dirSynced = true;
          }
          await fh.datasync();
          if (fh === this.fh) this.syncedSize = at + buf.length;
        }
        for (const p of batch) p.resolve();
      } catch (err) {
        // The log may now have a hole: refuse further appends rather than write past it.
        this.failed = new CacheError('SPW_ERR_CACHE_IO', `cannot append to the cache index in ${this.dir}: ${(err as Error).message}`, { cause: err });
        for (const p of batch) p.reject(this.failed);
        for (const p of this.queue) p.reject(this.failed);
        this.queue = [];
      }
    }
    this.pumping = null;
  }

  /** Resolves once everything appended so far is durable (a no-op when it already is). */
  sync(): Promise<void> {
    if (!this.pumping && this.syncedSize === this.logSize) return Promise.resolve();
    return this.append([], true);
  }

  /** Resolves when everything appended so far is written. */
  async drain(): Promise<void> {
    while (this.pumping) await this.pumping;
  }

  /**
   * Start generation gen+1 and write its snapshot from `records` (called lazily: the state may
   * change while it runs; see the file comment). Older generations are deleted once the new
   * snapshot is durable. The writer awaits I/O once per MiB encoded, so the event loop runs.
   */
  async writeSnapshot(records: Iterable<IndexRecord>, signal?: AbortSignal): Promise<void> {
    const gen = this.gen + 1;
    const newLog = await IndexJournal.createLog(this.dir, gen);
    // Switch: every record appended from now on goes to the new log. The check of `pumping`
    // and the switch happen in one synchronous step, so no batch can be in flight on oldFh.
    while (this.pumping) await this.pumping;
    const oldFh = this.fh;
    this.fh = newLog;
    this.gen = gen;
    this.logSize = FILE_HEADER_SIZE;
    this.syncedSize = 0;
    this.dirSynced = false;
    await oldFh.datasync(); // records of the old log are durable before anything depends on the new one
    await oldFh.close();

    const tmp = path.join(this.dir, snapName(gen) + '.tmp');
    const fh = await open(tmp, fsc.O_RDWR | fsc.O_CREAT | fsc.O_TRUNC, 0o600);
    let total = 0;
    try {
      const CHUNK = 1 << 20;
      let buf = Buffer.allocUnsafe(CHUNK);
      let used = encodeFileHeader(SNAP_MAGIC, gen).copy(buf, 0);
      let crcFrom = used; // the header is not covered by the END record's CRC
      let crc = 0;
      let pos = 0;
      const flush = async (): Promise<void> => {
        crc = crc32(buf.subarray(crcFrom, used), crc);
        crcFrom = 0;
        let done = 0;
        while (done < used) {
          const { bytesWritten } = await fh.write(buf, done, used - done, pos + done);
          done += bytesWritten;
        }
        pos += used;
        used = 0;
      };
      let count = 0;
      for (const rec of records) {
        const size = recordSize(rec);
        if (used + size > buf.length) {
          await flush(); // the only await: the event loop runs between 1 MiB writes
          signal?.throwIfAborted();
          if (size > buf.length) buf = Buffer.allocUnsafe(size);
        }
        used += encodeRecord(buf, used, rec);
        count++;
      }
      crc = crc32(buf.subarray(crcFrom, used), crc);
      crcFrom = used;
      const endRec: IndexRecord = { type: REC.END, count, crc };
      if (used + recordSize(endRec) > buf.length) await flush();
      used += encodeRecord(buf, used, endRec);
      crcFrom = used;
      await flush();
      total = pos;
      await fh.sync();
    } catch (err) {
      await fh.close();
      await unlink(tmp).catch(() => undefined);
      throw err;
    }
    await fh.close();
    await rename(tmp, path.join(this.dir, snapName(gen)));
    await fsyncDir(this.dir);
    this.snapBytes = total;
    // Older generations are now redundant.
    for (const name of await readdir(this.dir)) {
      const m = FILE_RE.exec(name);
      if ((m && Number(m[1]) < gen) || (name.startsWith('index.') && name.endsWith('.tmp') && name !== snapName(gen) + '.tmp')) {
        await unlink(path.join(this.dir, name)).catch(() => undefined);
      }
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.drain();
    this.closed = true;
    await this.fh.close();
  }
}
