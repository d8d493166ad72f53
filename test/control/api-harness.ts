// For the API and CLI tests: the real management API on a free port, over the real SQLite store
// (a temp file) and the real Engine, with tiny test workflows registered under real kinds:
//   transfer     prepare → copy (progress 0.25 .. 1) → finish, about 0.3 s
//   detach       one step that fails on its first attempt and succeeds when retried
//   resize-edge  one step that runs until cancelled (or input.ms), with an undo
//   reverse      one step that always fails
// plus an extra route that throws (a 500 must not crash anything). Also an SSE reader.

import http from 'node:http';
import path from 'node:path';

import { bootstrapToken, createToken, route, startApi, type ApiServer } from '../../src/control/api/index.js';
import { openStore } from '../../src/control/db/index.js';
import { Engine } from '../../src/control/engine/index.js';
import type { Logger } from '../../src/log/logger.js';
import { InvalidInputError, type JsonObject, type Store, type WorkflowDef, type WorkflowEvent } from '../../src/control/types.js';
import { tempDir } from '../helpers/proc.js';

export interface Harness {
  url: string;
  store: Store;
  engine: Engine;
  /** bearer secrets */
  operator: string;
  viewer: string;
  logs: Array<{ level: string; msg: string; fields?: Record<string, unknown> }>;
  dir: string;
  close(): Promise<void>;
}

const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener(
      'abort',
      () => {
        clearTimeout(t);
        reject(signal.reason as Error);
      },
      { once: true },
    );
  });

function needInstance(input: unknown): JsonObject {
  const i = input as JsonObject | null;
  if (!i || typeof i.instance !== 'string') throw new InvalidInputError('input.instance: expected an instance name');
  return i;
}

export function testWorkflows(): WorkflowDef[] {
  return [
    {
      kind: 'transfer',
      target: (i) => String(i.instance),
      validate: needInstance,
      steps: () => [
        { name: 'prepare', run: async () => sleep(20).then(() => ({ prepared: true })) },
        {
          name: 'copy',
          run: async (ctx) => {
            for (const f of [0.25, 0.5, 0.75, 1]) {
              await sleep(40, ctx.signal);
              ctx.progress(f, `copied ${f * 100}%`, { bytes: f * 1024 });
            }
            return { bytes: 1024 };
          },
        },
        { name: 'finish', run: async () => sleep(20) },
      ],
    },
    {
      kind: 'detach',
      target: (i) => String(i.instance),
      validate: needInstance,
      steps: () => [
        {
          name: 'flaky',
          run: async (ctx) => {
            if (ctx.attempt === 1) throw new Error('the origin did not answer (first attempt)');
            return { attempt: ctx.attempt };
          },
        },
      ],
    },
    {
      kind: 'reverse',
      target: (i) => String(i.instance),
      validate: needInstance,
      steps: () => [
        {
          name: 'doomed',
          run: async () => {
            throw new Error('always fails');
          },
        },
      ],
    },
    {
      kind: 'resize-edge',
      target: (i) => String(i.edge),
      validate: (input) => {
        const i = input as JsonObject | null;
        if (!i || typeof i.edge !== 'string') throw new InvalidInputError('input.edge: expected an edge name');
        return i;
      },
      steps: (input) => [
        { name: 'note', run: async () => ({ edge: String(input.edge) }), undo: async () => undefined },
        {
          name: 'grow',
          run: async (ctx) => {
            const ms = typeof input.ms === 'number' ? input.ms : 60_000;
            ctx.progress(0, 'growing');
            await sleep(ms, ctx.signal);
            return { grown: true };
          },
          undo: async (ctx) => ctx.progress(1, 'shrunk back'),
        },
      ],
    },
  ];
}

export async function startHarness(o: { heartbeatMs?: number } = {}): Promise<Harness> {
  const tmp = await tempDir('spw-api-');
  const store = await openStore(`sqlite:${path.join(tmp.dir, 'control.db')}`);
  const logs: Harness['logs'] = [];
  const log = ((level: string, msg: string, fields?: Record<string, unknown>) => void logs.push({ level, msg, fields })) as Logger;
  log.child = () => log;
  const engine = new Engine({ store, log, progressIntervalMs: 0, scanIntervalMs: 0, pollMs: 200 });
  for (const d of testWorkflows()) engine.register(d);
  const boom = route({
    method: 'GET',
    path: '/v1/test/boom',
    tag: 'Test',
    summary: 'throws',
    auth: 'viewer',
    responses: { 200: { description: 'never' } },
    handler: async () => {
      throw new Error('kaboom: an unexpected bug');
    },
  });
  let api: ApiServer;
  try {
    api = await startApi({ listen: '127.0.0.1:0', store, engine, version: '0.0.0-test', log, extraRoutes: [boom], heartbeatMs: o.heartbeatMs ?? 15000 });
  } catch (e) {
    await store.close();
    throw e;
  }
  await engine.resumeAll();
  const operator = (await bootstrapToken(store, 'root', 'operator')).secret;
  const viewer = (await createToken(store, 'reader', 'viewer')).secret;
  return {
    url: api.url,
    store,
    engine,
    operator,
    viewer,
    logs,
    dir: tmp.dir,
    close: async () => {
      await api.close();
      await engine.stop(2000);
      await store.close();
      await tmp.cleanup();
    },
  };
}

export interface Answer<T = unknown> {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: T;
  text: string;
}

/** One request with node:http (so bodies and headers are exactly what we say). */
export function request<T = unknown>(base: string, method: string, p: string, o: { token?: string; body?: unknown; raw?: string | Buffer; headers?: Record<string, string>; timeoutMs?: number } = {}): Promise<Answer<T>> {
  return new Promise((resolve, reject) => {
    const payload = o.raw !== undefined ? Buffer.from(o.raw) : o.body !== undefined ? Buffer.from(JSON.stringify(o.body)) : undefined;
    const headers: Record<string, string> = { ...(payload ? { 'content-type': 'application/json', 'content-length': String(payload.length) } : {}), ...(o.token ? { authorization: `Bearer ${o.token}` } : {}), ...o.headers };
    const req = http.request(base + p, { method, headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let body: unknown = undefined;
        if (/json/.test(String(res.headers['content-type'])) && text) body = JSON.parse(text);
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: body as T, text });
      });
      res.on('error', reject);
    });
    req.setTimeout(o.timeoutMs ?? 10000, () => req.destroy(new Error(`${method} ${p}: no answer within ${o.timeoutMs ?? 10000} ms`)));
    req.on('error', reject);
    req.end(payload);
  });
}

export interface SseResult {
  status: number;
  headers: http.IncomingHttpHeaders;
  events: WorkflowEvent[];
  /** the `id:` lines, in order */
  ids: string[];
  comments: string[];
  /** the server ended the stream (rather than our timeout) */
  ended: boolean;
}

/** Read an event stream until the server ends it, or `timeoutMs` (then ended = false). */
export function readSse(base: string, p: string, o: { token: string; lastEventId?: string; timeoutMs?: number; until?: (r: SseResult) => boolean }): Promise<SseResult> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = { authorization: `Bearer ${o.token}`, accept: 'text/event-stream', ...(o.lastEventId !== undefined ? { 'last-event-id': o.lastEventId } : {}) };
    const req = http.get(base + p, { headers, agent: false }, (res) => {
      const r: SseResult = { status: res.statusCode ?? 0, headers: res.headers, events: [], ids: [], comments: [], ended: false };
      let buf = '';
      let data: string[] = [];
      const timer = setTimeout(() => {
        req.destroy();
        resolve(r);
      }, o.timeoutMs ?? 10000);
      res.setEncoding('utf8');
      res.on('data', (d: string) => {
        buf += d;
        let nl: number;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line === '') {
            if (data.length) r.events.push(JSON.parse(data.join('\n')) as WorkflowEvent);
            data = [];
            if (o.until?.(r)) {
              clearTimeout(timer);
              req.destroy();
              resolve(r);
              return;
            }
          } else if (line.startsWith(':')) r.comments.push(line.slice(1).trim());
          else if (line.startsWith('id:')) r.ids.push(line.slice(3).trim());
          else if (line.startsWith('data:')) data.push(line.slice(5).trim());
        }
      });
      res.on('end', () => {
        clearTimeout(timer);
        r.ended = true;
        resolve(r);
      });
      res.on('error', () => undefined);
    });
    req.on('error', (e) => (e.message === 'socket hang up' ? undefined : reject(e)));
  });
}

/** Poll until `fn` returns something truthy. */
export async function until<T>(fn: () => Promise<T | null | undefined | false>, timeoutMs = 10000, what = 'condition'): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
  }
}
