// StatsDevice: a pass-through filter that counts what the stack below does (requests, errors,
// bytes, latency histograms per op) into a prom-client Registry, labelled by export name.
// Label children are resolved once in the constructor so the hot path is two increments and
// one observe.

import { performance } from 'node:perf_hooks';
import { Counter, Histogram, type Registry } from 'prom-client';
import { registry as defaultRegistry } from '../metrics/registry.js';
import { FilterDevice, type BlockDevice, type Extent, type IoOptions, type ZeroOptions } from './device.js';

export const STATS_OPS = ['read', 'write', 'flush', 'trim', 'zero', 'block_status', 'cache'] as const;
export type StatsOp = (typeof STATS_OPS)[number];

/** Latency buckets in seconds: 50 µs .. 10 s. */
export const LATENCY_BUCKETS = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
];

type Labels = 'export' | 'op';

interface BlockMetrics {
  readonly ops: Counter<Labels>;
  readonly errors: Counter<Labels>;
  readonly bytes: Counter<Labels>;
  readonly seconds: Histogram<Labels>;
}

const byRegistry = new WeakMap<Registry, BlockMetrics>();

/** The block metrics of a registry, registered on first use (a metric name registers once). */
function metricsOf(registry: Registry): BlockMetrics {
  let m = byRegistry.get(registry);
  if (!m) {
    const labelNames = ['export', 'op'] as const;
    const registers = [registry];
    m = {
      ops: new Counter({ name: 'spillway_block_ops_total', help: 'Block requests completed, by op (including failed ones)', labelNames, registers }),
      errors: new Counter({ name: 'spillway_block_errors_total', help: 'Block requests that failed, by op', labelNames, registers }),
      bytes: new Counter({ name: 'spillway_block_bytes_total', help: 'Bytes read, written, trimmed or zeroed by successful requests', labelNames, registers }),
      seconds: new Histogram({
        name: 'spillway_block_op_seconds',
        help: 'Block request latency in seconds, by op',
        labelNames,
        buckets: LATENCY_BUCKETS,
        registers,
      }),
    };
    byRegistry.set(registry, m);
  }
  return m;
}

interface OpMetrics {
  readonly ops: Counter.Internal;
  readonly errors: Counter.Internal;
  readonly bytes: Counter.Internal;
  readonly seconds: Histogram.Internal<Labels>;
}

export interface StatsOptions {
  /** export name, the `export` label of every series. */
  readonly exportName: string;
  /** default: the process-wide registry of src/metrics/registry.ts. */
  readonly registry?: Registry;
}

export class StatsDevice extends FilterDevice {
  private readonly m: Record<StatsOp, OpMetrics>;
  readonly exportName: string;

  constructor(inner: BlockDevice, opts: StatsOptions) {
    super(inner);
    this.exportName = opts.exportName;
    const metrics = metricsOf(opts.registry ?? defaultRegistry);
    const child = (op: StatsOp): OpMetrics => {
      const labels = { export: opts.exportName, op };
      return {
        ops: metrics.ops.labels(labels),
        errors: metrics.errors.labels(labels),
        bytes: metrics.bytes.labels(labels),
        seconds: metrics.seconds.labels(labels),
      };
    };
    this.m = {
      read: child('read'),
      write: child('write'),
      flush: child('flush'),
      trim: child('trim'),
      zero: child('zero'),
      block_status: child('block_status'),
      cache: child('cache'),
    };
  }

  get description(): string {
    return `stats(${this.inner.description})`;
  }

  override read(offset: number, buf: Buffer, opts?: IoOptions): Promise<void> {
    return measure(this.m.read, buf.length, () => this.inner.read(offset, buf, opts));
  }

  override write(offset: number, data: Buffer, opts?: IoOptions): Promise<void> {
    return measure(this.m.write, data.length, () => this.inner.write(offset, data, opts));
  }

  override flush(opts?: IoOptions): Promise<void> {
    return measure(this.m.flush, 0, () => this.inner.flush(opts));
  }

  override trim(offset: number, length: number, opts?: IoOptions): Promise<void> {
    return measure(this.m.trim, length, () => this.inner.trim(offset, length, opts));
  }

  override writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return measure(this.m.zero, length, () => this.inner.writeZeroes(offset, length, opts));
  }

  override blockStatus(offset: number, length: number, opts?: IoOptions): Promise<Extent[]> {
    return measure(this.m.block_status, 0, () => super.blockStatus(offset, length, opts));
  }

  override cache(offset: number, length: number, opts?: IoOptions): Promise<void> {
    return measure(this.m.cache, 0, () => super.cache(offset, length, opts));
  }
}

/** Times one request and records it; a layer below that throws synchronously counts as a
 *  failed request too. */
async function measure<T>(m: OpMetrics, bytes: number, request: () => Promise<T>): Promise<T> {
  const t0 = performance.now();
  try {
    const r = await request();
    if (bytes > 0) m.bytes.inc(bytes);
    return r;
  } catch (err) {
    m.errors.inc();
    throw err;
  } finally {
    m.ops.inc();
    m.seconds.observe((performance.now() - t0) / 1000);
  }
}
