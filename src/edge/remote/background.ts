// The remote role's gate for background fetches (prefetch plans and hydration): how many of
// their chunks may be in flight on the link at once. The owner serves demand first from its
// queue, but a chunk already on the wire cannot be overtaken, so everything in flight beyond
// what the path holds is queueing delay a demand read has to wait behind. The window adapts
// like TCP Vegas on the fetch latency of background chunks: it grows while latency stays near
// the least seen (the path has room), and shrinks when latency rises (chunks are queueing).
// Within the gate, prefetch goes before hydration.

import type { Priority } from '../../link/protocol.js';

export interface BackgroundGateOptions {
  /** fewest chunks in flight (default 1). */
  min?: number;
  /** most chunks in flight (default 64). */
  max?: number;
  /** chunks queued in the path to aim for: grow below alpha, shrink above beta (0.4, 1). */
  alpha?: number;
  beta?: number;
  /** forget the least latency after this long, so a changed path is learnt again (30 s). */
  baseMemoryMs?: number;
  now?: () => number;
}

export interface BackgroundGateStatus {
  window: number;
  inFlight: number;
  waiting: number;
  baseLatencyMs: number | null;
  lastLatencyMs: number | null;
}

interface Waiter {
  priority: Priority;
  resolve: () => void;
}

export class BackgroundGate {
  private windowValue: number;
  private inFlight = 0;
  private readonly waiters: Waiter[] = [];
  private base = Infinity;
  private nextBase = Infinity;
  private baseSince: number;
  private last: number | null = null;
  private readonly min: number;
  private readonly max: number;
  private readonly alpha: number;
  private readonly beta: number;
  private readonly baseMemoryMs: number;
  private readonly now: () => number;

  constructor(opts: BackgroundGateOptions = {}) {
    this.min = Math.max(1, opts.min ?? 1);
    this.max = Math.max(this.min, opts.max ?? 64);
    this.alpha = opts.alpha ?? 0.4;
    this.beta = Math.max(this.alpha, opts.beta ?? 1);
    this.baseMemoryMs = opts.baseMemoryMs ?? 30_000;
    this.now = opts.now ?? (() => performance.now());
    this.windowValue = this.min;
    this.baseSince = this.now();
  }

  get window(): number {
    return Math.floor(this.windowValue);
  }

  /** Run `fetch` when the window has room; its latency feeds the window. */
  async run<T>(priority: Priority, fetch: () => Promise<T>): Promise<T> {
    await this.acquire(priority);
    const started = this.now();
    let ok = false;
    try {
      const v = await fetch();
      ok = true;
      return v;
    } finally {
      this.release(ok ? this.now() - started : null);
    }
  }

  acquire(priority: Priority): Promise<void> {
    if (this.inFlight < this.window && this.waiters.length === 0) {
      this.inFlight++;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const w: Waiter = { priority, resolve };
      // Keep waiters ordered by class (prefetch before hydration), FIFO within one.
      let i = this.waiters.length;
      while (i > 0 && this.waiters[i - 1]!.priority > priority) i--;
      this.waiters.splice(i, 0, w);
    });
  }

  /** A fetch finished; `latencyMs` null when it failed (no sample). */
  release(latencyMs: number | null): void {
    this.inFlight--;
    if (latencyMs !== null) this.sample(latencyMs);
    this.wake();
  }

  status(): BackgroundGateStatus {
    return { window: this.window, inFlight: this.inFlight, waiting: this.waiters.length, baseLatencyMs: Number.isFinite(this.base) ? this.base : null, lastLatencyMs: this.last };
  }

  private sample(ms: number): void {
    const t = this.now();
    this.last = ms;
    // The least latency of the last two periods is the path without our own queue.
    if (t - this.baseSince > this.baseMemoryMs) {
      this.base = Math.min(this.nextBase, ms);
      this.nextBase = Infinity;
      this.baseSince = t;
    }
    this.nextBase = Math.min(this.nextBase, ms);
    this.base = Math.min(this.base, ms);
    // Chunks of ours queued in the path: window × (1 - base / latency).
    const queued = this.windowValue * (1 - this.base / Math.max(ms, 1e-3));
    if (queued < this.alpha) this.windowValue = Math.min(this.max, this.windowValue + 1 / this.windowValue);
    else if (queued > this.beta) this.windowValue = Math.max(this.min, this.windowValue - 1 / this.windowValue);
  }

  private wake(): void {
    while (this.waiters.length > 0 && this.inFlight < this.window) {
      this.inFlight++;
      this.waiters.shift()!.resolve();
    }
  }
}
