// Prometheus metrics of the local role (chunks served to peers), in the shared registry.
import { Counter } from 'prom-client';
import { registry } from '../../metrics/registry.js';

export interface LocalMetrics {
  chunks: Counter<'kind' | 'class'>;
  bytes: Counter<'kind'>;
  rawBytes: Counter<string>;
}

let metrics: LocalMetrics | undefined;

export function localMetrics(): LocalMetrics {
  metrics ??= {
    chunks: new Counter({ name: 'spillway_local_chunks_sent_total', help: 'Chunks sent to peers, by answer kind (data, sig, zero) and priority class (0 demand .. 3 hydration)', labelNames: ['kind', 'class'], registers: [registry] }),
    bytes: new Counter({ name: 'spillway_local_link_bytes_sent_total', help: 'Frame bytes of chunk answers sent to peers, by kind', labelNames: ['kind'], registers: [registry] }),
    rawBytes: new Counter({ name: 'spillway_local_chunk_raw_bytes_total', help: 'Uncompressed bytes of the chunks answered', registers: [registry] }),
  };
  return metrics;
}
