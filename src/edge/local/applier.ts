// The origin side of write-back: applies batches of sealed epochs, shipped by the remote edge,
// to the origin disk, each batch atomically (I3) and exactly once (I4). docs/applier.md has the
// formats and the rules; in short:
//
//   EPOCH_BEGIN   the batch is classified against the applied state (classifyBatch): NOT_OWNER,
//                 DUPLICATE and GAP are decided here and the batch's data is discarded; a batch
//                 that follows the origin's last epoch streams into its own staging file.
//   EPOCH_DATA    decompressed, checked (range, counts) and appended to the staging file as an
//                 EXTENT record; the batch digest (writeback/batch.ts) is updated. Data goes to
//                 disk as it arrives; memory is bounded by the link's credit window.
//   EPOCH_END     counts, bytes and digest must match, or the batch is CORRUPT. Then, one batch
//                 of the volume at a time: classify again (another connection may have applied
//                 it meanwhile), append COMMIT, fdatasync, rename the staging file to redo.log,
//                 fsync the directory (the commit point), apply every extent to the device,
//                 flush the device, append an 'applied' record to the applied log (fdatasync),
//                 remove redo.log, answer APPLIED.
//   open()        cuts a torn record off the applied log, removes staging files, and completes a
//                 committed redo.log that follows the applied log's last epoch (re-applying is
//                 idempotent); any other redo.log is discarded.
//
// Every batch gets exactly one EPOCH_ACK, after its EPOCH_END, whatever was decided earlier.

import { chmod, mkdir, open, readdir, rename, rm, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { crc32 } from 'node:zlib';
import type { BlockDevice } from '../../block/device.js';
import { EPOCH_DIGEST_SIZE, type LinkMessage } from '../../link/codec.js';
import { decompressChunk } from '../../link/compress.js';
import { EPOCH_STATUS, EPOCH_STATUS_NAMES, JOURNAL_ID_SIZE, MAX_EPOCH_EXTENT } from '../../link/protocol.js';

export { EPOCH_STATUS_NAMES };
import type { Logger } from '../../log/logger.js';
import { BatchDigest } from '../../writeback/batch.js';
import { fsyncDir, writeFully } from '../../util/durable.js';
import { AppliedLog, readSafeU64, type AppliedRecord } from './applied-log.js';
import { applierMetrics } from './metrics.js';

export { readAppliedLog, type AppliedRecord } from './applied-log.js';

export interface ApplierOptions {
  volume: string;
  /** the volume's applier state, e.g. STATE/applier/VOLUME; created with mode 0700. */
  dir: string;
  /** the writable origin disk. The applier does not close it. */
  device: BlockDevice;
  log: Logger;
}

export interface BatchOutcome {
  /** EPOCH_STATUS */
  status: number;
  appliedSeq: number;
  message: string;
}

/** What open() found and did. */
export interface RecoveryReport {
  /** bytes of a torn last record cut off the applied log. */
  truncatedAppliedLog: number;
  /** staging files (batches that never committed) removed. */
  stagesRemoved: number;
  /** what became of redo.log: none, completed (a committed batch re-applied) or discarded. */
  redo: 'none' | 'completed' | 'discarded';
  detail: string;
}

/** redo.log is committed (its COMMIT record is valid) but cannot be read back, so the origin disk
 *  may hold part of that batch. Someone has to look: open() refuses to guess. */
export class ApplierRecoveryError extends Error {
  readonly code = 'SPW_ERR_APPLIER_RECOVERY';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ApplierRecoveryError';
  }
}

export const REDO_LOG_NAME = 'redo.log';
const STAGE_PREFIX = 'stage-';
const STAGE_SUFFIX = '.redo';


// ------------------------------------------------------------------------------- redo format
//
// Every record is a 64-byte header, then `dataLength` bytes of data (only a data EXTENT has any):
//    0 u32 magic 'SPRD'   4 u8 version (1)   5 u8 type (1 BEGIN, 2 EXTENT, 3 COMMIT)
//    6 u8 flags (EXTENT: 1 = zero)           7 u8 0          8 u32 dataLength
//   BEGIN   12 journal id (16)  28 u64 firstSeq  36 u64 lastSeq  44 u64 bytes  52 u32 extents
//   EXTENT  12 u64 offset       20 u32 length    24 u32 index (0, 1, 2, ... in batch order)
//   COMMIT  12 u32 extents      16 u64 bytes     24 digest (32)
//   60 u32 CRC-32 of header bytes 0..60 followed by the data

export const REDO_HEADER_SIZE = 64;
const REDO_MAGIC = 0x53505244; // 'SPRD'
const REDO_VERSION = 1;
const REC_BEGIN = 1;
const REC_EXTENT = 2;
const REC_COMMIT = 3;
const FLAG_ZERO = 1;
/** read-back buffer: one header and the largest extent fit. */
const READ_BUFFER = 4 * 1024 * 1024;
/** batches streaming at once on one connection (the shipper sends one at a time). */
const MAX_OPEN_BATCHES = 4;
/** batch entries (including refused ones whose END has not come) kept per connection. */
const MAX_TRACKED_BATCHES = 64;

interface BeginFields {
  journalId: Buffer;
  firstSeq: number;
  lastSeq: number;
  extents: number;
  bytes: number;
}

function header(type: number, flags: number, dataLength: number): Buffer {
  const h = Buffer.alloc(REDO_HEADER_SIZE);
  h.writeUInt32BE(REDO_MAGIC, 0);
  h.writeUInt8(REDO_VERSION, 4);
  h.writeUInt8(type, 5);
  h.writeUInt8(flags, 6);
  h.writeUInt32BE(dataLength, 8);
  return h;
}

function seal(h: Buffer, data?: Buffer): Buffer {
  const c = crc32(h.subarray(0, 60));
  h.writeUInt32BE(data ? crc32(data, c) : c, 60);
  return h;
}

function encodeBegin(b: BeginFields): Buffer {
  const h = header(REC_BEGIN, 0, 0);
  b.journalId.copy(h, 12);
  h.writeBigUInt64BE(BigInt(b.firstSeq), 28);
  h.writeBigUInt64BE(BigInt(b.lastSeq), 36);
  h.writeBigUInt64BE(BigInt(b.bytes), 44);
  h.writeUInt32BE(b.extents, 52);
  return seal(h);
}

function encodeExtent(index: number, offset: number, length: number, data: Buffer | undefined): Buffer {
  const h = header(REC_EXTENT, data ? 0 : FLAG_ZERO, data ? length : 0);
  h.writeBigUInt64BE(BigInt(offset), 12);
  h.writeUInt32BE(length, 20);
  h.writeUInt32BE(index, 24);
  return seal(h, data);
}

function encodeCommit(extents: number, bytes: number, digest: Buffer): Buffer {
  const h = header(REC_COMMIT, 0, 0);
  h.writeUInt32BE(extents, 12);
  h.writeBigUInt64BE(BigInt(bytes), 16);
  digest.copy(h, 24);
  return seal(h);
}

type RedoRecord =
  | ({ type: 'begin' } & BeginFields)
  /** `data` is a view into the reader's buffer, valid until the next call to next(). */
  | { type: 'extent'; index: number; offset: number; length: number; data: Buffer | null }
  | { type: 'commit'; extents: number; bytes: number; digest: Buffer }
  | { type: 'end' }
  | { type: 'bad'; reason: string };

/** Sequential reader of a redo file: every length is bounded before anything is read. */
class RedoReader {
  private readonly buf = Buffer.allocUnsafe(READ_BUFFER);
  private start = 0;
  private end = 0;
  private filePos = 0;
  private eof = false;

  constructor(private readonly fh: FileHandle) {}

  /** file offset of the next unread byte. */
  get position(): number {
    return this.filePos - (this.end - this.start);
  }

  private async take(n: number): Promise<Buffer | null> {
    if (this.end - this.start < n) {
      this.buf.copyWithin(0, this.start, this.end);
      this.end -= this.start;
      this.start = 0;
      while (this.end < n && !this.eof) {
        const { bytesRead } = await this.fh.read(this.buf, this.end, this.buf.length - this.end, this.filePos);
        if (bytesRead === 0) this.eof = true;
        this.filePos += bytesRead;
        this.end += bytesRead;
      }
      if (this.end - this.start < n) return null;
    }
    const v = this.buf.subarray(this.start, this.start + n);
    this.start += n;
    return v;
  }

  async next(): Promise<RedoRecord> {
    const at = this.position;
    const h = await this.take(REDO_HEADER_SIZE);
    if (!h) return this.end === this.start && this.eof ? { type: 'end' } : { type: 'bad', reason: `torn record header at ${at}` };
    if (h.readUInt32BE(0) !== REDO_MAGIC || h.readUInt8(4) !== REDO_VERSION) return { type: 'bad', reason: `no record at ${at}` };
    const type = h.readUInt8(5);
    const flags = h.readUInt8(6);
    const dataLength = h.readUInt32BE(8);
    const stored = h.readUInt32BE(60);
    let crc = crc32(h.subarray(0, 60));
    if (type === REC_EXTENT) {
      const offset = readSafeU64(h, 12);
      const length = h.readUInt32BE(20);
      const index = h.readUInt32BE(24);
      const zero = (flags & FLAG_ZERO) !== 0;
      if (offset === null || length < 1 || length > MAX_EPOCH_EXTENT || dataLength !== (zero ? 0 : length)) {
        return { type: 'bad', reason: `extent record at ${at} has impossible lengths` };
      }
      let data: Buffer | null = null;
      if (!zero) {
        data = await this.take(dataLength);
        if (!data) return { type: 'bad', reason: `torn extent data at ${at}` };
        crc = crc32(data, crc);
      }
      if (crc !== stored) return { type: 'bad', reason: `extent record at ${at} fails its CRC` };
      return { type: 'extent', index, offset, length, data };
    }
    if (dataLength !== 0) return { type: 'bad', reason: `record at ${at} has an impossible length` };
    if (crc !== stored) return { type: 'bad', reason: `record at ${at} fails its CRC` };
    if (type === REC_BEGIN) {
      const firstSeq = readSafeU64(h, 28);
      const lastSeq = readSafeU64(h, 36);
      const bytes = readSafeU64(h, 44);
      if (firstSeq === null || lastSeq === null || bytes === null) return { type: 'bad', reason: `BEGIN at ${at} has impossible numbers` };
      return { type: 'begin', journalId: Buffer.from(h.subarray(12, 12 + JOURNAL_ID_SIZE)), firstSeq, lastSeq, bytes, extents: h.readUInt32BE(52) };
    }
    if (type === REC_COMMIT) {
      const bytes = readSafeU64(h, 16);
      if (bytes === null) return { type: 'bad', reason: `COMMIT at ${at} has impossible numbers` };
      return { type: 'commit', extents: h.readUInt32BE(12), bytes, digest: Buffer.from(h.subarray(24, 24 + EPOCH_DIGEST_SIZE)) };
    }
    return { type: 'bad', reason: `record at ${at} has unknown type ${type}` };
  }
}

type RedoScan =
  | { state: 'absent' }
  /** a batch that never committed (or whose BEGIN is gone): safe to discard. */
  | { state: 'uncommitted'; begin: BeginFields | null; reason: string }
  /** its COMMIT is valid but the body is not: the batch may be partly on the origin. */
  | { state: 'damaged'; begin: BeginFields | null; reason: string }
  | { state: 'committed'; begin: BeginFields; trailing: number };

/** Read a redo file through to its COMMIT and check everything: CRCs, extent order, ranges,
 *  counts and the batch digest. Applies nothing. */
async function scanRedo(file: string, deviceSize: number): Promise<RedoScan> {
  let fh: FileHandle;
  try {
    fh = await open(file, 'r');
  } catch (err) {
    if ((err as { code?: unknown }).code === 'ENOENT') return { state: 'absent' };
    throw err;
  }
  try {
    const r = new RedoReader(fh);
    let begin: BeginFields | null = null;
    const broken = async (reason: string): Promise<RedoScan> => {
      const { size } = await fh.stat();
      return (await endsWithCommit(fh, size)) ? { state: 'damaged', begin, reason } : { state: 'uncommitted', begin, reason };
    };
    const first = await r.next();
    if (first.type !== 'begin') return await broken(first.type === 'bad' ? first.reason : 'no BEGIN record');
    const { type: _t, ...fields } = first;
    begin = fields;
    const digest = new BatchDigest();
    for (;;) {
      const rec = await r.next();
      if (rec.type === 'extent') {
        if (rec.index !== digest.extents) return await broken(`extent ${rec.index} where ${digest.extents} was expected`);
        if (rec.offset + rec.length > deviceSize) return await broken(`extent ${rec.index} ends past the device (${deviceSize} bytes)`);
        digest.update(rec.offset, rec.length, rec.data === null, rec.data ?? undefined);
        continue;
      }
      if (rec.type === 'commit') {
        if (rec.extents !== digest.extents || rec.bytes !== digest.bytes || rec.extents !== begin.extents || rec.bytes !== begin.bytes) {
          return { state: 'damaged', begin, reason: `COMMIT says ${rec.extents} extents / ${rec.bytes} bytes, the log holds ${digest.extents} / ${digest.bytes}` };
        }
        if (!digest.digest().equals(rec.digest)) return { state: 'damaged', begin, reason: 'the extents do not match the COMMIT digest' };
        const { size } = await fh.stat();
        return { state: 'committed', begin, trailing: size - r.position };
      }
      if (rec.type === 'begin') return await broken('a second BEGIN record');
      if (rec.type === 'end') return { state: 'uncommitted', begin, reason: 'no COMMIT record' };
      return await broken(rec.reason);
    }
  } finally {
    await fh.close();
  }
}

/** Whether the file's last record slot is a CRC-valid COMMIT header. */
async function endsWithCommit(fh: FileHandle, size: number): Promise<boolean> {
  if (size < 2 * REDO_HEADER_SIZE) return false;
  const h = Buffer.alloc(REDO_HEADER_SIZE);
  const { bytesRead } = await fh.read(h, 0, h.length, size - h.length);
  return (
    bytesRead === h.length &&
    h.readUInt32BE(0) === REDO_MAGIC &&
    h.readUInt8(5) === REC_COMMIT &&
    h.readUInt32BE(8) === 0 &&
    crc32(h.subarray(0, 60)) === h.readUInt32BE(60)
  );
}

let zeroBuffer: Buffer | undefined;

/** Write every extent of a committed redo file to the device, in order. Idempotent. */
async function replayRedo(file: string, device: BlockDevice, expect: BeginFields): Promise<void> {
  const fh = await open(file, 'r');
  try {
    const r = new RedoReader(fh);
    const first = await r.next();
    if (first.type !== 'begin' || !first.journalId.equals(expect.journalId) || first.firstSeq !== expect.firstSeq || first.lastSeq !== expect.lastSeq) {
      throw new Error(`${file} does not start with the BEGIN of epochs ${expect.firstSeq}..${expect.lastSeq}`);
    }
    const max = Math.max(1, device.capabilities.blockSize.maximum);
    for (let index = 0; ; index++) {
      const rec = await r.next();
      if (rec.type === 'commit') return;
      if (rec.type !== 'extent' || rec.index !== index) {
        throw new Error(`${file}: ${rec.type === 'bad' ? rec.reason : `unexpected ${rec.type} record`} while applying extent ${index}`);
      }
      if (rec.data) {
        for (let p = 0; p < rec.length; p += max) await device.write(rec.offset + p, rec.data.subarray(p, Math.min(rec.length, p + max)));
      } else if (device.capabilities.zero) {
        await device.writeZeroes(rec.offset, rec.length);
      } else {
        zeroBuffer ??= Buffer.alloc(MAX_EPOCH_EXTENT);
        for (let p = 0; p < rec.length; p += max) await device.write(rec.offset + p, zeroBuffer.subarray(0, Math.min(rec.length - p, max)));
      }
    }
  } finally {
    await fh.close();
  }
}

/** A batch being received: BEGIN and EXTENT records appended to its own file as data arrives. */
class StagingFile {
  private pos = 0;
  private open = true;

  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
  ) {}

  static async create(file: string, begin: BeginFields): Promise<StagingFile> {
    const fh = await open(file, 'wx', 0o600);
    const s = new StagingFile(file, fh);
    try {
      await s.append([encodeBegin(begin)]);
    } catch (err) {
      await s.discard();
      throw err;
    }
    return s;
  }

  async append(bufs: Buffer[]): Promise<void> {
    const total = bufs.reduce((n, b) => n + b.length, 0);
    await writeFully(this.fh, bufs, this.pos);
    this.pos += total;
  }

  /** Append the COMMIT record and make the whole file durable, then close it. */
  async commit(record: Buffer): Promise<void> {
    await this.append([record]);
    await this.fh.datasync();
    this.open = false;
    await this.fh.close();
  }

  async discard(): Promise<void> {
    if (this.open) {
      this.open = false;
      await this.fh.close().catch(() => undefined);
    }
    await rm(this.path, { force: true });
  }
}

// ------------------------------------------------------------------------------ decisions

export interface AppliedState {
  journalId: Buffer | null;
  appliedSeq: number;
}

/** What becomes of a batch of epochs firstSeq..lastSeq of `journalId`, given the applied state:
 *  null when it is the next one to apply, otherwise its EPOCH_STATUS and a message for the
 *  sender. A pure function: checked at EPOCH_BEGIN and again, under the apply lock, at commit. */
export function classifyBatch(state: AppliedState, b: { journalId: Buffer; firstSeq: number; lastSeq: number }, volume: string): { status: number; message: string } | null {
  if (!state.journalId) return { status: EPOCH_STATUS.NOT_OWNER, message: `volume ${volume} has no write-back journal yet: send EPOCH_QUERY first` };
  if (!b.journalId.equals(state.journalId)) {
    return { status: EPOCH_STATUS.NOT_OWNER, message: `journal ${b.journalId.toString('hex')} does not own volume ${volume}'s write-back (journal ${state.journalId.toString('hex')} does since its EPOCH_QUERY); query again to take it over` };
  }
  if (b.lastSeq <= state.appliedSeq) return { status: EPOCH_STATUS.DUPLICATE, message: `epochs ${b.firstSeq}..${b.lastSeq} are already applied (the origin holds epochs up to ${state.appliedSeq})` };
  if (b.firstSeq !== state.appliedSeq + 1) return { status: EPOCH_STATUS.GAP, message: `the origin holds epochs up to ${state.appliedSeq}: resend from ${state.appliedSeq + 1}, not ${b.firstSeq}` };
  return null;
}

// -------------------------------------------------------------------------------- applier

interface Conn {
  send(m: LinkMessage): boolean;
}

type Msg<T extends LinkMessage['type']> = Extract<LinkMessage, { type: T }>;

interface Incoming {
  begin: BeginFields;
  /** decided before END (refused at BEGIN, or a bad frame): the data is discarded. */
  outcome: { status: number; message: string } | null;
  stage: StagingFile | null;
  digest: BatchDigest;
}

interface ConnState {
  /** this connection's messages, processed one after the other in arrival order. */
  chain: Promise<void>;
  batches: Map<number, Incoming>;
  closed: boolean;
  /** EPOCH_DATA frames for batches that never began here. */
  strays: number;
}

class Mutex {
  private tail: Promise<void> = Promise.resolve();
  run<T>(fn: () => Promise<T>): Promise<T> {
    const r = this.tail.then(fn);
    this.tail = r.then(
      () => undefined,
      () => undefined,
    );
    return r;
  }
}

function errText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

export class Applier {
  private journal: Buffer | null;
  private seq: number;
  private report: RecoveryReport = { truncatedAppliedLog: 0, stagesRemoved: 0, redo: 'none', detail: '' };
  /** a committed batch whose apply failed: it is completed before anything else is applied. */
  private pendingRedo = false;
  private closed = false;
  private closing: Promise<void> | undefined;
  private stageCount = 0;
  private readonly conns = new Map<object, ConnState>();
  /** connections we were told are closed: anything they still deliver is ignored. */
  private readonly closedConns = new WeakSet<object>();
  private readonly drops = new Set<Promise<void>>();
  private readonly lock = new Mutex();
  private readonly metrics = applierMetrics();
  private readonly redoPath: string;

  private constructor(
    private readonly opts: ApplierOptions,
    private readonly applied: AppliedLog,
    last: AppliedRecord | null,
  ) {
    this.journal = last ? last.journalId : null;
    this.seq = last && last.kind === 'applied' ? last.lastSeq : 0;
    this.redoPath = path.join(opts.dir, REDO_LOG_NAME);
    this.metrics.appliedSeq.set({ volume: opts.volume }, this.seq);
  }

  /** Open the volume's applier state and recover: after this the origin disk holds exactly the
   *  epochs up to appliedSeq. Rejects with ApplierRecoveryError when a committed batch cannot be
   *  read back, and with the device's error when it cannot be completed. */
  static async open(opts: ApplierOptions): Promise<Applier> {
    await mkdir(opts.dir, { recursive: true, mode: 0o700 });
    await chmod(opts.dir, 0o700);
    const { log: applied, last, truncated } = await AppliedLog.open(opts.dir);
    const a = new Applier(opts, applied, last);
    try {
      await a.recover(truncated);
    } catch (err) {
      await applied.close();
      throw err;
    }
    return a;
  }

  get journalId(): Buffer | null {
    return this.journal;
  }

  get appliedSeq(): number {
    return this.seq;
  }

  /** What open() found and did. */
  get recovery(): RecoveryReport {
    return this.report;
  }

  private async recover(truncated: number): Promise<void> {
    const log = this.opts.log;
    if (truncated > 0) log('warn', 'applied log: cut off a torn last record (crash while recording)', { volume: this.opts.volume, bytes: truncated });
    let stages = 0;
    for (const name of await readdir(this.opts.dir)) {
      if (name.startsWith(STAGE_PREFIX) && name.endsWith(STAGE_SUFFIX)) {
        await rm(path.join(this.opts.dir, name), { force: true });
        stages++;
      }
    }
    const r = await this.completeRedo();
    this.report = { truncatedAppliedLog: truncated, stagesRemoved: stages, ...r };
    if (r.redo !== 'none') log(r.redo === 'completed' ? 'info' : 'warn', `recovery: ${r.detail}`, { volume: this.opts.volume });
    log('info', 'applier open', { volume: this.opts.volume, journal: this.journal?.toString('hex') ?? null, appliedSeq: this.seq, redo: r.redo });
  }

  /** Finish or discard redo.log (see the top of the file). Caller holds the lock (or is open()). */
  private async completeRedo(): Promise<Pick<RecoveryReport, 'redo' | 'detail'>> {
    const scan = await scanRedo(this.redoPath, this.opts.device.size);
    if (scan.state === 'absent') {
      this.pendingRedo = false;
      return { redo: 'none', detail: '' };
    }
    const b = scan.begin;
    const range = b ? `epochs ${b.firstSeq}..${b.lastSeq} of journal ${b.journalId.toString('hex')}` : 'a batch';
    const next = b !== null && this.journal !== null && b.journalId.equals(this.journal) && b.firstSeq === this.seq + 1;
    if (scan.state === 'committed' && next) {
      if (scan.trailing > 0) this.opts.log('warn', 'redo log: ignoring bytes after its COMMIT record', { volume: this.opts.volume, bytes: scan.trailing });
      const t0 = performance.now();
      await replayRedo(this.redoPath, this.opts.device, scan.begin);
      await this.opts.device.flush();
      await this.record(scan.begin);
      this.metrics.applySeconds.observe((performance.now() - t0) / 1000);
      await this.resetRedo();
      return { redo: 'completed', detail: `completed ${range}, committed before the applier stopped` };
    }
    if (scan.state === 'damaged' && (next || b === null)) {
      throw new ApplierRecoveryError(
        `${this.redoPath} holds ${range}, committed, but cannot be read back (${scan.reason}); the origin disk may hold part of it. ` +
          'Restore the origin from a snapshot or accept it as is, then remove redo.log and let the remote edge resend.',
      );
    }
    await this.resetRedo();
    this.pendingRedo = false;
    const why = scan.state === 'uncommitted' ? `never committed (${scan.reason})` : scan.state === 'damaged' ? `stale and damaged (${scan.reason})` : b && this.journal && b.journalId.equals(this.journal) && b.lastSeq <= this.seq ? 'already applied' : 'not the next batch of the owning journal';
    return { redo: 'discarded', detail: `discarded ${range}: ${why}` };
  }

  private async resetRedo(): Promise<void> {
    await rm(this.redoPath, { force: true });
  }

  private async record(b: BeginFields): Promise<void> {
    await this.applied.append({ kind: 'applied', journalId: b.journalId, firstSeq: b.firstSeq, lastSeq: b.lastSeq, bytes: b.bytes, extents: b.extents, at: Date.now() });
    this.seq = b.lastSeq;
    this.pendingRedo = false;
    const volume = this.opts.volume;
    this.metrics.epochs.inc({ volume }, b.lastSeq - b.firstSeq + 1);
    this.metrics.bytes.inc({ volume }, b.bytes);
    this.metrics.appliedSeq.set({ volume }, this.seq);
  }

  /** Link handler for epoch-* messages addressed to this volume. Messages of one connection are
   *  processed in order; the promise settles when this one has been (for EPOCH_DATA: written to
   *  the staging file, so the connection may return its credit). */
  handle(msg: LinkMessage, conn: Conn): Promise<void> {
    if (this.closed || this.closedConns.has(conn)) return Promise.resolve();
    let st = this.conns.get(conn);
    if (!st) {
      st = { chain: Promise.resolve(), batches: new Map(), closed: false, strays: 0 };
      this.conns.set(conn, st);
    }
    const s = st;
    const p = s.chain.then(() => (s.closed || this.closed ? undefined : this.dispatch(msg, conn, s)));
    s.chain = p.catch(() => undefined);
    return p;
  }

  private async dispatch(msg: LinkMessage, conn: Conn, st: ConnState): Promise<void> {
    try {
      switch (msg.type) {
        case 'epoch-query':
          return await this.onQuery(msg, conn);
        case 'epoch-begin':
          return await this.onBegin(msg, st);
        case 'epoch-data':
          return await this.onData(msg, st);
        case 'epoch-end':
          return await this.onEnd(msg, conn, st);
        default:
          this.opts.log('debug', `applier ignores ${msg.type}`, { volume: this.opts.volume });
      }
    } catch (err) {
      this.opts.log('error', `applier: ${msg.type} failed: ${errText(err)}`, { volume: this.opts.volume });
      throw err;
    }
  }

  private async onQuery(m: Msg<'epoch-query'>, conn: Conn): Promise<void> {
    let appliedSeq = this.seq;
    if (!(this.journal && m.journalId.equals(this.journal))) appliedSeq = await this.lock.run(() => this.takeOver(m.journalId));
    conn.send({ type: 'epoch-state', reqId: m.reqId, handle: m.handle, journalId: m.journalId, appliedSeq });
  }

  /** A journal the applier does not know asks where the origin stands: it owns the volume's
   *  write-back from now on, starting at epoch 1. Recorded durably before the answer. */
  private async takeOver(id: Buffer): Promise<number> {
    if (this.journal && id.equals(this.journal)) return this.seq;
    // A committed batch of the old journal must reach the origin first (I3).
    if (this.pendingRedo) await this.completeRedo();
    const volume = this.opts.volume;
    if (this.journal) {
      this.opts.log('warn', `journal ${id.toString('hex')} takes over volume ${volume}'s write-back from journal ${this.journal.toString('hex')}, which the origin applied up to epoch ${this.seq}`, { volume });
    } else {
      this.opts.log('info', `journal ${id.toString('hex')} owns volume ${volume}'s write-back`, { volume });
    }
    const journalId = Buffer.from(id);
    await this.applied.append({ kind: 'takeover', journalId, firstSeq: 0, lastSeq: 0, bytes: 0, extents: 0, at: Date.now() });
    this.journal = journalId;
    this.seq = 0;
    this.metrics.appliedSeq.set({ volume }, 0);
    return 0;
  }

  private track(batches: Map<number, Incoming>, id: number, b: Incoming): Promise<void> {
    batches.set(id, b);
    if (batches.size <= MAX_TRACKED_BATCHES) return Promise.resolve();
    const [oldId, old] = batches.entries().next().value as [number, Incoming];
    batches.delete(oldId);
    this.opts.log('warn', `applier: forgetting batch ${oldId}: too many unfinished batches on one connection`, { volume: this.opts.volume });
    return this.discard(old);
  }

  private async discard(b: Incoming): Promise<void> {
    const s = b.stage;
    b.stage = null;
    if (s) await s.discard();
  }

  private async fail(b: Incoming, status: number, message: string): Promise<void> {
    b.outcome ??= { status, message };
    await this.discard(b);
  }

  private async onBegin(m: Msg<'epoch-begin'>, st: ConnState): Promise<void> {
    const old = st.batches.get(m.batch);
    if (old) {
      st.batches.delete(m.batch);
      this.opts.log('warn', `applier: batch id ${m.batch} began again before its EPOCH_END; dropping the first`, { volume: this.opts.volume });
      await this.discard(old);
    }
    const begin: BeginFields = { journalId: Buffer.from(m.journalId), firstSeq: m.firstSeq, lastSeq: m.lastSeq, extents: m.extents, bytes: m.bytes };
    const b: Incoming = { begin, outcome: null, stage: null, digest: new BatchDigest() };
    const streaming = [...st.batches.values()].filter((x) => x.stage !== null).length;
    await this.track(st.batches, m.batch, b);
    const range = `epochs ${m.firstSeq}..${m.lastSeq}`;
    if (![m.firstSeq, m.lastSeq, m.bytes].every(Number.isSafeInteger) || m.bytes < m.extents || m.bytes > m.extents * MAX_EPOCH_EXTENT) {
      b.outcome = { status: EPOCH_STATUS.CORRUPT, message: `${range}: ${m.extents} extents of ${m.bytes} bytes in all is impossible` };
      return;
    }
    b.outcome = classifyBatch({ journalId: this.journal, appliedSeq: this.seq }, begin, this.opts.volume);
    if (b.outcome) return;
    if (streaming >= MAX_OPEN_BATCHES) {
      b.outcome = { status: EPOCH_STATUS.CORRUPT, message: `${range}: more than ${MAX_OPEN_BATCHES} batches streaming on one connection` };
      return;
    }
    const file = path.join(this.opts.dir, `${STAGE_PREFIX}${process.pid}-${++this.stageCount}${STAGE_SUFFIX}`);
    try {
      b.stage = await StagingFile.create(file, begin);
    } catch (err) {
      b.outcome = { status: EPOCH_STATUS.IO, message: `the origin cannot stage ${range}: ${errText(err)}` };
    }
  }

  private async onData(m: Msg<'epoch-data'>, st: ConnState): Promise<void> {
    const b = st.batches.get(m.batch);
    if (!b) {
      // Discarded; its EPOCH_END, if one comes, is answered CORRUPT (no EPOCH_BEGIN).
      if (st.strays++ === 0) this.opts.log('warn', `applier: EPOCH_DATA for batch ${m.batch}, which has no EPOCH_BEGIN on this connection (further ones are not logged)`, { volume: this.opts.volume });
      return;
    }
    if (b.outcome) return; // refused or already bad: discard
    const index = b.digest.extents;
    const what = `extent ${index} (${m.length} bytes at ${m.offset})`;
    const min = this.opts.device.capabilities.blockSize.minimum;
    let problem: string | null = null;
    if (index >= b.begin.extents) problem = `more than the ${b.begin.extents} extents announced`;
    else if (b.digest.bytes + m.length > b.begin.bytes) problem = `${what} goes past the ${b.begin.bytes} bytes announced`;
    else if (!Number.isSafeInteger(m.offset) || m.offset + m.length > this.opts.device.size) problem = `${what} ends past the end of the disk (${this.opts.device.size} bytes)`;
    else if (min > 1 && (m.offset % min !== 0 || m.length % min !== 0)) problem = `${what} is not aligned to the disk's ${min}-byte blocks`;
    if (problem) return this.fail(b, EPOCH_STATUS.CORRUPT, problem);
    let data: Buffer | undefined;
    if (!m.zero) {
      try {
        data = decompressChunk(m.codec, m.payload, m.length);
      } catch (err) {
        return this.fail(b, EPOCH_STATUS.CORRUPT, `${what}: ${errText(err)}`);
      }
    }
    b.digest.update(m.offset, m.length, m.zero, data);
    try {
      const h = encodeExtent(index, m.offset, m.length, data);
      await b.stage!.append(data ? [h, data] : [h]);
    } catch (err) {
      await this.fail(b, EPOCH_STATUS.IO, `the origin cannot stage ${what}: ${errText(err)}`);
    }
  }

  private async onEnd(m: Msg<'epoch-end'>, conn: Conn, st: ConnState): Promise<void> {
    const b = st.batches.get(m.batch);
    st.batches.delete(m.batch);
    let outcome: BatchOutcome | undefined;
    if (!b) {
      outcome = { status: EPOCH_STATUS.CORRUPT, appliedSeq: this.seq, message: `EPOCH_END for batch ${m.batch}, which has no EPOCH_BEGIN on this connection` };
    } else {
      if (!b.outcome) {
        const d = b.digest;
        const got = d.digest();
        if (d.extents !== b.begin.extents || d.bytes !== b.begin.bytes) {
          await this.fail(b, EPOCH_STATUS.CORRUPT, `received ${d.extents} extents / ${d.bytes} bytes, BEGIN announced ${b.begin.extents} / ${b.begin.bytes}`);
        } else if (!got.equals(m.digest)) {
          await this.fail(b, EPOCH_STATUS.CORRUPT, 'the extents received do not match the batch digest');
        } else {
          outcome = await this.lock.run(() => this.commitAndApply(b, got));
        }
      }
      outcome ??= { status: b.outcome!.status, appliedSeq: this.seq, message: b.outcome!.message };
    }
    const volume = this.opts.volume;
    const status = EPOCH_STATUS_NAMES[outcome.status] ?? String(outcome.status);
    this.metrics.batches.inc({ volume, status });
    const range = b ? `${b.begin.firstSeq}..${b.begin.lastSeq}` : '?';
    this.opts.log(outcome.status === EPOCH_STATUS.APPLIED || outcome.status === EPOCH_STATUS.DUPLICATE ? 'debug' : 'warn', `batch ${m.batch} (epochs ${range}): ${status}`, { volume, appliedSeq: outcome.appliedSeq, message: outcome.message });
    conn.send({ type: 'epoch-ack', handle: m.handle, batch: m.batch, status: outcome.status, appliedSeq: outcome.appliedSeq, message: outcome.message });
  }

  /** Commit the staged batch and apply it. Runs under the lock: one batch of the volume at a time. */
  private async commitAndApply(b: Incoming, digest: Buffer): Promise<BatchOutcome> {
    const stage = b.stage!;
    b.stage = null;
    const { firstSeq, lastSeq } = b.begin;
    const range = `epochs ${firstSeq}..${lastSeq}`;
    if (this.pendingRedo) {
      try {
        await this.completeRedo();
      } catch (err) {
        await stage.discard();
        return { status: EPOCH_STATUS.IO, appliedSeq: this.seq, message: `the origin has not finished the batch after epoch ${this.seq}: ${errText(err)}` };
      }
    }
    const verdict = classifyBatch({ journalId: this.journal, appliedSeq: this.seq }, b.begin, this.opts.volume);
    if (verdict) {
      await stage.discard();
      return { ...verdict, appliedSeq: this.seq };
    }
    // Commit point: COMMIT durable in the file, the file durable as redo.log.
    try {
      await stage.commit(encodeCommit(b.digest.extents, b.digest.bytes, digest));
      await rename(stage.path, this.redoPath);
      await fsyncDir(this.opts.dir);
    } catch (err) {
      // Nothing reached the disk: whether or not redo.log survives, the origin is consistent.
      await stage.discard().catch(() => undefined);
      await this.resetRedo().catch(() => undefined);
      return { status: EPOCH_STATUS.IO, appliedSeq: this.seq, message: `the origin cannot persist ${range}: ${errText(err)}` };
    }
    const t0 = performance.now();
    try {
      await replayRedo(this.redoPath, this.opts.device, b.begin);
      await this.opts.device.flush();
      await this.record(b.begin);
    } catch (err) {
      this.pendingRedo = true;
      this.opts.log('error', `applier: ${range} are committed but not applied: ${errText(err)}`, { volume: this.opts.volume });
      return { status: EPOCH_STATUS.IO, appliedSeq: this.seq, message: `the origin could not apply ${range} (${errText(err)}); it completes them before the next batch` };
    }
    this.metrics.applySeconds.observe((performance.now() - t0) / 1000);
    await this.resetRedo().catch((err: unknown) => this.opts.log('warn', `applier: cannot remove ${this.redoPath} (${errText(err)}); it is stale and will be discarded`, { volume: this.opts.volume }));
    return { status: EPOCH_STATUS.APPLIED, appliedSeq: this.seq, message: `applied ${range}` };
  }

  /** The connection closed: drop the batches it was sending (uncommitted; the sender resends).
   *  A batch already committing completes. */
  connectionClosed(conn: object): void {
    this.closedConns.add(conn);
    const st = this.conns.get(conn);
    if (!st) return;
    this.conns.delete(conn);
    st.closed = true;
    const p = st.chain.then(async () => {
      for (const b of st.batches.values()) await this.discard(b).catch(() => undefined);
      st.batches.clear();
    });
    this.drops.add(p);
    void p.finally(() => this.drops.delete(p));
  }

  /** Drop every connection's unfinished batches, wait for a batch being applied, and release
   *  the state directory. The device stays open (it belongs to the caller). */
  close(): Promise<void> {
    this.closing ??= (async () => {
      this.closed = true;
      for (const conn of [...this.conns.keys()]) this.connectionClosed(conn);
      await Promise.all([...this.drops]);
      await this.lock.run(() => Promise.resolve());
      await this.applied.close();
    })();
    return this.closing;
  }
}
