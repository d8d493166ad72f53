// The management service's side of an edge's control socket (src/edge/control.ts). Workflows
// add and remove volumes on running edges, drain them, detach hydrated ones and resize caches.
// Every call is idempotent from the workflow's point of view: adding what is there already is
// accepted by the edge, and removing what is gone (404) counts as done.

import { call } from '../edge/control-client.js';
import type { EdgeStatus, RemoteVolumeStatus } from '../edge/edge.js';
import type { EdgeRecord, JsonObject, Store } from './types.js';
import { NotFoundError } from './types.js';

export class EdgeCallError extends Error {
  readonly code = 'SPW_ERR_EDGE';
  constructor(
    readonly edge: string,
    readonly status: number,
    message: string,
  ) {
    super(`edge ${edge}: ${message}`);
    this.name = 'EdgeCallError';
  }
}

export class EdgeGateway {
  constructor(private readonly store: Store) {}

  private async socket(edge: string): Promise<EdgeRecord> {
    const e = await this.store.getEdge(edge);
    if (!e) throw new NotFoundError(`no edge named ${edge} in the inventory`);
    return e;
  }

  private async req<T>(edge: string, method: string, url: string, body?: unknown, accept404 = false): Promise<T | null> {
    const e = await this.socket(edge);
    let r: { status: number; body: unknown };
    try {
      r = await call(e.control, method, url, body);
    } catch (err) {
      throw new EdgeCallError(edge, 0, (err as Error).message);
    }
    if (r.status === 404 && accept404) return null;
    if (r.status >= 200 && r.status < 300) return r.body as T;
    const msg = (r.body as { error?: unknown } | null)?.error;
    throw new EdgeCallError(edge, r.status, typeof msg === 'string' ? msg : `answered ${r.status} to ${method} ${url}`);
  }

  status(edge: string): Promise<EdgeStatus> {
    return this.req<EdgeStatus>(edge, 'GET', '/v1/status') as Promise<EdgeStatus>;
  }

  async remoteStatus(edge: string, volume: string): Promise<RemoteVolumeStatus | undefined> {
    return (await this.status(edge)).remote.find((r) => r.volume === volume);
  }

  addVolume(edge: string, spec: JsonObject): Promise<unknown> {
    return this.req(edge, 'POST', '/v1/volumes', spec);
  }

  /** Remove a volume; an absent one counts as removed (null). */
  removeVolume(edge: string, name: string, o: { drain?: boolean; discard?: boolean; force?: boolean } = {}): Promise<unknown> {
    const q = new URLSearchParams();
    if (o.drain) q.set('drain', '1');
    if (o.discard) q.set('discard', '1');
    if (o.force) q.set('force', '1');
    const qs = q.size > 0 ? `?${q.toString()}` : '';
    return this.req(edge, 'DELETE', `/v1/volumes/${encodeURIComponent(name)}${qs}`, undefined, true);
  }

  drain(edge: string, name: string): Promise<unknown> {
    return this.req(edge, 'POST', `/v1/volumes/${encodeURIComponent(name)}/drain`, {});
  }

  /** Flatten a hydrated volume into its file and leave the data path; null when already gone. */
  detach(edge: string, name: string): Promise<{ path: string; size: number; flattenedBytes: number } | null> {
    return this.req(edge, 'POST', `/v1/volumes/${encodeURIComponent(name)}/detach`, {}, true);
  }

  resizeCache(edge: string, size: number): Promise<unknown> {
    return this.req(edge, 'POST', '/v1/cache', { size });
  }

  listProfiles(edge: string): Promise<{ profiles: Array<{ name: string; family: string; volume: string; chunks: number }> }> {
    return this.req(edge, 'GET', '/v1/profiles') as Promise<{ profiles: Array<{ name: string; family: string; volume: string; chunks: number }> }>;
  }

  /** Prometheus text from the edge's metrics listener, or '' when it has none. */
  async metrics(edge: string): Promise<string> {
    const url = (await this.status(edge)).metrics;
    if (!url) return '';
    const r = await fetch(url).catch(() => null);
    return r?.ok ? r.text() : '';
  }
}
