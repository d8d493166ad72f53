// /v1/sites, /v1/edges, /v1/hosts, /v1/instances, /v1/volumes, /v1/profiles: list, get, PUT
// (upsert by name) and DELETE. Writes check references (a host's site and edge must exist) and
// deletes check dependants (a site with hosts stays) and unfinished workflows (409).

import { randomBytes } from 'node:crypto';
import type { z } from 'zod';

import type { EdgeRecord, Host, Instance, JsonObject, ProfileRecord, Site, Store, Volume, Workflow } from '../../types.js';
import { ApiError } from '../errors.js';
import { route, type Route } from '../router.js';
import * as S from '../schemas.js';

const UNFINISHED = ['pending', 'running', 'failed', 'cancelling', 'rolling-back'] as const;

/** Workflows that are not finished (failed ones count: a retry or a cancel still acts). */
export async function unfinishedWorkflows(store: Store): Promise<Workflow[]> {
  const lists = await Promise.all(UNFINISHED.map((state) => store.listWorkflows({ state, limit: 100000 })));
  return lists.flat();
}

type Singular = 'site' | 'edge' | 'host' | 'instance' | 'volume' | 'profile';

/** Does `w` act on the resource `name` of this kind (as its target or through its input)? */
function touches(w: Workflow, singular: Singular, name: string): boolean {
  if (singular === 'instance' && w.kind !== 'resize-edge' && w.target === name) return true;
  if (singular === 'edge' && w.kind === 'resize-edge' && w.target === name) return true;
  if (w.input[singular] === name) return true;
  // a clone names the instance it creates
  return singular === 'instance' && w.kind === 'clone' && w.input.name === name;
}

interface Resource<R extends { name: string }, P> {
  plural: string;
  singular: Singular;
  title: string;
  record: z.ZodType;
  list: z.ZodType;
  put: z.ZodType<P>;
  filter: z.ZodObject;
  filterDescription?: string;
  get(store: Store, name: string): Promise<R | null>;
  all(store: Store, q: Record<string, string | undefined>): Promise<R[]>;
  save(store: Store, name: string, body: P, existing: R | null): Promise<R>;
  remove(store: Store, name: string): Promise<boolean>;
  /** references of `body` that do not exist: messages, with the path in the body. */
  missing(store: Store, body: P): Promise<Array<{ path: string; message: string }>>;
  /** records that still refer to `name` (the delete is refused while there are any). */
  dependants(store: Store, name: string, rec: R): Promise<string[]>;
  /** also busy when a workflow acts on this (e.g. a volume's instance) */
  busyVia?(rec: R): Array<[Singular, string]>;
}

function resource<R extends { name: string }, P>(r: Resource<R, P>): Resource<{ name: string }, unknown> {
  return r as unknown as Resource<{ name: string }, unknown>;
}

async function need(ok: Promise<unknown>, path: string, message: string): Promise<{ path: string; message: string } | null> {
  return (await ok) ? null : { path, message };
}
function compact<T>(xs: Array<T | null>): T[] {
  return xs.filter((x): x is T => x !== null);
}
function named(kind: string, names: string[]): string | null {
  if (names.length === 0) return null;
  const shown = names.slice(0, 5).map((n) => `"${n}"`).join(', ');
  return `${kind} ${shown}${names.length > 5 ? ` and ${names.length - 5} more` : ''}`;
}

const RESOURCES = [
  resource<Site, z.output<typeof S.SitePut>>({
    plural: 'sites',
    singular: 'site',
    title: 'Sites',
    record: S.SiteRecord,
    list: S.SiteList,
    put: S.SitePut,
    filter: S.NoQuery,
    get: (s, n) => s.getSite(n),
    all: (s) => s.listSites(),
    save: (s, name, b) => s.putSite({ name, kind: b.kind, region: b.region, tags: b.tags }),
    remove: (s, n) => s.deleteSite(n),
    missing: async () => [],
    dependants: async (s, name) =>
      compact([
        named('edges', (await s.listEdges(name)).map((e) => e.name)),
        named('hosts', (await s.listHosts(name)).map((h) => h.name)),
        named('instances (origin)', (await s.listInstances()).filter((i) => i.origin === name).map((i) => i.name)),
      ]),
  }),
  resource<EdgeRecord, z.output<typeof S.EdgePut>>({
    plural: 'edges',
    singular: 'edge',
    title: 'Edges',
    record: S.EdgeRecordSchema,
    list: S.EdgeList,
    put: S.EdgePut,
    filter: S.SiteFilter,
    filterDescription: '?site= lists the edges of one site',
    get: (s, n) => s.getEdge(n),
    all: (s, q) => s.listEdges(q.site),
    save: (s, name, b) => s.putEdge({ name, site: b.site, control: b.control, nbd: b.nbd, link: b.link, cacheBytes: b.cacheBytes }),
    remove: (s, n) => s.deleteEdge(n),
    missing: async (s, b) => compact([await need(s.getSite(b.site), 'site', `site "${b.site}" does not exist (PUT /v1/sites/${b.site} first)`)]),
    dependants: async (s, name) => compact([named('hosts', (await s.listHosts()).filter((h) => h.edge === name).map((h) => h.name))]),
  }),
  resource<Host, z.output<typeof S.HostPut>>({
    plural: 'hosts',
    singular: 'host',
    title: 'Hosts',
    record: S.HostRecord,
    list: S.HostList,
    put: S.HostPut,
    filter: S.SiteFilter,
    filterDescription: '?site= lists the hosts of one site',
    get: (s, n) => s.getHost(n),
    all: (s, q) => s.listHosts(q.site),
    save: (s, name, b) => s.putHost({ name, site: b.site, provider: b.provider, vcpus: b.vcpus, ramMiB: b.ramMiB, iops: b.iops, pricePerHour: b.pricePerHour, licences: b.licences, tags: b.tags, ha: b.ha, edge: b.edge, state: b.state }),
    remove: (s, n) => s.deleteHost(n),
    missing: async (s, b) =>
      compact([
        await need(s.getSite(b.site), 'site', `site "${b.site}" does not exist (PUT /v1/sites/${b.site} first)`),
        await need(s.getEdge(b.edge), 'edge', `edge "${b.edge}" does not exist (PUT /v1/edges/${b.edge} first)`),
      ]),
    dependants: async (s, name) => compact([named('instances running there', (await s.listInstances()).filter((i) => i.host === name).map((i) => i.name))]),
  }),
  resource<Instance, z.output<typeof S.InstancePut>>({
    plural: 'instances',
    singular: 'instance',
    title: 'Instances',
    record: S.InstanceRecord,
    list: S.InstanceList,
    put: S.InstancePut,
    filter: S.NoQuery,
    get: (s, n) => s.getInstance(n),
    all: (s) => s.listInstances(),
    save: (s, name, b, existing) =>
      s.putInstance({
        name,
        kind: b.kind,
        origin: b.origin,
        host: b.host,
        state: b.state,
        placement: b.placement,
        spec: b.spec,
        needs: b.needs,
        identity: b.identity ?? existing?.identity ?? { hostname: name, machineId: randomBytes(16).toString('hex') },
        ...(b.cloneOf !== undefined ? { cloneOf: b.cloneOf } : {}),
      }),
    remove: (s, n) => s.deleteInstance(n),
    missing: async (s, b) =>
      compact([
        await need(s.getSite(b.origin), 'origin', `site "${b.origin}" does not exist (PUT /v1/sites/${b.origin} first)`),
        b.host === null ? null : await need(s.getHost(b.host), 'host', `host "${b.host}" does not exist (PUT /v1/hosts/${b.host} first)`),
      ]),
    dependants: async (s, name) => compact([named('volumes', (await s.listVolumes(name)).map((v) => v.name))]),
  }),
  resource<Volume, z.output<typeof S.VolumePut>>({
    plural: 'volumes',
    singular: 'volume',
    title: 'Volumes',
    record: S.VolumeRecord,
    list: S.VolumeList,
    put: S.VolumePut,
    filter: S.InstanceFilter,
    filterDescription: '?instance= lists the volumes of one instance',
    get: (s, n) => s.getVolume(n),
    all: (s, q) => s.listVolumes(q.instance),
    save: (s, name, b) => s.putVolume({ name, instance: b.instance, path: b.path, sizeBytes: b.sizeBytes, family: b.family, policy: b.policy, hydratedPath: b.hydratedPath }),
    remove: (s, n) => s.deleteVolume(n),
    missing: async (s, b) => compact([await need(s.getInstance(b.instance), 'instance', `instance "${b.instance}" does not exist (PUT /v1/instances/${b.instance} first)`)]),
    dependants: async () => [],
    busyVia: (v) => [['instance', v.instance]],
  }),
  resource<ProfileRecord, z.output<typeof S.ProfilePut>>({
    plural: 'profiles',
    singular: 'profile',
    title: 'Profiles',
    record: S.ProfileRecordSchema,
    list: S.ProfileList,
    put: S.ProfilePut,
    filter: S.FamilyFilter,
    filterDescription: '?family= lists the profiles of one volume family',
    get: async (s, n) => (await s.listProfiles()).find((p) => p.name === n) ?? null,
    all: (s, q) => s.listProfiles(q.family),
    save: (s, name, b) => s.putProfile({ name, family: b.family, volume: b.volume, chunks: b.chunks }),
    remove: (s, n) => s.deleteProfile(n),
    missing: async (s, b) => compact([await need(s.getVolume(b.volume), 'volume', `volume "${b.volume}" does not exist (PUT /v1/volumes/${b.volume} first)`)]),
    dependants: async () => [],
  }),
];

export const INVENTORY = RESOURCES.map((r) => ({ plural: r.plural, singular: r.singular }));

const nameParam = { name: S.Name };
const a = (word: string) => (/^[aeiou]/.test(word) ? `an ${word}` : `a ${word}`);

export function inventoryRoutes(store: Store): Route[] {
  const routes: Route[] = [];
  for (const r of RESOURCES) {
    const one = `/v1/${r.plural}/{name}`;
    routes.push(
      route({
        method: 'GET',
        path: `/v1/${r.plural}`,
        tag: r.title,
        summary: `List ${r.plural}`,
        description: r.filterDescription,
        auth: 'viewer',
        query: r.filter,
        responses: { 200: { description: `the ${r.plural}, by name`, schema: r.list } },
        handler: async ({ query }) => ({ status: 200, body: { items: await r.all(store, query as Record<string, string | undefined>) } }),
      }),
      route({
        method: 'GET',
        path: one,
        tag: r.title,
        summary: `Show one ${r.singular}`,
        auth: 'viewer',
        params: nameParam,
        responses: { 200: { description: `the ${r.singular}`, schema: r.record } },
        handler: async ({ params }) => {
          const rec = await r.get(store, params.name!);
          if (!rec) throw new ApiError(404, 'SPW_ERR_NOT_FOUND', `no ${r.singular} named "${params.name}"`);
          return { status: 200, body: rec };
        },
      }),
      route({
        method: 'PUT',
        path: one,
        tag: r.title,
        summary: `Create or replace ${a(r.singular)}`,
        description: `Upsert by name: the body is the whole ${r.singular} (without createdAt, which is kept on replace). A "name" in the body must equal the one in the path. References must exist. 201 when created, 200 when replaced.`,
        auth: 'operator',
        params: nameParam,
        body: r.put,
        audit: `${r.singular}.put`,
        responses: {
          200: { description: 'replaced', schema: r.record },
          201: { description: 'created', schema: r.record },
        },
        handler: async ({ params, body, audit }) => {
          const name = params.name!;
          const b = body as { name?: string };
          if (b.name !== undefined && b.name !== name) {
            throw new ApiError(400, 'SPW_ERR_INVALID', `the body names "${b.name}" but the path names "${name}"`, { issues: [{ path: 'name', message: `expected "${name}" (as in the path) or nothing` }] });
          }
          const missing = await r.missing(store, body);
          if (missing.length) throw new ApiError(400, 'SPW_ERR_INVALID', `${r.singular} "${name}" refers to what does not exist: ${missing.map((m) => `${m.path}: ${m.message}`).join('; ')}`, { issues: missing });
          const existing = await r.get(store, name);
          const rec = await r.save(store, name, body, existing);
          audit.action = `${r.singular}.${existing ? 'update' : 'create'}`;
          audit.target = name;
          audit.detail = JSON.parse(JSON.stringify(body)) as JsonObject;
          return { status: existing ? 200 : 201, body: rec, headers: existing ? undefined : { location: `/v1/${r.plural}/${encodeURIComponent(name)}` } };
        },
      }),
      route({
        method: 'DELETE',
        path: one,
        tag: r.title,
        summary: `Delete ${a(r.singular)}`,
        description: `Refused (409) while records still refer to it or an unfinished workflow acts on it.`,
        auth: 'operator',
        params: nameParam,
        audit: `${r.singular}.delete`,
        responses: { 204: { description: 'deleted' }, 409: { description: 'still in use', schema: S.ErrorBody } },
        handler: async ({ params, audit }) => {
          const name = params.name!;
          audit.target = name;
          const rec = await r.get(store, name);
          if (!rec) throw new ApiError(404, 'SPW_ERR_NOT_FOUND', `no ${r.singular} named "${name}"`);
          const via: Array<[Singular, string]> = [[r.singular, name], ...(r.busyVia?.(rec) ?? [])];
          const busy = (await unfinishedWorkflows(store)).filter((w) => via.some(([k, n]) => touches(w, k, n)));
          if (busy.length) {
            throw new ApiError(409, 'SPW_ERR_CONFLICT', `${r.singular} "${name}" is in use by unfinished workflow${busy.length > 1 ? 's' : ''} ${busy.map((w) => `${w.id} (${w.kind}, ${w.state})`).join(', ')}; wait for ${busy.length > 1 ? 'them' : 'it'} or cancel first`, {
              workflows: busy.map((w) => w.id),
            });
          }
          const deps = await r.dependants(store, name, rec);
          if (deps.length) throw new ApiError(409, 'SPW_ERR_CONFLICT', `${r.singular} "${name}" is still referred to by ${deps.join('; ')}; delete or change those first`, { dependants: deps });
          if (!(await r.remove(store, name))) throw new ApiError(404, 'SPW_ERR_NOT_FOUND', `no ${r.singular} named "${name}"`);
          return { status: 204 };
        },
      }),
    );
  }
  return routes;
}
