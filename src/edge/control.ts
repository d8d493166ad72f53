// The edge's control socket: HTTP with JSON bodies on a UNIX socket in the state directory
// (mode 0600 inside a 0700 directory, so only the edge's user can reach it). `spillway volume`
// talks to it. Routes:
//   GET  /v1/status                      the edge's status (volumes, peers, write-back)
//   POST /v1/volumes/NAME/drain          seal, ship every epoch, wait for the origin; answers
//                                        the volume's write-back status when done
//   POST /v1/volumes/NAME/profile/record {name, forMs?, idleMs?}: record a profile of reads
//   POST /v1/volumes/NAME/profile/stop   stop recording and save it
//   POST /v1/volumes/NAME/hydrate        {action?: pause|resume, rate?}: steer hydration
//   POST /v1/volumes/NAME/prefetch       {profiles, hotspots?, budget?}: stream a plan now
//   POST /v1/volumes                     one volume entry of the configuration schema: add it
//                                        while running (201 created, 200 already there, same spec)
//   DELETE /v1/volumes/NAME[?drain=1&force=1&discard=1&role=local|remote]
//                                        remove a volume added while running (404: absent)
//   POST /v1/volumes/NAME/detach[?drain=1] flatten a hydrated volume into its file and remove it
//   POST /v1/cache                       {size}: resize the cache while running
//   GET  /v1/profiles                    saved profiles
//   GET  /v1/profiles/NAME[?files=1]     one profile (with its ranges mapped to files)
//   DELETE /v1/profiles/NAME

import { chmod, rm } from 'node:fs/promises';
import http from 'node:http';

import { z } from 'zod';

import { isValidName, parseSize } from './config.js';

import type { HydrationStatus } from '../hydrate/hydrator.js';
import type { Logger } from '../log/logger.js';
import type { Profile, ProfileSummary } from '../prefetch/profile.js';
import type { AddVolumeResult, CacheStatus, EdgeStatus, RemoveVolumeOptions, RemoveVolumeResult, VolumeWriteStatus } from './edge.js';
import type { DetachResult } from './volume-store.js';
import type { RecordingStatus } from './remote/profiles.js';
import type { PrefetchStatus } from './remote/prefetcher.js';

export interface ControlTarget {
  status(): EdgeStatus;
  drain(volume: string, signal?: AbortSignal): Promise<VolumeWriteStatus>;
  startRecording(volume: string, o: { name: string; forMs?: number; idleMs?: number }): RecordingStatus;
  stopRecording(volume: string): Promise<ProfileSummary>;
  listProfiles(): Promise<ProfileSummary[]>;
  getProfile(name: string, withFiles: boolean): Promise<{ profile: Profile; files?: Array<{ t: number; path: string; offset: number; length: number }> }>;
  deleteProfile(name: string): Promise<void>;
  hydrate(volume: string, o: { action?: 'pause' | 'resume'; rate?: number | string }): HydrationStatus;
  prefetch(volume: string, o: { profiles: string[]; hotspots?: boolean; budget?: number }): Promise<PrefetchStatus>;
  addVolume(spec: unknown): Promise<AddVolumeResult>;
  removeVolume(name: string, o: RemoveVolumeOptions): Promise<RemoveVolumeResult>;
  detachVolume(name: string, o: { drain?: boolean; signal?: AbortSignal }): Promise<DetachResult>;
  resizeCache(maxBytes: number): Promise<CacheStatus>;
}

const MAX_BODY = 64 * 1024;
const recordBody = z.strictObject({ name: z.string(), forMs: z.number().positive().optional(), idleMs: z.number().positive().optional() });
const prefetchBody = z.strictObject({ profiles: z.array(z.string()).min(1), hotspots: z.boolean().optional(), budget: z.number().int().positive().optional() });
const hydrateBody = z.strictObject({ action: z.enum(['pause', 'resume']).optional(), rate: z.union([z.number().nonnegative(), z.string()]).optional() });
const anyJson = z.unknown();
const emptyBody = z.strictObject({});
const cacheBody = z.strictObject({
  size: z.union([z.number().int().positive(), z.string()]).transform((v, ctx) => {
    try {
      return parseSize(v);
    } catch (e) {
      ctx.addIssue({ code: 'custom', message: (e as Error).message });
      return z.NEVER;
    }
  }),
});

/** Query flags of a route: `?drain=1`; anything not listed is refused (a typo would be ignored). */
function queryOf(url: URL, flags: readonly string[], values: Record<string, readonly string[]> = {}): Record<string, string | boolean> {
  const out: Record<string, string | boolean> = {};
  for (const [k, v] of url.searchParams) {
    if (flags.includes(k)) {
      if (['', '1', 'true', 'yes'].includes(v)) out[k] = true;
      else if (['0', 'false', 'no'].includes(v)) out[k] = false;
      else throw new EdgeRequestError(400, `?${k}= takes 1 or 0, not "${v}"`);
    } else if (values[k]) {
      if (!values[k].includes(v)) throw new EdgeRequestError(400, `?${k}= takes ${values[k].join(' or ')}, not "${v}"`);
      out[k] = v;
    } else {
      throw new EdgeRequestError(400, `unknown query parameter "${k}" (this route takes ${[...flags, ...Object.keys(values)].map((f) => `?${f}=`).join(', ') || 'none'})`);
    }
  }
  return out;
}

function volumeName(raw: string): string {
  let name: string;
  try {
    name = decodeURIComponent(raw);
  } catch {
    throw new EdgeRequestError(400, `"${raw}" is not a URL-encoded volume name`);
  }
  if (!isValidName(name)) throw new EdgeRequestError(400, `"${name}" is not a volume name (letters, digits, ".", "_" and "-", at most 63)`);
  return name;
}

/** A control request that cannot be served, with the HTTP status to answer. */
export class EdgeRequestError extends Error {
  readonly code = 'SPW_ERR_EDGE_REQUEST';
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = 'EdgeRequestError';
  }
}


function readBody<T>(req: http.IncomingMessage, schema: z.ZodType<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    let text = '';
    req.setEncoding('utf8');
    req.on('data', (d: string) => {
      text += d;
      if (text.length > MAX_BODY) {
        reject(new EdgeRequestError(400, `the request body is larger than ${MAX_BODY} bytes`));
        req.destroy();
      }
    });
    req.on('end', () => {
      let raw: unknown;
      try {
        raw = text.trim() === '' ? {} : JSON.parse(text);
      } catch {
        reject(new EdgeRequestError(400, 'the request body is not JSON'));
        return;
      }
      const r = schema.safeParse(raw);
      if (r.success) resolve(r.data);
      else reject(new EdgeRequestError(400, `bad request body: ${r.error.issues.map((i) => `${i.path.join('.') || '(body)'}: ${i.message}`).join('; ')}`));
    });
    req.on('error', reject);
  });
}

export interface ControlServer {
  path: string;
  close(): Promise<void>;
}

export async function startControlServer(socketPath: string, edge: ControlTarget, log: Logger): Promise<ControlServer> {
  await rm(socketPath, { force: true });
  const server = http.createServer((req, res) => {
    const reply = (status: number, body: unknown) => {
      if (res.headersSent) return;
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body) + '\n');
    };
    const url = new URL(req.url ?? '/', 'http://edge');
    const drain = /^\/v1\/volumes\/([^/]+)\/drain$/.exec(url.pathname);
    const answer = (work: () => Promise<unknown>, status: (body: unknown) => number = () => 200) => {
      let p: Promise<unknown>;
      try {
        p = work();
      } catch (err) {
        p = Promise.reject(err as Error);
      }
      p.then(
        (body) => reply(status(body), body),
        (err: Error & { status?: number }) => reply(err.status ?? 500, { error: err.message }),
      );
    };
    /** aborted when the client goes away (long work: drain, detach). */
    const clientGone = (): AbortSignal => {
      const ac = new AbortController();
      res.on('close', () => !res.writableEnded && ac.abort(new Error('the client went away')));
      return ac.signal;
    };
    if (req.method === 'GET' && url.pathname === '/v1/status') return reply(200, edge.status());
    if (url.pathname === '/v1/volumes' && req.method === 'POST') {
      return answer(
        async () => {
          queryOf(url, []);
          const r = await edge.addVolume(await readBody(req, anyJson));
          return { ...r.status, role: r.role, created: r.created };
        },
        (b) => ((b as { created?: boolean }).created ? 201 : 200),
      );
    }
    if (url.pathname === '/v1/cache' && req.method === 'POST') return answer(async () => ({ cache: await edge.resizeCache((await readBody(req, cacheBody)).size) }));
    const one = /^\/v1\/volumes\/([^/]+)$/.exec(url.pathname);
    if (one && req.method === 'DELETE') {
      const signal = clientGone();
      return answer(async () => {
        const name = volumeName(one[1]!);
        const q = queryOf(url, ['drain', 'force', 'discard'], { role: ['local', 'remote'] });
        return edge.removeVolume(name, { drain: q.drain === true, force: q.force === true, discard: q.discard === true, role: q.role as 'local' | 'remote' | undefined, signal });
      });
    }
    const det = /^\/v1\/volumes\/([^/]+)\/detach$/.exec(url.pathname);
    if (det && req.method === 'POST') {
      const signal = clientGone();
      return answer(async () => {
        const name = volumeName(det[1]!);
        const q = queryOf(url, ['drain']);
        await readBody(req, emptyBody);
        return edge.detachVolume(name, { drain: q.drain === true, signal });
      });
    }
    const vol = /^\/v1\/volumes\/([^/]+)\/(profile\/record|profile\/stop|hydrate|prefetch)$/.exec(url.pathname);
    if (req.method === 'POST' && vol) {
      const volume = decodeURIComponent(vol[1]!);
      if (vol[2] === 'profile/record') return answer(async () => ({ recording: edge.startRecording(volume, await readBody(req, recordBody)) }));
      if (vol[2] === 'profile/stop') return answer(async () => ({ profile: await edge.stopRecording(volume) }));
      if (vol[2] === 'prefetch') return answer(async () => ({ prefetch: await edge.prefetch(volume, await readBody(req, prefetchBody)) }));
      return answer(async () => ({ hydration: edge.hydrate(volume, await readBody(req, hydrateBody)) }));
    }
    if (req.method === 'GET' && url.pathname === '/v1/profiles') return answer(async () => ({ profiles: await edge.listProfiles() }));
    const prof = /^\/v1\/profiles\/([^/]+)$/.exec(url.pathname);
    if (prof && req.method === 'GET') return answer(() => edge.getProfile(decodeURIComponent(prof[1]!), url.searchParams.get('files') === '1'));
    if (prof && req.method === 'DELETE') {
      const name = decodeURIComponent(prof[1]!);
      return answer(async () => {
        await edge.deleteProfile(name);
        return { deleted: name };
      });
    }
    if (req.method === 'POST' && drain) {
      const volume = decodeURIComponent(drain[1]!);
      const ac = new AbortController();
      res.on('close', () => ac.abort(new Error('the client went away')));
      const started = Date.now();
      edge.drain(volume, ac.signal).then(
        (status) => {
          log('info', 'volume drained', { volume, ms: Date.now() - started });
          reply(200, status);
        },
        (err: Error & { status?: number }) => reply(err.status ?? 500, { error: err.message }),
      );
      return;
    }
    reply(404, { error: `no route ${req.method} ${url.pathname} (routes: GET /v1/status, POST /v1/volumes, DELETE /v1/volumes/NAME, POST /v1/volumes/NAME/drain|detach|profile/record|profile/stop|hydrate|prefetch, POST /v1/cache, GET|DELETE /v1/profiles[/NAME])` });
  });
  server.requestTimeout = 0;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => {
      server.off('error', reject);
      resolve();
    });
  });
  await chmod(socketPath, 0o600);
  return {
    path: socketPath,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
