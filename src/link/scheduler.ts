// Deterministic cores of the link's sender: a priority queue of chunk jobs (demand > group push
// > prefetch > hydration) with de-duplication, priority upgrade and cancel; and a token-bucket
// bandwidth limiter with an injected clock. The runner (session.ts) does the I/O.

import type { Priority } from './protocol.js';

export interface ChunkJob {
  handle: number;
  index: number;
  priority: Priority;
  /** the chunk was not asked for (group push, prefetch, hydration pushes). */
  pushed: boolean;
  /** for a push: the fill token of the request that caused it (see LinkMessage 'fetch'). */
  token?: number;
}

export class QueueFullError extends Error {
  readonly code = 'SPW_ERR_LINK_QUEUE_FULL';
  constructor(priority: Priority, limit: number) {
    super(`the ${priority} queue holds its limit of ${limit} chunks; retry later`);
    this.name = 'QueueFullError';
  }
}

const key = (handle: number, index: number): string => `${handle}:${index}`;

/**
 * Strict-priority FIFO per class. Enqueuing a chunk already queued keeps one job at the higher
 * of the two priorities (a demand read for a chunk queued for prefetch jumps the line). Each
 * class has a bound; demand's bound is the largest, since the requester bounds it too.
 */
export class ChunkQueue {
  private readonly classes: Array<Map<string, ChunkJob>> = [new Map(), new Map(), new Map(), new Map()];
  private readonly limits: readonly number[];

  constructor(limits: readonly number[] = [65536, 65536, 65536, 65536]) {
    this.limits = limits;
  }

  get size(): number {
    return this.classes.reduce((n, c) => n + c.size, 0);
  }

  sizeOf(priority: Priority): number {
    return this.classes[priority]!.size;
  }

  /** Returns false when the chunk was already queued at the same or a higher priority. */
  push(job: ChunkJob): boolean {
    const k = key(job.handle, job.index);
    for (let p = 0; p < this.classes.length; p++) {
      const existing = this.classes[p]!.get(k);
      if (!existing) continue;
      // Every request merged into one job arrived before the chunk is read, so the newest of
      // their tokens is still older than that read.
      const token = Math.max(existing.token ?? 0, job.token ?? 0);
      if (p <= job.priority) {
        existing.token = token;
        return false;
      }
      this.classes[p]!.delete(k);
      // An upgrade keeps "pushed" only if both were pushes: a demand request must be answered.
      this.classes[job.priority]!.set(k, { ...job, pushed: existing.pushed && job.pushed, token });
      return true;
    }
    const cls = this.classes[job.priority]!;
    if (cls.size >= this.limits[job.priority]!) throw new QueueFullError(job.priority, this.limits[job.priority]!);
    cls.set(k, job);
    return true;
  }

  /** The next job: the oldest of the highest non-empty class. */
  shift(): ChunkJob | undefined {
    for (const cls of this.classes) {
      const first = cls.entries().next();
      if (!first.done) {
        cls.delete(first.value[0]);
        return first.value[1];
      }
    }
    return undefined;
  }

  /** Highest priority waiting, or undefined when empty. */
  peekPriority(): Priority | undefined {
    for (let p = 0; p < this.classes.length; p++) if (this.classes[p]!.size > 0) return p as Priority;
    return undefined;
  }

  /** Remove queued jobs of a volume at `priority` or lower (numerically >=) in the ranges. */
  cancel(handle: number, priority: Priority, ranges: ReadonlyArray<{ start: number; count: number }>): number {
    let n = 0;
    for (let p = priority; p < this.classes.length; p++) {
      const cls = this.classes[p]!;
      for (const r of ranges) {
        if (r.count > cls.size) {
          for (const [k, j] of cls) if (j.handle === handle && j.index >= r.start && j.index < r.start + r.count && cls.delete(k)) n++;
        } else {
          for (let i = r.start; i < r.start + r.count; i++) if (cls.delete(key(handle, i))) n++;
        }
      }
    }
    return n;
  }

  /** Drop every job of a volume (it was closed). */
  dropVolume(handle: number): void {
    for (const cls of this.classes) for (const [k, j] of cls) if (j.handle === handle) cls.delete(k);
  }
}

/**
 * Token bucket over bytes. `rate` bytes/s (0 = unlimited), `burst` bytes of headroom.
 * `delayFor(n)` is how long to wait before n bytes may go; `take(n)` spends them (the bucket
 * may go negative by one frame, which keeps large frames from starving).
 */
export class TokenBucket {
  private tokens: number;
  private last: number;

  constructor(
    private rate: number,
    private burst: number,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.tokens = burst;
    this.last = now();
  }

  setRate(rate: number, burst = this.burst): void {
    this.refill();
    this.rate = rate;
    this.burst = burst;
    this.tokens = Math.min(this.tokens, burst);
  }

  get unlimited(): boolean {
    return this.rate <= 0;
  }

  delayFor(n: number): number {
    if (this.rate <= 0) return 0;
    this.refill();
    if (this.tokens >= Math.min(n, this.burst)) return 0;
    return ((Math.min(n, this.burst) - this.tokens) / this.rate) * 1000;
  }

  take(n: number): void {
    if (this.rate <= 0) return;
    this.refill();
    this.tokens -= n;
  }

  private refill(): void {
    const t = this.now();
    this.tokens = Math.min(this.burst, this.tokens + ((t - this.last) / 1000) * this.rate);
    this.last = t;
  }
}

