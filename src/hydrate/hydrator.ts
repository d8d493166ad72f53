// Hydrator: the background copier of migration mode. It walks the chunks of a HydratedDevice
// whose bits are clear, in index order, fetches each from the source in the link's lowest
// class (PRIORITY.HYDRATION), with at most `inFlight` fetches at once and a token-bucket rate
// limit, and lands them through the device's one write path (HydratedDevice.land, committed in
// batches: one fdatasync, then the bits). Fetch failures (link down: the RemoteVolume rejects
// after its I/O timeout) are retried after an exponential backoff shared by every worker, so a
// dead link never makes it spin. When every bit is set the device writes `complete: true`.
// Resuming after a crash starts from the bitmap: a chunk whose bit is set is never fetched.

import { TokenBucket } from '../link/scheduler.js';
import { PRIORITY } from '../link/protocol.js';
import type { Logger } from '../log/logger.js';
import { HydrationError, type ChunkSource, type HydratedDevice } from './hydrated-device.js';
import { hydrateMetrics, hydrationGaugeSources, type HydrationGaugeSource, type HydrationStateName } from './metrics.js';

export interface HydratorOptions {
  readonly log: Logger;
  /** bytes of chunk data per second (zero chunks are free); 0 = unlimited. Default 0. */
  readonly rate?: number;
  /** most fetches in flight (memory: inFlight × chunk size). Default 4. */
  readonly inFlight?: number;
  /** first backoff after a failed fetch; doubles per consecutive failure. Default 1000 ms. */
  readonly retryInitialMs?: number;
  /** longest backoff. Default 60 s. */
  readonly retryMaxMs?: number;
  /** clock in ms (rate limiter, rate and ETA); default performance.now. */
  readonly now?: () => number;
  /** waits `ms`, or less when `wake` aborts; default a timer. Tests pass a virtual clock. */
  readonly sleep?: (ms: number, wake: AbortSignal) => Promise<void>;
}

export interface HydrationStatus {
  readonly state: HydrationStateName;
  /** chunks / bytes in the local file (durable within one commit interval). */
  readonly doneChunks: number;
  readonly totalChunks: number;
  readonly doneBytes: number;
  readonly totalBytes: number;
  /** chunks whose bits are on disk. */
  readonly durableChunks: number;
  /** chunks that landed because a guest read them (this process). */
  readonly demandLanded: number;
  /** smoothed landing rate in bytes/s (both ways); 0 until measured. */
  readonly ratePerSecond: number;
  /** seconds to completion at ratePerSecond; null while unknown; 0 when complete. */
  readonly etaSeconds: number | null;
  /** configured limit in bytes/s, 0 = unlimited. */
  readonly rateLimit: number;
  /** fetches sent to the source by this hydrator (this process). */
  readonly fetches: number;
  /** consecutive failed fetches (0 when the last one worked); >0 means backing off. */
  readonly failures: number;
  readonly lastError: string | null;
}

/** Thrown into the workers' awaits when stop() is called; never escapes. */
const STOPPED = Symbol('stopped');

function defaultSleep(ms: number, wake: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (wake.aborted) return resolve();
    const done = (): void => {
      clearTimeout(t);
      wake.removeEventListener('abort', done);
      resolve();
    };
    const t = setTimeout(done, ms);
    wake.addEventListener('abort', done, { once: true });
  });
}

/** Settle with `p`, or reject with STOPPED as soon as `signal` aborts (p is then abandoned). */
function unlessStopped<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    p.catch(() => undefined);
    return Promise.reject(STOPPED);
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(STOPPED);
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e);
      },
    );
  });
}

const RATE_UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1024,
  kb: 1000,
  kib: 1024,
  m: 1024 ** 2,
  mb: 1000 ** 2,
  mib: 1024 ** 2,
  g: 1024 ** 3,
  gb: 1000 ** 3,
  gib: 1024 ** 3,
  bit: 1 / 8,
  kbit: 1000 / 8,
  mbit: 1000 ** 2 / 8,
  gbit: 1000 ** 3 / 8,
  kibit: 1024 / 8,
  mibit: 1024 ** 2 / 8,
  gibit: 1024 ** 3 / 8,
};

/**
 * A hydration rate → bytes per second. Numbers are bytes/s; strings take a unit with an
 * optional "/s" or "ps": bits in decimal multiples ("50Mbit", "1 Gbit/s", "800kbit"), bytes like
 * sizes elsewhere ("10MB/s" = 10^7, "10MiB" or "10M" = 10·2^20). "0" or "unlimited" = no limit.
 */
export function parseRate(text: string | number): number {
  if (typeof text === 'number') {
    if (!Number.isFinite(text) || text < 0) throw new RangeError(`hydration rate ${text} must be a non-negative number of bytes/s`);
    return Math.floor(text);
  }
  const t = text.trim();
  if (/^(unlimited|none|off)$/i.test(t)) return 0;
  const m = /^(\d+(?:\.\d+)?)\s*([a-zA-Z]*?)\s*(\/s|ps)?$/.exec(t);
  let u = m?.[2] ?? '';
  // "Mbps" is megabits; a lower-case "b" otherwise ("Mb", "kb/s") is bits to some and bytes to
  // others: refuse it
  if (m?.[3] === 'ps' && u.endsWith('b')) u = `${u.slice(0, -1)}bit`;
  const unit = u.endsWith('b') ? undefined : RATE_UNITS[u.toLowerCase()];
  if (!m || unit === undefined) {
    throw new RangeError(`"${text}" is not a rate (examples: 50Mbit, 50Mbps, 1Gbit/s, 10MB/s, 20MiB/s, 5000000 for bytes/s, 0 for unlimited)`);
  }
  return Math.floor(Number(m[1]) * unit);
}

export class Hydrator implements HydrationGaugeSource {
  readonly volume: string;
  private stateName: HydrationStateName;
  private runner: Promise<void> | null = null;
  private stopCtl = new AbortController();
  private wakeCtl = new AbortController();
  private paused = false;
  private cursor = 0;
  private readonly bucket: TokenBucket;
  private rateLimit: number;
  private readonly inFlight: number;
  private readonly retryInitialMs: number;
  private readonly retryMaxMs: number;
  private readonly now: () => number;
  private readonly sleep: (ms: number, wake: AbortSignal) => Promise<void>;
  private readonly log: Logger;
  private readonly metrics = hydrateMetrics();
  private failures = 0;
  private backoffUntil = 0;
  private lastError: string | null = null;
  private fetchCount = 0;
  private sample: { t: number; bytes: number } | undefined;
  private rate = 0;
  private errorWaiters: Array<(e: Error) => void> = [];

  constructor(
    private readonly device: HydratedDevice,
    opts: HydratorOptions,
  ) {
    if (!device.source && !device.complete) throw new RangeError('a Hydrator needs a HydratedDevice opened with a source');
    this.volume = device.name;
    this.log = opts.log;
    this.inFlight = opts.inFlight ?? 4;
    if (!Number.isSafeInteger(this.inFlight) || this.inFlight < 1 || this.inFlight > 1024) throw new RangeError(`hydration inFlight must be 1..1024, got ${this.inFlight}`);
    this.retryInitialMs = Math.max(1, opts.retryInitialMs ?? 1000);
    this.retryMaxMs = Math.max(this.retryInitialMs, opts.retryMaxMs ?? 60_000);
    this.now = opts.now ?? (() => performance.now());
    this.sleep = opts.sleep ?? defaultSleep;
    this.rateLimit = parseRate(opts.rate ?? 0);
    this.bucket = new TokenBucket(this.rateLimit, this.burstFor(this.rateLimit), this.now);
    this.stateName = device.complete ? 'complete' : 'stopped';
  }

  /** Fetches sent to the source by this hydrator (for tests and status). */
  get fetches(): number {
    return this.fetchCount;
  }

  /** Begin (or go on after stop() or an error). A complete volume goes straight to 'complete'. */
  start(): void {
    hydrationGaugeSources.add(this);
    if (this.runner) return;
    if (this.device.complete) {
      this.stateName = 'complete';
      return;
    }
    this.stopCtl = new AbortController();
    this.stateName = this.paused ? 'paused' : 'running';
    this.lastError = null;
    this.runner = this.run().finally(() => (this.runner = null));
  }

  /** Let in-flight fetches finish and land; send no new ones until resume(). */
  pause(): void {
    this.paused = true;
    if (this.stateName === 'running') this.stateName = 'paused';
    this.wake();
  }

  resume(): void {
    this.paused = false;
    if (this.stateName === 'paused') this.stateName = 'running';
    this.wake();
  }

  /** Change the limit (bytes/s or a parseRate string; 0 = unlimited) while running. */
  setRate(rate: number | string): void {
    this.rateLimit = parseRate(rate);
    this.bucket.setRate(this.rateLimit, this.burstFor(this.rateLimit));
    this.wake();
  }

  /** Stop fetching, abandon fetches still waiting on the source, wait for landings in flight,
   *  and commit (fdatasync + bitmap). Idempotent; start() goes on from the bitmap. */
  async stop(): Promise<void> {
    this.stopCtl.abort();
    this.wake();
    if (this.runner) await this.runner;
    await this.device.settle();
    await this.device.commit();
    hydrationGaugeSources.delete(this);
  }

  /** Resolves when the volume is complete (by the hydrator or by demand reads); rejects if the
   *  hydrator stops on an error it cannot retry (a local write failed). */
  whenComplete(): Promise<void> {
    if (this.device.complete) return Promise.resolve();
    if (this.stateName === 'error') return Promise.reject(new HydrationError(`hydration of ${this.device.path} stopped: ${this.lastError}`));
    return new Promise((resolve, reject) => {
      this.errorWaiters.push(reject);
      void this.device.whenComplete().then(resolve);
    });
  }

  status(): HydrationStatus {
    const p = this.device.progress();
    this.sampleRate(p.landedBytes);
    const complete = this.device.complete;
    const remaining = this.device.size - p.landedBytes;
    return {
      state: complete ? 'complete' : this.stateName,
      doneChunks: p.landedChunks,
      totalChunks: this.device.chunkCount,
      doneBytes: p.landedBytes,
      totalBytes: this.device.size,
      durableChunks: p.durableChunks,
      demandLanded: this.device.counters.demandLanded,
      ratePerSecond: Math.round(this.rate),
      etaSeconds: complete ? 0 : this.rate > 0 ? Math.ceil(remaining / this.rate) : null,
      rateLimit: this.rateLimit,
      fetches: this.fetchCount,
      failures: this.failures,
      lastError: this.lastError,
    };
  }

  gaugeSample(): ReturnType<HydrationGaugeSource['gaugeSample']> {
    return this.status();
  }

  // ---- internals ----------------------------------------------------------------------------

  private burstFor(rate: number): number {
    // at least one chunk may go at once, and about 100 ms of the rate
    return Math.max(this.device.chunkSize, Math.floor(rate / 10));
  }

  private wake(): void {
    this.wakeCtl.abort();
    this.wakeCtl = new AbortController();
  }

  private get stopping(): boolean {
    return this.stopCtl.signal.aborted;
  }

  private nap(ms: number): Promise<void> {
    return this.sleep(ms, this.wakeCtl.signal);
  }

  private async run(): Promise<void> {
    this.log('info', 'hydration running', { path: this.device.path, ...this.summary() });
    try {
      while (!this.device.complete && !this.stopping) {
        this.cursor = 0;
        let fetched = 0;
        let failure: unknown = null;
        const workers = Array.from({ length: this.inFlight }, () =>
          this.worker(() => fetched++).catch((err: unknown) => {
            failure ??= err;
            this.stopCtl.abort(); // the other workers stop too
            this.wake();
          }),
        );
        await Promise.all(workers);
        if (failure !== null) throw failure;
        if (this.stopping) break;
        // Every chunk is in the file or landing by demand: make it all durable.
        await this.device.settle();
        await this.device.commit();
        if (!this.device.complete && fetched === 0) {
          throw new HydrationError(`hydration of ${this.device.path} made no progress in a full pass but is not complete (a bug); restart it`);
        }
      }
      if (this.device.complete) {
        this.stateName = 'complete';
        this.log('info', 'hydration complete', { path: this.device.path, ...this.summary() });
      } else {
        this.stateName = 'stopped';
        this.log('info', 'hydration stopped', { path: this.device.path, ...this.summary() });
      }
    } catch (err) {
      this.stateName = 'error';
      this.lastError = (err as Error).message ?? String(err);
      this.log('error', 'hydration stopped on an error; fix the cause and start it again', { path: this.device.path, err: this.lastError });
      const e = new HydrationError(`hydration of ${this.device.path} stopped: ${this.lastError}`, { cause: err });
      for (const w of this.errorWaiters.splice(0)) w(e);
    }
  }

  private summary(): Record<string, unknown> {
    const p = this.device.progress();
    return { done: p.landedChunks, total: this.device.chunkCount, fetches: this.fetchCount, rateLimit: this.rateLimit };
  }

  private nextChunk(): number {
    while (this.cursor < this.device.chunkCount && this.device.has(this.cursor)) this.cursor++;
    return this.cursor < this.device.chunkCount ? this.cursor++ : -1;
  }

  /** One of `inFlight` workers: take the next missing chunk, wait for the limiter, fetch
   *  (retrying), land. Returns when there is nothing left or on stop. */
  private async worker(onFetched: () => void): Promise<void> {
    const source = this.device.source!;
    for (;;) {
      if (!(await this.ready())) return;
      const i = this.nextChunk();
      if (i < 0) return;
      const len = this.device.chunkLength(i);
      // bound the work a crash can lose: commit before running ahead of it
      while (this.device.uncommitted >= this.device.commitChunks && !this.stopping) await this.device.commit();
      if (!(await this.admit())) return;
      let data: Buffer | 'zero' | null;
      try {
        data = await this.fetchWithRetry(source, i, len);
      } catch (err) {
        if (err === STOPPED) return;
        throw err;
      }
      if (data === null) continue; // landed by a demand read meanwhile
      // charged after the fetch, for what it carried: zero chunks cost the link a few bytes
      if (data !== 'zero') this.bucket.take(len);
      onFetched();
      await this.device.land(i, data, 'hydration'); // false: a demand read landed it meanwhile
      this.sampleRate(this.device.progress().landedBytes);
    }
  }

  /** Wait while paused; false once stopping. */
  private async ready(): Promise<boolean> {
    while (this.paused && !this.stopping) await this.nap(60_000);
    return !this.stopping;
  }

  /** The rate limit: wait while the bucket is in debt. Each fetch is charged when it returns
   *  (a zero chunk costs nothing), so the long-run rate is exact and fetches in flight can run
   *  ahead by at most inFlight chunks. */
  private async admit(): Promise<boolean> {
    for (;;) {
      if (!(await this.ready())) return false;
      const d = this.bucket.delayFor(1);
      if (d <= 0) return true;
      await this.nap(d);
    }
  }

  /** The chunk from the source, or null when it landed meanwhile (nothing fetched). */
  private async fetchWithRetry(source: ChunkSource, i: number, len: number): Promise<Buffer | 'zero' | null> {
    for (;;) {
      // a backoff set by any worker holds every worker: a dead link is probed, not hammered
      for (let wait = this.backoffUntil - this.now(); wait > 0; wait = this.backoffUntil - this.now()) {
        await this.nap(wait);
        if (this.stopping) throw STOPPED;
      }
      if (!(await this.ready())) throw STOPPED;
      if (this.device.has(i)) return null; // a demand read landed it while this one waited
      this.fetchCount++;
      this.metrics.fetches.inc({ volume: this.volume });
      try {
        const data = await unlessStopped(source.fetch(i, PRIORITY.HYDRATION), this.stopCtl.signal);
        if (data !== 'zero' && data.length !== len) throw new Error(`chunk ${i}: the source returned ${data.length} bytes, expected ${len}`);
        this.failures = 0;
        return data;
      } catch (err) {
        if (err === STOPPED) throw err;
        this.failures++;
        this.lastError = (err as Error).message ?? String(err);
        this.metrics.fetchErrors.inc({ volume: this.volume });
        const delay = Math.min(this.retryMaxMs, this.retryInitialMs * 2 ** Math.min(30, this.failures - 1));
        this.backoffUntil = Math.max(this.backoffUntil, this.now() + delay);
        if (this.failures === 1 || (this.failures & (this.failures - 1)) === 0) {
          this.log('warn', 'hydration fetch failed; retrying after a backoff', { path: this.device.path, chunk: i, failures: this.failures, backoffMs: delay, err: this.lastError });
        }
      }
    }
  }

  /** Exponentially smoothed landing rate, sampled at most once a second. */
  private sampleRate(bytes: number): void {
    const t = this.now();
    if (!this.sample) {
      this.sample = { t, bytes };
      return;
    }
    const dt = t - this.sample.t;
    if (dt < 1000) return;
    const inst = ((bytes - this.sample.bytes) * 1000) / dt;
    this.rate = this.rate === 0 ? inst : 0.7 * this.rate + 0.3 * inst;
    this.sample = { t, bytes };
  }
}
