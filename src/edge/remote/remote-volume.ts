// A volume seen from the remote role: opened over the link (geometry and the family's data
// key), its chunks fetched on demand with concurrent misses on one chunk coalesced, checked
// against their keyed signature, and stored in the secure cache. While the link is down,
// fetches wait and are sent again after reconnect; a read fails only after the I/O timeout.

import { BlockError } from '../../block/device.js';
import type { SecureCache } from '../../cache/cache.js';
import { deriveKeys } from '../../cache/keys.js';
import type { ChunkRange, LinkMessage } from '../../link/codec.js';
import { decompressChunk } from '../../link/compress.js';
import { PRIORITY, type Priority } from '../../link/protocol.js';
import { ChunkSigner } from '../../link/signature.js';
import type { Logger } from '../../log/logger.js';
import type { PeerClient } from './peer-client.js';
import { remoteMetrics } from './metrics.js';

export interface RemoteVolumeInfo {
  name: string;
  handle: number;
  size: number;
  chunkSize: number;
  family: string;
}

export class VolumeOpenError extends Error {
  readonly code = 'SPW_ERR_VOLUME_REMOTE_OPEN';
  constructor(message: string) {
    super(message);
    this.name = 'VolumeOpenError';
  }
}

interface Waiter {
  resolve: (b: Buffer | 'zero') => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

interface Pending {
  priority: Priority;
  waiters: Waiter[];
  /** cache fill token taken when the fetch was sent (a later invalidation makes it stale). */
  token: number;
}

let nextReqId = 1;

export class RemoteVolume {
  info: RemoteVolumeInfo | null = null;
  private signer: ChunkSigner | null = null;
  private readonly pending = new Map<number, Pending>();
  private readonly opening = new Map<number, { resolve: (m: LinkMessage) => void }>();
  private readonly metrics = remoteMetrics();
  private closed = false;
  /** chunks whose fills are refused while a batch of writes to them is on its way (I5). */
  private readonly noFill = new Map<number, number>();
  /** the family's data key, in memory only (the journal of this volume is sealed with it). */
  dataKey: Buffer | null = null;

  constructor(
    readonly name: string,
    private readonly peer: PeerClient,
    private readonly cache: SecureCache,
    private readonly opts: { ioTimeoutMs: number; log: Logger; onOpened?: (info: RemoteVolumeInfo, dataKey: Buffer) => void },
  ) {
    peer.on('connection', this.onConnection);
  }

  private readonly onConnection = (): void => void this.onReconnect();

  /** OPEN over the link, waiting for the peer up to the I/O timeout. */
  async open(signal?: AbortSignal): Promise<RemoteVolumeInfo> {
    const timeout = AbortSignal.timeout(this.opts.ioTimeoutMs);
    const s = signal ? AbortSignal.any([signal, timeout]) : timeout;
    for (;;) {
      await this.peer.whenConnected(s);
      const reqId = nextReqId++;
      const reply = new Promise<LinkMessage>((resolve) => this.opening.set(reqId, { resolve }));
      if (!this.peer.send({ type: 'open', reqId, volume: this.name })) continue;
      const m = await Promise.race([reply, new Promise<null>((r) => this.peer.once('down', () => r(null)))]);
      this.opening.delete(reqId);
      if (m === null) continue;
      if (m.type === 'error') throw new VolumeOpenError(`peer ${this.peer.opts.name} refused volume ${this.name}: ${m.message}`);
      if (m.type !== 'opened') continue;
      const info = { name: m.volume, handle: m.handle, size: m.size, chunkSize: m.chunkSize, family: m.family };
      if (this.info && (this.info.size !== info.size || this.info.chunkSize !== info.chunkSize || this.info.family !== info.family)) {
        throw new VolumeOpenError(`volume ${this.name} changed at the origin (size/chunk size/family); refusing to mix its data with the cached copy`);
      }
      this.adopt(info, m.dataKey);
      this.opts.onOpened?.(info, m.dataKey);
      return info;
    }
  }

  /**
   * Serve without the origin: take geometry and data key kept from an earlier OPEN (a hydrated
   * volume, see key-store.ts). A later reconnect opens for real and checks they still match.
   */
  openOffline(info: RemoteVolumeInfo, dataKey: Buffer): RemoteVolumeInfo {
    this.adopt(info, dataKey);
    return info;
  }

  private adopt(info: RemoteVolumeInfo, dataKey: Buffer): void {
    this.info = info;
    try {
      this.cache.setKey(info.family, dataKey);
    } catch (err) {
      if ((err as { code?: string }).code !== 'SPW_ERR_CACHE_KEY_MISMATCH') throw err;
      // The origin's key is authoritative: it was rotated or re-created there, so what we
      // cached under the old key is unreadable anyway. Drop it and start over.
      this.opts.log('warn', 'the origin delivered a different data key for this family; dropping its cached content', { volume: this.name, family: info.family });
      this.cache.setKey(info.family, dataKey, { replace: true });
    }
    this.cache.attachVolume(this.name, info.family);
    this.dataKey = Buffer.from(dataKey);
    this.signer = new ChunkSigner(deriveKeys(dataKey).signKey);
  }

  get chunkCount(): number {
    return this.info ? Math.ceil(this.info.size / this.info.chunkSize) : 0;
  }

  chunkLength(index: number): number {
    const i = this.info!;
    return Math.min(i.chunkSize, i.size - index * i.chunkSize);
  }

  isPending(index: number): boolean {
    return this.pending.has(index);
  }

  /** Fetch a chunk over the link (the caller already missed in the cache). */
  fetch(index: number, priority: Priority = PRIORITY.DEMAND): Promise<Buffer | 'zero'> {
    if (this.closed) return Promise.reject(new BlockError('ESHUTDOWN', `volume ${this.name} is closed`));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const p = this.pending.get(index);
        if (p) {
          p.waiters = p.waiters.filter((w) => w.timer !== timer);
          if (p.waiters.length === 0) this.pending.delete(index);
        }
        this.metrics.timeouts.inc();
        reject(new BlockError('EIO', `chunk ${index} of ${this.name} did not arrive within ${this.opts.ioTimeoutMs} ms (peer ${this.peer.opts.name}: ${this.peer.connected ? 'connected' : 'unreachable'})`));
      }, this.opts.ioTimeoutMs);
      const w: Waiter = { resolve, reject, timer };
      const p = this.pending.get(index);
      if (p) {
        p.waiters.push(w);
        this.metrics.coalesced.inc();
        if (priority < p.priority) {
          p.priority = priority;
          this.send([{ start: index, count: 1 }], priority);
        }
        return;
      }
      this.pending.set(index, { priority, waiters: [w], token: this.cache.fillToken(this.name, index) });
      this.send([{ start: index, count: 1 }], priority);
    });
  }

  /** Ask for chunks nobody waits for yet (read-ahead, prefetch); they land in the cache.
   *  Returns how many were asked for (the others are cached or already on their way). */
  prefetch(indices: number[], priority: Priority): number {
    const want = indices.filter((i) => i >= 0 && i < this.chunkCount && !this.pending.has(i) && this.cache.lookup(this.name, i) === null);
    for (const i of want) this.pending.set(i, { priority, waiters: [], token: this.cache.fillToken(this.name, i) });
    if (want.length > 0) this.send(toRanges(want), priority);
    return want.length;
  }

  /** Link handler for this volume's frames. */
  async onMessage(msg: LinkMessage): Promise<void> {
    const info = this.info;
    const signer = this.signer;
    if (!info || !signer) return;
    switch (msg.type) {
      case 'chunk': {
        if (msg.handle !== info.handle) return;
        if (msg.index >= this.chunkCount) return; // not a chunk of this volume: ignore
        let data: Buffer;
        try {
          // The expected length comes from our own geometry, never from the peer's frame.
          data = decompressChunk(msg.codec, msg.payload, this.chunkLength(msg.index));
          if (!signer.verify(data, msg.signature)) throw new Error('signature mismatch');
        } catch (err) {
          this.metrics.corrupt.inc();
          this.opts.log('warn', 'corrupt chunk from peer; asking again', { volume: this.name, index: msg.index, err: (err as Error).message });
          this.peer.send({ type: 'need-data', handle: info.handle, index: msg.index, priority: msg.priority });
          return;
        }
        this.metrics.received.inc({ kind: msg.pushed ? 'pushed' : 'data' });
        const fill = this.fillOptions(msg);
        if (fill === 'stale') return;
        if (fill) await this.cache.put(this.name, info.family, msg.index, Buffer.from(msg.signature), data, fill);
        this.settle(msg.index, data);
        return;
      }
      case 'chunk-sig': {
        if (msg.handle !== info.handle || msg.index >= this.chunkCount) return;
        if (this.cache.hasContent(info.family, msg.signature)) {
          const data = await this.cache.getContent(info.family, msg.signature);
          const fill = this.fillOptions(msg);
          if (fill === 'stale') return;
          if (data && data.length === msg.rawLength && (!fill || (await this.cache.map(this.name, msg.index, Buffer.from(msg.signature), fill)))) {
            this.metrics.received.inc({ kind: 'signature' });
            this.settle(msg.index, data);
            return;
          }
        }
        if (msg.pushed) return; // a push we cannot use; whoever needs the chunk asks for it
        this.peer.send({ type: 'need-data', handle: info.handle, index: msg.index, priority: msg.priority });
        return;
      }
      case 'chunk-zero':
        if (msg.handle !== info.handle || msg.index >= this.chunkCount) return;
        {
          const fill = this.fillOptions(msg);
          if (fill === 'stale') return;
          if (fill) await this.cache.putZero(this.name, msg.index, fill);
        }
        this.metrics.received.inc({ kind: 'zero' });
        this.settle(msg.index, 'zero');
        return;
      default:
        return;
    }
  }

  /**
   * I5: forget what the cache holds for these chunks (durably) and refuse to cache answers for
   * them until release(): a batch of writes to them is on its way to the origin, which may
   * answer a fetch with data it read before applying the batch.
   */
  async guard(chunks: number[]): Promise<void> {
    for (const c of chunks) this.noFill.set(c, (this.noFill.get(c) ?? 0) + 1);
    await Promise.all(chunks.map((c) => this.cache.invalidate(this.name, c)));
  }

  /** The origin applied the batch: invalidate once more (fills that raced it) and allow fills. */
  async release(chunks: number[]): Promise<void> {
    await Promise.all(chunks.map((c) => this.cache.invalidate(this.name, c)));
    for (const c of chunks) {
      const n = (this.noFill.get(c) ?? 1) - 1;
      if (n <= 0) this.noFill.delete(c);
      else this.noFill.set(c, n);
    }
  }

  /**
   * How to fill the cache with an answer: with the fill token of our request; null when it
   * must not be cached (a batch of writes to it is on its way, or nobody asked: a late
   * duplicate answer); 'stale' for a push read before an invalidation we made since the
   * request that caused it: neither cache it nor hand it to a reader (I5).
   */
  private fillOptions(msg: { index: number; pushed: boolean; token: number }): { fillToken: number } | null | 'stale' {
    if (msg.pushed) {
      if (this.noFill.has(msg.index) || this.cache.isStale(this.name, msg.index, msg.token)) {
        this.metrics.pushRefused.inc();
        return 'stale';
      }
      return { fillToken: msg.token };
    }
    if (this.noFill.has(msg.index)) return null;
    const p = this.pending.get(msg.index);
    return p ? { fillToken: p.token } : null;
  }

  close(): void {
    this.closed = true;
    this.peer.off('connection', this.onConnection);
    for (const [, p] of this.pending) {
      for (const w of p.waiters) {
        clearTimeout(w.timer);
        w.reject(new BlockError('ESHUTDOWN', `volume ${this.name} is closing`));
      }
    }
    this.pending.clear();
  }

  private settle(index: number, data: Buffer | 'zero'): void {
    const p = this.pending.get(index);
    if (!p) return;
    this.pending.delete(index);
    for (const w of p.waiters) {
      clearTimeout(w.timer);
      w.resolve(data);
    }
  }

  private send(ranges: ChunkRange[], priority: Priority): void {
    if (!this.info) return;
    // When no connection is up, the request stays pending and goes out on reconnect.
    // The token names "now" for pushes this request causes (see LinkMessage 'fetch').
    const token = this.cache.fillToken(this.name, 0);
    for (let i = 0; i < ranges.length; i += 512) this.peer.send({ type: 'fetch', handle: this.info.handle, priority, token, ranges: ranges.slice(i, i + 512) });
  }

  /** After a reconnect: make sure the volume is open, then ask again for everything pending. */
  private resending = false;
  private async onReconnect(): Promise<void> {
    if (!this.info || this.resending || this.closed) return;
    this.resending = true;
    try {
      await this.open();
      const byPriority: number[][] = [[], [], [], []];
      for (const [i, p] of this.pending) byPriority[p.priority]!.push(i);
      byPriority.forEach((idx, prio) => idx.length > 0 && this.send(toRanges(idx.sort((a, b) => a - b)), prio as Priority));
      this.metrics.resent.inc(this.pending.size);
    } catch (err) {
      this.opts.log('warn', 'reopening volume after reconnect failed', { volume: this.name, err: (err as Error).message });
    } finally {
      this.resending = false;
    }
  }

  /** Link handler for replies to OPEN (routed by request id). */
  onOpenReply(msg: LinkMessage): boolean {
    if (msg.type !== 'opened' && msg.type !== 'error') return false;
    const o = this.opening.get(msg.reqId);
    if (!o) return false;
    o.resolve(msg);
    return true;
  }
}

export function toRanges(sorted: number[]): ChunkRange[] {
  const out: ChunkRange[] = [];
  for (const i of sorted) {
    const last = out[out.length - 1];
    if (last && last.start + last.count === i && last.count < 0xffffffff) last.count++;
    else out.push({ start: i, count: 1 });
  }
  return out;
}
