// HydratedDevice: a persistent local copy of a streamed volume (migration mode), as a layer
// between the overlay and the StreamedDevice. A chunk whose bit is set in the hydration bitmap
// is read from the local volume file; any other chunk is read from the layer below (demand
// priority) and then "lands": the whole chunk is written into the volume file in the
// background (the guest's read does not wait for it), and its bit is set at the next commit.
// The Hydrator (hydrator.ts) fills the remaining chunks through the same landing path.
// Read-only, like the streamed device below it: the overlay above takes the writes.
//
// Files, next to the volume file PATH:
//   PATH                 sparse volume file of the volume's size
//   PATH.bitmap          one bit per chunk ("the chunk's data is in PATH and durable"),
//                        the overlay's bitmap format (src/block/bitmap.ts), replaced atomically
//   PATH.hydrate.json    geometry (size, chunkSize, family) and `complete`, replaced atomically
//
// Invariants (see docs/hydration.md for the argument):
// - a chunk's bit is set (in memory, then on disk) only after its data was written AND an
//   fdatasync of the volume file that started after that write completed: commit() snapshots
//   the chunks whose writes completed, fdatasyncs, then sets their bits and saves the bitmap;
// - bits are never cleared, so a set chunk is immutable and reads of it never leave the file;
// - a chunk whose bit is clear may hold anything in the file (a crash between a write and its
//   commit leaves data there), so it is never trusted, and a chunk fetched as 'zero' is
//   punched (not skipped) before its bit is set;
// - `complete` is written (replaceFileDurably) only after a bitmap with every bit set is
//   durable; a complete volume opens and serves without a source.

import { open as openFile, readFile, stat } from 'node:fs/promises';
import path from 'node:path';

import { BitmapFile, GranuleBitmap } from '../block/bitmap.js';
import {
  BlockError,
  assertRange,
  blockStatusOf,
  type BlockCapabilities,
  type BlockDevice,
  type Extent,
  type IoOptions,
} from '../block/device.js';
import { FileDevice } from '../block/file.js';
import { GroupCommit } from '../block/group-commit.js';
import { OpGate } from '../block/op-gate.js';
import type { Priority } from '../link/protocol.js';
import type { Logger } from '../log/logger.js';
import { fsyncDir, replaceFileDurably } from '../util/durable.js';
import { hydrateMetrics } from './metrics.js';

/** A hydration that cannot go on as asked (geometry changed, state files missing or damaged). */
export class HydrationError extends Error {
  readonly code = 'SPW_ERR_HYDRATION';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'HydrationError';
  }
}

/** Where hydration gets whole chunks (a RemoteVolume fits). */
export interface ChunkSource {
  readonly chunkCount: number;
  chunkLength(i: number): number;
  fetch(i: number, priority: Priority): Promise<Buffer | 'zero'>;
}

/** The contents of PATH.hydrate.json. */
export interface HydrationState {
  readonly format: 'spillway-hydration';
  readonly version: 1;
  readonly size: number;
  readonly chunkSize: number;
  /** the family (base image lineage) the data belongs to; '' when not known. */
  readonly family: string;
  readonly complete: boolean;
  /** ISO time the last chunk became durable; absent while incomplete. */
  readonly completedAt?: string;
}

export interface HydratedDeviceOptions {
  /** the local volume file; created sparse at the volume's size if missing. */
  readonly path: string;
  /** the streamed device below (demand reads of chunks not yet here). Optional only when the
   *  volume is already complete (then nothing ever leaves the local file). */
  readonly inner?: BlockDevice;
  /** whole chunks for the Hydrator; optional like `inner`. */
  readonly source?: ChunkSource;
  /** bytes per chunk (the volume's chunk size, a power of two); must match an existing volume. */
  readonly chunkSize: number;
  /** recorded in the state file and checked on reopen when both sides know it. */
  readonly family?: string;
  readonly log: Logger;
  /** label of the metrics; default the file's base name. */
  readonly name?: string;
  /** commit (fdatasync + bitmap save) once this many chunks wait for it. Default 256. */
  readonly commitChunks?: number;
  /** ... or this long after the first one landed. Default 1000 ms. */
  readonly commitIntervalMs?: number;
  /** bytes of demand-read chunks waiting to be written; past it a demand read does not land
   *  (the Hydrator copies that chunk later). Default 32 chunks. */
  readonly maxLandingBytes?: number;
  /** take an exclusive OFD lock on the volume file. Default true. */
  readonly lock?: boolean;
}

export type LandedVia = 'demand' | 'hydration';

const STATE_FORMAT = 'spillway-hydration';
const MAX_EXTENTS = 2048;

export function bitmapPathOf(volumePath: string): string {
  return `${volumePath}.bitmap`;
}
export function statePathOf(volumePath: string): string {
  return `${volumePath}.hydrate.json`;
}

async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch (err) {
    if ((err as { code?: unknown }).code === 'ENOENT') return false;
    throw err;
  }
}

function isAllZero(buf: Buffer): boolean {
  let i = 0;
  for (; i + 8 <= buf.length; i += 8) if (buf.readBigUInt64LE(i) !== 0n) return false;
  for (; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

const START_OVER = (p: string): string =>
  `delete ${p}, ${bitmapPathOf(p)} and ${statePathOf(p)} to hydrate again from scratch, or set hydrate.path to another file`;

/** Read PATH.hydrate.json: null when there is none, HydrationError when it is damaged. */
export async function readHydrationState(volumePath: string): Promise<HydrationState | null> {
  const file = statePathOf(volumePath);
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if ((err as { code?: unknown }).code === 'ENOENT') return null;
    throw err;
  }
  let v: Partial<HydrationState>;
  try {
    v = JSON.parse(text) as Partial<HydrationState>;
  } catch (err) {
    throw new HydrationError(`hydration state ${file} is not valid JSON (damaged?); ${START_OVER(volumePath)}`, { cause: err });
  }
  const int = (x: unknown): x is number => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
  if (
    typeof v !== 'object' ||
    v === null ||
    v.format !== STATE_FORMAT ||
    v.version !== 1 ||
    !int(v.size) ||
    !int(v.chunkSize) ||
    v.chunkSize === 0 ||
    typeof v.family !== 'string' ||
    typeof v.complete !== 'boolean'
  ) {
    throw new HydrationError(`hydration state ${file} is not a version 1 spillway hydration state; ${START_OVER(volumePath)}`);
  }
  return v as HydrationState;
}

async function writeState(volumePath: string, state: HydrationState): Promise<void> {
  await replaceFileDurably(statePathOf(volumePath), Buffer.from(JSON.stringify(state, null, 2) + '\n'), 0o644);
}

export class HydratedDevice implements BlockDevice {
  readonly size: number;
  readonly chunkSize: number;
  readonly chunkCount: number;
  readonly capabilities: BlockCapabilities;
  readonly description: string;
  readonly name: string;
  /** counters for status, metrics and tests. */
  readonly counters = { demandLanded: 0, hydrationLanded: 0, demandNotLanded: 0, landFailures: 0, commits: 0 };

  private readonly gate = new OpGate(() => this.description);
  /** chunks being written: their data, for reads meanwhile. */
  private readonly writing = new Map<number, Buffer | 'zero'>();
  /** chunks written to the file whose bits wait for the next commit. */
  private readonly written = new Set<number>();
  /** concurrent demand reads of one chunk share the read below. */
  private readonly demanding = new Map<number, Promise<Buffer>>();
  /** background landings of demand reads (close waits for them). */
  private readonly landings = new Set<Promise<void>>();
  private landingBytes = 0;
  private landed: number;
  private landedBytesTotal: number;
  private savedVersion: number;
  /** concurrent commits share one that started after they asked. */
  private readonly committer = new GroupCommit(() => this.commitNow());
  private commitTimer: NodeJS.Timeout | undefined;
  private completeState: boolean;
  private completeWaiters: Array<() => void> = [];
  private closing: Promise<void> | undefined;
  /** landed chunks that trigger a commit; the Hydrator keeps fewer than this uncommitted. */
  readonly commitChunks: number;
  private readonly commitIntervalMs: number;
  private readonly maxLandingBytes: number;
  private readonly metrics = hydrateMetrics();

  private constructor(
    readonly path: string,
    private readonly file: FileDevice,
    private readonly bitmap: GranuleBitmap,
    private readonly store: BitmapFile,
    private generation: number,
    private state: HydrationState,
    private readonly inner: BlockDevice | undefined,
    readonly source: ChunkSource | undefined,
    private readonly log: Logger,
    opts: HydratedDeviceOptions,
  ) {
    this.size = state.size;
    this.chunkSize = state.chunkSize;
    this.chunkCount = bitmap.granules;
    this.name = opts.name ?? path.split('/').pop() ?? path;
    this.savedVersion = bitmap.version;
    this.completeState = state.complete;
    this.commitChunks = opts.commitChunks ?? 256;
    this.commitIntervalMs = opts.commitIntervalMs ?? 1000;
    this.maxLandingBytes = opts.maxLandingBytes ?? 32 * this.chunkSize;
    this.landed = bitmap.count();
    this.landedBytesTotal = this.landed * this.chunkSize - (bitmap.get(this.chunkCount - 1) ? this.chunkSize - this.chunkLength(this.chunkCount - 1) : 0);
    this.description = inner ? `hydrated(file:${path}, ${inner.description})` : `hydrated(file:${path}, complete)`;
    const maximum = Math.min(file.capabilities.blockSize.maximum, inner?.capabilities.blockSize.maximum ?? Infinity);
    this.capabilities = {
      writable: false,
      flush: false,
      fua: false,
      trim: false,
      zero: false,
      fastZero: false,
      extents: true,
      cache: inner?.capabilities.cache ?? false,
      multiConn: true,
      blockSize: { minimum: 1, preferred: 4096, maximum },
    };
  }

  /**
   * Open (or start) the hydrated copy at `opts.path`. A new one needs `inner` and `source`; its
   * state file is written first, then the sparse volume file and an empty bitmap. An existing
   * one must match the volume's geometry, else HydrationError says what to do. The device owns
   * `inner` once open (close() closes it); if open fails, the caller still does.
   */
  static async open(opts: HydratedDeviceOptions): Promise<HydratedDevice> {
    const p = opts.path;
    const cs = opts.chunkSize;
    if (!Number.isSafeInteger(cs) || cs < 512 || (cs & (cs - 1)) !== 0) {
      throw new RangeError(`hydration chunk size must be a power of two of at least 512 bytes, got ${cs}`);
    }
    if ((opts.inner === undefined) !== (opts.source === undefined)) {
      throw new RangeError('HydratedDevice.open needs both inner and source, or neither (complete volumes only)');
    }
    const bitmapPath = bitmapPathOf(p);
    const store = new BitmapFile(bitmapPath);
    let state = await readHydrationState(p);
    const size = opts.inner?.size;

    if (!state) {
      for (const f of [p, bitmapPath]) {
        if (await exists(f)) {
          throw new HydrationError(
            `${f} exists but ${statePathOf(p)} does not, so it is not a hydrated volume spillway made (or its state was deleted); ` +
              `move it away (it is not touched) or set hydrate.path to another file`,
          );
        }
      }
      if (size === undefined) {
        throw new HydrationError(`there is no hydrated volume at ${p}; starting one needs the streamed volume as its source`);
      }
      // The state file comes first: whatever a crash leaves after it is recognised as ours.
      state = { format: STATE_FORMAT, version: 1, size, chunkSize: cs, family: opts.family ?? '', complete: false };
      await writeState(p, state);
    } else {
      const want = { size: size ?? state.size, chunkSize: cs, family: opts.family ?? state.family };
      if (state.size !== want.size || state.chunkSize !== want.chunkSize || (state.family !== '' && want.family !== '' && state.family !== want.family)) {
        throw new HydrationError(
          `hydrated volume ${p} was made for a ${state.size}-byte volume with ${state.chunkSize}-byte chunks` +
            `${state.family ? ` of family ${state.family}` : ''}, but this volume is ${want.size} bytes with ${want.chunkSize}-byte chunks` +
            `${want.family ? ` of family ${want.family}` : ''} (the volume changed at the origin, or the path belongs to another volume); ${START_OVER(p)}`,
        );
      }
      if (!state.complete && !opts.inner) {
        throw new HydrationError(`hydrated volume ${p} is not complete, so it cannot be served without its origin; connect the origin and let hydration finish`);
      }
    }

    if (opts.source && opts.source.chunkCount !== Math.ceil(state.size / cs)) {
      throw new RangeError(`the chunk source has ${opts.source.chunkCount} chunks, the volume ${Math.ceil(state.size / cs)}`);
    }

    let fresh = false;
    if (!(await exists(p))) {
      if (state.complete || (await exists(bitmapPath))) {
        throw new HydrationError(`volume file ${p} is missing but its ${state.complete ? 'state says it is complete' : 'bitmap exists'}; restore it, or ${START_OVER(p)}`);
      }
      // A crash after the state file and before the volume file: create it now.
      const fh = await openFile(p, 'wx', 0o644);
      try {
        await fh.truncate(state.size);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await fsyncDir(path.dirname(p));
      fresh = true;
    }

    let bitmap: GranuleBitmap;
    let generation = 0;
    const encoded = await store.load();
    if (encoded) {
      try {
        ({ bitmap, generation } = GranuleBitmap.decode(encoded, { size: state.size, granularity: state.chunkSize }, bitmapPath));
      } catch (err) {
        throw new HydrationError(
          `hydration bitmap ${bitmapPath} is unusable (${(err as Error).message}); without it no chunk of ${p} can be trusted: ${START_OVER(p)}`,
          { cause: err },
        );
      }
    } else {
      if (state.complete) {
        throw new HydrationError(`hydration bitmap ${bitmapPath} is missing although ${p} is complete; restore it, or ${START_OVER(p)}`);
      }
      // Never saved (a crash right after creation) or removed: an empty bitmap trusts nothing,
      // which is always safe: every chunk is copied again.
      if (!fresh) opts.log('warn', 'hydration bitmap missing; copying every chunk again', { path: p, bitmap: bitmapPath });
      bitmap = new GranuleBitmap(state.size, state.chunkSize);
      await store.save(bitmap.encode(generation));
    }
    if (state.complete && bitmap.count() !== bitmap.granules) {
      throw new HydrationError(`${statePathOf(p)} says ${p} is complete but its bitmap has ${bitmap.count()} of ${bitmap.granules} chunks; ${START_OVER(p)}`);
    }

    const file = await FileDevice.open(p, { lock: opts.lock ?? true });
    try {
      if (file.size !== state.size) {
        throw new HydrationError(`volume file ${p} is ${file.size} bytes but its state says ${state.size}; was it resized? ${START_OVER(p)}`);
      }
      const dev = new HydratedDevice(p, file, bitmap, store, generation, state, opts.inner, opts.source, opts.log, opts);
      // A crash between the last bitmap save and the state file: finish the job.
      if (!state.complete && dev.landed === dev.chunkCount) await dev.markComplete();
      return dev;
    } catch (err) {
      await file.close();
      throw err;
    }
  }

  /** Every chunk is durable in the local file and the state file says so. */
  get complete(): boolean {
    return this.completeState;
  }

  /** Resolves once complete (at once if it is). */
  whenComplete(): Promise<void> {
    if (this.completeState) return Promise.resolve();
    return new Promise((resolve) => this.completeWaiters.push(resolve));
  }

  /** The chunk is in the file (durable, or waiting for the next commit) or being written. */
  has(i: number): boolean {
    return this.bitmap.get(i) || this.written.has(i) || this.writing.has(i);
  }

  /** Chunks written whose bits wait for the next commit (work a crash would lose). */
  get uncommitted(): number {
    return this.written.size;
  }

  /** The chunk's bit is set: its data is durable in the file. */
  isDurable(i: number): boolean {
    return this.bitmap.get(i);
  }

  chunkLength(i: number): number {
    return Math.min(this.chunkSize, this.size - i * this.chunkSize);
  }

  /** Progress: chunks and bytes written to the file (durable within one commit), and durable. */
  progress(): { landedChunks: number; landedBytes: number; durableChunks: number } {
    return { landedChunks: this.landed, landedBytes: this.landedBytesTotal, durableChunks: this.bitmap.count() };
  }

  read(offset: number, buf: Buffer, opts?: IoOptions): Promise<void> {
    return this.gate.run(opts, async () => {
      assertRange(this, offset, buf.length);
      if (buf.length === 0) return;
      if (this.completeState) return this.file.read(offset, buf, opts);
      const cs = this.chunkSize;
      const end = offset + buf.length;
      const jobs: Array<Promise<void>> = [];
      let runStart = -1; // start of a run of chunks read from the file
      const flushRun = (to: number): void => {
        if (runStart < 0) return;
        const from = runStart;
        jobs.push(this.file.read(from, buf.subarray(from - offset, to - offset), opts));
        runStart = -1;
      };
      for (let c = Math.floor(offset / cs), pos = offset; pos < end; c++) {
        const cStart = c * cs;
        const stop = Math.min(end, cStart + cs);
        const part = buf.subarray(pos - offset, stop - offset);
        const within = pos - cStart;
        if (this.bitmap.get(c) || this.written.has(c)) {
          if (runStart < 0) runStart = pos;
        } else {
          flushRun(pos);
          const pending = this.writing.get(c);
          if (pending === 'zero') part.fill(0);
          else if (pending) pending.copy(part, 0, within, within + part.length);
          else jobs.push(this.demand(c).then((data) => void data.copy(part, 0, within, within + part.length)));
        }
        pos = stop;
      }
      flushRun(end);
      const results = await Promise.allSettled(jobs);
      for (const r of results) if (r.status === 'rejected') throw r.reason;
    });
  }

  write(): Promise<void> {
    return Promise.reject(new BlockError('EPERM', 'the hydrated layer is read-only; writes belong to the overlay above it'));
  }
  trim(): Promise<void> {
    return this.write();
  }
  writeZeroes(): Promise<void> {
    return this.write();
  }

  /** Nothing to make durable for the caller (read-only); landed chunks are committed too. */
  flush(opts?: IoOptions): Promise<void> {
    return this.gate.run(opts, () => this.commit());
  }

  /** Set chunks report the local file's allocation (zero chunks are holes); others the layer
   *  below's. */
  blockStatus(offset: number, length: number, opts?: IoOptions): Promise<Extent[]> {
    return this.gate.run(opts, async () => {
      assertRange(this, offset, length);
      if (length === 0) throw new BlockError('EINVAL', 'block status of zero bytes');
      if (this.completeState || !this.inner) return this.file.blockStatus(offset, length, opts);
      const cs = this.chunkSize;
      const end = offset + length;
      const out: Extent[] = [];
      let pos = offset;
      while (pos < end && out.length < MAX_EXTENTS) {
        const c = Math.floor(pos / cs);
        const local = this.bitmap.get(c);
        let next = c + 1;
        while (next * cs < end && this.bitmap.get(next) === local) next++;
        const stop = Math.min(end, next * cs);
        const got = local ? await this.file.blockStatus(pos, stop - pos, opts) : await blockStatusOf(this.inner, pos, stop - pos, opts);
        for (const e of got) {
          if (e.offset !== pos || e.length <= 0) break;
          const len = Math.min(e.length, stop - pos);
          const last = out[out.length - 1];
          if (last && last.hole === e.hole && last.zero === e.zero) out[out.length - 1] = { ...last, length: last.length + len };
          else out.push({ offset: pos, length: len, hole: e.hole, zero: e.zero });
          pos += len;
          if (pos >= stop) break;
        }
        if (pos < stop) break; // the layer below stopped early
      }
      if (out.length === 0) throw new BlockError('EIO', `no block status for ${offset}+${length}`);
      return out;
    });
  }

  /** Prefetch hint: passed down for the chunks not here yet. */
  cache(offset: number, length: number, opts?: IoOptions): Promise<void> {
    return this.gate.run(opts, async () => {
      if (this.completeState || !this.inner?.cache || length === 0) return;
      const first = Math.floor(offset / this.chunkSize);
      const last = Math.floor((offset + length - 1) / this.chunkSize);
      for (let c = first; c <= last; c++) if (!this.has(c)) return this.inner.cache(offset, length, opts);
    });
  }

  /**
   * The one write path of hydration (demand landings and the Hydrator): write the whole chunk
   * `i` into the volume file (a 'zero' chunk is punched: the region may hold data of an earlier
   * landing whose commit a crash prevented). Resolves once written, with false if the chunk was
   * already there or on its way; its bit is set by a later commit().
   */
  async land(i: number, data: Buffer | 'zero', via: LandedVia): Promise<boolean> {
    if (this.has(i)) return false;
    if (this.closing) throw new BlockError('ESHUTDOWN', `${this.description} is closed`);
    const len = this.chunkLength(i);
    if (data !== 'zero' && data.length !== len) throw new BlockError('EIO', `chunk ${i} is ${data.length} bytes, expected ${len}`);
    this.writing.set(i, data);
    try {
      if (data === 'zero') await this.file.writeZeroes(i * this.chunkSize, len, { mayTrim: true });
      else await this.file.write(i * this.chunkSize, data);
      this.written.add(i);
    } catch (err) {
      this.counters.landFailures++;
      throw err;
    } finally {
      this.writing.delete(i);
    }
    this.landed++;
    this.landedBytesTotal += len;
    if (via === 'demand') this.counters.demandLanded++;
    else this.counters.hydrationLanded++;
    this.metrics.chunks.inc({ volume: this.name, via });
    this.metrics.bytes.inc({ volume: this.name, via }, len);
    this.scheduleCommit();
    return true;
  }

  /**
   * Make every chunk landed so far durable: one fdatasync of the volume file, then their bits,
   * then the bitmap (atomic replace). When every bit is set, the state file says complete.
   * Concurrent callers share the next commit that starts after their call.
   */
  commit(): Promise<void> {
    return this.committer.flush();
  }

  /** Wait for background landings of demand reads (they land or fail). */
  async settle(): Promise<void> {
    while (this.landings.size > 0) await Promise.allSettled([...this.landings]);
  }

  /** Waits for reads and landings in flight, commits, closes the file and the layer below. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.gate.close();
      try {
        await this.settle();
        await this.commit();
      } finally {
        clearTimeout(this.commitTimer);
        this.commitTimer = undefined;
        await this.file.close();
        await this.inner?.close();
      }
    })();
    return this.closing;
  }

  // ---- internals ----------------------------------------------------------------------------

  /** Read chunk `c` from below (demand priority) and land it in the background. */
  private demand(c: number): Promise<Buffer> {
    let p = this.demanding.get(c);
    if (p) return p;
    p = (async () => {
      const inner = this.inner;
      if (!inner) throw new BlockError('EIO', `chunk ${c} of ${this.path} is not hydrated and there is no source`);
      const data = Buffer.allocUnsafe(this.chunkLength(c));
      // no signal: other readers may share this read
      await inner.read(c * this.chunkSize, data);
      this.landInBackground(c, data);
      return data;
    })().finally(() => this.demanding.delete(c));
    this.demanding.set(c, p);
    return p;
  }

  private landInBackground(c: number, data: Buffer): void {
    if (this.has(c) || this.closing) return;
    if (this.landingBytes + data.length > this.maxLandingBytes) {
      this.counters.demandNotLanded++; // bounded: the Hydrator copies it later
      return;
    }
    this.landingBytes += data.length;
    const job = this.land(c, isAllZero(data) ? 'zero' : data, 'demand')
      .then(
        () => undefined,
        (err: unknown) => this.log('warn', 'a demand-read chunk did not land in the hydrated volume (the hydrator copies it later)', { path: this.path, chunk: c, err: (err as Error).message }),
      )
      .finally(() => {
        this.landingBytes -= data.length;
        this.landings.delete(job);
      });
    this.landings.add(job);
  }

  private scheduleCommit(): void {
    if (this.written.size >= this.commitChunks) {
      this.commit().catch((err: unknown) => this.log('error', 'hydration commit failed', { path: this.path, err: (err as Error).message }));
      return;
    }
    if (this.commitTimer) return;
    this.commitTimer = setTimeout(() => {
      this.commitTimer = undefined;
      if (this.written.size === 0) return;
      this.commit().catch((err: unknown) => this.log('error', 'hydration commit failed', { path: this.path, err: (err as Error).message }));
    }, this.commitIntervalMs);
    this.commitTimer.unref();
  }

  private async commitNow(): Promise<void> {
    // Only chunks whose writes have completed: the fdatasync below started after them.
    const batch = [...this.written];
    if (batch.length > 0) await this.file.flush();
    for (const i of batch) {
      this.bitmap.setRange(i, i);
      this.written.delete(i);
    }
    if (this.bitmap.version !== this.savedVersion) {
      const snap = this.bitmap.snapshot();
      await this.store.save(this.bitmap.encode(this.generation + 1, snap.bits));
      this.generation++;
      this.savedVersion = snap.version;
      this.counters.commits++;
    }
    if (!this.completeState && this.bitmap.count() === this.chunkCount) await this.markComplete();
  }

  private async markComplete(): Promise<void> {
    await this.file.flush(); // belt and braces: every bit is already durable after its data
    this.state = { ...this.state, complete: true, completedAt: new Date().toISOString() };
    await writeState(this.path, this.state);
    this.completeState = true;
    this.log('info', 'hydration complete: every chunk is in the local volume', { path: this.path, chunks: this.chunkCount, bytes: this.size });
    for (const w of this.completeWaiters.splice(0)) w();
  }
}
