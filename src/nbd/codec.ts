// Pure, incremental NBD codec. Decoders take (buf, offset) and return the message with the
// number of bytes consumed, or NEED_MORE; they check lengths before anything is buffered and
// throw NbdProtocolError on malformed input. Encoders return Buffers (or write into one).
// No I/O here: server.ts and client.ts are the runners.

import {
  IHAVEOPT,
  INFO,
  MAX_OPTION_LENGTH,
  MAX_STRING,
  NBDMAGIC,
  OPTION_HEADER_SIZE,
  OPTION_REPLY_HEADER_SIZE,
  OPTION_REPLY_MAGIC,
  REQUEST_MAGIC,
  REQUEST_SIZE,
  SIMPLE_REPLY_MAGIC,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_HEADER_SIZE,
  STRUCTURED_REPLY_MAGIC,
} from './protocol.js';

export const NEED_MORE = Symbol('NEED_MORE');
export type NeedMore = typeof NEED_MORE;
export type Decoded<T> = { msg: T; bytesRead: number } | NeedMore;

export type NbdProtocolErrorCode =
  | 'SPW_ERR_NBD_BAD_MAGIC'
  | 'SPW_ERR_NBD_TOO_BIG'
  | 'SPW_ERR_NBD_MALFORMED';

/** Malformed bytes on the wire. The runner decides whether the connection survives. */
export class NbdProtocolError extends Error {
  readonly code: NbdProtocolErrorCode;
  constructor(code: NbdProtocolErrorCode, message: string) {
    super(message);
    this.name = 'NbdProtocolError';
    this.code = code;
  }
}

function malformed(message: string): NbdProtocolError {
  return new NbdProtocolError('SPW_ERR_NBD_MALFORMED', message);
}

// ---------------------------------------------------------------------------------------------
// Handshake (fixed newstyle)

export function encodeServerGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export interface ServerGreeting {
  handshakeFlags: number;
}
export function decodeServerGreeting(buf: Buffer, off: number): Decoded<ServerGreeting> {
  if (buf.length - off < 18) return NEED_MORE;
  if (buf.readBigUInt64BE(off) !== NBDMAGIC) throw new NbdProtocolError('SPW_ERR_NBD_BAD_MAGIC', 'not an NBD server (bad NBDMAGIC)');
  const second = buf.readBigUInt64BE(off + 8);
  if (second !== IHAVEOPT) {
    throw new NbdProtocolError('SPW_ERR_NBD_BAD_MAGIC', 'server does not speak newstyle negotiation (oldstyle servers are not supported)');
  }
  return { msg: { handshakeFlags: buf.readUInt16BE(off + 16) }, bytesRead: 18 };
}

export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}
export function decodeClientFlags(buf: Buffer, off: number): Decoded<number> {
  if (buf.length - off < 4) return NEED_MORE;
  return { msg: buf.readUInt32BE(off), bytesRead: 4 };
}

// ---------------------------------------------------------------------------------------------
// Options (client → server)

export interface OptionHeader {
  option: number;
  length: number;
}
/** Header only: the runner then reads `length` bytes of data, or discards them when too big. */
export function decodeOptionHeader(buf: Buffer, off: number): Decoded<OptionHeader> {
  if (buf.length - off < OPTION_HEADER_SIZE) return NEED_MORE;
  if (buf.readBigUInt64BE(off) !== IHAVEOPT) throw new NbdProtocolError('SPW_ERR_NBD_BAD_MAGIC', 'option without IHAVEOPT magic');
  return { msg: { option: buf.readUInt32BE(off + 8), length: buf.readUInt32BE(off + 12) }, bytesRead: OPTION_HEADER_SIZE };
}

export interface OptionRequest {
  option: number;
  data: Buffer;
}
/** Whole option, for callers that want it in one piece. Refuses oversize options early. */
export function decodeOption(buf: Buffer, off: number): Decoded<OptionRequest> {
  const h = decodeOptionHeader(buf, off);
  if (h === NEED_MORE) return NEED_MORE;
  if (h.msg.length > MAX_OPTION_LENGTH) {
    throw new NbdProtocolError('SPW_ERR_NBD_TOO_BIG', `option ${h.msg.option} payload of ${h.msg.length} bytes exceeds ${MAX_OPTION_LENGTH}`);
  }
  const total = OPTION_HEADER_SIZE + h.msg.length;
  if (buf.length - off < total) return NEED_MORE;
  return { msg: { option: h.msg.option, data: buf.subarray(off + OPTION_HEADER_SIZE, off + total) }, bytesRead: total };
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, OPTION_HEADER_SIZE);
  return b;
}

/** Cursor over an option payload; every read checks bounds and throws NbdProtocolError. */
class PayloadReader {
  private pos = 0;
  constructor(private readonly data: Buffer) {}
  u16(): number {
    this.need(2);
    const v = this.data.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const v = this.data.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  string(len: number): string {
    if (len > MAX_STRING) throw malformed(`string of ${len} bytes exceeds ${MAX_STRING}`);
    this.need(len);
    const s = this.data.toString('utf8', this.pos, this.pos + len);
    this.pos += len;
    return s;
  }
  done(): void {
    if (this.pos !== this.data.length) throw malformed(`option payload has ${this.data.length - this.pos} trailing bytes`);
  }
  private need(n: number): void {
    if (this.data.length - this.pos < n) throw malformed('option payload is truncated');
  }
}

export interface GoInfoRequest {
  name: string;
  infos: number[];
}
export function parseGoInfo(data: Buffer): GoInfoRequest {
  const r = new PayloadReader(data);
  const name = r.string(r.u32());
  const n = r.u16();
  const infos: number[] = [];
  for (let i = 0; i < n; i++) infos.push(r.u16());
  r.done();
  return { name, infos };
}
export function encodeGoInfo(req: GoInfoRequest): Buffer {
  const name = Buffer.from(req.name, 'utf8');
  const b = Buffer.allocUnsafe(4 + name.length + 2 + 2 * req.infos.length);
  b.writeUInt32BE(name.length, 0);
  name.copy(b, 4);
  b.writeUInt16BE(req.infos.length, 4 + name.length);
  req.infos.forEach((t, i) => b.writeUInt16BE(t, 6 + name.length + 2 * i));
  return b;
}

export interface MetaContextRequest {
  name: string;
  queries: string[];
}
export function parseMetaContext(data: Buffer): MetaContextRequest {
  const r = new PayloadReader(data);
  const name = r.string(r.u32());
  const n = r.u32();
  if (n > MAX_OPTION_LENGTH / 4) throw malformed(`${n} meta context queries is more than the payload can hold`);
  const queries: string[] = [];
  for (let i = 0; i < n; i++) queries.push(r.string(r.u32()));
  r.done();
  return { name, queries };
}
export function encodeMetaContext(req: MetaContextRequest): Buffer {
  const parts: Buffer[] = [];
  const name = Buffer.from(req.name, 'utf8');
  const head = Buffer.allocUnsafe(4);
  head.writeUInt32BE(name.length, 0);
  parts.push(head, name);
  const count = Buffer.allocUnsafe(4);
  count.writeUInt32BE(req.queries.length, 0);
  parts.push(count);
  for (const q of req.queries) {
    const qb = Buffer.from(q, 'utf8');
    const l = Buffer.allocUnsafe(4);
    l.writeUInt32BE(qb.length, 0);
    parts.push(l, qb);
  }
  return Buffer.concat(parts);
}

// ---------------------------------------------------------------------------------------------
// Option replies (server → client)

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, OPTION_REPLY_HEADER_SIZE);
  return b;
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}
export function decodeOptionReply(buf: Buffer, off: number): Decoded<OptionReply> {
  if (buf.length - off < OPTION_REPLY_HEADER_SIZE) return NEED_MORE;
  if (buf.readBigUInt64BE(off) !== OPTION_REPLY_MAGIC) throw new NbdProtocolError('SPW_ERR_NBD_BAD_MAGIC', 'option reply with bad magic');
  const length = buf.readUInt32BE(off + 16);
  if (length > MAX_OPTION_LENGTH) throw new NbdProtocolError('SPW_ERR_NBD_TOO_BIG', `option reply of ${length} bytes exceeds ${MAX_OPTION_LENGTH}`);
  const total = OPTION_REPLY_HEADER_SIZE + length;
  if (buf.length - off < total) return NEED_MORE;
  return {
    msg: { option: buf.readUInt32BE(off + 8), type: buf.readUInt32BE(off + 12), data: buf.subarray(off + OPTION_REPLY_HEADER_SIZE, off + total) },
    bytesRead: total,
  };
}

export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(INFO.EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}
export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(INFO.BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}
export function encodeInfoString(type: number, text: string): Buffer {
  const s = Buffer.from(text, 'utf8');
  const b = Buffer.allocUnsafe(2 + s.length);
  b.writeUInt16BE(type, 0);
  s.copy(b, 2);
  return b;
}

export type InfoReply =
  | { type: typeof INFO.EXPORT; size: number; flags: number }
  | { type: typeof INFO.NAME; name: string }
  | { type: typeof INFO.DESCRIPTION; description: string }
  | { type: typeof INFO.BLOCK_SIZE; minimum: number; preferred: number; maximum: number }
  | { type: -1; raw: number };
export function parseInfoReply(data: Buffer): InfoReply {
  if (data.length < 2) throw malformed('NBD_REP_INFO shorter than its type');
  const type = data.readUInt16BE(0);
  switch (type) {
    case INFO.EXPORT:
      if (data.length !== 12) throw malformed('NBD_INFO_EXPORT must be 12 bytes');
      return { type, size: Number(data.readBigUInt64BE(2)), flags: data.readUInt16BE(10) };
    case INFO.NAME:
      return { type, name: data.toString('utf8', 2) };
    case INFO.DESCRIPTION:
      return { type, description: data.toString('utf8', 2) };
    case INFO.BLOCK_SIZE:
      if (data.length !== 14) throw malformed('NBD_INFO_BLOCK_SIZE must be 14 bytes');
      return { type, minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) };
    default:
      return { type: -1, raw: type };
  }
}

export function encodeServerEntry(name: string, description = ''): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}
export function parseServerEntry(data: Buffer): { name: string; description: string } {
  if (data.length < 4) throw malformed('NBD_REP_SERVER shorter than its name length');
  const len = data.readUInt32BE(0);
  if (len > data.length - 4) throw malformed('NBD_REP_SERVER name overruns the reply');
  return { name: data.toString('utf8', 4, 4 + len), description: data.toString('utf8', 4 + len) };
}

export function encodeMetaContextReply(id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}
export function parseMetaContextReply(data: Buffer): { id: number; name: string } {
  if (data.length < 4) throw malformed('NBD_REP_META_CONTEXT shorter than its id');
  return { id: data.readUInt32BE(0), name: data.toString('utf8', 4) };
}

/** Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}
export function decodeExportNameReply(buf: Buffer, off: number, noZeroes: boolean): Decoded<{ size: number; flags: number }> {
  const need = noZeroes ? 10 : 134;
  if (buf.length - off < need) return NEED_MORE;
  return { msg: { size: Number(buf.readBigUInt64BE(off)), flags: buf.readUInt16BE(off + 8) }, bytesRead: need };
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests (client → server)

export interface RequestHeader {
  flags: number;
  type: number;
  handle: bigint;
  /** may exceed 2^53 on malformed input; validation rejects it against the size. */
  offset: number;
  length: number;
}
export function decodeRequest(buf: Buffer, off: number): Decoded<RequestHeader> {
  if (buf.length - off < REQUEST_SIZE) return NEED_MORE;
  const magic = buf.readUInt32BE(off);
  if (magic !== REQUEST_MAGIC) throw new NbdProtocolError('SPW_ERR_NBD_BAD_MAGIC', `request magic 0x${magic.toString(16)} is not 0x${REQUEST_MAGIC.toString(16)}`);
  return {
    msg: {
      flags: buf.readUInt16BE(off + 4),
      type: buf.readUInt16BE(off + 6),
      handle: buf.readBigUInt64BE(off + 8),
      offset: Number(buf.readBigUInt64BE(off + 16)),
      length: buf.readUInt32BE(off + 24),
    },
    bytesRead: REQUEST_SIZE,
  };
}
export function encodeRequest(buf: Buffer, off: number, req: RequestHeader): number {
  buf.writeUInt32BE(REQUEST_MAGIC, off);
  buf.writeUInt16BE(req.flags, off + 4);
  buf.writeUInt16BE(req.type, off + 6);
  buf.writeBigUInt64BE(req.handle, off + 8);
  buf.writeBigUInt64BE(BigInt(req.offset), off + 16);
  buf.writeUInt32BE(req.length >>> 0, off + 24);
  return REQUEST_SIZE;
}

// ---------------------------------------------------------------------------------------------
// Transmission: replies (server → client)

export function encodeSimpleReply(buf: Buffer, off: number, error: number, handle: bigint): number {
  buf.writeUInt32BE(SIMPLE_REPLY_MAGIC, off);
  buf.writeUInt32BE(error, off + 4);
  buf.writeBigUInt64BE(handle, off + 8);
  return SIMPLE_REPLY_SIZE;
}

export function encodeStructuredHeader(buf: Buffer, off: number, flags: number, type: number, handle: bigint, length: number): number {
  buf.writeUInt32BE(STRUCTURED_REPLY_MAGIC, off);
  buf.writeUInt16BE(flags, off + 4);
  buf.writeUInt16BE(type, off + 6);
  buf.writeBigUInt64BE(handle, off + 8);
  buf.writeUInt32BE(length, off + 16);
  return STRUCTURED_REPLY_HEADER_SIZE;
}

/** Payload of NBD_REPLY_TYPE_ERROR / ERROR_OFFSET. */
export function encodeErrorPayload(error: number, message: string, offset?: number): Buffer {
  let m = Buffer.from(message, 'utf8');
  if (m.length > 1024) {
    // cut on a character boundary: back off over UTF-8 continuation bytes (10xxxxxx)
    let end = 1024;
    while (end > 0 && (m[end]! & 0xc0) === 0x80) end--;
    m = m.subarray(0, end);
  }
  const b = Buffer.allocUnsafe(6 + m.length + (offset === undefined ? 0 : 8));
  b.writeUInt32BE(error, 0);
  b.writeUInt16BE(m.length, 4);
  m.copy(b, 6);
  if (offset !== undefined) b.writeBigUInt64BE(BigInt(offset), 6 + m.length);
  return b;
}

/** Payload of NBD_REPLY_TYPE_BLOCK_STATUS: context id, then (length, flags) descriptors. */
export function encodeBlockStatusPayload(contextId: number, descriptors: ReadonlyArray<{ length: number; flags: number }>): Buffer {
  const b = Buffer.allocUnsafe(4 + 8 * descriptors.length);
  b.writeUInt32BE(contextId, 0);
  descriptors.forEach((d, i) => {
    b.writeUInt32BE(d.length, 4 + 8 * i);
    b.writeUInt32BE(d.flags, 8 + 8 * i);
  });
  return b;
}

export type ReplyHeader =
  | { kind: 'simple'; error: number; handle: bigint }
  | { kind: 'structured'; flags: number; type: number; handle: bigint; length: number };

/** Decodes a reply header; `maxChunk` bounds a structured chunk's length before buffering. */
export function decodeReplyHeader(buf: Buffer, off: number, maxChunk: number): Decoded<ReplyHeader> {
  if (buf.length - off < 4) return NEED_MORE;
  const magic = buf.readUInt32BE(off);
  if (magic === SIMPLE_REPLY_MAGIC) {
    if (buf.length - off < SIMPLE_REPLY_SIZE) return NEED_MORE;
    return { msg: { kind: 'simple', error: buf.readUInt32BE(off + 4), handle: buf.readBigUInt64BE(off + 8) }, bytesRead: SIMPLE_REPLY_SIZE };
  }
  if (magic === STRUCTURED_REPLY_MAGIC) {
    if (buf.length - off < STRUCTURED_REPLY_HEADER_SIZE) return NEED_MORE;
    const length = buf.readUInt32BE(off + 16);
    if (length > maxChunk) throw new NbdProtocolError('SPW_ERR_NBD_TOO_BIG', `structured reply chunk of ${length} bytes exceeds ${maxChunk}`);
    return {
      msg: { kind: 'structured', flags: buf.readUInt16BE(off + 4), type: buf.readUInt16BE(off + 6), handle: buf.readBigUInt64BE(off + 8), length },
      bytesRead: STRUCTURED_REPLY_HEADER_SIZE,
    };
  }
  throw new NbdProtocolError('SPW_ERR_NBD_BAD_MAGIC', `reply magic 0x${magic.toString(16)} is neither simple nor structured`);
}

export function parseErrorPayload(data: Buffer, withOffset: boolean): { error: number; message: string; offset?: number } {
  if (data.length < 6) throw malformed('error chunk shorter than 6 bytes');
  const error = data.readUInt32BE(0);
  const mlen = data.readUInt16BE(4);
  if (6 + mlen + (withOffset ? 8 : 0) > data.length) throw malformed('error chunk message overruns the chunk');
  const message = data.toString('utf8', 6, 6 + mlen);
  if (withOffset) return { error, message, offset: Number(data.readBigUInt64BE(6 + mlen)) };
  return { error, message };
}

export function parseBlockStatusPayload(data: Buffer): { contextId: number; descriptors: Array<{ length: number; flags: number }> } {
  if (data.length < 12 || (data.length - 4) % 8 !== 0) throw malformed(`block status chunk of ${data.length} bytes is not 4 + 8n (n >= 1)`);
  const contextId = data.readUInt32BE(0);
  const descriptors: Array<{ length: number; flags: number }> = [];
  for (let p = 4; p < data.length; p += 8) descriptors.push({ length: data.readUInt32BE(p), flags: data.readUInt32BE(p + 4) });
  return { contextId, descriptors };
}

/** Payload of NBD_REPLY_TYPE_OFFSET_HOLE: a run of `length` zero bytes at `offset`. */
export function encodeOffsetHolePayload(offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeBigUInt64BE(BigInt(offset), 0);
  b.writeUInt32BE(length, 8);
  return b;
}
/** `offset` may exceed 2^53 on malformed input; the caller checks it against its request. */
export function parseOffsetHolePayload(data: Buffer): { offset: number; length: number } {
  if (data.length !== 12) throw malformed(`hole chunk of ${data.length} bytes is not 12`);
  return { offset: Number(data.readBigUInt64BE(0)), length: data.readUInt32BE(8) };
}

/** NBD_REPLY_TYPE_OFFSET_DATA starts with the 64-bit offset of the data that follows it. */
export const OFFSET_DATA_HEADER_SIZE = 8;
export function decodeOffsetDataHeader(buf: Buffer, off: number): Decoded<number> {
  if (buf.length - off < OFFSET_DATA_HEADER_SIZE) return NEED_MORE;
  return { msg: Number(buf.readBigUInt64BE(off)), bytesRead: OFFSET_DATA_HEADER_SIZE };
}
