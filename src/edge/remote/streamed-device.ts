// The remote read path as a BlockDevice: a request is split into chunks, and each chunk is
// answered by the secure cache, else fetched over the link (coalesced with any fetch already in
// flight). Sequential access grows an adaptive read-ahead window, which fetches the next chunks
// in the group class so it never competes with demand reads. Read-only: the overlay above it
// takes the writes.

import { BlockError, type BlockCapabilities, type BlockDevice, type Extent, type IoOptions } from '../../block/device.js';
import type { SecureCache } from '../../cache/cache.js';
import { PRIORITY } from '../../link/protocol.js';
import type { RemoteVolume } from './remote-volume.js';
import { remoteMetrics } from './metrics.js';

export interface StreamedDeviceOptions {
  /** most chunks read ahead of a sequential reader (0 disables read-ahead). */
  readAheadMax?: number;
}

export class StreamedDevice implements BlockDevice {
  readonly size: number;
  readonly capabilities: BlockCapabilities;
  readonly description: string;
  private readonly chunkSize: number;
  private readonly metrics = remoteMetrics();
  private nextSequential = -1;
  private window = 0;
  private readonly readAheadMax: number;

  constructor(
    private readonly volume: RemoteVolume,
    private readonly store: SecureCache,
    opts: StreamedDeviceOptions = {},
  ) {
    const info = volume.info;
    if (!info) throw new Error('StreamedDevice needs an opened RemoteVolume');
    this.size = info.size;
    this.chunkSize = info.chunkSize;
    this.readAheadMax = opts.readAheadMax ?? 64;
    this.description = `streamed(${info.name} via link, cache)`;
    this.capabilities = {
      writable: false,
      flush: false,
      fua: false,
      trim: false,
      zero: false,
      fastZero: false,
      extents: true,
      cache: true,
      multiConn: true,
      blockSize: { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 },
    };
  }

  async read(offset: number, buf: Buffer, _opts?: IoOptions): Promise<void> {
    if (buf.length === 0) return;
    const cs = this.chunkSize;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + buf.length - 1) / cs);
    this.readAhead(offset, buf.length, last);
    const parts: Promise<void>[] = [];
    for (let c = first; c <= last; c++) {
      const cStart = c * cs;
      const from = Math.max(offset, cStart);
      const to = Math.min(offset + buf.length, cStart + cs);
      parts.push(
        this.chunk(c).then((data) => {
          const dst = buf.subarray(from - offset, to - offset);
          if (data === 'zero') dst.fill(0);
          else data.copy(dst, 0, from - cStart, to - cStart);
        }),
      );
    }
    await Promise.all(parts);
  }

  /** Prefetch hint (NBD_CMD_CACHE): bring the range into the cache without waiting. */
  async cache(offset: number, length: number): Promise<void> {
    if (length === 0) return;
    const first = Math.floor(offset / this.chunkSize);
    const last = Math.floor((offset + length - 1) / this.chunkSize);
    const idx: number[] = [];
    for (let c = first; c <= last; c++) idx.push(c);
    this.volume.prefetch(idx, PRIORITY.PREFETCH);
  }

  /** Chunks known to be zero (from the cache index) are holes; everything else is data. */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const out: Extent[] = [];
    const cs = this.chunkSize;
    let pos = offset;
    const end = offset + length;
    while (pos < end && out.length < 1024) {
      const c = Math.floor(pos / cs);
      const cEnd = Math.min(end, (c + 1) * cs);
      const zero = this.store.lookup(this.volume.name, c)?.kind === 'zero';
      const prev = out[out.length - 1];
      if (prev && prev.zero === zero) out[out.length - 1] = { ...prev, length: prev.length + (cEnd - pos) };
      else out.push({ offset: pos, length: cEnd - pos, hole: zero, zero });
      pos = cEnd;
    }
    return out;
  }

  write(): Promise<void> {
    return Promise.reject(new BlockError('EPERM', 'the streamed layer is read-only; writes belong to the overlay above it'));
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
  trim(): Promise<void> {
    return this.write();
  }
  writeZeroes(): Promise<void> {
    return this.write();
  }
  async close(): Promise<void> {
    this.volume.close();
  }

  private async chunk(index: number): Promise<Buffer | 'zero'> {
    const hit = await this.store.get(this.volume.name, index);
    if (hit !== null) {
      this.metrics.reads.inc({ volume: this.volume.name, tier: 'cache' });
      return hit;
    }
    this.metrics.reads.inc({ volume: this.volume.name, tier: 'link' });
    return this.volume.fetch(index, PRIORITY.DEMAND);
  }

  /** Grow the window while reads follow each other; reset it on a jump. */
  private readAhead(offset: number, length: number, lastChunk: number): void {
    if (this.readAheadMax === 0) return;
    if (offset === this.nextSequential) this.window = Math.min(this.readAheadMax, Math.max(2, this.window * 2));
    else this.window = 0;
    this.nextSequential = offset + length;
    if (this.window === 0) return;
    const idx: number[] = [];
    for (let c = lastChunk + 1; c <= lastChunk + this.window && c < this.volume.chunkCount; c++) idx.push(c);
    if (idx.length > 0) this.metrics.readahead.inc(this.volume.prefetch(idx, PRIORITY.GROUP));
  }
}
