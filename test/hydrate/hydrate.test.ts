// Hydration (src/hydrate/): HydratedDevice as a read-only layer (the compliance suite, fresh and
// complete), the Hydrator's copy (byte for byte, each chunk fetched once, in the hydration
// class), demand reads landing, pause/resume, retry with backoff, the rate limiter's token
// accounting on a virtual clock, stop/restart resuming from the bitmap, the fdatasync order
// (traced), refusals with typed errors, parseRate, metrics, and a property test over random
// interleavings of reads, pause, resume and restarts.
import assert from 'node:assert/strict';
import { readlinkSync } from 'node:fs';
import { open, readFile, stat, truncate, writeFile, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import fc from 'fast-check';

import { GranuleBitmap, BITMAP_HEADER_SIZE } from '../../src/block/bitmap.js';
import { FilterDevice, type BlockDevice, type IoOptions } from '../../src/block/device.js';
import { FileDevice } from '../../src/block/file.js';
import { HydratedDevice, HydrationError, bitmapPathOf, readHydrationState, statePathOf } from '../../src/hydrate/hydrated-device.js';
import { Hydrator, parseRate } from '../../src/hydrate/hydrator.js';
import { PRIORITY } from '../../src/link/protocol.js';
import { createLogger } from '../../src/log/logger.js';
import { registry } from '../../src/metrics/registry.js';
import { blockDeviceCompliance } from '../block/compliance.js';
import { FileChunkSource, isZero, sourceImage, type FileChunkSourceOptions } from '../fixtures/hydrate-child.js';
import { tempDir } from '../helpers/proc.js';

const log = createLogger('test', { write: () => true } as unknown as NodeJS.WritableStream);
const CS = 4096;

/** The streamed layer below, as the hydrated device sees it: counts reads per chunk. */
class CountingDevice extends FilterDevice {
  readonly chunkReads: number[] = [];
  onRead: ((first: number, last: number) => void) | undefined;
  constructor(
    inner: BlockDevice,
    private readonly chunkSize: number,
  ) {
    super(inner);
  }
  get description(): string {
    return `counting(${this.inner.description})`;
  }
  override read(offset: number, buf: Buffer, opts?: IoOptions): Promise<void> {
    if (buf.length > 0) {
      const first = Math.floor(offset / this.chunkSize);
      const last = Math.floor((offset + buf.length - 1) / this.chunkSize);
      this.onRead?.(first, last);
      for (let c = first; c <= last; c++) this.chunkReads[c] = (this.chunkReads[c] ?? 0) + 1;
    }
    return super.read(offset, buf, opts);
  }
}

interface Env {
  dir: string;
  src: string;
  vol: string;
  img: Buffer;
  chunks: number;
  source: FileChunkSource;
  cleanup: () => Promise<void>;
}

const envs: Env[] = [];
/** hydrators and devices a failed test may have left running: stopped before the files go. */
const open_: Array<Hydrator | HydratedDevice> = [];
function track<T extends Hydrator | HydratedDevice>(x: T): T {
  open_.push(x);
  return x;
}
after(async () => {
  for (const x of open_) if (x instanceof Hydrator) await x.stop().catch(() => undefined);
  for (const x of open_) if (x instanceof HydratedDevice) await x.close().catch(() => undefined);
  for (const e of envs) await e.cleanup();
});

async function makeEnv(opts: { chunks?: number; tail?: number; seed?: number; chunkSize?: number; source?: FileChunkSourceOptions } = {}): Promise<Env> {
  const chunkSize = opts.chunkSize ?? CS;
  const chunks = opts.chunks ?? 37;
  const tmp = await tempDir('spw-hydrate-');
  const src = path.join(tmp.dir, 'source.img');
  const img = sourceImage(opts.seed ?? 7, chunkSize, chunks, opts.tail ?? 1000);
  await writeFile(src, img);
  const source = await FileChunkSource.open(src, chunkSize, opts.source);
  const env: Env = {
    dir: tmp.dir,
    src,
    vol: path.join(tmp.dir, 'volume.img'),
    img,
    chunks,
    source,
    cleanup: async () => {
      await source.close().catch(() => undefined);
      await tmp.cleanup();
    },
  };
  envs.push(env);
  return env;
}

async function openDevice(env: Env, extra: Partial<Parameters<typeof HydratedDevice.open>[0]> = {}): Promise<{ dev: HydratedDevice; inner: CountingDevice }> {
  const chunkSize = extra.chunkSize ?? env.source.chunkSize;
  const inner = new CountingDevice(await FileDevice.open(env.src, { readonly: true, lock: false }), chunkSize);
  try {
    const dev = await HydratedDevice.open({ path: env.vol, inner, source: env.source, chunkSize, log, ...extra });
    return { dev, inner };
  } catch (err) {
    await inner.close();
    throw err;
  }
}

function chunkOf(buf: Buffer, i: number, cs = CS): Buffer {
  return buf.subarray(i * cs, Math.min(buf.length, (i + 1) * cs));
}

async function rejectsHydration(p: Promise<unknown>, pattern: RegExp): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof HydrationError, `expected a HydrationError, got ${String(err)}`);
    assert.equal(err.code, 'SPW_ERR_HYDRATION');
    assert.match(err.message, pattern);
    return true;
  });
}

/** Waits (polling) until `cond` holds; the limit only turns a hang into a failure message. */
async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; !cond(); i++) {
    if (i > 20_000) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

blockDeviceCompliance('hydrated (nothing hydrated yet; reads land)', {
  readonly: async (content) => {
    const tmp = await tempDir('spw-hydrate-c-');
    const src = path.join(tmp.dir, 'src.img');
    await writeFile(src, content);
    const source = await FileChunkSource.open(src, 64 * 1024);
    const inner = await FileDevice.open(src, { readonly: true, lock: false });
    const device = await HydratedDevice.open({ path: path.join(tmp.dir, 'vol.img'), inner, source, chunkSize: 64 * 1024, log });
    return { device, cleanup: async () => (await source.close(), await tmp.cleanup()) };
  },
});

blockDeviceCompliance('hydrated (complete, opened without a source)', {
  readonly: async (content) => {
    const tmp = await tempDir('spw-hydrate-c-');
    const src = path.join(tmp.dir, 'src.img');
    const vol = path.join(tmp.dir, 'vol.img');
    await writeFile(src, content);
    const source = await FileChunkSource.open(src, 64 * 1024);
    const inner = await FileDevice.open(src, { readonly: true, lock: false });
    const first = await HydratedDevice.open({ path: vol, inner, source, chunkSize: 64 * 1024, log });
    const h = track(new Hydrator(first, { log }));
    h.start();
    await h.whenComplete();
    await h.stop();
    await first.close();
    await source.close();
    const device = await HydratedDevice.open({ path: vol, chunkSize: 64 * 1024, log });
    return { device, cleanup: () => tmp.cleanup() };
  },
});

describe('hydration', () => {
  it('copies every chunk once, in the hydration class, into a volume equal to the source; complete is durable and needs no source', async () => {
    const env = await makeEnv({ source: { delayMs: (i) => i % 3 } });
    const { dev, inner } = await openDevice(env);
    assert.equal(dev.complete, false);
    assert.equal((await readHydrationState(env.vol))?.complete, false);
    const h = track(new Hydrator(dev, { log }));
    assert.equal(h.status().state, 'stopped');
    h.start();
    await h.whenComplete();
    const st = h.status();
    assert.equal(st.state, 'complete');
    assert.equal(st.doneChunks, env.chunks);
    assert.equal(st.doneBytes, env.img.length);
    assert.equal(st.totalBytes, env.img.length);
    assert.equal(st.durableChunks, env.chunks);
    assert.equal(st.etaSeconds, 0);
    assert.deepEqual(env.source.perChunk, new Array(env.chunks).fill(1), 'each chunk fetched exactly once');
    assert.deepEqual([...env.source.priorities], [PRIORITY.HYDRATION]);
    assert.equal(h.fetches, env.chunks);
    assert.equal(inner.chunkReads.length, 0, 'no guest reads, so nothing read through the layer below');
    await h.stop();
    assert.equal(h.status().state, 'complete');
    await dev.close();

    assert.ok((await readFile(env.vol)).equals(env.img), 'the volume equals the source byte for byte');
    const state = await readHydrationState(env.vol);
    assert.equal(state?.complete, true);
    assert.equal(state?.size, env.img.length);
    assert.equal(state?.chunkSize, CS);

    // complete: opens without inner or source and serves from the file alone
    const alone = await HydratedDevice.open({ path: env.vol, chunkSize: CS, log });
    try {
      assert.equal(alone.complete, true);
      const buf = Buffer.alloc(env.img.length);
      await alone.read(0, buf);
      assert.ok(buf.equals(env.img));
      // zero chunks were punched, not written: the file is sparse there
      const z = [...Array(env.chunks).keys()].find((i) => isZero(chunkOf(env.img, i)));
      assert.ok(z !== undefined, 'the source has zero chunks');
      const ext = await alone.blockStatus(z * CS, CS);
      assert.ok(ext[0]?.zero, `zero chunk ${z} reads as a hole: ${JSON.stringify(ext)}`);
      const again = track(new Hydrator(alone, { log }));
      again.start();
      assert.equal(again.status().state, 'complete');
      await again.whenComplete();
      await again.stop();
    } finally {
      await alone.close();
    }
  });

  it('demand reads return the source bytes, land in the volume, and are never fetched by the hydrator', async () => {
    const env = await makeEnv();
    const { dev, inner } = await openDevice(env);
    const reads: Array<[number, number]> = [
      [0, 100],
      [5 * CS + 17, 3 * CS],
      [env.img.length - 50, 50],
      [20 * CS, CS],
    ];
    for (const [off, len] of reads) {
      const buf = Buffer.alloc(len, 0xee);
      await dev.read(off, buf);
      assert.ok(buf.equals(env.img.subarray(off, off + len)), `read ${off}+${len}`);
    }
    const demanded = [0, 5, 6, 7, 8, env.chunks - 1, 20];
    await dev.settle();
    await dev.commit();
    for (const c of demanded) assert.ok(dev.isDurable(c), `chunk ${c} landed and is durable`);
    assert.equal(dev.counters.demandLanded, demanded.length);
    // read again: from the file, not from below
    const before = inner.chunkReads.reduce((a, b) => a + (b ?? 0), 0);
    const buf = Buffer.alloc(3 * CS);
    await dev.read(5 * CS + 17, buf);
    assert.ok(buf.equals(env.img.subarray(5 * CS + 17, 8 * CS + 17)));
    assert.equal(inner.chunkReads.reduce((a, b) => a + (b ?? 0), 0), before, 'durable chunks are read from the file');
    const h = track(new Hydrator(dev, { log }));
    h.start();
    await h.whenComplete();
    for (const c of demanded) assert.equal(env.source.perChunk[c], 0, `chunk ${c} was not fetched again`);
    assert.equal(h.fetches, env.chunks - demanded.length);
    assert.equal(h.status().demandLanded, demanded.length);
    await h.stop();
    await dev.close();
    assert.ok((await readFile(env.vol)).equals(env.img));
  });

  it('pause lets fetches in flight land and sends no new ones; resume goes on', async () => {
    const release: Array<() => void> = [];
    const env = await makeEnv({ source: {} });
    env.source.opts = { delayMs: () => 0 };
    // a source whose answers wait for the test
    const gated = {
      chunkCount: env.source.chunkCount,
      chunkLength: (i: number) => env.source.chunkLength(i),
      fetch: (i: number, p: (typeof PRIORITY)[keyof typeof PRIORITY]) => new Promise<void>((r) => release.push(r)).then(() => env.source.fetch(i, p)),
    };
    const inner = await FileDevice.open(env.src, { readonly: true, lock: false });
    const dev = await HydratedDevice.open({ path: env.vol, inner, source: gated, chunkSize: CS, log });
    const h = track(new Hydrator(dev, { log, inFlight: 3 }));
    h.start();
    await until(() => release.length === 3, 'three fetches in flight');
    h.pause();
    assert.equal(h.status().state, 'paused');
    for (const r of release.splice(0)) r();
    await until(() => h.status().doneChunks === 3, 'the three in flight to land');
    for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
    assert.equal(h.fetches, 3, 'no fetch while paused');
    assert.equal(release.length, 0);
    h.resume();
    assert.equal(h.status().state, 'running');
    await until(() => release.length === 3, 'fetching again after resume');
    // from here, answer everything
    const pump = setInterval(() => release.splice(0).forEach((r) => r()), 1);
    try {
      await h.whenComplete();
    } finally {
      clearInterval(pump);
    }
    await h.stop();
    await dev.close();
    assert.ok((await readFile(env.vol)).equals(env.img));
  });

  it('retries failed fetches after a doubling backoff shared by all workers (never spins), and reports the error meanwhile', async () => {
    const env = await makeEnv({ chunks: 9, source: { fail: (i, n) => i === 4 && n < 4 } });
    const { dev } = await openDevice(env);
    let t = 0;
    const sleeps: number[] = [];
    const clock = {
      now: () => t,
      sleep: async (ms: number) => {
        sleeps.push(ms);
        await new Promise((r) => setImmediate(r));
        t += ms;
      },
    };
    const h = track(new Hydrator(dev, { log, inFlight: 1, retryInitialMs: 100, retryMaxMs: 400, ...clock }));
    const errors: Array<string | null> = [];
    env.source.opts.onFetch = () => errors.push(h.status().lastError);
    h.start();
    await h.whenComplete();
    assert.equal(env.source.perChunk[4], 5, 'chunk 4: four failures, then success');
    for (let i = 0; i < 9; i++) if (i !== 4) assert.equal(env.source.perChunk[i], 1, `chunk ${i}: fetched once`);
    assert.ok(errors.some((e) => e !== null && /injected failure/.test(e)), 'lastError shows the failure while retrying');
    // each retry waited for the backoff: 100, 200, 400, then capped at 400 (virtual time)
    assert.deepEqual(sleeps, [100, 200, 400, 400]);
    assert.equal(t, 1100);
    assert.equal(h.status().failures, 0);
    await h.stop();
    await dev.close();
    assert.ok((await readFile(env.vol)).equals(env.img));
  });

  it('rate limit: the token accounting holds on a virtual clock, zero chunks are free, setRate applies at once', async () => {
    const env = await makeEnv({ chunks: 64 });
    const { dev } = await openDevice(env);
    let t = 0;
    const clock = {
      now: () => t,
      // a virtual timeline: concurrent sleepers wake at their own deadlines, not one after another
      sleep: async (ms: number, wake: AbortSignal) => {
        const target = t + ms;
        await new Promise((r) => setImmediate(r));
        if (!wake.aborted) t = Math.max(t, target);
      },
    };
    const rate = 8 * CS; // bytes per virtual second
    const h = track(new Hydrator(dev, { log, rate, inFlight: 4, ...clock }));
    let dataBytes = 0;
    let limited = true;
    const violations: string[] = [];
    env.source.opts.onFetch = (i) => {
      if (!limited) return;
      const len = env.source.chunkLength(i);
      if (!isZero(chunkOf(env.img, i))) dataBytes += len;
      // tokens: a burst of one chunk, the rate since 0, and the fetches in flight (charged
      // when they return: at most inFlight chunks, this one included)
      const allowed = CS + (rate * t) / 1000 + 4 * len;
      if (dataBytes > allowed) violations.push(`${dataBytes} data bytes fetched by ${t} ms, allowed ${allowed}`);
    };
    h.start();
    await until(() => h.fetches >= 32, 'half the chunks');
    const t1 = t;
    const d1 = dataBytes;
    assert.ok(t1 > 0, 'the limiter made the hydrator wait');
    assert.ok(t1 <= (d1 / rate) * 1000, `no slower than the rate: ${d1} bytes in ${t1} ms at ${rate}/s`);
    limited = false;
    h.setRate('0');
    const t2 = t;
    assert.equal(h.status().rateLimit, 0);
    await h.whenComplete();
    assert.equal(t, t2, 'unlimited: no more waiting');
    assert.deepEqual(violations, []);
    await h.stop();
    await dev.close();
    assert.equal(parseRate('1Gbit'), 125_000_000);
  });

  it('stop() waits for landings and commits; a new hydrator resumes from the bitmap without refetching', async () => {
    const env = await makeEnv({ chunks: 60, source: { delayMs: () => 1 } });
    let opened = await openDevice(env);
    let h = track(new Hydrator(opened.dev, { log, inFlight: 4 }));
    h.start();
    await until(() => h.fetches >= 20, 'some progress');
    await h.stop();
    assert.equal(h.status().state, 'stopped');
    const durable = [...Array(env.chunks).keys()].filter((i) => opened.dev.isDurable(i));
    assert.equal(durable.length, h.status().doneChunks, 'after stop, everything landed is durable');
    assert.equal(opened.dev.uncommitted, 0);
    await opened.dev.close();
    const fetchedBefore = [...env.source.perChunk];

    opened = await openDevice(env);
    for (const i of durable) assert.ok(opened.dev.isDurable(i), `chunk ${i} durable after reopen`);
    h = track(new Hydrator(opened.dev, { log }));
    h.start();
    await h.whenComplete();
    for (const i of durable) assert.equal(env.source.perChunk[i], fetchedBefore[i], `chunk ${i} not fetched again`);
    await h.stop();
    await opened.dev.close();
    assert.ok((await readFile(env.vol)).equals(env.img));
  });

  it('the volume file is fdatasync-ed after a chunk is written and before a bitmap with its bit is saved', async () => {
    const env = await makeEnv({ chunks: 80, source: { delayMs: (i) => i % 2 } });
    const events: Array<{ kind: 'written'; chunk: number } | { kind: 'sync-start' | 'sync-end'; id: number } | { kind: 'bitmap'; bits: Buffer }> = [];
    const restore = await traceFiles(env.vol, events);
    try {
      const { dev } = await openDevice(env, { commitChunks: 4, commitIntervalMs: 1 });
      const h = track(new Hydrator(dev, { log, inFlight: 4 }));
      h.start();
      for (let i = 0; i < 10; i++) await dev.read(((i * 7) % env.chunks) * CS, Buffer.alloc(100)); // demand landings too
      await h.whenComplete();
      await h.stop();
      await dev.close();
    } finally {
      restore();
    }
    const written = new Set<number>();
    const syncing = new Map<number, Set<number>>();
    const synced = new Set<number>();
    let bitmaps = 0;
    for (const e of events) {
      if (e.kind === 'written') written.add(e.chunk);
      else if (e.kind === 'sync-start') syncing.set(e.id, new Set(written));
      else if (e.kind === 'sync-end') for (const c of syncing.get(e.id) ?? []) synced.add(c);
      else if (e.kind === 'bitmap') {
        bitmaps++;
        for (let c = 0; c < env.chunks; c++) {
          if (!((e.bits[c >> 3]! >> (c & 7)) & 1)) continue;
          if (isZero(chunkOf(env.img, c))) continue; // punched, not written: not traced
          assert.ok(synced.has(c), `bitmap save ${bitmaps} sets chunk ${c} before an fdatasync covering its write`);
        }
      }
    }
    assert.ok(bitmaps >= 3, `several commits traced (${bitmaps})`);
    assert.ok(synced.size > 0);
  });

  it('refuses a volume of another geometry with HydrationError saying what to do', async () => {
    const env = await makeEnv({ chunks: 12 });
    const { dev } = await openDevice(env, { family: 'fam-a' });
    await dev.close();
    await rejectsHydration(openDevice(env, { chunkSize: 2 * CS }), /8192-byte chunks.*delete .*volume\.img.*hydrate again from scratch/s);
    await rejectsHydration(openDevice(env, { family: 'fam-b' }), /family fam-b/);
    // the origin's volume grew
    const other = await makeEnv({ chunks: 13 });
    const inner = await FileDevice.open(other.src, { readonly: true, lock: false });
    await rejectsHydration(HydratedDevice.open({ path: env.vol, inner, source: other.source, chunkSize: CS, log }), /was made for a \d+-byte volume/);
    await inner.close();
    // not complete: cannot be served without its source
    await rejectsHydration(HydratedDevice.open({ path: env.vol, chunkSize: CS, log }), /not complete/);
    // the same geometry still opens
    const ok = await openDevice(env, { family: 'fam-a' });
    await ok.dev.close();
  });

  it('refuses a damaged or short bitmap, damaged state, stray files and a missing volume file', async () => {
    const env = await makeEnv({ chunks: 20 });
    let o = await openDevice(env);
    const h = track(new Hydrator(o.dev, { log }));
    h.start();
    await until(() => h.fetches >= 5, 'progress');
    await h.stop();
    await o.dev.close();
    const bm = bitmapPathOf(env.vol);
    const good = await readFile(bm);

    const flipped = Buffer.from(good);
    flipped[BITMAP_HEADER_SIZE] = flipped[BITMAP_HEADER_SIZE]! ^ 0x80;
    await writeFile(bm, flipped);
    await rejectsHydration(openDevice(env), /bitmap .* is unusable \(.*checksum.*\).*hydrate again from scratch/s);
    await writeFile(bm, good.subarray(0, good.length - 1));
    await rejectsHydration(openDevice(env), /bitmap .* is unusable/);
    await writeFile(bm, good.subarray(0, 10));
    await rejectsHydration(openDevice(env), /bitmap .* is unusable/);
    await writeFile(bm, good);

    const state = await readFile(statePathOf(env.vol));
    await writeFile(statePathOf(env.vol), state.subarray(0, 20));
    await rejectsHydration(openDevice(env), /not valid JSON/);
    await writeFile(statePathOf(env.vol), JSON.stringify({ format: 'something else' }));
    await rejectsHydration(openDevice(env), /not a version 1 spillway hydration state/);
    await writeFile(statePathOf(env.vol), state);

    // a resized volume file
    const size = (await stat(env.vol)).size;
    await truncate(env.vol, size + CS);
    await rejectsHydration(openDevice(env), /resized/);
    await truncate(env.vol, size);

    o = await openDevice(env);
    await o.dev.close();

    // a file at the path that spillway did not make
    const foreign = await makeEnv({ chunks: 4 });
    await writeFile(foreign.vol, 'precious');
    await rejectsHydration(openDevice(foreign), /not a hydrated volume spillway made/);
    assert.equal(await readFile(foreign.vol, 'utf8'), 'precious', 'a foreign file is not touched');

    // the volume file vanished while the bitmap remains
    const lost = await makeEnv({ chunks: 4 });
    o = await openDevice(lost);
    await o.dev.close();
    await writeFile(lost.vol + '.moved', '');
    const { rename } = await import('node:fs/promises');
    await rename(lost.vol, lost.vol + '.moved');
    await rejectsHydration(openDevice(lost), /volume file .* is missing/);
  });

  it('recovers the states a crash during creation or completion can leave', async () => {
    // state file written, nothing else: creation goes on
    const env = await makeEnv({ chunks: 6 });
    await writeFile(statePathOf(env.vol), JSON.stringify({ format: 'spillway-hydration', version: 1, size: env.img.length, chunkSize: CS, family: '', complete: false }));
    let o = await openDevice(env);
    const h = track(new Hydrator(o.dev, { log }));
    h.start();
    await h.whenComplete();
    await h.stop();
    await o.dev.close();
    // every bit durable but the state not yet complete: completed at open
    await writeFile(statePathOf(env.vol), JSON.stringify({ format: 'spillway-hydration', version: 1, size: env.img.length, chunkSize: CS, family: '', complete: false }));
    o = await openDevice(env);
    assert.equal(o.dev.complete, true);
    await o.dev.close();
    assert.equal((await readHydrationState(env.vol))?.complete, true);
    // a zero chunk over stale data (a landing whose commit a crash prevented) is punched
    const z = [...Array(env.chunks).keys()].find((i) => isZero(chunkOf(env.img, i)));
    if (z !== undefined) {
      const fresh = await makeEnv({ chunks: 6 });
      o = await openDevice(fresh);
      await o.dev.close();
      const fh = await open(fresh.vol, 'r+');
      await fh.write(Buffer.alloc(CS, 0x55), 0, CS, z * CS);
      await fh.close();
      o = await openDevice(fresh);
      const h2 = track(new Hydrator(o.dev, { log }));
      h2.start();
      await h2.whenComplete();
      await h2.stop();
      await o.dev.close();
      assert.ok((await readFile(fresh.vol)).equals(fresh.img), 'stale bytes under a zero chunk are gone');
    }
  });

  it('parseRate reads bits, bytes and unlimited, and refuses the ambiguous', () => {
    assert.equal(parseRate('50Mbit'), 6_250_000);
    assert.equal(parseRate('50 Mbit/s'), 6_250_000);
    assert.equal(parseRate('50Mbps'), 6_250_000);
    assert.equal(parseRate('2MBps'), 2_000_000);
    assert.equal(parseRate('800kbit'), 100_000);
    assert.equal(parseRate('10MB/s'), 10_000_000);
    assert.equal(parseRate('10MiB'), 10 * 1024 * 1024);
    assert.equal(parseRate('10M'), 10 * 1024 * 1024);
    assert.equal(parseRate('5000000'), 5_000_000);
    assert.equal(parseRate(5_000_000), 5_000_000);
    assert.equal(parseRate('0'), 0);
    assert.equal(parseRate('unlimited'), 0);
    for (const bad of ['50Mb', '10 mb', 'fast', '-1', '1e6', '10 furlongs/s', '']) assert.throws(() => parseRate(bad), RangeError, bad);
    assert.throws(() => parseRate(-5), RangeError);
  });

  it('exports progress, state and ETA as Prometheus metrics', async () => {
    const env = await makeEnv({ chunks: 10 });
    const { dev } = await openDevice(env, { name: 'metrics-vol' });
    const h = track(new Hydrator(dev, { log }));
    h.start();
    await h.whenComplete();
    const text = await registry.metrics();
    assert.match(text, /spillway_hydrate_done\{volume="metrics-vol",unit="chunks"\} 10/);
    assert.match(text, /spillway_hydrate_total\{volume="metrics-vol",unit="bytes"\} \d+/);
    assert.match(text, /spillway_hydrate_state\{volume="metrics-vol",state="complete"\} 1/);
    assert.match(text, /spillway_hydrate_eta_seconds\{volume="metrics-vol"\} 0/);
    assert.match(text, /spillway_hydrate_chunks_landed_total\{volume="metrics-vol",via="hydration"\} 10/);
    assert.match(text, /spillway_hydrate_fetches_total\{volume="metrics-vol"\} 10/);
    await h.stop();
    assert.doesNotMatch(await registry.metrics(), /spillway_hydrate_done\{volume="metrics-vol"/, 'a stopped hydrator leaves the gauges');
    await dev.close();
  });

  it('property: random interleavings of reads, pause, resume and restarts end with volume == source, nothing durable fetched or read below again', async () => {
    const op = fc.oneof(
      fc.record({ kind: fc.constant('read' as const), chunk: fc.nat(39), within: fc.nat(CS - 1), len: fc.integer({ min: 1, max: 3 * CS }) }),
      fc.constant({ kind: 'pause' as const }),
      fc.constant({ kind: 'resume' as const }),
      fc.constant({ kind: 'restart' as const }),
      fc.record({ kind: fc.constant('wait' as const), fetches: fc.integer({ min: 1, max: 6 }) }),
    );
    let runs = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 25 }), fc.integer({ min: 1, max: 4 }), fc.nat(1000), async (ops, inFlight, seed) => {
        runs++;
        const env = await makeEnv({ chunks: 40, tail: 777, seed, source: { delayMs: (i, n) => (i * 7 + n + seed) % 3 } });
        const violations: string[] = [];
        let paused = false;
        let cur!: { dev: HydratedDevice; inner: CountingDevice; h: Hydrator };
        const start = async (): Promise<typeof cur> => {
          const o = await openDevice(env, { commitChunks: 3, commitIntervalMs: 2 });
          const h = track(new Hydrator(o.dev, { log, inFlight }));
          if (paused) h.pause();
          h.start();
          o.inner.onRead = (first, last) => {
            for (let c = first; c <= last; c++) if (o.dev.isDurable(c)) violations.push(`durable chunk ${c} read from below`);
          };
          return { ...o, h };
        };
        env.source.opts.onFetch = (i) => {
          if (cur?.dev.isDurable(i)) violations.push(`durable chunk ${i} fetched`);
        };
        cur = await start();
        try {
          for (const o of ops) {
            switch (o.kind) {
              case 'read': {
                const off = Math.min(o.chunk * CS + o.within, env.img.length - 1);
                const len = Math.min(o.len, env.img.length - off);
                const buf = Buffer.alloc(len, 0xee);
                await cur.dev.read(off, buf);
                if (!buf.equals(env.img.subarray(off, off + len))) violations.push(`read ${off}+${len} returned wrong data`);
                break;
              }
              case 'pause':
                paused = true;
                cur.h.pause();
                break;
              case 'resume':
                paused = false;
                cur.h.resume();
                break;
              case 'restart':
                await cur.h.stop();
                await cur.dev.close();
                cur = await start();
                break;
              case 'wait': {
                const target = Math.min(env.source.fetches + o.fetches, env.chunks);
                if (!paused && !cur.dev.complete) await until(() => env.source.fetches >= target || cur.dev.complete, 'fetches');
                break;
              }
            }
          }
          cur.h.resume();
          await cur.h.whenComplete();
          await cur.h.stop();
          await cur.dev.close();
          assert.deepEqual(violations, []);
          assert.ok((await readFile(env.vol)).equals(env.img), 'volume == source');
          assert.equal((await readHydrationState(env.vol))?.complete, true);
          const bm = GranuleBitmap.decode(await readFile(bitmapPathOf(env.vol)), { size: env.img.length, granularity: CS }, 'test').bitmap;
          assert.equal(bm.count(), env.chunks);
        } finally {
          await cur.h.stop().catch(() => undefined);
          await cur.dev.close().catch(() => undefined);
          await env.cleanup();
          envs.splice(envs.indexOf(env), 1);
        }
      }),
      { numRuns: Number(process.env.SPILLWAY_PROP_RUNS ?? 25) },
    );
    assert.ok(runs > 0);
  });
});

/** Trace, in order: writes to `volume` that completed (by chunk), its fdatasyncs (start/end),
 *  and each bitmap written (the bits of `${volume}.bitmap.tmp`). restore() undoes it. */
async function traceFiles(
  volume: string,
  events: Array<{ kind: 'written'; chunk: number } | { kind: 'sync-start' | 'sync-end'; id: number } | { kind: 'bitmap'; bits: Buffer }>,
): Promise<() => void> {
  const probe = await open(process.execPath, 'r');
  const proto = Object.getPrototypeOf(probe) as Record<string, (this: FileHandle, ...args: unknown[]) => Promise<unknown>>;
  await probe.close();
  const orig = { datasync: proto.datasync!, write: proto.write!, writev: proto.writev! };
  const name = (fh: FileHandle): string => {
    try {
      return readlinkSync(`/proc/self/fd/${fh.fd}`);
    } catch {
      return '?';
    }
  };
  let ids = 0;
  proto.datasync = async function () {
    const mine = name(this) === volume;
    const id = ids++;
    if (mine) events.push({ kind: 'sync-start', id });
    const r = await orig.datasync.call(this);
    if (mine) events.push({ kind: 'sync-end', id });
    return r;
  };
  proto.write = async function (...args: unknown[]) {
    const mine = name(this) === volume;
    const r = await orig.write.apply(this, args);
    const pos = args[3];
    if (mine && typeof pos === 'number') events.push({ kind: 'written', chunk: Math.floor(pos / CS) });
    return r;
  };
  proto.writev = async function (...args: unknown[]) {
    if (name(this) === `${bitmapPathOf(volume)}.tmp`) {
      const bufs = args[0] as Buffer[];
      events.push({ kind: 'bitmap', bits: Buffer.concat(bufs).subarray(BITMAP_HEADER_SIZE) });
    }
    return orig.writev.apply(this, args);
  };
  return () => Object.assign(proto, orig);
}
