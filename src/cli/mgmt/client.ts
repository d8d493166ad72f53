// The CLI's side of the management API (src/control/api/, docs/api.md): JSON requests with a
// bearer token, errors turned into sentences that say what to do, and the workflow event stream
// (Server-Sent Events) parsed into events.

import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import type { Command } from 'commander';

import type { WorkflowEvent } from '../../control/types.js';

export const DEFAULT_API = 'http://127.0.0.1:7080';

/** The options every management command takes. */
export interface ApiOptions {
  api?: string;
  token?: string;
  json?: boolean;
}

/** Add --api, --token and --json to a command. */
export function withApi(c: Command): Command {
  return c
    .option('--api <url>', `the management service (env SPILLWAY_API, default ${DEFAULT_API})`)
    .option('--token <token>', 'an API token (env SPILLWAY_TOKEN, or a file named by SPILLWAY_TOKEN_FILE)')
    .option('--json', 'machine output: one JSON document (watching: one JSON event per line)');
}

/** An error the CLI prints as is (no stack), then exits 1. */
export class CliError extends Error {
  constructor(
    message: string,
    readonly status?: number,
    readonly code?: string,
  ) {
    super(message);
    this.name = 'CliError';
  }
}

const GET_A_TOKEN =
  'get one from an operator (`spillway token create NAME --role viewer|operator`); the service wrote the first operator token to STATE/operator.token when it first started. Pass it with --token, SPILLWAY_TOKEN or SPILLWAY_TOKEN_FILE';

export function resolveToken(o: ApiOptions): string | undefined {
  if (o.token) return o.token.trim();
  if (process.env.SPILLWAY_TOKEN) return process.env.SPILLWAY_TOKEN.trim();
  const file = process.env.SPILLWAY_TOKEN_FILE;
  if (file) {
    try {
      return readFileSync(file, 'utf8').trim();
    } catch (err) {
      throw new CliError(`cannot read SPILLWAY_TOKEN_FILE ${file}: ${(err as Error).message}`);
    }
  }
  return undefined;
}

export class ApiClient {
  readonly base: string;

  constructor(
    base: string,
    readonly token: string | undefined,
  ) {
    this.base = base.replace(/\/+$/, '');
    if (!/^https?:\/\//.test(this.base)) throw new CliError(`--api must be an http:// or https:// URL, not "${base}"`);
  }

  static from(o: ApiOptions): ApiClient {
    return new ApiClient(o.api ?? process.env.SPILLWAY_API ?? DEFAULT_API, resolveToken(o));
  }

  private headers(extra: Record<string, string> = {}): Record<string, string> {
    return { ...(this.token ? { authorization: `Bearer ${this.token}` } : {}), ...extra };
  }

  /**
   * One HTTP exchange with node:http (no keep-alive: a command's process ends as soon as it is
   * done). Resolves once the answer's headers are in; the body is left to read.
   */
  private send(method: string, path: string, headers: Record<string, string>, body?: string, signal?: AbortSignal): Promise<http.IncomingMessage> {
    const url = new URL(this.base + path);
    const mod = url.protocol === 'https:' ? https : http;
    return new Promise((resolve, reject) => {
      const payload = body === undefined ? undefined : Buffer.from(body);
      const req = mod.request(url, { method, headers: { ...headers, ...(payload ? { 'content-length': String(payload.length) } : {}) }, agent: false, signal }, resolve);
      req.on('error', (err) => reject(err.name === 'AbortError' ? err : this.connectionError(err)));
      req.end(payload);
    });
  }

  private static text(res: http.IncomingMessage): Promise<string> {
    return new Promise((resolve, reject) => {
      let t = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (t += d));
      res.on('end', () => resolve(t));
      res.on('error', reject);
    });
  }

  connectionError(err: unknown): CliError {
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    const code = cause?.code ?? (err as { code?: string }).code;
    if (err instanceof CliError) return err;
    if (code === 'ECONNRESET' || (err as Error).message === 'aborted') return new CliError(`the connection to the management service at ${this.base} was cut`);
    if (code === 'ECONNREFUSED' || code === 'EHOSTUNREACH' || code === 'ENETUNREACH' || code === 'ETIMEDOUT' || code === 'UND_ERR_CONNECT_TIMEOUT') {
      return new CliError(`no management service at ${this.base} (start it with \`spillway service run\`, or point --api / SPILLWAY_API at it)`);
    }
    if (code === 'ENOTFOUND' || code === 'EAI_AGAIN') return new CliError(`cannot resolve the host of ${this.base} (--api / SPILLWAY_API)`);
    return new CliError(`cannot reach the management service at ${this.base}: ${cause?.message ?? (err as Error).message}`);
  }

  /** One JSON request; the parsed answer of a 2xx, else a CliError with the service's message. */
  async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await this.send(method, path, this.headers(body === undefined ? { accept: 'application/json' } : { accept: 'application/json', 'content-type': 'application/json' }), body === undefined ? undefined : JSON.stringify(body));
    const text = await ApiClient.text(res);
    const status = res.statusCode ?? 0;
    if (status >= 200 && status < 300) {
      if (!text) return undefined as T;
      try {
        return JSON.parse(text) as T;
      } catch {
        throw new CliError(`the management service answered something that is not JSON: ${text.slice(0, 200)}`);
      }
    }
    throw this.failure(status, text);
  }

  failure(status: number, text: string): CliError {
    let code: string | undefined;
    let message = text.slice(0, 500) || `HTTP ${status}`;
    try {
      const e = (JSON.parse(text) as { error?: { code?: string; message?: string } }).error;
      if (e?.message) message = e.message;
      code = e?.code;
    } catch {
      // not JSON: keep the text
    }
    if (status === 401) {
      if (!this.token) return new CliError(`no API token given: ${GET_A_TOKEN}`, status, code);
      return new CliError(`the management service refused the token: ${message.replace(/ \(.*\)$/, '')}; ${GET_A_TOKEN}`, status, code);
    }
    if (status === 403) return new CliError(`${message} (ask an operator, or use an operator token)`, status, code);
    return new CliError(message, status, code);
  }

  /**
   * Follow GET /v1/workflows/{id}/events after `after` until the service ends the stream.
   * Resolves 'ended' (the stream closed) or 'nothing' (204: finished, nothing after `after`).
   */
  async events(id: string, after: number, onEvent: (e: WorkflowEvent) => void, signal?: AbortSignal): Promise<'ended' | 'nothing'> {
    const res = await this.send('GET', `/v1/workflows/${encodeURIComponent(id)}/events`, this.headers({ accept: 'text/event-stream', 'last-event-id': String(after) }), undefined, signal);
    if (res.statusCode === 204) {
      res.resume();
      return 'nothing';
    }
    if (res.statusCode !== 200) throw this.failure(res.statusCode ?? 0, await ApiClient.text(res));
    let buf = '';
    let data: string[] = [];
    res.setEncoding('utf8');
    try {
      for await (const chunk of res) {
        buf += chunk as string;
        let nl: number;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl).replace(/\r$/, '');
          buf = buf.slice(nl + 1);
          if (line === '') {
            if (data.length) {
              const e = JSON.parse(data.join('\n')) as WorkflowEvent;
              data = [];
              onEvent(e);
            }
          } else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
          // id:, event:, retry: and comments need nothing: the data carries seq and type
        }
      }
    } catch (err) {
      if ((err as Error).name === 'AbortError' || signal?.aborted) throw err;
      throw this.connectionError(err);
    }
    return 'ended';
  }
}
