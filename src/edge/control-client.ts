// The client side of an edge's control socket (src/edge/control.ts): HTTP with JSON bodies on
// the UNIX socket STATE/control.sock. Used by the CLI (src/cli/control-client.ts) and by the
// management service (src/control/edges.ts).

import http from 'node:http';

/** One request; `body` (if given) is sent as JSON. Resolves with any status; the answer must be JSON. */
export function call(socket: string, method: string, url: string, body?: unknown): Promise<{ status: number; body: unknown }> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const headers = payload ? { 'content-type': 'application/json', 'content-length': String(payload.length) } : undefined;
    const req = http.request({ socketPath: socket, method, path: url, headers }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => {
        try {
          resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) as unknown });
        } catch {
          reject(new Error(`the edge answered something that is not JSON: ${text.slice(0, 200)}`));
        }
      });
    });
    req.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') reject(new Error(`no edge is listening on ${socket} (is \`spillway edge\` running with that state directory?)`));
      else reject(err);
    });
    req.end(payload);
  });
}

/** The body of a 2xx answer; otherwise an Error with the edge's `{error}` message. */
export function expectOk<T>(r: { status: number; body: unknown }): T {
  if (r.status >= 200 && r.status < 300) return r.body as T;
  const msg = (r.body as { error?: unknown } | null)?.error;
  throw new Error(typeof msg === 'string' ? msg : `the edge answered ${r.status}`);
}
