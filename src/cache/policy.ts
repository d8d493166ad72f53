// Replacement policy: segmented LRU (SLRU, Karedla et al. 1994), counted in bytes.
//
// New content enters the *probationary* segment. A hit there promotes it to the *protected*
// segment; a hit in protected moves it to protected's MRU end. When protected outgrows its
// share of the capacity, its LRU entries are demoted to probation's MRU end. The victim is
// probation's LRU entry, or protected's when probation is empty.
//
// Why not plain LRU: chunks a VM reads once (boot, a backup agent walking the disk, a prefetch
// plan or hydration pushing a whole volume through) would flush the working set of every other
// volume out of a plain LRU. Under SLRU they churn only the probationary segment; anything
// read twice is protected. Costs stay O(1) per operation (two intrusive lists), and behaviour is
// deterministic, so tests compare it step by step with a model.
//
// This module is a pure data structure: no I/O, no clock.

export const SEG_NONE = 0;
export const SEG_PROBATION = 1;
export const SEG_PROTECTED = 2;
export type Segment = typeof SEG_NONE | typeof SEG_PROBATION | typeof SEG_PROTECTED;

/** Fields a cached item carries for the policy (intrusive: no allocation per operation). */
export interface PolicyNode {
  lruPrev: PolicyNode | null;
  lruNext: PolicyNode | null;
  lruSeg: Segment;
  /** bytes the item occupies; must not change while the item is in the policy. */
  readonly lruBytes: number;
}

class NodeList {
  /** least recently used end */
  head: PolicyNode | null = null;
  /** most recently used end */
  tail: PolicyNode | null = null;
  bytes = 0;
  count = 0;

  pushMru(n: PolicyNode, seg: Segment): void {
    n.lruSeg = seg;
    n.lruPrev = this.tail;
    n.lruNext = null;
    if (this.tail) this.tail.lruNext = n;
    else this.head = n;
    this.tail = n;
    this.bytes += n.lruBytes;
    this.count++;
  }

  remove(n: PolicyNode): void {
    if (n.lruPrev) n.lruPrev.lruNext = n.lruNext;
    else this.head = n.lruNext;
    if (n.lruNext) n.lruNext.lruPrev = n.lruPrev;
    else this.tail = n.lruPrev;
    n.lruPrev = n.lruNext = null;
    n.lruSeg = SEG_NONE;
    this.bytes -= n.lruBytes;
    this.count--;
  }
}

export class SlruPolicy<N extends PolicyNode> {
  private readonly probation = new NodeList();
  private readonly protectedList = new NodeList();
  private protectedMax = 0;

  /** @param protectedShare share of the capacity the protected segment may hold (0..1). */
  constructor(
    capacityBytes: number,
    private readonly protectedShare = 0.8,
  ) {
    this.setCapacity(capacityBytes);
  }

  setCapacity(capacityBytes: number): void {
    this.protectedMax = Math.floor(capacityBytes * this.protectedShare);
    this.rebalance();
  }

  get bytes(): number {
    return this.probation.bytes + this.protectedList.bytes;
  }

  get count(): number {
    return this.probation.count + this.protectedList.count;
  }

  segmentBytes(): { probation: number; protected: number } {
    return { probation: this.probation.bytes, protected: this.protectedList.bytes };
  }

  segmentCounts(): { probation: number; protected: number } {
    return { probation: this.probation.count, protected: this.protectedList.count };
  }

  has(n: N): boolean {
    return n.lruSeg !== SEG_NONE;
  }

  /** New content: probation, MRU end. */
  insert(n: N): void {
    if (n.lruSeg !== SEG_NONE) throw new Error('policy: node inserted twice');
    this.probation.pushMru(n, SEG_PROBATION);
  }

  /** A hit. */
  touch(n: N): void {
    if (n.lruSeg === SEG_PROBATION) {
      this.probation.remove(n);
      this.protectedList.pushMru(n, SEG_PROTECTED);
      this.rebalance();
    } else if (n.lruSeg === SEG_PROTECTED) {
      this.protectedList.remove(n);
      this.protectedList.pushMru(n, SEG_PROTECTED);
    }
  }

  remove(n: N): void {
    if (n.lruSeg === SEG_PROBATION) this.probation.remove(n);
    else if (n.lruSeg === SEG_PROTECTED) this.protectedList.remove(n);
  }

  /** The next item to evict, or null when empty. */
  victim(): N | null {
    return (this.probation.head ?? this.protectedList.head) as N | null;
  }

  /** Every item from the next victim to the most valuable: probation LRU→MRU, then protected LRU→MRU. */
  *evictionOrder(): Generator<N> {
    for (const list of [this.probation, this.protectedList]) {
      for (let n = list.head; n; n = n.lruNext) yield n as N;
    }
  }

  private rebalance(): void {
    // Demote while protected is over its share; keep at least one entry so a single large
    // item is not bounced back and forth.
    while (this.protectedList.bytes > this.protectedMax && this.protectedList.count > 1) {
      const n = this.protectedList.head;
      if (!n) break;
      this.protectedList.remove(n);
      this.probation.pushMru(n, SEG_PROBATION);
    }
  }
}
