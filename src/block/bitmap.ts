// The overlay's granule bitmap: one bit per granule ("this granule is owned by the overlay"),
// in memory (GranuleBitmap) and on disk (BitmapFile: a small file replaced atomically by
// write-temp + fsync + rename + fsync(dir)).
//
// On-disk format, little endian:
//    0  magic     8 bytes  "SPWBMAP\0"
//    8  version   u32      1
//   12  header    u32      48 (header size in bytes)
//   16  granularity u32    bytes per bit
//   20  flags     u32      0
//   24  size      u64      device size in bytes
//   32  generation u64     incremented on every save
//   40  checksum  u32      CRC-32 of the header (this field as 0) followed by the bits
//   44  reserved  u32      0
//   48  bits      ceil(granules / 8) bytes; granule i is bit (i & 7) of byte (i >> 3)

import { readFile } from 'node:fs/promises';

import { replaceFileDurably } from '../util/durable.js';
import { crc32 } from 'node:zlib';

export const BITMAP_MAGIC = 'SPWBMAP\0';
export const BITMAP_VERSION = 1;
export const BITMAP_HEADER_SIZE = 48;

/** A bitmap file that cannot be used with this overlay (missing, corrupt, or for another shape). */
export class BitmapError extends Error {
  readonly code = 'SPW_ERR_OVERLAY_BITMAP';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BitmapError';
  }
}

export function granuleCount(size: number, granularity: number): number {
  return Math.ceil(size / granularity);
}

export class GranuleBitmap {
  readonly granules: number;
  private readonly bits: Uint8Array;
  private changes = 0;

  constructor(
    readonly size: number,
    readonly granularity: number,
    bits?: Uint8Array,
  ) {
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`invalid size ${size}`);
    if (!Number.isSafeInteger(granularity) || granularity < 1 || (granularity & (granularity - 1)) !== 0) {
      throw new RangeError(`granularity must be a power of two, got ${granularity}`);
    }
    this.granules = granuleCount(size, granularity);
    const bytes = Math.ceil(this.granules / 8);
    if (bits && bits.length !== bytes) throw new RangeError(`bitmap of ${bits.length} bytes, expected ${bytes}`);
    this.bits = bits ?? new Uint8Array(bytes);
  }

  /** Increases whenever a bit changes; a snapshot with an equal version needs no saving. */
  get version(): number {
    return this.changes;
  }

  get(g: number): boolean {
    return (((this.bits[g >> 3] ?? 0) >> (g & 7)) & 1) === 1;
  }

  /** Set granules g0..g1 inclusive. Returns true if any bit changed. */
  setRange(g0: number, g1: number): boolean {
    let changed = false;
    for (let g = g0; g <= g1; g++) {
      const i = g >> 3;
      const mask = 1 << (g & 7);
      const b = this.bits[i] ?? 0;
      if ((b & mask) === 0) {
        this.bits[i] = b | mask;
        changed = true;
      }
    }
    if (changed) this.changes++;
    return changed;
  }

  /** First granule in (g, limit) whose bit differs from g's, or limit. */
  runEnd(g: number, limit: number): number {
    const v = this.get(g);
    const same = v ? 0xff : 0;
    let i = g + 1;
    while (i < limit) {
      if ((i & 7) === 0 && i + 8 <= limit && this.bits[i >> 3] === same) {
        i += 8;
        continue;
      }
      if (this.get(i) !== v) return i;
      i++;
    }
    return limit;
  }

  /** Number of set bits. */
  count(): number {
    let n = 0;
    for (let g = 0; g < this.granules; g++) if (this.get(g)) n++;
    return n;
  }

  /** A copy of the bits and the version they correspond to. */
  snapshot(): { bits: Uint8Array; version: number } {
    return { bits: this.bits.slice(), version: this.changes };
  }

  /** The on-disk form of `bits` (default: the current bits). */
  encode(generation: number, bits: Uint8Array = this.bits): Buffer {
    const buf = Buffer.alloc(BITMAP_HEADER_SIZE + bits.length);
    buf.write(BITMAP_MAGIC, 0, 'latin1');
    buf.writeUInt32LE(BITMAP_VERSION, 8);
    buf.writeUInt32LE(BITMAP_HEADER_SIZE, 12);
    buf.writeUInt32LE(this.granularity, 16);
    buf.writeUInt32LE(0, 20);
    buf.writeBigUInt64LE(BigInt(this.size), 24);
    buf.writeBigUInt64LE(BigInt(generation), 32);
    Buffer.from(bits.buffer, bits.byteOffset, bits.length).copy(buf, BITMAP_HEADER_SIZE);
    buf.writeUInt32LE(crc32(buf), 40);
    return buf;
  }

  /** Parse and check a bitmap file's contents against the overlay it is meant for. */
  static decode(
    buf: Buffer,
    expect: { size: number; granularity?: number },
    source: string,
  ): { bitmap: GranuleBitmap; generation: number } {
    const bad = (why: string): BitmapError =>
      new BitmapError(`overlay bitmap ${source} refused: ${why}`);
    if (buf.length < BITMAP_HEADER_SIZE || buf.toString('latin1', 0, 8) !== BITMAP_MAGIC) {
      throw bad('not a spillway overlay bitmap (bad magic)');
    }
    const version = buf.readUInt32LE(8);
    if (version !== BITMAP_VERSION) throw bad(`version ${version}, this build reads ${BITMAP_VERSION}`);
    if (buf.readUInt32LE(12) !== BITMAP_HEADER_SIZE) throw bad(`header size ${buf.readUInt32LE(12)}`);
    const stored = buf.readUInt32LE(40);
    const copy = Buffer.from(buf);
    copy.writeUInt32LE(0, 40);
    if (crc32(copy) !== stored) throw bad('checksum mismatch (the file is damaged)');
    const granularity = buf.readUInt32LE(16);
    const size = Number(buf.readBigUInt64LE(24));
    if (size !== expect.size) {
      throw bad(`it is for a ${size}-byte device but the base is ${expect.size} bytes (wrong base image?)`);
    }
    if (expect.granularity !== undefined && granularity !== expect.granularity) {
      throw bad(`its granularity is ${granularity} bytes but ${expect.granularity} was requested; reopen with granularity ${granularity}`);
    }
    const bytes = Math.ceil(granuleCount(size, granularity) / 8);
    if (buf.length !== BITMAP_HEADER_SIZE + bytes) throw bad(`length ${buf.length}, expected ${BITMAP_HEADER_SIZE + bytes}`);
    const bits = new Uint8Array(bytes);
    bits.set(buf.subarray(BITMAP_HEADER_SIZE));
    return { bitmap: new GranuleBitmap(size, granularity, bits), generation: Number(buf.readBigUInt64LE(32)) };
  }
}

/** Where an overlay persists its bitmap. save() must be atomic and durable when it resolves. */
export interface BitmapStore {
  readonly description: string;
  save(encoded: Buffer): Promise<void>;
}

/** A bitmap in its own file, replaced atomically. Saves are serialized. */
export class BitmapFile implements BitmapStore {
  private chain: Promise<void> = Promise.resolve();

  constructor(readonly path: string) {}

  get description(): string {
    return this.path;
  }

  /** The file's contents, or null if it does not exist. */
  async load(): Promise<Buffer | null> {
    try {
      return await readFile(this.path);
    } catch (err) {
      if ((err as { code?: unknown }).code === 'ENOENT') return null;
      throw err;
    }
  }

  save(encoded: Buffer): Promise<void> {
    const next = this.chain.catch(() => undefined).then(() => this.replace(encoded));
    this.chain = next;
    return next;
  }

  /** write temp, fsync, rename over, fsync the directory (so the rename itself is durable). */
  private async replace(encoded: Buffer): Promise<void> {
    await replaceFileDurably(this.path, encoded, 0o644);
  }
}
