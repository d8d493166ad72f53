// Profiles (src/prefetch/profile.ts):
//   - the recorder: coalescing of consecutive first touches within the merge window, first
//     touch only, uniqueBytes at 4 KiB granularity on unaligned reads and a short last granule,
//     the entry cap (truncated), and a model test (fast-check) against a naive recorder;
//   - the paged bitset against a Set, across page boundaries;
//   - the store: round trip, mode 0600, replace, list/forFamily/delete, every validation error
//     by name, and a fuzz of the loader with mutated files: a profile or a ProfileError, nothing
//     else.
// The clock is injected; no test asserts on elapsed time.

import assert from 'node:assert/strict';
import { readdir, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';

import { GRANULE, PagedBitset, ProfileError, ProfileRecorder, ProfileStore, parseProfile, type Profile } from '../../src/prefetch/profile.js';
import { tempDir } from '../helpers/proc.js';

const RUNS = Number(process.env.SPILLWAY_FUZZ_RUNS ?? 200);
const KiB = 1024;
const CS = 64 * KiB;

/** A recorder on a settable clock (ms since the epoch). */
function recorder(o: { size?: number; chunkSize?: number; maxEntries?: number; mergeWindowMs?: number; name?: string } = {}) {
  const clock = { ms: Date.UTC(2025, 0, 1) };
  const rec = new ProfileRecorder({ name: o.name ?? 'boot', volume: 'web', family: 'debian12', chunkSize: o.chunkSize ?? CS, size: o.size ?? 64 * CS, now: () => clock.ms, maxEntries: o.maxEntries, mergeWindowMs: o.mergeWindowMs });
  return { rec, clock };
}

function isProfileError(re?: RegExp) {
  return (e: unknown) => e instanceof ProfileError && e.code === 'SPW_ERR_PROFILE' && (!re || re.test(e.message));
}

void describe('ProfileRecorder', () => {
  void test('consecutive new chunks within the merge window coalesce; a gap in time or index starts an entry', () => {
    const { rec, clock } = recorder();
    rec.touch(0, 4096); // chunk 0 at t=0
    clock.ms += 5;
    rec.touch(CS, 100); // chunk 1 at t=5: within 10 ms of the entry, and next → merged
    clock.ms += 20;
    rec.touch(2 * CS, 1); // chunk 2 at t=25: too late for the entry at t=0
    rec.touch(10 * CS, 5 * CS); // chunks 10..14 at once: one entry
    rec.touch(20 * CS + 10, 1); // chunk 20, not next to 14
    const p = rec.toProfile();
    assert.deepEqual(p.entries, [
      { t: 0, start: 0, count: 2 },
      { t: 25, start: 2, count: 1 },
      { t: 25, start: 10, count: 5 },
      { t: 25, start: 20, count: 1 },
    ]);
    assert.equal(p.chunks, 9);
    assert.equal(p.reads, 5);
    assert.equal(p.durationMs, 25);
    assert.equal(p.createdAt, '2025-01-01T00:00:00.000Z');
    assert.equal(p.truncated, undefined);

    const strict = recorder({ mergeWindowMs: 0 });
    strict.rec.touch(0, 1);
    strict.clock.ms += 1;
    strict.rec.touch(CS, 1);
    assert.equal(strict.rec.toProfile().entries.length, 2, 'with a 0 ms window, 1 ms apart is two entries');
  });

  void test('only the first touch of a chunk is recorded; a read over seen and new chunks splits around the seen ones', () => {
    const { rec, clock } = recorder();
    rec.touch(3 * CS, CS);
    clock.ms += 100;
    rec.touch(3 * CS, CS); // again: nothing new
    rec.touch(3 * CS + 17, 5);
    assert.equal(rec.toProfile().entries.length, 1);
    rec.touch(2 * CS, 3 * CS); // chunks 2, 3 (seen), 4
    const p = rec.toProfile();
    assert.deepEqual(p.entries, [
      { t: 0, start: 3, count: 1 },
      { t: 100, start: 2, count: 1 },
      { t: 100, start: 4, count: 1 },
    ]);
    assert.equal(p.chunks, 3);
    assert.equal(p.reads, 4);
    assert.equal(rec.lastTouchAt, clock.ms);
  });

  void test('uniqueBytes counts distinct 4 KiB granules of unaligned reads, capped to the volume size', () => {
    const { rec } = recorder({ size: 3 * CS + 1000 }); // the last granule is 1000 bytes
    assert.equal(rec.lastTouchAt, undefined);
    rec.touch(100, 10); // granule 0
    assert.equal(rec.uniqueBytes, 4096);
    rec.touch(4000, 200); // granules 0 and 1
    assert.equal(rec.uniqueBytes, 8192);
    rec.touch(0, 8192); // nothing new
    assert.equal(rec.uniqueBytes, 8192);
    rec.touch(3 * CS + 999, 50); // the short last granule, the read clipped to the volume
    assert.equal(rec.uniqueBytes, 8192 + 1000);
    rec.touch(3 * CS + 1000, 4096); // wholly past the end: ignored, not a read
    rec.touch(-4096, 4096); // wholly before the start: ignored
    assert.equal(rec.reads, 3 + 0 + 1);
    rec.touch(0, 10 * CS); // the whole volume
    assert.equal(rec.uniqueBytes, 3 * CS + 1000);
    const p = rec.toProfile();
    assert.equal(p.uniqueBytes, p.size);
    assert.equal(p.chunks, 4);
  });

  void test('the entry cap stops recording new ranges and marks the profile truncated', () => {
    const { rec, clock } = recorder({ maxEntries: 2 });
    rec.touch(0, 1);
    rec.touch(CS, 1); // extends entry 0 (same ms, next chunk)
    rec.touch(5 * CS, 1); // entry 1
    clock.ms += 1;
    rec.touch(9 * CS, 1); // would be entry 2: cap
    rec.touch(6 * CS, 1); // would have extended entry 1, but recording has stopped
    rec.touch(20 * CS, 4096);
    const p = rec.toProfile();
    assert.equal(p.truncated, true);
    assert.deepEqual(p.entries, [
      { t: 0, start: 0, count: 2 },
      { t: 0, start: 5, count: 1 },
    ]);
    assert.equal(p.chunks, 3);
    assert.equal(p.reads, 6, 'reads go on counting');
    assert.equal(p.uniqueBytes, 6 * 4096, 'uniqueBytes goes on counting');
    assert.doesNotThrow(() => parseProfile(p, 'truncated'), 'a truncated profile is valid');
  });

  void test('bad names and geometry are refused', () => {
    assert.throws(() => recorder({ name: '../etc' }), isProfileError(/profile "\.\.\/etc" is not a valid name/));
    assert.throws(() => recorder({ chunkSize: 3000 }), RangeError);
    assert.throws(() => recorder({ size: 0 }), RangeError);
  });

  void test('model: entries list every distinct chunk once, in first-touch order; uniqueBytes and chunks match a naive recorder', () => {
    const size = 40 * 4096 + 123;
    const chunkSize = 4 * 4096;
    fc.assert(
      fc.property(
        fc.array(fc.record({ offset: fc.integer({ min: -5000, max: size + 5000 }), length: fc.integer({ min: 0, max: 3 * chunkSize }), dt: fc.nat(15) }), { maxLength: 60 }),
        fc.integer({ min: 1, max: 8 }),
        (reads, maxEntries) => {
          const clock = { ms: 1000 };
          const rec = new ProfileRecorder({ name: 'm', volume: 'v', family: 'f', chunkSize, size, now: () => clock.ms, maxEntries });
          const order: number[] = [];
          const times = new Map<number, number>();
          const granules = new Set<number>();
          let nreads = 0;
          for (const r of reads) {
            clock.ms += r.dt;
            rec.touch(r.offset, r.length);
            const from = Math.max(0, r.offset);
            const to = Math.min(size, r.offset + r.length);
            if (to <= from) continue;
            nreads++;
            for (let g = Math.floor(from / 4096); g * 4096 < to; g++) granules.add(g);
            for (let c = Math.floor(from / chunkSize); c * chunkSize < to; c++)
              if (!times.has(c)) {
                times.set(c, clock.ms - 1000);
                order.push(c);
              }
          }
          const p = rec.toProfile();
          const expectBytes = [...granules].reduce((n, g) => n + Math.min(4096, size - g * 4096), 0);
          assert.equal(p.uniqueBytes, expectBytes);
          assert.equal(p.reads, nreads);
          const listed = p.entries.flatMap((e) => Array.from({ length: e.count }, (_, k) => e.start + k));
          assert.equal(p.chunks, listed.length);
          // the entries are the first-touch order, or a prefix of it when truncated
          assert.deepEqual(listed, order.slice(0, listed.length));
          assert.equal(p.truncated === true, listed.length < order.length);
          assert.ok(p.entries.length <= maxEntries);
          for (const e of p.entries) {
            // a chunk's recorded time is at most the merge window before its real first touch
            for (let k = 0; k < e.count; k++) {
              const real = times.get(e.start + k)!;
              assert.ok(e.t <= real && real - e.t <= 10, `chunk ${e.start + k}: entry t ${e.t}, first touch ${real}`);
            }
          }
          parseProfile(p, 'model'); // every recorded profile is valid
        },
      ),
      { numRuns: RUNS },
    );
  });
});

void test('PagedBitset.setRange counts newly set bits, across page boundaries', () => {
  const PAGE = 1 << 19;
  fc.assert(
    fc.property(fc.array(fc.tuple(fc.integer({ min: 0, max: 3 * PAGE }), fc.integer({ min: 0, max: 200 })), { maxLength: 30 }), (ranges) => {
      const bits = new PagedBitset(3 * PAGE + 300);
      const model = new Set<number>();
      for (const [from, n] of ranges) {
        const before = model.size;
        for (let i = from; i < from + n; i++) model.add(i);
        assert.equal(bits.setRange(from, from + n), model.size - before);
      }
      for (const [from, n] of ranges) for (let i = Math.max(0, from - 2); i < from + n + 2; i++) assert.equal(bits.has(i), model.has(i), `bit ${i}`);
    }),
    { numRuns: RUNS },
  );
  const b = new PagedBitset(2 * PAGE);
  assert.equal(b.setRange(PAGE - 40, PAGE + 40), 80);
  assert.equal(b.add(PAGE - 1), false);
  assert.equal(b.add(PAGE + 40), true);
});

// ---------------------------------------------------------------------------------------------

function sample(name = 'boot', family = 'debian12'): Profile {
  const { rec, clock } = recorder({ name });
  rec.touch(0, 3 * CS);
  clock.ms += 40;
  rec.touch(10 * CS + 5, 3000);
  clock.ms += 40;
  rec.touch(7 * CS, 2 * CS);
  clock.ms += 20;
  return { ...rec.toProfile(), family };
}

void describe('ProfileStore', () => {
  let dir = '';
  let cleanup: () => Promise<void> = async () => undefined;
  before(async () => ({ dir, cleanup } = await tempDir('spw-profile-')));
  after(() => cleanup());

  void test('round trip, mode 0600, replace, list, forFamily, delete', async () => {
    const store = new ProfileStore(path.join(dir, 'rt'));
    assert.deepEqual(await store.list(), [], 'a store that does not exist yet is empty');
    const p = sample('boot');
    await store.save(p);
    assert.deepEqual(await store.load('boot'), p);
    assert.equal((await stat(path.join(store.dir, 'boot.json'))).mode & 0o777, 0o600);

    const q = { ...sample('boot'), durationMs: 999 };
    await store.save(q); // replaces
    assert.equal((await store.load('boot')).durationMs, 999);
    assert.deepEqual((await readdir(store.dir)).sort(), ['boot.json'], 'no temporary file is left behind');

    await store.save(sample('other', 'alpine'));
    await store.save(sample('boot2'));
    assert.deepEqual(await store.list(), [
      { name: 'boot', volume: 'web', family: 'debian12', createdAt: q.createdAt, durationMs: 999, chunks: q.chunks, uniqueBytes: q.uniqueBytes },
      { name: 'boot2', volume: 'web', family: 'debian12', createdAt: q.createdAt, durationMs: 100, chunks: q.chunks, uniqueBytes: q.uniqueBytes },
      { name: 'other', volume: 'web', family: 'alpine', createdAt: q.createdAt, durationMs: 100, chunks: q.chunks, uniqueBytes: q.uniqueBytes },
    ]);
    assert.deepEqual(
      (await store.forFamily('debian12')).map((x) => x.name),
      ['boot', 'boot2'],
    );
    assert.deepEqual(await store.forFamily('nobody'), []);

    await store.delete('boot');
    await assert.rejects(store.load('boot'), isProfileError(/^no profile named boot; `spillway profile list` shows them$/));
    await assert.rejects(store.delete('boot'), isProfileError(/no profile named boot/));
    assert.deepEqual(
      (await store.list()).map((x) => x.name),
      ['boot2', 'other'],
    );
  });

  void test('a leftover temporary file from a crash is ignored and replaced', async () => {
    const store = new ProfileStore(path.join(dir, 'tmp'));
    await store.save(sample('a'));
    await writeFile(path.join(store.dir, 'a.json.tmp'), '{"half": ');
    assert.deepEqual(
      (await store.list()).map((x) => x.name),
      ['a'],
    );
    await store.save({ ...sample('a'), reads: 77 });
    assert.equal((await store.load('a')).reads, 77);
    assert.deepEqual((await readdir(store.dir)).sort(), ['a.json']);
  });

  void test('every validation rule is reported as a ProfileError naming the file and the problem', async () => {
    const store = new ProfileStore(path.join(dir, 'bad'));
    await store.save(sample('good'));
    const file = path.join(store.dir, 'x.json');
    const good = sample('x');
    const cases: Array<[string, (p: Record<string, unknown> & Profile) => unknown, RegExp]> = [
      ['version', (p) => ({ ...p, version: 2 }), /version/],
      ['name rule', (p) => ({ ...p, name: 'a b' }), /name: use letters/],
      ['volume rule', (p) => ({ ...p, volume: '' }), /volume: use letters/],
      ['family rule', (p) => ({ ...p, family: '-x' }), /family: use letters/],
      ['unknown key', (p) => ({ ...p, surprise: 1 }), /surprise/],
      ['missing key', (p) => ({ ...p, entries: undefined }), /entries/],
      ['chunk size', (p) => ({ ...p, chunkSize: 3000 }), /chunkSize: must be a power of two/],
      ['size', (p) => ({ ...p, size: 0 }), /size/],
      ['createdAt', (p) => ({ ...p, createdAt: 'yesterday' }), /createdAt/],
      ['negative t', (p) => ({ ...p, entries: [{ ...p.entries[0]!, t: -1 }, ...p.entries.slice(1)] }), /entries\.0\.t/],
      ['t not a number', (p) => ({ ...p, entries: [{ ...p.entries[0]!, t: 'soon' }, ...p.entries.slice(1)] }), /entries\.0\.t/],
      ['t decreasing', (p) => ({ ...p, entries: [p.entries[1], p.entries[0], ...p.entries.slice(2)] }), /entries\.1\.t: 0 is before the previous entry's 40/],
      ['t after the end', (p) => ({ ...p, durationMs: 50 }), /entries\.2\.t: 80 is after the end of the recording/],
      ['count 0', (p) => ({ ...p, entries: [{ ...p.entries[0]!, count: 0 }, ...p.entries.slice(1)] }), /entries\.0\.count/],
      ['fractional start', (p) => ({ ...p, entries: [{ ...p.entries[0]!, start: 0.5 }, ...p.entries.slice(1)] }), /entries\.0\.start/],
      ['past the volume', (p) => ({ ...p, entries: [...p.entries, { t: 100, start: 63, count: 2 }], chunks: p.chunks + 2 }), /entries\.3: chunks 63\.\.64 go past the last chunk \(63\)/],
      ['overlap', (p) => ({ ...p, entries: [...p.entries, { t: 100, start: 1, count: 1 }], chunks: p.chunks + 1 }), /entries\.3: chunks 1\.\.1 overlap an earlier entry/],
      ['chunks', (p) => ({ ...p, chunks: p.chunks + 1 }), /chunks: 7, but the entries list 6/],
      ['uniqueBytes past size', (p) => ({ ...p, uniqueBytes: p.size + 1 }), /uniqueBytes: .* more than the volume size/],
      ['uniqueBytes past chunks', (p) => ({ ...p, uniqueBytes: p.chunks * CS + 1 }), /uniqueBytes: .* more than the 6 chunks touched hold/],
      ['no reads', (p) => ({ ...p, reads: 0 }), /reads: 0, but 6 chunks/],
      ['too many entries', (p) => ({ ...p, entries: new Array(1_000_001).fill(p.entries[0]) }), /entries/],
      ['another name', (p) => ({ ...p, name: 'y' }), /holds profile "y", not "x"/],
      ['not an object', () => [1, 2], /\(top\)/],
    ];
    for (const [what, mutate, re] of cases) {
      await writeFile(file, JSON.stringify(mutate(good as Profile & Record<string, unknown>)));
      await assert.rejects(store.load('x'), (e: unknown) => isProfileError(re)(e) && (e as Error).message.includes(file), `${what}: ${re}`);
      if (what !== 'another name') assert.throws(() => parseProfile(mutate(good as Profile & Record<string, unknown>), 'value'), isProfileError(re), `${what} (parseProfile)`);
    }
    await writeFile(file, '{"version": 1,');
    await assert.rejects(store.load('x'), isProfileError(/x\.json is not a valid profile: not JSON/));
    await writeFile(file, '');
    await truncate(file, 128 * 1024 * 1024 + 1); // sparse: refused before it is read
    await assert.rejects(store.load('x'), isProfileError(/more than the \d+ a profile can have/));
    await assert.rejects(store.load('../good'), isProfileError(/profile "\.\.\/good" is not a valid name/));
    await assert.rejects(store.save({ ...good, chunks: 1 }), isProfileError(/chunks: 1, but the entries list 6/));
    await assert.rejects(store.save({ ...good, name: 'a/b' }), isProfileError(/not a valid name/));

    // list and forFamily leave invalid files out and say which
    const invalid: string[] = [];
    assert.deepEqual(
      (await store.list((name, err) => invalid.push(`${name}: ${err.code}`))).map((x) => x.name),
      ['good'],
    );
    assert.deepEqual(invalid, ['x: SPW_ERR_PROFILE']);
    assert.equal((await store.forFamily('debian12')).length, 1);
  });

  void test('fuzz: a mutated profile file loads as a valid profile or fails with a ProfileError, nothing else', async () => {
    const store = new ProfileStore(path.join(dir, 'fuzz'));
    await store.save(sample('f'));
    const file = path.join(store.dir, 'f.json');
    const text = await readFile(file, 'utf8');
    const original = JSON.parse(text) as Record<string, unknown>;

    // a value replaced anywhere in the document by arbitrary JSON
    const replaceAt = (v: unknown, pathBits: number[], repl: unknown): unknown => {
      if (pathBits.length === 0 || v === null || typeof v !== 'object') return repl;
      const keys = Array.isArray(v) ? v.map((_, i) => i) : Object.keys(v);
      if (keys.length === 0) return repl;
      const k = keys[pathBits[0]! % keys.length]!;
      const copy = (Array.isArray(v) ? [...(v as unknown[])] : { ...(v as Record<string, unknown>) }) as Record<string | number, unknown>;
      copy[k] = replaceAt((v as Record<string | number, unknown>)[k], pathBits.slice(1), repl);
      return copy;
    };
    const structural = fc.tuple(fc.array(fc.nat(), { minLength: 1, maxLength: 4 }), fc.jsonValue()).map(([bits, repl]) => JSON.stringify(replaceAt(original, bits, repl)));
    // bytes of the text changed, removed or inserted
    const textual = fc.array(fc.tuple(fc.nat(text.length), fc.constantFrom('del', 'set', 'ins'), fc.constantFrom('0', '9', '-', '"', '{', '}', ',', ':', ' ', 'e', '.', '1e300', 'null')), { minLength: 1, maxLength: 5 }).map((edits) => {
      let s = text;
      for (const [at, op, ch] of edits) {
        const i = at % (s.length + 1);
        s = op === 'del' ? s.slice(0, i) + s.slice(i + 1) : op === 'set' ? s.slice(0, i) + ch + s.slice(i + 1) : s.slice(0, i) + ch + s.slice(i);
      }
      return s;
    });
    let loaded = 0;
    let refused = 0;
    await fc.assert(
      fc.asyncProperty(fc.oneof(structural, textual), async (mutated) => {
        await writeFile(file, mutated);
        try {
          const p = await store.load('f');
          assert.doesNotThrow(() => parseProfile(p, 'again'));
          loaded++;
        } catch (e) {
          if (!(e instanceof ProfileError)) throw e;
          refused++;
        }
      }),
      { numRuns: RUNS * 2 },
    );
    assert.ok(refused > 0 && loaded + refused === RUNS * 2, `loaded ${loaded}, refused ${refused}`);
  });
});

void test('GRANULE is 4 KiB', () => assert.equal(GRANULE, 4 * KiB));
