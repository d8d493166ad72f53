// Size limit and replacement: the cache against the SLRU model under random put/get
// sequences, the bound under mixed chunk sizes, and resize while reads run.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { stat } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import fc from 'fast-check';
import { SecureCache } from '../../src/cache/cache.js';
import { cleanup, filesUnder, idOf, prng, tempDir } from './helpers.js';
import { SlruModel } from './model.js';

const KEY = randomBytes(32);

async function slabFileBytes(dir: string): Promise<number> {
  let n = 0;
  for (const f of await filesUnder(dir)) if (path.basename(f.file).startsWith('slab-')) n += (await stat(f.file)).size;
  return n;
}

type Op = { op: 'put' | 'get'; k: number };

void test('eviction follows the SLRU model and the size bound holds (one chunk size)', async (t) => {
  const root = await tempDir(t);
  let run = 0;
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 0, max: 12 }),
      fc.array(fc.record({ op: fc.constantFrom('put' as const, 'get' as const), k: fc.nat(24) }), { minLength: 1, maxLength: 120 }),
      async (slots, ops: Op[]) => {
        const maxBytes = slots * 4096;
        const dir = path.join(root, `p${run++}`);
        const cache = await SecureCache.open({ dir, maxBytes });
        const model = new SlruModel(maxBytes);
        try {
          cache.setKey('fam', KEY);
          for (const o of ops) {
            const data = prng(`k${o.k}`, 4096);
            const key = `k${o.k}`;
            if (o.op === 'put') {
              const stored = await cache.put('vol', 'fam', o.k, idOf(data), data);
              if (model.has(key)) model.touch(key);
              else if (4096 <= maxBytes) {
                while (model.bytes + 4096 > maxBytes) model.remove(model.victim() as string);
                model.insert(key, 4096);
              }
              assert.equal(stored, model.has(key));
            } else {
              const got = await cache.get('vol', o.k);
              if (model.has(key)) {
                assert.deepEqual(got, data);
                model.touch(key);
              } else {
                assert.equal(got, null);
              }
            }
            for (let k = 0; k <= 24; k++) {
              assert.equal(cache.hasContent('fam', idOf(prng(`k${k}`, 4096))), model.has(`k${k}`), `k${k} after ${o.op} k${o.k}`);
            }
            const s = cache.stats();
            assert.equal(s.liveBytes, model.bytes);
            assert.ok(s.slabBytes <= maxBytes, `slab bytes ${s.slabBytes} > ${maxBytes}`);
          }
          await cache.idle();
          assert.ok((await slabFileBytes(dir)) <= maxBytes);
        } finally {
          await cache.close();
        }
        // The order survives a restart: reopen and compare once more.
        const again = await SecureCache.open({ dir, maxBytes });
        try {
          again.setKey('fam', KEY);
          for (let k = 0; k <= 24; k++) assert.equal(again.hasContent('fam', idOf(prng(`k${k}`, 4096))), model.has(`k${k}`));
        } finally {
          await again.close();
        }
      },
    ),
    { numRuns: 40 },
  );
});

void test('mixed chunk sizes: the slab files stay within the limit, and what is served is right', async (t) => {
  const root = await tempDir(t);
  let run = 0;
  const sizes = [100, 4096, 5000, 20000, 65536];
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 64 * 1024, max: 400 * 1024 }),
      fc.array(
        fc.oneof(
          fc.record({ op: fc.constantFrom('put' as const, 'get' as const), k: fc.nat(30) }),
          fc.record({ op: fc.constant('resize' as const), k: fc.integer({ min: 0, max: 400 * 1024 }) }),
        ),
        { minLength: 1, maxLength: 80 },
      ),
      async (maxBytes0, ops) => {
        let maxBytes = maxBytes0;
        const dir = path.join(root, `m${run++}`);
        const cache = await SecureCache.open({ dir, maxBytes });
        try {
          cache.setKey('fam', KEY);
          const content = (k: number): Buffer => prng(`m${k}`, sizes[k % sizes.length] as number);
          for (const o of ops) {
            if (o.op === 'put') await cache.put('vol', 'fam', o.k, idOf(content(o.k)), content(o.k));
            else if (o.op === 'get') {
              const got = await cache.get('vol', o.k);
              if (got !== null) assert.deepEqual(got, content(o.k));
            } else {
              maxBytes = o.k;
              await cache.resize(maxBytes);
            }
            const s = cache.stats();
            assert.ok(s.slabBytes <= maxBytes, `slab bytes ${s.slabBytes} > ${maxBytes} after ${o.op}`);
            assert.ok(s.liveBytes <= s.slabBytes);
          }
          await cache.idle();
          assert.ok((await slabFileBytes(dir)) <= maxBytes);
          for (let k = 0; k <= 30; k++) {
            const got = await cache.get('vol', k);
            if (got !== null) assert.deepEqual(got, content(k));
          }
          assert.equal(cache.stats().misses.corrupt, 0);
        } finally {
          await cache.close();
        }
      },
    ),
    { numRuns: 30 },
  );
});

void test('resize down and up while reads run: bounded, reads go on, nothing wrong is served', async (t) => {
  const dir = await tempDir(t);
  const MiB = 1024 * 1024;
  const cache = await SecureCache.open({ dir, maxBytes: 16 * MiB });
  cleanup(t, () => cache.close());
  cache.setKey('fam', KEY);
  const N = 200;
  // two chunk sizes, so shrinking leaves holes that blobs must be moved into
  const content = (i: number): Buffer => prng(`z${i}`, i % 4 === 0 ? 20000 : 65536);
  for (let i = 0; i < N; i++) await cache.put('vol', 'fam', i, idOf(content(i)), content(i));
  for (let i = 0; i < N; i += 3) await cache.get('vol', i); // some protected, some not

  let stop = false;
  let reads = 0;
  let served = 0;
  let resizing = false;
  let readsDuringResize = 0;
  const reader = async (seed: number): Promise<void> => {
    let x = seed;
    while (!stop) {
      x = (x * 1103515245 + 12345) % 2 ** 31;
      const i = x % N;
      const got = await cache.get('vol', i);
      reads++;
      if (resizing) readsDuringResize++;
      if (got !== null) {
        assert.deepEqual(got, content(i), `chunk ${i}`);
        served++;
      }
    }
  };
  const readers = [reader(1), reader(2), reader(3), reader(4)];

  resizing = true;
  await cache.resize(3 * MiB);
  resizing = false;
  let s = cache.stats();
  assert.ok(s.slabBytes <= 3 * MiB, `slabBytes ${s.slabBytes}`);
  assert.ok(s.evictions > 0);
  assert.ok(readsDuringResize > 0, 'reads ran while resize worked');

  resizing = true;
  await cache.resize(1 * MiB);
  resizing = false;
  s = cache.stats();
  assert.ok(s.slabBytes <= 1 * MiB);

  await cache.resize(8 * MiB);
  for (let i = N; i < N + 100; i++) await cache.put('vol', 'fam', i, idOf(content(i)), content(i));
  s = cache.stats();
  assert.ok(s.slabBytes <= 8 * MiB && s.slabBytes > 1 * MiB, 'grew again up to the new limit');
  stop = true;
  await Promise.all(readers);
  await cache.idle();
  assert.ok((await slabFileBytes(dir)) <= 8 * MiB);
  assert.ok(reads > 0 && served > 0);
  assert.equal(cache.stats().misses.corrupt, 0, 'moves and evictions never made a reader see a wrong slot');
  for (let i = 0; i < N + 100; i++) {
    const got = await cache.get('vol', i);
    if (got !== null) assert.deepEqual(got, content(i));
  }
});
