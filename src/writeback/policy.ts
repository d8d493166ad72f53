// Where a volume's writes live, per byte range. The volume has one default policy; ranges
// (explicit ones from the configuration, and swap partitions found in the partition table)
// override it. Later ranges in the list win where they overlap.

export type WritePolicy = 'remote-only' | 'origin' | 'write-through';

export const WRITE_POLICIES: readonly WritePolicy[] = ['remote-only', 'origin', 'write-through'];

export interface PolicyRange {
  offset: number;
  length: number;
  policy: WritePolicy;
  /** where the range came from, for status and logs ("config", "swap partition 2"). */
  source: string;
}

export interface PolicyPiece {
  offset: number;
  length: number;
  policy: WritePolicy;
}

export class PolicyMap {
  /** sorted, non-overlapping, covering [0, size) */
  private readonly pieces: PolicyPiece[];

  constructor(
    readonly size: number,
    readonly defaultPolicy: WritePolicy,
    readonly ranges: readonly PolicyRange[] = [],
  ) {
    let pieces: PolicyPiece[] = [{ offset: 0, length: size, policy: defaultPolicy }];
    for (const r of ranges) {
      const start = Math.max(0, Math.min(size, r.offset));
      const end = Math.max(start, Math.min(size, r.offset + r.length));
      if (end === start) continue;
      const next: PolicyPiece[] = [];
      for (const p of pieces) {
        const pEnd = p.offset + p.length;
        if (pEnd <= start || p.offset >= end) {
          next.push(p);
          continue;
        }
        if (p.offset < start) next.push({ offset: p.offset, length: start - p.offset, policy: p.policy });
        if (pEnd > end) next.push({ offset: end, length: pEnd - end, policy: p.policy });
      }
      next.push({ offset: start, length: end - start, policy: r.policy });
      next.sort((a, b) => a.offset - b.offset);
      pieces = [];
      for (const p of next) {
        const last = pieces[pieces.length - 1];
        if (last && last.policy === p.policy && last.offset + last.length === p.offset) last.length += p.length;
        else pieces.push({ ...p });
      }
    }
    this.pieces = pieces;
  }

  /** The policies over [offset, offset + length), in order. */
  split(offset: number, length: number): PolicyPiece[] {
    const out: PolicyPiece[] = [];
    const end = offset + length;
    for (const p of this.pieces) {
      const pEnd = p.offset + p.length;
      if (pEnd <= offset) continue;
      if (p.offset >= end) break;
      const from = Math.max(offset, p.offset);
      const to = Math.min(end, pEnd);
      out.push({ offset: from, length: to - from, policy: p.policy });
    }
    return out;
  }

  /** Whether any range ships to the origin (then the volume needs a journal). */
  get shipsAnything(): boolean {
    return this.pieces.some((p) => p.policy !== 'remote-only');
  }

  all(): readonly PolicyPiece[] {
    return this.pieces;
  }
}
