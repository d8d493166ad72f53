// Prometheus metrics of write-back, in the shared registry. Remote side: what the guest wrote,
// by policy; epochs sealed, shipped and acknowledged; bytes shipped after coalescing; unshipped
// bytes and RPO lag per volume (read from the shippers when scraped); ship round trips.
import { Counter, Gauge, Histogram } from 'prom-client';
import { registry } from '../metrics/registry.js';

/** A volume's live figures, read at scrape time. */
export interface WritebackSource {
  volume: string;
  unshippedBytes(): number;
  rpoLagSeconds(): number;
  coalescingRatio(): number;
}

const sources = new Set<WritebackSource>();

export function registerWritebackSource(s: WritebackSource): () => void {
  sources.add(s);
  return () => sources.delete(s);
}

export interface WritebackMetrics {
  guestBytes: Counter<'volume' | 'policy'>;
  epochs: Counter<'volume' | 'event'>;
  epochBytes: Counter<'volume'>;
  shippedBytes: Counter<'volume'>;
  linkBytes: Counter<'volume'>;
  batches: Counter<'volume' | 'status'>;
  shipSeconds: Histogram<'volume'>;
}

let metrics: WritebackMetrics | undefined;

export function writebackMetrics(): WritebackMetrics {
  if (metrics) return metrics;
  new Gauge({
    name: 'spillway_writeback_unshipped_bytes',
    help: 'Bytes written to origin-policy ranges and not yet acknowledged by the origin (unsealed and sealed epochs)',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      this.reset();
      for (const s of sources) this.set({ volume: s.volume }, s.unshippedBytes());
    },
  });
  new Gauge({
    name: 'spillway_writeback_rpo_lag_seconds',
    help: 'Age of the oldest sealed epoch the origin has not acknowledged yet (0 when all are): the data a site loss would cost now',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      this.reset();
      for (const s of sources) this.set({ volume: s.volume }, s.rpoLagSeconds());
    },
  });
  new Gauge({
    name: 'spillway_writeback_coalescing_ratio',
    help: 'Bytes the guest wrote into shipped epochs divided by bytes shipped after coalescing (higher is better; 1 = no overlap)',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      this.reset();
      for (const s of sources) this.set({ volume: s.volume }, s.coalescingRatio());
    },
  });
  metrics = {
    guestBytes: new Counter({ name: 'spillway_writeback_guest_bytes_total', help: 'Bytes written, zeroed or trimmed by the guest, by volume and write policy', labelNames: ['volume', 'policy'], registers: [registry] }),
    epochs: new Counter({ name: 'spillway_writeback_epochs_total', help: 'Epochs by event: sealed (durable in the journal), shipped (sent in a batch), acked (applied by the origin)', labelNames: ['volume', 'event'], registers: [registry] }),
    epochBytes: new Counter({ name: 'spillway_writeback_epoch_bytes_total', help: 'Bytes in sealed epochs after coalescing within each epoch', labelNames: ['volume'], registers: [registry] }),
    shippedBytes: new Counter({ name: 'spillway_writeback_shipped_bytes_total', help: 'Extent bytes shipped to the origin after coalescing across the epochs of a batch', labelNames: ['volume'], registers: [registry] }),
    linkBytes: new Counter({ name: 'spillway_writeback_link_bytes_total', help: 'Bytes of EPOCH_DATA frames sent on the link (after compression), counted as each frame is sent', labelNames: ['volume'], registers: [registry] }),
    batches: new Counter({ name: 'spillway_writeback_batches_total', help: 'Batches sent to the origin, by the status of its answer (applied, duplicate, gap, corrupt, io, not-owner, lost)', labelNames: ['volume', 'status'], registers: [registry] }),
    shipSeconds: new Histogram({ name: 'spillway_writeback_ship_seconds', help: 'Time from sending a batch to the origin acknowledging it', labelNames: ['volume'], buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60], registers: [registry] }),
  };
  return metrics;
}
