// Chunk groups for the link's group push: a chunk's group is the rest of every file that has
// data in it. The owner pushes a group when one of its chunks is fetched on demand, so a
// guest that reads a file from the start gets the rest without a round trip per chunk.
// Files are followed in their own (logical) order from the chunk that was asked for, then the
// part before it, capped at `capBytes` per file so one read of a huge file does not push GiBs.

import type { ChunkGroups } from '../edge/local/chunk-server.js';
import type { FileEntry, FileMap } from './file-map.js';

export class FileGroups implements ChunkGroups {
  private readonly memo = new Map<FileEntry, number[]>();

  constructor(
    private readonly map: FileMap,
    private readonly chunkSize: number,
    private readonly capBytes: number,
    private readonly memoFiles = 4096,
  ) {}

  groupOf(index: number): readonly number[] {
    if (this.capBytes <= 0) return [];
    const files = this.map.filesInChunk(index, this.chunkSize);
    if (files.length === 0) return [];
    const cap = Math.max(1, Math.floor(this.capBytes / this.chunkSize));
    const out: number[] = [];
    const seen = new Set<number>([index]);
    for (const f of files) {
      const chunks = this.chunksInFileOrder(f);
      const at = chunks.indexOf(index);
      // from the chunk after the one asked for to the end, then the start of the file
      const ordered = at < 0 ? chunks : chunks.slice(at + 1).concat(chunks.slice(0, at));
      let n = 0;
      for (const c of ordered) {
        if (n >= cap) break;
        if (seen.has(c)) continue;
        seen.add(c);
        out.push(c);
        n++;
      }
    }
    return out;
  }

  /** The file's chunks in the order a sequential reader of the file meets them. */
  private chunksInFileOrder(f: FileEntry): number[] {
    const hit = this.memo.get(f);
    if (hit) return hit;
    const cs = this.chunkSize;
    const out: number[] = [];
    const seen = new Set<number>();
    for (const e of [...f.extents].sort((a, b) => a.logical - b.logical)) {
      if (e.unwritten || e.length <= 0) continue;
      for (let c = Math.floor(e.offset / cs); c <= Math.floor((e.offset + e.length - 1) / cs); c++) {
        if (seen.has(c)) continue;
        seen.add(c);
        out.push(c);
      }
    }
    if (this.memo.size >= this.memoFiles) this.memo.delete(this.memo.keys().next().value!);
    this.memo.set(f, out);
    return out;
  }
}
