// Streams a prefetch plan (an ordered list of chunks, see prefetch/planner.ts) into the secure
// cache in the prefetch class, through the background gate so that it never fills the path
// ahead of demand reads. It keeps score: what it fetched and the guest then read (used), what
// the guest asked for while it was still on its way (late), and what it fetched that the guest
// has not read (unused; evicted before use counts as wasted).

import type { SecureCache } from '../../cache/cache.js';
import { PRIORITY } from '../../link/protocol.js';
import type { Logger } from '../../log/logger.js';
import type { BackgroundGate } from './background.js';
import type { RemoteVolume } from './remote-volume.js';
import { prefetchMetrics } from './metrics.js';

export interface PrefetchStatus {
  state: 'running' | 'done' | 'stopped';
  /** where the plan came from (profile names). */
  sources: string[];
  planned: number;
  plannedBytes: number;
  /** chunks the cache already held when their turn came. */
  alreadyCached: number;
  fetched: number;
  fetchedBytes: number;
  failed: number;
  /** fetched by the plan, then read by the guest. */
  used: number;
  /** read by the guest while the plan's fetch was still in flight. */
  late: number;
  /** fetched and not read (yet). */
  unused: number;
  /** fetched, not read, and no longer in the cache. */
  wasted: number;
  /** used / fetched, 0..1 (null before anything was fetched). */
  hitRate: number | null;
  elapsedSeconds: number;
}

export class Prefetcher {
  private state: PrefetchStatus['state'] = 'running';
  private readonly requested: Uint8Array;
  private readonly arrived: Uint8Array;
  private readonly usedBits: Uint8Array;
  private fetched = 0;
  private fetchedBytes = 0;
  private alreadyCached = 0;
  private failed = 0;
  private used = 0;
  private late = 0;
  private readonly started = performance.now();
  private finishedAt: number | null = null;
  private readonly metrics = prefetchMetrics();
  private readonly plannedBytes: number;

  constructor(
    private readonly opts: {
      volume: RemoteVolume;
      exportName: string;
      cache: SecureCache;
      gate: BackgroundGate;
      plan: readonly number[];
      sources: string[];
      log: Logger;
    },
  ) {
    const n = opts.volume.chunkCount;
    this.requested = new Uint8Array(Math.ceil(n / 8));
    this.arrived = new Uint8Array(Math.ceil(n / 8));
    this.usedBits = new Uint8Array(Math.ceil(n / 8));
    this.plannedBytes = opts.plan.reduce((s, i) => s + opts.volume.chunkLength(i), 0);
  }

  start(): void {
    void this.loop();
  }

  stop(): void {
    if (this.state === 'running') this.finish('stopped');
  }

  /** The guest read [offset, offset + length) from the base image (ReadTap listener). */
  noteRead(offset: number, length: number): void {
    const info = this.opts.volume.info;
    if (!info || length === 0) return;
    const first = Math.floor(offset / info.chunkSize);
    const last = Math.floor((offset + length - 1) / info.chunkSize);
    for (let c = first; c <= last; c++) {
      if (!bit(this.requested, c) || bit(this.usedBits, c)) continue;
      set(this.usedBits, c);
      this.used++;
      this.metrics.used.inc({ volume: this.opts.exportName });
      if (!bit(this.arrived, c)) {
        this.late++;
        this.metrics.late.inc({ volume: this.opts.exportName });
      }
    }
  }

  status(): PrefetchStatus {
    let wasted = 0;
    let unused = 0;
    for (const c of this.opts.plan) {
      if (!bit(this.arrived, c) || bit(this.usedBits, c)) continue;
      unused++;
      if (this.opts.cache.lookup(this.opts.volume.name, c) === null) wasted++;
    }
    const end = this.finishedAt ?? performance.now();
    return {
      state: this.state,
      sources: this.opts.sources,
      planned: this.opts.plan.length,
      plannedBytes: this.plannedBytes,
      alreadyCached: this.alreadyCached,
      fetched: this.fetched,
      fetchedBytes: this.fetchedBytes,
      failed: this.failed,
      used: this.used,
      late: this.late,
      unused,
      wasted,
      hitRate: this.fetched > 0 ? Math.min(1, this.used / this.fetched) : null,
      elapsedSeconds: (end - this.started) / 1000,
    };
  }

  private async loop(): Promise<void> {
    const { volume, cache, gate, plan } = this.opts;
    const inFlight = new Set<Promise<void>>();
    for (const c of plan) {
      if (this.state !== 'running') break;
      if (c < 0 || c >= volume.chunkCount) continue;
      if (cache.lookup(volume.name, c) !== null) {
        this.alreadyCached++;
        continue;
      }
      await gate.acquire(PRIORITY.PREFETCH);
      if (this.state !== 'running') {
        gate.release(null);
        break;
      }
      set(this.requested, c);
      const t0 = performance.now();
      const p = volume
        .fetch(c, PRIORITY.PREFETCH)
        .then(
          () => {
            gate.release(performance.now() - t0);
            set(this.arrived, c);
            this.fetched++;
            this.fetchedBytes += volume.chunkLength(c);
            this.metrics.fetched.inc({ volume: this.opts.exportName });
          },
          (err: Error) => {
            gate.release(null);
            this.failed++;
            if (this.failed <= 3) this.opts.log('warn', 'prefetch of a chunk failed', { volume: this.opts.exportName, chunk: c, err: err.message });
          },
        )
        .finally(() => inFlight.delete(p));
      inFlight.add(p);
    }
    await Promise.all(inFlight);
    if (this.state === 'running') this.finish('done');
  }

  private finish(state: 'done' | 'stopped'): void {
    this.state = state;
    this.finishedAt = performance.now();
    const s = this.status();
    this.opts.log('info', state === 'done' ? 'prefetch plan done' : 'prefetch plan stopped', { volume: this.opts.exportName, planned: s.planned, fetched: s.fetched, alreadyCached: s.alreadyCached, used: s.used, late: s.late, failed: s.failed, seconds: Number(s.elapsedSeconds.toFixed(1)) });
  }
}

function bit(b: Uint8Array, i: number): boolean {
  return (b[i >> 3]! & (1 << (i & 7))) !== 0;
}

function set(b: Uint8Array, i: number): void {
  b[i >> 3] = b[i >> 3]! | (1 << (i & 7));
}
