// Progress throttling for one step: at most one progress event per interval, the latest call
// always kept (emitted when the interval ends, or at flush when the step ends).

import type { JsonObject } from '../types.js';

export interface ProgressNote {
  fraction: number | undefined;
  message: string;
  data?: JsonObject;
}

export class ProgressThrottle {
  private lastAt = -Infinity;
  private pending: ProgressNote | null = null;
  private timer: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(
    private readonly intervalMs: number,
    private readonly emit: (p: ProgressNote) => void,
  ) {}

  note(p: ProgressNote): void {
    if (this.closed) return;
    const t = Date.now();
    if (this.timer === undefined && t - this.lastAt >= this.intervalMs) {
      this.lastAt = t;
      this.emit(p);
      return;
    }
    this.pending = p;
    if (this.timer === undefined) this.timer = setTimeout(() => this.fire(), Math.max(0, this.lastAt + this.intervalMs - t));
  }

  private fire(): void {
    this.timer = undefined;
    const p = this.pending;
    this.pending = null;
    if (p && !this.closed) {
      this.lastAt = Date.now();
      this.emit(p);
    }
  }

  /** The step ended: emit what is pending now; later notes are dropped. */
  flush(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    const p = this.pending;
    this.pending = null;
    if (p && !this.closed) this.emit(p);
    this.closed = true;
  }
}
