// Prometheus metrics of the local role (chunks served to peers), in the shared registry.
import { Counter, Gauge, Histogram } from 'prom-client';
import { registry } from '../../metrics/registry.js';

export interface LocalMetrics {
  chunks: Counter<'kind' | 'class'>;
  bytes: Counter<'kind'>;
  rawBytes: Counter<string>;
  groupPushed: Counter<string>;
  overtaken: Histogram<string>;
}

let metrics: LocalMetrics | undefined;

export function localMetrics(): LocalMetrics {
  metrics ??= {
    chunks: new Counter({ name: 'spillway_local_chunks_sent_total', help: 'Chunks sent to peers, by answer kind (data, sig, zero) and priority class (0 demand .. 3 hydration)', labelNames: ['kind', 'class'], registers: [registry] }),
    bytes: new Counter({ name: 'spillway_local_link_bytes_sent_total', help: 'Frame bytes of chunk answers sent to peers, by kind', labelNames: ['kind'], registers: [registry] }),
    rawBytes: new Counter({ name: 'spillway_local_chunk_raw_bytes_total', help: 'Uncompressed bytes of the chunks answered', registers: [registry] }),
    groupPushed: new Counter({ name: 'spillway_local_group_pushed_total', help: 'Chunks queued unasked because another chunk of their file was fetched (group push)', registers: [registry] }),
    overtaken: new Histogram({ name: 'spillway_local_demand_overtaken_frames', help: 'Lower-class chunk frames sent while one demand chunk waited to be sent (strict priority keeps this at most the chunks already prepared)', buckets: [0, 1, 2, 4, 8, 16, 64, 256], registers: [registry] }),
  };
  return metrics;
}

/** Write-back at the origin (the applier, applier.ts). */
export interface ApplierMetrics {
  epochs: Counter<'volume'>;
  bytes: Counter<'volume'>;
  batches: Counter<'volume' | 'status'>;
  applySeconds: Histogram<string>;
  appliedSeq: Gauge<'volume'>;
}

let applier: ApplierMetrics | undefined;

export function applierMetrics(): ApplierMetrics {
  applier ??= {
    epochs: new Counter({ name: 'spillway_origin_epochs_applied_total', help: 'Epochs applied to the origin disk', labelNames: ['volume'], registers: [registry] }),
    bytes: new Counter({ name: 'spillway_origin_bytes_applied_total', help: 'Bytes (data and zeroed ranges) applied to the origin disk', labelNames: ['volume'], registers: [registry] }),
    batches: new Counter({ name: 'spillway_origin_batches_total', help: 'Batches of epochs received, by outcome (applied, duplicate, gap, corrupt, io, not-owner)', labelNames: ['volume', 'status'], registers: [registry] }),
    applySeconds: new Histogram({ name: 'spillway_origin_apply_seconds', help: 'Time from a batch\'s COMMIT to its applied record (apply, flush, record)', buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60], registers: [registry] }),
    appliedSeq: new Gauge({ name: 'spillway_origin_applied_seq', help: 'Last epoch the origin disk holds, of the journal that owns the volume', labelNames: ['volume'], registers: [registry] }),
  };
  return applier;
}
