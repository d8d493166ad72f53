// The origin side of write-back (src/edge/local/applier.ts): batches of epochs are applied
// atomically through the applier's redo log (I3) and exactly once (I4), whatever the link does
// (duplicates, reordering, dropped connections) and however the process dies (kill -9).
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import { open, readdir, readFile, truncate, writeFile, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { describe, it } from 'node:test';
import fc from 'fast-check';

import { BlockError, FilterDevice, type BlockDevice, type ZeroOptions } from '../../src/block/device.js';
import { FileDevice } from '../../src/block/file.js';
import { APPLIED_LOG_NAME, APPLIED_RECORD_SIZE, AppliedLogCorruptError, ApplierLockedError } from '../../src/edge/local/applied-log.js';
import { Applier, ApplierRecoveryError, classifyBatch, readAppliedLog, REDO_LOG_NAME, type AppliedRecord } from '../../src/edge/local/applier.js';
import type { LinkMessage } from '../../src/link/codec.js';
import { CODEC_ZERO } from '../../src/link/compress.js';
import { CODEC, EPOCH_STATUS } from '../../src/link/protocol.js';
import { createLogger } from '../../src/log/logger.js';
import { registry } from '../../src/metrics/registry.js';
import type { Extent } from '../../src/writeback/batch.js';
import {
  applyExtents,
  batchFrames,
  CRASH_DEVICE_SIZE,
  CRASH_JOURNAL,
  crashBatch,
  deliver,
  FakeConn,
  prng,
  prngBytes,
  query,
  sendBatch,
  type BatchSpec,
} from '../fixtures/applier-child.js';
import { ROOT, startProc, tempDir } from '../helpers/proc.js';

const log = createLogger('test', { write: () => true } as unknown as NodeJS.WritableStream);
const J1 = Buffer.alloc(16, 0x11);
const J2 = Buffer.alloc(16, 0x22);
const FIXTURE = path.join(ROOT, 'test', 'fixtures', 'applier-child.ts');
const MiB = 1024 * 1024;

interface Env {
  file: string;
  state: string;
  model: Buffer;
  cleanup: () => Promise<void>;
}

/** A temp origin disk of `size` bytes with random contents (the model starts equal to it). */
async function makeEnv(size: number, key = 'initial'): Promise<Env> {
  const t = await tempDir('spw-applier-');
  const file = path.join(t.dir, 'origin.img');
  const model = prngBytes(key, size);
  await writeFile(file, model);
  return { file, state: path.join(t.dir, 'state', 'vol'), model, cleanup: t.cleanup };
}

interface Opened {
  a: Applier;
  /** the device layer between the applier and the file. */
  spy: SpyDevice;
  close: () => Promise<void>;
}

async function openApplier(env: Env, opts: { volume?: string; events?: string[] } = {}): Promise<Opened> {
  const file = await FileDevice.open(env.file);
  const spy = new SpyDevice(file, opts.events);
  try {
    const a = await Applier.open({ volume: opts.volume ?? 'vol', dir: env.state, device: spy, log });
    return {
      a,
      spy,
      close: async () => {
        await a.close();
        await file.close();
      },
    };
  } catch (err) {
    await file.close();
    throw err;
  }
}

async function assertFileIs(env: Env, expected: Buffer, what: string): Promise<void> {
  const got = await readFile(env.file);
  if (got.equals(expected)) return;
  let i = 0;
  while (i < got.length && got[i] === expected[i]) i++;
  assert.fail(`${what}: the origin differs from the model at byte ${i}`);
}

/** The applied log is: takeover of `journal`, then applied records with exactly `ranges`. */
function assertAppliedLog(records: AppliedRecord[], journal: Buffer, ranges: Array<[number, number]>): void {
  assert.ok(records.length >= 1, 'the applied log starts with a takeover');
  const takeover = records.findLastIndex((r) => r.kind === 'takeover');
  assert.ok(takeover >= 0 && records[takeover]!.journalId.equals(journal), 'the last takeover is by the journal');
  const applied = records.slice(takeover + 1);
  assert.ok(applied.every((r) => r.kind === 'applied' && r.journalId.equals(journal)));
  assert.deepEqual(
    applied.map((r) => [r.firstSeq, r.lastSeq]),
    ranges,
  );
  for (let i = 0; i < applied.length; i++) assert.equal(applied[i]!.firstSeq, i === 0 ? 1 : applied[i - 1]!.lastSeq + 1, 'contiguous, each epoch once');
}

async function eventually(check: () => Promise<void>, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await check();
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await new Promise((r) => setTimeout(r, 5));
    }
  }
}

function dataExtent(offset: number, length: number, key: string): Extent {
  return { offset, data: prngBytes(key, length) };
}

async function stateFiles(env: Env): Promise<string[]> {
  return (await readdir(env.state)).sort();
}

/** A device layer that records what reaches the origin and can fail writes on demand. */
class SpyDevice extends FilterDevice {
  constructor(
    inner: BlockDevice,
    readonly events: string[] = [],
  ) {
    super(inner);
  }
  /** the next write (or zero) with this number (1-based) fails with EIO; 0 = never. */
  failAt = 0;
  private ops = 0;
  onWrite?: () => void;

  get description(): string {
    return `spy(${this.inner.description})`;
  }
  private io(what: string): void {
    this.onWrite?.();
    this.events.push(what);
    if (++this.ops === this.failAt) throw new BlockError('EIO', 'injected I/O error');
  }
  override async write(offset: number, data: Buffer): Promise<void> {
    this.io('device write');
    return this.inner.write(offset, data);
  }
  override async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    this.io('device zero');
    return this.inner.writeZeroes(offset, length, opts);
  }
  override async flush(): Promise<void> {
    this.events.push('device flush');
    return this.inner.flush();
  }
}

describe('applier', () => {
  it('applies a batch of data, zero and compressed extents; the file equals the model', async () => {
    const env = await makeEnv(8 * MiB);
    try {
      const { a, close } = await openApplier(env, { volume: 'happy' });
      const conn = new FakeConn();
      assert.equal(a.journalId ?? 'none', 'none');
      assert.equal(await query(a, conn, J1), 0);
      assert.ok(a.journalId?.equals(J1));
      const spec: BatchSpec = {
        journalId: J1,
        firstSeq: 1,
        lastSeq: 3,
        extents: [
          dataExtent(12345, 300 * 1024, 'random'),
          { offset: 2 * MiB + 7, data: Buffer.alloc(2.5 * MiB, 'compressible text ') }, // three frames, LZ4
          { offset: 5 * MiB, length: 1.5 * MiB, zero: true }, // two zero frames
          { offset: 6 * MiB + 3, data: Buffer.alloc(70000) }, // all-zero data travels as a zero frame
          dataExtent(12345 + 1000, 5000, 'overlap'), // overlaps the first: the later one wins
          { offset: 8 * MiB - 1, data: Buffer.from([0xab]) }, // the last byte of the disk
        ],
      };
      const frames = batchFrames(spec, 1);
      const codecs = new Set(frames.flatMap((f) => (f.type === 'epoch-data' ? [f.zero ? 'zero' : f.codec === CODEC.LZ4 ? 'lz4' : 'raw'] : [])));
      assert.deepEqual([...codecs].sort(), ['lz4', 'raw', 'zero'], 'the batch exercises every encoding');
      await deliver(a, conn, frames);
      const ack = conn.ack(1);
      assert.equal(ack?.status, EPOCH_STATUS.APPLIED, ack?.message);
      assert.equal(ack?.appliedSeq, 3);
      assert.equal(a.appliedSeq, 3);
      applyExtents(env.model, spec.extents);
      await assertFileIs(env, env.model, 'after the batch');
      const records = await readAppliedLog(env.state);
      assertAppliedLog(records, J1, [[1, 3]]);
      assert.equal(records[1]!.extents, frames.length - 2);
      assert.equal(records[1]!.bytes, 300 * 1024 + 2.5 * MiB + 1.5 * MiB + 70000 + 5000 + 1);
      assert.deepEqual(await stateFiles(env), [APPLIED_LOG_NAME], 'no staging or redo file is left');
      assert.equal(statSync(env.state).mode & 0o777, 0o700);
      const gauge = await registry.getSingleMetric('spillway_origin_applied_seq')?.get();
      assert.equal(gauge?.values.find((v) => v.labels.volume === 'happy')?.value, 3);
      const batches = await registry.getSingleMetric('spillway_origin_batches_total')?.get();
      assert.equal(batches?.values.find((v) => v.labels.volume === 'happy' && v.labels.status === 'applied')?.value, 1);
      await close();

      // the state survives a restart
      const again = await openApplier(env);
      assert.ok(again.a.journalId?.equals(J1));
      assert.equal(again.a.appliedSeq, 3);
      assert.deepEqual(again.a.recovery, { truncatedAppliedLog: 0, stagesRemoved: 0, redo: 'none', detail: '' });
      assert.equal(await query(again.a, new FakeConn(), J1), 3);
      await again.close();
    } finally {
      await env.cleanup();
    }
  });

  it('answers a duplicate DUPLICATE and a gap GAP, and writes nothing for either', async () => {
    const env = await makeEnv(1 * MiB);
    try {
      const { a, close } = await openApplier(env);
      const conn = new FakeConn();
      await query(a, conn, J1);
      const first: BatchSpec = { journalId: J1, firstSeq: 1, lastSeq: 2, extents: [dataExtent(0, 4096, 'b1')] };
      assert.equal((await sendBatch(a, conn, first)).status, EPOCH_STATUS.APPLIED);
      applyExtents(env.model, first.extents);
      const logBefore = await readFile(path.join(env.state, APPLIED_LOG_NAME));

      // the same epochs again, with other contents: were they written, the file would show it
      for (const [f, l] of [[1, 2], [2, 2], [1, 1]] as const) {
        const ack = await sendBatch(a, conn, { journalId: J1, firstSeq: f, lastSeq: l, extents: [dataExtent(0, 8192, `dup${f}${l}`)] });
        assert.equal(ack.status, EPOCH_STATUS.DUPLICATE, ack.message);
        assert.equal(ack.appliedSeq, 2);
      }
      for (const [f, l] of [[4, 5], [4, 4], [2, 3]] as const) {
        const ack = await sendBatch(a, conn, { journalId: J1, firstSeq: f, lastSeq: l, extents: [dataExtent(0, 8192, `gap${f}${l}`)] });
        assert.equal(ack.status, EPOCH_STATUS.GAP, `${f}..${l}: ${ack.message}`);
        assert.equal(ack.appliedSeq, 2);
        assert.match(ack.message, /resend from 3/);
      }
      await assertFileIs(env, env.model, 'after duplicates and gaps');
      assert.ok((await readFile(path.join(env.state, APPLIED_LOG_NAME))).equals(logBefore), 'the applied log is unchanged');
      assert.deepEqual(await stateFiles(env), [APPLIED_LOG_NAME]);
      // and the next batch still applies
      const next: BatchSpec = { journalId: J1, firstSeq: 3, lastSeq: 3, extents: [dataExtent(100, 100, 'b3')] };
      assert.equal((await sendBatch(a, conn, next)).status, EPOCH_STATUS.APPLIED);
      applyExtents(env.model, next.extents);
      await assertFileIs(env, env.model, 'after batch 3');
      // epochs without writes make an empty batch
      const empty = await sendBatch(a, conn, { journalId: J1, firstSeq: 4, lastSeq: 5, extents: [] });
      assert.equal(empty.status, EPOCH_STATUS.APPLIED, empty.message);
      assertAppliedLog(await readAppliedLog(env.state), J1, [[1, 2], [3, 3], [4, 5]]);
      await assertFileIs(env, env.model, 'after an empty batch');
      await close();
    } finally {
      await env.cleanup();
    }
  });

  it('refuses a batch that does not match its BEGIN or its digest (CORRUPT) and applies nothing of it', async () => {
    const env = await makeEnv(2 * MiB);
    try {
      const { a, close } = await openApplier(env);
      const conn = new FakeConn();
      await query(a, conn, J1);
      const spec: BatchSpec = { journalId: J1, firstSeq: 1, lastSeq: 1, extents: [dataExtent(0, 1.5 * MiB, 'c1'), { offset: MiB / 2, length: 4096, zero: true }] };
      let id = 100;
      const cases: Array<[string, (f: LinkMessage[]) => LinkMessage[], RegExp]> = [
        ['wrong digest', (f) => f.map((m) => (m.type === 'epoch-end' ? { ...m, digest: Buffer.alloc(32, 7) } : m)), /digest/],
        ['an extent fewer', (f) => f.filter((_m, i) => i !== 2), /extents/],
        ['one more extent than announced', (f) => [...f.slice(0, -1), { ...(f[1] as LinkMessage), offset: 0 } as LinkMessage, f[f.length - 1]!], /more than the 3 extents/],
        ['BEGIN announces more bytes', (f) => f.map((m) => (m.type === 'epoch-begin' ? { ...m, bytes: m.bytes + 1 } : m)), /bytes/],
        ['BEGIN announces fewer bytes', (f) => f.map((m) => (m.type === 'epoch-begin' ? { ...m, bytes: m.bytes - 1 } : m)), /bytes announced/],
        ['BEGIN announces more extents', (f) => f.map((m) => (m.type === 'epoch-begin' ? { ...m, extents: m.extents + 1 } : m)), /extents/],
        ['an extent moved', (f) => f.map((m, i) => (i === 1 && m.type === 'epoch-data' ? { ...m, offset: m.offset + 512 } : m)), /digest/],
        ['data altered', (f) => f.map((m, i) => (i === 1 && m.type === 'epoch-data' ? { ...m, payload: Buffer.from(m.payload).fill(1, 0, 1) } : m)), /digest/],
        ['extent past the end of the disk', (f) => f.map((m, i) => (i === 1 && m.type === 'epoch-data' ? { ...m, offset: 2 * MiB - 100 } : m)), /past the end/],
        ['payload that does not decompress', (f) => f.map((m, i) => (i === 1 && m.type === 'epoch-data' ? { ...m, codec: CODEC.LZ4, payload: Buffer.from([0, 0, 16, 0, 0xff, 0xff]) } : m)), /lz4/],
        ['unknown codec', (f) => f.map((m, i) => (i === 1 && m.type === 'epoch-data' ? { ...m, codec: 9 } : m)), /codec 9/],
        ['zero-codec data with a payload', (f) => f.map((m, i) => (i === 1 && m.type === 'epoch-data' ? { ...m, codec: CODEC_ZERO, payload: Buffer.alloc(1) } : m)), /payload/],
      ];
      for (const [what, mutate, why] of cases) {
        const batch = id++;
        await deliver(a, conn, mutate(batchFrames(spec, batch, { compress: false })));
        const ack = conn.ack(batch);
        assert.equal(ack?.status, EPOCH_STATUS.CORRUPT, `${what}: ${ack?.message}`);
        assert.match(ack.message, why, what);
        assert.equal(ack.appliedSeq, 0);
        await assertFileIs(env, env.model, what);
        assert.deepEqual(await stateFiles(env), [APPLIED_LOG_NAME], `${what}: the staging file is removed`);
      }
      // data and END for a batch that never began, while a real one is open on the connection
      const good = batchFrames(spec, 200);
      const stray: LinkMessage = { type: 'epoch-data', handle: 1, batch: 999, offset: 0, length: 4, zero: false, codec: 0, payload: Buffer.from('evil') };
      await deliver(a, conn, [good[0]!, stray, ...good.slice(1, -1), { type: 'epoch-end', handle: 1, batch: 999, digest: Buffer.alloc(32) }, good[good.length - 1]!]);
      assert.equal(conn.ack(999)?.status, EPOCH_STATUS.CORRUPT);
      assert.match(conn.ack(999)!.message, /no EPOCH_BEGIN/);
      await deliver(a, conn, [{ type: 'epoch-end', handle: 1, batch: 998, digest: Buffer.alloc(32) }]);
      assert.equal(conn.ack(998)?.status, EPOCH_STATUS.CORRUPT);
      // the good batch, interleaved with the stray frames, applied
      assert.equal(conn.ack(200)?.status, EPOCH_STATUS.APPLIED, conn.ack(200)?.message);
      applyExtents(env.model, spec.extents);
      await assertFileIs(env, env.model, 'after the good batch');
      assertAppliedLog(await readAppliedLog(env.state), J1, [[1, 1]]);
      await close();
    } finally {
      await env.cleanup();
    }
  });

  it('answers NOT_OWNER to a journal that did not query, and lets a new journal take over', async () => {
    const env = await makeEnv(1 * MiB);
    try {
      const { a, close } = await openApplier(env);
      const conn = new FakeConn();
      const b1: BatchSpec = { journalId: J1, firstSeq: 1, lastSeq: 1, extents: [dataExtent(0, 1000, 'j1')] };
      let ack = await sendBatch(a, conn, b1);
      assert.equal(ack.status, EPOCH_STATUS.NOT_OWNER);
      assert.match(ack.message, /EPOCH_QUERY/);
      await query(a, conn, J1);
      assert.equal((await sendBatch(a, conn, b1)).status, EPOCH_STATUS.APPLIED);
      applyExtents(env.model, b1.extents);
      ack = await sendBatch(a, conn, { ...b1, journalId: J2 });
      assert.equal(ack.status, EPOCH_STATUS.NOT_OWNER, 'J2 has not queried');
      // J2 queries: it takes over from epoch 0
      assert.equal(await query(a, new FakeConn(), J2), 0);
      assert.ok(a.journalId?.equals(J2));
      assert.equal(a.appliedSeq, 0);
      const records = await readAppliedLog(env.state);
      assert.deepEqual(
        records.map((r) => [r.kind, r.journalId.toString('hex'), r.firstSeq, r.lastSeq]),
        [
          ['takeover', J1.toString('hex'), 0, 0],
          ['applied', J1.toString('hex'), 1, 1],
          ['takeover', J2.toString('hex'), 0, 0],
        ],
      );
      // the old journal is refused, the new one starts at 1
      const old: BatchSpec = { journalId: J1, firstSeq: 2, lastSeq: 2, extents: [dataExtent(0, 1000, 'old')] };
      ack = await sendBatch(a, conn, old);
      assert.equal(ack.status, EPOCH_STATUS.NOT_OWNER);
      assert.match(ack.message, new RegExp(J2.toString('hex')));
      const n1: BatchSpec = { journalId: J2, firstSeq: 1, lastSeq: 1, extents: [dataExtent(500, 1000, 'j2')] };
      assert.equal((await sendBatch(a, conn, n1)).status, EPOCH_STATUS.APPLIED);
      applyExtents(env.model, n1.extents);
      await assertFileIs(env, env.model, 'after the takeover');
      await close();
      const again = await openApplier(env);
      assert.ok(again.a.journalId?.equals(J2));
      assert.equal(again.a.appliedSeq, 1);
      await again.close();
    } finally {
      await env.cleanup();
    }
  });

  it('drops the batch of a closed connection; the resend on a new connection is applied once', async () => {
    const env = await makeEnv(4 * MiB);
    try {
      const { a, close } = await openApplier(env);
      await query(a, new FakeConn(), J1);
      const spec: BatchSpec = { journalId: J1, firstSeq: 1, lastSeq: 2, extents: [dataExtent(0, 3 * MiB, 'big'), { offset: 3 * MiB, length: 4096, zero: true }] };
      for (const cut of [1, 3, 5]) {
        // the first connection sends part of the batch (cut = 5: all of it but END) and dies
        const c1 = new FakeConn();
        const frames = batchFrames(spec, 1);
        await deliver(a, c1, frames.slice(0, cut));
        assert.ok((await stateFiles(env)).some((n) => n.startsWith('stage-')), 'the batch is being staged');
        c1.closed = true;
        a.connectionClosed(c1);
        await deliver(a, c1, frames.slice(cut)); // late frames of a closed connection are ignored
        assert.equal(c1.ack(1), undefined);
        await assertFileIs(env, env.model, `cut after ${cut} frames`);
        // the drop runs after the connection's last message: then the staging file is gone
        await eventually(async () => assert.deepEqual(await stateFiles(env), [APPLIED_LOG_NAME]));
      }
      const c2 = new FakeConn();
      assert.equal((await sendBatch(a, c2, spec)).status, EPOCH_STATUS.APPLIED);
      assert.equal((await sendBatch(a, c2, spec)).status, EPOCH_STATUS.DUPLICATE);
      applyExtents(env.model, spec.extents);
      await assertFileIs(env, env.model, 'after the resend');
      assertAppliedLog(await readAppliedLog(env.state), J1, [[1, 2]]);
      await close();
    } finally {
      await env.cleanup();
    }
  });

  it('applies one of two copies of a batch streaming at once on two connections', async () => {
    const env = await makeEnv(2 * MiB);
    try {
      const { a, close } = await openApplier(env);
      await query(a, new FakeConn(), J1);
      const spec: BatchSpec = { journalId: J1, firstSeq: 1, lastSeq: 1, extents: [dataExtent(0, 1.5 * MiB, 'twice')] };
      const [c1, c2] = [new FakeConn(), new FakeConn()];
      const f1 = batchFrames(spec, 1);
      const f2 = batchFrames(spec, 1);
      const all: Promise<void>[] = [];
      for (let i = 0; i < f1.length; i++) all.push(a.handle(f1[i]!, c1), a.handle(f2[i]!, c2));
      await Promise.all(all);
      assert.deepEqual([c1.ack(1)?.status, c2.ack(1)?.status].sort(), [EPOCH_STATUS.APPLIED, EPOCH_STATUS.DUPLICATE]);
      applyExtents(env.model, spec.extents);
      await assertFileIs(env, env.model, 'after two copies');
      assertAppliedLog(await readAppliedLog(env.state), J1, [[1, 1]]);
      assert.deepEqual(await stateFiles(env), [APPLIED_LOG_NAME]);
      await close();
    } finally {
      await env.cleanup();
    }
  });

  it('persists before it applies: COMMIT, fdatasync, rename, directory fsync, then the disk, flush, then the applied record', async () => {
    const env = await makeEnv(4 * MiB);
    const events: string[] = [];
    const restore = await traceFileHandles(events);
    try {
      const { a, spy, close } = await openApplier(env, { events });
      let checked = false;
      spy.onWrite = () => {
        if (checked) return;
        checked = true;
        const redo = path.join(env.state, REDO_LOG_NAME);
        const bytes = existsSync(redo) ? readFileSync(redo) : Buffer.alloc(0);
        events.push(bytes.length >= 64 && bytes.readUInt8(bytes.length - 64 + 5) === 3 ? 'redo.log is committed' : 'redo.log is missing or uncommitted');
      };
      const conn = new FakeConn();
      await query(a, conn, J1);
      events.length = 0;
      const spec: BatchSpec = { journalId: J1, firstSeq: 1, lastSeq: 1, extents: [dataExtent(0, 2 * MiB, 'order'), { offset: 3 * MiB, length: 8192, zero: true }] };
      assert.equal((await sendBatch(a, conn, spec)).status, EPOCH_STATUS.APPLIED);
      await close();
      const trace = events.filter((e) => !/^write stage-\S+ EXTENT$/.test(e));
      const step = (re: RegExp, from: number): number => {
        const i = trace.findIndex((e, k) => k > from && re.test(e));
        assert.ok(i >= 0, `no ${re} after step ${from} (${trace[from] ?? 'start'}):\n${trace.join('\n')}`);
        return i;
      };
      const commit = step(/^write stage-\S+ COMMIT$/, -1);
      const sync = step(/^datasync stage-/, commit);
      const dir = step(new RegExp(`^sync ${path.basename(env.state)}$`), sync);
      const firstDevice = trace.findIndex((e) => /^device (write|zero)$/.test(e));
      assert.ok(firstDevice > dir, `nothing reaches the disk before the batch is durably committed:\n${trace.join('\n')}`);
      assert.equal(trace[firstDevice - 1], 'redo.log is committed', 'redo.log is in place when the disk is first written');
      const lastDevice = trace.findLastIndex((e) => /^device (write|zero)$/.test(e));
      const flush = step(/^device flush$/, lastDevice);
      const record = step(/^write applied\.log applied$/, flush);
      step(/^datasync applied\.log$/, record);
      assert.ok(trace.includes('device zero'), 'zero extents use writeZeroes where the device has it');
    } finally {
      restore();
      await env.cleanup();
    }
  });

  it('keeps a committed batch whose apply failed and completes it: before the next batch, or when reopened', async () => {
    for (const how of ['resend', 'reopen'] as const) {
      const env = await makeEnv(4 * MiB);
      try {
        const first = await openApplier(env);
        const spy = first.spy;
        const conn = new FakeConn();
        await query(first.a, conn, J1);
        const spec: BatchSpec = { journalId: J1, firstSeq: 1, lastSeq: 1, extents: [dataExtent(0, MiB, 'a'), dataExtent(MiB, MiB, 'b'), dataExtent(2 * MiB, MiB, 'c')] };
        spy.failAt = 2; // the first extent is written, the second fails: the disk is torn now
        const ack = await sendBatch(first.a, conn, spec);
        assert.equal(ack.status, EPOCH_STATUS.IO, ack.message);
        assert.match(ack.message, /injected I\/O error/);
        assert.equal(first.a.appliedSeq, 0);
        assert.ok(existsSync(path.join(env.state, REDO_LOG_NAME)), 'the committed batch is kept');
        const next = { ...spec, extents: [dataExtent(0, 10, 'next')] };
        applyExtents(env.model, spec.extents);
        if (how === 'resend') {
          spy.failAt = 0;
          const again = await sendBatch(first.a, conn, spec);
          assert.equal(again.status, EPOCH_STATUS.DUPLICATE, 'completed from the redo log, so the resend is a duplicate');
          await first.close();
        } else {
          await first.close();
          const reopened = await openApplier(env);
          assert.equal(reopened.a.recovery.redo, 'completed', reopened.a.recovery.detail);
          assert.equal(reopened.a.appliedSeq, 1);
          assert.equal((await sendBatch(reopened.a, conn, next)).status, EPOCH_STATUS.DUPLICATE);
          await reopened.close();
        }
        await assertFileIs(env, env.model, how);
        assertAppliedLog(await readAppliedLog(env.state), J1, [[1, 1]]);
        assert.deepEqual(await stateFiles(env), [APPLIED_LOG_NAME]);
      } finally {
        await env.cleanup();
      }
    }
  });

  it('recovers from a redo log cut or damaged anywhere: all of the batch or none of it, or a refusal', async () => {
    const env = await makeEnv(256 * 1024);
    try {
      // Leave a committed redo log behind without touching the disk: the first write fails.
      const first = await openApplier(env);
      const spy = first.spy;
      await query(first.a, new FakeConn(), J1);
      const spec: BatchSpec = {
        journalId: J1,
        firstSeq: 1,
        lastSeq: 2,
        extents: [dataExtent(1000, 20000, 'r1'), { offset: 50000, length: 30000, zero: true }, { offset: 100000, data: Buffer.alloc(40000, 'abc') }, dataExtent(150000, 100, 'r2')],
      };
      spy.failAt = 1;
      assert.equal((await sendBatch(first.a, new FakeConn(), spec)).status, EPOCH_STATUS.IO);
      await first.close();
      const redo = await readFile(path.join(env.state, REDO_LOG_NAME));
      const log0 = await readFile(path.join(env.state, APPLIED_LOG_NAME));
      const before = Buffer.from(env.model);
      const after = Buffer.from(env.model);
      applyExtents(after, spec.extents);
      await assertFileIs(env, before, 'nothing applied yet');
      const outcomes = new Map<string, number>();

      await fc.assert(
        fc.asyncProperty(
          fc.oneof(
            fc.record({ kind: fc.constant('cut' as const), at: fc.nat(redo.length - 1) }),
            fc.record({ kind: fc.constant('flip' as const), at: fc.nat(redo.length - 1), bit: fc.nat(7) }),
            fc.record({ kind: fc.constant('intact' as const) }),
          ),
          async (m) => {
            await writeFile(env.file, before);
            await writeFile(path.join(env.state, APPLIED_LOG_NAME), log0);
            const damaged = Buffer.from(redo);
            if (m.kind === 'flip') damaged[m.at]! ^= 1 << m.bit;
            await writeFile(path.join(env.state, REDO_LOG_NAME), m.kind === 'cut' ? damaged.subarray(0, m.at) : damaged);
            let o: Opened;
            try {
              o = await openApplier(env);
            } catch (err) {
              // only a committed batch that cannot be read back is refused
              assert.ok(err instanceof ApplierRecoveryError, String(err));
              assert.equal(m.kind, 'flip');
              outcomes.set('refused', (outcomes.get('refused') ?? 0) + 1);
              return;
            }
            const r = o.a.recovery;
            await o.close();
            outcomes.set(r.redo, (outcomes.get(r.redo) ?? 0) + 1);
            if (r.redo === 'completed') {
              await assertFileIs(env, after, `${JSON.stringify(m)} completed`);
              assertAppliedLog(await readAppliedLog(env.state), J1, [[1, 2]]);
            } else {
              assert.equal(r.redo, 'discarded');
              assert.notEqual(m.kind, 'intact');
              await assertFileIs(env, before, `${JSON.stringify(m)} discarded`);
              assertAppliedLog(await readAppliedLog(env.state), J1, []);
            }
            assert.deepEqual(await stateFiles(env), [APPLIED_LOG_NAME]);
          },
        ),
        { numRuns: 150, examples: [[{ kind: 'intact' }], [{ kind: 'cut', at: redo.length - 1 }], [{ kind: 'cut', at: 64 }], [{ kind: 'flip', at: 200, bit: 0 }]] },
      );
      assert.ok((outcomes.get('completed') ?? 0) > 0 && (outcomes.get('discarded') ?? 0) > 0 && (outcomes.get('refused') ?? 0) > 0, JSON.stringify([...outcomes]));

      // a committed batch that is already recorded as applied is stale: discarded, not re-applied
      await writeFile(env.file, before);
      await writeFile(path.join(env.state, APPLIED_LOG_NAME), log0);
      await writeFile(path.join(env.state, REDO_LOG_NAME), redo);
      const o = await openApplier(env);
      assert.equal(o.a.recovery.redo, 'completed');
      await o.close();
      await writeFile(path.join(env.state, REDO_LOG_NAME), redo);
      const o2 = await openApplier(env);
      assert.equal(o2.a.recovery.redo, 'discarded');
      assert.match(o2.a.recovery.detail, /already applied/);
      await o2.close();
      assertAppliedLog(await readAppliedLog(env.state), J1, [[1, 2]]);
    } finally {
      await env.cleanup();
    }
  });

  it('cuts a torn record off the applied log, and refuses one damaged before the end', async () => {
    const env = await makeEnv(64 * 1024);
    try {
      const o = await openApplier(env);
      const conn = new FakeConn();
      await query(o.a, conn, J1);
      for (let s = 1; s <= 3; s++) assert.equal((await sendBatch(o.a, conn, { journalId: J1, firstSeq: s, lastSeq: s, extents: [dataExtent(s * 100, 10, `t${s}`)] })).status, EPOCH_STATUS.APPLIED);
      const unlocked = await FileDevice.open(env.file, { lock: false });
      await assert.rejects(Applier.open({ volume: 'vol', dir: env.state, device: unlocked, log }), ApplierLockedError, 'a second applier on the same state directory is refused');
      await unlocked.close();
      await o.close();
      const logFile = path.join(env.state, APPLIED_LOG_NAME);
      const good = await readFile(logFile);
      assert.equal(good.length, 4 * APPLIED_RECORD_SIZE);

      // a partial record
      await writeFile(logFile, Buffer.concat([good, good.subarray(APPLIED_RECORD_SIZE, APPLIED_RECORD_SIZE + 30)]));
      assert.equal((await readAppliedLog(env.state)).length, 4);
      let r = await openApplier(env);
      assert.equal(r.a.appliedSeq, 3);
      assert.equal(r.a.recovery.truncatedAppliedLog, 30);
      await r.close();
      assert.ok((await readFile(logFile)).equals(good));

      // a full-size last record with a bad CRC (written, never synced): the epoch before it counts
      const torn = Buffer.from(good);
      torn[torn.length - 10]! ^= 0xff;
      await writeFile(logFile, torn);
      assert.deepEqual((await readAppliedLog(env.state)).map((x) => x.lastSeq), [0, 1, 2]);
      r = await openApplier(env);
      assert.equal(r.a.appliedSeq, 2);
      assert.equal(r.a.recovery.truncatedAppliedLog, APPLIED_RECORD_SIZE);
      await r.close();

      // damage before the last record is not a torn write
      const damaged = Buffer.from(good);
      damaged[APPLIED_RECORD_SIZE + 10]! ^= 0xff;
      await writeFile(logFile, damaged);
      await assert.rejects(readAppliedLog(env.state), AppliedLogCorruptError);
      const twoBad = Buffer.from(good);
      twoBad[2 * APPLIED_RECORD_SIZE + 10]! ^= 0xff;
      twoBad[3 * APPLIED_RECORD_SIZE + 10]! ^= 0xff;
      await writeFile(logFile, twoBad);
      await assert.rejects(openApplier(env), AppliedLogCorruptError);
      assert.deepEqual(await readAppliedLog(path.join(env.state, 'missing')), []);
    } finally {
      await env.cleanup();
    }
  });

  it('classifies batches against the applied state (a pure function)', () => {
    const st = { journalId: J1, appliedSeq: 5 };
    const b = (firstSeq: number, lastSeq: number, journalId = J1) => classifyBatch(st, { journalId, firstSeq, lastSeq }, 'v')?.status ?? 'apply';
    assert.equal(b(6, 6), 'apply');
    assert.equal(b(6, 9), 'apply');
    assert.equal(b(1, 5), EPOCH_STATUS.DUPLICATE);
    assert.equal(b(5, 5), EPOCH_STATUS.DUPLICATE);
    assert.equal(b(5, 6), EPOCH_STATUS.GAP); // overlaps what is applied: resend from 6
    assert.equal(b(7, 7), EPOCH_STATUS.GAP);
    assert.equal(b(6, 6, J2), EPOCH_STATUS.NOT_OWNER);
    assert.equal(classifyBatch({ journalId: null, appliedSeq: 0 }, { journalId: J1, firstSeq: 1, lastSeq: 1 }, 'v')?.status, EPOCH_STATUS.NOT_OWNER);
  });

  it('property: duplicated, reordered and dropped deliveries with a retrying sender apply every batch once, in order', async (t) => {
    const SIZE = 64 * 1024;
    const extentArb = fc.record({ offset: fc.nat(SIZE - 1), length: fc.integer({ min: 1, max: 12000 }), kind: fc.constantFrom('data', 'zero', 'pattern'), key: fc.nat(1000) });
    const batchArb = fc.record({ epochs: fc.integer({ min: 1, max: 3 }), extents: fc.array(extentArb, { maxLength: 5 }) });
    let runs = 0;
    const seen = { applied: 0, duplicate: 0, gap: 0, dropped: 0, droppedMidBatch: 0 };
    await fc.assert(
      fc.asyncProperty(fc.array(batchArb, { minLength: 1, maxLength: 6 }), fc.array(fc.nat(1 << 20), { minLength: 1, maxLength: 300 }), async (batches, choices) => {
        runs++;
        const env = await makeEnv(SIZE, `prop${runs}`);
        const o = await openApplier(env);
        try {
          const specs: BatchSpec[] = [];
          let seq = 0;
          for (const [i, bt] of batches.entries()) {
            const extents: Extent[] = bt.extents.map((e, k) => {
              const length = Math.min(e.length, SIZE - e.offset);
              if (e.kind === 'zero') return { offset: e.offset, length, zero: true };
              if (e.kind === 'pattern') return { offset: e.offset, data: Buffer.alloc(length, e.key % 4) }; // key % 4 === 0: all zero
              return { offset: e.offset, data: prngBytes(`${runs}/${i}/${k}/${e.key}`, length) };
            });
            specs.push({ journalId: J1, firstSeq: seq + 1, lastSeq: seq + bt.epochs, extents });
            seq += bt.epochs;
          }
          const last = seq;
          // the origin after each batch: I3 says the file is one of these whenever it is quiet
          const modelAfter = new Map<number, Buffer>([[0, Buffer.from(env.model)]]);
          for (const sp of specs) {
            const m = Buffer.from(modelAfter.get(sp.firstSeq - 1)!);
            applyExtents(m, sp.extents);
            modelAfter.set(sp.lastSeq, m);
          }
          let c = 0;
          let clean = false;
          const pick = (n: number): number => (clean || n <= 1 ? 0 : choices[c++ % choices.length]! % n);
          let known = await query(o.a, new FakeConn(), J1);
          let batchId = 1;
          const live: FakeConn[] = [];
          for (let round = 0; o.a.appliedSeq < last; round++) {
            assert.ok(round < 200, 'the sender makes progress');
            clean = round >= 40 || c >= choices.length * 2;
            const next = specs.findIndex((s) => s.firstSeq === known + 1);
            assert.ok(next >= 0, `the sender's position ${known} is a batch boundary`);
            const deliveries: Array<{ spec: BatchSpec; conn: FakeConn; frames: LinkMessage[]; pos: number; dropAt: number; batch: number }> = [];
            const k = 1 + pick(3);
            for (let j = 0; j < k; j++) {
              let idx = next;
              const how = pick(6);
              if (how === 3) idx = Math.min(specs.length - 1, next + 1); // ahead: a gap unless the first lands first
              if (how === 4 && next > 0) idx = pick(next); // an old batch again
              if (how === 5 && deliveries.length > 0) idx = specs.indexOf(deliveries[0]!.spec); // two copies at once
              const open = live.filter((x) => !x.closed);
              const conn = open.length > 0 && pick(2) === 0 ? open[pick(open.length)]! : new FakeConn();
              if (!live.includes(conn)) live.push(conn);
              const frames = batchFrames(specs[idx]!, batchId++);
              deliveries.push({ spec: specs[idx]!, conn, frames, pos: 0, dropAt: pick(4) === 1 ? 1 + pick(frames.length - 1) : -1, batch: batchId - 1 });
            }
            const pending: Promise<void>[] = [];
            let dropped = false;
            for (;;) {
              const active = deliveries.filter((d) => d.pos < d.frames.length && !d.conn.closed);
              if (active.length === 0) break;
              const d = active[pick(active.length)]!;
              // sometimes let what was sent so far be processed (else a drop loses it all unseen)
              if (pick(4) === 1 || (d.pos === d.dropAt && pick(3) !== 0)) await Promise.all(pending);
              if (d.pos === d.dropAt) {
                d.conn.closed = true;
                o.a.connectionClosed(d.conn);
                dropped = true;
                seen.dropped++;
                if (d.pos >= 2 && (await stateFiles(env)).some((n) => n.startsWith('stage-'))) seen.droppedMidBatch++;
                continue;
              }
              pending.push(o.a.handle(d.frames[d.pos++]!, d.conn));
            }
            await Promise.all(pending);
            for (const d of deliveries) {
              const ack = d.conn.ack(d.batch);
              if (!ack) continue; // lost with its connection: the sender resends
              assert.ok(([EPOCH_STATUS.APPLIED, EPOCH_STATUS.DUPLICATE, EPOCH_STATUS.GAP] as number[]).includes(ack.status), `status ${ack.status}: ${ack.message}`);
              if (ack.status === EPOCH_STATUS.APPLIED) assert.equal(ack.appliedSeq, d.spec.lastSeq);
              seen[ack.status === EPOCH_STATUS.APPLIED ? 'applied' : ack.status === EPOCH_STATUS.DUPLICATE ? 'duplicate' : 'gap']++;
              if (ack.status === EPOCH_STATUS.GAP) known = ack.appliedSeq; // resend from appliedSeq + 1
              else known = Math.max(known, ack.appliedSeq);
            }
            // after a lost connection the sender reconnects and asks where the origin stands
            if (dropped) known = await query(o.a, new FakeConn(), J1);
            await eventually(async () => assert.deepEqual((await stateFiles(env)).filter((n) => !n.startsWith('stage-')), [APPLIED_LOG_NAME]));
            await assertFileIs(env, modelAfter.get(o.a.appliedSeq)!, `round ${round}, at epoch ${o.a.appliedSeq}`);
          }
          await o.close();
          await assertFileIs(env, modelAfter.get(last)!, 'after all batches');
          assertAppliedLog(
            await readAppliedLog(env.state),
            J1,
            specs.map((s) => [s.firstSeq, s.lastSeq]),
          );
          assert.deepEqual(await stateFiles(env), [APPLIED_LOG_NAME], 'no staging file outlives its connection');
        } finally {
          await o.close();
          await env.cleanup();
        }
      }),
      { numRuns: Number(process.env.SPILLWAY_PROP_RUNS ?? 60) },
    );
    t.diagnostic(`acks and faults over ${runs} runs: ${JSON.stringify(seen)}`);
    for (const [k, n] of Object.entries(seen)) assert.ok(n > 0, `the runs provoked no ${k}`);
  });

  it('kill -9 at random times: after recovery the origin holds exactly the applied epochs, each once', { timeout: 30 * 60_000 }, async (t) => {
    const iterations = Number(process.env.SPILLWAY_CRASH_ITER ?? 20);
    const seed = Number(process.env.SPILLWAY_CRASH_SEED ?? Math.floor(Math.random() * 1e9));
    t.diagnostic(`seed ${seed} (SPILLWAY_CRASH_SEED), ${iterations} kills (SPILLWAY_CRASH_ITER)`);
    const tmp = await tempDir('spw-applier-crash-');
    const env: Env = { file: path.join(tmp.dir, 'origin.img'), state: path.join(tmp.dir, 'state'), model: Buffer.alloc(CRASH_DEVICE_SIZE), cleanup: tmp.cleanup };
    await writeFile(env.file, '');
    await truncate(env.file, CRASH_DEVICE_SIZE);
    const rnd = prng(seed);
    let modelSeq = 0;
    const ranges: Array<[number, number]> = [];
    const stats = { midBatch: 0, completed: 0, discarded: 0, stages: 0 };
    const advance = (to: number): void => {
      while (modelSeq < to) {
        const b = crashBatch(seed, modelSeq + 1);
        assert.ok(b.lastSeq <= to, `the origin is at epoch ${to}, inside batch ${b.firstSeq}..${b.lastSeq}`);
        applyExtents(env.model, b.extents);
        ranges.push([b.firstSeq, b.lastSeq]);
        modelSeq = b.lastSeq;
      }
    };
    const check = async (what: string): Promise<void> => {
      const o = await openApplier(env); // recovery
      const r = o.a.recovery;
      if (r.redo !== 'none' || r.stagesRemoved > 0) stats.midBatch++;
      if (r.redo === 'completed') stats.completed++;
      if (r.redo === 'discarded') stats.discarded++;
      if (r.stagesRemoved > 0) stats.stages++;
      const seq = o.a.appliedSeq;
      assert.ok(o.a.journalId?.equals(CRASH_JOURNAL));
      await o.close();
      assert.ok(seq >= modelSeq, 'the applied epoch never goes back');
      advance(seq);
      await assertFileIs(env, env.model, `${what}: at epoch ${seq}`);
      assertAppliedLog(await readAppliedLog(env.state), CRASH_JOURNAL, ranges);
    };
    const child = (until: number) => startProc(process.execPath, ['--import', 'tsx', FIXTURE, env.file, env.state, CRASH_JOURNAL.toString('hex'), String(seed), String(until)], { cwd: ROOT });
    try {
      for (let i = 0; i < iterations; i++) {
        const p = child(1e9);
        try {
          const deadline = Date.now() + 60_000;
          while (!/^ready /m.test(p.stdout())) {
            if (p.child.exitCode !== null || Date.now() > deadline) assert.fail(`the child did not start: ${p.stderr()}`);
            await new Promise((r) => setTimeout(r, 5));
          }
          await new Promise((r) => setTimeout(r, rnd() * 600));
        } finally {
          p.child.kill('SIGKILL');
        }
        const r = await p.exited;
        assert.equal(r.signal, 'SIGKILL', `the child died on its own: ${p.stderr()}`);
        await check(`kill ${i + 1}`);
      }
      // and it goes on from there to the end
      const p = child(modelSeq + 6);
      const r = await p.exited;
      assert.equal(r.code, 0, p.stderr());
      await check('final run');
      assert.ok(modelSeq >= 6);
      t.diagnostic(`${iterations} kills: ${stats.midBatch} mid-batch (${stats.completed} committed batches completed at recovery, ${stats.discarded} redo logs discarded, ${stats.stages} with staging files); epoch ${modelSeq}`);
      assert.ok(stats.midBatch > 0, 'some kill landed in the middle of a batch');
    } finally {
      await tmp.cleanup();
    }
  });
});

/** Record fdatasync/fsync and record writes of every FileHandle (by the file's name). The
 *  trace shows what the applier made durable, in which order; restore() undoes it. */
async function traceFileHandles(events: string[]): Promise<() => void> {
  const probe = await open(process.execPath, 'r');
  const proto = Object.getPrototypeOf(probe) as Record<string, (this: FileHandle, ...args: unknown[]) => Promise<unknown>>;
  await probe.close();
  const orig = { datasync: proto.datasync!, sync: proto.sync!, write: proto.write!, writev: proto.writev! };
  const name = (fh: FileHandle): string => {
    try {
      return path.basename(readlinkSync(`/proc/self/fd/${fh.fd}`));
    } catch {
      return '?';
    }
  };
  const kind = (b: unknown): string => {
    if (!Buffer.isBuffer(b) || b.length < 8) return 'data';
    if (b.readUInt32BE(0) === 0x53505244) return ['?', 'BEGIN', 'EXTENT', 'COMMIT'][b.readUInt8(5)] ?? '?';
    if (b.readUInt32BE(0) === 0x5350414c) return b.readUInt8(5) === 1 ? 'takeover' : 'applied';
    return 'data';
  };
  proto.datasync = function () {
    events.push(`datasync ${name(this)}`);
    return orig.datasync.call(this);
  };
  proto.sync = function () {
    events.push(`sync ${name(this)}`);
    return orig.sync.call(this);
  };
  proto.write = function (...args: unknown[]) {
    events.push(`write ${name(this)} ${kind(args[0])}`);
    return orig.write.apply(this, args);
  };
  proto.writev = function (...args: unknown[]) {
    events.push(`write ${name(this)} ${kind((args[0] as unknown[])[0])}`);
    return orig.writev.apply(this, args);
  };
  return () => Object.assign(proto, orig);
}
