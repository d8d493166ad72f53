// The remote edge's write-back journal of one volume (ARCHITECTURE.md §3.2, docs/journal-format.md):
// guest writes of `origin` ranges, persisted in order, sealed by epoch (the writes between two
// flushes), encrypted and authenticated at rest, and replayed to the shipper and the overlay.
//
//   <dir>/journal.state              id, key check, ackedSeq, checkpointSeq (replaced atomically)
//   <dir>/<16 hex digits>.jnl         a segment: header, then records; the name is its first epoch
//
// Writes: append() encodes and encrypts synchronously (the record is bound to the file position
// it will occupy) and queues; one pump writes the queue in order with positional writev at the
// end of the active segment. seal() queues a SEAL record; once the pump has written it, a group
// commit (src/block/group-commit.ts) fdatasyncs every segment written since the last sync, so
// concurrent seals share syncs and writes keep flowing while a sync runs. A segment is rolled at
// an epoch boundary; the new file is created only after everything before it is durable, so at
// most the last segment can have a torn tail. Recovery (open) keeps exactly the sealed epochs
// that are whole and authentic; see "Recovery" in docs/journal-format.md.

import { constants as fsc } from 'node:fs';
import { mkdir, open, readdir, readFile, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { fsyncDir, replaceFileDurably, writeFully } from '../util/durable.js';
import { randomBytes, createSecretKey, type KeyObject } from 'node:crypto';
import { GroupCommit } from '../block/group-commit.js';
import { DATA_KEY_SIZE, deriveKeys, keyCheckValue } from '../cache/keys.js';
import {
  decodeRecord,
  decodeRecordHeader,
  decodeSegmentHeader,
  decodeState,
  encodeRecord,
  encodeSegmentHeader,
  encodeState,
  FORMAT_VERSION,
  JournalRecordError,
  MAX_U53,
  MAX_WRITE_RECORD,
  NEED_MORE,
  REC,
  RECORD_HEADER_SIZE,
  RECORD_MAGIC,
  recordSize,
  SEGMENT_HEADER_SIZE,
  segmentKey,
  type JournalRecord,
  type RecordContext,
} from './journal-records.js';

export type JournalOp = { kind: 'write'; offset: number; data: Buffer } | { kind: 'zero'; offset: number; length: number };

export interface SealedEpoch {
  seq: number;
  /** op records in the epoch (a write larger than 1 MiB counts once per 1 MiB record). */
  ops: number;
  /** guest bytes covered by its ops (zero ranges included). */
  bytes: number;
  /** Date.now() at seal */
  sealedAt: number;
}

export interface JournalOptions {
  /** created (0700) if missing */
  dir: string;
  /** 32-byte family data key; records are sealed with keys derived from deriveKeys(dataKey).journalKey */
  dataKey: Buffer;
  /** roll to a new segment file at an epoch boundary once the current one is larger; default 64 MiB */
  segmentBytes?: number;
  /** default 'refuse' */
  onCorruption?: 'refuse' | 'discard-tail';
}

export interface RecoveryReport {
  /** bytes cut from segment ends or dropped with deleted segments. */
  truncatedBytes: number;
  /** op records dropped because their epoch was not (wholly) sealed, or lay after corruption. */
  droppedUnsealedOps: number;
  /** where corruption was found and discarded from ('discard-tail' only). */
  corruptAt?: { segment: string; position: number };
  /** epochs declared lost by a 'discard-tail' recovery: new epochs start after `last`. */
  skipped?: { first: number; last: number };
}

export type JournalErrorCode =
  /** the data key is not the one the journal was written with. */
  | 'SPW_ERR_JOURNAL_KEY'
  /** files of an unknown or newer format. */
  | 'SPW_ERR_JOURNAL_FORMAT'
  /** the journal was closed, or the directory is already open in this process. */
  | 'SPW_ERR_JOURNAL_CLOSED'
  | 'SPW_ERR_JOURNAL_LOCKED'
  /** an argument outside what the journal accepts. */
  | 'SPW_ERR_JOURNAL_ARGUMENT'
  /** the storage below failed; the journal refuses further writes (reopen to recover). */
  | 'SPW_ERR_JOURNAL_IO';

export class JournalError extends Error {
  readonly code: JournalErrorCode;
  constructor(code: JournalErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'JournalError';
    this.code = code;
  }
}

/** The journal on disk is damaged in a way that would lose sealed epochs if ignored. */
export class JournalCorruptError extends Error {
  readonly code = 'SPW_ERR_JOURNAL_CORRUPT';
  /** file name (in the journal directory) of the damaged segment or state file. */
  readonly segment: string;
  /** byte position in it of the first damaged record or header. */
  readonly position: number;
  constructor(segment: string, position: number, message: string) {
    super(message);
    this.name = 'JournalCorruptError';
    this.segment = segment;
    this.position = position;
  }
}

const DEFAULT_SEGMENT_BYTES = 64 << 20;
const STATE_FILE = 'journal.state';
const SEGMENT_RE = /^([0-9a-f]{16})\.jnl$/;
/** Unsealed bytes written before a sync is started in the background. */
const BACKGROUND_SYNC_BYTES = 8 * 1024 * 1024;

/** Bytes and buffers per positional writev. */
const MAX_WRITE_BATCH = 16 << 20;
const MAX_IOV = 1024;
/** Read window of the recovery scan and of readEpochs. */
const READ_WINDOW = 4 << 20;

function segmentName(seq: number): string {
  return `${seq.toString(16).padStart(16, '0')}.jnl`;
}

/** Positional reads through a window, so a scan reads megabytes at a time, not records. */
class FileWindow {
  private buf = Buffer.alloc(0);
  private start = 0;
  private end = 0;
  constructor(
    private readonly fh: FileHandle,
    readonly size: number,
  ) {}

  /** The bytes [pos, pos+n) clipped to the file: shorter than n only at the end of the file. */
  async view(pos: number, n: number): Promise<Buffer> {
    const want = Math.max(0, Math.min(n, this.size - pos));
    if (pos >= this.start && pos + want <= this.end) return this.buf.subarray(pos - this.start, pos - this.start + want);
    const len = Math.min(Math.max(want, READ_WINDOW), this.size - pos);
    if (this.buf.length < len) this.buf = Buffer.allocUnsafe(len);
    let got = 0;
    while (got < len) {
      const { bytesRead } = await this.fh.read(this.buf, got, len - got, pos + got);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    this.start = pos;
    this.end = pos + got;
    return this.buf.subarray(0, Math.min(want, got));
  }
}

type ReadResult = { rec: JournalRecord; size: number } | { problem: string };

async function readRecordAt(win: FileWindow, pos: number, ctx: RecordContext): Promise<ReadResult> {
  const hv = await win.view(pos, RECORD_HEADER_SIZE);
  try {
    const h = decodeRecordHeader(hv, 0);
    if (h === NEED_MORE) return { problem: 'record header cut short by the end of the file' };
    const rv = await win.view(pos, h.size);
    const r = decodeRecord(rv, 0, ctx, pos);
    if (r === NEED_MORE) return { problem: 'record cut short by the end of the file' };
    return { rec: r.rec, size: r.bytesRead };
  } catch (err) {
    if (err instanceof JournalRecordError) return { problem: err.message };
    throw err;
  }
}

/**
 * Every authentic record of the file at or after `from`, found by their magic (a resync scan:
 * framing after a damaged record cannot be trusted). Authentication binds each record to its
 * position, so a hit is a record our writer put exactly there.
 */
async function* authenticRecords(win: FileWindow, from: number, ctx: RecordContext): AsyncGenerator<{ pos: number; rec: JournalRecord }> {
  let p = from;
  while (p + RECORD_HEADER_SIZE <= win.size) {
    const v = await win.view(p, 1 << 20);
    const i = v.indexOf(RECORD_MAGIC);
    if (i < 0) {
      p += Math.max(1, v.length - (RECORD_MAGIC.length - 1));
      continue;
    }
    const r = await readRecordAt(win, p + i, ctx);
    if ('rec' in r) yield { pos: p + i, rec: r.rec };
    p += i + 1;
  }
}

interface Segment {
  /** first epoch seq (the file name). */
  readonly name: number;
  /** last epoch of the previous segment (name - 1 unless epochs were skipped). */
  readonly prevLast: number;
  readonly file: string;
  readonly ctx: RecordContext;
  /** end of the records queued for it (active segment) or on disk. */
  size: number;
  /** bytes written to the file. */
  written: number;
  fh: FileHandle | null;
  /** created, header durable. */
  exists: boolean;
}

interface EpochMeta extends SealedEpoch {
  readonly seg: Segment;
  /** position of its first record and just past its SEAL. */
  readonly start: number;
  readonly end: number;
}

interface SealWaiter {
  readonly meta: EpochMeta;
  readonly resolve: (seq: number) => void;
  readonly reject: (err: unknown) => void;
  settled: boolean;
}

/** What recovery hands to the constructor. */
interface JournalInit {
  readonly dir: string;
  readonly id: Buffer;
  readonly jkey: KeyObject;
  readonly keyCheck: Buffer;
  readonly segmentBytes: number;
  /** oldest first; the last one is active, open and exists. */
  readonly segments: Segment[];
  readonly epochs: EpochMeta[];
  readonly lastSealed: number;
  readonly acked: number;
  readonly checkpoint: number;
  readonly report: RecoveryReport;
}

interface QueueItem {
  readonly seg: Segment;
  readonly buf: Buffer;
  readonly seal?: SealWaiter;
}

/** Directories open in this process: two writers would interleave records. */
const openDirs = new Set<string>();

function checkSeq(what: string, v: number): void {
  if (!Number.isSafeInteger(v) || v < 0) throw new JournalError('SPW_ERR_JOURNAL_ARGUMENT', `${what} must be an integer in 0..2^53, got ${v}`);
}

export class Journal {
  readonly id: Buffer;
  /** What open() had to repair. */
  readonly recoveryReport: RecoveryReport;
  private readonly dir: string;
  private readonly jkey: KeyObject;
  private readonly keyCheck: Buffer;
  private readonly segmentBytes: number;
  private segments: Segment[];
  private cur: Segment;
  /** sealed, durable epochs still in the retained segments, by seq. */
  private epochs: EpochMeta[];
  private lastSealedSeq: number;
  private acked: number;
  private checkpoint: number;
  // the open (unsealed) epoch
  private openSeq: number;
  private openOps = 0;
  private openBytes = 0;
  private openStart = 0;
  /** guest bytes of ops whose epoch is not durable yet. */
  private queuedBytes = 0;
  /** guest bytes of durable epochs after ackedSeq. */
  private sealedUnacked = 0;
  // the write pump
  private queue: QueueItem[] = [];
  private pumping: Promise<void> | null = null;
  private readonly gc: GroupCommit;
  /** bytes written since the last sync was started. */
  private unsyncedBytes = 0;
  private readonly dirty = new Set<Segment>();
  /** created segments whose file handle is open. */
  private readonly openFiles = new Set<Segment>();
  private readonly waiters = new Set<SealWaiter>();
  private lastSealPromise: Promise<number> | null = null;
  private failed: JournalError | null = null;
  private closed = false;
  private stateChain: Promise<void> = Promise.resolve();

  private constructor(init: JournalInit) {
    this.dir = init.dir;
    this.id = init.id;
    this.jkey = init.jkey;
    this.keyCheck = init.keyCheck;
    this.segmentBytes = init.segmentBytes;
    this.segments = init.segments;
    this.cur = init.segments[init.segments.length - 1] as Segment;
    for (const s of init.segments) if (s.fh) this.openFiles.add(s);
    this.epochs = init.epochs;
    this.lastSealedSeq = init.lastSealed;
    this.acked = init.acked;
    this.checkpoint = init.checkpoint;
    this.recoveryReport = init.report;
    this.openSeq = init.lastSealed + 1;
    for (const e of init.epochs) if (e.seq > init.acked) this.sealedUnacked += e.bytes;
    this.gc = new GroupCommit(() => this.syncDirty());
  }

  // ---------------------------------------------------------------------------------- open

  /** Create a new journal (random 16-byte id) in `dir`, or recover the one there. */
  static async open(opts: JournalOptions): Promise<Journal> {
    if (!Buffer.isBuffer(opts.dataKey) || opts.dataKey.length !== DATA_KEY_SIZE) {
      throw new JournalError('SPW_ERR_JOURNAL_ARGUMENT', `a family data key is ${DATA_KEY_SIZE} bytes, got ${opts.dataKey?.length}; check what the local-role edge sent`);
    }
    const segmentBytes = opts.segmentBytes ?? DEFAULT_SEGMENT_BYTES;
    if (!Number.isSafeInteger(segmentBytes) || segmentBytes < SEGMENT_HEADER_SIZE) {
      throw new JournalError('SPW_ERR_JOURNAL_ARGUMENT', `segmentBytes must be an integer of at least ${SEGMENT_HEADER_SIZE}, got ${segmentBytes}`);
    }
    const mode = opts.onCorruption ?? 'refuse';
    if (mode !== 'refuse' && mode !== 'discard-tail') throw new JournalError('SPW_ERR_JOURNAL_ARGUMENT', `onCorruption must be 'refuse' or 'discard-tail', got ${String(mode)}`);
    const dir = path.resolve(opts.dir);
    if (openDirs.has(dir)) throw new JournalError('SPW_ERR_JOURNAL_LOCKED', `journal ${dir} is already open in this process; close it first`);
    openDirs.add(dir);
    try {
      await mkdir(dir, { recursive: true, mode: 0o700 });
      const keys = deriveKeys(opts.dataKey);
      keys.cacheKey.fill(0);
      keys.signKey.fill(0);
      const keyCheck = keyCheckValue(keys.journalKey);
      const jkey = createSecretKey(keys.journalKey);
      keys.journalKey.fill(0);
      return new Journal(await recover(dir, jkey, keyCheck, segmentBytes, mode));
    } catch (err) {
      openDirs.delete(dir);
      throw err;
    }
  }

  // ------------------------------------------------------------------------------- getters

  /** seq of the newest sealed (durable) epoch, 0 if none. */
  get lastSealed(): number {
    return this.lastSealedSeq;
  }

  /** durable: the origin applied everything up to here. */
  get ackedSeq(): number {
    return this.acked;
  }

  /** durable: the remote overlay holds everything up to here. */
  get checkpointSeq(): number {
    return this.checkpoint;
  }

  /** Guest bytes of ops not durable yet plus those of sealed epochs after ackedSeq. */
  get unackedBytes(): number {
    return this.queuedBytes + this.sealedUnacked;
  }

  /** The segment files on disk, oldest first (for status and tests). */
  get segmentFiles(): string[] {
    return this.segments.filter((s) => s.exists).map((s) => path.basename(s.file));
  }

  /** Oldest epoch readEpochs can still return (older ones were trimmed). */
  get firstAvailable(): number {
    return (this.segments[0] as Segment).prevLast + 1;
  }

  // --------------------------------------------------------------------------------- writes

  /**
   * Append an op to the current (unsealed) epoch. Synchronous: it is encrypted and queued in
   * order now, written soon, durable once the seal() that follows it resolves. The data is
   * not kept (it may be reused once this returns). Writes are split into 1 MiB records.
   */
  append(op: JournalOp): void {
    this.assertWritable();
    if (op.kind === 'write') {
      if (!Buffer.isBuffer(op.data)) throw new JournalError('SPW_ERR_JOURNAL_ARGUMENT', 'a write op needs a Buffer');
      const len = op.data.length;
      this.checkRange(op.offset, len);
      for (let done = 0; done < len; done += MAX_WRITE_RECORD) {
        const data = op.data.subarray(done, Math.min(len, done + MAX_WRITE_RECORD));
        this.push({ type: REC.WRITE, seq: this.openSeq, offset: op.offset + done, data }, data.length);
      }
    } else if (op.kind === 'zero') {
      this.checkRange(op.offset, op.length);
      if (op.length > 0) this.push({ type: REC.ZERO, seq: this.openSeq, offset: op.offset, length: op.length }, op.length);
    } else {
      throw new JournalError('SPW_ERR_JOURNAL_ARGUMENT', `unknown op kind ${String((op as { kind: unknown }).kind)}`);
    }
  }

  /**
   * Close the current epoch and make it durable; resolves with its seq. With nothing appended
   * since the last seal it resolves with the newest seal's seq once that is durable. Each op
   * belongs to the epoch of the first seal() called after it.
   */
  seal(): Promise<number> {
    if (this.failed) return Promise.reject(this.failed);
    if (this.closed) return Promise.reject(this.closedError());
    if (this.openOps === 0) return this.lastSealPromise ?? Promise.resolve(this.lastSealedSeq);
    const seq = this.openSeq;
    const seg = this.cur;
    const rec: JournalRecord = { type: REC.SEAL, seq, ops: this.openOps, bytes: this.openBytes, sealedAt: Date.now() };
    const buf = Buffer.allocUnsafe(recordSize(rec));
    encodeRecord(buf, 0, rec, seg.ctx, seg.size);
    seg.size += buf.length;
    const meta: EpochMeta = { seq, ops: rec.ops, bytes: rec.bytes, sealedAt: rec.sealedAt, seg, start: this.openStart, end: seg.size };
    const p = new Promise<number>((resolve, reject) => {
      const seal: SealWaiter = { meta, resolve, reject, settled: false };
      this.waiters.add(seal);
      this.enqueue({ seg, buf, seal });
    });
    this.openSeq++;
    this.openOps = 0;
    this.openBytes = 0;
    if (seg.size > this.segmentBytes) this.roll();
    this.lastSealPromise = p;
    return p;
  }

  // ----------------------------------------------------------------------------------- reads

  /** Sealed epochs after ackedSeq, oldest first (metadata only). */
  pending(): SealedEpoch[] {
    const out: SealedEpoch[] = [];
    for (let i = this.indexOfFirst(this.acked + 1); i < this.epochs.length; i++) {
      const e = this.epochs[i] as EpochMeta;
      out.push({ seq: e.seq, ops: e.ops, bytes: e.bytes, sealedAt: e.sealedAt });
    }
    return out;
  }

  /**
   * The ops of sealed epochs first..last in journal order, decrypted and verified again.
   * Epochs a discard-tail recovery declared lost (recoveryReport.skipped) yield nothing.
   */
  async *readEpochs(first: number, last: number): AsyncIterable<{ seq: number; op: JournalOp }> {
    checkSeq('first', first);
    checkSeq('last', last);
    if (first > last) return;
    if (last > this.lastSealedSeq) throw new JournalError('SPW_ERR_JOURNAL_ARGUMENT', `epoch ${last} is not sealed yet (newest sealed: ${this.lastSealedSeq})`);
    if (first < this.firstAvailable) throw new JournalError('SPW_ERR_JOURNAL_ARGUMENT', `epochs before ${this.firstAvailable} were trimmed (acked ${this.acked}, checkpoint ${this.checkpoint}); cannot read from ${first}`);
    const metas = this.epochs.slice(this.indexOfFirst(first), this.indexOfFirst(last + 1));
    let i = 0;
    while (i < metas.length) {
      const seg = (metas[i] as EpochMeta).seg;
      let fh: FileHandle;
      try {
        fh = await open(seg.file, 'r');
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new JournalError('SPW_ERR_JOURNAL_ARGUMENT', `segment ${path.basename(seg.file)} was trimmed while epochs were read from it`, { cause: err });
        throw err;
      }
      try {
        const win = new FileWindow(fh, (await fh.stat()).size);
        for (; i < metas.length && (metas[i] as EpochMeta).seg === seg; i++) {
          const m = metas[i] as EpochMeta;
          let pos = m.start;
          let ops = 0;
          let bytes = 0;
          for (;;) {
            const r = await readRecordAt(win, pos, seg.ctx);
            const bad = (why: string): JournalCorruptError =>
              new JournalCorruptError(path.basename(seg.file), pos, `journal ${this.dir}: segment ${path.basename(seg.file)} at byte ${pos}: ${why} while reading sealed epoch ${m.seq}, which was intact when the journal was opened (the disk changed it since). Epoch ${m.seq} cannot be read; the origin has everything up to ${this.acked}. Check the disk, then reopen the journal (recovery decides what is kept).`);
            if ('problem' in r) throw bad(r.problem);
            const rec = r.rec;
            if (rec.seq !== m.seq) throw bad(`record of epoch ${rec.seq}`);
            pos += r.size;
            if (rec.type === REC.SEAL) {
              if (rec.ops !== ops || rec.bytes !== bytes || pos !== m.end) throw bad('seal does not match the records before it');
              break;
            }
            if (pos > m.end) throw bad('epoch runs past its seal');
            ops++;
            if (rec.type === REC.WRITE) {
              bytes += rec.data.length;
              yield { seq: m.seq, op: { kind: 'write', offset: rec.offset, data: rec.data } };
            } else {
              bytes += rec.length;
              yield { seq: m.seq, op: { kind: 'zero', offset: rec.offset, length: rec.length } };
            }
          }
        }
      } finally {
        await fh.close();
      }
    }
  }

  // ---------------------------------------------------------------------------- positions

  /** Durably record that the origin applied epochs ≤ seq, then trim. Idempotent. */
  setAcked(seq: number): Promise<void> {
    return this.updateState('ackedSeq', seq);
  }

  /** Durably record that the overlay holds epochs ≤ seq, then trim. Idempotent. */
  setCheckpoint(seq: number): Promise<void> {
    return this.updateState('checkpointSeq', seq);
  }

  private updateState(which: 'ackedSeq' | 'checkpointSeq', seq: number): Promise<void> {
    try {
      checkSeq(which, seq);
      if (this.closed) throw this.closedError();
      if (seq > this.lastSealedSeq) throw new JournalError('SPW_ERR_JOURNAL_ARGUMENT', `${which} ${seq} is after the newest sealed epoch ${this.lastSealedSeq}`);
    } catch (err) {
      return Promise.reject(err);
    }
    const step = this.stateChain.then(async () => {
      const acked = which === 'ackedSeq' ? Math.max(this.acked, seq) : this.acked;
      const checkpoint = which === 'checkpointSeq' ? Math.max(this.checkpoint, seq) : this.checkpoint;
      if (acked !== this.acked || checkpoint !== this.checkpoint) {
        await writeState(this.dir, this.jkey, { id: this.id, keyCheck: this.keyCheck, ackedSeq: acked, checkpointSeq: checkpoint });
        for (let i = this.indexOfFirst(this.acked + 1); i < this.epochs.length; i++) {
          const e = this.epochs[i] as EpochMeta;
          if (e.seq > acked) break;
          this.sealedUnacked -= e.bytes;
        }
        this.acked = acked;
        this.checkpoint = checkpoint;
      }
      // also when nothing changed: a segment rolled since may have made older ones removable
      await this.trim();
    });
    this.stateChain = step.catch(() => undefined);
    return step;
  }

  /** Delete the oldest segments whose epochs are all ≤ min(ackedSeq, checkpointSeq). The
   *  active segment and the newest file on disk are never deleted. */
  private async trim(): Promise<void> {
    const floor = Math.min(this.acked, this.checkpoint);
    let n = 0;
    while (n < this.segments.length - 1) {
      const next = this.segments[n + 1] as Segment;
      if (!next.exists || next.prevLast > floor) break;
      n++;
    }
    if (n === 0) return;
    const gone = this.segments.slice(0, n);
    this.segments = this.segments.slice(n);
    const firstKept = this.indexOfFirst((this.segments[0] as Segment).prevLast + 1);
    this.epochs = this.epochs.slice(firstKept);
    for (const s of gone) await unlink(s.file).catch((err: NodeJS.ErrnoException) => (err.code === 'ENOENT' ? undefined : Promise.reject(err)));
    await fsyncDir(this.dir);
  }

  // ---------------------------------------------------------------------------------- close

  /** Write what is queued (without sealing it: unsealed ops are dropped at the next open, as
   *  after a crash), wait for seals in flight, and release the directory. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    while (this.pumping) await this.pumping;
    await this.lastSealPromise?.catch(() => undefined);
    await this.stateChain;
    // no sync may still run on a file handle about to be closed
    await this.gc.flush().catch(() => undefined);
    for (const s of this.openFiles) await s.fh?.close().catch(() => undefined);
    this.openFiles.clear();
    openDirs.delete(this.dir);
  }

  // ------------------------------------------------------------------------------ internals

  private closedError(): JournalError {
    return new JournalError('SPW_ERR_JOURNAL_CLOSED', `journal ${this.dir} is closed`);
  }

  private assertWritable(): void {
    if (this.failed) throw this.failed;
    if (this.closed) throw this.closedError();
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0 || offset + length > MAX_U53) {
      throw new JournalError('SPW_ERR_JOURNAL_ARGUMENT', `range ${offset}+${length} outside 0..2^53`);
    }
  }

  /** index in this.epochs of the first epoch with seq ≥ seq. */
  private indexOfFirst(seq: number): number {
    let lo = 0;
    let hi = this.epochs.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((this.epochs[mid] as EpochMeta).seq < seq) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  private push(rec: JournalRecord, guestBytes: number): void {
    const seg = this.cur;
    const buf = Buffer.allocUnsafe(recordSize(rec));
    encodeRecord(buf, 0, rec, seg.ctx, seg.size);
    if (this.openOps === 0) this.openStart = seg.size;
    seg.size += buf.length;
    this.openOps++;
    this.openBytes += guestBytes;
    this.queuedBytes += guestBytes;
    this.enqueue({ seg, buf });
  }

  /** The next epoch goes to a new segment, created by the pump once everything before is durable. */
  private roll(): void {
    const seg = newSegment(this.dir, this.jkey, this.id, this.openSeq, this.openSeq - 1);
    this.segments.push(seg);
    this.cur = seg;
  }

  private enqueue(item: QueueItem): void {
    this.queue.push(item);
    // Started on a microtask: a burst of appends in one tick goes out in one writev.
    this.pumping ??= Promise.resolve().then(() => this.pump());
  }

  private async pump(): Promise<void> {
    try {
      while (this.queue.length > 0 && !this.failed) {
        const batch = this.queue;
        this.queue = [];
        let i = 0;
        while (i < batch.length && !this.failed) {
          const seg = (batch[i] as QueueItem).seg;
          if (!seg.fh) await this.createFile(seg);
          const fh = seg.fh!;
          const bufs: Buffer[] = [];
          const seals: SealWaiter[] = [];
          let bytes = 0;
          for (; i < batch.length && bufs.length < MAX_IOV && bytes < MAX_WRITE_BATCH; i++) {
            const it = batch[i] as QueueItem;
            if (it.seg !== seg) break;
            bufs.push(it.buf);
            bytes += it.buf.length;
            if (it.seal) seals.push(it.seal);
          }
          await writeFully(fh, bufs, seg.written);
          seg.written += bytes;
          this.dirty.add(seg);
          this.unsyncedBytes += bytes;
          if (seals.length === 0 && this.unsyncedBytes >= BACKGROUND_SYNC_BYTES) {
            // Write back a long unsealed epoch as it grows, so that the fdatasync of its seal
            // (which the guest's FLUSH, or new writes past epochMax, wait for) stays short.
            this.unsyncedBytes = 0;
            void this.gc.flush().catch((err: unknown) => this.fail(err));
          }
          if (seals.length > 0) {
            this.unsyncedBytes = 0;
            // A sync that starts after this write covers it and everything written before.
            void this.gc.flush().then(
              () => {
                for (const s of seals) this.durable(s);
              },
              (err: unknown) => this.fail(err),
            );
          }
        }
      }
    } catch (err) {
      this.fail(err);
    } finally {
      this.pumping = null;
    }
  }

  /** Create a rolled-to segment: only after every earlier write is durable, so no segment but
   *  the last can ever have a torn tail; header and directory entry durable before records. */
  private async createFile(seg: Segment): Promise<void> {
    await this.gc.flush();
    for (const s of this.openFiles) {
      await s.fh?.close();
      s.fh = null;
    }
    this.openFiles.clear();
    const fh = await open(seg.file, fsc.O_RDWR | fsc.O_CREAT | fsc.O_TRUNC, 0o600);
    seg.fh = fh;
    this.openFiles.add(seg);
    await writeFully(fh, [encodeSegmentHeader(this.jkey, this.id, this.keyCheck, seg.name, seg.prevLast)], 0);
    await fh.datasync();
    await fsyncDir(this.dir);
    seg.written = SEGMENT_HEADER_SIZE;
    seg.exists = true;
  }

  private async syncDirty(): Promise<void> {
    const segs = [...this.dirty];
    this.dirty.clear();
    for (const s of segs) await s.fh?.datasync();
  }

  private durable(w: SealWaiter): void {
    if (w.settled) return;
    w.settled = true;
    this.waiters.delete(w);
    const m = w.meta;
    this.epochs.push(m);
    this.lastSealedSeq = Math.max(this.lastSealedSeq, m.seq);
    this.queuedBytes -= m.bytes;
    if (m.seq > this.acked) this.sealedUnacked += m.bytes;
    w.resolve(m.seq);
  }

  /** A write or sync failed: the file may hold a hole or unsynced pages, so nothing more is
   *  written; every seal not yet durable is refused. Reopening recovers what is durable. */
  private fail(err: unknown): void {
    if (!this.failed) {
      this.failed = new JournalError('SPW_ERR_JOURNAL_IO', `cannot write journal ${this.dir}: ${(err as Error)?.message ?? String(err)}; epochs after ${this.lastSealedSeq} are not durable. Reopen the journal once the storage is fixed.`, { cause: err });
    }
    for (const w of this.waiters) {
      w.settled = true;
      w.reject(this.failed);
    }
    this.waiters.clear();
    this.queue = [];
  }
}

// ----------------------------------------------------------------------------------- recovery

function newSegment(dir: string, jkey: KeyObject, id: Buffer, name: number, prevLast: number): Segment {
  return {
    name,
    prevLast,
    file: path.join(dir, segmentName(name)),
    ctx: { key: segmentKey(jkey, id, name), id, segment: name },
    size: SEGMENT_HEADER_SIZE,
    written: SEGMENT_HEADER_SIZE,
    fh: null,
    exists: false,
  };
}

/** tmp + fsync + rename + directory fsync. */
async function writeState(dir: string, jkey: KeyObject, s: { id: Buffer; keyCheck: Buffer; ackedSeq: number; checkpointSeq: number }): Promise<void> {
  await replaceFileDurably(path.join(dir, STATE_FILE), encodeState(jkey, s));
}

/** A new segment file with its header, durable with its directory entry; returns it open. */
async function createSegmentFile(dir: string, jkey: KeyObject, id: Buffer, keyCheck: Buffer, name: number, prevLast: number): Promise<Segment> {
  const seg = newSegment(dir, jkey, id, name, prevLast);
  const fh = await open(seg.file, fsc.O_RDWR | fsc.O_CREAT | fsc.O_TRUNC, 0o600);
  seg.fh = fh;
  await writeFully(fh, [encodeSegmentHeader(jkey, id, keyCheck, name, prevLast)], 0);
  await fh.datasync();
  await fsyncDir(dir);
  seg.exists = true;
  return seg;
}

async function readStateFile(dir: string): Promise<Buffer | null> {
  try {
    return await readFile(path.join(dir, STATE_FILE));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}


interface Damage {
  readonly file: string;
  readonly position: number;
  readonly reason: string;
  /** the epoch the damaged record belongs to (the first one that cannot be kept). */
  readonly epoch: number;
}

/**
 * Scan every segment (read-only), decide what to keep, and only then change anything: cut
 * the torn or unsealed tail of the last segment, and with 'discard-tail' everything from the
 * first damaged record on. Refusing leaves the directory exactly as it was.
 */
async function recover(dir: string, jkey: KeyObject, keyCheck: Buffer, segmentBytes: number, mode: 'refuse' | 'discard-tail'): Promise<JournalInit> {
  const names: number[] = [];
  let staleTmp = false;
  for (const f of await readdir(dir)) {
    const m = SEGMENT_RE.exec(f);
    if (m) names.push(parseInt(m[1] as string, 16));
    else if (f === `${STATE_FILE}.tmp`) staleTmp = true; // a state update cut short: never authoritative
  }
  names.sort((a, b) => a - b);
  for (const n of names) {
    if (!Number.isSafeInteger(n) || n < 1) throw new JournalCorruptError(segmentName(n), 0, `journal ${dir}: segment file ${segmentName(n)} names an impossible epoch; move it out of the directory`);
  }

  // ---- state
  const raw = await readStateFile(dir);
  let id: Buffer;
  let acked = 0;
  let checkpoint = 0;
  let fresh = false;
  if (raw === null) {
    if (names.length > 0) {
      throw new JournalCorruptError(STATE_FILE, 0, `journal ${dir}: ${STATE_FILE} is missing but ${names.length} segment file(s) are there, so which epochs the origin and the overlay hold is unknown. Restore ${STATE_FILE} from a backup, or move the directory away to start an empty journal (its sealed epochs are then lost). Nothing was changed.`);
    }
    id = randomBytes(16);
    fresh = true;
  } else {
    const s = decodeState(jkey, keyCheck, raw);
    if (s === 'key') throw new JournalError('SPW_ERR_JOURNAL_KEY', `journal ${dir} was written with another data key (key check mismatch); open it with the key of the family it belongs to. Nothing was changed.`);
    if (s === 'version') throw new JournalError('SPW_ERR_JOURNAL_FORMAT', `journal ${dir} has format version ${raw.readUInt16BE(8)}, this spillway reads ${FORMAT_VERSION}; use a matching spillway`);
    if (typeof s === 'string') {
      const why = s === 'mac' ? 'checksum mismatch' : s === 'magic' ? 'not a journal state file' : 'wrong size';
      throw new JournalCorruptError(STATE_FILE, 0, `journal ${dir}: ${STATE_FILE} is damaged (${why}), so ackedSeq and checkpointSeq are unknown. Restore it from a backup, or move the directory away to start an empty journal (its sealed epochs are then lost). Nothing was changed.`);
    }
    id = s.id;
    acked = s.ackedSeq;
    checkpoint = s.checkpointSeq;
  }
  const floor = Math.min(acked, checkpoint);
  const top = Math.max(acked, checkpoint);

  // ---- scan
  const report: RecoveryReport = { truncatedBytes: 0, droppedUnsealedOps: 0 };
  const kept: Segment[] = [];
  const epochs: EpochMeta[] = [];
  const cuts: { seg: Segment; to: number }[] = [];
  const deletes: string[] = [];
  /** last epoch of the kept chain (prevLast of a segment without epochs). */
  let chainLast: number | null = null;
  /** last seq handed out according to the kept segments (a skip segment counts its skip). */
  let numberLast = 0;
  let damage: Damage | null = null;
  let highestSeen = 0;
  let tornCreation = false;

  for (let i = 0; i < names.length && !damage; i++) {
    const name = names[i] as number;
    const base = segmentName(name);
    const file = path.join(dir, base);
    const isLast = i === names.length - 1;
    const ctx: RecordContext = { key: segmentKey(jkey, id, name), id, segment: name };
    const fh = await open(file, 'r');
    try {
      const size = (await fh.stat()).size;
      const win = new FileWindow(fh, size);
      const expected = chainLast === null ? floor + 1 : chainLast + 1;
      const h = decodeSegmentHeader(jkey, await win.view(0, SEGMENT_HEADER_SIZE));
      if (h && h.macOk && h.version !== FORMAT_VERSION) throw new JournalError('SPW_ERR_JOURNAL_FORMAT', `journal segment ${file} has format version ${h.version}, this spillway reads ${FORMAT_VERSION}; use a matching spillway`);
      let headerProblem: string | null = null;
      if (!h) headerProblem = size < SEGMENT_HEADER_SIZE ? `segment header cut short (${size} bytes)` : 'no segment header';
      else if (!h.macOk) headerProblem = 'segment header fails its checksum';
      else if (!h.id.equals(id)) headerProblem = `segment belongs to journal ${h.id.toString('hex')}, not ${id.toString('hex')}`;
      else if (!h.keyCheck.equals(keyCheck)) headerProblem = 'segment was written with another key';
      else if (h.firstSeq !== name) headerProblem = `header says first epoch ${h.firstSeq}, the file name ${name}`;
      else if (h.prevLast >= name) headerProblem = `header says previous epoch ${h.prevLast}, not before its first epoch ${name}`;
      else if (chainLast === null ? h.prevLast > floor : h.prevLast !== chainLast) {
        headerProblem =
          chainLast === null
            ? `epochs ${floor + 1}..${h.prevLast} are missing (the oldest segment starts after them; the origin has up to ${acked}, the overlay up to ${checkpoint})`
            : h.prevLast > chainLast
              ? `epochs ${chainLast + 1}..${h.prevLast} are missing between this segment and the one before`
              : `segment overlaps the one before (its previous epoch is ${h.prevLast}, the one before ends at ${chainLast})`;
      }
      if (headerProblem !== null) {
        // A segment's header is durable before any record goes in: a last segment with no
        // more than a bad header is a creation cut short by a crash.
        if (isLast && size <= SEGMENT_HEADER_SIZE && (!h || !h.macOk)) {
          deletes.push(base);
          report.truncatedBytes += size;
          tornCreation = true;
          continue;
        }
        damage = { file: base, position: 0, reason: headerProblem, epoch: expected };
        for await (const r of authenticRecords(win, 0, ctx)) highestSeen = Math.max(highestSeen, r.rec.seq);
        break;
      }
      const hdr = h as NonNullable<typeof h>;

      // Records: epochs in order, each closed by a SEAL that counts its ops and bytes.
      const seg: Segment = { name, prevLast: hdr.prevLast, file, ctx, size, written: size, fh: null, exists: true };
      let epoch = name;
      let pos = SEGMENT_HEADER_SIZE;
      let sealEnd = pos;
      let ops = 0;
      let bytes = 0;
      let problem: { pos: number; reason: string; authentic: boolean } | null = null;
      while (pos < size) {
        const r = await readRecordAt(win, pos, ctx);
        if ('problem' in r) {
          problem = { pos, reason: r.problem, authentic: false };
          break;
        }
        const rec = r.rec;
        if (rec.seq !== epoch) {
          problem = { pos, reason: `record of epoch ${rec.seq} where epoch ${epoch} was expected`, authentic: true };
          break;
        }
        if (rec.type === REC.SEAL) {
          if (rec.ops !== ops || rec.bytes !== bytes) {
            problem = { pos, reason: `the seal of epoch ${epoch} counts ${rec.ops} ops / ${rec.bytes} bytes, the records before it ${ops} / ${bytes}`, authentic: true };
            break;
          }
          epochs.push({ seq: epoch, ops, bytes, sealedAt: rec.sealedAt, seg, start: sealEnd, end: pos + r.size });
          epoch++;
          sealEnd = pos + r.size;
          ops = 0;
          bytes = 0;
        } else {
          ops++;
          bytes += rec.type === REC.WRITE ? rec.data.length : rec.length;
        }
        pos += r.size;
      }
      if (problem) {
        // A torn tail: a bad record in the last file with no authentic record after it (a
        // crash cuts writes short, it does not forge records past the cut). Anything else
        // damaged bytes that were durable, and later epochs may depend on the damaged one.
        const torn = isLast && !problem.authentic && (await authenticRecords(win, problem.pos + 1, ctx).next()).done === true;
        if (!torn) {
          damage = { file: base, position: problem.pos, reason: problem.reason, epoch };
          for await (const r of authenticRecords(win, problem.pos + 1, ctx)) highestSeen = Math.max(highestSeen, r.rec.seq);
        }
      } else if (!isLast && sealEnd < size) {
        damage = { file: base, position: sealEnd, reason: 'records of an unsealed epoch in a segment that another one follows', epoch };
      }
      if (damage && mode === 'refuse') break;
      if (sealEnd < size) {
        // the unsealed (torn, or damaged) tail goes: an epoch is whole and sealed, or absent
        cuts.push({ seg, to: sealEnd });
        report.truncatedBytes += size - sealEnd;
        report.droppedUnsealedOps += ops;
        seg.size = seg.written = sealEnd;
      }
      chainLast = epoch > name ? epoch - 1 : hdr.prevLast;
      numberLast = epoch > name ? epoch - 1 : name - 1;
      kept.push(seg);
    } finally {
      await fh.close();
    }
  }

  const refuse = (d: Damage): JournalCorruptError =>
    new JournalCorruptError(
      d.file,
      d.position,
      `journal ${dir}: ${d.file} is damaged at byte ${d.position} (${d.reason}); epoch ${d.epoch} and every later one cannot be trusted` +
        (highestSeen > 0 ? ` (authentic records up to epoch ${highestSeen} follow the damage)` : '') +
        `. Epochs up to ${d.epoch - 1} are intact; the origin applied up to ${acked}, the overlay holds up to ${checkpoint}. ` +
        `To keep epochs up to ${d.epoch - 1} and drop the rest, reopen with onCorruption: 'discard-tail' (writes of dropped epochs after ${top} are lost); ` +
        `or restore ${dir} from a backup. Nothing was changed.`,
    );

  if (damage) {
    if (mode === 'refuse') throw refuse(damage);
    // discard-tail: the damaged segment is cut (or dropped with a bad header), later ones go
    for (const n of names.slice(kept.length)) {
      const base = segmentName(n);
      if (deletes.includes(base)) continue;
      const fh = await open(path.join(dir, base), 'r');
      try {
        const size = (await fh.stat()).size;
        report.truncatedBytes += size;
        const win = new FileWindow(fh, size);
        for await (const r of authenticRecords(win, 0, { key: segmentKey(jkey, id, n), id, segment: n })) highestSeen = Math.max(highestSeen, r.rec.seq);
      } finally {
        await fh.close();
      }
      highestSeen = Math.max(highestSeen, n - 1);
      deletes.push(base);
    }
    report.corruptAt = { segment: damage.file, position: damage.position };
  }
  if (kept.length === 0) {
    const empty = top === 0 && (names.length === 0 || (tornCreation && names.length === 1 && names[0] === 1));
    if (!empty && !damage) {
      const d: Damage = { file: names.length > 0 ? segmentName(names[0] as number) : STATE_FILE, position: 0, reason: 'no segment holds the epochs after the ones both the origin and the overlay have', epoch: floor + 1 };
      if (mode === 'refuse') throw refuse(d);
      report.corruptAt = { segment: d.file, position: 0 };
    }
  } else if (numberLast < top) {
    const last = kept[kept.length - 1] as Segment;
    const d: Damage = { file: path.basename(last.file), position: last.size, reason: `the journal ends at epoch ${numberLast}, but epochs up to ${top} were acknowledged (a segment is missing)`, epoch: numberLast + 1 };
    if (mode === 'refuse') throw refuse(d);
    report.corruptAt ??= { segment: d.file, position: d.position };
  }

  // Numbering resumes after every seq that may have been handed out: a new epoch must never
  // reuse a seq the origin may have applied (it applies each seq once).
  const last = kept.length > 0 ? numberLast : floor;
  const resumeAfter = Math.max(last, top, highestSeen);

  // ---- apply
  if (staleTmp) await unlink(path.join(dir, `${STATE_FILE}.tmp`));
  if (fresh) await writeState(dir, jkey, { id, keyCheck, ackedSeq: 0, checkpointSeq: 0 });
  for (const base of deletes) await unlink(path.join(dir, base));
  if (deletes.length > 0) await fsyncDir(dir);
  for (const c of cuts) {
    const fh = await open(c.seg.file, fsc.O_RDWR);
    try {
      await fh.truncate(c.to);
      await fh.datasync();
    } finally {
      await fh.close();
    }
  }
  if (kept.length === 0 || resumeAfter > last) {
    const prevLast = kept.length > 0 ? (chainLast as number) : floor;
    if (resumeAfter > prevLast) report.skipped = { first: prevLast + 1, last: resumeAfter };
    kept.push(await createSegmentFile(dir, jkey, id, keyCheck, resumeAfter + 1, prevLast));
  } else {
    const active = kept[kept.length - 1] as Segment;
    active.fh = await open(active.file, fsc.O_RDWR);
  }
  return { dir, id, jkey, keyCheck, segmentBytes, segments: kept, epochs, lastSealed: resumeAfter, acked, checkpoint, report };
}
