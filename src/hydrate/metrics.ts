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

type Sample = ReturnType<HydrationGaugeSource['gaugeSample']>;

/** A gauge filled at scrape time from every running hydrator's sample. */
function scrapeGauge<L extends string>(name: string, help: string, labelNames: L[], fill: (g: Gauge<L>, volume: string, x: Sample) => void): Gauge<L> {
  return new Gauge<L>({
    name,
    help,
    labelNames,
    registers: [registry],
    collect() {
      this.reset();
      for (const s of hydrationGaugeSources) fill(this, s.volume, s.gaugeSample());
    },
  });
}

export function hydrateMetrics(): HydrateMetrics {
  metrics ??= {
    chunks: new Counter({ name: 'spillway_hydrate_chunks_landed_total', help: 'Chunks written into hydrated volumes, by volume and how they came (demand: a guest read; hydration: the background copier)', labelNames: ['volume', 'via'], registers: [registry] }),
    bytes: new Counter({ name: 'spillway_hydrate_bytes_landed_total', help: 'Bytes of chunks written into hydrated volumes (zero chunks count their length), by volume and how they came', labelNames: ['volume', 'via'], registers: [registry] }),
    fetches: new Counter({ name: 'spillway_hydrate_fetches_total', help: 'Chunk fetches the hydrator sent to its source (hydration priority)', labelNames: ['volume'], registers: [registry] }),
    fetchErrors: new Counter({ name: 'spillway_hydrate_fetch_errors_total', help: 'Hydrator fetches that failed and were retried after a backoff', labelNames: ['volume'], registers: [registry] }),
    done: scrapeGauge('spillway_hydrate_done', 'Chunks / bytes of the volume already in the hydrated copy', ['volume', 'unit'], (g, v, x) => {
      g.set({ volume: v, unit: 'chunks' }, x.doneChunks);
      g.set({ volume: v, unit: 'bytes' }, x.doneBytes);
    }),
    total: scrapeGauge('spillway_hydrate_total', 'Chunks / bytes of the volume being hydrated', ['volume', 'unit'], (g, v, x) => {
      g.set({ volume: v, unit: 'chunks' }, x.totalChunks);
      g.set({ volume: v, unit: 'bytes' }, x.totalBytes);
    }),
    state: scrapeGauge('spillway_hydrate_state', 'Hydrator state: 1 for the current one (running, paused, complete, error, stopped), 0 for the others', ['volume', 'state'], (g, v, x) => {
      for (const st of HYDRATION_STATES) g.set({ volume: v, state: st }, st === x.state ? 1 : 0);
    }),
    eta: scrapeGauge('spillway_hydrate_eta_seconds', 'Estimated seconds until the hydrated copy is complete (-1 while unknown)', ['volume'], (g, v, x) => g.set({ volume: v }, x.etaSeconds ?? -1)),
    rate: scrapeGauge('spillway_hydrate_rate_bytes_per_second', 'Smoothed rate at which chunks land in the hydrated copy (both ways)', ['volume'], (g, v, x) => g.set({ volume: v }, x.ratePerSecond)),
  };
  return metrics;
}
