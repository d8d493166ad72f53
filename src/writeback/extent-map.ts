// An in-memory map of byte ranges to their newest contents: data or zeroes. It holds the writes
// of an epoch (or of a batch of epochs) with overlapping writes coalesced, last one wins, so a
// block overwritten ten times before a flush is stored, journalled once more per overwrite, but
// kept and shipped once. Extents are kept sorted and non-overlapping; adjacent ones are not
// merged (callers merge when they encode).

export interface MapExtent {
  offset: number;
  length: number;
  /** the bytes, or null: the range reads as zeroes (write-zeroes and trim). */
  data: Buffer | null;
}

/** A piece of a queried range: covered by the map (data or zero) or not (`hole`). */
export type Piece = { offset: number; length: number; kind: 'data'; data: Buffer } | { offset: number; length: number; kind: 'zero' } | { offset: number; length: number; kind: 'hole' };

export class ExtentMap {
  private readonly ext: MapExtent[] = [];
  private total = 0;

  get size(): number {
    return this.ext.length;
  }

  /** Bytes covered (data and zero ranges). */
  get bytes(): number {
    return this.total;
  }

  /** Set a range to `data`; the map keeps the buffer (the caller must not reuse it). */
  write(offset: number, data: Buffer): void {
    if (data.length === 0) return;
    this.insert({ offset, length: data.length, data });
  }

  zero(offset: number, length: number): void {
    if (length === 0) return;
    this.insert({ offset, length, data: null });
  }

  /** Extents in offset order. */
  extents(): readonly MapExtent[] {
    return this.ext;
  }

  /** Whether any byte of [offset, offset + length) is covered. */
  overlaps(offset: number, length: number): boolean {
    const i = this.firstEndingAfter(offset);
    return i < this.ext.length && this.ext[i]!.offset < offset + length;
  }

  /** Split [offset, offset + length) into covered pieces and holes, in order. */
  query(offset: number, length: number): Piece[] {
    const out: Piece[] = [];
    const end = offset + length;
    let pos = offset;
    for (let i = this.firstEndingAfter(offset); i < this.ext.length && pos < end; i++) {
      const e = this.ext[i]!;
      if (e.offset >= end) break;
      if (e.offset > pos) {
        out.push({ offset: pos, length: e.offset - pos, kind: 'hole' });
        pos = e.offset;
      }
      const to = Math.min(end, e.offset + e.length);
      if (e.data) out.push({ offset: pos, length: to - pos, kind: 'data', data: e.data.subarray(pos - e.offset, to - e.offset) });
      else out.push({ offset: pos, length: to - pos, kind: 'zero' });
      pos = to;
    }
    if (pos < end) out.push({ offset: pos, length: end - pos, kind: 'hole' });
    return out;
  }

  /** Copy everything of `other` into this map, as if its writes came after this map's. */
  merge(other: ExtentMap): void {
    for (const e of other.ext) this.insert({ ...e });
  }

  /** Index of the first extent whose end is after `offset` (binary search). */
  private firstEndingAfter(offset: number): number {
    let lo = 0;
    let hi = this.ext.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const e = this.ext[mid]!;
      if (e.offset + e.length <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  private insert(n: MapExtent): void {
    const end = n.offset + n.length;
    const first = this.firstEndingAfter(n.offset);
    let last = first;
    const keep: MapExtent[] = [];
    while (last < this.ext.length && this.ext[last]!.offset < end) {
      const e = this.ext[last]!;
      const eEnd = e.offset + e.length;
      this.total -= e.length;
      if (e.offset < n.offset) keep.push(slice(e, e.offset, n.offset));
      if (eEnd > end) keep.push(slice(e, end, eEnd));
      last++;
    }
    const left = keep.filter((k) => k.offset < n.offset);
    const right = keep.filter((k) => k.offset >= end);
    const repl = [...left, n, ...right];
    for (const r of repl) this.total += r.length;
    this.ext.splice(first, last - first, ...repl);
  }
}

function slice(e: MapExtent, from: number, to: number): MapExtent {
  return { offset: from, length: to - from, data: e.data ? e.data.subarray(from - e.offset, to - e.offset) : null };
}
