// Metrics of the secure cache, registered once in the process-wide registry
// (src/metrics/registry.ts). The read-path counters are shared by every tier: this module
// counts tier="cache"; the read path counts tier="local" and tier="link" into the same objects.

import { Counter, Gauge } from 'prom-client';
import { registry } from '../metrics/registry.js';

export const READ_TIERS = ['cache', 'local', 'link'] as const;
export type ReadTier = (typeof READ_TIERS)[number];

const registers = [registry];

/** Chunks served by a tier of the read path. */
export const readHits = new Counter({
  name: 'spillway_read_hits_total',
  help: 'Chunks a read-path tier served (cache, local, link)',
  labelNames: ['tier'] as const,
  registers,
});

/** Chunks a tier of the read path could not serve (the next tier is asked). */
export const readMisses = new Counter({
  name: 'spillway_read_misses_total',
  help: 'Chunks a read-path tier could not serve (cache, local, link)',
  labelNames: ['tier'] as const,
  registers,
});

export const CACHE_MISS_REASONS = ['absent', 'nokey', 'corrupt'] as const;
export type CacheMissReason = (typeof CACHE_MISS_REASONS)[number];

export const cacheMisses = new Counter({
  name: 'spillway_cache_misses_by_reason_total',
  help: 'Secure cache misses: absent (not cached), nokey (family key not delivered), corrupt (failed authentication; dropped)',
  labelNames: ['reason'] as const,
  registers,
});

export const cacheEvictions = new Counter({
  name: 'spillway_cache_evictions_total',
  help: 'Blobs evicted by the replacement policy (SLRU)',
  registers,
});

export const cachePuts = new Counter({
  name: 'spillway_cache_puts_total',
  help: 'Blobs stored (content already present is not counted)',
  registers,
});

export const cacheBytes = new Counter({
  name: 'spillway_cache_bytes_total',
  help: 'Plaintext bytes through the secure cache, by direction (read: served, written: stored)',
  labelNames: ['direction'] as const,
  registers,
});

export const cacheCompactions = new Counter({
  name: 'spillway_cache_slots_moved_total',
  help: 'Blobs moved to lower slots to shorten slab files (after a shrink or mixed slot sizes)',
  registers,
});

/** What an open cache reports to the gauges below, read when the registry is scraped. */
export interface CacheGaugeSource {
  readonly dir: string;
  gaugeSample(): { slabBytes: number; indexBytes: number; maxBytes: number; probation: number; protected: number };
}

/** Open caches; each adds itself on open and removes itself on close. */
export const cacheGaugeSources = new Set<CacheGaugeSource>();

export const cacheDiskBytes = new Gauge({
  name: 'spillway_cache_disk_bytes',
  help: 'Bytes the cache files span on disk, by kind (slab: blob slots; index: log and snapshot)',
  labelNames: ['dir', 'kind'] as const,
  registers,
  collect() {
    this.reset();
    for (const c of cacheGaugeSources) {
      const s = c.gaugeSample();
      this.set({ dir: c.dir, kind: 'slab' }, s.slabBytes);
      this.set({ dir: c.dir, kind: 'index' }, s.indexBytes);
    }
  },
});

export const cacheMaxBytes = new Gauge({
  name: 'spillway_cache_max_bytes',
  help: 'Configured size limit of the blob slabs',
  labelNames: ['dir'] as const,
  registers,
  collect() {
    this.reset();
    for (const c of cacheGaugeSources) this.set({ dir: c.dir }, c.gaugeSample().maxBytes);
  },
});

export const cacheBlobs = new Gauge({
  name: 'spillway_cache_blobs',
  help: 'Blobs stored, by SLRU segment',
  labelNames: ['dir', 'segment'] as const,
  registers,
  collect() {
    this.reset();
    for (const c of cacheGaugeSources) {
      const s = c.gaugeSample();
      this.set({ dir: c.dir, segment: 'probation' }, s.probation);
      this.set({ dir: c.dir, segment: 'protected' }, s.protected);
    }
  },
});
