// The shipper: sends a volume's sealed epochs to the origin and records the origin's
// acknowledgements in the journal.
//
// A batch is a run of consecutive sealed epochs first..last, coalesced into extents (a block
// written in several epochs of the batch travels once) and sent on one link connection as
// EPOCH_BEGIN, EPOCH_DATA per extent (compressed when that pays; credited, so a slow origin
// slows the shipper instead of growing buffers), EPOCH_END with the digest. The origin applies
// the batch atomically (its redo log), which moves it from the state after epoch first - 1 to the
// state after epoch last: both flush boundaries (I3). It answers EPOCH_ACK. Exactly once (I4): the
// origin applies only a batch that starts right after what it applied, so the shipper first
// asks where the origin stands (EPOCH_QUERY) after every (re)connection, restart or refusal.
//
// When: the oldest unshipped epoch is half the RPO old (so a batch normally lands within the
// RPO), the unshipped bytes pass `shipAt`, or someone waits (write-through, drain).
//
// I5, no stale cache: before a batch is sent, the chunks it touches are guarded: their cache
// entries are invalidated and fills of them are refused while the batch is in flight (the
// origin may answer a fetch with data read before it applied the batch). After the ack they are
// invalidated once more and released. After a restart, chunks of every unacknowledged epoch
// are invalidated before anything else.

import { compressChunk, CODEC_ZERO, isAllZero } from '../link/compress.js';
import type { LinkMessage } from '../link/codec.js';
import { EPOCH_STATUS, EPOCH_STATUS_NAMES, MAX_EPOCH_EXTENT } from '../link/protocol.js';
import type { Logger } from '../log/logger.js';
import { BatchDigest } from './batch.js';
import { ExtentMap, type MapExtent } from './extent-map.js';
import type { Journal } from './journal.js';
import type { ShipperLink } from './device.js';
import { registerWritebackSource, writebackMetrics } from './metrics.js';

/** One connection a batch travels on. */
export interface ShipChannel {
  /** Send in order; resolves once the frame is handed to the connection (waiting for credit
   *  and socket room), rejects when the connection is gone. */
  send(msg: LinkMessage): Promise<void>;
  readonly closed: boolean;
  /** called once when the connection closes. */
  onClose(cb: () => void): void;
}

export interface ShipTransport {
  /** A channel to the origin and the volume's handle there; waits while the link is down. */
  channel(signal: AbortSignal): Promise<{ channel: ShipChannel; handle: number }>;
}

/** The read path's cache, as the shipper needs it for I5. */
export interface ChunkGuard {
  /** invalidate the chunks (durably) and refuse fills of them until released. */
  guard(chunks: number[]): Promise<void>;
  /** invalidate them again (durably) and allow fills. */
  release(chunks: number[]): Promise<void>;
}

export interface ShipperOptions {
  volume: string;
  journal: Journal;
  transport: ShipTransport;
  chunkSize: number;
  guard?: ChunkGuard;
  /** recovery point objective (ms): a batch starts once the oldest unshipped epoch is half this old. */
  rpoMs: number;
  /** ship as soon as this many sealed bytes are unshipped. */
  shipAtBytes: number;
  /** stop adding epochs to a batch past this many bytes (guest bytes, before coalescing). */
  batchMaxBytes?: number;
  /** a batch not acknowledged within this time is sent again (on a new query). */
  ackTimeoutMs?: number;
  log: Logger;
}

export class ShipperError extends Error {
  readonly code = 'SPW_ERR_SHIPPER';
  constructor(message: string) {
    super(message);
    this.name = 'ShipperError';
  }
}

interface Waiter {
  seq: number;
  resolve: () => void;
  reject: (e: Error) => void;
}

let nextBatch = 1;
let nextReq = 1;

export class Shipper implements ShipperLink {
  private readonly waiters: Waiter[] = [];
  private readonly replies = new Map<string, (m: LinkMessage) => void>();
  private wake: (() => void) | null = null;
  private stopped = false;
  private synced = false;
  private recovered = false;
  private loop: Promise<void> | null = null;
  private readonly abort = new AbortController();
  private readonly metrics = writebackMetrics();
  private readonly unregister: () => void;
  private guestShipped = 0;
  /** chunks guarded for batches the origin may still apply, released by acked(). */
  private inflight: Array<{ last: number; chunks: number[] }> = [];
  private bytesShipped = 0;
  /** why the last attempt failed, for status. */
  lastError = '';
  batchesSent = 0;

  constructor(private readonly opts: ShipperOptions) {
    this.unregister = registerWritebackSource({
      volume: opts.volume,
      unshippedBytes: () => opts.journal.unackedBytes,
      rpoLagSeconds: () => this.rpoLagMs() / 1000,
      coalescingRatio: () => (this.bytesShipped > 0 ? this.guestShipped / this.bytesShipped : 1),
    });
  }

  start(): void {
    this.loop ??= this.run();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.abort.abort();
    this.poke();
    await this.loop?.catch(() => undefined);
    this.unregister();
    for (const w of this.waiters.splice(0)) w.reject(new ShipperError(`volume ${this.opts.volume} is closing; epochs up to ${w.seq} were not acknowledged by the origin yet (they stay in the journal)`));
  }

  /** A new epoch: re-evaluate when to ship (the RPO clock may start now, or shipAt be passed). */
  sealed(_seq: number): void {
    this.poke();
  }

  waitAcked(seq: number, signal?: AbortSignal): Promise<void> {
    if (seq <= this.opts.journal.ackedSeq) return Promise.resolve();
    if (this.stopped) return Promise.reject(new ShipperError(`volume ${this.opts.volume} is closing`));
    return new Promise((resolve, reject) => {
      const w: Waiter = { seq, resolve, reject };
      this.waiters.push(w);
      signal?.addEventListener(
        'abort',
        () => {
          const i = this.waiters.indexOf(w);
          if (i >= 0) this.waiters.splice(i, 1);
          reject(signal.reason instanceof Error ? signal.reason : new ShipperError('aborted'));
        },
        { once: true },
      );
      this.poke();
    });
  }

  /** Ship every sealed epoch and wait for the origin to acknowledge it. */
  drain(signal?: AbortSignal): Promise<void> {
    return this.waitAcked(this.opts.journal.lastSealed, signal);
  }

  /** Link handler for epoch-state and epoch-ack frames of this volume. */
  onMessage(msg: LinkMessage): void {
    if (msg.type === 'epoch-state') this.replies.get(`q${msg.reqId}`)?.(msg);
    else if (msg.type === 'epoch-ack') this.replies.get(`b${msg.batch}`)?.(msg);
  }

  status(): { ackedSeq: number; lastSealed: number; unshippedBytes: number; rpoLagSeconds: number; coalescingRatio: number; batches: number; lastError: string } {
    const j = this.opts.journal;
    return {
      ackedSeq: j.ackedSeq,
      lastSealed: j.lastSealed,
      unshippedBytes: j.unackedBytes,
      rpoLagSeconds: this.rpoLagMs() / 1000,
      coalescingRatio: this.bytesShipped > 0 ? this.guestShipped / this.bytesShipped : 1,
      batches: this.batchesSent,
      lastError: this.lastError,
    };
  }

  // --------------------------------------------------------------------------- internals

  private rpoLagMs(): number {
    const p = this.opts.journal.pending();
    return p.length > 0 ? Math.max(0, Date.now() - p[0]!.sealedAt) : 0;
  }

  private unshippedSealedBytes(): number {
    let n = 0;
    for (const e of this.opts.journal.pending()) n += e.bytes;
    return n;
  }

  private poke(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  /** Resolves when there is a reason to ship (or on stop). */
  private async due(): Promise<void> {
    for (;;) {
      if (this.stopped) return;
      const j = this.opts.journal;
      const pending = j.pending();
      let waitMs = 3_600_000;
      if (pending.length > 0) {
        if (this.waiters.some((w) => w.seq > j.ackedSeq)) return;
        if (this.unshippedSealedBytes() >= this.opts.shipAtBytes) return;
        const age = Date.now() - pending[0]!.sealedAt;
        if (age >= this.opts.rpoMs / 2) return;
        waitMs = this.opts.rpoMs / 2 - age;
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.max(1, waitMs));
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
  }

  private async run(): Promise<void> {
    let backoff = 100;
    while (!this.stopped) {
      await this.due();
      if (this.stopped) return;
      try {
        const { channel, handle } = await this.opts.transport.channel(this.abort.signal);
        if (!this.synced) await this.sync(channel, handle);
        if (this.opts.journal.pending().length === 0) continue;
        await this.shipOne(channel, handle);
        backoff = 100;
      } catch (err) {
        if (this.stopped) return;
        this.synced = false;
        this.lastError = (err as Error).message;
        this.opts.log('warn', 'shipping epochs failed; will retry', { volume: this.opts.volume, err: this.lastError, retryInMs: backoff });
        await sleep(backoff, this.abort.signal);
        backoff = Math.min(10_000, backoff * 2);
      }
    }
  }

  /** Ask the origin what it applied; adopt acknowledgements we missed (lost acks, restarts). */
  private async sync(channel: ShipChannel, handle: number): Promise<void> {
    const j = this.opts.journal;
    if (!this.recovered) {
      // I5 after a restart: the cache may hold chunks fetched while an epoch was in flight.
      const chunks = await this.chunksOf(j.ackedSeq + 1, j.lastSealed);
      if (chunks.length > 0 && this.opts.guard) {
        await this.opts.guard.guard(chunks);
        await this.opts.guard.release(chunks);
      }
      this.recovered = true;
    }
    const reqId = nextReq++;
    const reply = this.reply(`q${reqId}`, channel, this.opts.ackTimeoutMs ?? 120_000);
    await channel.send({ type: 'epoch-query', reqId, handle, journalId: j.id });
    const m = await reply;
    if (m.type !== 'epoch-state') throw new ShipperError(`unexpected ${m.type} reply to EPOCH_QUERY`);
    if (m.appliedSeq > j.lastSealed) {
      throw new ShipperError(`the origin says it applied epoch ${m.appliedSeq} of journal ${j.id.toString('hex')}, but the journal only sealed ${j.lastSealed}; refusing to ship (two edges with one journal?)`);
    }
    if (m.appliedSeq >= j.ackedSeq) await this.acked(m.appliedSeq);
    if (m.appliedSeq < j.ackedSeq) {
      throw new ShipperError(`the origin applied only up to epoch ${m.appliedSeq}, but acknowledged ${j.ackedSeq} earlier (was the origin disk or its state restored from a backup?); epochs ${m.appliedSeq + 1}..${j.ackedSeq} are no longer in the journal. Resolve by hand.`);
    }
    this.synced = true;
  }

  private async shipOne(channel: ShipChannel, handle: number): Promise<void> {
    const j = this.opts.journal;
    const pending = j.pending();
    const first = j.ackedSeq + 1;
    const max = this.opts.batchMaxBytes ?? 64 * 1024 * 1024;
    let last = first - 1;
    let guest = 0;
    for (const e of pending) {
      if (e.seq !== last + 1) break;
      if (last >= first && guest + e.bytes > max) break;
      last = e.seq;
      guest += e.bytes;
    }
    if (last < first) return;
    const map = await this.coalesce(first, last);
    const extents = frames(map.extents());
    let bytes = 0;
    for (const e of extents) bytes += e.length;
    const digest = new BatchDigest();
    const chunks = chunksOfExtents(map.extents(), this.opts.chunkSize);
    if (this.opts.guard) {
      await this.opts.guard.guard(chunks);
      // Released once the origin is known to have applied epoch `last` (acked()), not before:
      // if this attempt fails, the origin may still apply the batch.
      this.inflight.push({ last, chunks });
    }
    {
      const batch = nextBatch++;
      const started = Date.now();
      const reply = this.reply(`b${batch}`, channel, this.opts.ackTimeoutMs ?? 120_000);
      await channel.send({ type: 'epoch-begin', handle, batch, journalId: j.id, firstSeq: first, lastSeq: last, extents: extents.length, bytes });
      for (const e of extents) {
        // Hashing and compressing a batch is tens of milliseconds of CPU per 64 MiB: give the
        // event loop (guest I/O) a turn between frames instead of doing it all at once.
        await new Promise((r) => setImmediate(r));
        // All-zero data travels as a zero extent; the digest covers extents as they are sent.
        const zero = e.data === null || isAllZero(e.data);
        digest.update(e.offset, e.length, zero, zero ? undefined : e.data!);
        let msg: LinkMessage;
        if (zero || e.data === null) msg = { type: 'epoch-data', handle, batch, offset: e.offset, length: e.length, zero: true, codec: 0, payload: Buffer.alloc(0) };
        else {
          const c = compressChunk(e.data);
          if (c.codec === CODEC_ZERO) throw new ShipperError('internal: an all-zero extent was not classified as zero');
          msg = { type: 'epoch-data', handle, batch, offset: e.offset, length: e.length, zero: false, codec: c.codec, payload: c.payload };
        }
        await channel.send(msg);
        this.metrics.linkBytes.inc({ volume: this.opts.volume }, 32 + (msg.type === 'epoch-data' ? msg.payload.length : 0));
      }
      await channel.send({ type: 'epoch-end', handle, batch, digest: digest.digest() });
      this.batchesSent++;
      this.metrics.epochs.inc({ volume: this.opts.volume, event: 'shipped' }, last - first + 1);
      const ack = await reply;
      if (ack.type !== 'epoch-ack') throw new ShipperError(`unexpected ${ack.type} reply to a batch`);
      const status = EPOCH_STATUS_NAMES[ack.status] ?? `status ${ack.status}`;
      this.metrics.batches.inc({ volume: this.opts.volume, status });
      switch (ack.status) {
        case EPOCH_STATUS.APPLIED:
        case EPOCH_STATUS.DUPLICATE:
          this.metrics.shipSeconds.observe({ volume: this.opts.volume }, (Date.now() - started) / 1000);
          this.guestShipped += guest;
          this.bytesShipped += digest.bytes;
          this.metrics.shippedBytes.inc({ volume: this.opts.volume }, digest.bytes);
          await this.acked(Math.min(ack.appliedSeq, j.lastSealed));
          this.lastError = '';
          return;
        case EPOCH_STATUS.GAP:
          this.synced = false;
          throw new ShipperError(`the origin expected epoch ${ack.appliedSeq + 1}, not ${first}: ${ack.message}`);
        case EPOCH_STATUS.CORRUPT:
          throw new ShipperError(`the origin refused batch ${first}..${last} as corrupt (${ack.message}); sending it again`);
        case EPOCH_STATUS.NOT_OWNER:
          this.synced = false;
          throw new ShipperError(`the origin says another journal owns volume ${this.opts.volume}: ${ack.message}`);
        default:
          throw new ShipperError(`the origin could not apply batch ${first}..${last}: ${ack.message}`);
      }
    }
  }

  private async acked(seq: number): Promise<void> {
    const j = this.opts.journal;
    const before = j.ackedSeq;
    if (seq > before) {
      await j.setAcked(seq);
      this.metrics.epochs.inc({ volume: this.opts.volume, event: 'acked' }, seq - before);
    }
    const done = this.inflight.filter((b) => b.last <= seq);
    if (done.length > 0 && this.opts.guard) {
      this.inflight = this.inflight.filter((b) => b.last > seq);
      for (const b of done) await this.opts.guard.release(b.chunks);
    }
    this.settleWaiters();
  }

  private settleWaiters(): void {
    const j = this.opts.journal;
    for (let i = this.waiters.length - 1; i >= 0; i--) {
      const w = this.waiters[i]!;
      if (w.seq <= j.ackedSeq) {
        this.waiters.splice(i, 1);
        w.resolve();
      }
    }
  }

  private async chunksOf(first: number, last: number): Promise<number[]> {
    if (last < first) return [];
    return chunksOfExtents((await this.coalesce(first, last)).extents(), this.opts.chunkSize);
  }

  /** The writes of sealed epochs first..last, overlapping ones coalesced (last one wins). */
  private async coalesce(first: number, last: number): Promise<ExtentMap> {
    const map = new ExtentMap();
    for await (const { op } of this.opts.journal.readEpochs(first, last)) {
      if (op.kind === 'write') map.write(op.offset, op.data);
      else map.zero(op.offset, op.length);
    }
    return map;
  }

  /** A promise of the answer keyed `key`; it rejects when the channel closes, on timeout or
   *  on stop. It never rejects unobserved: callers may fail before they await it. */
  private reply(key: string, channel: ShipChannel, timeoutMs: number): Promise<LinkMessage> {
    const p = new Promise<LinkMessage>((resolve, reject) => {
      let settled = false;
      const onAbort = () => done(() => reject(new ShipperError('stopping')));
      const done = (fn: () => void) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.replies.delete(key);
        this.abort.signal.removeEventListener('abort', onAbort);
        fn();
      };
      const timer = setTimeout(() => done(() => reject(new ShipperError(`no answer from the origin within ${timeoutMs} ms`))), timeoutMs);
      this.replies.set(key, (m) => done(() => resolve(m)));
      channel.onClose(() => done(() => reject(new ShipperError('the link connection closed before the origin answered'))));
      this.abort.signal.addEventListener('abort', onAbort, { once: true });
    });
    p.catch(() => undefined);
    return p;
  }
}


/** Extents as frames: data merged with adjacent data up to the frame limit, long ones split. */
export function frames(extents: readonly MapExtent[]): Array<{ offset: number; length: number; data: Buffer | null }> {
  const out: Array<{ offset: number; length: number; data: Buffer | null; parts?: Buffer[] }> = [];
  for (const e of extents) {
    for (let pos = 0; pos < e.length; pos += MAX_EPOCH_EXTENT) {
      const len = Math.min(MAX_EPOCH_EXTENT, e.length - pos);
      const data = e.data ? e.data.subarray(pos, pos + len) : null;
      const prev = out[out.length - 1];
      if (prev && prev.offset + prev.length === e.offset + pos && (prev.data === null) === (data === null) && prev.length + len <= MAX_EPOCH_EXTENT) {
        prev.length += len;
        if (data) (prev.parts ??= [prev.data!]).push(data);
        continue;
      }
      out.push({ offset: e.offset + pos, length: len, data });
    }
  }
  return out.map((f) => ({ offset: f.offset, length: f.length, data: f.parts ? Buffer.concat(f.parts) : f.data }));
}

export function chunksOfExtents(extents: readonly MapExtent[], chunkSize: number): number[] {
  const set = new Set<number>();
  for (const e of extents) {
    const first = Math.floor(e.offset / chunkSize);
    const last = Math.floor((e.offset + e.length - 1) / chunkSize);
    for (let c = first; c <= last; c++) set.add(c);
  }
  return [...set].sort((a, b) => a - b);
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const t = setTimeout(resolve, ms);
    signal.addEventListener(
      'abort',
      () => {
        clearTimeout(t);
        resolve();
      },
      { once: true },
    );
  });
}
