// Per-chunk compression on the link: LZ4 (lz4-napi, a prebuilt N-API binding of the Rust lz4_flex
// crate), skipped when it does not pay, and a zero marker for all-zero chunks. The choice and
// its figures are in docs/decisions/compression-and-signatures.md (bench/codecs.ts measures it).
//
// Payloads by codec:
//   raw   the chunk itself (payload.length === the chunk's length)
//   zero  empty; the chunk is expectedLength zero bytes
//   lz4   u32 little-endian original length, then one LZ4 block (lz4_flex's size-prepended form)
//
// Decompression trusts nothing in the payload: the length prefix must equal the length the
// receiver asked for before any memory is allocated, the output is checked to be exactly that
// long, and every failure is a LinkCorruptError (code SPW_ERR_LINK_CORRUPT). No I/O here.

import { compressSync, uncompressSync } from 'lz4-napi';
import { CODEC, MAX_CHUNK_SIZE } from './protocol.js';

/**
 * Wire value of the zero marker as a per-chunk codec. Zero chunks normally travel as their own
 * CHUNK_ZERO frame; this value lets the one compressChunk/decompressChunk pair also carry them.
 * (It belongs with CODEC in protocol.ts.)
 */
export const CODEC_ZERO = 3;

/** How one chunk is encoded on the wire: protocol.ts's CODEC values plus the zero marker. */
export type ChunkCodec = typeof CODEC.RAW | typeof CODEC.LZ4 | typeof CODEC_ZERO;

/** Readable names for logs and metric labels. */
export const CHUNK_CODEC_NAMES: Readonly<Record<ChunkCodec, 'raw' | 'lz4' | 'zero'>> = {
  [CODEC.RAW]: 'raw',
  [CODEC.LZ4]: 'lz4',
  [CODEC_ZERO]: 'zero',
};

export interface CompressedChunk {
  codec: ChunkCodec;
  /** For 'raw' this is the input itself (not a copy): do not modify the chunk while it is queued. */
  payload: Buffer;
}

/** A compressed chunk is sent only when it is at most 7/8 of the input; otherwise raw. */
export const SKIP_NUMERATOR = 7;
export const SKIP_DENOMINATOR = 8;
/** Inputs shorter than this are sent raw without trying (the frame header would eat the gain). */
export const MIN_COMPRESS_LENGTH = 64;
/** Bytes of lz4_flex's length prefix. */
const LZ4_PREFIX = 4;

export type LinkCorruptCode = 'SPW_ERR_LINK_CORRUPT';

/** A chunk payload that does not decode to the expected bytes. The peer or the link is at fault. */
export class LinkCorruptError extends Error {
  readonly code: LinkCorruptCode = 'SPW_ERR_LINK_CORRUPT';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'LinkCorruptError';
  }
}

// Zero detection compares against a shared zero buffer with memcmp (Buffer.equals): about
// 25 GiB/s on a zero chunk, and it stops at the first non-zero byte of a data chunk.
const ZERO_BLOCK = Buffer.alloc(64 * 1024);

function asBuffer(data: Uint8Array): Buffer {
  return Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

/** True when every byte of `data` is zero (true for an empty input). */
export function isAllZero(data: Uint8Array): boolean {
  const b = asBuffer(data);
  for (let off = 0; off < b.length; off += ZERO_BLOCK.length) {
    const n = Math.min(ZERO_BLOCK.length, b.length - off);
    const part = n === b.length ? b : b.subarray(off, off + n);
    if (!part.equals(n === ZERO_BLOCK.length ? ZERO_BLOCK : ZERO_BLOCK.subarray(0, n))) return false;
  }
  return true;
}

const EMPTY = Buffer.alloc(0);

/**
 * Encode one chunk for the link: the zero marker for an all-zero chunk (no payload), LZ4 when
 * the result is at most 7/8 of the input, raw otherwise. Never throws for a valid chunk.
 */
export function compressChunk(data: Uint8Array): CompressedChunk {
  const input = asBuffer(data);
  if (input.length > MAX_CHUNK_SIZE) throw new RangeError(`chunk of ${input.length} bytes exceeds the link's maximum of ${MAX_CHUNK_SIZE}`);
  if (isAllZero(input)) return { codec: CODEC_ZERO, payload: EMPTY };
  if (input.length < MIN_COMPRESS_LENGTH) return { codec: CODEC.RAW, payload: input };
  const packed = compressSync(input);
  if (packed.length * SKIP_DENOMINATOR > input.length * SKIP_NUMERATOR) return { codec: CODEC.RAW, payload: input };
  return { codec: CODEC.LZ4, payload: packed };
}

/**
 * Decode one chunk received from the link into exactly `expectedLength` bytes. Pass the length
 * the receiver asked for (the chunk's length in its volume), not a length the peer announced.
 * `codec` is the raw wire value. Throws LinkCorruptError for an unknown codec, a length over
 * MAX_CHUNK_SIZE, a payload inconsistent with the length, or data that does not decompress;
 * never allocates more than `expectedLength` for the output. A 'raw' payload is returned as is
 * (no copy). A negative or fractional `expectedLength` is a caller bug: RangeError.
 */
export function decompressChunk(codec: number, payload: Uint8Array, expectedLength: number): Buffer {
  if (!Number.isSafeInteger(expectedLength) || expectedLength < 0) throw new RangeError(`expected chunk length ${expectedLength} is not a byte count`);
  if (expectedLength > MAX_CHUNK_SIZE) throw new LinkCorruptError(`chunk of ${expectedLength} bytes exceeds the link's maximum of ${MAX_CHUNK_SIZE}`);
  const p = asBuffer(payload);
  switch (codec) {
    case CODEC.RAW:
      if (p.length !== expectedLength) throw new LinkCorruptError(`raw chunk payload is ${p.length} bytes, expected ${expectedLength}`);
      return p;
    case CODEC_ZERO:
      if (p.length !== 0) throw new LinkCorruptError(`zero chunk carries a ${p.length}-byte payload`);
      return Buffer.alloc(expectedLength);
    case CODEC.LZ4:
      return decompressLz4(p, expectedLength);
    default:
      throw new LinkCorruptError(`chunk codec ${codec} is not one this edge decodes (raw ${CODEC.RAW}, lz4 ${CODEC.LZ4}, zero ${CODEC_ZERO})`);
  }
}

function decompressLz4(p: Buffer, expectedLength: number): Buffer {
  if (p.length < LZ4_PREFIX) throw new LinkCorruptError(`lz4 chunk payload of ${p.length} bytes is shorter than its length prefix`);
  // lz4_flex allocates what the prefix says: check it before handing the payload over.
  const declared = p.readUInt32LE(0);
  if (declared !== expectedLength) throw new LinkCorruptError(`lz4 chunk declares ${declared} bytes, expected ${expectedLength}`);
  // A valid block of n bytes is at most LZ4_COMPRESSBOUND(n) long; a longer payload is refused
  // before any work.
  if (p.length > LZ4_PREFIX + lz4Bound(expectedLength)) throw new LinkCorruptError(`lz4 chunk payload of ${p.length} bytes is too large for ${expectedLength} bytes of data`);
  let out: Buffer;
  try {
    out = uncompressSync(p);
  } catch (err) {
    throw new LinkCorruptError(`lz4 chunk does not decompress: ${(err as Error).message}`, { cause: err });
  }
  if (out.length !== expectedLength) throw new LinkCorruptError(`lz4 chunk decompressed to ${out.length} bytes, expected ${expectedLength}`);
  return out;
}

/** LZ4's worst-case compressed size of `n` bytes (LZ4_COMPRESSBOUND). */
function lz4Bound(n: number): number {
  return n + Math.floor(n / 255) + 16;
}
