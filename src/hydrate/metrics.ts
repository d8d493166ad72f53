// Prometheus metrics of hydration, in the shared registry: counters moved by the landing path
// and the hydrator, gauges read from every running Hydrator when the registry is scraped.
import { Counter, Gauge } from 'prom-client';
import { registry } from '../metrics/registry.js';

export const HYDRATION_STATES = ['running', 'paused', 'complete', 'error', 'stopped'] as const;
export type HydrationStateName = (typeof HYDRATION_STATES)[number];

/** What a hydrator reports to the gauges, read at scrape time. */
export interface HydrationGaugeSource {
  readonly volume: string;
  gaugeSample(): { state: HydrationStateName; doneChunks: number; totalChunks: number; doneBytes: number; totalBytes: number; etaSeconds: number | null; ratePerSecond: number };
}

/** Hydrators add themselves on start and remove themselves on stop. */
export const hydrationGaugeSources = new Set<HydrationGaugeSource>();

export interface HydrateMetrics {
  /** chunks written into hydrated volumes, by how they came (demand read or hydrator). */
  chunks: Counter<'volume' | 'via'>;
  bytes: Counter<'volume' | 'via'>;
  /** chunk fetches the hydrator sent to its source, and those that failed. */
  fetches: Counter<'volume'>;
  fetchErrors: Counter<'volume'>;
  done: Gauge<'volume' | 'unit'>;
  total: Gauge<'volume' | 'unit'>;
  state: Gauge<'volume' | 'state'>;
  eta: Gauge<'volume'>;
  rate: Gauge<'volume'>;
}

let metrics: HydrateMetrics | undefined;

export function hydrateMetrics(): HydrateMetrics {
  metrics ??= {
    chunks: new Counter({ name: 'spillway_hydrate_chunks_landed_total', help: 'Chunks written into hydrated volumes, by volume and how they came (demand: a guest read; hydration: the background copier)', labelNames: ['volume', 'via'], registers: [registry] }),
    bytes: new Counter({ name: 'spillway_hydrate_bytes_landed_total', help: 'Bytes of chunks written into hydrated volumes (zero chunks count their length), by volume and how they came', labelNames: ['volume', 'via'], registers: [registry] }),
    fetches: new Counter({ name: 'spillway_hydrate_fetches_total', help: 'Chunk fetches the hydrator sent to its source (hydration priority)', labelNames: ['volume'], registers: [registry] }),
    fetchErrors: new Counter({ name: 'spillway_hydrate_fetch_errors_total', help: 'Hydrator fetches that failed and were retried after a backoff', labelNames: ['volume'], registers: [registry] }),
    done: new Gauge({
      name: 'spillway_hydrate_done',
      help: 'Chunks / bytes of the volume already in the hydrated copy',
      labelNames: ['volume', 'unit'],
      registers: [registry],
      collect() {
        this.reset();
        for (const s of hydrationGaugeSources) {
          const g = s.gaugeSample();
          this.set({ volume: s.volume, unit: 'chunks' }, g.doneChunks);
          this.set({ volume: s.volume, unit: 'bytes' }, g.doneBytes);
        }
      },
    }),
    total: new Gauge({
      name: 'spillway_hydrate_total',
      help: 'Chunks / bytes of the volume being hydrated',
      labelNames: ['volume', 'unit'],
      registers: [registry],
      collect() {
        this.reset();
        for (const s of hydrationGaugeSources) {
          const g = s.gaugeSample();
          this.set({ volume: s.volume, unit: 'chunks' }, g.totalChunks);
          this.set({ volume: s.volume, unit: 'bytes' }, g.totalBytes);
        }
      },
    }),
    state: new Gauge({
      name: 'spillway_hydrate_state',
      help: 'Hydrator state: 1 for the current one (running, paused, complete, error, stopped), 0 for the others',
      labelNames: ['volume', 'state'],
      registers: [registry],
      collect() {
        this.reset();
        for (const s of hydrationGaugeSources) {
          const now = s.gaugeSample().state;
          for (const st of HYDRATION_STATES) this.set({ volume: s.volume, state: st }, st === now ? 1 : 0);
        }
      },
    }),
    eta: new Gauge({
      name: 'spillway_hydrate_eta_seconds',
      help: 'Estimated seconds until the hydrated copy is complete (-1 while unknown)',
      labelNames: ['volume'],
      registers: [registry],
      collect() {
        this.reset();
        for (const s of hydrationGaugeSources) this.set({ volume: s.volume }, s.gaugeSample().etaSeconds ?? -1);
      },
    }),
    rate: new Gauge({
      name: 'spillway_hydrate_rate_bytes_per_second',
      help: 'Smoothed rate at which chunks land in the hydrated copy (both ways)',
      labelNames: ['volume'],
      registers: [registry],
      collect() {
        this.reset();
        for (const s of hydrationGaugeSources) this.set({ volume: s.volume }, s.gaugeSample().ratePerSecond);
      },
    }),
  };
  return metrics;
}
