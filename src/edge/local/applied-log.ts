// The applier's append-only record of what reached the origin disk: one fixed-size record per
// applied batch of epochs, and one per journal takeover. Its last record is the applier's state
// (which journal owns the volume's write-back, and up to which epoch the origin holds it).
//
// Record (APPLIED_RECORD_SIZE = 64 bytes, big-endian):
//    0 u32 magic 'SPAL'      4 u8 version (1)    5 u8 kind (1 takeover, 2 applied)   6 u16 0
//    8 journal id (16)      24 u64 firstSeq     32 u64 lastSeq     40 u64 bytes
//   48 u64 at (ms since the epoch)              56 u32 extents     60 u32 CRC-32 of bytes 0..60
// A takeover record has firstSeq = lastSeq = bytes = extents = 0.
//
// Records are written at an explicit position (never O_APPEND) and fdatasync'ed one at a time,
// so at most the last record can be torn: a partial record or a full-size one whose CRC fails
// is cut off when the log is opened. A bad record anywhere else is damage, not a crash, and is
// refused (AppliedLogCorruptError) rather than guessed around.

import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { JOURNAL_ID_SIZE } from '../../link/protocol.js';
import { native } from '../../block/native.js';
import { fsyncDir, writeFully } from '../../util/durable.js';

export const APPLIED_LOG_NAME = 'applied.log';
export const APPLIED_RECORD_SIZE = 64;
const MAGIC = 0x5350414c; // 'SPAL'
const VERSION = 1;
const KIND_CODE = { takeover: 1, applied: 2 } as const;

export interface AppliedRecord {
  kind: 'takeover' | 'applied';
  journalId: Buffer;
  firstSeq: number;
  lastSeq: number;
  bytes: number;
  extents: number;
  /** when it was recorded, ms since 1970. */
  at: number;
}

export class AppliedLogCorruptError extends Error {
  readonly code = 'SPW_ERR_APPLIED_LOG_CORRUPT';
  constructor(message: string) {
    super(message);
    this.name = 'AppliedLogCorruptError';
  }
}

export class ApplierLockedError extends Error {
  readonly code = 'SPW_ERR_APPLIER_LOCKED';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ApplierLockedError';
  }
}

export function encodeAppliedRecord(r: AppliedRecord): Buffer {
  if (r.journalId.length !== JOURNAL_ID_SIZE) throw new RangeError(`journal id must be ${JOURNAL_ID_SIZE} bytes`);
  const b = Buffer.alloc(APPLIED_RECORD_SIZE);
  b.writeUInt32BE(MAGIC, 0);
  b.writeUInt8(VERSION, 4);
  b.writeUInt8(KIND_CODE[r.kind], 5);
  r.journalId.copy(b, 8);
  b.writeBigUInt64BE(BigInt(r.firstSeq), 24);
  b.writeBigUInt64BE(BigInt(r.lastSeq), 32);
  b.writeBigUInt64BE(BigInt(r.bytes), 40);
  b.writeBigUInt64BE(BigInt(r.at), 48);
  b.writeUInt32BE(r.extents, 56);
  b.writeUInt32BE(crc32(b.subarray(0, 60)), 60);
  return b;
}

/** Read a u64 that must fit a JS number; null when it does not. */
export function readSafeU64(b: Buffer, offset: number): number | null {
  const v = b.readBigUInt64BE(offset);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? null : Number(v);
}

/** The record in `b` (exactly one record long), or null when it is not a valid one. */
export function decodeAppliedRecord(b: Buffer): AppliedRecord | null {
  if (b.length !== APPLIED_RECORD_SIZE) return null;
  if (b.readUInt32BE(0) !== MAGIC || b.readUInt8(4) !== VERSION) return null;
  if (crc32(b.subarray(0, 60)) !== b.readUInt32BE(60)) return null;
  const code = b.readUInt8(5);
  const kind = code === KIND_CODE.takeover ? 'takeover' : code === KIND_CODE.applied ? 'applied' : null;
  const firstSeq = readSafeU64(b, 24);
  const lastSeq = readSafeU64(b, 32);
  const bytes = readSafeU64(b, 40);
  const at = readSafeU64(b, 48);
  if (kind === null || firstSeq === null || lastSeq === null || bytes === null || at === null) return null;
  if (kind === 'applied' ? firstSeq < 1 || lastSeq < firstSeq : firstSeq !== 0 || lastSeq !== 0) return null;
  return { kind, journalId: Buffer.from(b.subarray(8, 8 + JOURNAL_ID_SIZE)), firstSeq, lastSeq, bytes, extents: b.readUInt32BE(56), at };
}


export interface OpenedAppliedLog {
  log: AppliedLog;
  /** the last record, which says who owns the volume and how far the origin is. */
  last: AppliedRecord | null;
  /** bytes cut off the end (a torn last record), 0 normally. */
  truncated: number;
}

/** The applied log of one volume, open for appending. Holds an OFD write lock on the file,
 *  so a second applier (another process) cannot use the same state directory. */
export class AppliedLog {
  private constructor(
    private readonly fh: FileHandle,
    readonly path: string,
    /** bytes of valid records; the next record goes here. */
    private size: number,
  ) {}

  static async open(dir: string): Promise<OpenedAppliedLog> {
    const file = path.join(dir, APPLIED_LOG_NAME);
    const fh = await open(file, constants.O_RDWR | constants.O_CREAT, 0o600);
    try {
      try {
        native().ofdLock(fh.fd, { type: 'write', start: 0, len: 0, wait: false });
      } catch (err) {
        const code = (err as { code?: unknown }).code;
        if (code === 'EAGAIN' || code === 'EACCES') {
          throw new ApplierLockedError(`${file} is locked by another applier (another spillway process serves this volume's write-back); stop it first`, { cause: err });
        }
        throw err;
      }
      await fsyncDir(dir); // the log may have just been created
      const { size } = await fh.stat();
      let end = size - (size % APPLIED_RECORD_SIZE);
      let last: AppliedRecord | null = null;
      // At most one record can be torn (each is synced before the next is written).
      for (let tries = 0; end > 0 && tries < 2; tries++) {
        const buf = Buffer.alloc(APPLIED_RECORD_SIZE);
        await readFully(fh, buf, end - APPLIED_RECORD_SIZE);
        last = decodeAppliedRecord(buf);
        if (last) break;
        if (tries === 1) {
          throw new AppliedLogCorruptError(`${file}: the records at ${end - APPLIED_RECORD_SIZE} and ${end} are both invalid; this is damage, not a torn write. Restore the state directory or remove it (the origin then accepts a new journal from epoch 1)`);
        }
        end -= APPLIED_RECORD_SIZE;
      }
      if (end !== size) {
        await fh.truncate(end);
        await fh.datasync();
      }
      return { log: new AppliedLog(fh, file, end), last, truncated: size - end };
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  /** Write the record after the last valid one and make it durable. A failed append leaves the
   *  position where it was, so a retry overwrites whatever part of it reached the disk. */
  async append(r: AppliedRecord): Promise<void> {
    const buf = encodeAppliedRecord(r);
    try {
      await writeFully(this.fh, [buf], this.size);
      await this.fh.datasync();
    } catch (err) {
      await this.fh.truncate(this.size).catch(() => undefined);
      throw err;
    }
    this.size += APPLIED_RECORD_SIZE;
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}

async function readFully(fh: FileHandle, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) throw new Error(`unexpected end of file at ${position + done}`);
    done += bytesRead;
  }
}

/** Every record of a volume's applied log, oldest first (for tests and `spillway status`).
 *  A torn last record is left out (the applier cuts it off when it opens); an empty list when
 *  there is no log. Throws AppliedLogCorruptError for a bad record before the last. */
export async function readAppliedLog(dir: string): Promise<AppliedRecord[]> {
  const file = path.join(dir, APPLIED_LOG_NAME);
  let fh: FileHandle;
  try {
    fh = await open(file, 'r');
  } catch (err) {
    if ((err as { code?: unknown }).code === 'ENOENT') return [];
    throw err;
  }
  try {
    const out: AppliedRecord[] = [];
    const { size } = await fh.stat();
    const count = Math.floor(size / APPLIED_RECORD_SIZE);
    const block = Buffer.alloc(APPLIED_RECORD_SIZE * 1024);
    for (let i = 0; i < count; ) {
      const n = Math.min(1024, count - i);
      const part = block.subarray(0, n * APPLIED_RECORD_SIZE);
      await readFully(fh, part, i * APPLIED_RECORD_SIZE);
      for (let k = 0; k < n; k++, i++) {
        const r = decodeAppliedRecord(part.subarray(k * APPLIED_RECORD_SIZE, (k + 1) * APPLIED_RECORD_SIZE));
        if (r) out.push(r);
        else if (i !== count - 1) throw new AppliedLogCorruptError(`${file}: record ${i} of ${count} is invalid`);
      }
    }
    return out;
  } finally {
    await fh.close();
  }
}
