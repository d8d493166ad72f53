// MemoryDevice: a sparse in-memory BlockDevice. Pages (64 KiB by default) are allocated on the
// first write that touches them; unallocated pages read as zeroes and are holes in blockStatus.
// Used for tests, scratch exports and as the reference the compliance suite is checked against.

import {
  BlockError,
  assertRange,
  type BlockCapabilities,
  type BlockDevice,
  type Extent,
  type IoOptions,
  type ZeroOptions,
} from './device.js';

export interface MemoryDeviceOptions {
  /** allocation unit in bytes (power of two). Default 64 KiB. */
  readonly pageSize?: number;
  readonly description?: string;
}

export class MemoryDevice implements BlockDevice {
  readonly capabilities: BlockCapabilities = {
    writable: true,
    flush: false,
    fua: false,
    trim: true,
    zero: true,
    fastZero: true,
    extents: true,
    cache: false,
    multiConn: true,
    blockSize: { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 },
  };
  readonly description: string;
  readonly pageSize: number;
  private readonly pages = new Map<number, Buffer>();
  private closed = false;

  constructor(
    readonly size: number,
    opts: MemoryDeviceOptions = {},
  ) {
    const pageSize = opts.pageSize ?? 64 * 1024;
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`invalid device size ${size}`);
    if (!Number.isSafeInteger(pageSize) || pageSize < 1 || (pageSize & (pageSize - 1)) !== 0) {
      throw new RangeError(`pageSize must be a power of two, got ${pageSize}`);
    }
    this.pageSize = pageSize;
    this.description = opts.description ?? `memory:${size}`;
  }

  /** Bytes of memory held by allocated pages. */
  get allocatedBytes(): number {
    return this.pages.size * this.pageSize;
  }

  async read(offset: number, buf: Buffer, opts?: IoOptions): Promise<void> {
    this.check(opts);
    assertRange(this, offset, buf.length);
    this.forEachPage(offset, buf.length, (page, pageOff, bufOff, n) => {
      const p = this.pages.get(page);
      if (p) p.copy(buf, bufOff, pageOff, pageOff + n);
      else buf.fill(0, bufOff, bufOff + n);
    });
  }

  async write(offset: number, data: Buffer, opts?: IoOptions): Promise<void> {
    this.check(opts);
    assertRange(this, offset, data.length);
    this.forEachPage(offset, data.length, (page, pageOff, bufOff, n) => {
      let p = this.pages.get(page);
      if (!p) {
        p = Buffer.alloc(this.pageSize);
        this.pages.set(page, p);
      }
      data.copy(p, pageOff, bufOff, bufOff + n);
    });
  }

  async flush(opts?: IoOptions): Promise<void> {
    this.check(opts);
  }

  trim(offset: number, length: number, opts?: IoOptions): Promise<void> {
    return this.writeZeroes(offset, length, opts);
  }

  async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    this.check(opts);
    assertRange(this, offset, length);
    this.forEachPage(offset, length, (page, pageOff, _bufOff, n) => {
      const p = this.pages.get(page);
      if (!p) return;
      if (n === this.pageSize) this.pages.delete(page);
      else p.fill(0, pageOff, pageOff + n);
    });
  }

  async blockStatus(offset: number, length: number, opts?: IoOptions): Promise<Extent[]> {
    this.check(opts);
    assertRange(this, offset, length);
    const out: Extent[] = [];
    let run: { offset: number; length: number; allocated: boolean } | undefined;
    this.forEachPage(offset, length, (page, _pageOff, bufOff, n) => {
      const allocated = this.pages.has(page);
      if (run && run.allocated === allocated) {
        run.length += n;
        return;
      }
      if (run) out.push(toExtent(run));
      run = { offset: offset + bufOff, length: n, allocated };
    });
    if (run) out.push(toExtent(run));
    return out;
  }

  close(): Promise<void> {
    this.closed = true;
    this.pages.clear();
    return Promise.resolve();
  }

  private check(opts: IoOptions | undefined): void {
    if (this.closed) throw new BlockError('ESHUTDOWN', `${this.description} is closed`);
    if (opts?.signal?.aborted) throw new BlockError('ESHUTDOWN', 'request aborted');
  }

  /** Calls fn for each page piece of [offset, offset + length): page index, offset in the
   *  page, offset relative to `offset`, and length of the piece. */
  private forEachPage(
    offset: number,
    length: number,
    fn: (page: number, pageOff: number, bufOff: number, n: number) => void,
  ): void {
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const page = Math.floor(pos / this.pageSize);
      const pageOff = pos - page * this.pageSize;
      const n = Math.min(this.pageSize - pageOff, length - done);
      fn(page, pageOff, done, n);
      done += n;
    }
  }
}

function toExtent(run: { offset: number; length: number; allocated: boolean }): Extent {
  return { offset: run.offset, length: run.length, hole: !run.allocated, zero: !run.allocated };
}
