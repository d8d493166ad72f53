// Pure, incremental codec of link frames. encodeMessage(msg) → Buffer (header + payload);
// decodeFrame(buf, off) → { msg, bytesRead } | NEED_MORE, checking the payload length against
// MAX_FRAME_PAYLOAD before anything is buffered and throwing LinkProtocolError (stable `code`)
// on malformed input. No I/O here.

import {
  DATA_KEY_SIZE,
  FRAME_HEADER_SIZE,
  JOURNAL_ID_SIZE,
  MAX_CHUNKS_PER_FETCH,
  MAX_EPOCH_EXTENT,
  MAX_FRAME_PAYLOAD,
  MAX_STRING,
  MSG,
  SIGNATURE_SIZE,
  type Priority,
} from './protocol.js';

export const NEED_MORE = Symbol('NEED_MORE');
export type Decoded<T> = { msg: T; bytesRead: number } | typeof NEED_MORE;

export class LinkProtocolError extends Error {
  readonly code: 'SPW_ERR_LINK_PROTOCOL' | 'SPW_ERR_LINK_TOO_BIG';
  constructor(code: 'SPW_ERR_LINK_PROTOCOL' | 'SPW_ERR_LINK_TOO_BIG', message: string) {
    super(message);
    this.name = 'LinkProtocolError';
    this.code = code;
  }
}

/** A run of consecutive chunk indices. */
export interface ChunkRange {
  start: number;
  count: number;
}

export type LinkMessage =
  | { type: 'hello'; version: number; site: string; edgeId: string; credit: number; features: number }
  | { type: 'error'; reqId: number; code: number; message: string }
  | { type: 'open'; reqId: number; volume: string }
  | { type: 'opened'; reqId: number; volume: string; handle: number; size: number; chunkSize: number; family: string; dataKey: Buffer }
  // `token` of FETCH: the requester's cache fill token when it asked (see cache.fillToken). A
  // chunk the owner pushes because of that request carries it back (I5: a pushed chunk read
  // before an invalidation the requester made later is never cached). 0 in answers to a request.
  | { type: 'fetch'; handle: number; priority: Priority; token: number; ranges: ChunkRange[] }
  | { type: 'chunk'; handle: number; index: number; priority: Priority; pushed: boolean; token: number; codec: number; rawLength: number; signature: Buffer; payload: Buffer }
  | { type: 'chunk-sig'; handle: number; index: number; priority: Priority; pushed: boolean; token: number; rawLength: number; signature: Buffer }
  | { type: 'chunk-zero'; handle: number; index: number; priority: Priority; pushed: boolean; token: number }
  | { type: 'need-data'; handle: number; index: number; priority: Priority }
  | { type: 'cancel'; handle: number; priority: Priority; ranges: ChunkRange[] }
  | { type: 'credit'; bytes: number }
  | { type: 'metrics-request'; reqId: number }
  | { type: 'metrics'; reqId: number; json: string }
  | { type: 'ping'; nonce: number }
  | { type: 'pong'; nonce: number }
  | { type: 'close-volume'; handle: number }
  // write-back: the remote edge (sender) ships batches of sealed epochs of one journal to the
  // origin (receiver), which applies each batch atomically and answers EPOCH_ACK.
  | { type: 'epoch-query'; reqId: number; handle: number; journalId: Buffer }
  | { type: 'epoch-state'; reqId: number; handle: number; journalId: Buffer; appliedSeq: number }
  | { type: 'epoch-begin'; handle: number; batch: number; journalId: Buffer; firstSeq: number; lastSeq: number; extents: number; bytes: number }
  | { type: 'epoch-data'; handle: number; batch: number; offset: number; length: number; zero: boolean; codec: number; payload: Buffer }
  | { type: 'epoch-end'; handle: number; batch: number; digest: Buffer }
  | { type: 'epoch-ack'; handle: number; batch: number; status: number; appliedSeq: number; message: string };

export type LinkMessageType = LinkMessage['type'];

/** Whether a message counts against the receiver's credit (it carries chunk data). */
export function isCredited(msg: LinkMessage): boolean {
  return msg.type === 'chunk' || msg.type === 'epoch-data';
}
export function creditCost(msg: LinkMessage): number {
  if (msg.type === 'chunk') return FRAME_HEADER_SIZE + 64 + msg.payload.length;
  if (msg.type === 'epoch-data') return FRAME_HEADER_SIZE + 24 + msg.payload.length;
  return 0;
}

/** Digest size of EPOCH_END (SHA-256 over the batch's extents, see writeback/batch.ts). */
export const EPOCH_DIGEST_SIZE = 32;

// ------------------------------------------------------------------------------------ writer

class Writer {
  private parts: Buffer[] = [];
  private len = 0;
  u8(v: number): this {
    const b = Buffer.allocUnsafe(1);
    b.writeUInt8(v, 0);
    return this.push(b);
  }
  u16(v: number): this {
    const b = Buffer.allocUnsafe(2);
    b.writeUInt16BE(v, 0);
    return this.push(b);
  }
  u32(v: number): this {
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32BE(v >>> 0, 0);
    return this.push(b);
  }
  u64(v: number): this {
    const b = Buffer.allocUnsafe(8);
    b.writeBigUInt64BE(BigInt(v), 0);
    return this.push(b);
  }
  str(s: string): this {
    const b = Buffer.from(s, 'utf8');
    if (b.length > MAX_STRING) throw new LinkProtocolError('SPW_ERR_LINK_TOO_BIG', `string of ${b.length} bytes exceeds ${MAX_STRING}`);
    return this.u16(b.length).push(b);
  }
  bytes(b: Buffer): this {
    return this.push(b);
  }
  ranges(r: ChunkRange[]): this {
    if (r.length > MAX_CHUNKS_PER_FETCH) throw new LinkProtocolError('SPW_ERR_LINK_TOO_BIG', `${r.length} ranges exceed ${MAX_CHUNKS_PER_FETCH}`);
    this.u16(r.length);
    for (const x of r) this.u64(x.start).u32(x.count);
    return this;
  }
  frame(type: number, flags = 0): Buffer {
    if (this.len > MAX_FRAME_PAYLOAD) throw new LinkProtocolError('SPW_ERR_LINK_TOO_BIG', `frame payload of ${this.len} bytes exceeds ${MAX_FRAME_PAYLOAD}`);
    const h = Buffer.allocUnsafe(FRAME_HEADER_SIZE);
    h.writeUInt8(type, 0);
    h.writeUInt8(flags, 1);
    h.writeUInt16BE(0, 2);
    h.writeUInt32BE(this.len, 4);
    return Buffer.concat([h, ...this.parts], FRAME_HEADER_SIZE + this.len);
  }
  private push(b: Buffer): this {
    this.parts.push(b);
    this.len += b.length;
    return this;
  }
}

const FLAG_PUSHED = 1;
const FLAG_ZERO = 1;

export function encodeMessage(m: LinkMessage): Buffer {
  const w = new Writer();
  switch (m.type) {
    case 'hello':
      return w.u16(m.version).str(m.site).str(m.edgeId).u32(m.credit).u32(m.features).frame(MSG.HELLO);
    case 'error':
      return w.u32(m.reqId).u16(m.code).str(m.message.slice(0, 512)).frame(MSG.ERROR);
    case 'open':
      return w.u32(m.reqId).str(m.volume).frame(MSG.OPEN);
    case 'opened':
      if (m.dataKey.length !== DATA_KEY_SIZE) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', 'data key must be 32 bytes');
      return w.u32(m.reqId).str(m.volume).u32(m.handle).u64(m.size).u32(m.chunkSize).str(m.family).bytes(m.dataKey).frame(MSG.OPENED);
    case 'fetch':
      return w.u32(m.handle).u8(m.priority).u64(m.token).ranges(m.ranges).frame(MSG.FETCH);
    case 'chunk':
      checkSig(m.signature);
      return w.u32(m.handle).u64(m.index).u8(m.priority).u64(m.token).u8(m.codec).u32(m.rawLength).bytes(m.signature).bytes(m.payload).frame(MSG.CHUNK, m.pushed ? FLAG_PUSHED : 0);
    case 'chunk-sig':
      checkSig(m.signature);
      return w.u32(m.handle).u64(m.index).u8(m.priority).u64(m.token).u32(m.rawLength).bytes(m.signature).frame(MSG.CHUNK_SIG, m.pushed ? FLAG_PUSHED : 0);
    case 'chunk-zero':
      return w.u32(m.handle).u64(m.index).u8(m.priority).u64(m.token).frame(MSG.CHUNK_ZERO, m.pushed ? FLAG_PUSHED : 0);
    case 'need-data':
      return w.u32(m.handle).u64(m.index).u8(m.priority).frame(MSG.NEED_DATA);
    case 'cancel':
      return w.u32(m.handle).u8(m.priority).ranges(m.ranges).frame(MSG.CANCEL);
    case 'credit':
      return w.u32(m.bytes).frame(MSG.CREDIT);
    case 'metrics-request':
      return w.u32(m.reqId).frame(MSG.METRICS_REQUEST);
    case 'metrics': {
      const j = Buffer.from(m.json, 'utf8');
      return w.u32(m.reqId).u32(j.length).bytes(j).frame(MSG.METRICS);
    }
    case 'ping':
      return w.u32(m.nonce).frame(MSG.PING);
    case 'pong':
      return w.u32(m.nonce).frame(MSG.PONG);
    case 'close-volume':
      return w.u32(m.handle).frame(MSG.CLOSE_VOLUME);
    case 'epoch-query':
      checkJournalId(m.journalId);
      return w.u32(m.reqId).u32(m.handle).bytes(m.journalId).frame(MSG.EPOCH_QUERY);
    case 'epoch-state':
      checkJournalId(m.journalId);
      return w.u32(m.reqId).u32(m.handle).bytes(m.journalId).u64(m.appliedSeq).frame(MSG.EPOCH_STATE);
    case 'epoch-begin':
      checkJournalId(m.journalId);
      return w.u32(m.handle).u32(m.batch).bytes(m.journalId).u64(m.firstSeq).u64(m.lastSeq).u32(m.extents).u64(m.bytes).frame(MSG.EPOCH_BEGIN);
    case 'epoch-data':
      if (m.length > MAX_EPOCH_EXTENT || m.length === 0) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', `epoch extent of ${m.length} bytes must be 1..${MAX_EPOCH_EXTENT}`);
      if (m.zero && m.payload.length !== 0) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', 'a zero extent carries no payload');
      return w.u32(m.handle).u32(m.batch).u64(m.offset).u32(m.length).u8(m.codec).bytes(m.payload).frame(MSG.EPOCH_DATA, m.zero ? FLAG_ZERO : 0);
    case 'epoch-end':
      if (m.digest.length !== EPOCH_DIGEST_SIZE) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', `epoch digest must be ${EPOCH_DIGEST_SIZE} bytes`);
      return w.u32(m.handle).u32(m.batch).bytes(m.digest).frame(MSG.EPOCH_END);
    case 'epoch-ack':
      return w.u32(m.handle).u32(m.batch).u8(m.status).u64(m.appliedSeq).str(m.message.slice(0, 512)).frame(MSG.EPOCH_ACK);
  }
}

function checkJournalId(id: Buffer): void {
  if (id.length !== JOURNAL_ID_SIZE) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', `journal id must be ${JOURNAL_ID_SIZE} bytes`);
}

function checkSig(sig: Buffer): void {
  if (sig.length !== SIGNATURE_SIZE) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', `signature must be ${SIGNATURE_SIZE} bytes`);
}

// ------------------------------------------------------------------------------------ reader

class Reader {
  private pos = 0;
  constructor(
    private readonly b: Buffer,
    private readonly what: string,
  ) {}
  private need(n: number): void {
    if (this.b.length - this.pos < n) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', `${this.what} frame is truncated`);
  }
  u8(): number {
    this.need(1);
    return this.b.readUInt8(this.pos++);
  }
  u16(): number {
    this.need(2);
    const v = this.b.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const v = this.b.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  u64(): number {
    this.need(8);
    const v = this.b.readBigUInt64BE(this.pos);
    this.pos += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', `${this.what}: 64-bit value out of range`);
    return Number(v);
  }
  str(): string {
    const n = this.u16();
    if (n > MAX_STRING) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', `${this.what}: string of ${n} bytes exceeds ${MAX_STRING}`);
    this.need(n);
    const s = this.b.toString('utf8', this.pos, this.pos + n);
    this.pos += n;
    return s;
  }
  bytes(n: number): Buffer {
    this.need(n);
    const s = this.b.subarray(this.pos, this.pos + n);
    this.pos += n;
    return s;
  }
  rest(): Buffer {
    const s = this.b.subarray(this.pos);
    this.pos = this.b.length;
    return s;
  }
  priority(): Priority {
    const p = this.u8();
    if (p > 3) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', `${this.what}: priority ${p} is not 0-3`);
    return p as Priority;
  }
  ranges(): ChunkRange[] {
    const n = this.u16();
    if (n > MAX_CHUNKS_PER_FETCH) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', `${this.what}: ${n} ranges exceed ${MAX_CHUNKS_PER_FETCH}`);
    const out: ChunkRange[] = [];
    for (let i = 0; i < n; i++) out.push({ start: this.u64(), count: this.u32() });
    return out;
  }
  done(): void {
    if (this.pos !== this.b.length) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', `${this.what} frame has ${this.b.length - this.pos} trailing bytes`);
  }
}

export function decodeFrame(buf: Buffer, off: number): Decoded<LinkMessage> {
  if (buf.length - off < FRAME_HEADER_SIZE) return NEED_MORE;
  const type = buf.readUInt8(off);
  const flags = buf.readUInt8(off + 1);
  const length = buf.readUInt32BE(off + 4);
  if (length > MAX_FRAME_PAYLOAD) throw new LinkProtocolError('SPW_ERR_LINK_TOO_BIG', `frame of ${length} bytes exceeds ${MAX_FRAME_PAYLOAD}`);
  if (buf.length - off < FRAME_HEADER_SIZE + length) return NEED_MORE;
  const payload = buf.subarray(off + FRAME_HEADER_SIZE, off + FRAME_HEADER_SIZE + length);
  return { msg: decodePayload(type, flags, payload), bytesRead: FRAME_HEADER_SIZE + length };
}

/** Payload length announced by a frame header, for runners that read header then payload. */
export function framePayloadLength(header: Buffer): number {
  const length = header.readUInt32BE(4);
  if (length > MAX_FRAME_PAYLOAD) throw new LinkProtocolError('SPW_ERR_LINK_TOO_BIG', `frame of ${length} bytes exceeds ${MAX_FRAME_PAYLOAD}`);
  return length;
}

export function decodePayload(type: number, flags: number, payload: Buffer): LinkMessage {
  const pushed = (flags & FLAG_PUSHED) !== 0;
  let m: LinkMessage;
  switch (type) {
    case MSG.HELLO: {
      const r = new Reader(payload, 'HELLO');
      m = { type: 'hello', version: r.u16(), site: r.str(), edgeId: r.str(), credit: r.u32(), features: r.u32() };
      r.done();
      return m;
    }
    case MSG.ERROR: {
      const r = new Reader(payload, 'ERROR');
      m = { type: 'error', reqId: r.u32(), code: r.u16(), message: r.str() };
      r.done();
      return m;
    }
    case MSG.OPEN: {
      const r = new Reader(payload, 'OPEN');
      m = { type: 'open', reqId: r.u32(), volume: r.str() };
      r.done();
      return m;
    }
    case MSG.OPENED: {
      const r = new Reader(payload, 'OPENED');
      m = { type: 'opened', reqId: r.u32(), volume: r.str(), handle: r.u32(), size: r.u64(), chunkSize: r.u32(), family: r.str(), dataKey: Buffer.from(r.bytes(DATA_KEY_SIZE)) };
      r.done();
      return m;
    }
    case MSG.FETCH: {
      const r = new Reader(payload, 'FETCH');
      m = { type: 'fetch', handle: r.u32(), priority: r.priority(), token: r.u64(), ranges: r.ranges() };
      r.done();
      return m;
    }
    case MSG.CHUNK: {
      const r = new Reader(payload, 'CHUNK');
      const handle = r.u32();
      const index = r.u64();
      const priority = r.priority();
      const token = r.u64();
      const codec = r.u8();
      const rawLength = r.u32();
      const signature = r.bytes(SIGNATURE_SIZE);
      return { type: 'chunk', handle, index, priority, pushed, token, codec, rawLength, signature, payload: r.rest() };
    }
    case MSG.CHUNK_SIG: {
      const r = new Reader(payload, 'CHUNK_SIG');
      m = { type: 'chunk-sig', handle: r.u32(), index: r.u64(), priority: r.priority(), pushed, token: r.u64(), rawLength: r.u32(), signature: r.bytes(SIGNATURE_SIZE) };
      r.done();
      return m;
    }
    case MSG.CHUNK_ZERO: {
      const r = new Reader(payload, 'CHUNK_ZERO');
      m = { type: 'chunk-zero', handle: r.u32(), index: r.u64(), priority: r.priority(), pushed, token: r.u64() };
      r.done();
      return m;
    }
    case MSG.NEED_DATA: {
      const r = new Reader(payload, 'NEED_DATA');
      m = { type: 'need-data', handle: r.u32(), index: r.u64(), priority: r.priority() };
      r.done();
      return m;
    }
    case MSG.CANCEL: {
      const r = new Reader(payload, 'CANCEL');
      m = { type: 'cancel', handle: r.u32(), priority: r.priority(), ranges: r.ranges() };
      r.done();
      return m;
    }
    case MSG.CREDIT: {
      const r = new Reader(payload, 'CREDIT');
      m = { type: 'credit', bytes: r.u32() };
      r.done();
      return m;
    }
    case MSG.METRICS_REQUEST: {
      const r = new Reader(payload, 'METRICS_REQUEST');
      m = { type: 'metrics-request', reqId: r.u32() };
      r.done();
      return m;
    }
    case MSG.METRICS: {
      const r = new Reader(payload, 'METRICS');
      const reqId = r.u32();
      const n = r.u32();
      m = { type: 'metrics', reqId, json: r.bytes(n).toString('utf8') };
      r.done();
      return m;
    }
    case MSG.PING:
    case MSG.PONG: {
      const r = new Reader(payload, type === MSG.PING ? 'PING' : 'PONG');
      m = { type: type === MSG.PING ? 'ping' : 'pong', nonce: r.u32() };
      r.done();
      return m;
    }
    case MSG.CLOSE_VOLUME: {
      const r = new Reader(payload, 'CLOSE_VOLUME');
      m = { type: 'close-volume', handle: r.u32() };
      r.done();
      return m;
    }
    case MSG.EPOCH_QUERY: {
      const r = new Reader(payload, 'EPOCH_QUERY');
      m = { type: 'epoch-query', reqId: r.u32(), handle: r.u32(), journalId: Buffer.from(r.bytes(JOURNAL_ID_SIZE)) };
      r.done();
      return m;
    }
    case MSG.EPOCH_STATE: {
      const r = new Reader(payload, 'EPOCH_STATE');
      m = { type: 'epoch-state', reqId: r.u32(), handle: r.u32(), journalId: Buffer.from(r.bytes(JOURNAL_ID_SIZE)), appliedSeq: r.u64() };
      r.done();
      return m;
    }
    case MSG.EPOCH_BEGIN: {
      const r = new Reader(payload, 'EPOCH_BEGIN');
      m = { type: 'epoch-begin', handle: r.u32(), batch: r.u32(), journalId: Buffer.from(r.bytes(JOURNAL_ID_SIZE)), firstSeq: r.u64(), lastSeq: r.u64(), extents: r.u32(), bytes: r.u64() };
      r.done();
      if (m.firstSeq < 1 || m.lastSeq < m.firstSeq) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', `EPOCH_BEGIN: epochs ${m.firstSeq}..${m.lastSeq} are not a range starting at 1 or later`);
      return m;
    }
    case MSG.EPOCH_DATA: {
      const r = new Reader(payload, 'EPOCH_DATA');
      const zero = (flags & FLAG_ZERO) !== 0;
      m = { type: 'epoch-data', handle: r.u32(), batch: r.u32(), offset: r.u64(), length: r.u32(), zero, codec: r.u8(), payload: r.rest() };
      if (m.length === 0 || m.length > MAX_EPOCH_EXTENT) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', `EPOCH_DATA: extent of ${m.length} bytes must be 1..${MAX_EPOCH_EXTENT}`);
      if (zero && m.payload.length !== 0) throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', 'EPOCH_DATA: a zero extent carries no payload');
      return m;
    }
    case MSG.EPOCH_END: {
      const r = new Reader(payload, 'EPOCH_END');
      m = { type: 'epoch-end', handle: r.u32(), batch: r.u32(), digest: Buffer.from(r.bytes(EPOCH_DIGEST_SIZE)) };
      r.done();
      return m;
    }
    case MSG.EPOCH_ACK: {
      const r = new Reader(payload, 'EPOCH_ACK');
      m = { type: 'epoch-ack', handle: r.u32(), batch: r.u32(), status: r.u8(), appliedSeq: r.u64(), message: r.str() };
      r.done();
      return m;
    }
    default:
      throw new LinkProtocolError('SPW_ERR_LINK_PROTOCOL', `unknown frame type ${type}`);
  }
}
