// Crash test with real processes: a writer drives the cloud edge's NBD export (origin policy)
// with stamped 4 KiB blocks (iteration, batch and block number in each, like nbd-tester-client),
// a flush after every batch. At a random moment `kill -9` hits the cloud edge, the on-prem
// edge, or both. The killed ones restart, `spillway volume drain` ships everything, and then:
//   - the origin image equals the model at one flush boundary (never a torn mix of batches: I3),
//   - that boundary is at or after the last flush acknowledged before the crash (I2),
//   - the applied log shows every epoch once, in order (I4),
//   - the cloud export reads exactly what the origin holds (I1 across the crash).
// At the end, the cloud edge loses its overlay and journal and must still read the origin's
// content through its cache (I5: nothing stale was left in the cache).
//
// SPILLWAY_CRASH_ITER=N sets the number of kill points (default 30); SPILLWAY_CRASH_SEED fixes
// the random choices.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';

import { NbdBlockDevice } from '../../src/nbd/client.js';
import { readAppliedLog } from '../../src/edge/local/applier.js';
import { CLI, run, tempDir } from '../helpers/proc.js';
import { prng } from '../helpers/random.js';
import { startTwoSites, waitForExport, type TwoSites } from '../helpers/edges.js';

const ITER = Number(process.env.SPILLWAY_CRASH_ITER ?? 30);
const BLOCK = 4096;
const BLOCKS = 4096; // 16 MiB
const MAGIC = Buffer.from('SPWCRASH');


function stamp(iter: number, batch: number, block: number): Buffer {
  const b = Buffer.alloc(BLOCK);
  MAGIC.copy(b, 0);
  b.writeUInt32LE(iter, 8);
  b.writeUInt32LE(batch, 12);
  b.writeUInt32LE(block, 16);
  for (let i = 20; i < BLOCK; i++) b[i] = (iter * 131 + batch * 31 + block * 7 + i) & 0xff;
  return b;
}

type Content = { kind: 'stamp'; iter: number; batch: number } | { kind: 'zero' } | { kind: 'other' };

function decode(block: Buffer, index: number): Content {
  if (block.subarray(0, 8).equals(MAGIC)) {
    const iter = block.readUInt32LE(8);
    const batch = block.readUInt32LE(12);
    if (block.readUInt32LE(16) !== index) return { kind: 'other' };
    return stamp(iter, batch, index).equals(block) ? { kind: 'stamp', iter, batch } : { kind: 'other' };
  }
  return block.every((x) => x === 0) ? { kind: 'zero' } : { kind: 'other' };
}

interface Batch {
  /** block → written with this batch's stamp, or zeroed */
  ops: Map<number, 'data' | 'zero'>;
}

/**
 * The flush boundaries k (state after batches 1..k; 0 = the iteration's start) the origin can
 * be at, given what each block holds now. Returns the set as a sorted list.
 */
function consistentBoundaries(origin: Buffer, start: Buffer, iter: number, batches: Batch[]): { ks: number[]; why: string } {
  const n = batches.length;
  let valid = new Array<boolean>(n + 1).fill(true);
  const events = new Map<number, Array<{ k: number; kind: 'data' | 'zero' }>>();
  batches.forEach((b, i) => {
    for (const [blk, kind] of b.ops) {
      let e = events.get(blk);
      if (!e) events.set(blk, (e = []));
      e.push({ k: i + 1, kind });
    }
  });
  let why = '';
  for (const [blk, evs] of events) {
    const cur = origin.subarray(blk * BLOCK, (blk + 1) * BLOCK);
    const c = decode(cur, blk);
    const ok = new Array<boolean>(n + 1).fill(false);
    const mark = (from: number, to: number) => {
      for (let k = from; k <= to; k++) ok[k] = true;
    };
    if (cur.equals(start.subarray(blk * BLOCK, (blk + 1) * BLOCK))) mark(0, evs[0]!.k - 1);
    evs.forEach((e, i) => {
      const until = i + 1 < evs.length ? evs[i + 1]!.k - 1 : n;
      if (e.kind === 'data' && c.kind === 'stamp' && c.iter === iter && c.batch === e.k) mark(e.k, until);
      if (e.kind === 'zero' && c.kind === 'zero') mark(e.k, until);
    });
    const next = valid.map((v, k) => v && ok[k]!);
    if (!next.some(Boolean) && !why) why = `block ${blk} holds ${JSON.stringify(c)}; it was written in batches ${JSON.stringify(evs)}`;
    valid = next;
  }
  // Blocks this iteration never wrote must hold what they held at its start.
  for (let blk = 0; blk < BLOCKS; blk++) {
    if (events.has(blk)) continue;
    if (!origin.subarray(blk * BLOCK, (blk + 1) * BLOCK).equals(start.subarray(blk * BLOCK, (blk + 1) * BLOCK))) {
      valid = valid.map(() => false);
      why ||= `block ${blk} changed although no batch of this iteration wrote it`;
    }
  }
  return { ks: valid.flatMap((v, k) => (v ? [k] : [])), why };
}

async function drain(sites: TwoSites): Promise<void> {
  const r = await run(process.execPath, [CLI, 'volume', 'drain', 'disk', '--config', sites.cloudYaml, '--timeout', '120'], { allowFail: true });
  assert.equal(r.code, 0, `spillway volume drain failed: ${r.stderr}${r.stdout}`);
}

async function readAll(uri: string): Promise<Buffer> {
  const dev = await NbdBlockDevice.open({ uri });
  try {
    const out = Buffer.alloc(BLOCKS * BLOCK);
    for (let off = 0; off < out.length; off += 4 * 1024 * 1024) await dev.read(off, out.subarray(off, off + 4 * 1024 * 1024));
    return out;
  } finally {
    await dev.close();
  }
}

test(`kill -9 at ${ITER} random points: the origin stays at a flush boundary, no acknowledged flush is lost, no epoch applied twice`, { timeout: Math.max(600_000, ITER * 30_000) }, async () => {
  const seed = Number(process.env.SPILLWAY_CRASH_SEED ?? Date.now() % 1_000_000);
  const rand = prng(seed);
  const { dir, cleanup } = await tempDir('spw-crash-');
  const image = path.join(dir, 'origin.img');
  const init = Buffer.alloc(BLOCKS * BLOCK);
  for (let i = 0; i < init.length; i += 4) init.writeUInt32LE((i * 2654435761) >>> 0, i);
  await writeFile(image, init);
  const sites = await startTwoSites(dir, image, { cloudVolume: 'writes: origin, rpo: 400ms, shipAt: 256KiB', ioTimeout: '20s' });
  const tally = { remote: 0, local: 0, both: 0, boundariesAfterAck: 0 };
  try {
    for (let iter = 1; iter <= ITER; iter++) {
      const start = await readFile(image);
      const batches: Batch[] = [];
      let acked = 0;
      let stop = false;
      let writerError: unknown = null;
      const dev = await NbdBlockDevice.open({ uri: sites.uri() });
      const writer = (async () => {
        try {
          while (!stop) {
            const g = batches.length + 1;
            const ops = new Map<number, 'data' | 'zero'>();
            const count = 1 + Math.floor(rand() * 48);
            while (ops.size < count) ops.set(Math.floor(rand() * BLOCKS), rand() < 0.08 ? 'zero' : 'data');
            batches.push({ ops });
            await Promise.all([...ops].map(([blk, kind]) => (kind === 'data' ? dev.write(blk * BLOCK, stamp(iter, g, blk)) : dev.writeZeroes(blk * BLOCK, BLOCK))));
            await dev.flush();
            acked = g;
          }
        } catch (err) {
          writerError = err;
        }
      })();
      const target = (['remote', 'local', 'both'] as const)[Math.floor(rand() * 3)]!;
      await new Promise((r) => setTimeout(r, 100 + rand() * 1400));
      const ackedBefore = acked;
      if (target !== 'local') sites.cloud.child.kill('SIGKILL');
      if (target !== 'remote') sites.onprem.child.kill('SIGKILL');
      tally[target]++;
      if (target === 'local') {
        // The cloud edge keeps taking writes while the origin is down; they ship after restart.
        await new Promise((r) => setTimeout(r, 200 + rand() * 300));
      }
      stop = true;
      await writer;
      await dev.close().catch(() => undefined);
      if (target === 'local') assert.equal(writerError, null, `writes must go on while only the origin edge is down: ${String(writerError)}`);
      const ackedAtCrash = target === 'local' ? acked : ackedBefore;
      if (target !== 'local') await sites.cloud.exited;
      if (target !== 'remote') await sites.onprem.exited;
      if (target !== 'remote') await sites.startOnprem();
      if (target !== 'local') await sites.startCloud();
      const t0 = Date.now();
      await waitForExport(sites.uri());
      const t1 = Date.now();
      await drain(sites);
      const t2 = Date.now();
      if (process.env.SPILLWAY_CRASH_VERBOSE) process.stdout.write(`# iteration ${iter}: kill ${target}, export back in ${t1 - t0} ms, drained in ${t2 - t1} ms\n`);

      const origin = await readFile(image);
      const { ks, why } = consistentBoundaries(origin, start, iter, batches);
      assert.ok(ks.length > 0, `iteration ${iter} (seed ${seed}, kill ${target}): the origin is not at any flush boundary: ${why}`);
      const best = ks[ks.length - 1]!;
      assert.ok(best >= (target === 'local' ? acked : ackedAtCrash), `iteration ${iter} (seed ${seed}, kill ${target}): the origin is at boundary ${best}, before the last acknowledged flush ${ackedAtCrash} (I2)`);
      if (best > ackedAtCrash) tally.boundariesAfterAck++;
      const view = await readAll(sites.uri());
      assert.ok(view.equals(origin), `iteration ${iter} (seed ${seed}): after the drain the cloud export must read what the origin holds`);
    }

    const log = await readAppliedLog(path.join(dir, 'state-onprem', 'applier', 'disk'));
    let next = 1;
    let journal = '';
    for (const r of log) {
      if (r.kind === 'takeover') {
        journal = r.journalId.toString('hex');
        next = 1;
        continue;
      }
      assert.equal(r.journalId.toString('hex'), journal, 'applied records belong to the current journal');
      assert.equal(r.firstSeq, next, `epochs are applied once each, in order (I4): record ${JSON.stringify({ first: r.firstSeq, last: r.lastSeq })} after ${next - 1}`);
      next = r.lastSeq + 1;
    }
    assert.ok(next > 1, 'some epochs were applied');

    // I5: without its overlay and journal, the cloud edge reads through its cache and the link.
    await sites.cloud.stop();
    await rm(path.join(dir, 'state-cloud', 'overlays'), { recursive: true, force: true });
    await rm(path.join(dir, 'state-cloud', 'journal'), { recursive: true, force: true });
    await sites.startCloud();
    await waitForExport(sites.uri());
    const view = await readAll(sites.uri());
    assert.ok(view.equals(await readFile(image)), 'the cache held no chunk older than what the origin applied (I5)');
    process.stdout.write(`# crash test: seed ${seed}, ${ITER} kill points (cloud ${tally.remote}, on-prem ${tally.local}, both ${tally.both}); ${tally.boundariesAfterAck} ended past the last acknowledged flush; ${log.filter((r) => r.kind === 'applied').length} batches applied\n`);
  } catch (err) {
    // Say what the edges said: a failure here is hard to reproduce without it.
    for (const [name, p] of [['cloud', sites.cloud], ['on-prem', sites.onprem]] as const) process.stderr.write(`--- ${name} edge (last lines) ---\n${p.stderr().split('\n').slice(-30).join('\n')}\n`);
    throw err;
  } finally {
    await sites.stop();
    await cleanup();
  }
});
