// WriteBackDevice: the write policy layer of a volume served at the remote site. It sits on the
// copy-on-write overlay (which sits on the streamed read path) and routes every write by the
// policy of its byte range:
//
// - remote-only: straight to the overlay; never shipped.
// - origin: into the current epoch, an in-memory ExtentMap (overlapping writes coalesced, last
//   one wins), and appended to the encrypted journal. The reply does not wait for the disk.
//   FLUSH (or FUA) seals the epoch: the journal makes it durable (fdatasync) before the reply.
//   Only then are its extents written to the overlay. So the overlay never holds a write that
//   is not in a sealed epoch, and after a crash the volume reads exactly as at the last sealed
//   epoch, which is also what the origin will reach: the remote view and the origin never
//   diverge. Recovery replays sealed epochs the overlay may not hold yet (after its checkpoint).
// - write-through: as origin, but every write is sealed and shipped at once and the reply waits
//   for the origin's durable acknowledgement.
//
// Reads (I1) look at the current epoch, then at sealed epochs not yet in the overlay (newest
// first), then at the overlay (and through it, the cache and the link).
//
// Trim and write-zeroes follow the same policy; both make the range read as zeroes.

import { BlockError, blockStatusOf, type BlockCapabilities, type BlockDevice, type Extent, type IoOptions, type ZeroOptions } from '../block/device.js';
import { ExtentMap } from './extent-map.js';
import type { Journal } from './journal.js';
import { PolicyMap, type WritePolicy } from './policy.js';
import { writebackMetrics } from './metrics.js';

/** What the device needs from the shipper. */
export interface ShipperLink {
  /** an epoch was sealed (the shipper decides when to ship). */
  sealed(seq: number): void;
  /** resolves once the origin acknowledged every epoch up to `seq` (ships at once). */
  waitAcked(seq: number, signal?: AbortSignal): Promise<void>;
}

export interface WriteBackOptions {
  /** the overlay: remote-only writes and sealed epochs land here; reads fall through to it. */
  overlay: BlockDevice;
  policy: PolicyMap;
  /** required when any range ships to the origin. */
  journal: Journal | null;
  shipper: ShipperLink | null;
  /** an epoch is sealed without a guest flush once it holds this many bytes (memory bound). */
  epochMax: number;
  /** checkpoint the overlay (fdatasync it, then let the journal forget what it holds) this often
   *  (ms; default 30 s), or sooner once `checkpointEveryBytes` were applied since the last one
   *  (default 256 MiB). Each checkpoint is a random-write fdatasync on the overlay, so not per
   *  flush; between checkpoints a restart replays the journal into the overlay. */
  checkpointEveryMs?: number;
  checkpointEveryBytes?: number;
  volume: string;
}

interface SealedMap {
  seq: number;
  map: ExtentMap;
}

export class WriteBackDevice implements BlockDevice {
  readonly size: number;
  readonly capabilities: BlockCapabilities;
  readonly description: string;
  private current = new ExtentMap();
  /** sealed (or being sealed) epochs whose extents are not in the overlay yet, oldest first. */
  private readonly unapplied: SealedMap[] = [];
  private applyChain: Promise<void> = Promise.resolve();
  private lastSeal: Promise<number> = Promise.resolve(0);
  private lastCheckpoint = 0;
  private checkpointing: Promise<void> | null = null;
  private unappliedBytes = 0;
  private closed = false;
  private failure: Error | null = null;
  /** a remote-only write completed since the overlay's last flush (a FLUSH must sync it). */
  private overlayDirty = false;
  private readonly metrics = writebackMetrics();
  private readonly checkpointEveryMs: number;
  private readonly checkpointEveryBytes: number;
  private appliedSinceCheckpoint = 0;

  private constructor(private readonly opts: WriteBackOptions) {
    const o = opts.overlay;
    this.size = o.size;
    this.checkpointEveryMs = opts.checkpointEveryMs ?? 30_000;
    this.checkpointEveryBytes = opts.checkpointEveryBytes ?? 256 * 1024 * 1024;
    this.lastCheckpoint = Date.now();
    this.description = `writeback(${describe(opts.policy)}) → ${o.description}`;
    this.capabilities = {
      ...o.capabilities,
      writable: true,
      flush: true,
      fua: true,
      trim: true,
      zero: true,
      fastZero: false,
      extents: o.capabilities.extents,
    };
    if (opts.policy.shipsAnything && !opts.journal) throw new Error('a volume that ships writes to the origin needs a journal');
  }

  /**
   * Build the layer. With a journal, sealed epochs the overlay may not hold yet (after the
   * journal's checkpoint) are written to it again before the device is returned: writes are
   * idempotent (set bytes, zero ranges), so replaying what is already there is harmless.
   */
  static async open(opts: WriteBackOptions): Promise<WriteBackDevice> {
    const dev = new WriteBackDevice(opts);
    const j = opts.journal;
    if (j && j.lastSealed > j.checkpointSeq) {
      for await (const { op } of j.readEpochs(j.checkpointSeq + 1, j.lastSealed)) {
        if (op.kind === 'write') await opts.overlay.write(op.offset, op.data);
        else await zeroRange(opts.overlay, op.offset, op.length);
      }
      await opts.overlay.flush();
      await j.setCheckpoint(j.lastSealed);
    }
    return dev;
  }

  // ------------------------------------------------------------------------------ reads

  async read(offset: number, buf: Buffer, opts?: IoOptions): Promise<void> {
    this.assertUsable();
    let holes: Array<{ offset: number; length: number }> = [{ offset, length: buf.length }];
    const maps = [this.current, ...this.unapplied.map((u) => u.map).reverse()];
    for (const m of maps) {
      if (m.size === 0) continue;
      const next: typeof holes = [];
      for (const h of holes) {
        for (const p of m.query(h.offset, h.length)) {
          const dst = buf.subarray(p.offset - offset, p.offset - offset + p.length);
          if (p.kind === 'data') p.data.copy(dst);
          else if (p.kind === 'zero') dst.fill(0);
          else next.push({ offset: p.offset, length: p.length });
        }
      }
      holes = next;
      if (holes.length === 0) return;
    }
    if (holes.length === 1 && holes[0]!.offset === offset && holes[0]!.length === buf.length) return this.opts.overlay.read(offset, buf, opts);
    await Promise.all(holes.map((h) => this.opts.overlay.read(h.offset, buf.subarray(h.offset - offset, h.offset - offset + h.length), opts)));
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const below = await blockStatusOf(this.opts.overlay, offset, length);
    const maps = [this.current, ...this.unapplied.map((u) => u.map)];
    if (maps.every((m) => !m.overlaps(offset, length))) return below;
    // Anything written in an epoch not yet in the overlay is reported as data.
    return below.flatMap((e) => {
      if (!maps.some((m) => m.overlaps(e.offset, e.length))) return [e];
      return [{ offset: e.offset, length: e.length, hole: false, zero: false }];
    });
  }

  cache(offset: number, length: number): Promise<void> {
    return this.opts.overlay.cache?.(offset, length) ?? Promise.resolve();
  }

  // ----------------------------------------------------------------------------- writes

  async write(offset: number, buf: Buffer, opts?: IoOptions): Promise<void> {
    this.assertUsable();
    let shipped: WritePolicy | null = null;
    const local: Promise<void>[] = [];
    for (const p of this.opts.policy.split(offset, buf.length)) {
      const part = buf.subarray(p.offset - offset, p.offset - offset + p.length);
      this.metrics.guestBytes.inc({ volume: this.opts.volume, policy: p.policy }, p.length);
      if (p.policy === 'remote-only') {
        local.push(this.opts.overlay.write(p.offset, part, opts).then(() => void (this.overlayDirty = true)));
        continue;
      }
      const data = Buffer.from(part); // the map keeps it; the caller may reuse `buf`
      this.current.write(p.offset, data);
      this.opts.journal!.append({ kind: 'write', offset: p.offset, data });
      shipped = strictest(shipped, p.policy);
    }
    await Promise.all(local);
    await this.afterShippedOp(shipped, opts?.fua === true);
  }

  async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    this.assertUsable();
    if (opts?.fastOnly) throw new BlockError('ENOTSUP', 'fast zero is not offered by the write-back layer');
    await this.zeroOrTrim(offset, length, opts?.fua === true, false);
  }

  async trim(offset: number, length: number, opts?: IoOptions): Promise<void> {
    this.assertUsable();
    await this.zeroOrTrim(offset, length, opts?.fua === true, true);
  }

  /**
   * Make every acknowledged write durable: shipped ones by sealing the epoch (one journal
   * fdatasync), remote-only ones by flushing the overlay, only when some completed since its
   * last flush. The overlay's copy of sealed epochs needs no flush here: the journal replays it.
   * (Write-through writes already waited for the origin.)
   */
  async flush(): Promise<void> {
    this.assertUsable();
    const overlay = this.overlayDirty;
    this.overlayDirty = false;
    try {
      await Promise.all([this.seal(), overlay ? this.opts.overlay.flush() : undefined]);
    } catch (err) {
      if (overlay) this.overlayDirty = true;
      throw err;
    }
  }

  /**
   * Seal the current epoch (even without a guest flush: drain and the epoch size limit use
   * this). Resolves with the newest sealed seq once it is durable in the journal.
   */
  seal(): Promise<number> {
    const j = this.opts.journal;
    if (!j) return Promise.resolve(0);
    if (this.current.size === 0) return this.lastSeal;
    const entry: SealedMap = { seq: 0, map: this.current };
    this.current = new ExtentMap();
    this.unapplied.push(entry);
    this.unappliedBytes += entry.map.bytes;
    const sealing = j.seal().then(
      (seq) => {
        entry.seq = seq;
        this.metrics.epochs.inc({ volume: this.opts.volume, event: 'sealed' });
        this.metrics.epochBytes.inc({ volume: this.opts.volume }, entry.map.bytes);
        this.applyChain = this.applyChain.then(() => this.applyToOverlay(entry));
        this.opts.shipper?.sealed(seq);
        return seq;
      },
      (err: unknown) => {
        // The journal could not make the epoch durable: the volume can no longer promise I2.
        this.fail(err);
        throw new BlockError('EIO', `journal of ${this.opts.volume}: ${(err as Error).message}`, { cause: err });
      },
    );
    this.lastSeal = sealing;
    return sealing;
  }

  /** Stats for `spillway volume status`. */
  stats(): { unsealedBytes: number; unappliedEpochs: number; unappliedBytes: number } {
    return { unsealedBytes: this.current.bytes, unappliedEpochs: this.unapplied.length, unappliedBytes: this.unappliedBytes };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    // A clean stop keeps every acknowledged write, flushed or not (like a disk that flushes its
    // cache on an orderly shutdown). Only a crash loses writes, and only unflushed ones.
    if (!this.failure) await this.seal().catch(() => undefined);
    this.closed = true;
    await this.lastSeal.catch(() => undefined);
    await this.applyChain.catch(() => undefined);
    await this.checkpointing?.catch(() => undefined);
    await this.checkpoint(true).catch(() => undefined);
    await this.opts.overlay.close();
  }

  // --------------------------------------------------------------------------- internals

  private async zeroOrTrim(offset: number, length: number, fua: boolean, trim: boolean): Promise<void> {
    let shipped: WritePolicy | null = null;
    const local: Promise<void>[] = [];
    for (const p of this.opts.policy.split(offset, length)) {
      this.metrics.guestBytes.inc({ volume: this.opts.volume, policy: p.policy }, p.length);
      if (p.policy === 'remote-only') {
        local.push((trim ? this.opts.overlay.trim(p.offset, p.length) : zeroRange(this.opts.overlay, p.offset, p.length)).then(() => void (this.overlayDirty = true)));
        continue;
      }
      this.current.zero(p.offset, p.length);
      this.opts.journal!.append({ kind: 'zero', offset: p.offset, length: p.length });
      shipped = strictest(shipped, p.policy);
    }
    await Promise.all(local);
    if (fua && local.length > 0) await this.opts.overlay.flush();
    await this.afterShippedOp(shipped, fua);
  }

  private async afterShippedOp(policy: WritePolicy | null, fua: boolean): Promise<void> {
    if (policy === null) return;
    if (policy === 'write-through') {
      const seq = await this.seal();
      await this.opts.shipper?.waitAcked(seq);
      return;
    }
    if (fua) {
      await this.seal();
      return;
    }
    if (this.current.bytes >= this.opts.epochMax) void this.seal().catch(() => undefined);
    // Bound memory: sealed epochs wait for the overlay; don't let them pile up without end.
    // (An epoch joins the apply chain when its seal resolves, so wait for the seal first.)
    while (this.unappliedBytes > 2 * this.opts.epochMax && !this.failure) {
      const before = this.unappliedBytes;
      await this.lastSeal.catch(() => undefined);
      await this.applyChain;
      if (this.unappliedBytes >= before) await new Promise((r) => setTimeout(r, 1)); // never spin
    }
  }

  private async applyToOverlay(entry: SealedMap): Promise<void> {
    if (this.failure) return;
    try {
      const o = this.opts.overlay;
      await Promise.all(entry.map.extents().map((e) => (e.data ? o.write(e.offset, e.data) : zeroRange(o, e.offset, e.length))));
      const i = this.unapplied.indexOf(entry);
      if (i >= 0) this.unapplied.splice(i, 1);
      this.unappliedBytes -= entry.map.bytes;
      this.appliedSinceCheckpoint += entry.map.bytes;
      // In the background: the overlay's fdatasync can take a second after a lot of writes, and
      // the next epochs must not wait behind it (writes would stall on the memory bound).
      void this.checkpoint(false).catch((err: unknown) => this.fail(err));
    } catch (err) {
      this.fail(err);
    }
  }

  /** Overlay durable → journal may forget epochs up to the newest applied one. */
  private async checkpoint(force: boolean): Promise<void> {
    const j = this.opts.journal;
    if (!j) return;
    if (this.checkpointing) return this.checkpointing;
    if (!force && Date.now() - this.lastCheckpoint < this.checkpointEveryMs && this.appliedSinceCheckpoint < this.checkpointEveryBytes) return;
    const upTo = this.unapplied.length > 0 ? this.unapplied[0]!.seq - 1 : j.lastSealed;
    if (upTo <= j.checkpointSeq) return;
    this.lastCheckpoint = Date.now();
    this.appliedSinceCheckpoint = 0;
    this.checkpointing = (async () => {
      await this.opts.overlay.flush();
      await j.setCheckpoint(upTo);
    })().finally(() => (this.checkpointing = null));
    return this.checkpointing;
  }

  private fail(err: unknown): void {
    if (this.failure) return;
    this.failure = err instanceof Error ? err : new Error(String(err));
  }

  private assertUsable(): void {
    if (this.closed) throw new BlockError('ESHUTDOWN', `volume ${this.opts.volume} is closed`);
    if (this.failure) throw new BlockError('EIO', `volume ${this.opts.volume} stopped accepting I/O after a write-back failure: ${this.failure.message}`);
  }
}

function strictest(a: WritePolicy | null, b: WritePolicy): WritePolicy {
  if (a === 'write-through' || b === 'write-through') return 'write-through';
  return 'origin';
}

async function zeroRange(dev: BlockDevice, offset: number, length: number): Promise<void> {
  if (dev.capabilities.zero) return dev.writeZeroes(offset, length);
  const step = 1024 * 1024;
  for (let p = offset; p < offset + length; p += step) await dev.write(p, Buffer.alloc(Math.min(step, offset + length - p)));
}

function describe(p: PolicyMap): string {
  const extra = p.ranges.length > 0 ? ` +${p.ranges.length} range${p.ranges.length === 1 ? '' : 's'}` : '';
  return `${p.defaultPolicy}${extra}`;
}

