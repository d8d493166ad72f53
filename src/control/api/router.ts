// Routes of the management API: a method, a path template ("/v1/hosts/{name}"), who may call
// it, the zod schemas of its parameters, query, body and answers (checked at run time and
// turned into the OpenAPI document), and a handler.

import type http from 'node:http';
import type { z } from 'zod';

import type { Logger } from '../../log/logger.js';
import type { JsonObject, Role, TokenRecord } from '../types.js';

export type Method = 'GET' | 'PUT' | 'POST' | 'DELETE';

export interface Reply {
  status: number;
  /** serialised as JSON (unless `text` is given). */
  body?: unknown;
  text?: string;
  contentType?: string;
  headers?: Record<string, string>;
}

/** What a handler returns when it wrote the answer itself (the events stream). */
export const STREAMED = Symbol('streamed');

export interface RouteContext<Q = Record<string, unknown>, B = unknown> {
  req: http.IncomingMessage;
  res: http.ServerResponse;
  params: Record<string, string>;
  query: Q;
  body: B;
  /** null only on routes with auth 'none'. */
  token: TokenRecord | null;
  /** the audit name of the caller: the token's name. */
  actor: string;
  requestId: string;
  log: Logger;
  /** What the audit entry of this (mutating) request says; handlers fill in target and detail. */
  audit: { action?: string; target?: string; detail: JsonObject };
}

export interface ResponseSpec {
  description: string;
  schema?: z.ZodType;
  /** default application/json */
  contentType?: string;
  /** other media types the same status may carry (e.g. text/event-stream) */
  also?: Array<{ contentType: string; schema?: z.ZodType }>;
}

export interface Route<Q extends z.ZodType = z.ZodType, B extends z.ZodType = z.ZodType> {
  method: Method;
  /** a template: literal segments and {param} segments */
  path: string;
  summary: string;
  description?: string;
  tag: string;
  /** 'none': no token; 'viewer': any token; 'operator': an operator token. */
  auth: 'none' | Role;
  params?: Record<string, z.ZodType<string>>;
  query?: Q;
  /** request headers worth documenting (e.g. Last-Event-ID) */
  headerParams?: Array<{ name: string; description: string }>;
  body?: B;
  responses: Record<number, ResponseSpec>;
  /** the audit action of a mutating route (handlers may refine it, e.g. host.create/host.update). */
  audit?: string;
  /** the engine writes the audit entry of a successful request itself (with the token's name
   *  as actor); the API then audits only refused ones */
  engineAudits?: boolean;
  handler(ctx: RouteContext<z.output<Q>, z.output<B>>): Promise<Reply | typeof STREAMED>;
}

/** Type a route with its own schemas, then keep it in a list of routes. */
export function route<Q extends z.ZodType, B extends z.ZodType>(r: Route<Q, B>): Route {
  return r as unknown as Route;
}

interface Compiled {
  route: Route;
  segments: string[];
}

export type Match = { kind: 'found'; route: Route; params: Record<string, string> } | { kind: 'method'; allow: Method[] } | { kind: 'none'; nearby: string[] };

export class Router {
  private readonly compiled: Compiled[];

  constructor(readonly routes: Route[]) {
    this.compiled = routes.map((r) => ({ route: r, segments: r.path.split('/').slice(1) }));
    const seen = new Set<string>();
    for (const r of routes) {
      const key = `${r.method} ${r.path.replace(/\{[^}]+\}/g, '{}')}`;
      if (seen.has(key)) throw new Error(`two routes for ${r.method} ${r.path}`);
      seen.add(key);
    }
  }

  /** `segments` are the decoded path segments of the request (path split on "/", first dropped). */
  match(method: string, segments: string[]): Match {
    const allow: Method[] = [];
    let best: { c: Compiled; params: Record<string, string>; literal: number } | null = null;
    for (const c of this.compiled) {
      if (c.segments.length !== segments.length) continue;
      const params: Record<string, string> = {};
      let literal = 0;
      let ok = true;
      for (let i = 0; i < segments.length && ok; i++) {
        const t = c.segments[i]!;
        if (t.startsWith('{')) params[t.slice(1, -1)] = segments[i]!;
        else if (t === segments[i]) literal++;
        else ok = false;
      }
      if (!ok) continue;
      if (c.route.method !== method) {
        if (!allow.includes(c.route.method)) allow.push(c.route.method);
        continue;
      }
      // "/v1/workflows/{id}" and a literal sibling: the most literal template wins.
      if (!best || literal > best.literal) best = { c, params, literal };
    }
    if (best) return { kind: 'found', route: best.c.route, params: best.params };
    if (allow.length) return { kind: 'method', allow };
    return { kind: 'none', nearby: this.nearby(segments) };
  }

  /** Up to 4 routes whose paths look like the one asked for, "METHOD /path". */
  private nearby(segments: string[]): string[] {
    const asked = '/' + segments.join('/');
    const scored = this.compiled.map((c) => {
      // compare with the template filled with the request's own segments where it has params
      const filled = '/' + c.segments.map((t, i) => (t.startsWith('{') && segments[i] !== undefined ? segments[i] : t)).join('/');
      return { label: `${c.route.method} ${c.route.path}`, d: levenshtein(asked, filled) / Math.max(asked.length, filled.length, 1) };
    });
    scored.sort((a, b) => a.d - b.d || a.label.localeCompare(b.label));
    const close = scored.filter((s) => s.d <= 0.5).slice(0, 4);
    return (close.length ? close : scored.slice(0, 4)).map((s) => s.label);
  }
}

function levenshtein(a: string, b: string): number {
  if (a.length > 300 || b.length > 300) return Math.max(a.length, b.length);
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) cur[j] = Math.min(prev[j]! + 1, cur[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    prev = cur;
  }
  return prev[b.length]!;
}
