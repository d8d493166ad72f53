// On-disk codec of the write-back journal (docs/journal-format.md): segment headers, the state
// file and the sealed records. Pure apart from the cipher: no I/O, no clock.
//
//   record = header (48 bytes, in the clear, authenticated) | AES-256-GCM ciphertext | tag (16)
//   header = u32 magic | u8 type | u8 flags | u16 reserved | u64 epoch | u64 offset
//            | u64 length | u32 payload length | nonce (12)
//   AAD    = journal id (16) | u64 segment (first epoch of the file) | u64 file position | header
//
// The GCM tag is the checksum: a record moved to another position, segment or journal fails
// authentication like a torn or flipped one. Every length is checked against its type before
// anything past the header is looked at, so garbage never asks for more than MAX_RECORD_SIZE.
// decodeRecord(buf, offset, ctx, position) returns the record and its size, NEED_MORE when the
// record does not fit in buf (yet), or throws JournalRecordError.

import { createCipheriv, createDecipheriv, createHmac, createSecretKey, hkdfSync, randomFillSync, type KeyObject } from 'node:crypto';

export const FORMAT_VERSION = 1;
export const ID_SIZE = 16;
export const MAC_SIZE = 16;
export const NONCE_SIZE = 12;
export const TAG_SIZE = 16;

export const SEGMENT_MAGIC = Buffer.from('SPWJSEG\0', 'latin1');
export const STATE_MAGIC = Buffer.from('SPWJSTA\0', 'latin1');
/** 'SPJR': the first bytes of every record (also what a resync scan looks for). */
export const RECORD_MAGIC = Buffer.from('SPJR', 'latin1');
const RECORD_MAGIC_U32 = RECORD_MAGIC.readUInt32BE(0);

export const SEGMENT_HEADER_SIZE = 80;
export const STATE_SIZE = 88;
export const RECORD_HEADER_SIZE = 48;
/** Largest guest write one record carries; larger writes are split. */
export const MAX_WRITE_RECORD = 1 << 20;
/** Plaintext of a SEAL: u32 ops | u32 reserved | u64 bytes | u64 sealedAt (ms). */
export const SEAL_PLAINTEXT_SIZE = 24;
export const MAX_RECORD_SIZE = RECORD_HEADER_SIZE + MAX_WRITE_RECORD + TAG_SIZE;
/** Epochs, offsets and lengths are u64 on disk but must stay exact as JS numbers. */
export const MAX_U53 = Number.MAX_SAFE_INTEGER;

export const REC = { WRITE: 1, ZERO: 2, SEAL: 3 } as const;
export type RecordType = (typeof REC)[keyof typeof REC];

export type JournalRecord =
  | { type: typeof REC.WRITE; seq: number; offset: number; data: Buffer }
  | { type: typeof REC.ZERO; seq: number; offset: number; length: number }
  /** closes epoch `seq`: how many op records it holds and the guest bytes they cover. */
  | { type: typeof REC.SEAL; seq: number; ops: number; bytes: number; sealedAt: number };

export type RecordProblem = 'header' | 'auth' | 'payload';

/** A record that is not a valid record of this segment at this position. */
export class JournalRecordError extends Error {
  readonly code = 'SPW_ERR_JOURNAL_RECORD';
  constructor(
    readonly problem: RecordProblem,
    message: string,
  ) {
    super(message);
    this.name = 'JournalRecordError';
  }
}

export const NEED_MORE = Symbol('NEED_MORE');

/** What a record is bound to besides its own header. */
export interface RecordContext {
  /** the segment's record key (segmentKey). */
  readonly key: KeyObject;
  readonly id: Buffer;
  /** first epoch seq of the segment (its file name). */
  readonly segment: number;
}

export interface RecordHeader {
  readonly type: RecordType;
  readonly seq: number;
  readonly offset: number;
  readonly length: number;
  readonly payloadLength: number;
  /** header + payload + tag */
  readonly size: number;
}

// ------------------------------------------------------------------------------- keys, MACs

const SEGMENT_KEY_INFO = Buffer.from('spillway journal segment key v1', 'utf8');
const STATE_MAC_LABEL = Buffer.from('spillway journal state v1', 'utf8');
const SEGMENT_MAC_LABEL = Buffer.from('spillway journal segment header v1', 'utf8');

/**
 * The AES-256-GCM key of one segment: HKDF-SHA256(journalKey, salt = journal id, info = label |
 * u64 segment). Every journal of a family shares the family's journal key; a key per segment
 * keeps the number of random 96-bit nonces drawn under any one key small (NIST SP 800-38D).
 */
export function segmentKey(journalKey: KeyObject, id: Buffer, segment: number): KeyObject {
  const info = Buffer.alloc(SEGMENT_KEY_INFO.length + 8);
  SEGMENT_KEY_INFO.copy(info, 0);
  writeU53(info, SEGMENT_KEY_INFO.length, segment);
  return createSecretKey(Buffer.from(hkdfSync('sha256', journalKey, id, info, 32)));
}

function mac(journalKey: KeyObject, label: Buffer, body: Buffer): Buffer {
  return createHmac('sha256', journalKey).update(label).update(body).digest().subarray(0, MAC_SIZE);
}

// --------------------------------------------------------------------------------- helpers

function writeU53(buf: Buffer, o: number, v: number): number {
  buf.writeUInt32BE(Math.floor(v / 0x1_0000_0000), o);
  buf.writeUInt32BE(v >>> 0, o + 4);
  return o + 8;
}

/** A u64 as a number, or -1 when it does not fit in 53 bits. */
function readU53(buf: Buffer, o: number): number {
  const hi = buf.readUInt32BE(o);
  if (hi > 0x1f_ffff) return -1;
  return hi * 0x1_0000_0000 + buf.readUInt32BE(o + 4);
}

/** Random nonces come from a pool refilled 4 KiB at a time (one CSPRNG call per 341 records). */
let noncePool = Buffer.alloc(0);
let nonceAt = 0;
function nextNonce(dst: Buffer, o: number): void {
  if (nonceAt + NONCE_SIZE > noncePool.length) {
    noncePool = randomFillSync(Buffer.allocUnsafe(4092));
    nonceAt = 0;
  }
  noncePool.copy(dst, o, nonceAt, nonceAt + NONCE_SIZE);
  noncePool.fill(0, nonceAt, nonceAt + NONCE_SIZE); // a nonce is handed out once
  nonceAt += NONCE_SIZE;
}

function aadOf(ctx: RecordContext, position: number, header: Buffer): Buffer {
  const aad = Buffer.allocUnsafe(ID_SIZE + 16 + RECORD_HEADER_SIZE);
  ctx.id.copy(aad, 0, 0, ID_SIZE);
  writeU53(aad, ID_SIZE, ctx.segment);
  writeU53(aad, ID_SIZE + 8, position);
  header.copy(aad, ID_SIZE + 16, 0, RECORD_HEADER_SIZE);
  return aad;
}

// --------------------------------------------------------------------------------- records

function payloadLengthOf(rec: JournalRecord): number {
  switch (rec.type) {
    case REC.WRITE:
      return rec.data.length;
    case REC.ZERO:
      return 0;
    case REC.SEAL:
      return SEAL_PLAINTEXT_SIZE;
  }
}

/** Guest bytes a record covers (0 for SEAL). */
export function guestBytesOf(rec: JournalRecord): number {
  return rec.type === REC.WRITE ? rec.data.length : rec.type === REC.ZERO ? rec.length : 0;
}

/** Size in bytes of the record encodeRecord would write. */
export function recordSize(rec: JournalRecord): number {
  return RECORD_HEADER_SIZE + payloadLengthOf(rec) + TAG_SIZE;
}

function checkHeaderFields(type: number, seq: number, offset: number, length: number, payloadLength: number): string | null {
  if (seq < 1) return `epoch ${seq} outside 1..2^53`;
  if (offset < 0 || length < 0) return 'offset or length beyond 2^53';
  switch (type) {
    case REC.WRITE:
      if (length < 1 || length > MAX_WRITE_RECORD) return `write of ${length} bytes (1..${MAX_WRITE_RECORD})`;
      if (payloadLength !== length) return `write of ${length} bytes with a payload of ${payloadLength}`;
      break;
    case REC.ZERO:
      if (length < 1) return 'zero range of 0 bytes';
      if (payloadLength !== 0) return `zero range with a payload of ${payloadLength} bytes`;
      break;
    case REC.SEAL:
      if (offset !== 0 || length !== 0) return 'seal with an offset or a length';
      if (payloadLength !== SEAL_PLAINTEXT_SIZE) return `seal with a payload of ${payloadLength} bytes`;
      break;
    default:
      return `unknown record type ${type}`;
  }
  if (offset + length > MAX_U53) return 'range ends beyond 2^53';
  return null;
}

/**
 * Write one sealed record at buf[offset..] (recordSize(rec) bytes), bound to `position`, the
 * file position it will be written at. Returns the bytes written. Throws RangeError on a
 * record that decodeRecord would refuse (callers validate first).
 */
export function encodeRecord(buf: Buffer, offset: number, rec: JournalRecord, ctx: RecordContext, position: number): number {
  const payloadLength = payloadLengthOf(rec);
  const gOffset = rec.type === REC.SEAL ? 0 : rec.offset;
  const gLength = rec.type === REC.SEAL ? 0 : guestBytesOf(rec);
  const problem = checkHeaderFields(rec.type, rec.seq, gOffset, gLength, payloadLength);
  if (problem !== null || rec.seq > MAX_U53) throw new RangeError(`journal record: ${problem ?? 'epoch beyond 2^53'}`);
  const h = buf.subarray(offset, offset + RECORD_HEADER_SIZE);
  h.writeUInt32BE(RECORD_MAGIC_U32, 0);
  h.writeUInt8(rec.type, 4);
  h.writeUInt8(0, 5);
  h.writeUInt16BE(0, 6);
  writeU53(h, 8, rec.seq);
  writeU53(h, 16, gOffset);
  writeU53(h, 24, gLength);
  h.writeUInt32BE(payloadLength, 32);
  nextNonce(h, 36);
  let plaintext: Buffer;
  if (rec.type === REC.WRITE) plaintext = rec.data;
  else if (rec.type === REC.ZERO) plaintext = Buffer.alloc(0);
  else {
    if (!Number.isInteger(rec.ops) || rec.ops < 0 || rec.ops > 0xffff_ffff) throw new RangeError(`seal of ${rec.ops} ops`);
    if (!Number.isSafeInteger(rec.bytes) || rec.bytes < 0 || !Number.isSafeInteger(rec.sealedAt) || rec.sealedAt < 0) throw new RangeError('seal bytes or time outside 0..2^53');
    plaintext = Buffer.alloc(SEAL_PLAINTEXT_SIZE);
    plaintext.writeUInt32BE(rec.ops, 0);
    writeU53(plaintext, 8, rec.bytes);
    writeU53(plaintext, 16, rec.sealedAt);
  }
  const c = createCipheriv('aes-256-gcm', ctx.key, h.subarray(36, 48), { authTagLength: TAG_SIZE });
  c.setAAD(aadOf(ctx, position, h));
  let o = offset + RECORD_HEADER_SIZE;
  o += c.update(plaintext).copy(buf, o);
  o += c.final().copy(buf, o);
  o += c.getAuthTag().copy(buf, o);
  return o - offset;
}

/**
 * The header at buf[offset..]: NEED_MORE when fewer than RECORD_HEADER_SIZE bytes are there,
 * else its fields and the record's total size. Throws JournalRecordError('header') when the
 * header cannot be one this codec writes (so nothing beyond it needs to be read).
 */
export function decodeRecordHeader(buf: Buffer, offset: number): RecordHeader | typeof NEED_MORE {
  if (buf.length - offset < RECORD_HEADER_SIZE) return NEED_MORE;
  if (buf.readUInt32BE(offset) !== RECORD_MAGIC_U32) throw new JournalRecordError('header', 'no record magic');
  const type = buf.readUInt8(offset + 4);
  if (buf.readUInt8(offset + 5) !== 0 || buf.readUInt16BE(offset + 6) !== 0) throw new JournalRecordError('header', 'reserved header bits set');
  const seq = readU53(buf, offset + 8);
  const gOffset = readU53(buf, offset + 16);
  const length = readU53(buf, offset + 24);
  const payloadLength = buf.readUInt32BE(offset + 32);
  const problem = checkHeaderFields(type, seq, gOffset, length, payloadLength);
  if (problem !== null) throw new JournalRecordError('header', problem);
  return { type: type as RecordType, seq, offset: gOffset, length, payloadLength, size: RECORD_HEADER_SIZE + payloadLength + TAG_SIZE };
}

/**
 * Decode, authenticate and decrypt the record at buf[offset..], which sits at file position
 * `position` of the segment `ctx`. Unauthenticated plaintext never leaves this function.
 */
export function decodeRecord(buf: Buffer, offset: number, ctx: RecordContext, position: number): { rec: JournalRecord; bytesRead: number } | typeof NEED_MORE {
  const h = decodeRecordHeader(buf, offset);
  if (h === NEED_MORE || buf.length - offset < h.size) return NEED_MORE;
  const header = buf.subarray(offset, offset + RECORD_HEADER_SIZE);
  const ctStart = offset + RECORD_HEADER_SIZE;
  const tagStart = ctStart + h.payloadLength;
  const d = createDecipheriv('aes-256-gcm', ctx.key, header.subarray(36, 48), { authTagLength: TAG_SIZE });
  d.setAAD(aadOf(ctx, position, header));
  d.setAuthTag(buf.subarray(tagStart, tagStart + TAG_SIZE));
  const head = d.update(buf.subarray(ctStart, tagStart));
  let plaintext: Buffer;
  try {
    const tail = d.final();
    plaintext = tail.length === 0 ? head : Buffer.concat([head, tail]);
  } catch {
    head.fill(0);
    throw new JournalRecordError('auth', 'record fails authentication (torn, damaged, moved, or another key)');
  }
  let rec: JournalRecord;
  switch (h.type) {
    case REC.WRITE:
      rec = { type: REC.WRITE, seq: h.seq, offset: h.offset, data: plaintext };
      break;
    case REC.ZERO:
      rec = { type: REC.ZERO, seq: h.seq, offset: h.offset, length: h.length };
      break;
    case REC.SEAL: {
      const ops = plaintext.readUInt32BE(0);
      const bytes = readU53(plaintext, 8);
      const sealedAt = readU53(plaintext, 16);
      if (plaintext.readUInt32BE(4) !== 0 || bytes < 0 || sealedAt < 0) throw new JournalRecordError('payload', 'seal record with invalid fields');
      rec = { type: REC.SEAL, seq: h.seq, ops, bytes, sealedAt };
      break;
    }
  }
  return { rec, bytesRead: h.size };
}

// ------------------------------------------------------------------------- segment header

export interface SegmentHeader {
  readonly version: number;
  /** first epoch seq of the segment (also its file name). */
  readonly firstSeq: number;
  /** last epoch of the previous segment; firstSeq - 1 except after a discard-tail recovery. */
  readonly prevLast: number;
  readonly id: Buffer;
  readonly keyCheck: Buffer;
  /** whether the MAC (over everything before it, under the journal key) matches. */
  readonly macOk: boolean;
}

/**
 * magic (8) | u16 version | u16 header size | u32 flags | u64 first seq | u64 prev last
 * | id (16) | key check (16) | MAC (16)
 */
export function encodeSegmentHeader(journalKey: KeyObject, id: Buffer, keyCheck: Buffer, firstSeq: number, prevLast: number): Buffer {
  const b = Buffer.alloc(SEGMENT_HEADER_SIZE);
  SEGMENT_MAGIC.copy(b, 0);
  b.writeUInt16BE(FORMAT_VERSION, 8);
  b.writeUInt16BE(SEGMENT_HEADER_SIZE, 10);
  writeU53(b, 16, firstSeq);
  writeU53(b, 24, prevLast);
  id.copy(b, 32, 0, ID_SIZE);
  keyCheck.copy(b, 48, 0, MAC_SIZE);
  mac(journalKey, SEGMENT_MAC_LABEL, b.subarray(0, 64)).copy(b, 64);
  return b;
}

/** null when buf is too short or is not a segment header at all. */
export function decodeSegmentHeader(journalKey: KeyObject, buf: Buffer): SegmentHeader | null {
  if (buf.length < SEGMENT_HEADER_SIZE || !buf.subarray(0, 8).equals(SEGMENT_MAGIC)) return null;
  const version = buf.readUInt16BE(8);
  const firstSeq = readU53(buf, 16);
  const prevLast = readU53(buf, 24);
  const macOk = buf.readUInt16BE(10) === SEGMENT_HEADER_SIZE && buf.readUInt32BE(12) === 0 && mac(journalKey, SEGMENT_MAC_LABEL, buf.subarray(0, 64)).equals(buf.subarray(64, 80));
  return { version, firstSeq, prevLast, id: Buffer.from(buf.subarray(32, 48)), keyCheck: Buffer.from(buf.subarray(48, 64)), macOk };
}

// ------------------------------------------------------------------------------ state file

export interface JournalStateRecord {
  readonly id: Buffer;
  readonly keyCheck: Buffer;
  readonly ackedSeq: number;
  readonly checkpointSeq: number;
}

/** magic (8) | u16 version | u16 size | u32 flags | id (16) | key check (16) | u64 acked | u64 checkpoint | u64 reserved | MAC (16) */
export function encodeState(journalKey: KeyObject, s: JournalStateRecord): Buffer {
  const b = Buffer.alloc(STATE_SIZE);
  STATE_MAGIC.copy(b, 0);
  b.writeUInt16BE(FORMAT_VERSION, 8);
  b.writeUInt16BE(STATE_SIZE, 10);
  s.id.copy(b, 16, 0, ID_SIZE);
  s.keyCheck.copy(b, 32, 0, MAC_SIZE);
  writeU53(b, 48, s.ackedSeq);
  writeU53(b, 56, s.checkpointSeq);
  mac(journalKey, STATE_MAC_LABEL, b.subarray(0, 72)).copy(b, 72);
  return b;
}

/**
 * The state file's fields, checked in the order that gives the most useful diagnosis:
 * 'short' / 'magic' (not a state file), 'version', 'key' (another key sealed it), 'mac'
 * (damaged or modified), else the state.
 */
export function decodeState(journalKey: KeyObject, keyCheck: Buffer, buf: Buffer): JournalStateRecord | 'short' | 'magic' | 'version' | 'key' | 'mac' {
  if (buf.length !== STATE_SIZE) return 'short';
  if (!buf.subarray(0, 8).equals(STATE_MAGIC)) return 'magic';
  if (buf.readUInt16BE(8) !== FORMAT_VERSION) return 'version';
  const stored = buf.subarray(32, 48);
  if (!stored.equals(keyCheck)) return 'key';
  if (!mac(journalKey, STATE_MAC_LABEL, buf.subarray(0, 72)).equals(buf.subarray(72, 88))) return 'mac';
  const ackedSeq = readU53(buf, 48);
  const checkpointSeq = readU53(buf, 56);
  if (buf.readUInt16BE(10) !== STATE_SIZE || buf.readUInt32BE(12) !== 0 || ackedSeq < 0 || checkpointSeq < 0) return 'mac';
  return { id: Buffer.from(buf.subarray(16, 32)), keyCheck: Buffer.from(stored), ackedSeq, checkpointSeq };
}
