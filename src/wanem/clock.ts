// The relay's sense of time. Everything time-driven in the WAN emulator (pacing, propagation,
// stall and reset schedules, stats-file rewrites) goes through a Clock, so tests can swap in a
// ManualClock and move time by hand.

export interface TimerHandle {
  cancel(): void;
}

export interface Clock {
  /** Milliseconds, monotonic, fractional allowed. */
  now(): number;
  /** Run `fn` once, `ms` from now (fractional allowed); 0 means as soon as pending I/O is done. */
  setTimer(fn: () => void, ms: number): TimerHandle;
}

/**
 * performance.now() with setTimeout, which has 1 ms granularity and may fire up to about a
 * millisecond early or late; setTimer(fn, 0) is setImmediate (after the pending I/O).
 */
export const systemClock: Clock = {
  now: () => performance.now(),
  setTimer(fn, ms) {
    if (ms <= 0) {
      const i = setImmediate(fn);
      return { cancel: () => clearImmediate(i) };
    }
    const t = setTimeout(fn, ms);
    return { cancel: () => clearTimeout(t) };
  },
};

interface ManualTimer {
  at: number;
  seq: number;
  fn: () => void;
  cancelled: boolean;
}

/** A clock that only moves when advance() is called; due timers fire in time order. */
export class ManualClock implements Clock {
  private current: number;
  private seq = 0;
  private timers: ManualTimer[] = [];

  constructor(start = 0) {
    this.current = start;
  }

  now(): number {
    return this.current;
  }

  setTimer(fn: () => void, ms: number): TimerHandle {
    const timer: ManualTimer = { at: this.current + Math.max(0, ms), seq: this.seq++, fn, cancelled: false };
    this.timers.push(timer);
    return {
      cancel: () => {
        timer.cancelled = true;
      },
    };
  }

  /** Timers not yet fired or cancelled. */
  get pending(): number {
    return this.timers.filter((t) => !t.cancelled).length;
  }

  /** Move time forward by `ms`, firing every timer that falls due, each at its own time. */
  advance(ms: number): void {
    const end = this.current + ms;
    let sameInstant = 0;
    let instant = this.current;
    for (;;) {
      this.timers = this.timers.filter((t) => !t.cancelled);
      let next: ManualTimer | undefined;
      for (const t of this.timers) if (t.at <= end && (!next || t.at < next.at || (t.at === next.at && t.seq < next.seq))) next = t;
      if (!next) break;
      this.timers.splice(this.timers.indexOf(next), 1);
      this.current = Math.max(this.current, next.at);
      if (this.current !== instant) {
        instant = this.current;
        sameInstant = 0;
      } else if (++sameInstant > 100_000) {
        throw new Error('ManualClock: timers keep re-arming themselves without time passing');
      }
      next.fn();
    }
    this.current = end;
  }
}
