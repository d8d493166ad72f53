// What every workflow step may use, and the lookups they share. Steps are idempotent: each
// one checks where things stand before acting, so running it twice (after a crash of the
// service) converges to the same result.

import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import type { Logger } from '../../log/logger.js';
import type { Compute } from '../compute.js';
import type { EdgeGateway } from '../edges.js';
import { z } from 'zod';

import type { EdgeRecord, Host, Instance, Store, Volume } from '../types.js';
import { InvalidInputError, NotFoundError } from '../types.js';

export interface ControlContext {
  store: Store;
  edges: EdgeGateway;
  compute: Compute;
  /** the service's state directory: config drives, snapshots, hydrated volumes (local provider). */
  dir: string;
  log: Logger;
  /** how long a guest may take from QEMU start to ready (TCG boots are slow). */
  bootTimeoutMs: number;
}

export const name = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/, 'use letters, digits, ".", "_" and "-" (at most 63)');

export function parseInput<T extends z.ZodType>(schema: T, input: unknown): z.infer<T> {
  const r = schema.safeParse(input);
  if (!r.success) throw new InvalidInputError(r.error.issues.map((i) => `${i.path.join('.') || 'input'}: ${i.message}`).join('; '));
  return r.data;
}

export async function instanceOf(c: ControlContext, name: string): Promise<Instance> {
  const i = await c.store.getInstance(name);
  if (!i) throw new NotFoundError(`no instance named ${name} (list them with: spillway inventory instances list)`);
  return i;
}

export async function hostOf(c: ControlContext, name: string): Promise<Host> {
  const h = await c.store.getHost(name);
  if (!h) throw new NotFoundError(`no host named ${name} in the inventory`);
  return h;
}

export async function edgeOf(c: ControlContext, name: string): Promise<EdgeRecord> {
  const e = await c.store.getEdge(name);
  if (!e) throw new NotFoundError(`no edge named ${name} in the inventory`);
  return e;
}

/** The origin site's edge in the local role (the one with a link address). */
export async function originEdge(c: ControlContext, site: string): Promise<EdgeRecord> {
  const edges = await c.store.listEdges(site);
  const e = edges.find((x) => x.link) ?? edges[0];
  if (!e) throw new InvalidInputError(`site ${site} has no edge: register one (spillway inventory edges put NAME --file EDGE.json) before moving its instances`);
  return e;
}

/** The instance's volumes, root first (the inventory keeps them sorted by name; "-root" wins). */
export async function volumesOf(c: ControlContext, instance: string): Promise<Volume[]> {
  const vs = await c.store.listVolumes(instance);
  if (vs.length === 0) throw new InvalidInputError(`instance ${instance} has no volume in the inventory`);
  return [...vs].sort((a, b) => Number(b.name.endsWith('-root')) - Number(a.name.endsWith('-root')) || a.name.localeCompare(b.name));
}

export function nbdUri(edge: EdgeRecord, exportName: string): string {
  if (!edge.nbd) throw new InvalidInputError(`edge ${edge.name} has no storage target address (nbd) in the inventory`);
  const [host, port] = edge.nbd.includes(':') ? [edge.nbd.slice(0, edge.nbd.lastIndexOf(':')), edge.nbd.slice(edge.nbd.lastIndexOf(':') + 1)] : [edge.nbd, '10809'];
  return `nbd://${host || '127.0.0.1'}:${port}/${encodeURIComponent(exportName)}`;
}

export async function subdir(c: ControlContext, ...parts: string[]): Promise<string> {
  const d = path.join(c.dir, ...parts);
  await mkdir(d, { recursive: true, mode: 0o700 });
  return d;
}

/** Poll `fn` until it returns a value (not undefined), with progress, a deadline and the signal. */
export async function poll<T>(what: string, fn: () => Promise<T | undefined>, o: { timeoutMs: number; intervalMs?: number; signal?: AbortSignal }): Promise<T> {
  const deadline = Date.now() + o.timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`${what}: not done after ${Math.round(o.timeoutMs / 1000)} s${last ? ` (last error: ${(last as Error).message})` : ''}`);
    await sleep(o.intervalMs ?? 500, undefined, { signal: o.signal });
  }
}
