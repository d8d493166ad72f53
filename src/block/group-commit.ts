// Group commit for flushes: callers that ask for a flush while one is running share the next
// one, instead of each queueing its own fdatasync on libuv's small thread pool (where a burst
// of flushes would also hold up reads and writes). Correctness: a flush only covers writes that
// completed before it started, so a caller is answered by a sync that started after its call —
// never by the one already in flight.

export class GroupCommit {
  private running: Promise<void> | null = null;
  private next: Promise<void> | null = null;
  /** syncs actually issued, for stats and tests. */
  syncs = 0;

  constructor(private readonly sync: () => Promise<void>) {}

  /** Resolves (or rejects) with a sync that started after this call. */
  flush(): Promise<void> {
    if (!this.running) return (this.running = this.start());
    this.next ??= this.running
      .catch(() => undefined)
      .then(() => {
        this.next = null;
        return (this.running = this.start());
      });
    return this.next;
  }

  private start(): Promise<void> {
    this.syncs++;
    const p: Promise<void> = this.sync().finally(() => {
      if (this.running === p) this.running = null;
    });
    return p;
  }
}
