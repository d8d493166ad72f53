// Prometheus metrics of the management API: requests by route template and status, their
// durations, open event streams, and workflows by state and kind (counted from the store at
// scrape time). Each API instance has its own registry; GET /metrics serves it merged with the
// process-wide one (src/metrics/registry.ts).

import { Counter, Gauge, Histogram, Registry } from 'prom-client';

import { registry as processRegistry } from '../../metrics/registry.js';
import type { Store, WorkflowEngine } from '../types.js';
import { WORKFLOW_STATES } from './schemas.js';

export interface ApiMetrics {
  registry: Registry;
  requests: Counter<'method' | 'route' | 'status'>;
  duration: Histogram<'method' | 'route'>;
  /** Prometheus text of this API's metrics and the process's. */
  text(): Promise<{ contentType: string; body: string }>;
}

export function apiMetrics(store: Store, engine: WorkflowEngine, openStreams: () => number): ApiMetrics {
  const registry = new Registry();
  const requests = new Counter({ name: 'spillway_api_requests_total', help: 'Management API requests, by method, route template and status', labelNames: ['method', 'route', 'status'], registers: [registry] });
  const duration = new Histogram({
    name: 'spillway_api_request_duration_seconds',
    help: 'Management API request durations (event streams: until the stream is set up), by method and route template',
    labelNames: ['method', 'route'],
    buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5],
    registers: [registry],
  });
  new Gauge({
    name: 'spillway_api_event_streams',
    help: 'Workflow event streams (SSE) open now',
    registers: [registry],
    collect() {
      this.set(openStreams());
    },
  });
  new Gauge({
    name: 'spillway_workflows',
    help: 'Workflows in the store, by state and kind',
    labelNames: ['state', 'kind'],
    registers: [registry],
    async collect() {
      this.reset();
      const kinds = engine.kinds();
      for (const state of WORKFLOW_STATES) for (const kind of kinds) this.set({ state, kind }, 0);
      for (const w of await store.listWorkflows({ limit: 1_000_000 })) this.inc({ state: w.state, kind: w.kind });
    },
  });
  return {
    registry,
    requests,
    duration,
    async text() {
      const merged = Registry.merge([registry, processRegistry]);
      return { contentType: merged.contentType, body: await merged.metrics() };
    },
  };
}
