// The prefetch planner (docs/profiles.md): turns the recorded profiles of a family into one
// ordered list of chunks to push ahead of demand, bounded by a byte budget. Pure: profiles in,
// plan out; the link sends it at prefetch priority.
//
// Ranking ("hot spots"): a chunk's rank key is
//   1. how many profiles (instances) touched it, more first (unless hotspots is off);
//   2. the median of its first-touch times across those profiles, earlier first;
//   3. its index, lower first.
// Chunks at or beyond chunkCount are left out; so are chunks `skip` says are cached already, and
// those cost nothing. The plan is the longest ranked prefix (skipped chunks aside) that fits the
// budget: the walk stops at the first chunk that would exceed it, so the plan never reorders
// to squeeze in a smaller chunk further down.
//
// Cost: O(T log T) time and O(T) memory for T chunk touches over all profiles (a slot per distinct
// touched chunk, found through a dense map or a sort of the indices, then a sort of the slots by
// rank key), independent of the volume's size. Worst case measured: three profiles of 1M single-chunk entries in random order take
// about 3 s on a busy 2-core machine (memory-bound); coalesced boot profiles are much cheaper.
// It runs synchronously, so call it when a volume opens, not on the read path.

import { ProfileError, type Profile } from './profile.js';

export interface PlanInput {
  chunkSize: number;
  /** chunks of the volume the plan is for; indices ≥ chunkCount are left out. */
  chunkCount: number;
  profiles: readonly Profile[];
  budgetBytes: number;
  /** what a chunk costs against the budget (e.g. 0 for a chunk known to be zero); default chunkSize. */
  chunkBytes?: (index: number) => number;
  /** chunks already cached: left out, not counted against the budget. */
  skip?: (index: number) => boolean;
  /** rank by instance count first (default true); false ranks by median first touch only. */
  hotspots?: boolean;
}

export interface Plan {
  /** chunk indices, in the order to send them. */
  chunks: number[];
  /** bytes the plan costs (sum of chunkBytes). */
  bytes: number;
  /** a ranked chunk did not fit the budget (so the plan is a prefix of what the profiles hold). */
  truncated: boolean;
  /** profiles merged. */
  instances: number;
}

export interface HotChunk {
  index: number;
  /** profiles that touched it. */
  instances: number;
  /** median of its first-touch times (ms) over those profiles. */
  medianT: number;
}

export interface HotSpots {
  chunkSize: number;
  instances: number;
  /** every touched chunk, in rank order. */
  chunks: HotChunk[];
}

interface Ranking {
  /** distinct touched chunk indices, ascending; slot s holds index[s]. */
  index: Float64Array;
  instances: Uint32Array;
  medianT: Float64Array;
  /** slots in rank order. */
  order: Uint32Array;
}

/** Use the dense slot map when the touched span is at most max(this, DENSE_FACTOR × touches). */
export const DENSE_MIN_SPAN = 1 << 22;
const DENSE_FACTOR = 8;

function lowerBound(a: Float64Array, x: number): number {
  let lo = 0;
  let hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (a[mid]! < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function rank(profiles: readonly Profile[], chunkSize: number, chunkCount: number, hotspots: boolean): Ranking {
  for (const p of profiles) {
    if (p.chunkSize !== chunkSize)
      throw new ProfileError(`profile "${p.name}" was recorded with ${p.chunkSize}-byte chunks, but the plan is for ${chunkSize}-byte chunks${profiles[0] && profiles[0] !== p ? ` (as profile "${profiles[0].name}")` : ''}; profiles of different chunk sizes cannot be merged (record the profile again)`);
  }
  // The distinct touched chunks become slots 0..u-1 in index order. When they lie in a span not
  // much larger than the number of touches, a dense map span → slot does it in two linear
  // passes; otherwise the touched indices are sorted and each entry's first slot is found by
  // binary search (an entry's chunks are consecutive, so its slots are too).
  let total = 0;
  let min = Infinity;
  let max = -1;
  for (const p of profiles)
    for (const e of p.entries)
      if (e.start < chunkCount) {
        const n = Math.min(e.count, chunkCount - e.start);
        total += n;
        if (e.start < min) min = e.start;
        if (e.start + n - 1 > max) max = e.start + n - 1;
      }
  const span = max - min + 1;
  const dense = total > 0 && span <= Math.max(DENSE_MIN_SPAN, DENSE_FACTOR * total);
  let index: Float64Array;
  let map: Int32Array | undefined;
  if (dense) {
    map = new Int32Array(span).fill(-1);
    for (const p of profiles)
      for (const e of p.entries) {
        const end = Math.min(e.start + e.count, chunkCount);
        for (let c = e.start; c < end; c++) map[c - min] = 0;
      }
    let u = 0;
    for (let i = 0; i < span; i++) if (map[i] === 0) map[i] = u++;
    index = new Float64Array(u);
    for (let i = 0; i < span; i++) if (map[i]! >= 0) index[map[i]!] = min + i;
  } else {
    const all = new Float64Array(total);
    let k = 0;
    for (const p of profiles)
      for (const e of p.entries) {
        const end = Math.min(e.start + e.count, chunkCount);
        for (let c = e.start; c < end; c++) all[k++] = c;
      }
    all.sort();
    let u = 0;
    for (let i = 0; i < total; i++) if (u === 0 || all[i] !== all[u - 1]) all[u++] = all[i]!;
    index = all.subarray(0, u);
  }
  const u = index.length;
  const firstSlot = (start: number) => (map ? map[start - min]! : lowerBound(index, start));

  // per slot: instances, then first-touch times in CSR form. A profile counts once per chunk
  // (its first entry for that chunk wins), even if it is not a valid profile. The two passes
  // are written out rather than sharing a callback: this is the hot loop.
  const instances = new Uint32Array(u);
  const lastProfile = new Int32Array(u).fill(-1);
  for (let pi = 0; pi < profiles.length; pi++) {
    const entries = profiles[pi]!.entries;
    for (let k = 0; k < entries.length; k++) {
      const e = entries[k]!;
      if (e.start >= chunkCount) continue;
      const n = Math.min(e.count, chunkCount - e.start);
      const s0 = firstSlot(e.start); // the entry's chunks are slots s0..s0+n-1
      for (let s = s0; s < s0 + n; s++) {
        if (lastProfile[s] === pi) continue;
        lastProfile[s] = pi;
        instances[s] = instances[s]! + 1;
      }
    }
  }
  const offset = new Uint32Array(u + 1); // total touches < 2^32: their times would not fit in memory otherwise
  for (let s = 0; s < u; s++) offset[s + 1] = offset[s]! + instances[s]!;
  const times = new Float64Array(offset[u]!);
  const fill = offset.slice(0, u);
  lastProfile.fill(-1);
  for (let pi = 0; pi < profiles.length; pi++) {
    const entries = profiles[pi]!.entries;
    for (let k = 0; k < entries.length; k++) {
      const e = entries[k]!;
      if (e.start >= chunkCount) continue;
      const n = Math.min(e.count, chunkCount - e.start);
      const s0 = firstSlot(e.start);
      for (let s = s0; s < s0 + n; s++) {
        if (lastProfile[s] === pi) continue;
        lastProfile[s] = pi;
        times[fill[s]!] = e.t;
        fill[s] = fill[s]! + 1;
      }
    }
  }

  const medianT = new Float64Array(u);
  let maxInstances = 0;
  for (let s = 0; s < u; s++) {
    const a = offset[s]!;
    const n = instances[s]!;
    if (n > maxInstances) maxInstances = n;
    if (n === 1) medianT[s] = times[a]!;
    else if (n === 2) medianT[s] = (times[a]! + times[a + 1]!) / 2;
    else {
      // insertion sort: n is at most the number of profiles
      for (let i = a + 1; i < a + n; i++) {
        const v = times[i]!;
        let j = i - 1;
        while (j >= a && times[j]! > v) {
          times[j + 1] = times[j]!;
          j--;
        }
        times[j + 1] = v;
      }
      const mid = a + (n >>> 1);
      medianT[s] = n % 2 === 1 ? times[mid]! : (times[mid - 1]! + times[mid]!) / 2;
    }
  }

  // rank: bucket by instances (descending, a counting sort that keeps slot order), then sort
  // each bucket by median first touch; slots ascend with indices, so they break ties by index.
  // When every median is a multiple of 0.5 ms (recorded times are whole ms) the key
  // (2·median, slot) packs exactly into one double and a native sort does it; else a comparator.
  const order = new Uint32Array(u);
  let maxMedian = 0;
  let packable = true;
  for (let s = 0; s < u; s++) {
    const m = medianT[s]!;
    if (!Number.isInteger(m * 2)) packable = false;
    if (m > maxMedian) maxMedian = m;
  }
  packable &&= (2 * maxMedian + 1) * u < 2 ** 53;
  const sortByMedian = (slots: Uint32Array) => {
    if (slots.length < 2) return;
    if (!packable) {
      slots.sort((x, y) => medianT[x]! - medianT[y]! || x - y);
      return;
    }
    const keys = new Float64Array(slots.length);
    for (let k = 0; k < slots.length; k++) keys[k] = medianT[slots[k]!]! * 2 * u + slots[k]!;
    keys.sort();
    for (let k = 0; k < slots.length; k++) slots[k] = keys[k]! % u;
  };
  if (!hotspots) {
    for (let s = 0; s < u; s++) order[s] = s;
    sortByMedian(order);
  } else {
    const start = new Uint32Array(maxInstances + 2);
    for (let s = 0; s < u; s++) start[maxInstances - instances[s]! + 1]!++;
    for (let b = 1; b <= maxInstances + 1; b++) start[b] = start[b]! + start[b - 1]!;
    const at = start.slice();
    for (let s = 0; s < u; s++) order[at[maxInstances - instances[s]!]!++] = s;
    for (let b = 0; b <= maxInstances; b++) sortByMedian(order.subarray(start[b], start[b + 1]));
  }
  return { index, instances, medianT, order };
}

/** One ordered prefetch plan from the profiles of a family, bounded by budgetBytes. */
export function planPrefetch(input: PlanInput): Plan {
  const { chunkSize, chunkCount, profiles, budgetBytes, chunkBytes, skip } = input;
  if (!Number.isSafeInteger(chunkCount) || chunkCount < 0) throw new RangeError(`chunkCount ${chunkCount} must be a non-negative integer`);
  if (!(budgetBytes >= 0)) throw new RangeError(`budgetBytes ${budgetBytes} must be a number ≥ 0`);
  const r = rank(profiles, chunkSize, chunkCount, input.hotspots ?? true);
  const chunks: number[] = [];
  let bytes = 0;
  let truncated = false;
  for (const s of r.order) {
    const i = r.index[s]!;
    if (skip?.(i)) continue;
    const b = chunkBytes ? chunkBytes(i) : chunkSize;
    if (!(b >= 0) || !Number.isFinite(b)) throw new RangeError(`chunkBytes(${i}) returned ${b}; it must be a finite number ≥ 0`);
    if (bytes + b > budgetBytes) {
      truncated = true;
      break;
    }
    bytes += b;
    chunks.push(i);
  }
  return { chunks, bytes, truncated, instances: profiles.length };
}

/** The hot-spot table of a family: every chunk the profiles touched, ranked as planPrefetch
 *  ranks them. chunkCount defaults to the largest volume among the profiles. */
export function mergeProfiles(profiles: readonly Profile[], opts: { chunkCount?: number; hotspots?: boolean } = {}): HotSpots {
  const chunkSize = profiles[0]?.chunkSize ?? 0;
  const chunkCount = opts.chunkCount ?? profiles.reduce((m, p) => Math.max(m, Math.ceil(p.size / p.chunkSize)), 0);
  const r = rank(profiles, chunkSize, chunkCount, opts.hotspots ?? true);
  const chunks = new Array<HotChunk>(r.order.length);
  for (const [k, s] of r.order.entries()) chunks[k] = { index: r.index[s]!, instances: r.instances[s]!, medianT: r.medianT[s]! };
  return { chunkSize, instances: profiles.length, chunks };
}
