// SecureCache: round trips, keys, encryption at rest, authentication failures, restart reuse,
// invalidation, dedup mapping, errors.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { open } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { CacheError } from '../../src/cache/errors.js';
import { deriveKeys } from '../../src/cache/keys.js';
import { SecureCache } from '../../src/cache/cache.js';
import { registry } from '../../src/metrics/registry.js';
import { cleanup, filesUnder, idOf, prng, tempDir } from './helpers.js';

const MiB = 1024 * 1024;

function isCode(code: string) {
  return (e: unknown) => e instanceof CacheError && e.code === code;
}

async function flipByte(file: string, offset: number): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, offset);
    b[0] = (b[0] as number) ^ 0x40;
    await fh.write(b, 0, 1, offset);
  } finally {
    await fh.close();
  }
}

async function swapSlots(file: string, slotSize: number, a: number, b: number, length: number): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    const ba = Buffer.alloc(length);
    const bb = Buffer.alloc(length);
    await fh.read(ba, 0, length, a * slotSize);
    await fh.read(bb, 0, length, b * slotSize);
    await fh.write(bb, 0, length, a * slotSize);
    await fh.write(ba, 0, length, b * slotSize);
  } finally {
    await fh.close();
  }
}

void test('round trips: content of several sizes, zero chunks, lookup, getContent, hasContent, dedup', async (t) => {
  const dir = await tempDir(t);
  const cache = await SecureCache.open({ dir, maxBytes: 64 * MiB });
  cleanup(t, () => cache.close());
  const key = randomBytes(32);
  cache.setKey('base', key);
  const sizes = [1, 4095, 4096, 4097, 65535, 65536, 100000, 1 << 20];
  for (const [i, size] of sizes.entries()) {
    const data = prng(`rt${i}`, size);
    assert.equal(await cache.put('vol', 'base', i, idOf(data), data), true);
  }
  assert.equal(await cache.putZero('vol', 100), true);
  for (const [i, size] of sizes.entries()) {
    const data = prng(`rt${i}`, size);
    assert.deepEqual(await cache.get('vol', i), data, `chunk ${i} (${size} bytes)`);
    assert.deepEqual(cache.lookup('vol', i), { kind: 'content', id: idOf(data) });
    assert.deepEqual(await cache.getContent('base', idOf(data)), data);
    assert.equal(cache.hasContent('base', idOf(data)), true);
  }
  assert.equal(await cache.get('vol', 100), 'zero');
  assert.deepEqual(cache.lookup('vol', 100), { kind: 'zero' });
  assert.equal(cache.lookup('vol', 101), null);
  assert.equal(cache.lookup('other', 0), null);
  assert.equal(await cache.get('vol', 101), null);
  assert.equal(await cache.getContent('base', randomBytes(32)), null);
  assert.equal(cache.hasContent('base', randomBytes(32)), false);
  assert.equal(cache.hasContent('nofamily', idOf(prng('rt0', 1))), false);

  // idempotent: the same put again stores nothing new
  const before = cache.stats();
  const d0 = prng('rt5', 65536);
  assert.equal(await cache.put('vol', 'base', 5, idOf(d0), d0), true);
  assert.equal(await cache.putZero('vol', 100), true);
  assert.equal(cache.stats().puts, before.puts);
  assert.equal(cache.stats().blobs, before.blobs);

  // dedup: a clone maps its chunk to content the base already has
  cache.attachVolume('clone', 'base');
  assert.equal(await cache.map('clone', 7, idOf(d0)), true);
  assert.equal(await cache.map('clone', 7, idOf(d0)), true);
  assert.deepEqual(await cache.get('clone', 7), d0);
  assert.equal(await cache.map('clone', 8, randomBytes(32)), false, 'content not stored: the caller must fetch data');
  assert.equal(cache.lookup('clone', 8), null);
  // concurrent puts of one content write it once
  const dup = prng('dup', 65536);
  const results = await Promise.all(Array.from({ length: 8 }, (_, i) => cache.put('clone', 'base', 20 + i, idOf(dup), dup)));
  assert.deepEqual(results, Array(8).fill(true));
  assert.equal(cache.stats().puts, before.puts + 1);
  const s = cache.stats();
  assert.equal(s.tiers.cache.hits, s.hits.content + s.hits.zero);
  assert.ok(s.hits.zero >= 1 && s.hits.content >= sizes.length);
});

void test('content is unreadable without the key and after forgetKey; readable again after setKey', async (t) => {
  const dir = await tempDir(t);
  const cache = await SecureCache.open({ dir, maxBytes: 16 * MiB });
  cleanup(t, () => cache.close());
  const data = prng('k', 65536);
  assert.equal(await cache.put('vol', 'fam', 0, idOf(data), data), false, 'no key yet: nothing can be sealed');
  assert.equal(cache.lookup('vol', 0), null);
  const key = randomBytes(32);
  cache.setKey('fam', key);
  assert.equal(await cache.put('vol', 'fam', 0, idOf(data), data), true);
  cache.forgetKey('fam');
  assert.equal(cache.hasKey('fam'), false);
  assert.equal(await cache.get('vol', 0), null);
  assert.equal(await cache.getContent('fam', idOf(data)), null);
  assert.equal(cache.hasContent('fam', idOf(data)), false);
  assert.equal(cache.stats().misses.nokey, 2);
  assert.equal(cache.stats().misses.corrupt, 0, 'a missing key drops nothing');
  cache.setKey('fam', key);
  assert.deepEqual(await cache.get('vol', 0), data);
});

void test('nothing written through the cache appears in plaintext in any file, nor do the keys', async (t) => {
  const dir = await tempDir(t);
  const cache = await SecureCache.open({ dir, maxBytes: 16 * MiB, snapshotMinLogBytes: 1 });
  const sentinel = Buffer.from('SPILLWAY-SENTINEL-7f3a9c-DO-NOT-LEAK', 'utf8');
  const key = randomBytes(32);
  cache.setKey('fam', key);
  const sizes = [sentinel.length, 4096, 65536, 65536 + 100];
  for (const [i, size] of sizes.entries()) {
    const data = Buffer.alloc(size);
    for (let o = 0; o < size; o += sentinel.length) sentinel.copy(data, o, 0, Math.min(sentinel.length, size - o));
    data.writeUInt32BE(i, 0); // distinct contents, the sentinel still repeats inside
    if (size === sentinel.length) sentinel.copy(data);
    assert.equal(await cache.put('vol', 'fam', i, idOf(data), data), true);
  }
  await cache.idle();
  const { cacheKey, signKey } = deriveKeys(key);
  const needles = [sentinel, sentinel.subarray(4, 24), key, cacheKey, signKey];
  const check = async (when: string): Promise<void> => {
    const files = await filesUnder(dir);
    assert.ok(files.some((f) => f.file.includes('slab-')), 'blob files exist');
    for (const f of files) {
      for (const n of needles) assert.equal(f.bytes.indexOf(n), -1, `${when}: ${path.basename(f.file)} holds secret bytes`);
    }
  };
  await check('open');
  await cache.close();
  await check('closed');
});

void test('a tampered blob is a miss, counted and dropped, never served', async (t) => {
  const dir = await tempDir(t);
  const cache = await SecureCache.open({ dir, maxBytes: 16 * MiB });
  cleanup(t, () => cache.close());
  cache.setKey('fam', randomBytes(32));
  const a = prng('a', 65536);
  const b = prng('b', 65536);
  await cache.put('vol', 'fam', 0, idOf(a), a);
  await cache.put('vol', 'fam', 1, idOf(b), b);
  await flipByte(path.join(dir, 'slab-65536.dat'), 65536 + 777); // inside b's slot
  assert.deepEqual(await cache.get('vol', 0), a);
  assert.equal(await cache.get('vol', 1), null);
  assert.equal(cache.stats().misses.corrupt, 1);
  assert.equal(cache.hasContent('fam', idOf(b)), false, 'dropped');
  assert.equal(cache.lookup('vol', 1), null);
  assert.equal(await cache.get('vol', 1), null);
  assert.equal(cache.stats().misses.corrupt, 1, 'counted once: the second miss is "absent"');
  // the slot is reused and the chunk can be cached again
  assert.equal(await cache.put('vol', 'fam', 1, idOf(b), b), true);
  assert.deepEqual(await cache.get('vol', 1), b);
});

void test('swapped blobs, and a blob of one family under another family with the same key, fail authentication', async (t) => {
  const dir = await tempDir(t);
  const cache = await SecureCache.open({ dir, maxBytes: 16 * MiB });
  cleanup(t, () => cache.close());
  const shared = randomBytes(32);
  cache.setKey('f1', shared);
  cache.setKey('f2', shared); // same key: only the AAD tells the families apart
  const id = randomBytes(32); // the same id in both families
  const a = prng('fa', 65536);
  const b = prng('fb', 65536);
  await cache.put('v1', 'f1', 0, id, a);
  await cache.put('v2', 'f2', 0, id, b);
  await swapSlots(path.join(dir, 'slab-65536.dat'), 65536, 0, 1, 65536);
  assert.equal(await cache.get('v1', 0), null, 'family 2 ciphertext under family 1');
  assert.equal(await cache.get('v2', 0), null);
  assert.equal(cache.stats().misses.corrupt, 2);

  // two contents of one family swapped: the content id in the AAD catches it
  const c = prng('fc', 65536);
  const d = prng('fd', 65536);
  await cache.put('v1', 'f1', 1, idOf(c), c);
  await cache.put('v1', 'f1', 2, idOf(d), d);
  await swapSlots(path.join(dir, 'slab-65536.dat'), 65536, 0, 1, 65536);
  assert.equal(await cache.get('v1', 1), null);
  assert.equal(await cache.get('v1', 2), null);
  assert.equal(cache.stats().misses.corrupt, 4);
  const text = await registry.getSingleMetricAsString('spillway_cache_misses_by_reason_total');
  assert.match(text, /reason="corrupt"\} [1-9]/);
});

void test('restart: reopen, content readable only after setKey; a wrong key is refused; replace drops', async (t) => {
  const dir = await tempDir(t);
  const key = randomBytes(32);
  let cache = await SecureCache.open({ dir, maxBytes: 16 * MiB });
  cache.setKey('fam', key);
  const chunks = Array.from({ length: 20 }, (_, i) => prng(`r${i}`, i % 3 === 0 ? 5000 : 65536));
  for (const [i, d] of chunks.entries()) await cache.put('vol', 'fam', i, idOf(d), d);
  await cache.putZero('vol', 50);
  await cache.invalidate('vol', 3);
  cache.attachVolume('clone', 'fam');
  await cache.map('clone', 9, idOf(chunks[9] as Buffer));
  await cache.close();
  await assert.rejects(cache.get('vol', 0), isCode('SPW_ERR_CACHE_CLOSED'));

  cache = await SecureCache.open({ dir, maxBytes: 16 * MiB });
  cleanup(t, () => cache.close());
  assert.deepEqual(cache.lookup('vol', 0), { kind: 'content', id: idOf(chunks[0] as Buffer) }, 'the index is back before the key');
  assert.equal(await cache.get('vol', 0), null);
  assert.throws(() => cache.setKey('fam', randomBytes(32)), isCode('SPW_ERR_CACHE_KEY_MISMATCH'));
  assert.equal(await cache.get('vol', 0), null, 'the wrong key was not installed');
  cache.setKey('fam', key);
  for (const [i, d] of chunks.entries()) {
    if (i === 3) assert.equal(await cache.get('vol', i), null, 'invalidated before the restart');
    else assert.deepEqual(await cache.get('vol', i), d);
  }
  assert.equal(await cache.get('vol', 50), 'zero');
  assert.deepEqual(await cache.get('clone', 9), chunks[9]);
  assert.equal(cache.stats().misses.corrupt, 0);
  // the owner rotated the key: old content goes
  cache.setKey('fam', randomBytes(32), { replace: true });
  assert.equal(cache.stats().blobs, 0);
  assert.equal(await cache.get('vol', 0), null);
  assert.equal(await cache.get('vol', 50), 'zero', 'zero chunks hold no secret and stay');
});

void test('invalidate: the mapping is gone at once and after a restart; a fill that raced with it is not installed', async (t) => {
  const dir = await tempDir(t);
  const key = randomBytes(32);
  let cache = await SecureCache.open({ dir, maxBytes: 16 * MiB });
  cache.setKey('fam', key);
  const old = prng('old', 65536);
  const next = prng('new', 65536);
  await cache.put('vol', 'fam', 1, idOf(old), old);
  await cache.putZero('vol', 2);
  const token = cache.fillToken('vol', 1);
  const token2 = cache.fillToken('vol', 2);
  await cache.invalidate('vol', 1);
  await cache.invalidate('vol', 2);
  await cache.invalidate('vol', 999); // nothing there: fine
  await cache.invalidate('novolume', 0);
  assert.equal(cache.lookup('vol', 1), null);
  assert.equal(await cache.get('vol', 1), null);
  assert.equal(await cache.get('vol', 2), null);
  // a fetch that started before the write lands late: refused
  assert.equal(await cache.put('vol', 'fam', 1, idOf(old), old, { fillToken: token }), false);
  assert.equal(await cache.putZero('vol', 2, { fillToken: token2 }), false);
  assert.equal(await cache.map('vol', 1, idOf(old), { fillToken: token }), false);
  assert.equal(cache.lookup('vol', 1), null);
  // a fill that started after the invalidation is fine
  const fresh = cache.fillToken('vol', 1);
  assert.equal(await cache.put('vol', 'fam', 1, idOf(next), next, { fillToken: fresh }), true);
  assert.deepEqual(await cache.get('vol', 1), next);
  await cache.invalidate('vol', 1);
  await cache.close();
  cache = await SecureCache.open({ dir, maxBytes: 16 * MiB });
  cleanup(t, () => cache.close());
  cache.setKey('fam', key);
  assert.equal(cache.lookup('vol', 1), null);
  assert.equal(cache.lookup('vol', 2), null);
});

void test('argument and state errors carry stable codes', async (t) => {
  const dir = await tempDir(t);
  const cache = await SecureCache.open({ dir, maxBytes: 16 * MiB });
  cleanup(t, () => cache.close());
  cache.setKey('f1', randomBytes(32));
  cache.setKey('f2', randomBytes(32));
  const d = prng('e', 100);
  assert.equal(await cache.map('nobody', 0, idOf(d)), false, 'family unknown: the caller fetches data');
  await cache.put('vol', 'f1', 0, idOf(d), d);
  await assert.rejects(cache.put('vol', 'f2', 1, idOf(d), d), isCode('SPW_ERR_CACHE_FAMILY_MISMATCH'));
  assert.throws(() => cache.attachVolume('vol', 'f2'), isCode('SPW_ERR_CACHE_FAMILY_MISMATCH'));
  await assert.rejects(cache.put('vol', 'f1', -1, idOf(d), d), isCode('SPW_ERR_CACHE_ARGUMENT'));
  await assert.rejects(cache.put('vol', 'f1', 1.5, idOf(d), d), isCode('SPW_ERR_CACHE_ARGUMENT'));
  await assert.rejects(cache.put('vol', 'f1', 1, Buffer.alloc(0), d), isCode('SPW_ERR_CACHE_ARGUMENT'));
  await assert.rejects(cache.put('vol', 'f1', 1, idOf(d), Buffer.alloc(0)), isCode('SPW_ERR_CACHE_ARGUMENT'));
  await assert.rejects(cache.put('', 'f1', 1, idOf(d), d), isCode('SPW_ERR_CACHE_ARGUMENT'));
  assert.throws(() => cache.setKey('f1', randomBytes(31)), isCode('SPW_ERR_CACHE_KEY_SIZE'));
  await assert.rejects(SecureCache.open({ dir, maxBytes: MiB }), isCode('SPW_ERR_CACHE_LOCKED'));
  const aborted = AbortSignal.abort();
  await assert.rejects(cache.get('vol', 0, { signal: aborted }), { name: 'AbortError' });
  await assert.rejects(cache.put('vol', 'f1', 3, idOf(d), d, { signal: aborted }), { name: 'AbortError' });
  await assert.rejects(cache.invalidate('vol', 0, { signal: aborted }), { name: 'AbortError' });
  await assert.rejects(cache.resize(MiB, { signal: aborted }), { name: 'AbortError' });
  assert.deepEqual(await cache.get('vol', 0), d, 'aborted calls changed nothing');
});

void test('cache hits and misses are counted as tier="cache" in the shared registry', async (t) => {
  const dir = await tempDir(t);
  const cache = await SecureCache.open({ dir, maxBytes: 16 * MiB });
  cleanup(t, () => cache.close());
  cache.setKey('fam', randomBytes(32));
  const value = async (name: string): Promise<number> => {
    const m = (await registry.getMetricsAsJSON()).find((x) => x.name === name);
    return (m?.values.find((v) => v.labels.tier === 'cache')?.value as number | undefined) ?? 0;
  };
  const h0 = await value('spillway_read_hits_total');
  const m0 = await value('spillway_read_misses_total');
  const d = prng('m', 4096);
  await cache.put('vol', 'fam', 0, idOf(d), d);
  await cache.get('vol', 0);
  await cache.get('vol', 1);
  assert.equal((await value('spillway_read_hits_total')) - h0, 1);
  assert.equal((await value('spillway_read_misses_total')) - m0, 1);
  const text = await registry.metrics();
  assert.match(text, /spillway_cache_disk_bytes\{dir="[^"]+",kind="slab"\} 4096/);
});

void test('a log cut or corrupted at any point: reopening serves only right data, twice over', async (t) => {
  const { cp, readdir, truncate, stat } = await import('node:fs/promises');
  const root = await tempDir(t);
  const dir = path.join(root, 'live');
  const key = randomBytes(32);
  const cache = await SecureCache.open({ dir, maxBytes: 64 * MiB, snapshotMinLogBytes: Number.MAX_SAFE_INTEGER });
  cleanup(t, () => cache.close());
  cache.setKey('fam', key);
  const content = (i: number, v: number): Buffer => {
    const d = prng(`log ${i} ${v}`, i % 5 === 4 ? 3000 : 8192);
    d.writeUInt32BE(i, 0);
    d.writeUInt32BE(v, 4);
    return d;
  };
  for (let v = 0; v < 3; v++) {
    for (let i = 0; i < 30; i++) {
      if ((i + v) % 7 === 0) await cache.invalidate('vol', i);
      else if ((i + v) % 11 === 0) await cache.putZero('vol', i);
      else await cache.put('vol', 'fam', i, idOf(content(i, v)), content(i, v));
    }
  }
  await cache.idle();
  const image = path.join(root, 'image');
  await cp(dir, image, { recursive: true }); // what a crash would leave: everything in the log
  const log = (await readdir(image)).filter((f) => f.endsWith('.log')).sort().at(-1) as string;
  const logSize = (await stat(path.join(image, log))).size;
  const cuts = [16, 17, 40, Math.floor(logSize / 3), Math.floor(logSize / 2) + 5, logSize - 1, logSize];
  for (const [n, cut] of cuts.entries()) {
    for (const mode of ['cut', 'flip'] as const) {
      const copy = path.join(root, `${mode}-${n}`);
      await cp(image, copy, { recursive: true });
      if (mode === 'cut') await truncate(path.join(copy, log), cut);
      else if (cut < logSize) await flipByte(path.join(copy, log), cut);
      const c = await SecureCache.open({ dir: copy, maxBytes: 64 * MiB });
      try {
        c.setKey('fam', key);
        for (let i = 0; i < 30; i++) {
          const got = await c.get('vol', i);
          if (got === null || got === 'zero') continue;
          assert.equal(got.readUInt32BE(0), i, `${mode} at ${cut}: chunk ${i} served chunk ${got.readUInt32BE(0)}`);
          assert.deepEqual(got, content(i, got.readUInt32BE(4)), `${mode} at ${cut}: chunk ${i} not byte-exact`);
        }
        assert.equal(c.stats().misses.corrupt, 0);
        if (mode === 'cut' && cut === logSize) assert.equal(c.stats().recovery.tornTail, false);
      } finally {
        await c.close();
      }
      // and again: the cut tail was repaired, nothing more is lost on the next open
      const again = await SecureCache.open({ dir: copy, maxBytes: 64 * MiB });
      again.setKey('fam', key);
      for (let i = 0; i < 30; i++) {
        const got = await again.get('vol', i);
        if (got !== null && got !== 'zero') assert.deepEqual(got, content(i, got.readUInt32BE(4)));
      }
      await again.close();
    }
  }
  // the uncut image has the last version of everything
  const full = await SecureCache.open({ dir: image, maxBytes: 64 * MiB });
  full.setKey('fam', key);
  for (let i = 0; i < 30; i++) {
    const got = await full.get('vol', i);
    if ((i + 2) % 7 === 0) assert.equal(got, null);
    else if ((i + 2) % 11 === 0) assert.equal(got, 'zero');
    else assert.deepEqual(got, content(i, 2));
  }
  await full.close();
});

void test('a log created at the instant of a kill (no header yet) does not hide later records', async (t) => {
  const { cp, readdir, writeFile: write } = await import('node:fs/promises');
  const root = await tempDir(t);
  const dir = path.join(root, 'c');
  const key = randomBytes(32);
  const d = prng('gap', 8192);
  let cache = await SecureCache.open({ dir, maxBytes: 16 * MiB });
  cache.setKey('fam', key);
  await cache.put('vol', 'fam', 1, idOf(d), d);
  await cache.close();
  // what a kill during the creation of the next log leaves: an empty file
  const gens = (await readdir(dir)).map((f) => /^index\.(\d+)\./.exec(f)?.[1]).filter((g): g is string => g !== undefined).map(Number);
  await write(path.join(dir, `index.${String(Math.max(...gens) + 1).padStart(8, '0')}.log`), '');
  cache = await SecureCache.open({ dir, maxBytes: 16 * MiB, snapshotMinLogBytes: Number.MAX_SAFE_INTEGER });
  cleanup(t, () => cache.close());
  cache.setKey('fam', key);
  await cache.invalidate('vol', 1); // acknowledged: must survive any crash from here on
  await cache.idle();
  const image = path.join(root, 'image');
  await cp(dir, image, { recursive: true });
  for (let reopen = 0; reopen < 2; reopen++) {
    const c = await SecureCache.open({ dir: image, maxBytes: 16 * MiB });
    c.setKey('fam', key);
    assert.equal(await c.get('vol', 1), null, `reopen ${reopen}: the invalidated chunk came back`);
    await c.close();
  }
});

void test('dropVolume: every chunk of the volume is forgotten, durably; fills in flight are refused; other volumes keep theirs', async (t) => {
  const dir = await tempDir(t);
  const key = randomBytes(32);
  let cache = await SecureCache.open({ dir, maxBytes: 16 * MiB });
  cache.setKey('fam', key);
  const chunks = Array.from({ length: 8 }, (_, i) => prng(`d${i}`, 65536));
  for (const [i, d] of chunks.entries()) await cache.put('gone', 'fam', i, idOf(d), d);
  await cache.putZero('gone', 20);
  cache.attachVolume('kept', 'fam');
  await cache.map('kept', 2, idOf(chunks[2] as Buffer));
  const token = cache.fillToken('gone', 30); // a fetch of a chunk never mapped is on its way
  assert.equal(await cache.dropVolume('gone'), 9);
  assert.equal(await cache.put('gone', 'fam', 30, idOf(chunks[0] as Buffer), chunks[0] as Buffer, { fillToken: token }), false);
  for (let i = 0; i < 8; i++) assert.equal(await cache.get('gone', i), null);
  assert.equal(await cache.get('gone', 20), null);
  assert.deepEqual(await cache.get('kept', 2), chunks[2]);
  await cache.close();
  cache = await SecureCache.open({ dir, maxBytes: 16 * MiB });
  cleanup(t, () => cache.close());
  cache.setKey('fam', key);
  assert.equal(cache.lookup('gone', 0), null, 'still forgotten after a restart');
  assert.equal(cache.lookup('gone', 20), null);
  assert.deepEqual(await cache.get('kept', 2), chunks[2]);
  assert.equal(await cache.dropVolume('never-seen'), 0);
});
