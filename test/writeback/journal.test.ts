// Write-back journal: round trips across reopen, segment roll and trimming, a model-based
// property test, every torn-tail cut, bit flips, wrong keys, moved records, and a fuzz of the
// record decoder.

import assert from 'node:assert/strict';
import { open, readdir, readFile, stat, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import fc from 'fast-check';
import { Journal, JournalCorruptError, JournalError, type JournalOp, type JournalOptions } from '../../src/writeback/journal.js';
import {
  decodeRecord,
  decodeRecordHeader,
  encodeRecord,
  JournalRecordError,
  MAX_RECORD_SIZE,
  MAX_WRITE_RECORD,
  NEED_MORE,
  REC,
  RECORD_HEADER_SIZE,
  RECORD_MAGIC,
  recordSize,
  SEGMENT_HEADER_SIZE,
  segmentKey,
  TAG_SIZE,
  type JournalRecord,
  type RecordContext,
} from '../../src/writeback/journal-records.js';
import { createSecretKey } from 'node:crypto';
import { deriveKeys } from '../../src/cache/keys.js';
import { prng, tempDir } from '../cache/helpers.js';

const runs = Number(process.env.SPILLWAY_FUZZ_RUNS ?? 200);
const KEY = prng('journal test key', 32);
const OTHER_KEY = prng('another family', 32);
const SEAL_SIZE = RECORD_HEADER_SIZE + 24 + TAG_SIZE;

function dirOf(t: TestContext): Promise<string> {
  return tempDir(t, 'spw-journal-');
}

function openJ(dir: string, extra: Partial<JournalOptions> = {}): Promise<Journal> {
  return Journal.open({ dir, dataKey: KEY, ...extra });
}

/** What readEpochs returns for an appended op: writes come back in 1 MiB records. */
function split(op: JournalOp): JournalOp[] {
  if (op.kind === 'zero') return op.length > 0 ? [op] : [];
  const out: JournalOp[] = [];
  for (let o = 0; o < op.data.length; o += MAX_WRITE_RECORD) out.push({ kind: 'write', offset: op.offset + o, data: Buffer.from(op.data.subarray(o, o + MAX_WRITE_RECORD)) });
  return out;
}

function opBytes(op: JournalOp): number {
  return op.kind === 'write' ? op.data.length : op.length;
}

/** On-disk size of an op's records. */
function opDiskSize(op: JournalOp): number {
  return split(op).reduce((n, o) => n + RECORD_HEADER_SIZE + (o.kind === 'write' ? o.data.length : 0) + TAG_SIZE, 0);
}

interface ModelEpoch {
  seq: number;
  ops: JournalOp[]; // as split by the journal
}

async function collect(j: Journal, first: number, last: number): Promise<{ seq: number; op: JournalOp }[]> {
  const out: { seq: number; op: JournalOp }[] = [];
  for await (const x of j.readEpochs(first, last)) out.push(x);
  return out;
}

function flatten(epochs: ModelEpoch[], first = 1, last = Infinity): { seq: number; op: JournalOp }[] {
  return epochs.filter((e) => e.seq >= first && e.seq <= last).flatMap((e) => e.ops.map((op) => ({ seq: e.seq, op })));
}

function w(offset: number, length: number, seed: string): JournalOp {
  return { kind: 'write', offset, data: prng(seed, length) };
}

/** Append and seal each epoch in turn; returns the model. */
async function writeEpochs(j: Journal, epochs: JournalOp[][]): Promise<ModelEpoch[]> {
  const out: ModelEpoch[] = [];
  for (const ops of epochs) {
    for (const op of ops) j.append(op);
    const seq = await j.seal();
    out.push({ seq, ops: ops.flatMap(split) });
  }
  return out;
}

async function snapshotDir(dir: string): Promise<Map<string, Buffer>> {
  const m = new Map<string, Buffer>();
  for (const f of await readdir(dir)) m.set(f, await readFile(path.join(dir, f)));
  return m;
}

async function restoreDir(dir: string, snap: Map<string, Buffer>): Promise<void> {
  for (const f of await readdir(dir)) if (!snap.has(f)) await unlink(path.join(dir, f));
  for (const [f, b] of snap) await writeFile(path.join(dir, f), b);
}

async function segmentFilesOnDisk(dir: string): Promise<string[]> {
  return (await readdir(dir)).filter((f) => f.endsWith('.jnl')).sort();
}

const segName = (seq: number): string => `${seq.toString(16).padStart(16, '0')}.jnl`;

// ------------------------------------------------------------------------------ round trips

void test('round trip: epochs with split writes and zero ranges survive reopen; pending and positions too', async (t) => {
  const dir = await dirOf(t);
  let j = await openJ(dir);
  assert.equal(j.lastSealed, 0);
  assert.equal(j.id.length, 16);
  const id = Buffer.from(j.id);
  const plan: JournalOp[][] = [];
  for (let e = 0; e < 12; e++) {
    const ops: JournalOp[] = [w(e * 4096, 4096, `a${e}`), { kind: 'zero', offset: 1 << 30, length: 5 * 2 ** 32 + e }, w(7, 1 + e * 37, `b${e}`)];
    if (e % 5 === 2) ops.push(w(e << 20, 2 * MAX_WRITE_RECORD + 12345, `big${e}`)); // three records
    if (e === 7) ops.push(w(0, MAX_WRITE_RECORD, 'exact')); // exactly one record
    plan.push(ops);
  }
  const before = Date.now();
  const model = await writeEpochs(j, plan);
  const after = Date.now();
  assert.deepEqual(
    model.map((m) => m.seq),
    plan.map((_, i) => i + 1),
  );
  assert.equal(await j.seal(), 12, 'nothing appended: resolves with lastSealed');
  const pend = j.pending();
  assert.deepEqual(
    pend.map((p) => [p.seq, p.ops, p.bytes]),
    model.map((m) => [m.seq, m.ops.length, m.ops.reduce((n, o) => n + opBytes(o), 0)]),
  );
  for (const p of pend) assert.ok(p.sealedAt >= before && p.sealedAt <= after, `sealedAt ${p.sealedAt} outside ${before}..${after}`);
  assert.equal(
    j.unackedBytes,
    pend.reduce((n, p) => n + p.bytes, 0),
  );
  assert.deepEqual(await collect(j, 1, 12), flatten(model));
  await j.setAcked(5);
  await j.setCheckpoint(3);
  await j.close();

  j = await openJ(dir);
  assert.ok(j.id.equals(id), 'the id is stable');
  assert.equal(j.lastSealed, 12);
  assert.equal(j.ackedSeq, 5);
  assert.equal(j.checkpointSeq, 3);
  assert.deepEqual(j.recoveryReport, { truncatedBytes: 0, droppedUnsealedOps: 0 });
  assert.deepEqual(
    j.pending().map((p) => [p.seq, p.ops, p.bytes, p.sealedAt]),
    pend.slice(5).map((p) => [p.seq, p.ops, p.bytes, p.sealedAt]),
  );
  assert.equal(
    j.unackedBytes,
    pend.slice(5).reduce((n, p) => n + p.bytes, 0),
  );
  assert.deepEqual(await collect(j, 4, 9), flatten(model, 4, 9));
  assert.deepEqual(await collect(j, 1, 12), flatten(model));
  await assert.rejects(collect(j, 1, 13), { code: 'SPW_ERR_JOURNAL_ARGUMENT' });
  await assert.rejects(j.setAcked(13), { code: 'SPW_ERR_JOURNAL_ARGUMENT' });
  await j.setAcked(2); // older: a no-op
  assert.equal(j.ackedSeq, 5);
  // appending continues the numbering
  j.append(w(1, 10, 'next'));
  assert.equal(await j.seal(), 13);
  await j.close();
  j = await openJ(dir);
  assert.deepEqual(await collect(j, 13, 13), [{ seq: 13, op: w(1, 10, 'next') }]);
  await j.close();
});

void test('ops belong to the epoch of the first seal called after them; empty seals wait for the one in flight', async (t) => {
  const dir = await dirOf(t);
  const j = await openJ(dir);
  j.append(w(0, 100, 'a'));
  const p1 = j.seal();
  j.append(w(100, 100, 'b'));
  j.append({ kind: 'zero', offset: 0, length: 9 });
  const p2 = j.seal();
  let p2done = false;
  void p2.then(() => (p2done = true));
  const p3 = j.seal(); // nothing new: the same epoch as p2, durable when p2 is
  const order: number[] = [];
  const all = await Promise.all([p1.then((s) => (order.push(1), s)), p2, p3.then((s) => (assert.ok(p2done, 'empty seal resolved before the epoch in flight was durable'), s))]);
  assert.deepEqual(all, [1, 2, 2]);
  assert.deepEqual(await collect(j, 1, 2), [
    { seq: 1, op: w(0, 100, 'a') },
    { seq: 2, op: w(100, 100, 'b') },
    { seq: 2, op: { kind: 'zero', offset: 0, length: 9 } },
  ]);
  // many concurrent seals interleaved with appends
  const seals: Promise<number>[] = [];
  for (let i = 0; i < 50; i++) {
    j.append(w(i, 10, `c${i}`));
    seals.push(j.seal());
  }
  assert.deepEqual(
    await Promise.all(seals),
    seals.map((_, i) => 3 + i),
  );
  assert.equal(j.lastSealed, 52);
  await j.close();
  assert.throws(() => j.append(w(0, 1, 'x')), { code: 'SPW_ERR_JOURNAL_CLOSED' });
  await assert.rejects(j.seal(), { code: 'SPW_ERR_JOURNAL_CLOSED' });
});

/** The prototype of node:fs/promises FileHandle objects, to watch or break datasync. */
async function fileHandleProto(dir: string): Promise<{ datasync: () => Promise<void> }> {
  const fh = await open(path.join(dir, 'probe'), 'w');
  await fh.close();
  await unlink(path.join(dir, 'probe'));
  return Object.getPrototypeOf(fh) as { datasync: () => Promise<void> };
}

void test('concurrent seals share fdatasyncs (group commit)', async (t) => {
  const dir = await dirOf(t);
  const j = await openJ(dir);
  const proto = await fileHandleProto(dir);
  const original = proto.datasync;
  let syncs = 0;
  t.mock.method(proto, 'datasync', function (this: unknown) {
    syncs++;
    return original.call(this);
  });
  const seals: Promise<number>[] = [];
  for (let i = 0; i < 50; i++) {
    j.append(w(i * 10, 10, `g${i}`));
    seals.push(j.seal());
  }
  assert.deepEqual(
    await Promise.all(seals),
    seals.map((_, i) => i + 1),
  );
  assert.ok(syncs >= 1 && syncs <= 3, `${syncs} fdatasyncs for 50 seals issued at once`);
  t.mock.restoreAll();
  await j.close();
});

void test('a failed fdatasync fails the seal and every later write; reopening recovers what is durable', async (t) => {
  const dir = await dirOf(t);
  let j = await openJ(dir);
  const model = await writeEpochs(j, [[w(0, 10, 'ok')]]);
  const proto = await fileHandleProto(dir);
  t.mock.method(proto, 'datasync', () => Promise.reject(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' })));
  j.append(w(0, 10, 'doomed'));
  await assert.rejects(j.seal(), (err: JournalError) => err.code === 'SPW_ERR_JOURNAL_IO' && /epochs after 1 are not durable/.test(err.message));
  assert.equal(j.lastSealed, 1);
  assert.throws(() => j.append(w(0, 1, 'x')), { code: 'SPW_ERR_JOURNAL_IO' });
  await assert.rejects(j.seal(), { code: 'SPW_ERR_JOURNAL_IO' });
  t.mock.restoreAll();
  await j.close();
  j = await openJ(dir);
  // the failed epoch was never acknowledged; whether its bytes reached the disk is not known
  assert.ok(j.lastSealed === 1 || j.lastSealed === 2, `lastSealed ${j.lastSealed}`);
  assert.deepEqual(await collect(j, 1, 1), flatten(model));
  await j.close();
});

void test('bad arguments are refused with typed errors', async (t) => {
  const dir = await dirOf(t);
  await assert.rejects(Journal.open({ dir, dataKey: Buffer.alloc(16) }), { code: 'SPW_ERR_JOURNAL_ARGUMENT' });
  const j = await openJ(dir);
  await assert.rejects(openJ(dir), { code: 'SPW_ERR_JOURNAL_LOCKED' });
  assert.throws(() => j.append({ kind: 'write', offset: -1, data: Buffer.alloc(1) }), JournalError);
  assert.throws(() => j.append({ kind: 'zero', offset: 2 ** 53, length: 1 }), JournalError);
  assert.throws(() => j.append({ kind: 'zero', offset: 1.5, length: 1 }), JournalError);
  j.append({ kind: 'write', offset: 0, data: Buffer.alloc(0) }); // empty ops persist nothing
  j.append({ kind: 'zero', offset: 0, length: 0 });
  assert.equal(await j.seal(), 0);
  await j.close();
});

void test('unsealed ops are dropped at reopen and the file is cut at the last seal', async (t) => {
  const dir = await dirOf(t);
  let j = await openJ(dir);
  const model = await writeEpochs(j, [[w(0, 500, 'x')], [w(9, 9, 'y')]]);
  const file = path.join(dir, segName(1));
  const sealedSize = (await stat(file)).size;
  j.append(w(0, 1000, 'lost1'));
  j.append({ kind: 'zero', offset: 0, length: 100 });
  assert.equal(j.unackedBytes, 500 + 9 + 1100);
  await j.close(); // no seal: as after a crash
  assert.ok((await stat(file)).size > sealedSize, 'the unsealed ops were not written');
  j = await openJ(dir);
  assert.equal(j.lastSealed, 2);
  assert.deepEqual(j.recoveryReport, { truncatedBytes: 1000 + 2 * (RECORD_HEADER_SIZE + TAG_SIZE), droppedUnsealedOps: 2 });
  assert.equal((await stat(file)).size, sealedSize);
  assert.deepEqual(await collect(j, 1, 2), flatten(model));
  assert.equal(j.unackedBytes, 509);
  await j.close();
});

void test('segments roll at epoch boundaries and trimming deletes exactly the segments below min(acked, checkpoint)', async (t) => {
  const dir = await dirOf(t);
  const epochSize = opDiskSize(w(0, 4096, '')) + SEAL_SIZE;
  // three epochs fit under 2.5 epochs' worth of bytes: the third crosses it and rolls
  const segmentBytes = SEGMENT_HEADER_SIZE + Math.floor(2.5 * epochSize);
  let j = await openJ(dir, { segmentBytes });
  const model = await writeEpochs(
    j,
    Array.from({ length: 10 }, (_, e) => [w(e * 4096, 4096, `e${e}`)]),
  );
  // segments: 1..3, 4..6, 7..9, 10 (the active one, 11.. not created until used)
  assert.deepEqual(await segmentFilesOnDisk(dir), [segName(1), segName(4), segName(7), segName(10)]);
  assert.deepEqual(j.segmentFiles, await segmentFilesOnDisk(dir));
  await j.setAcked(8);
  assert.deepEqual(await segmentFilesOnDisk(dir), [segName(1), segName(4), segName(7), segName(10)], 'checkpoint 0 holds everything');
  await j.setCheckpoint(5);
  assert.deepEqual(await segmentFilesOnDisk(dir), [segName(4), segName(7), segName(10)], 'min 5 covers 1..3 but ends inside 4..6');
  await j.setCheckpoint(6);
  assert.deepEqual(await segmentFilesOnDisk(dir), [segName(7), segName(10)], 'min 6 covers 4..6 too');
  assert.equal(j.firstAvailable, 7);
  await assert.rejects(collect(j, 6, 7), { code: 'SPW_ERR_JOURNAL_ARGUMENT' });
  assert.deepEqual(await collect(j, 7, 10), flatten(model, 7, 10));
  await j.close();

  j = await openJ(dir, { segmentBytes });
  assert.equal(j.lastSealed, 10);
  assert.equal(j.firstAvailable, 7);
  assert.deepEqual(await collect(j, 7, 10), flatten(model, 7, 10));
  assert.deepEqual(
    j.pending().map((p) => p.seq),
    [9, 10],
  );
  // the active segment is never deleted, even when all its epochs are acknowledged
  await j.setAcked(10);
  await j.setCheckpoint(10);
  assert.deepEqual(await segmentFilesOnDisk(dir), [segName(10)]);
  const more = await writeEpochs(j, [[w(0, 4096, 'm1')], [w(0, 4096, 'm2')], [w(0, 4096, 'm3')]]);
  assert.deepEqual(await segmentFilesOnDisk(dir), [segName(10), segName(13)], 'the segment reopened at 10 fills up to 12');
  await j.setAcked(12);
  assert.deepEqual(await segmentFilesOnDisk(dir), [segName(10), segName(13)], 'the overlay still needs 11 and 12');
  await j.setCheckpoint(12);
  assert.deepEqual(await segmentFilesOnDisk(dir), [segName(13)]);
  await j.close();
  j = await openJ(dir, { segmentBytes });
  assert.equal(j.lastSealed, 13);
  assert.equal(j.firstAvailable, 13);
  assert.deepEqual(await collect(j, 13, 13), flatten(more, 13, 13));
  await j.close();
});

// ------------------------------------------------------------------------- property test

type Cmd =
  | { c: 'write'; offset: number; len: number; seed: number }
  | { c: 'zero'; offset: number; len: number }
  | { c: 'seal' }
  | { c: 'seal2' }
  | { c: 'reopen' }
  | { c: 'acked'; frac: number }
  | { c: 'checkpoint'; frac: number };

const cmdArb: fc.Arbitrary<Cmd> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ c: fc.constant('write' as const), offset: fc.nat({ max: 1 << 20 }), len: fc.integer({ min: 1, max: 3000 }), seed: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ c: fc.constant('zero' as const), offset: fc.nat({ max: 2 ** 40 }), len: fc.integer({ min: 0, max: 2 ** 33 }) }) },
  { weight: 4, arbitrary: fc.constant({ c: 'seal' as const }) },
  { weight: 1, arbitrary: fc.constant({ c: 'seal2' as const }) },
  { weight: 1, arbitrary: fc.constant({ c: 'reopen' as const }) },
  { weight: 2, arbitrary: fc.record({ c: fc.constant('acked' as const), frac: fc.double({ min: 0, max: 1, noNaN: true }) }) },
  { weight: 2, arbitrary: fc.record({ c: fc.constant('checkpoint' as const), frac: fc.double({ min: 0, max: 1, noNaN: true }) }) },
);

void test('property: random append/seal/reopen/setAcked/setCheckpoint against an in-memory model', async (t) => {
  const root = await dirOf(t);
  let n = 0;
  await fc.assert(
    fc.asyncProperty(fc.array(cmdArb, { minLength: 1, maxLength: 30 }), fc.integer({ min: 200, max: 12000 }), async (cmds, segmentBytes) => {
      const dir = path.join(root, String(n++));
      let j = await openJ(dir, { segmentBytes });
      const sealed: ModelEpoch[] = [];
      let open: JournalOp[] = [];
      let acked = 0;
      let checkpoint = 0;
      const check = async (full: boolean, afterTrim = false): Promise<void> => {
        const last = sealed.length > 0 ? (sealed[sealed.length - 1] as ModelEpoch).seq : 0;
        assert.equal(j.lastSealed, last);
        assert.equal(j.ackedSeq, acked);
        assert.equal(j.checkpointSeq, checkpoint);
        const pend = sealed.filter((e) => e.seq > acked);
        assert.deepEqual(
          j.pending().map((p) => [p.seq, p.ops, p.bytes]),
          pend.map((e) => [e.seq, e.ops.length, e.ops.reduce((s, o) => s + opBytes(o), 0)]),
        );
        assert.equal(j.unackedBytes, [...pend.flatMap((e) => e.ops), ...open].reduce((s, o) => s + opBytes(o), 0));
        const floor = Math.min(acked, checkpoint);
        assert.ok(j.firstAvailable <= floor + 1, 'an epoch still needed was trimmed');
        if (full) assert.deepEqual(await collect(j, floor + 1, last), flatten(sealed, floor + 1));
        if (afterTrim) {
          // every segment but the newest file ends at an epoch still needed (a segment being
          // created by the writer may be on disk already, after the ones the journal lists)
          const files = await segmentFilesOnDisk(dir);
          assert.deepEqual(files.slice(0, j.segmentFiles.length), j.segmentFiles);
          assert.ok(files.length <= j.segmentFiles.length + 1, `on disk ${files.join(',')}, listed ${j.segmentFiles.join(',')}`);
          for (let i = 0; i + 1 < files.length; i++) {
            const lastInIt = parseInt((files[i + 1] as string).slice(0, 16), 16) - 1;
            assert.ok(lastInIt > floor, `${files[i]} (epochs up to ${lastInIt}) should have been trimmed at floor ${floor}`);
          }
        }
      };
      try {
        for (const cmd of cmds) {
          switch (cmd.c) {
            case 'write': {
              const op = w(cmd.offset, cmd.len, String(cmd.seed));
              j.append(op);
              open.push(...split(op));
              break;
            }
            case 'zero': {
              const op: JournalOp = { kind: 'zero', offset: cmd.offset, length: cmd.len };
              j.append(op);
              open.push(...split(op));
              break;
            }
            case 'seal':
            case 'seal2': {
              const expect = open.length > 0 ? sealed.length + 1 : sealed.length;
              if (open.length > 0) sealed.push({ seq: expect, ops: open });
              open = [];
              const got = cmd.c === 'seal' ? [await j.seal()] : await Promise.all([j.seal(), j.seal()]);
              for (const g of got) assert.equal(g, expect);
              break;
            }
            case 'reopen':
              await j.close();
              j = await openJ(dir, { segmentBytes });
              assert.equal(j.recoveryReport.droppedUnsealedOps, open.length);
              open = [];
              await check(true);
              continue;
            case 'acked':
            case 'checkpoint': {
              const seq = Math.floor(cmd.frac * (sealed.length + 0.999));
              if (cmd.c === 'acked') {
                await j.setAcked(seq);
                acked = Math.max(acked, seq);
              } else {
                await j.setCheckpoint(seq);
                checkpoint = Math.max(checkpoint, seq);
              }
              await check(true, true);
              continue;
            }
          }
          await check(false);
        }
        await j.close();
        j = await openJ(dir, { segmentBytes });
        open = [];
        await check(true);
      } finally {
        await j.close();
      }
    }),
    { numRuns: runs },
  );
});

// ------------------------------------------------------------------------------- torn tails

interface Fixture {
  dir: string;
  file: string;
  snap: Map<string, Buffer>;
  /** byte range of the last epoch E in `file`, and where each of its records starts. */
  startE: number;
  full: number;
  recStarts: number[];
  model: ModelEpoch[];
  n: number;
}

/** N sealed epochs, then the last epoch E (its records' layout is known), journal closed. */
async function fixture(t: TestContext, lastOps: JournalOp[], opts: Partial<JournalOptions> = {}): Promise<Fixture> {
  const dir = await dirOf(t);
  const j = await openJ(dir, opts);
  const model = await writeEpochs(j, [[w(0, 300, 'e1'), { kind: 'zero', offset: 4096, length: 8192 }], [w(100, 20, 'e2')], [w(7, 700, 'e3')]]);
  model.push(...(await writeEpochs(j, [lastOps])));
  await j.close();
  const files = await segmentFilesOnDisk(dir);
  const file = path.join(dir, files[files.length - 1] as string);
  const full = (await stat(file)).size;
  const sizes = [...lastOps.flatMap(split).map((o) => opDiskSize(o)), SEAL_SIZE];
  const startE = full - sizes.reduce((a, b) => a + b, 0);
  const recStarts: number[] = [];
  let p = startE;
  for (const s of sizes) {
    recStarts.push(p);
    p += s;
  }
  return { dir, file, snap: await snapshotDir(dir), startE, full, recStarts, model, n: 3 };
}

/** Reopen after damage to `file`; check what came back, then that appending still works. */
async function reopenAndCheck(f: Fixture, expectLast: number, opts: Partial<JournalOptions> = {}, label = ''): Promise<Journal> {
  const j = await openJ(f.dir, opts);
  try {
    assert.equal(j.lastSealed, expectLast, label);
    assert.deepEqual(await collect(j, 1, expectLast), flatten(f.model, 1, expectLast), label);
    assert.deepEqual(
      j.pending().map((p) => p.seq),
      f.model.filter((e) => e.seq <= expectLast).map((e) => e.seq),
      label,
    );
  } catch (err) {
    await j.close();
    throw err;
  }
  return j;
}

async function appendAfterRepair(f: Fixture, j: Journal, label: string, opts: Partial<JournalOptions> = {}): Promise<void> {
  const op = w(12345, 33, label);
  j.append(op);
  const seq = await j.seal();
  assert.equal(seq, j.lastSealed);
  await j.close();
  const again = await openJ(f.dir, opts);
  try {
    assert.equal(again.lastSealed, seq, label);
    assert.deepEqual(again.recoveryReport, { truncatedBytes: 0, droppedUnsealedOps: 0 }, `${label}: the repaired journal needs no repair`);
    assert.deepEqual(await collect(again, seq, seq), [{ seq, op }], label);
  } finally {
    await again.close();
  }
}

/** Cuts where the slower check (append, seal, reopen) also runs: around every record boundary, and a stride. */
function deepCheckAt(f: Fixture, cut: number): boolean {
  return cut % 11 === 0 || cut === f.full || [...f.recStarts, f.full].some((s) => Math.abs(s - cut) <= 1);
}

void test('torn tail: a cut at every byte of the last epoch recovers exactly the whole sealed epochs', async (t) => {
  const f = await fixture(t, [w(50, 8, 'l1'), { kind: 'zero', offset: 0, length: 77 }, w(3, 5, 'l2')]);
  const original = f.snap.get(path.basename(f.file)) as Buffer;
  assert.equal(f.recStarts[0], f.startE);
  for (let cut = f.startE; cut <= f.full; cut++) {
    const deep = deepCheckAt(f, cut);
    // opening only rewrites the segment file; appending afterwards may do more
    await writeFile(f.file, original.subarray(0, cut));
    const label = `cut at ${cut} (E is ${f.startE}..${f.full})`;
    const sealedE = cut === f.full;
    const j = await reopenAndCheck(f, sealedE ? 4 : 3, {}, label);
    assert.equal(j.recoveryReport.truncatedBytes, sealedE ? 0 : cut - f.startE, label);
    // op records of E wholly before the cut (each ends where the next record starts)
    assert.equal(j.recoveryReport.droppedUnsealedOps, sealedE ? 0 : f.recStarts.slice(1).filter((end) => end <= cut).length, label);
    assert.equal((await stat(f.file)).size, sealedE ? f.full : f.startE, `${label}: file not cut at the last seal`);
    if (deep) {
      await appendAfterRepair(f, j, label);
      await restoreDir(f.dir, f.snap);
    } else {
      await j.close();
    }
  }
});

void test('torn tail in a freshly rolled segment: cuts inside its header and its records', async (t) => {
  // every epoch rolls: E is alone in the newest segment
  const f = await fixture(t, [w(0, 6, 'r1'), w(64, 7, 'r2')], { segmentBytes: SEGMENT_HEADER_SIZE });
  assert.equal(f.startE, SEGMENT_HEADER_SIZE);
  const original = f.snap.get(path.basename(f.file)) as Buffer;
  for (let cut = 0; cut <= f.full; cut++) {
    const deep = cut < SEGMENT_HEADER_SIZE ? cut % 7 === 0 : deepCheckAt(f, cut);
    await writeFile(f.file, original.subarray(0, cut));
    const label = `cut at ${cut}`;
    const j = await reopenAndCheck(f, cut === f.full ? 4 : 3, { segmentBytes: SEGMENT_HEADER_SIZE }, label);
    if (cut < SEGMENT_HEADER_SIZE) await assert.rejects(stat(f.file), { code: 'ENOENT' }, `${label}: a half-created segment is removed`);
    else assert.equal((await stat(f.file)).size, cut === f.full ? f.full : SEGMENT_HEADER_SIZE, label);
    if (deep) {
      await appendAfterRepair(f, j, label, { segmentBytes: SEGMENT_HEADER_SIZE });
      await restoreDir(f.dir, f.snap);
    } else {
      await j.close();
    }
  }
});

void test('torn tail inside a multi-record write (sampled cuts)', async (t) => {
  const big = w(1 << 20, 2 * MAX_WRITE_RECORD + 999, 'huge');
  const f = await fixture(t, [w(0, 10, 's'), big]);
  const original = f.snap.get(path.basename(f.file)) as Buffer;
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: f.startE, max: f.full - 1 }), async (cut) => {
      await writeFile(f.file, original.subarray(0, cut));
      const j = await reopenAndCheck(f, 3, {}, `cut at ${cut}`);
      assert.equal((await stat(f.file)).size, f.startE);
      await j.close();
    }),
    { numRuns: Math.min(runs, 40), examples: f.recStarts.map((s) => [s + 1] as [number]) },
  );
});

// -------------------------------------------------------------------------------- bit flips

/** Which record of the fixture's last epoch holds byte `b`. */
function recordOf(f: Fixture, b: number): number {
  let r = 0;
  while (r + 1 < f.recStarts.length && (f.recStarts[r + 1] as number) <= b) r++;
  return r;
}

async function flipAndOpen(f: Fixture, original: Buffer, byte: number, bit: number, mode: 'refuse' | 'discard-tail'): Promise<Journal | JournalCorruptError> {
  const damaged = Buffer.from(original);
  damaged[byte] = (damaged[byte] as number) ^ (1 << bit);
  await writeFile(f.file, damaged);
  try {
    return await openJ(f.dir, { onCorruption: mode });
  } catch (err) {
    if (err instanceof JournalCorruptError) return err;
    throw err;
  }
}

void test('bit flips in the last epoch: it never comes back; damage before its seal is refused', async (t) => {
  const f = await fixture(t, [w(50, 8, 'l1'), { kind: 'zero', offset: 0, length: 77 }, w(3, 5, 'l2')]);
  const original = f.snap.get(path.basename(f.file)) as Buffer;
  const sealStart = f.recStarts[f.recStarts.length - 1] as number;
  const one = async (byte: number, bit: number, discard = true): Promise<void> => {
    const label = `flip ${byte}:${bit} (records at ${f.recStarts.join(',')})`;
    const r = await flipAndOpen(f, original, byte, bit, 'refuse');
    if (byte >= sealStart) {
      // the seal is the last thing in the file: indistinguishable from a torn write
      assert.ok(r instanceof Journal, `${label}: ${String(r)}`);
      try {
        assert.equal(r.lastSealed, 3, label);
        assert.deepEqual(await collect(r, 1, 3), flatten(f.model, 1, 3), label);
      } finally {
        await r.close();
      }
    } else {
      assert.ok(r instanceof JournalCorruptError, `${label}: damage followed by authentic records must be refused`);
      assert.equal(r.segment, path.basename(f.file));
      assert.equal(r.position, f.recStarts[recordOf(f, byte)], label);
      assert.match(r.message, /epoch 4 and every later one/);
      assert.match(r.message, /discard-tail/);
      if (byte % 13 === 0) {
        const expected = new Map(f.snap);
        expected.set(path.basename(f.file), damageOf(original, byte, bit));
        assert.deepEqual(await snapshotDir(f.dir), expected, `${label}: refusing changed the directory`);
      }
    }
    if (!discard) return;
    const d = await flipAndOpen(f, original, byte, bit, 'discard-tail');
    assert.ok(d instanceof Journal, label);
    try {
      assert.deepEqual(await collect(d, 1, d.lastSealed), flatten(f.model, 1, 3), label);
      assert.deepEqual(
        d.pending().map((p) => p.seq),
        [1, 2, 3],
        label,
      );
      if (byte < sealStart) assert.deepEqual(d.recoveryReport.corruptAt, { segment: path.basename(f.file), position: f.recStarts[recordOf(f, byte)] }, label);
    } finally {
      await d.close();
      await restoreDir(f.dir, f.snap); // discarding may have added a segment
    }
  };
  // every byte (the bit rotating through its 8 positions) ...
  for (let b = f.startE; b < f.full; b++) await one(b, b % 8, b % 5 === 0);
  // ... plus a sample of any bit
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: f.startE, max: f.full - 1 }), fc.integer({ min: 0, max: 7 }), (b, bit) => one(b, bit)),
    { numRuns: Math.min(runs, 40) },
  );
});

function damageOf(original: Buffer, byte: number, bit: number): Buffer {
  const b = Buffer.from(original);
  b[byte] = (b[byte] as number) ^ (1 << bit);
  return b;
}

void test('bit flips in an earlier epoch: refused; discard-tail keeps only the epochs before it and never reuses a seq', async (t) => {
  const f = await fixture(t, [w(50, 40, 'l1')]);
  const original = f.snap.get(path.basename(f.file)) as Buffer;
  // epoch 2 = one 20-byte write + seal, right after epoch 1 (300-byte write, zero, seal)
  const e2 = SEGMENT_HEADER_SIZE + opDiskSize(w(0, 300, '')) + opDiskSize({ kind: 'zero', offset: 0, length: 1 }) + SEAL_SIZE;
  const e2end = e2 + opDiskSize(w(0, 20, '')) + SEAL_SIZE;
  const recStart = (b: number): number => (b < e2 + opDiskSize(w(0, 20, '')) ? e2 : e2 + opDiskSize(w(0, 20, '')));
  const one = async (byte: number, bit: number): Promise<void> => {
    const label = `flip ${byte}:${bit}`;
    const r = await flipAndOpen(f, original, byte, bit, 'refuse');
    assert.ok(r instanceof JournalCorruptError, label);
    assert.equal(r.position, recStart(byte), label);
    assert.match(r.message, /epoch 2 and every later one/, label);
    const d = await flipAndOpen(f, original, byte, bit, 'discard-tail');
    assert.ok(d instanceof Journal, label);
    try {
      assert.deepEqual(d.recoveryReport.corruptAt, { segment: path.basename(f.file), position: recStart(byte) }, label);
      assert.ok(d.lastSealed >= 4, `${label}: seqs 2..4 were handed out; numbering must continue after them`);
      assert.deepEqual(
        d.pending().map((p) => p.seq),
        [1],
        label,
      );
      assert.deepEqual(await collect(d, 1, d.lastSealed), flatten(f.model, 1, 1), label);
      d.append(w(0, 5, 'after'));
      assert.equal(await d.seal(), d.lastSealed);
      assert.ok(d.lastSealed > 4, label);
    } finally {
      await d.close();
    }
    // the repaired journal reopens cleanly in refuse mode, skip and all
    const again = await openJ(f.dir);
    try {
      assert.deepEqual(
        again.pending().map((p) => p.seq),
        [1, again.lastSealed],
        label,
      );
      assert.deepEqual((await collect(again, again.lastSealed, again.lastSealed)).map((x) => x.op), [w(0, 5, 'after')]);
    } finally {
      await again.close();
      await restoreDir(f.dir, f.snap);
    }
  };
  for (let b = e2; b < e2end; b += 4) await one(b, b % 8);
  await fc.assert(fc.asyncProperty(fc.integer({ min: e2, max: e2end - 1 }), fc.integer({ min: 0, max: 7 }), one), { numRuns: Math.min(runs, 20) });
});

void test('a damaged segment header is refused, never taken as a torn tail', async (t) => {
  const f = await fixture(t, [w(50, 40, 'l1')]);
  const original = f.snap.get(path.basename(f.file)) as Buffer;
  for (let b = 0; b < SEGMENT_HEADER_SIZE; b++) {
    const r = await flipAndOpen(f, original, b, (b * 3) % 8, 'refuse');
    assert.ok(r instanceof JournalCorruptError, `flip in header byte ${b}`);
    assert.equal(r.position, 0);
  }
  const d = await flipAndOpen(f, original, 20, 1, 'discard-tail');
  assert.ok(d instanceof Journal, 'discard-tail refused');
  try {
    assert.deepEqual(d.pending(), []);
    assert.ok(d.lastSealed >= 4, `seqs up to 4 were handed out, numbering resumes after ${d.lastSealed}`);
    assert.deepEqual(d.recoveryReport.skipped, { first: 1, last: d.lastSealed });
  } finally {
    await d.close();
  }
});

void test('records moved or duplicated are refused (authentication binds position); a record cut out acts as a torn tail', async (t) => {
  const f = await fixture(t, [w(50, 40, 'l1'), w(60, 40, 'l2'), w(70, 40, 'l3')]);
  const original = f.snap.get(path.basename(f.file)) as Buffer;
  const [a, b, c, s] = f.recStarts as [number, number, number, number];
  const size = b - a;
  const variants: [string, Buffer][] = [
    // swap two equal-sized records: every byte authentic, but not where it was written
    ['swap', Buffer.concat([original.subarray(0, a), original.subarray(b, c), original.subarray(a, b), original.subarray(c)])],
    ['duplicate', Buffer.concat([original.subarray(0, b), original.subarray(a, b), original.subarray(c)])],
  ];
  assert.equal(c - b, size);
  assert.ok(s > c, 'fixture layout');
  for (const [what, bytes] of variants) {
    await restoreDir(f.dir, f.snap);
    await writeFile(f.file, bytes);
    await assert.rejects(openJ(f.dir), JournalCorruptError, what);
  }
  // Cutting a record out shifts every later one, so none authenticates where it now lies:
  // that is indistinguishable from a torn tail at the cut (docs/journal-format.md). The
  // epoch is never returned, whole or in part.
  await restoreDir(f.dir, f.snap);
  await writeFile(f.file, Buffer.concat([original.subarray(0, b), original.subarray(c)]));
  const j = await openJ(f.dir);
  try {
    assert.equal(j.lastSealed, 3);
    assert.deepEqual(await collect(j, 1, 3), flatten(f.model, 1, 3));
  } finally {
    await j.close();
  }
  // a segment from another journal with the same key and name
  const other = await dirOf(t);
  const o = await openJ(other);
  await writeEpochs(o, [[w(0, 1, 'o')]]);
  await o.close();
  await restoreDir(f.dir, f.snap);
  await writeFile(path.join(f.dir, segName(1)), await readFile(path.join(other, segName(1))));
  await assert.rejects(openJ(f.dir), JournalCorruptError);
});

void test('an authentic SEAL whose counts do not match its records is corruption, not a torn tail', async (t) => {
  const f = await fixture(t, [w(50, 8, 'l1'), w(60, 8, 'l2')]);
  const original = f.snap.get(path.basename(f.file)) as Buffer;
  const sealAt = f.recStarts[f.recStarts.length - 1] as number;
  const jkey = createSecretKey(deriveKeys(KEY).journalKey);
  const id = original.subarray(32, 48); // from the segment header
  const segment = parseInt(path.basename(f.file).slice(0, 16), 16);
  const forged = Buffer.alloc(SEAL_SIZE);
  encodeRecord(forged, 0, { type: REC.SEAL, seq: 4, ops: 1, bytes: 8, sealedAt: 1 }, { key: segmentKey(jkey, Buffer.from(id), segment), id: Buffer.from(id), segment }, sealAt);
  await writeFile(f.file, Buffer.concat([original.subarray(0, sealAt), forged]));
  await assert.rejects(openJ(f.dir), (err: JournalCorruptError) => err.position === sealAt && /counts 1 ops/.test(err.message));
  const j = await openJ(f.dir, { onCorruption: 'discard-tail' });
  try {
    assert.deepEqual(
      j.pending().map((p) => p.seq),
      [1, 2, 3],
    );
  } finally {
    await j.close();
  }
});

void test('readEpochs verifies again: damage after open is an error, never data', async (t) => {
  const dir = await dirOf(t);
  const j = await openJ(dir);
  try {
    const model = await writeEpochs(j, [[w(0, 100, 'a')], [w(0, 100, 'b'), w(5, 100, 'c')]]);
    const file = path.join(dir, segName(1));
    const bytes = await readFile(file);
    const at = bytes.length - SEAL_SIZE - 30; // inside epoch 2's last write
    bytes[at] = (bytes[at] as number) ^ 0x10;
    await writeFile(file, bytes);
    assert.deepEqual(await collect(j, 1, 1), flatten(model, 1, 1));
    const got: JournalOp[] = [];
    await assert.rejects(
      (async () => {
        for await (const x of j.readEpochs(2, 2)) got.push(x.op);
      })(),
      (err: JournalCorruptError) => err.code === 'SPW_ERR_JOURNAL_CORRUPT' && /sealed epoch 2/.test(err.message),
    );
    assert.deepEqual(got, flatten(model, 2, 2).slice(0, 1).map((x) => x.op), 'only the verified record came out');
  } finally {
    await j.close();
  }
});

void test('a missing segment is a gap; missing acknowledged epochs are refused', async (t) => {
  const dir = await dirOf(t);
  let j = await openJ(dir, { segmentBytes: SEGMENT_HEADER_SIZE });
  await writeEpochs(j, [[w(0, 1, 'a')], [w(0, 1, 'b')], [w(0, 1, 'c')], [w(0, 1, 'd')]]);
  await j.setAcked(4);
  await j.close();
  const snap = await snapshotDir(dir);
  await unlink(path.join(dir, segName(2)));
  await assert.rejects(openJ(dir), (err: JournalCorruptError) => err.code === 'SPW_ERR_JOURNAL_CORRUPT' && err.segment === segName(3) && /epochs 2\.\.2 are missing/.test(err.message));
  await restoreDir(dir, snap);
  await unlink(path.join(dir, segName(4)));
  await assert.rejects(openJ(dir), /up to 4 were acknowledged/);
  j = await openJ(dir, { onCorruption: 'discard-tail' });
  assert.equal(j.lastSealed, 4, 'numbering continues after the acknowledged epochs');
  j.append(w(0, 1, 'e'));
  assert.equal(await j.seal(), 5);
  await j.close();
  j = await openJ(dir);
  assert.equal(j.lastSealed, 5);
  await j.close();
});

// ------------------------------------------------------------------------------------- keys

void test('a wrong key is refused at open with a typed error and changes nothing', async (t) => {
  const dir = await dirOf(t);
  let j = await openJ(dir);
  await writeEpochs(j, [[w(0, 10, 'k')]]);
  j.append(w(0, 10, 'unsealed'));
  await j.close();
  const before = await snapshotDir(dir);
  await assert.rejects(Journal.open({ dir, dataKey: OTHER_KEY }), (err: JournalError) => err.code === 'SPW_ERR_JOURNAL_KEY' && /another data key/.test(err.message));
  await assert.rejects(Journal.open({ dir, dataKey: OTHER_KEY, onCorruption: 'discard-tail' }), { code: 'SPW_ERR_JOURNAL_KEY' });
  assert.deepEqual(await snapshotDir(dir), before);
  j = await openJ(dir);
  assert.equal(j.lastSealed, 1);
  await j.close();
});

void test('the state file: damage is refused, a leftover temporary file is ignored', async (t) => {
  const dir = await dirOf(t);
  let j = await openJ(dir);
  await writeEpochs(j, [[w(0, 10, 's')]]);
  await j.setAcked(1);
  await j.close();
  const state = path.join(dir, 'journal.state');
  const good = await readFile(state);
  await writeFile(`${state}.tmp`, 'half-written');
  const bad = Buffer.from(good);
  bad[50] = (bad[50] as number) ^ 4; // ackedSeq
  await writeFile(state, bad);
  await assert.rejects(openJ(dir), (err: JournalCorruptError) => err.segment === 'journal.state');
  await writeFile(state, good);
  j = await openJ(dir);
  assert.equal(j.ackedSeq, 1);
  await j.close();
  assert.ok(!(await readdir(dir)).includes('journal.state.tmp'), 'the temporary state file was left behind');
  await unlink(state);
  await assert.rejects(openJ(dir), JournalCorruptError);
});

// ---------------------------------------------------------------------------- record codec

const ctx: RecordContext = (() => {
  const id = prng('codec id', 16);
  return { key: segmentKey(createSecretKey(KEY), id, 7), id, segment: 7 };
})();

const recordArb: fc.Arbitrary<JournalRecord> = fc.oneof(
  fc.record({ type: fc.constant(REC.WRITE), seq: fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }), offset: fc.nat({ max: 2 ** 50 }), data: fc.uint8Array({ minLength: 1, maxLength: 300 }).map((a) => Buffer.from(a)) }),
  fc.record({ type: fc.constant(REC.ZERO), seq: fc.integer({ min: 1, max: 2 ** 40 }), offset: fc.nat({ max: 2 ** 50 }), length: fc.integer({ min: 1, max: 2 ** 50 }) }),
  fc.record({ type: fc.constant(REC.SEAL), seq: fc.integer({ min: 1, max: 2 ** 40 }), ops: fc.nat({ max: 0xffffffff }), bytes: fc.nat({ max: Number.MAX_SAFE_INTEGER }), sealedAt: fc.nat({ max: 2 ** 45 }) }),
);

function encode(rec: JournalRecord, position: number): Buffer {
  const buf = Buffer.alloc(recordSize(rec));
  assert.equal(encodeRecord(buf, 0, rec, ctx, position), buf.length);
  return buf;
}

/** The only allowed outcomes of decoding untrusted bytes. */
function decodeOutcome(buf: Buffer, offset: number, position: number): 'record' | 'need-more' | 'error' {
  try {
    const r = decodeRecord(buf, offset, ctx, position);
    return r === NEED_MORE ? 'need-more' : 'record';
  } catch (err) {
    assert.ok(err instanceof JournalRecordError, `untyped error: ${String(err)}`);
    assert.equal(err.code, 'SPW_ERR_JOURNAL_RECORD');
    return 'error';
  }
}

void test('codec: records round trip at any position and split point; every strict prefix needs more', () => {
  fc.assert(
    fc.property(recordArb, fc.nat({ max: 2 ** 40 }), fc.uint8Array({ maxLength: 20 }), (rec, position, pad) => {
      const enc = encode(rec, position);
      const buf = Buffer.concat([Buffer.from(pad), enc, Buffer.from(pad)]);
      const r = decodeRecord(buf, pad.length, ctx, position);
      assert.notEqual(r, NEED_MORE);
      if (r === NEED_MORE) return;
      assert.equal(r.bytesRead, enc.length);
      assert.deepEqual(r.rec, { ...rec });
      for (let cut = 0; cut < enc.length; cut += 1 + (cut >> 4)) assert.equal(decodeRecord(enc.subarray(0, cut), 0, ctx, position), NEED_MORE);
      assert.throws(() => decodeRecord(enc, 0, ctx, position + 1), JournalRecordError, 'a record read at another position must fail');
      assert.throws(() => decodeRecord(enc, 0, { ...ctx, segment: 8 }, position), JournalRecordError);
    }),
    { numRuns: runs },
  );
});

void test('codec fuzz: arbitrary bytes give only NEED_MORE or a typed error, and never ask for a huge record', () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 400 }), fc.boolean(), fc.nat({ max: 64 }), (raw, withMagic, offset) => {
      const buf = Buffer.from(raw);
      if (withMagic && buf.length >= 4) RECORD_MAGIC.copy(buf, 0); // get past the first check
      const o = Math.min(offset, buf.length);
      assert.notEqual(decodeOutcome(buf, o, o), 'record', 'random bytes authenticated');
      try {
        const h = decodeRecordHeader(buf, o);
        if (h !== NEED_MORE) assert.ok(h.size <= MAX_RECORD_SIZE, `header asks for ${h.size} bytes`);
      } catch (err) {
        assert.ok(err instanceof JournalRecordError, String(err));
      }
    }),
    { numRuns: runs * 5 },
  );
});

void test('codec fuzz: damaged records give only typed errors (or NEED_MORE when a length grew)', () => {
  fc.assert(
    fc.property(recordArb, fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { minLength: 1, maxLength: 4 }), (rec, edits) => {
      const buf = encode(rec, 4096);
      for (const [at, x] of edits) buf[at % buf.length] = (buf[at % buf.length] as number) ^ x;
      assert.notEqual(decodeOutcome(buf, 0, 4096), 'record', 'a damaged record authenticated');
    }),
    { numRuns: runs * 2 },
  );
  // headers built field by field (random bytes almost never get past magic and reserved bits)
  fc.assert(
    fc.property(
      fc.constantFrom(0, 1, 2, 3, 4, 255),
      fc.tuple(fc.nat({ max: 0xffffffff }), fc.nat({ max: 0xffffffff })),
      fc.tuple(fc.nat({ max: 0xffffffff }), fc.nat({ max: 0xffffffff })),
      fc.tuple(fc.oneof(fc.constant(0), fc.nat({ max: 0xffffffff })), fc.oneof(fc.constant(0), fc.nat({ max: 0xffffffff }), fc.nat({ max: 2 * MAX_WRITE_RECORD }))),
      fc.oneof(fc.nat({ max: 0xffffffff }), fc.nat({ max: 2 * MAX_WRITE_RECORD }), fc.constant(24), fc.constant(0)),
      (type, seq, offset, length, payload) => {
        const hb = Buffer.alloc(RECORD_HEADER_SIZE);
        RECORD_MAGIC.copy(hb, 0);
        hb.writeUInt8(type, 4);
        hb.writeUInt32BE(seq[0] >>> 11, 8);
        hb.writeUInt32BE(seq[1], 12);
        hb.writeUInt32BE(offset[0] >>> 11, 16);
        hb.writeUInt32BE(offset[1], 20);
        hb.writeUInt32BE(length[0], 24);
        hb.writeUInt32BE(length[1], 28);
        hb.writeUInt32BE(payload, 32);
        try {
          const h = decodeRecordHeader(hb, 0);
          assert.notEqual(h, NEED_MORE);
          if (h === NEED_MORE) return;
          assert.ok(h.size <= MAX_RECORD_SIZE, `header asks for ${h.size} bytes`);
          assert.ok(h.offset + h.length <= Number.MAX_SAFE_INTEGER, 'range beyond 2^53');
          assert.equal(decodeOutcome(Buffer.concat([hb, Buffer.alloc(h.size - RECORD_HEADER_SIZE)]), 0, 0), 'error');
        } catch (err) {
          assert.ok(err instanceof JournalRecordError, String(err));
        }
      },
    ),
    { numRuns: runs * 5 },
  );
  // a header that passes validation bounds what it asks for
  const h = Buffer.alloc(RECORD_HEADER_SIZE);
  RECORD_MAGIC.copy(h, 0);
  h.writeUInt8(REC.WRITE, 4);
  h.writeUInt32BE(1, 12); // seq 1
  h.writeUInt32BE(0xffffffff, 28); // length 4 GiB - 1
  h.writeUInt32BE(0xffffffff, 32); // payload 4 GiB - 1
  assert.throws(() => decodeRecordHeader(h, 0), JournalRecordError);
});
