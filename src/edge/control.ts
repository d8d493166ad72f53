// The edge's control socket: HTTP with JSON bodies on a UNIX socket in the state directory
// (mode 0600 inside a 0700 directory, so only the edge's user can reach it). `spillway volume`
// talks to it. Routes:
//   GET  /v1/status                      the edge's status (volumes, peers, write-back)
//   POST /v1/volumes/NAME/drain          seal, ship every epoch, wait for the origin; answers
//                                        the volume's write-back status when done

import { chmod, rm } from 'node:fs/promises';
import http from 'node:http';

import type { Logger } from '../log/logger.js';
import type { EdgeStatus, VolumeWriteStatus } from './edge.js';

export interface ControlTarget {
  status(): EdgeStatus;
  drain(volume: string, signal?: AbortSignal): Promise<VolumeWriteStatus>;
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
    if (req.method === 'GET' && url.pathname === '/v1/status') return reply(200, edge.status());
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
    reply(404, { error: `no route ${req.method} ${url.pathname} (try GET /v1/status or POST /v1/volumes/NAME/drain)` });
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
