// One link connection: frames over a secured byte stream, with credit-based flow control.
// The receiver grants the sender `window` bytes of chunk frames at HELLO time and returns
// credit as it finishes processing them, so a slow receiver (a full cache disk, a busy CPU)
// stops the sender instead of growing buffers. Control frames are small and not credited.

import { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';

import { ByteReader, StreamClosedError } from '../stream/byte-reader.js';
import { creditCost, decodePayload, encodeMessage, framePayloadLength, type LinkMessage } from './codec.js';
import { FRAME_HEADER_SIZE, LINK_VERSION } from './protocol.js';

export interface ConnectionOptions {
  site: string;
  edgeId: string;
  /** bytes of chunk frames the peer may have in flight towards us. */
  window: number;
  /** called for each frame after HELLO; credit for a chunk frame returns when it settles. */
  onMessage: (msg: LinkMessage, conn: LinkConnection) => void | Promise<void>;
  /** the handshake must complete within this time. */
  helloTimeoutMs?: number;
}

export class LinkHandshakeError extends Error {
  readonly code = 'SPW_ERR_LINK_HANDSHAKE';
  constructor(message: string) {
    super(message);
    this.name = 'LinkHandshakeError';
  }
}

export class LinkConnection extends EventEmitter {
  private readonly reader: ByteReader;
  private sendCredit = 0;
  private pendingGrant = 0;
  private closedErr: Error | null = null;
  peer: { site: string; edgeId: string } | null = null;
  bytesIn = 0;
  bytesOut = 0;

  constructor(
    private readonly stream: Duplex,
    private readonly opts: ConnectionOptions,
  ) {
    super();
    this.reader = new ByteReader(stream, 2 * 1024 * 1024);
    stream.on('drain', () => this.emit('writable'));
    stream.on('error', () => {
      /* reported through the reader */
    });
  }

  get credit(): number {
    return this.sendCredit;
  }

  get closed(): boolean {
    return this.closedErr !== null;
  }

  /** Bytes written but not yet handed to the kernel. */
  get queuedBytes(): number {
    return this.stream.writableLength;
  }

  /** Exchange HELLO, then read frames until the stream ends. Resolves when closed. */
  async run(): Promise<void> {
    try {
      this.write(encodeMessage({ type: 'hello', version: LINK_VERSION, site: this.opts.site, edgeId: this.opts.edgeId, credit: this.opts.window, features: 0 }));
      const hello = await this.withTimeout(this.readFrame(), this.opts.helloTimeoutMs ?? 15000);
      if (hello.type !== 'hello') throw new LinkHandshakeError(`peer sent ${hello.type} before HELLO`);
      if (hello.version !== LINK_VERSION) throw new LinkHandshakeError(`peer speaks link version ${hello.version}, this edge speaks ${LINK_VERSION}: upgrade the older edge`);
      this.peer = { site: hello.site, edgeId: hello.edgeId };
      this.sendCredit = hello.credit;
      this.emit('ready', this.peer);
      for (;;) {
        const msg = await this.readFrame();
        if (msg.type === 'credit') {
          this.sendCredit += msg.bytes;
          this.emit('writable');
          continue;
        }
        const cost = creditCost(msg);
        const done = this.opts.onMessage(msg, this);
        if (cost > 0) {
          if (done instanceof Promise) done.then(() => this.returnCredit(cost), () => this.returnCredit(cost));
          else this.returnCredit(cost);
        } else if (done instanceof Promise) {
          done.catch((err: unknown) => this.emit('handler-error', err));
        }
      }
    } catch (err) {
      this.closedErr = err instanceof Error ? err : new Error(String(err));
      if (!(err instanceof StreamClosedError)) this.emit('protocol-error', this.closedErr);
    } finally {
      if (!this.closedErr) this.closedErr = new StreamClosedError();
      this.stream.destroy();
      this.emit('close', this.closedErr);
    }
  }

  /** Send a control frame (not credited). Returns false when the socket wants a pause. */
  send(msg: LinkMessage): boolean {
    if (this.closedErr) return false;
    return this.write(encodeMessage(msg));
  }

  /** Send an already encoded control frame (not credited). */
  sendFrame(frame: Buffer): boolean {
    if (this.closedErr) return false;
    return this.write(frame);
  }

  /** Whether a chunk frame of `cost` bytes may go now. */
  canSend(cost: number): boolean {
    return !this.closedErr && this.sendCredit >= cost;
  }

  /** Send a credited frame; the caller checked canSend(). */
  sendCredited(frame: Buffer, cost: number): boolean {
    this.sendCredit -= cost;
    return this.write(frame);
  }

  close(): void {
    this.stream.destroy();
  }

  private write(buf: Buffer): boolean {
    this.bytesOut += buf.length;
    return this.stream.write(buf);
  }

  private returnCredit(cost: number): void {
    if (this.closedErr) return;
    this.pendingGrant += cost;
    // Batch grants: a quarter window at a time keeps CREDIT frames rare.
    if (this.pendingGrant >= this.opts.window / 4) {
      this.send({ type: 'credit', bytes: this.pendingGrant });
      this.pendingGrant = 0;
    }
  }

  private async readFrame(): Promise<LinkMessage> {
    const head = await this.reader.read(FRAME_HEADER_SIZE);
    const len = framePayloadLength(head);
    const payload = len > 0 ? await this.reader.read(len) : Buffer.alloc(0);
    this.bytesIn += FRAME_HEADER_SIZE + len;
    return decodePayload(head.readUInt8(0), head.readUInt8(1), payload);
  }

  private withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
    let timer: NodeJS.Timeout;
    return Promise.race([
      p,
      new Promise<T>((_, reject) => {
        timer = setTimeout(() => {
          this.stream.destroy();
          reject(new LinkHandshakeError(`no HELLO from the peer within ${ms} ms`));
        }, ms);
      }),
    ]).finally(() => clearTimeout(timer));
  }
}
