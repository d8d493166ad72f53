// Prometheus metrics of the remote role (the read path and its link fetches), in the shared
// registry.
import { Counter } from 'prom-client';
import { registry } from '../../metrics/registry.js';

export interface RemoteMetrics {
  /** chunk reads by the tier that answered: cache, local, link. */
  reads: Counter<'volume' | 'tier'>;
  received: Counter<'kind'>;
  coalesced: Counter<string>;
  readahead: Counter<string>;
  timeouts: Counter<string>;
  corrupt: Counter<string>;
  resent: Counter<string>;
  pushRefused: Counter<string>;
}

let metrics: RemoteMetrics | undefined;

export function remoteMetrics(): RemoteMetrics {
  metrics ??= {
    reads: new Counter({ name: 'spillway_remote_chunk_reads_total', help: 'Chunk reads of the read path, by volume and the tier that answered (cache, local, link)', labelNames: ['volume', 'tier'], registers: [registry] }),
    received: new Counter({ name: 'spillway_remote_chunks_received_total', help: 'Chunks received over the link, by kind (data, pushed, signature, zero)', labelNames: ['kind'], registers: [registry] }),
    coalesced: new Counter({ name: 'spillway_remote_fetches_coalesced_total', help: 'Reads that joined a fetch already in flight for the same chunk', registers: [registry] }),
    readahead: new Counter({ name: 'spillway_remote_readahead_chunks_total', help: 'Chunks asked for ahead of sequential reads', registers: [registry] }),
    timeouts: new Counter({ name: 'spillway_remote_fetch_timeouts_total', help: 'Reads failed because a chunk did not arrive within the I/O timeout', registers: [registry] }),
    corrupt: new Counter({ name: 'spillway_remote_chunks_corrupt_total', help: 'Chunks refused because they failed decompression or their signature', registers: [registry] }),
    resent: new Counter({ name: 'spillway_remote_fetches_resent_total', help: 'Fetches sent again after a reconnect', registers: [registry] }),
    pushRefused: new Counter({ name: 'spillway_remote_pushes_refused_total', help: 'Pushed chunks dropped because a write to them was shipped after the request that caused the push (I5)', registers: [registry] }),
  };
  return metrics;
}

/** The prefetch plan's score per volume (prefetcher.ts). */
export interface PrefetchMetrics {
  fetched: Counter<'volume'>;
  used: Counter<'volume'>;
  late: Counter<'volume'>;
}

let prefetch: PrefetchMetrics | undefined;

export function prefetchMetrics(): PrefetchMetrics {
  prefetch ??= {
    fetched: new Counter({ name: 'spillway_prefetch_chunks_fetched_total', help: 'Chunks a prefetch plan brought into the cache', labelNames: ['volume'], registers: [registry] }),
    used: new Counter({ name: 'spillway_prefetch_chunks_used_total', help: 'Prefetched chunks the guest then read (hits of the plan)', labelNames: ['volume'], registers: [registry] }),
    late: new Counter({ name: 'spillway_prefetch_chunks_late_total', help: 'Chunks of the plan the guest read while they were still on their way', labelNames: ['volume'], registers: [registry] }),
  };
  return prefetch;
}
