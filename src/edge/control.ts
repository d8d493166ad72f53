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
//   GET  /v1/profiles                    saved profiles
//   GET  /v1/profiles/NAME[?files=1]     one profile (with its ranges mapped to files)
//   DELETE /v1/profiles/NAME

import { chmod, rm } from 'node:fs/promises';
import http from 'node:http';

import { z } from 'zod';

import type { HydrationStatus } from '../hydrate/hydrator.js';
import type { Logger } from '../log/logger.js';
import type { Profile, ProfileSummary } from '../prefetch/profile.js';
import type { EdgeStatus, VolumeWriteStatus } from './edge.js';
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
}

const MAX_BODY = 64 * 1024;
const recordBody = z.strictObject({ name: z.string(), forMs: z.number().positive().optional(), idleMs: z.number().positive().optional() });
const prefetchBody = z.strictObject({ profiles: z.array(z.string()).min(1), hotspots: z.boolean().optional(), budget: z.number().int().positive().optional() });
const hydrateBody = z.strictObject({ action: z.enum(['pause', 'resume']).optional(), rate: z.union([z.number().nonnegative(), z.string()]).optional() });

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
    const answer = (work: () => Promise<unknown>) => {
      work().then(
        (body) => reply(200, body),
        (err: Error & { status?: number }) => reply(err.status ?? 500, { error: err.message }),
      );
    };
    if (req.method === 'GET' && url.pathname === '/v1/status') return reply(200, edge.status());
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
    reply(404, { error: `no route ${req.method} ${url.pathname} (routes: GET /v1/status, POST /v1/volumes/NAME/drain|profile/record|profile/stop|hydrate|prefetch, GET|DELETE /v1/profiles[/NAME])` });
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
