// A bounded pool of I/O buffers keyed by exact size. Allocating a fresh large Buffer per
// request costs an allocation and puts V8 under external-memory GC pressure; clients use a
// handful of request sizes (4 KiB, 64 KiB, 256 KiB, ... plus a reply header), so reusing
// buffers of exactly those sizes keeps the read path flat without rounding waste. At most
// `maxBytes` stay idle; beyond that, released buffers are left to the GC. A buffer must not be
// released while anything still reads it (for a socket write: only in its write callback).

const MIN_POOLED = 4096;

export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private idleBytes = 0;

  constructor(
    private readonly maxBytes = 64 * 1024 * 1024,
    private readonly maxPooledSize = 32 * 1024 * 1024 + 64,
  ) {}

  /** A buffer of exactly `size` bytes, contents unspecified. */
  get(size: number): Buffer {
    if (size < MIN_POOLED) return Buffer.allocUnsafe(size);
    const list = this.free.get(size);
    const buf = list?.pop();
    if (buf) {
      this.idleBytes -= size;
      return buf;
    }
    return Buffer.allocUnsafeSlow(size);
  }

  /** Give back a buffer obtained from get(). */
  release(buf: Buffer): void {
    const size = buf.length;
    if (size < MIN_POOLED || size > this.maxPooledSize) return;
    if (this.idleBytes + size > this.maxBytes) return;
    let list = this.free.get(size);
    if (!list) {
      if (this.free.size >= 64) return; // a client cycling through odd sizes gets no pooling
      list = [];
      this.free.set(size, list);
    }
    list.push(buf);
    this.idleBytes += size;
  }

  get idle(): number {
    return this.idleBytes;
  }
}
