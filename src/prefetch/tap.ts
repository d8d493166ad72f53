// A pass-through layer that tells listeners which ranges the guest reads from the base image
// (what the overlay above did not answer): the profile recorder and the prefetcher's hit
// accounting listen here. Listeners run synchronously and must be cheap.

import { FilterDevice, type IoOptions } from '../block/device.js';

export type ReadListener = (offset: number, length: number) => void;

export class ReadTap extends FilterDevice {
  private readonly listeners = new Set<ReadListener>();

  get description(): string {
    return this.inner.description;
  }

  listen(fn: ReadListener): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  override read(offset: number, buf: Buffer, opts?: IoOptions): Promise<void> {
    if (buf.length > 0) for (const fn of this.listeners) fn(offset, buf.length);
    return this.inner.read(offset, buf, opts);
  }
}
