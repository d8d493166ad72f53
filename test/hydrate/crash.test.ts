// Hydration under kill -9: a child process hydrates a volume (with guest reads landing too) and
// is killed with SIGKILL at random moments, then restarted. After every kill, before the
// restart, every chunk whose bit is on disk must hold the source's bytes; a restarted child
// never fetches a chunk that was durable when it started; the lost work per kill is bounded;
// and the final volume equals the source byte for byte.
//
// What kill -9 can and cannot show: it catches a bit persisted before its chunk was written
// (or a bitmap not replaced atomically), but not a missing fdatasync (the page cache survives a
// killed process); hydrate.test.ts checks the fdatasync order with a syscall trace.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, it } from 'node:test';

import { GranuleBitmap } from '../../src/block/bitmap.js';
import { bitmapPathOf, readHydrationState } from '../../src/hydrate/hydrated-device.js';
import { sourceImage, writeSourceImage } from '../fixtures/hydrate-child.js';
import { ROOT, startProc, tempDir } from '../helpers/proc.js';
import { prng } from '../helpers/random.js';

const FIXTURE = path.join(ROOT, 'test', 'fixtures', 'hydrate-child.ts');
const CHUNK = 16 * 1024;
const CHUNKS = 769;
const IN_FLIGHT = 4;
const COMMIT_CHUNKS = 8;

describe('hydration crash safety', () => {
  it('kill -9 at random moments: set bits always mean correct data; resumes without refetching; ends equal to the source', { timeout: 10 * 60_000 }, async (t) => {
    const kills = Number(process.env.SPILLWAY_CRASH_ITER ?? 12);
    const seed = Number(process.env.SPILLWAY_CRASH_SEED ?? Math.floor(Math.random() * 1e9));
    t.diagnostic(`seed ${seed} (SPILLWAY_CRASH_SEED), ${kills} kills (SPILLWAY_CRASH_ITER)`);
    const rnd = prng(seed);
    const tmp = await tempDir('spw-hydrate-crash-');
    const src = path.join(tmp.dir, 'source.img');
    const vol = path.join(tmp.dir, 'volume.img');
    const img = sourceImage(seed, CHUNK, CHUNKS, 3000);
    await writeSourceImage(src, img);
    const chunkOf = (buf: Buffer, i: number): Buffer => buf.subarray(i * CHUNK, Math.min(buf.length, (i + 1) * CHUNK));

    /** The durable bits, after checking each set chunk holds the source's bytes. */
    const check = async (what: string): Promise<Set<number>> => {
      const encoded = await readFile(bitmapPathOf(vol)).catch(() => null);
      const durable = new Set<number>();
      if (!encoded) return durable; // killed before the bitmap was first saved
      const { bitmap } = GranuleBitmap.decode(encoded, { size: img.length, granularity: CHUNK }, 'crash test');
      const file = await readFile(vol);
      for (let i = 0; i < CHUNKS; i++) {
        if (!bitmap.get(i)) continue;
        durable.add(i);
        assert.ok(chunkOf(file, i).equals(chunkOf(img, i)), `${what}: chunk ${i}'s bit is set but its data differs from the source`);
      }
      return durable;
    };

    const child = () => startProc(process.execPath, ['--import', 'tsx', FIXTURE, src, vol, String(CHUNK), String(Math.floor(rnd() * 1e9))], { cwd: ROOT });
    let totalFetches = 0;
    let midway = 0;
    const runFetches = (out: string): number[] => [...out.matchAll(/^fetch (\d+)$/gm)].map((m) => Number(m[1]));
    try {
      let durable = new Set<number>();
      for (let k = 0; k < kills; k++) {
        const p = child();
        try {
          const deadline = Date.now() + 60_000;
          while (!/^ready /m.test(p.stdout())) {
            if (p.child.exitCode !== null || Date.now() > deadline) assert.fail(`the child did not start: ${p.stderr()}`);
            await new Promise((r) => setTimeout(r, 5));
          }
          await new Promise((r) => setTimeout(r, rnd() * 300));
        } finally {
          p.child.kill('SIGKILL');
        }
        const r = await p.exited;
        if (r.signal !== 'SIGKILL') assert.equal(r.code, 0, `the child failed: ${p.stderr()}`);
        const fetched = runFetches(p.stdout());
        totalFetches += fetched.length;
        for (const i of fetched) assert.ok(!durable.has(i), `kill ${k + 1}: chunk ${i} was fetched although it was durable when the child started`);
        const next = await check(`after kill ${k + 1}`);
        for (const i of durable) assert.ok(next.has(i), `a bit was cleared: chunk ${i}`);
        if (next.size > durable.size && next.size < CHUNKS) midway++;
        durable = next;
      }
      // and the last run goes to the end
      const p = child();
      const r = await p.exited;
      assert.equal(r.code, 0, p.stderr());
      assert.match(p.stdout(), /^complete$/m);
      const fetched = runFetches(p.stdout());
      totalFetches += fetched.length;
      for (const i of fetched) assert.ok(!durable.has(i), `final run: chunk ${i} was fetched although it was durable`);
      const final = await check('final');
      assert.equal(final.size, CHUNKS, 'every bit is set');
      assert.ok((await readFile(vol)).equals(img), 'the hydrated volume equals the source');
      assert.equal((await readHydrationState(vol))?.complete, true);
      // each kill loses at most the fetches in flight, the landings in flight and the
      // landed-but-uncommitted chunks (the hydrator keeps those under COMMIT_CHUNKS)
      const bound = CHUNKS + kills * (2 * IN_FLIGHT + COMMIT_CHUNKS);
      t.diagnostic(`${totalFetches} fetches for ${CHUNKS} chunks over ${kills} kills (bound ${bound}); ${midway} kills landed mid-hydration`);
      assert.ok(totalFetches <= bound, `${totalFetches} fetches exceed ${bound}`);
      assert.ok(midway > 0, 'some kill landed in the middle of hydration');
    } finally {
      await tmp.cleanup();
    }
  });
});
