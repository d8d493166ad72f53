// OverlayDevice: copy-on-write over a base BlockDevice (like nbdkit's cow filter, but
// persistent). Writes land in a sparse overlay data device of the base's size; a bitmap with
// one bit per granule (default 64 KiB) says which granules the overlay owns. The base is never
// written.
//
// Invariants:
// - an unowned granule's overlay bytes are never trusted (a crash may leave data there whose bit
//   was never saved), so a granule's first write always fills the whole granule: partial writes
//   copy the rest from the base (read-modify-write), trim/zero copy the untouched rest too;
// - a granule becomes owned only under its lock, after its data was written; RMW of a granule
//   is serialized by that lock, so concurrent writes to one granule cannot lose data;
// - durability order: flush snapshots the bits, fdatasyncs the overlay data, then saves that
//   snapshot (temp + fsync + rename). A bit is never durable before its data.

import { open as openFile, stat } from 'node:fs/promises';
import {
  BlockError,
  assertRange,
  blockStatusOf,
  type BlockCapabilities,
  type BlockDevice,
  type Extent,
  type IoOptions,
  type ZeroOptions,
} from './device.js';
import { OpGate } from './op-gate.js';
import { BitmapError, BitmapFile, GranuleBitmap, type BitmapStore } from './bitmap.js';
import { FileDevice } from './file.js';

export const DEFAULT_GRANULARITY = 64 * 1024;
/** blockStatus answers stop after this many extents (the interface allows stopping early). */
const MAX_EXTENTS = 2048;

export interface OverlayFileOptions {
  /** sparse overlay data file; created (with its bitmap) if it does not exist. */
  readonly path: string;
  /** bitmap file; default `${path}.bitmap`. */
  readonly bitmapPath?: string;
  /** bytes per bitmap bit, a power of two from 512 to 64 MiB; default 64 KiB for a new
   *  overlay. For an existing one it must match its bitmap; left out, the bitmap's is used. */
  readonly granularity?: number;
  /** take an exclusive OFD lock on the overlay data file. Default true. */
  readonly lock?: boolean;
}

/** Per-granule FIFO locks, always taken in ascending granule order (no deadlock). */
class GranuleLocks {
  private readonly tails = new Map<number, Promise<void>>();

  async acquire(granules: readonly number[]): Promise<() => void> {
    const releases: Array<() => void> = [];
    for (const g of granules) {
      const prev = this.tails.get(g);
      let release!: () => void;
      const mine = new Promise<void>((resolve) => (release = resolve));
      this.tails.set(g, mine);
      releases.push(() => {
        if (this.tails.get(g) === mine) this.tails.delete(g);
        release();
      });
      if (prev) await prev;
    }
    return () => {
      for (const r of releases) r();
    };
  }
}

function validGranularity(g: number): boolean {
  return Number.isSafeInteger(g) && g >= 512 && g <= 64 * 1024 * 1024 && (g & (g - 1)) === 0;
}

function isAllZero(buf: Buffer): boolean {
  // compare 8 bytes at a time where aligned; partial granules are small
  let i = 0;
  for (; i + 8 <= buf.length; i += 8) if (buf.readBigUInt64LE(i) !== 0n) return false;
  for (; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

/** Like Promise.all, but only settles once every job has: no I/O may still be landing in a
 *  caller's buffer or in a granule whose lock was released when the caller sees an error. */
async function settleAll(jobs: Array<Promise<void>>): Promise<void> {
  const results = await Promise.allSettled(jobs);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}

export class OverlayDevice implements BlockDevice {
  readonly size: number;
  readonly capabilities: BlockCapabilities;
  readonly description: string;
  readonly granularity: number;
  private readonly locks = new GranuleLocks();
  private savedVersion: number;
  private saving: Promise<void> = Promise.resolve();
  private readonly gate = new OpGate(() => this.description);
  private closing: Promise<void> | undefined;

  /**
   * Most callers want OverlayDevice.open(). `data` is a device of the base's size whose
   * trimmed/zeroed ranges read as zeroes; `bitmap` its ownership map as last saved to `store`
   * under `generation`.
   */
  constructor(
    private readonly base: BlockDevice,
    private readonly data: BlockDevice,
    private readonly bitmap: GranuleBitmap,
    private readonly store: BitmapStore,
    private generation = 0,
  ) {
    if (data.size !== base.size || bitmap.size !== base.size) {
      throw new BitmapError(`overlay data (${data.size} bytes) and bitmap (${bitmap.size}) must match the base (${base.size})`);
    }
    if (!data.capabilities.writable) throw new BlockError('EPERM', `overlay data ${data.description} is read-only`);
    this.size = base.size;
    this.granularity = bitmap.granularity;
    this.savedVersion = bitmap.version;
    this.description = `overlay(${base.description})`;
    const maximum = Math.min(base.capabilities.blockSize.maximum, data.capabilities.blockSize.maximum);
    this.capabilities = {
      writable: true,
      flush: true,
      fua: true,
      trim: true,
      zero: true,
      fastZero: data.capabilities.fastZero,
      extents: true,
      cache: base.capabilities.cache,
      multiConn: true,
      blockSize: { minimum: 1, preferred: Math.min(this.granularity, maximum), maximum },
    };
  }

  /**
   * Open (or create) a file-backed overlay over `base`. A new overlay gets a sparse data file
   * of the base's size and an empty bitmap; an existing one must come with a bitmap whose
   * header matches (size, granularity, checksum), else BitmapError says what to do.
   * The overlay owns `base` once open (close() closes it); if open fails, the caller still does.
   */
  static async open(base: BlockDevice, opts: OverlayFileOptions): Promise<OverlayDevice> {
    const granularity = opts.granularity ?? DEFAULT_GRANULARITY;
    if (!validGranularity(granularity)) {
      throw new RangeError(`overlay granularity must be a power of two from 512 to 64 MiB, got ${granularity}`);
    }
    const bitmapPath = opts.bitmapPath ?? `${opts.path}.bitmap`;
    const store = new BitmapFile(bitmapPath);
    const existing = await stat(opts.path).then(
      () => true,
      (err: { code?: unknown }) => {
        if (err.code === 'ENOENT') return false;
        throw err;
      },
    );
    let bitmap: GranuleBitmap;
    let generation = 0;
    let fresh = false;
    if (existing) {
      const encoded = await store.load();
      if (!encoded) {
        throw new BitmapError(
          `overlay ${opts.path} exists but its bitmap ${bitmapPath} does not; without it the overlay cannot be ` +
            `trusted. Restore the bitmap, or delete ${opts.path} to start a new, empty overlay.`,
        );
      }
      ({ bitmap, generation } = GranuleBitmap.decode(encoded, { size: base.size, granularity: opts.granularity }, bitmapPath));
    } else {
      if (await store.load()) {
        throw new BitmapError(
          `bitmap ${bitmapPath} exists but its overlay data ${opts.path} does not; delete the bitmap to start a new overlay`,
        );
      }
      const fh = await openFile(opts.path, 'wx', 0o644);
      try {
        await fh.truncate(base.size);
        await fh.sync();
      } finally {
        await fh.close();
      }
      bitmap = new GranuleBitmap(base.size, granularity);
      fresh = true;
    }
    const data = await FileDevice.open(opts.path, { lock: opts.lock ?? true });
    try {
      if (data.size !== base.size) {
        throw new BitmapError(`overlay ${opts.path} is ${data.size} bytes but the base is ${base.size}; it belongs to another image`);
      }
      if (fresh) await store.save(bitmap.encode(generation));
      return new OverlayDevice(base, data, bitmap, store, generation);
    } catch (err) {
      await data.close();
      throw err;
    }
  }

  /** Number of granules the overlay owns (diagnostics, tests). */
  get ownedGranules(): number {
    return this.bitmap.count();
  }

  /** The byte ranges the overlay owns (maximal runs of owned granules), in order: what a
   *  flatten into the base must copy. */
  ownedRanges(): Array<{ offset: number; length: number }> {
    const out: Array<{ offset: number; length: number }> = [];
    if (this.size > 0) this.forEachRun(0, this.size, (start, end, owned) => owned && out.push({ offset: start, length: end - start }));
    return out;
  }

  read(offset: number, buf: Buffer, opts?: IoOptions): Promise<void> {
    return this.run(opts, async () => {
      assertRange(this, offset, buf.length);
      const jobs: Array<Promise<void>> = [];
      this.forEachRun(offset, offset + buf.length, (start, end, owned) => {
        const part = buf.subarray(start - offset, end - offset);
        jobs.push((owned ? this.data : this.base).read(start, part, opts));
      });
      await settleAll(jobs);
    });
  }

  write(offset: number, data: Buffer, opts?: IoOptions): Promise<void> {
    return this.run(opts, async () => {
      assertRange(this, offset, data.length);
      if (data.length > 0) {
        await this.ownRange(offset, offset + data.length, (o) => this.data.write(offset, data, o), opts);
      }
      if (opts?.fua) await this.flushNow(opts);
    });
  }

  trim(offset: number, length: number, opts?: IoOptions): Promise<void> {
    return this.writeZeroes(offset, length, { ...opts, mayTrim: true, fastOnly: false });
  }

  writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.run(opts, async () => {
      assertRange(this, offset, length);
      if (length > 0) {
        const zopts: ZeroOptions = { mayTrim: opts?.mayTrim ?? false, fastOnly: opts?.fastOnly ?? false, signal: opts?.signal };
        await this.ownRange(offset, offset + length, () => this.data.writeZeroes(offset, length, zopts), opts);
      }
      if (opts?.fua) await this.flushNow(opts);
    });
  }

  flush(opts?: IoOptions): Promise<void> {
    return this.run(opts, () => this.flushNow(opts));
  }

  blockStatus(offset: number, length: number, opts?: IoOptions): Promise<Extent[]> {
    return this.run(opts, async () => {
      assertRange(this, offset, length);
      const runs: Array<{ start: number; end: number; owned: boolean }> = [];
      this.forEachRun(offset, offset + length, (start, end, owned) => runs.push({ start, end, owned }));
      const out: Extent[] = [];
      for (const r of runs) {
        const got = r.owned
          ? await blockStatusOf(this.data, r.start, r.end - r.start, opts)
          : await blockStatusOf(this.base, r.start, r.end - r.start, opts);
        let pos = r.start;
        for (const e of got) {
          if (e.offset !== pos || e.length <= 0) break;
          const len = Math.min(e.length, r.end - pos);
          const last = out[out.length - 1];
          if (last && last.hole === e.hole && last.zero === e.zero) {
            out[out.length - 1] = { ...last, length: last.length + len };
          } else {
            out.push({ offset: pos, length: len, hole: e.hole, zero: e.zero });
          }
          pos += len;
          if (pos >= r.end) break;
        }
        if (pos < r.end || out.length >= MAX_EXTENTS) break; // the layer below stopped early
      }
      if (out.length === 0) throw new BlockError('EIO', `no block status for ${offset}+${length}`);
      return out;
    });
  }

  cache(offset: number, length: number, opts?: IoOptions): Promise<void> {
    return this.run(opts, async () => {
      if (this.base.cache) await this.base.cache(offset, length, opts);
    });
  }

  /** Waits for in-flight requests, flushes data and bitmap, closes overlay data and base. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.gate.close();
      try {
        await this.flushNow(undefined);
      } finally {
        await this.data.close();
        await this.base.close();
      }
    })();
    return this.closing;
  }

  // ---- internals ----------------------------------------------------------------------------

  private run<T>(opts: IoOptions | undefined, fn: () => Promise<T>): Promise<T> {
    return this.gate.run(opts, fn);
  }

  private granuleStart(g: number): number {
    return g * this.granularity;
  }

  private granuleEnd(g: number): number {
    return Math.min((g + 1) * this.granularity, this.size);
  }

  /** Calls fn for each maximal run of owned / unowned granules clipped to [start, end). */
  private forEachRun(start: number, end: number, fn: (start: number, end: number, owned: boolean) => void): void {
    const last = Math.floor((end - 1) / this.granularity);
    let g = Math.floor(start / this.granularity);
    let pos = start;
    while (pos < end) {
      const next = this.bitmap.runEnd(g, last + 1);
      const stop = Math.min(this.granuleStart(next), end);
      fn(pos, stop, this.bitmap.get(g));
      pos = stop;
      g = next;
    }
  }

  /**
   * Make the overlay own every granule of [start, end) after `change` wrote that range into the
   * overlay data: unowned granules are locked, the parts of partially covered unowned granules
   * outside the range are copied from the base, and only then are the bits set.
   */
  private async ownRange(start: number, end: number, change: (o: IoOptions) => Promise<void>, opts?: IoOptions): Promise<void> {
    const g0 = Math.floor(start / this.granularity);
    const g1 = Math.floor((end - 1) / this.granularity);
    const unowned: number[] = [];
    for (let g = g0; g <= g1; g++) if (!this.bitmap.get(g)) unowned.push(g);
    const release = unowned.length > 0 ? await this.locks.acquire(unowned) : undefined;
    try {
      const io: IoOptions = { signal: opts?.signal };
      const jobs: Array<Promise<void>> = [change(io)];
      const headStart = this.granuleStart(g0);
      if (start > headStart && !this.bitmap.get(g0)) jobs.push(this.copyFromBase(headStart, start, io));
      const tailEnd = this.granuleEnd(g1);
      if (end < tailEnd && !this.bitmap.get(g1)) jobs.push(this.copyFromBase(end, tailEnd, io));
      await settleAll(jobs);
      this.bitmap.setRange(g0, g1);
    } finally {
      release?.();
    }
  }

  /** Copy [start, end) (inside one granule) from the base into the overlay data. */
  private async copyFromBase(start: number, end: number, opts: IoOptions): Promise<void> {
    const buf = Buffer.allocUnsafe(end - start);
    await this.base.read(start, buf, opts);
    if (isAllZero(buf)) await this.data.writeZeroes(start, buf.length, { ...opts, mayTrim: true });
    else await this.data.write(start, buf, opts);
  }

  /** Snapshot bits, make data durable, then make that snapshot durable (in order). */
  private async flushNow(opts: IoOptions | undefined): Promise<void> {
    const snap = this.bitmap.version !== this.savedVersion ? this.bitmap.snapshot() : undefined;
    await this.data.flush(opts);
    if (!snap) return; // every bit set so far is already durable
    const next = this.saving
      .catch(() => undefined)
      .then(async () => {
        if (snap.version <= this.savedVersion) return; // a newer snapshot is already durable
        await this.store.save(this.bitmap.encode(this.generation + 1, snap.bits));
        this.generation++;
        this.savedVersion = snap.version;
      });
    this.saving = next;
    await next;
  }
}
