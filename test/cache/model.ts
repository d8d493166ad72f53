// A plain model of the cache's replacement policy (segmented LRU, in bytes), written the
// obvious way with arrays, for the property tests to compare against.

export class SlruModel {
  /** least recently used first */
  probation: { key: string; bytes: number }[] = [];
  protectedSeg: { key: string; bytes: number }[] = [];
  private protectedMax: number;

  constructor(
    capacity: number,
    private readonly share = 0.8,
  ) {
    this.protectedMax = Math.floor(capacity * share);
  }

  setCapacity(capacity: number): void {
    this.protectedMax = Math.floor(capacity * this.share);
    this.rebalance();
  }

  has(key: string): boolean {
    return this.probation.some((e) => e.key === key) || this.protectedSeg.some((e) => e.key === key);
  }

  get bytes(): number {
    return [...this.probation, ...this.protectedSeg].reduce((s, e) => s + e.bytes, 0);
  }

  insert(key: string, bytes: number): void {
    this.probation.push({ key, bytes });
  }

  touch(key: string): void {
    const i = this.probation.findIndex((e) => e.key === key);
    if (i >= 0) {
      const [e] = this.probation.splice(i, 1);
      this.protectedSeg.push(e!);
      this.rebalance();
      return;
    }
    const j = this.protectedSeg.findIndex((e) => e.key === key);
    if (j >= 0) {
      const [e] = this.protectedSeg.splice(j, 1);
      this.protectedSeg.push(e!);
    }
  }

  remove(key: string): void {
    this.probation = this.probation.filter((e) => e.key !== key);
    this.protectedSeg = this.protectedSeg.filter((e) => e.key !== key);
  }

  victim(): string | null {
    return this.probation[0]?.key ?? this.protectedSeg[0]?.key ?? null;
  }

  order(): string[] {
    return [...this.probation, ...this.protectedSeg].map((e) => e.key);
  }

  private rebalance(): void {
    const protBytes = (): number => this.protectedSeg.reduce((s, e) => s + e.bytes, 0);
    while (protBytes() > this.protectedMax && this.protectedSeg.length > 1) {
      this.probation.push(this.protectedSeg.shift()!);
    }
  }
}
