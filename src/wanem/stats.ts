// The WAN emulator's counters, and the file they are rewritten to for tests and benchmarks.

import { renameSync, writeFileSync } from 'node:fs';

import { systemClock, type Clock, type TimerHandle } from './clock.js';
import type { WanParams } from './params.js';

export interface DirectionCounts {
  clientToTarget: number;
  targetToClient: number;
}

export interface WanStats {
  /** Where the relay listens and where it connects, HOST:PORT. */
  listen: string;
  target: string;
  params: WanParams;
  uptimeMs: number;
  /** Bytes delivered out of the link (written to the destination socket), each direction. */
  bytes: DirectionCounts;
  /** Bytes read from the source sockets, each direction. */
  bytesReceived: DirectionCounts;
  /** Bytes inside the relay now (serializing, propagating or held by a stall), each direction. */
  queuedBytes: DirectionCounts;
  queue: {
    /** Pause threshold per connection and direction. */
    limitBytes: number;
    /** What a queue can reach: the limit plus one socket read. */
    boundBytes: number;
    /** The most one connection has had queued in one direction since start. */
    peakBytes: number;
  };
  connections: {
    /** Accepted by the listener since start. */
    accepted: number;
    /** Relayed now. */
    active: number;
    /** Closed because the target could not be reached. */
    failed: number;
    /** Destroyed by --reset-every (or resetConnections()). */
    reset: number;
  };
  /** Stalls begun since start, and whether one is under way. */
  stalls: number;
  stalled: boolean;
  /** Reset rounds since start (each destroys every connection relayed at the time). */
  resets: number;
}

export interface StatsFileOptions {
  clock?: Clock;
  /** Default 500 ms. */
  intervalMs?: number;
  /** A periodic rewrite failed (the next one is tried as usual). Default: ignore. */
  onError?: (err: Error) => void;
}

/**
 * Rewrites a JSON file every `intervalMs` and on stop(), atomically (a temporary file renamed
 * over it), so a reader never sees half a file. The first write (start) and the last (stop)
 * throw on failure; the periodic ones report to `onError`.
 */
export class StatsFileWriter {
  private timer: TimerHandle | null = null;
  private readonly tmp: string;
  private readonly clock: Clock;
  private readonly intervalMs: number;
  private readonly onError: (err: Error) => void;

  constructor(
    private readonly path: string,
    private readonly read: () => unknown,
    opts: StatsFileOptions = {},
  ) {
    this.tmp = `${path}.tmp-${process.pid}`;
    this.clock = opts.clock ?? systemClock;
    this.intervalMs = opts.intervalMs ?? 500;
    this.onError = opts.onError ?? (() => {});
  }

  start(): void {
    this.writeNow();
    this.schedule();
  }

  private schedule(): void {
    this.timer = this.clock.setTimer(() => {
      try {
        this.writeNow();
      } catch (err) {
        this.onError(err instanceof Error ? err : new Error(String(err)));
      }
      this.schedule();
    }, this.intervalMs);
  }

  writeNow(): void {
    writeFileSync(this.tmp, JSON.stringify(this.read(), null, 2) + '\n');
    renameSync(this.tmp, this.path);
  }

  /** Stop rewriting, after one last write. */
  stop(): void {
    this.timer?.cancel();
    this.timer = null;
    this.writeNow();
  }
}
