// The management API as a node:http request listener: route, authenticate, read and check the
// body, run the handler, audit mutating requests, answer JSON. Nothing a client sends can crash
// it: every failure becomes a JSON error, unknown ones a 500 with a request id that is logged.

import { randomBytes } from 'node:crypto';
import http from 'node:http';

import type { Logger } from '../../log/logger.js';
import type { Store, TokenRecord, WorkflowEngine } from '../types.js';
import { authenticate, authorize } from './auth.js';
import { ApiError, locateJsonError, schemaError, toApiError } from './errors.js';
import { apiMetrics } from './metrics.js';
import { openApiDocument } from './openapi.js';
import { route, Router, STREAMED, type Reply, type Route, type RouteContext } from './router.js';
import { adminRoutes } from './routes/admin.js';
import { inventoryRoutes } from './routes/inventory.js';
import { workflowRoutes } from './routes/workflows.js';
import * as S from './schemas.js';

export const MAX_BODY_BYTES = 1024 * 1024;

export interface ApiOptions {
  store: Store;
  engine: WorkflowEngine;
  /** the service's version, in /healthz and the OpenAPI document */
  version: string;
  log: Logger;
  /** more routes (the service's own), served, authenticated and documented like the rest */
  extraRoutes?: Route[];
  /** how often an idle event stream gets a comment line (default 15 s) */
  heartbeatMs?: number;
  /** request body cap (default 1 MiB) */
  maxBodyBytes?: number;
}

export interface ApiHandler extends http.RequestListener {
  readonly routes: Route[];
  /** the OpenAPI 3.1 document (also at GET /openapi.json) */
  openapi(): Record<string, unknown>;
  /** end every open event stream (before closing the server) */
  closeStreams(): void;
}

export function createApi(o: ApiOptions): ApiHandler {
  const { store, engine, log } = o;
  const maxBody = o.maxBodyBytes ?? MAX_BODY_BYTES;
  const openStreams = new Set<http.ServerResponse>();
  const metrics = apiMetrics(store, engine, () => openStreams.size);
  let doc: Record<string, unknown> | undefined;

  const serviceRoutes: Route[] = [
    route({
      method: 'GET',
      path: '/healthz',
      tag: 'Service',
      summary: 'Liveness: the service answers and reaches its store',
      auth: 'none',
      responses: { 200: { description: 'healthy', schema: S.Health } },
      handler: async () => {
        await store.listTokens();
        return { status: 200, body: { status: 'ok', version: o.version, store: store.kind, kinds: engine.kinds() } };
      },
    }),
    route({
      method: 'GET',
      path: '/openapi.json',
      tag: 'Service',
      summary: 'This API as an OpenAPI 3.1 document',
      auth: 'none',
      responses: { 200: { description: 'the document' } },
      handler: async () => ({ status: 200, body: api.openapi() }),
    }),
    route({
      method: 'GET',
      path: '/metrics',
      tag: 'Service',
      summary: 'Prometheus metrics',
      description: 'Requests by route and status, open event streams, workflows by state and kind, and the metrics of the rest of the process. No token needed (counts only, no names).',
      auth: 'none',
      responses: { 200: { description: 'Prometheus text exposition', contentType: 'text/plain' } },
      handler: async () => {
        const m = await metrics.text();
        return { status: 200, text: m.body, contentType: m.contentType };
      },
    }),
  ];

  const routes = [...serviceRoutes, ...inventoryRoutes(store), ...workflowRoutes({ store, engine, log, heartbeatMs: o.heartbeatMs ?? 15000, openStreams }), ...adminRoutes(store), ...(o.extraRoutes ?? [])];
  const router = new Router(routes);

  async function handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const started = performance.now();
    const requestId = randomBytes(6).toString('hex');
    res.setHeader('x-request-id', requestId);
    const method = req.method ?? 'GET';
    const rawUrl = req.url ?? '/';
    let matched: Route | undefined;
    let params: Record<string, string> = {};
    let token: TokenRecord | null = null;
    const audit: RouteContext['audit'] = { detail: {} };
    let reply: Reply | typeof STREAMED;
    let failure: ApiError | undefined;
    try {
      const qi = rawUrl.indexOf('?');
      const pathname = qi >= 0 ? rawUrl.slice(0, qi) : rawUrl;
      const query = new URLSearchParams(qi >= 0 ? rawUrl.slice(qi + 1) : '');
      const segments = pathname.replace(/(.)\/+$/, '$1').split('/').slice(1);
      for (let i = 0; i < segments.length; i++) {
        try {
          segments[i] = decodeURIComponent(segments[i]!);
        } catch {
          throw new ApiError(400, 'SPW_ERR_INVALID', `the path segment "${segments[i]}" is not valid percent-encoding`);
        }
      }
      const m = router.match(method, segments);
      if (m.kind === 'none') {
        throw new ApiError(404, 'SPW_ERR_NOT_FOUND', `no route ${method} ${pathname}${m.nearby.length ? `; routes nearby: ${m.nearby.join(', ')}` : ''} (all of them: GET /openapi.json)`, { nearby: m.nearby });
      }
      if (m.kind === 'method') {
        throw new ApiError(405, 'SPW_ERR_METHOD', `${pathname} does not take ${method}; it takes ${m.allow.join(', ')}`, { allow: m.allow }, { allow: m.allow.join(', ') });
      }
      matched = m.route;
      params = m.params;
      const r = m.route;

      if (r.auth !== 'none') {
        token = await authenticate(store, req.headers.authorization);
        authorize(token, r.auth, `${method} ${r.path}`);
      }
      for (const [k, schema] of Object.entries(r.params ?? {})) {
        const p = schema.safeParse(params[k]);
        if (!p.success) throw new ApiError(400, 'SPW_ERR_INVALID', `the ${k} "${params[k]}" in the path is not valid: ${p.error.issues.map((i) => i.message).join('; ')}`, { issues: [{ path: k, message: p.error.issues[0]?.message ?? 'invalid' }] });
        params[k] = p.data;
      }
      let q: unknown = Object.fromEntries(query);
      if (r.query) {
        const p = r.query.safeParse(q);
        if (!p.success) throw schemaError('the query string', p.error);
        q = p.data;
      }
      let body: unknown = undefined;
      if (r.body) {
        const type = req.headers['content-type'];
        if (type && !/^application\/([\w.+-]*\+)?json\b/i.test(type)) throw new ApiError(415, 'SPW_ERR_UNSUPPORTED_MEDIA', `the request body must be application/json, not ${type}`);
        const raw = (await readBody(req, maxBody)).toString('utf8');
        if (raw.trim() === '') throw new ApiError(400, 'SPW_ERR_INVALID', 'the request body is empty; expected a JSON object');
        let parsed: unknown;
        try {
          parsed = JSON.parse(raw);
        } catch (e) {
          const at = locateJsonError(raw);
          throw new ApiError(400, 'SPW_ERR_INVALID', `the request body is not valid JSON: unexpected ${at.found} at line ${at.line}, column ${at.column} (position ${at.position})`, { ...at, parser: (e as Error).message });
        }
        const p = r.body.safeParse(parsed);
        if (!p.success) throw schemaError('the request body', p.error);
        body = p.data;
      }
      reply = await r.handler({ req, res, params, query: q as Record<string, unknown>, body, token, actor: token?.name ?? 'anonymous', requestId, log, audit });
    } catch (err) {
      failure = toApiError(err) ?? undefined;
      if (!failure) {
        log('error', 'request failed', { requestId, method, url: rawUrl, error: err instanceof Error ? (err.stack ?? err.message) : String(err) });
        failure = new ApiError(500, 'SPW_ERR_INTERNAL', `internal error (request id ${requestId}); the service log has the details`, { requestId });
      }
      reply = { status: failure.status, body: { error: { code: failure.code, message: failure.message, ...(failure.details !== undefined ? { details: failure.details } : {}) } }, headers: failure.headers };
    }

    // Every mutating request a token made is audited, refused ones too, before the answer.
    if (matched && matched.method !== 'GET' && token && !(matched.engineAudits && !failure)) {
      const status = reply === STREAMED ? res.statusCode : reply.status;
      try {
        await store.audit({
          actor: token.name,
          action: audit.action ?? matched.audit ?? `${matched.method} ${matched.path}`,
          target: audit.target ?? params.name ?? params.id ?? '',
          detail: { ...audit.detail, status, requestId, ...(failure ? { error: failure.message } : {}) },
        });
      } catch (err) {
        log('error', 'could not write the audit entry', { requestId, error: err instanceof Error ? err.message : String(err) });
      }
    }

    const label = matched?.path ?? 'unmatched';
    if (reply !== STREAMED) {
      if (res.headersSent) {
        // a streamed handler failed after it began answering: all we can do is end it
        if (!res.writableEnded) res.end();
      } else send(res, reply);
    }
    const status = reply === STREAMED ? res.statusCode : reply.status;
    metrics.requests.inc({ method, route: label, status: String(status) });
    metrics.duration.observe({ method, route: label }, (performance.now() - started) / 1000);
    if (status >= 500 || (method !== 'GET' && token)) log(status >= 500 ? 'error' : 'info', `${method} ${rawUrl} ${status}`, { requestId, actor: token?.name, ms: Math.round(performance.now() - started) });
    else log('debug', `${method} ${rawUrl} ${status}`, { requestId, ms: Math.round(performance.now() - started) });
  }

  const api = ((req: http.IncomingMessage, res: http.ServerResponse) => {
    handle(req, res).catch((err: unknown) => {
      // only a bug in the error path itself gets here
      log('error', 'request handler crashed', { error: err instanceof Error ? (err.stack ?? err.message) : String(err) });
      if (!res.headersSent) res.writeHead(500, { 'content-type': 'application/json; charset=utf-8' });
      if (!res.writableEnded) res.end(JSON.stringify({ error: { code: 'SPW_ERR_INTERNAL', message: 'internal error' } }) + '\n');
    });
  }) as ApiHandler;
  Object.defineProperty(api, 'routes', { value: routes });
  api.openapi = () => (doc ??= openApiDocument(routes, o.version));
  api.closeStreams = () => {
    for (const r of [...openStreams]) r.end();
    openStreams.clear();
  };
  return api;
}

function send(res: http.ServerResponse, r: Reply): void {
  const headers: Record<string, string | number> = { ...r.headers };
  let payload = '';
  if (r.status !== 204 && r.status !== 304) {
    if (r.text !== undefined) {
      payload = r.text;
      headers['content-type'] = r.contentType ?? 'text/plain; charset=utf-8';
    } else if (r.body !== undefined) {
      payload = JSON.stringify(r.body) + '\n';
      headers['content-type'] = 'application/json; charset=utf-8';
    }
    headers['content-length'] = Buffer.byteLength(payload);
  }
  res.writeHead(r.status, headers);
  res.end(payload);
}

/** The request body, at most `limit` bytes (else 413, after reading and dropping the rest). */
function readBody(req: http.IncomingMessage, limit: number): Promise<Buffer> {
  const tooLarge = (headers: Record<string, string> = {}) => new ApiError(413, 'SPW_ERR_TOO_LARGE', `the request body is over ${limit} bytes`, { limit }, headers);
  const declared = Number(req.headers['content-length']);
  // a huge declared body is not read at all; a moderate one is drained so the answer gets through
  if (declared > 16 * limit) return Promise.reject(tooLarge({ connection: 'close' }));
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let over = declared > limit;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > limit) {
        over = true;
        chunks.length = 0;
        if (size > 16 * limit) {
          req.destroy();
          reject(tooLarge());
        }
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => (over ? reject(tooLarge()) : resolve(Buffer.concat(chunks))));
    req.on('error', (err) => reject(new ApiError(400, 'SPW_ERR_INVALID', `the request body could not be read: ${err.message}`)));
  });
}

export interface ApiServer {
  /** http://HOST:PORT */
  url: string;
  server: http.Server;
  close(): Promise<void>;
}

/** Listen on `listen` (HOST:PORT, [V6]:PORT or PORT; port 0 picks a free one). */
export async function startApi(o: ApiOptions & { listen: string }): Promise<ApiServer> {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]*)):(\d{1,5})$|^(\d{1,5})$/.exec(o.listen.trim());
  if (!m) throw new Error(`listen address "${o.listen}" is not HOST:PORT`);
  const host = m[1] ?? (m[2] || (m[4] !== undefined ? '127.0.0.1' : '0.0.0.0'));
  const port = Number(m[3] ?? m[4]);
  if (port > 65535) throw new Error(`port ${port} is above 65535`);
  const api = createApi(o);
  const server = http.createServer(api);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const addr = server.address();
  const actual = typeof addr === 'object' && addr ? addr.port : port;
  const shown = host === '0.0.0.0' ? '127.0.0.1' : host === '::' ? '::1' : host;
  return {
    url: `http://${shown.includes(':') ? `[${shown}]` : shown}:${actual}`,
    server,
    close: () =>
      new Promise<void>((resolve) => {
        api.closeStreams();
        server.close(() => resolve());
        server.closeIdleConnections();
        setTimeout(() => server.closeAllConnections(), 2000).unref();
      }),
  };
}
