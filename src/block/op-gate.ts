// The in-flight gate of a layer that owns a resource (an fd, an overlay file): every operation
// runs through it, so close() can wait for operations in flight before releasing the resource
// (never closing an fd under a native call), operations after close are refused with
// ESHUTDOWN, and errors are mapped to BlockError in one place.

import { BlockError, toBlockError, type IoOptions } from './device.js';

export class OpGate {
  private closed = false;
  private inflight = 0;
  private drained: (() => void) | undefined;

  constructor(private readonly what: () => string) {}

  async run<T>(opts: IoOptions | undefined, fn: () => Promise<T>): Promise<T> {
    if (this.closed) throw new BlockError('ESHUTDOWN', `${this.what()} is closed`);
    if (opts?.signal?.aborted) throw new BlockError('ESHUTDOWN', 'request aborted');
    this.inflight++;
    try {
      return await fn();
    } catch (err) {
      throw toBlockError(err);
    } finally {
      if (--this.inflight === 0 && this.drained) this.drained();
    }
  }

  /** Refuse new operations, then wait for those in flight. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.inflight > 0) await new Promise<void>((resolve) => (this.drained = resolve));
  }
}
