// On-disk records of the cache index (docs/cache.md has the layout). The index log and the
// snapshots are both a file header followed by framed records:
//
//   u32 body length | u32 CRC-32 of body | body = u8 type | fields (big-endian)
//
// Codecs are pure and incremental: decodeRecord(buf, offset) returns the record and its size,
// NEED_MORE when the frame is not complete in buf, or throws RecordError when the frame is
// malformed (bad length, bad CRC, unknown type, trailing bytes). Lengths are checked before
// anything is read, so garbage never makes the reader buffer without bound. Decoded records
// hold views into the input buffer (ids, nonces, tags): no copy per field when a 100k-entry
// snapshot is loaded; the input stays alive as long as a record that points into it.

import { crc32 } from 'node:zlib';

export const FILE_HEADER_SIZE = 16;
export const LOG_MAGIC = Buffer.from('SPWCLOG\0', 'latin1');
export const SNAP_MAGIC = Buffer.from('SPWCSNP\0', 'latin1');
export const FORMAT_VERSION = 1;

export const FRAME_HEADER_SIZE = 8;
/** Largest record body: a type byte, fixed fields and one name of up to MAX_NAME bytes. */
export const MAX_BODY = 2048;
export const MAX_NAME = 1024;
export const MAX_ID = 64;
/** Chunk indexes are stored on 48 bits. */
export const MAX_CHUNK_INDEX = 2 ** 48 - 1;
export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;

export const REC = {
  FAMILY: 1,
  VOLUME: 2,
  BLOB: 3,
  DROP: 4,
  MAP: 5,
  ZERO: 6,
  UNMAP: 7,
  END: 8,
} as const;

export type IndexRecord =
  /** interns a family name as `fid` and records the check value of its key (empty: unknown). */
  | { type: typeof REC.FAMILY; fid: number; name: string; check: Buffer }
  /** interns a volume name as `vid`; fid 0 = family not known yet. */
  | { type: typeof REC.VOLUME; vid: number; name: string; fid: number }
  /** content (fid, id) lives in slot `slot` of the slab of `slotSize`, `length` bytes. */
  | { type: typeof REC.BLOB; fid: number; id: Buffer; slotSize: number; slot: number; length: number; nonce: Buffer; tag: Buffer }
  /** content (fid, id) is gone (evicted, failed authentication, key changed). */
  | { type: typeof REC.DROP; fid: number; id: Buffer }
  /** chunk `index` of volume `vid` is content (fid, id). */
  | { type: typeof REC.MAP; vid: number; index: number; fid: number; id: Buffer }
  /** chunk `index` of volume `vid` is all zeroes. */
  | { type: typeof REC.ZERO; vid: number; index: number }
  /** chunk `index` of volume `vid` is unknown (invalidated). */
  | { type: typeof REC.UNMAP; vid: number; index: number }
  /** last record of a snapshot: how many records precede it, and the CRC-32 of their frames. */
  | { type: typeof REC.END; count: number; crc: number };

export class RecordError extends Error {
  readonly code = 'SPW_ERR_CACHE_RECORD';
  constructor(message: string) {
    super(message);
    this.name = 'RecordError';
  }
}

export const NEED_MORE = Symbol('NEED_MORE');

export interface FileHeader {
  readonly magic: Buffer;
  readonly version: number;
  readonly gen: number;
}

export function encodeFileHeader(magic: Buffer, gen: number): Buffer {
  const b = Buffer.alloc(FILE_HEADER_SIZE);
  magic.copy(b, 0);
  b.writeUInt32BE(FORMAT_VERSION, 8);
  b.writeUInt32BE(gen, 12);
  return b;
}

export function decodeFileHeader(buf: Buffer): FileHeader | null {
  if (buf.length < FILE_HEADER_SIZE) return null;
  return { magic: buf.subarray(0, 8), version: buf.readUInt32BE(8), gen: buf.readUInt32BE(12) };
}

function nameBytes(name: string): Buffer {
  const b = Buffer.from(name, 'utf8');
  if (b.length === 0 || b.length > MAX_NAME) throw new RangeError(`name of ${b.length} bytes (1..${MAX_NAME})`);
  return b;
}

function idBytes(id: Buffer): Buffer {
  if (id.length === 0 || id.length > MAX_ID) throw new RangeError(`content id of ${id.length} bytes (1..${MAX_ID})`);
  return id;
}

/** Size in bytes of the frame encodeRecord would write. */
export function recordSize(rec: IndexRecord): number {
  return FRAME_HEADER_SIZE + bodySize(rec);
}

function bodySize(rec: IndexRecord): number {
  switch (rec.type) {
    case REC.FAMILY:
      return 1 + 4 + 1 + rec.check.length + 2 + Buffer.byteLength(rec.name, 'utf8');
    case REC.VOLUME:
      return 1 + 4 + 4 + 2 + Buffer.byteLength(rec.name, 'utf8');
    case REC.BLOB:
      return 1 + 4 + 1 + rec.id.length + 4 + 4 + 4 + NONCE_BYTES + TAG_BYTES;
    case REC.DROP:
      return 1 + 4 + 1 + rec.id.length;
    case REC.MAP:
      return 1 + 4 + 6 + 4 + 1 + rec.id.length;
    case REC.ZERO:
    case REC.UNMAP:
      return 1 + 4 + 6;
    case REC.END:
      return 1 + 4 + 4;
  }
}

/** Write one framed record at buf[offset..]; returns the bytes written. */
export function encodeRecord(buf: Buffer, offset: number, rec: IndexRecord): number {
  const start = offset + FRAME_HEADER_SIZE;
  let o = start;
  o = buf.writeUInt8(rec.type, o);
  switch (rec.type) {
    case REC.FAMILY: {
      const name = nameBytes(rec.name);
      if (rec.check.length > 255) throw new RangeError('key check value too long');
      o = buf.writeUInt32BE(rec.fid, o);
      o = buf.writeUInt8(rec.check.length, o);
      o += rec.check.copy(buf, o);
      o = buf.writeUInt16BE(name.length, o);
      o += name.copy(buf, o);
      break;
    }
    case REC.VOLUME: {
      const name = nameBytes(rec.name);
      o = buf.writeUInt32BE(rec.vid, o);
      o = buf.writeUInt32BE(rec.fid, o);
      o = buf.writeUInt16BE(name.length, o);
      o += name.copy(buf, o);
      break;
    }
    case REC.BLOB:
      o = buf.writeUInt32BE(rec.fid, o);
      o = buf.writeUInt8(idBytes(rec.id).length, o);
      o += rec.id.copy(buf, o);
      o = buf.writeUInt32BE(rec.slotSize, o);
      o = buf.writeUInt32BE(rec.slot, o);
      o = buf.writeUInt32BE(rec.length, o);
      if (rec.nonce.length !== NONCE_BYTES || rec.tag.length !== TAG_BYTES) throw new RangeError('nonce or tag of the wrong size');
      o += rec.nonce.copy(buf, o);
      o += rec.tag.copy(buf, o);
      break;
    case REC.DROP:
      o = buf.writeUInt32BE(rec.fid, o);
      o = buf.writeUInt8(idBytes(rec.id).length, o);
      o += rec.id.copy(buf, o);
      break;
    case REC.MAP:
      o = buf.writeUInt32BE(rec.vid, o);
      o = buf.writeUIntBE(rec.index, o, 6);
      o = buf.writeUInt32BE(rec.fid, o);
      o = buf.writeUInt8(idBytes(rec.id).length, o);
      o += rec.id.copy(buf, o);
      break;
    case REC.ZERO:
    case REC.UNMAP:
      o = buf.writeUInt32BE(rec.vid, o);
      o = buf.writeUIntBE(rec.index, o, 6);
      break;
    case REC.END:
      o = buf.writeUInt32BE(rec.count, o);
      o = buf.writeUInt32BE(rec.crc, o);
      break;
  }
  const len = o - start;
  buf.writeUInt32BE(len, offset);
  buf.writeUInt32BE(crc32(buf.subarray(start, o)), offset + 4);
  return FRAME_HEADER_SIZE + len;
}

/** Encode records into one new buffer. */
export function encodeRecords(recs: readonly IndexRecord[]): Buffer {
  let size = 0;
  for (const r of recs) size += recordSize(r);
  const buf = Buffer.allocUnsafe(size);
  let o = 0;
  for (const r of recs) o += encodeRecord(buf, o, r);
  return buf;
}

function truncated(at: number): never {
  throw new RecordError(`record body truncated at ${at}`);
}

function readId(b: Buffer, o: number, end: number): Buffer {
  const n = b[o] as number;
  if (n === 0 || n > MAX_ID) throw new RecordError(`content id length ${n}`);
  if (o + 1 + n > end) truncated(o);
  return b.subarray(o + 1, o + 1 + n); // a view, not a copy (see the file comment)
}

function readName(b: Buffer, o: number, end: number): string {
  if (o + 2 > end) truncated(o);
  const n = b.readUInt16BE(o);
  if (n === 0 || n > MAX_NAME) throw new RecordError(`name length ${n}`);
  if (o + 2 + n > end) truncated(o);
  return b.toString('utf8', o + 2, o + 2 + n);
}

/**
 * Decode the frame at buf[offset..]. `verifyCrc` false skips the frame's own CRC, for frames
 * already covered by a checked CRC (a snapshot's END record covers every frame before it).
 */
export function decodeRecord(buf: Buffer, offset: number, verifyCrc = true): { rec: IndexRecord; bytesRead: number } | typeof NEED_MORE {
  if (buf.length - offset < FRAME_HEADER_SIZE) return NEED_MORE;
  const len = buf.readUInt32BE(offset);
  if (len === 0 || len > MAX_BODY) throw new RecordError(`record length ${len} out of range`);
  if (buf.length - offset - FRAME_HEADER_SIZE < len) return NEED_MORE;
  if (verifyCrc && crc32(buf.subarray(offset + FRAME_HEADER_SIZE, offset + FRAME_HEADER_SIZE + len)) !== buf.readUInt32BE(offset + 4)) {
    throw new RecordError('record CRC mismatch');
  }
  // Fields are read straight from buf; every read is bounds-checked against the body's end.
  const b = buf;
  const start = offset + FRAME_HEADER_SIZE;
  const end = start + len;
  const type = b[start] as number;
  let o = start + 1;
  let rec: IndexRecord;
  switch (type) {
    case REC.FAMILY: {
      if (o + 5 > end) truncated(o - start);
      const fid = b.readUInt32BE(o);
      const checkLen = b[o + 4] as number;
      o += 5;
      if (o + checkLen > end) truncated(o - start);
      const check = b.subarray(o, o + checkLen);
      o += checkLen;
      const nameLen = o + 2 <= end ? b.readUInt16BE(o) : 0;
      const name = readName(b, o, end);
      o += 2 + nameLen;
      rec = { type, fid, check, name };
      break;
    }
    case REC.VOLUME: {
      if (o + 8 > end) truncated(o - start);
      const vid = b.readUInt32BE(o);
      const fid = b.readUInt32BE(o + 4);
      o += 8;
      const nameLen = o + 2 <= end ? b.readUInt16BE(o) : 0;
      const name = readName(b, o, end);
      o += 2 + nameLen;
      rec = { type, vid, fid, name };
      break;
    }
    case REC.BLOB: {
      if (o + 5 > end) truncated(o - start);
      const fid = b.readUInt32BE(o);
      const id = readId(b, o + 4, end);
      o += 5 + id.length;
      if (o + 12 + NONCE_BYTES + TAG_BYTES > end) truncated(o - start);
      rec = {
        type,
        fid,
        id,
        slotSize: b.readUInt32BE(o),
        slot: b.readUInt32BE(o + 4),
        length: b.readUInt32BE(o + 8),
        nonce: b.subarray(o + 12, o + 12 + NONCE_BYTES),
        tag: b.subarray(o + 12 + NONCE_BYTES, o + 12 + NONCE_BYTES + TAG_BYTES),
      };
      o += 12 + NONCE_BYTES + TAG_BYTES;
      break;
    }
    case REC.DROP: {
      if (o + 5 > end) truncated(o - start);
      const fid = b.readUInt32BE(o);
      const id = readId(b, o + 4, end);
      o += 5 + id.length;
      rec = { type, fid, id };
      break;
    }
    case REC.MAP: {
      if (o + 15 > end) truncated(o - start);
      const vid = b.readUInt32BE(o);
      const index = b.readUIntBE(o + 4, 6);
      const fid = b.readUInt32BE(o + 10);
      const id = readId(b, o + 14, end);
      o += 15 + id.length;
      rec = { type, vid, index, fid, id };
      break;
    }
    case REC.ZERO:
    case REC.UNMAP: {
      if (o + 10 > end) truncated(o - start);
      rec = { type, vid: b.readUInt32BE(o), index: b.readUIntBE(o + 4, 6) };
      o += 10;
      break;
    }
    case REC.END:
      if (o + 8 > end) truncated(o - start);
      rec = { type, count: b.readUInt32BE(o), crc: b.readUInt32BE(o + 4) };
      o += 8;
      break;
    default:
      throw new RecordError(`unknown record type ${type}`);
  }
  if (o !== end) throw new RecordError(`${end - o} trailing bytes in record`);
  return { rec, bytesRead: FRAME_HEADER_SIZE + len };
}
