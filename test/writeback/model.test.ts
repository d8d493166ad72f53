// Write-back against a model (fast-check): random sequences of write / zero / trim / flush / read
// / drain / restart of the remote side, for every policy, while the link between the shipper and
// the origin's applier drops connections mid-batch, loses acknowledgements, and delivers stale
// batches late (duplicated and reordered deliveries). Every layer is the real one (the
// WriteBackDevice, its overlay file and journal, the Shipper, the origin's Applier and its redo
// log on a real file); only the link is an in-process channel, so that faults can be injected
// at exact frames.
//
// Checked: every read equals the model of the guest's disk (I1); after a restart the volume
// reads as at the last flush; after a drain the origin equals the guest's disk (I2), the applied
// log shows each epoch once, in order (I4), and remote-only ranges never reach the origin.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import fc from 'fast-check';

import { FilterDevice, type IoOptions, type ZeroOptions } from '../../src/block/device.js';
import { FileDevice } from '../../src/block/file.js';
import { OverlayDevice } from '../../src/block/overlay.js';
import { ReadOnlyDevice } from '../../src/block/readonly.js';
import type { LinkMessage } from '../../src/link/codec.js';
import { Applier, readAppliedLog } from '../../src/edge/local/applier.js';
import { WriteBackDevice } from '../../src/writeback/device.js';
import { Journal } from '../../src/writeback/journal.js';
import { PolicyMap, type WritePolicy } from '../../src/writeback/policy.js';
import { Shipper, type ShipChannel, type ShipTransport } from '../../src/writeback/shipper.js';
import type { Logger } from '../../src/log/logger.js';

const RUNS = Number(process.env.SPILLWAY_FUZZ_RUNS ?? 200);
const SIZE = 256 * 1024;
const CHUNK = 64 * 1024;
const KEY = Buffer.alloc(32, 7);

const quiet: Logger = Object.assign(() => undefined, { child: () => quiet });

type Op =
  | { op: 'write'; offset: number; length: number; seed: number; fua: boolean }
  | { op: 'zero'; offset: number; length: number }
  | { op: 'trim'; offset: number; length: number }
  | { op: 'flush' }
  | { op: 'read'; offset: number; length: number }
  | { op: 'drain' }
  | { op: 'restart' }
  | { op: 'fault'; kind: 'drop-mid-batch' | 'lose-ack' | 'stale-redelivery' };

// Half the ranges fall in one hot 16 KiB area, so that writes overlap across epochs often.
const range = fc.oneof(
  fc.tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 40 * 1024 })).map(([o, l]) => ({ offset: o, length: Math.min(l, SIZE - o) })),
  fc.tuple(fc.integer({ min: 0, max: 16 * 1024 - 1 }), fc.integer({ min: 1, max: 8 * 1024 })).map(([o, l]) => ({ offset: 200 * 1024 + o, length: l })),
);
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: fc.tuple(range, fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 255 })), fc.boolean()).map(([r, seed, fua]) => ({ op: 'write' as const, ...r, seed, fua: fua && seed % 5 === 0 })) },
  { weight: 1, arbitrary: range.map((r) => ({ op: 'zero' as const, ...r })) },
  { weight: 1, arbitrary: range.map((r) => ({ op: 'trim' as const, ...r })) },
  { weight: 3, arbitrary: fc.constant({ op: 'flush' as const }) },
  { weight: 3, arbitrary: range.map((r) => ({ op: 'read' as const, ...r })) },
  { weight: 1, arbitrary: fc.constant({ op: 'drain' as const }) },
  { weight: 1, arbitrary: fc.constant({ op: 'restart' as const }) },
  { weight: 2, arbitrary: fc.constantFrom('drop-mid-batch', 'lose-ack', 'stale-redelivery').map((kind) => ({ op: 'fault' as const, kind: kind as 'drop-mid-batch' | 'lose-ack' | 'stale-redelivery' })) },
);

/** Seed 0 gives all-zero data (it must travel like any other write). */
function pattern(length: number, seed: number, offset: number): Buffer {
  const b = Buffer.alloc(length);
  if (seed === 0) return b;
  for (let i = 0; i < length; i++) b[i] = (seed * 31 + ((offset + i) >> 9) * 7 + i) & 0xff || 1;
  return b;
}

/** The link: frames from the shipper go to the applier through this, with faults on demand. */
class FaultyLink implements ShipTransport {
  handle = 1;
  shipper: Shipper | null = null;
  private pendingFault: 'drop-mid-batch' | 'lose-ack' | 'stale-redelivery' | null = null;
  /** frames of batches held back, delivered later on a fresh connection (stale redelivery). */
  private stale: LinkMessage[][] = [];
  private conns = 0;

  constructor(private readonly applier: () => Applier) {}

  arm(kind: 'drop-mid-batch' | 'lose-ack' | 'stale-redelivery'): void {
    this.pendingFault = kind;
  }

  async channel(): Promise<{ channel: ShipChannel; handle: number }> {
    return { channel: this.open(), handle: this.handle };
  }

  /** Deliver held-back batches now (late, after newer ones). */
  async flushStale(): Promise<void> {
    const batches = this.stale;
    this.stale = [];
    for (const frames of batches) {
      const conn = { id: ++this.conns, send: () => true };
      for (const f of frames) await this.applier().handle(f, conn);
      this.applier().connectionClosed(conn);
    }
  }

  private open(): ShipChannel {
    const closers: Array<() => void> = [];
    let closed = false;
    let sentInBatch = 0;
    let batchFrames: LinkMessage[] = [];
    const conn = {
      id: ++this.conns,
      send: (m: LinkMessage): boolean => {
        if (closed) return false;
        if (m.type === 'epoch-ack' && this.pendingFault === 'lose-ack') {
          this.pendingFault = null;
          close();
          return true;
        }
        queueMicrotask(() => this.shipper?.onMessage(m));
        return true;
      },
    };
    const close = () => {
      if (closed) return;
      closed = true;
      this.applier().connectionClosed(conn);
      for (const c of closers.splice(0)) c();
    };
    return {
      get closed() {
        return closed;
      },
      onClose: (cb) => {
        if (closed) queueMicrotask(cb);
        else closers.push(cb);
      },
      send: async (m: LinkMessage) => {
        if (closed) throw new Error('closed');
        if (m.type === 'epoch-begin') {
          sentInBatch = 0;
          batchFrames = [];
        }
        batchFrames.push(m);
        sentInBatch++;
        if (this.pendingFault === 'drop-mid-batch' && m.type === 'epoch-data' && sentInBatch >= 2) {
          this.pendingFault = null;
          close();
          throw new Error('connection dropped');
        }
        if (this.pendingFault === 'stale-redelivery' && m.type === 'epoch-end') {
          // This copy of the batch is held back; the shipper sees the connection die and
          // resends; the held copy arrives after that.
          this.pendingFault = null;
          this.stale.push(batchFrames);
          close();
          throw new Error('connection stalled');
        }
        await this.applier().handle(m, conn);
      },
    };
  }
}

interface Remote {
  journal: Journal | null;
  shipper: Shipper | null;
  device: WriteBackDevice;
}

async function openRemote(dir: string, origin: FileDevice, policy: PolicyMap, link: FaultyLink): Promise<Remote> {
  const base = new ReadOnlyDevice(origin); // stands in for the streamed read path: the live origin
  // The overlay is slowed down so that sealed epochs pile up before they reach it: reads must
  // then find the newest data among several unapplied epochs.
  const overlay = new SlowWrites(await OverlayDevice.open(noClose(base), { path: path.join(dir, 'vol.overlay'), granularity: 4096 }));
  const journal = policy.shipsAnything ? await Journal.open({ dir: path.join(dir, 'journal'), dataKey: KEY }) : null;
  const shipper = journal ? new Shipper({ volume: 'v', journal, transport: link, chunkSize: CHUNK, rpoMs: 50, shipAtBytes: 64 * 1024, log: quiet, ackTimeoutMs: 5000 }) : null;
  link.shipper = shipper;
  // A checkpoint after every epoch: checkpoints run beside the next epochs' overlay writes.
  const device = await WriteBackDevice.open({ overlay, policy, journal, shipper, epochMax: 64 * 1024 * 1024, volume: 'v', checkpointEveryMs: 0 });
  shipper?.start();
  return { journal, shipper, device };
}

class SlowWrites extends FilterDevice {
  get description(): string {
    return `slow(${this.inner.description})`;
  }
  override async write(offset: number, data: Buffer, opts?: IoOptions): Promise<void> {
    await new Promise((r) => setTimeout(r, Math.random() * 4));
    return super.write(offset, data, opts);
  }
  override async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    await new Promise((r) => setTimeout(r, Math.random() * 4));
    return super.writeZeroes(offset, length, opts);
  }
}

function noClose<T extends { close(): Promise<void> }>(d: T): T {
  return new Proxy(d, { get: (t, p, r) => (p === 'close' ? () => Promise.resolve() : Reflect.get(t, p, r) as unknown) });
}

async function closeRemote(r: Remote): Promise<void> {
  await r.device.close();
  await r.shipper?.stop();
  await r.journal?.close();
}

for (const policyName of ['origin', 'write-through', 'remote-only', 'mixed'] as const) {
  test(`write-back model: ${policyName} policy, with link faults, drains and restarts`, { timeout: 240_000 }, async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 40 }), fc.uint8Array({ minLength: 16, maxLength: 16 }), async (ops, initSeed) => {
        const dir = await mkdtemp(path.join(tmpdir(), 'spw-wbmodel-'));
        try {
          const initial = pattern(SIZE, initSeed[0]! + 1, 0);
          await writeFile(path.join(dir, 'origin.img'), initial);
          const origin = await FileDevice.open(path.join(dir, 'origin.img'), { readonly: false, lock: false });
          let applier = await Applier.open({ volume: 'v', dir: path.join(dir, 'applier'), device: origin, log: quiet });
          const link = new FaultyLink(() => applier);
          const def: WritePolicy = policyName === 'mixed' ? 'origin' : policyName;
          const ranges = policyName === 'mixed' ? [{ offset: 64 * 1024, length: 64 * 1024, policy: 'remote-only' as const, source: 'test' }, { offset: 192 * 1024, length: 32 * 1024, policy: 'write-through' as const, source: 'test' }] : [];
          const policy = new PolicyMap(SIZE, def, ranges);
          let remote = await openRemote(dir, origin, policy, link);
          const guest = Buffer.from(initial); // the guest's view (acknowledged writes)
          const originModel = Buffer.from(initial); // what the origin must hold after a drain
          try {
            for (const o of ops) {
              switch (o.op) {
                case 'write': {
                  const data = pattern(o.length, o.seed, o.offset);
                  await remote.device.write(o.offset, data, { fua: o.fua });
                  data.copy(guest, o.offset);
                  break;
                }
                case 'zero':
                case 'trim':
                  if (o.op === 'zero') await remote.device.writeZeroes(o.offset, o.length);
                  else await remote.device.trim(o.offset, o.length);
                  guest.fill(0, o.offset, o.offset + o.length);
                  break;
                case 'flush':
                  await remote.device.flush();
                  break;
                case 'read': {
                  const b = Buffer.alloc(o.length);
                  await remote.device.read(o.offset, b);
                  assert.ok(b.equals(guest.subarray(o.offset, o.offset + o.length)), `read ${o.offset}+${o.length} differs from the last acknowledged writes (I1)`);
                  break;
                }
                case 'drain': {
                  await remote.device.seal();
                  if (remote.shipper) await remote.shipper.drain();
                  break;
                }
                case 'restart':
                  // A clean stop keeps every acknowledged write, flushed or not (crashes are the
                  // kill -9 test's business). The origin edge restarts too (applier recovery).
                  await closeRemote(remote);
                  await link.flushStale();
                  await applier.close();
                  applier = await Applier.open({ volume: 'v', dir: path.join(dir, 'applier'), device: origin, log: quiet });
                  remote = await openRemote(dir, origin, policy, link);
                  break;
                case 'fault':
                  link.arm(o.kind);
                  break;
              }
              // late deliveries of held-back batches now and then
              if (o.op === 'read') await link.flushStale();
            }
            // Final drain: the origin holds every write of shipped ranges; remote-only ranges
            // keep the origin's initial bytes.
            await remote.device.seal();
            if (remote.shipper) await remote.shipper.drain();
            await link.flushStale();
            for (const p of policy.all()) {
              if (p.policy !== 'remote-only') guest.copy(originModel, p.offset, p.offset, p.offset + p.length);
            }
            const now = Buffer.alloc(SIZE);
            await origin.read(0, now);
            assert.ok(now.equals(originModel), 'after a drain the origin equals the guest disk (shipped ranges) and its own initial bytes (remote-only ranges)');
            const all = Buffer.alloc(SIZE);
            await remote.device.read(0, all);
            assert.ok(all.equals(guest), 'the remote view after the drain equals the guest disk');
            const log = (await readAppliedLog(path.join(dir, 'applier'))).filter((r) => r.kind === 'applied');
            let next = 1;
            for (const r of log) {
              assert.equal(r.firstSeq, next, `epochs applied in order, each once (I4): ${JSON.stringify(log.map((x) => [x.firstSeq, x.lastSeq]))}`);
              next = r.lastSeq + 1;
            }
            if (remote.journal) assert.equal(next - 1, remote.journal.lastSealed, 'every sealed epoch was applied');
          } finally {
            await closeRemote(remote).catch(() => undefined);
            await applier.close().catch(() => undefined);
            await origin.close();
          }
        } finally {
          await rm(dir, { recursive: true, force: true });
        }
      }),
      { numRuns: Math.max(10, Math.floor(RUNS / 8)) },
    );
  });
}

test('writing far past epochMax without a flush seals early and waits for the overlay without spinning', { timeout: 60_000 }, async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'spw-wbmax-'));
  try {
    const big = 8 * 1024 * 1024;
    await writeFile(path.join(dir, 'origin.img'), Buffer.alloc(big));
    const origin = await FileDevice.open(path.join(dir, 'origin.img'), { readonly: false, lock: false });
    const overlay = new SlowWrites(await OverlayDevice.open(noClose(new ReadOnlyDevice(origin)), { path: path.join(dir, 'vol.overlay'), granularity: 4096 }));
    const journal = await Journal.open({ dir: path.join(dir, 'journal'), dataKey: KEY });
    const dev = await WriteBackDevice.open({ overlay, policy: new PolicyMap(big, 'origin'), journal, shipper: null, epochMax: 64 * 1024, volume: 'v' });
    // A timer must keep firing while the writes run: a spinning memory bound would starve it.
    let ticks = 0;
    const timer = setInterval(() => ticks++, 5);
    const started = Date.now();
    const want: Buffer[] = [];
    for (let off = 0; off < big; off += 256 * 1024) {
      const data = pattern(256 * 1024, 3, off);
      want.push(data);
      await dev.write(off, data);
    }
    clearInterval(timer);
    assert.ok(journal.lastSealed >= 32, `each write past epochMax sealed an epoch without a flush (${journal.lastSealed})`);
    assert.ok(ticks > 0 || Date.now() - started < 10, 'the event loop kept running');
    assert.ok(dev.stats().unappliedBytes <= 3 * 64 * 1024 + 256 * 1024, `memory stays bounded (${dev.stats().unappliedBytes} bytes unapplied)`);
    const b = Buffer.alloc(big);
    await dev.read(0, b);
    assert.ok(b.equals(Buffer.concat(want)), 'reads see the writes');
    await dev.close();
    await journal.close();
    await origin.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

/** An overlay whose writes wait until released: sealed epochs stay unapplied meanwhile. */
class GatedWrites extends FilterDevice {
  private gate: Promise<void> = new Promise(() => undefined);
  private open!: () => void;
  constructor(inner: FilterDevice['inner']) {
    super(inner);
    this.gate = new Promise((r) => (this.open = r));
  }
  get description(): string {
    return `gated(${this.inner.description})`;
  }
  release(): void {
    this.open();
  }
  override async write(offset: number, data: Buffer, opts?: IoOptions): Promise<void> {
    await this.gate;
    return super.write(offset, data, opts);
  }
}

test('reads find the newest of several sealed epochs the overlay does not hold yet, and a restart replays them', { timeout: 60_000 }, async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'spw-wbgate-'));
  try {
    await writeFile(path.join(dir, 'origin.img'), Buffer.alloc(SIZE, 9));
    const origin = await FileDevice.open(path.join(dir, 'origin.img'), { readonly: false, lock: false });
    const overlay = new GatedWrites(await OverlayDevice.open(noClose(new ReadOnlyDevice(origin)), { path: path.join(dir, 'vol.overlay'), granularity: 4096 }));
    const journal = await Journal.open({ dir: path.join(dir, 'journal'), dataKey: KEY });
    const policy = new PolicyMap(SIZE, 'origin');
    const dev = await WriteBackDevice.open({ overlay, policy, journal, shipper: null, epochMax: 1 << 30, volume: 'v' });
    for (const v of [1, 2, 3]) {
      await dev.write(4096, Buffer.alloc(8192, v));
      await dev.flush();
    }
    await dev.write(8192, Buffer.alloc(100, 4)); // unsealed, on top
    assert.equal(dev.stats().unappliedEpochs, 3, 'three sealed epochs wait for the overlay');
    const b = Buffer.alloc(3 * 4096);
    await dev.read(4096, b);
    assert.deepEqual([b[0], b[4095], b[4096], b[4196], b[8191], b[8192]], [3, 3, 4, 3, 3, 9], 'newest epoch first, the unsealed write above it');
    // Crash before the overlay got anything: the journal replays the sealed epochs on open;
    // the unsealed write is gone.
    await journal.close();
    const journal2 = await Journal.open({ dir: path.join(dir, 'journal'), dataKey: KEY });
    const overlay2 = await OverlayDevice.open(noClose(new ReadOnlyDevice(origin)), { path: path.join(dir, 'vol2.overlay'), granularity: 4096 });
    const dev2 = await WriteBackDevice.open({ overlay: overlay2, policy, journal: journal2, shipper: null, epochMax: 1 << 30, volume: 'v' });
    await dev2.read(4096, b);
    assert.deepEqual([b[0], b[8191], b[8192]], [3, 3, 9], 'after recovery the volume reads as at the last flush');
    await dev2.close();
    await journal2.close();
    overlay.release();
    await dev.close().catch(() => undefined); // its journal is closed: the crash above
    await origin.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
