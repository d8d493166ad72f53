// Pull-style reader over a byte stream with bounded buffering: the consumer asks for exactly
// n bytes; the stream is paused while more than `highWater` bytes wait unread, and resumed when
// the consumer asks for more. A stream can be detached and another attached (STARTTLS).

import type { Duplex } from 'node:stream';

export class StreamClosedError extends Error {
  readonly code = 'SPW_ERR_STREAM_CLOSED';
  constructor(message = 'connection closed') {
    super(message);
    this.name = 'StreamClosedError';
  }
}

export class ByteReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private closed: Error | null = null;
  private stream: Duplex | null = null;

  constructor(
    stream: Duplex,
    private readonly highWater = 4 * 1024 * 1024,
  ) {
    this.attach(stream);
  }

  get bufferedBytes(): number {
    return this.buffered;
  }

  attach(stream: Duplex): void {
    this.stream = stream;
    stream.on('data', this.onData);
    stream.on('end', this.onEnd);
    stream.on('close', this.onEnd);
    stream.on('error', this.onError);
    stream.resume();
  }

  /** Stop consuming from the current stream (leaves it paused with nothing read ahead). */
  detach(): Duplex | null {
    const s = this.stream;
    if (s) {
      s.pause();
      s.off('data', this.onData);
      s.off('end', this.onEnd);
      s.off('close', this.onEnd);
      s.off('error', this.onError);
    }
    this.stream = null;
    return s;
  }

  /** Exactly n bytes, or rejects with StreamClosedError when the stream ends first. */
  read(n: number): Promise<Buffer> {
    if (this.buffered >= n) return Promise.resolve(this.take(n));
    if (this.closed) return Promise.reject(this.closed);
    if (this.waiter) return Promise.reject(new Error('ByteReader.read called while a read is pending'));
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
      this.stream?.resume();
    });
  }

  /** Read n bytes and drop them, without holding more than highWater at a time. */
  async skip(n: number): Promise<void> {
    while (n > 0) {
      const step = Math.min(n, this.highWater);
      await this.read(step);
      n -= step;
    }
  }

  private take(n: number): Buffer {
    this.buffered -= n;
    const first = this.chunks[0]!;
    if (first.length === n) {
      this.chunks.shift();
      this.maybeResume();
      return first;
    }
    if (first.length > n) {
      this.chunks[0] = first.subarray(n);
      this.maybeResume();
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let pos = 0;
    while (pos < n) {
      const c = this.chunks[0]!;
      const want = n - pos;
      if (c.length <= want) {
        c.copy(out, pos);
        pos += c.length;
        this.chunks.shift();
      } else {
        c.copy(out, pos, 0, want);
        this.chunks[0] = c.subarray(want);
        pos += want;
      }
    }
    this.maybeResume();
    return out;
  }

  private maybeResume(): void {
    if (this.buffered < this.highWater && this.stream?.isPaused()) this.stream.resume();
  }

  private readonly onData = (chunk: Buffer): void => {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const w = this.waiter;
    if (w && this.buffered >= w.n) {
      this.waiter = null;
      w.resolve(this.take(w.n));
    }
    if (this.buffered >= this.highWater && !(this.waiter && this.waiter.n > this.buffered)) this.stream?.pause();
  };

  private readonly onEnd = (): void => {
    this.fail(new StreamClosedError());
  };

  private readonly onError = (err: Error): void => {
    this.fail(new StreamClosedError(`connection error: ${err.message}`));
  };

  private fail(err: Error): void {
    if (!this.closed) this.closed = err;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(err);
  }
}
