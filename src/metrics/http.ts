// Prometheus text exposition of the metrics registry over HTTP (GET /metrics).

import http from 'node:http';
import type { Registry } from 'prom-client';
import { registry as defaultRegistry } from './registry.js';

export interface MetricsServer {
  url: string;
  close(): Promise<void>;
}

/** `address` is HOST:PORT or just PORT (then 127.0.0.1). Port 0 picks a free port. */
export async function startMetricsServer(address: string, reg: Registry = defaultRegistry): Promise<MetricsServer> {
  const m = /^(?:\[?([^\]]*)\]?:)?(\d+)$/.exec(address);
  if (!m) throw new Error(`metrics address "${address}" is not HOST:PORT or PORT`);
  const host = m[1] || '127.0.0.1';
  const port = Number(m[2]);
  const srv = http.createServer((req, res) => {
    if (req.method === 'GET' && (req.url === '/metrics' || req.url?.startsWith('/metrics?'))) {
      reg
        .metrics()
        .then((text) => {
          res.writeHead(200, { 'content-type': reg.contentType });
          res.end(text);
        })
        .catch((err: unknown) => {
          res.writeHead(500, { 'content-type': 'text/plain' });
          res.end(String(err));
        });
      return;
    }
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found: metrics are at /metrics\n');
  });
  await new Promise<void>((resolve, reject) => {
    srv.once('error', reject);
    srv.listen(port, host, () => resolve());
  });
  const addr = srv.address();
  const actual = typeof addr === 'object' && addr ? addr.port : port;
  return {
    url: `http://${host.includes(':') ? `[${host}]` : host}:${actual}/metrics`,
    close: () => new Promise<void>((r) => srv.close(() => r())),
  };
}
