// The prefetch planner (src/prefetch/planner.ts):
//   - a hand example of hot spots across three profiles, with budget, skip and hotspots off;
//   - properties (fast-check) over arbitrary profiles, budgets, chunk costs and skip sets: no
//     duplicates, indices in range, budget respected and maximal (the next ranked chunk would
//     exceed it), rank key non-increasing along the plan, skip honoured, and the plan equal to a
//     naive model's. Profiles are drawn both over a small span of indices and over a huge one
//     (the dense and the sorted slot maps), with whole-ms and fractional times (the packed-key
//     and the comparator sort).

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';

import { mergeProfiles, planPrefetch } from '../../src/prefetch/planner.js';
import { ProfileError, type Profile, type ProfileEntry } from '../../src/prefetch/profile.js';

const RUNS = Number(process.env.SPILLWAY_FUZZ_RUNS ?? 200);
const CS = 65536;

function profile(name: string, entries: ProfileEntry[], o: { chunkSize?: number; size?: number } = {}): Profile {
  const chunks = entries.reduce((n, e) => n + e.count, 0);
  const chunkSize = o.chunkSize ?? CS;
  return {
    version: 1,
    name,
    volume: 'web',
    family: 'debian12',
    chunkSize,
    size: o.size ?? 1024 * chunkSize,
    createdAt: '2025-01-01T00:00:00.000Z',
    durationMs: entries.at(-1)?.t ?? 0,
    chunks,
    uniqueBytes: chunks * chunkSize,
    reads: chunks,
    entries,
  };
}

/** Single-chunk entries from [t, chunk] pairs. */
const touches = (name: string, list: Array<[number, number]>) => profile(name, list.map(([t, start]) => ({ t, start, count: 1 })));

// P1 touches 5, then 1 and 2, then 9; P2 1, 5, 7; P3 2, 1, 5, 3.
// instances: 1 → 3 (times 10, 0, 8: median 8), 5 → 3 (0, 5, 9: median 5), 2 → 2 (10, 0: 5),
// 9, 7, 3 → 1 (20, 30, 50).
const P1 = profile('p1', [
  { t: 0, start: 5, count: 1 },
  { t: 10, start: 1, count: 2 },
  { t: 20, start: 9, count: 1 },
]);
const P2 = touches('p2', [
  [0, 1],
  [5, 5],
  [30, 7],
]);
const P3 = touches('p3', [
  [0, 2],
  [8, 1],
  [9, 5],
  [50, 3],
]);

void describe('planPrefetch: hot spots across three profiles', () => {
  void test('chunks touched by more instances first, then by median first touch, then by index', () => {
    const all = planPrefetch({ chunkSize: CS, chunkCount: 1024, profiles: [P1, P2, P3], budgetBytes: 100 * CS });
    assert.deepEqual(all, { chunks: [5, 1, 2, 9, 7, 3], bytes: 6 * CS, truncated: false, instances: 3 });
    assert.deepEqual(mergeProfiles([P1, P2, P3]).chunks, [
      { index: 5, instances: 3, medianT: 5 },
      { index: 1, instances: 3, medianT: 8 },
      { index: 2, instances: 2, medianT: 5 },
      { index: 9, instances: 1, medianT: 20 },
      { index: 7, instances: 1, medianT: 30 },
      { index: 3, instances: 1, medianT: 50 },
    ]);
  });

  void test('the budget cuts the plan; skipped chunks cost nothing; chunkBytes prices chunks; chunkCount bounds indices', () => {
    assert.deepEqual(planPrefetch({ chunkSize: CS, chunkCount: 1024, profiles: [P1, P2, P3], budgetBytes: 3 * CS + CS - 1 }), { chunks: [5, 1, 2], bytes: 3 * CS, truncated: true, instances: 3 });
    assert.deepEqual(planPrefetch({ chunkSize: CS, chunkCount: 1024, profiles: [P1, P2, P3], budgetBytes: 3 * CS, skip: (i) => i === 1 }).chunks, [5, 2, 9]);
    // chunk 2 is known zero (costs 0), chunk 9 is large: the walk stops at 9, it does not skip it
    const priced = planPrefetch({ chunkSize: CS, chunkCount: 1024, profiles: [P1, P2, P3], budgetBytes: 2 * CS + 10, chunkBytes: (i) => (i === 2 ? 0 : i === 9 ? 11 : CS) });
    assert.deepEqual(priced, { chunks: [5, 1, 2], bytes: 2 * CS, truncated: true, instances: 3 });
    assert.deepEqual(planPrefetch({ chunkSize: CS, chunkCount: 6, profiles: [P1, P2, P3], budgetBytes: 100 * CS }).chunks, [5, 1, 2, 3]);
    assert.deepEqual(planPrefetch({ chunkSize: CS, chunkCount: 1024, profiles: [], budgetBytes: 100 * CS }), { chunks: [], bytes: 0, truncated: false, instances: 0 });
  });

  void test('with hotspots off, the median first touch alone ranks (ties by index)', () => {
    assert.deepEqual(planPrefetch({ chunkSize: CS, chunkCount: 1024, profiles: [P1, P2, P3], budgetBytes: 100 * CS, hotspots: false }).chunks, [2, 5, 1, 9, 7, 3]);
  });

  void test('profiles of another chunk size are refused with a ProfileError', () => {
    const other = profile('big', [{ t: 0, start: 0, count: 1 }], { chunkSize: 2 * CS });
    assert.throws(
      () => planPrefetch({ chunkSize: CS, chunkCount: 1024, profiles: [P1, other], budgetBytes: CS }),
      (e: unknown) => e instanceof ProfileError && e.code === 'SPW_ERR_PROFILE' && /profile "big" was recorded with 131072-byte chunks, but the plan is for 65536-byte chunks/.test(e.message),
    );
    assert.throws(() => mergeProfiles([other, P1]), ProfileError);
    assert.throws(() => planPrefetch({ chunkSize: CS, chunkCount: 10, profiles: [P1], budgetBytes: -1 }), RangeError);
    assert.throws(() => planPrefetch({ chunkSize: CS, chunkCount: 10, profiles: [P1], budgetBytes: CS, chunkBytes: () => NaN }), RangeError);
  });
});

// ---------------------------------------------------------------------------------------------

interface Case {
  profiles: Profile[];
  chunkCount: number;
  budgetBytes: number;
  cost?: (i: number) => number;
  skip?: (i: number) => boolean;
  hotspots: boolean;
}

/** Profiles whose entries lie in [0, maxStart + 4); times whole ms or thirds of ms. */
function profilesArb(maxStart: number): fc.Arbitrary<Profile[]> {
  const one = fc.tuple(fc.array(fc.record({ start: fc.nat(maxStart), count: fc.integer({ min: 1, max: 4 }), gap: fc.nat(12) }), { maxLength: 20 }), fc.boolean()).map(([raw, thirds]) => {
    const seen = new Set<number>();
    const entries: ProfileEntry[] = [];
    let t = 0;
    for (const r of raw) {
      t += r.gap;
      let ok = true;
      for (let k = 0; k < r.count; k++) if (seen.has(r.start + k)) ok = false;
      if (!ok) continue;
      for (let k = 0; k < r.count; k++) seen.add(r.start + k);
      entries.push({ t: thirds ? t / 3 : t, start: r.start, count: r.count });
    }
    return entries;
  });
  return fc.array(one, { maxLength: 5 }).map((list) => list.map((entries, i) => profile(`p${i}`, entries, { size: (maxStart + 8) * CS })));
}

const caseArb: fc.Arbitrary<Case> = fc.oneof(fc.constant(40), fc.constant(2 ** 40)).chain((maxStart) =>
  fc.record({
    profiles: profilesArb(maxStart),
    chunkCount: fc.oneof(fc.integer({ min: 0, max: 48 }), fc.constant(maxStart + 8)),
    budgetBytes: fc.oneof(fc.integer({ min: 0, max: 30 * CS }), fc.constant(Number.MAX_SAFE_INTEGER)),
    cost: fc.option(
      fc.func(fc.oneof(fc.constant(0), fc.integer({ min: 1, max: CS }), fc.constant(CS))),
      { nil: undefined },
    ),
    skip: fc.option(fc.func(fc.boolean()), { nil: undefined }),
    hotspots: fc.boolean(),
  }),
);

interface Ranked {
  index: number;
  instances: number;
  medianT: number;
}

/** The ranking, naively: a Map of every chunk's first-touch times per profile. */
function naiveRanking(c: Case): Ranked[] {
  const times = new Map<number, number[]>();
  for (const p of c.profiles) {
    const seen = new Set<number>();
    for (const e of p.entries)
      for (let k = 0; k < e.count; k++) {
        const i = e.start + k;
        if (i >= c.chunkCount || seen.has(i)) continue;
        seen.add(i);
        times.set(i, [...(times.get(i) ?? []), e.t]);
      }
  }
  const ranked = [...times].map(([index, ts]) => {
    const s = [...ts].sort((a, b) => a - b);
    const m = s.length % 2 === 1 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
    return { index, instances: ts.length, medianT: m };
  });
  return ranked.sort((a, b) => compareKey(a, b, c.hotspots));
}

/** < 0 when a ranks before b. */
function compareKey(a: Ranked, b: Ranked, hotspots: boolean): number {
  return (hotspots ? b.instances - a.instances : 0) || a.medianT - b.medianT || a.index - b.index;
}

void describe('planPrefetch: properties', () => {
  void test('no duplicates, in range, budget respected and maximal, rank order non-increasing, skip honoured, equal to a naive model', () => {
    fc.assert(
      fc.property(caseArb, (c) => {
        const plan = planPrefetch({ chunkSize: CS, chunkCount: c.chunkCount, profiles: c.profiles, budgetBytes: c.budgetBytes, chunkBytes: c.cost, skip: c.skip, hotspots: c.hotspots });
        const cost = (i: number) => (c.cost ? c.cost(i) : CS);
        const ranked = naiveRanking(c);
        const key = new Map(ranked.map((r) => [r.index, r]));

        assert.equal(plan.instances, c.profiles.length);
        assert.equal(new Set(plan.chunks).size, plan.chunks.length, 'no duplicates');
        for (const i of plan.chunks) {
          assert.ok(Number.isInteger(i) && i >= 0 && i < c.chunkCount, `index ${i} in range`);
          assert.ok(key.has(i), `chunk ${i} was touched by some profile`);
          assert.ok(!c.skip?.(i), `skipped chunk ${i} left out`);
        }
        const bytes = plan.chunks.reduce((n, i) => n + cost(i), 0);
        assert.equal(plan.bytes, bytes);
        assert.ok(bytes <= c.budgetBytes, 'within budget');
        for (let k = 1; k < plan.chunks.length; k++) assert.ok(compareKey(key.get(plan.chunks[k - 1]!)!, key.get(plan.chunks[k]!)!, c.hotspots) < 0, `rank key non-increasing at ${k}`);

        // maximal: every non-skipped chunk ranked before the last one planned is planned, and the
        // next one would exceed the budget
        const candidates = ranked.filter((r) => !c.skip?.(r.index));
        const next = candidates[plan.chunks.length];
        assert.deepEqual(
          plan.chunks,
          candidates.slice(0, plan.chunks.length).map((r) => r.index),
          'the plan is a prefix of the ranking',
        );
        if (next) {
          assert.ok(plan.truncated, 'truncated when a ranked chunk is left');
          assert.ok(bytes + cost(next.index) > c.budgetBytes, `chunk ${next.index} would have fit`);
        } else assert.ok(!plan.truncated);

        const merged = mergeProfiles(c.profiles, { chunkCount: c.chunkCount, hotspots: c.hotspots });
        assert.deepEqual(merged.chunks, ranked);
      }),
      { numRuns: RUNS * 2 },
    );
  });

  void test('a million chunks in three profiles plan in one call (no assertion on time)', () => {
    const N = 1 << 20;
    const mk = (name: string, stride: number) => {
      const entries: ProfileEntry[] = [];
      for (let k = 0; k < N; k += 16) entries.push({ t: k >>> 4, start: (k * stride) % N, count: 16 });
      return profile(name, entries, { size: N * CS });
    };
    const ps = [mk('a', 1), mk('b', 1), mk('c', 3)];
    const plan = planPrefetch({ chunkSize: CS, chunkCount: N, profiles: ps, budgetBytes: (N / 2) * CS });
    assert.equal(plan.chunks.length, N / 2);
    assert.equal(new Set(plan.chunks).size, N / 2);
    assert.ok(plan.truncated);
    // every chunk is touched by all three: the plan starts with the earliest median
    assert.deepEqual(plan.chunks.slice(0, 16), Array.from({ length: 16 }, (_, i) => i));
  });
});
