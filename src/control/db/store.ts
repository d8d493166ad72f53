// The Store of ../types.ts over the SQL adapter: one implementation for SQLite and PostgreSQL.
// Every method is one statement or one transaction. JSON columns are parsed and checked on
// the way out; a row that does not parse is a CorruptDataError naming the row and column.
//
// Beyond Store, SqlStore offers what the engine needs to be safe with two services on one
// PostgreSQL database (WorkflowStoreExtensions): a compare-and-set state transition and
// per-workflow leases.

import type {
  AuditEntry,
  EdgeRecord,
  Host,
  Instance,
  Json,
  JsonObject,
  ProfileRecord,
  Role,
  Site,
  StepRecord,
  StepState,
  Store,
  TokenRecord,
  Volume,
  Workflow,
  WorkflowEvent,
  WorkflowFilter,
  WorkflowKind,
  WorkflowState,
} from '../types.js';
import { ConflictError, InvalidInputError, NotFoundError } from '../types.js';
import { CorruptDataError } from './errors.js';
import { isUniqueViolation, type Param, type Row, type Sql } from './sql.js';

export type WorkflowPatch = Partial<Pick<Workflow, 'state' | 'step' | 'outputs' | 'error'>>;

/** What the engine uses beyond Store (SqlStore has them; the engine emulates them over any
 *  other Store for a single process). */
export interface WorkflowStoreExtensions {
  /** Apply `patch` only if the workflow's state is one of `from` (atomically); the updated
   *  workflow, or null when its state was another (or it does not exist). */
  transitionWorkflow(id: string, from: readonly WorkflowState[], patch: WorkflowPatch): Promise<Workflow | null>;
  /** Take the workflow's lease for `ttlMs` if it is free, expired or already `owner`'s. */
  acquireLease(id: string, owner: string, ttlMs: number): Promise<boolean>;
  /** Extend `owner`'s lease; the workflow as it is now, or null when the lease is no longer
   *  `owner`'s (taken over after expiry). */
  renewLease(id: string, owner: string, ttlMs: number): Promise<Workflow | null>;
  /** Give the lease up (no-op unless `owner` holds it). */
  releaseLease(id: string, owner: string): Promise<void>;
  /** Who holds the lease and until when (ms since the epoch, the database's clock). */
  leaseOf(id: string): Promise<{ owner: string | null; expiresAt: number | null }>;
  /** Ids of the workflows in these states, oldest first (reads no JSON: a corrupt row does
   *  not hide the others). */
  workflowIds(states: readonly WorkflowState[]): Promise<string[]>;
}

export const UNFINISHED_STATES: readonly WorkflowState[] = ['pending', 'running', 'failed', 'cancelling', 'rolling-back'];
export const FINISHED_STATES: readonly WorkflowState[] = ['succeeded', 'cancelled'];
const WORKFLOW_STATES = new Set<string>([...UNFINISHED_STATES, ...FINISHED_STATES]);
const STEP_STATES = new Set<string>(['running', 'done', 'failed', 'undoing', 'undone', 'skipped']);
const SHA256_HEX = /^[0-9a-f]{64}$/;

const now = (): string => new Date().toISOString();
const placeholders = (n: number): string => Array.from({ length: n }, () => '?').join(', ');

// ---------------------------------------------------------------------------------------------
// Reading rows: every value checked, JSON parsed, failures typed.

class RowReader {
  constructor(
    private readonly r: Row,
    private readonly where: string,
  ) {}

  private bad(col: string, what: string): CorruptDataError {
    return new CorruptDataError(`${this.where}: column ${col} ${what}`);
  }

  text(col: string): string {
    const v = this.r[col];
    if (typeof v !== 'string') throw this.bad(col, `is ${v === null ? 'NULL' : typeof v}, expected text`);
    return v;
  }

  optText(col: string): string | undefined {
    const v = this.r[col];
    return v === null || v === undefined ? undefined : this.text(col);
  }

  oneOf<T extends string>(col: string, allowed: ReadonlySet<string> | readonly T[]): T {
    const v = this.text(col);
    const ok = Array.isArray(allowed) ? allowed.includes(v as T) : (allowed as ReadonlySet<string>).has(v);
    if (!ok) throw this.bad(col, `holds an unknown value ${JSON.stringify(v)}`);
    return v as T;
  }

  num(col: string): number {
    const v = this.r[col];
    // pg returns BIGINT as a string
    const n = typeof v === 'number' ? v : typeof v === 'string' || typeof v === 'bigint' ? Number(v) : NaN;
    if (!Number.isFinite(n)) throw this.bad(col, `is not a number (${String(v)})`);
    return n;
  }

  optNum(col: string): number | undefined {
    const v = this.r[col];
    return v === null || v === undefined ? undefined : this.num(col);
  }

  bool(col: string): boolean {
    return this.num(col) !== 0;
  }

  json(col: string): Json {
    const s = this.text(col);
    try {
      return JSON.parse(s) as Json;
    } catch {
      throw this.bad(col, 'holds invalid JSON');
    }
  }

  optJson(col: string): Json | undefined {
    const v = this.r[col];
    return v === null || v === undefined ? undefined : this.json(col);
  }

  object(col: string): JsonObject {
    const v = this.json(col);
    if (v === null || typeof v !== 'object' || Array.isArray(v)) throw this.bad(col, 'does not hold a JSON object');
    return v;
  }

  optObject(col: string): JsonObject | undefined {
    const v = this.r[col];
    return v === null || v === undefined ? undefined : this.object(col);
  }

  strings(col: string): string[] {
    const v = this.json(col);
    if (!Array.isArray(v) || !v.every((x) => typeof x === 'string')) throw this.bad(col, 'does not hold a JSON array of strings');
    return v as string[];
  }
}

const rd = (r: Row, where: string): RowReader => new RowReader(r, where);

function siteOf(r: Row): Site {
  const x = rd(r, `site ${String(r.name)}`);
  return { name: x.text('name'), kind: x.oneOf('kind', ['onprem', 'cloud'] as const), region: x.text('region'), tags: x.strings('tags'), createdAt: x.text('created_at') };
}

function edgeOf(r: Row): EdgeRecord {
  const x = rd(r, `edge ${String(r.name)}`);
  const e: EdgeRecord = { name: x.text('name'), site: x.text('site'), control: x.text('control'), createdAt: x.text('created_at') };
  const nbd = x.optText('nbd');
  const link = x.optText('link');
  const cacheBytes = x.optNum('cache_bytes');
  if (nbd !== undefined) e.nbd = nbd;
  if (link !== undefined) e.link = link;
  if (cacheBytes !== undefined) e.cacheBytes = cacheBytes;
  return e;
}

function hostOf(r: Row): Host {
  const x = rd(r, `host ${String(r.name)}`);
  return {
    name: x.text('name'),
    site: x.text('site'),
    provider: x.text('provider'),
    vcpus: x.num('vcpus'),
    ramMiB: x.num('ram_mib'),
    iops: x.num('iops'),
    pricePerHour: x.num('price_per_hour'),
    licences: x.strings('licences'),
    tags: x.strings('tags'),
    ha: x.bool('ha'),
    edge: x.text('edge'),
    state: x.oneOf('state', ['up', 'down', 'maintenance'] as const),
    createdAt: x.text('created_at'),
  };
}

function instanceOf(r: Row): Instance {
  const x = rd(r, `instance ${String(r.name)}`);
  const i: Instance = {
    name: x.text('name'),
    kind: x.oneOf('kind', ['vm'] as const),
    origin: x.text('origin'),
    host: x.optText('host') ?? null,
    state: x.oneOf('state', ['stopped', 'running', 'moving', 'failed'] as const),
    placement: x.oneOf('placement', ['origin', 'streamed', 'migrated'] as const),
    spec: x.object('spec') as unknown as Instance['spec'],
    needs: x.object('needs') as unknown as Instance['needs'],
    identity: x.object('identity') as unknown as Instance['identity'],
    createdAt: x.text('created_at'),
  };
  const cloneOf = x.optText('clone_of');
  if (cloneOf !== undefined) i.cloneOf = cloneOf;
  return i;
}

function volumeOf(r: Row): Volume {
  const x = rd(r, `volume ${String(r.name)}`);
  const v: Volume = {
    name: x.text('name'),
    instance: x.text('instance'),
    path: x.text('path'),
    sizeBytes: x.num('size_bytes'),
    family: x.text('family'),
    policy: x.text('policy'),
    createdAt: x.text('created_at'),
  };
  const hydratedPath = x.optText('hydrated_path');
  if (hydratedPath !== undefined) v.hydratedPath = hydratedPath;
  return v;
}

function profileOf(r: Row): ProfileRecord {
  const x = rd(r, `profile ${String(r.name)}`);
  return { name: x.text('name'), family: x.text('family'), volume: x.text('volume'), chunks: x.num('chunks'), createdAt: x.text('created_at') };
}

function workflowOf(r: Row): Workflow {
  const x = rd(r, `workflow ${String(r.id)}`);
  const w: Workflow = {
    id: x.text('id'),
    kind: x.text('kind') as WorkflowKind,
    target: x.text('target'),
    input: x.object('input'),
    state: x.oneOf<WorkflowState>('state', WORKFLOW_STATES),
    step: x.num('step'),
    outputs: x.object('outputs'),
    actor: x.text('actor'),
    createdAt: x.text('created_at'),
    updatedAt: x.text('updated_at'),
  };
  const error = x.optText('error');
  if (error !== undefined) w.error = error;
  return w;
}

function stepOf(r: Row): StepRecord {
  const x = rd(r, `step ${String(r.idx)} of workflow ${String(r.workflow)}`);
  const s: StepRecord = {
    workflow: x.text('workflow'),
    index: x.num('idx'),
    name: x.text('name'),
    state: x.oneOf<StepState>('state', STEP_STATES),
    attempts: x.num('attempts'),
    startedAt: x.text('started_at'),
  };
  const output = x.optJson('output');
  const error = x.optText('error');
  const endedAt = x.optText('ended_at');
  if (output !== undefined) s.output = output;
  if (error !== undefined) s.error = error;
  if (endedAt !== undefined) s.endedAt = endedAt;
  return s;
}

function eventOf(r: Row): WorkflowEvent {
  const x = rd(r, `event ${String(r.seq)} of workflow ${String(r.workflow)}`);
  const e: WorkflowEvent = {
    workflow: x.text('workflow'),
    seq: x.num('seq'),
    at: x.text('at'),
    type: x.oneOf('type', ['state', 'step', 'progress', 'log'] as const),
    message: x.text('message'),
  };
  const step = x.optText('step');
  const fraction = x.optNum('fraction');
  const data = x.optObject('data');
  if (step !== undefined) e.step = step;
  if (fraction !== undefined) e.fraction = fraction;
  if (data !== undefined) e.data = data;
  return e;
}

function auditOf(r: Row): AuditEntry {
  const x = rd(r, `audit entry ${String(r.id)}`);
  return { id: x.num('id'), at: x.text('at'), actor: x.text('actor'), action: x.text('action'), target: x.text('target'), detail: x.object('detail') };
}

function tokenOf(r: Row): TokenRecord {
  const x = rd(r, `token ${String(r.id)}`);
  return { id: x.text('id'), name: x.text('name'), role: x.oneOf('role', ['viewer', 'operator'] as const), createdAt: x.text('created_at') };
}

const js = (v: Json | undefined): string | null => (v === undefined ? null : JSON.stringify(v));

// ---------------------------------------------------------------------------------------------

export class SqlStore implements Store, WorkflowStoreExtensions {
  readonly kind: 'sqlite' | 'postgres';

  /** `sql`: the adapter (for maintenance and tests; the schema must already be migrated). */
  constructor(readonly sql: Sql) {
    this.kind = sql.dialect.name;
  }

  close(): Promise<void> {
    return this.sql.close();
  }

  private async one<T>(sql: string, params: readonly Param[], map: (r: Row) => T): Promise<T | null> {
    const rows = await this.sql.all(sql, params);
    return rows[0] ? map(rows[0]) : null;
  }

  private async deleteBy(table: string, name: string): Promise<boolean> {
    return (await this.sql.exec(`DELETE FROM ${table} WHERE name = ?`, [name])) > 0;
  }

  /** INSERT … ON CONFLICT (name) DO UPDATE of every column but created_at. */
  private async upsert<T>(table: string, cols: Record<string, Param>, map: (r: Row) => T): Promise<T> {
    const names = Object.keys(cols);
    const sets = names.filter((c) => c !== 'name').map((c) => `${c} = excluded.${c}`);
    const sql =
      `INSERT INTO ${table} (${names.join(', ')}, created_at) VALUES (${placeholders(names.length + 1)}) ` +
      `ON CONFLICT (name) DO UPDATE SET ${sets.join(', ')} RETURNING *`;
    const rows = await this.sql.all(sql, [...Object.values(cols), now()]);
    return map(rows[0] as Row);
  }

  // --- sites, edges, hosts ---------------------------------------------------------------

  putSite(s: Omit<Site, 'createdAt'>): Promise<Site> {
    return this.upsert('sites', { name: s.name, kind: s.kind, region: s.region, tags: JSON.stringify(s.tags) }, siteOf);
  }
  getSite(name: string): Promise<Site | null> {
    return this.one('SELECT * FROM sites WHERE name = ?', [name], siteOf);
  }
  async listSites(): Promise<Site[]> {
    return (await this.sql.all('SELECT * FROM sites ORDER BY name')).map(siteOf);
  }
  deleteSite(name: string): Promise<boolean> {
    return this.deleteBy('sites', name);
  }

  putEdge(e: Omit<EdgeRecord, 'createdAt'>): Promise<EdgeRecord> {
    return this.upsert('edges', { name: e.name, site: e.site, control: e.control, nbd: e.nbd, link: e.link, cache_bytes: e.cacheBytes }, edgeOf);
  }
  getEdge(name: string): Promise<EdgeRecord | null> {
    return this.one('SELECT * FROM edges WHERE name = ?', [name], edgeOf);
  }
  async listEdges(site?: string): Promise<EdgeRecord[]> {
    const rows = site === undefined ? await this.sql.all('SELECT * FROM edges ORDER BY name') : await this.sql.all('SELECT * FROM edges WHERE site = ? ORDER BY name', [site]);
    return rows.map(edgeOf);
  }
  deleteEdge(name: string): Promise<boolean> {
    return this.deleteBy('edges', name);
  }

  putHost(h: Omit<Host, 'createdAt'>): Promise<Host> {
    return this.upsert(
      'hosts',
      {
        name: h.name,
        site: h.site,
        provider: h.provider,
        vcpus: h.vcpus,
        ram_mib: h.ramMiB,
        iops: h.iops,
        price_per_hour: h.pricePerHour,
        licences: JSON.stringify(h.licences),
        tags: JSON.stringify(h.tags),
        ha: h.ha,
        edge: h.edge,
        state: h.state,
      },
      hostOf,
    );
  }
  getHost(name: string): Promise<Host | null> {
    return this.one('SELECT * FROM hosts WHERE name = ?', [name], hostOf);
  }
  async listHosts(site?: string): Promise<Host[]> {
    const rows = site === undefined ? await this.sql.all('SELECT * FROM hosts ORDER BY name') : await this.sql.all('SELECT * FROM hosts WHERE site = ? ORDER BY name', [site]);
    return rows.map(hostOf);
  }
  deleteHost(name: string): Promise<boolean> {
    return this.deleteBy('hosts', name);
  }

  // --- instances, volumes, profiles --------------------------------------------------------

  private instanceCols(i: Omit<Instance, 'createdAt'>): Record<string, Param> {
    return {
      name: i.name,
      kind: i.kind,
      origin: i.origin,
      host: i.host,
      state: i.state,
      placement: i.placement,
      spec: JSON.stringify(i.spec),
      needs: JSON.stringify(i.needs),
      identity: JSON.stringify(i.identity),
      clone_of: i.cloneOf,
    };
  }

  putInstance(i: Omit<Instance, 'createdAt'>): Promise<Instance> {
    return this.upsert('instances', this.instanceCols(i), instanceOf);
  }
  getInstance(name: string): Promise<Instance | null> {
    return this.one('SELECT * FROM instances WHERE name = ?', [name], instanceOf);
  }
  async listInstances(): Promise<Instance[]> {
    return (await this.sql.all('SELECT * FROM instances ORDER BY name')).map(instanceOf);
  }
  updateInstance(name: string, patch: Partial<Omit<Instance, 'name' | 'createdAt'>>): Promise<Instance> {
    return this.sql.tx(async (db) => {
      const rows = await db.all('SELECT * FROM instances WHERE name = ?', [name]);
      if (!rows[0]) throw new NotFoundError(`no instance named ${name}`);
      const merged = { ...instanceOf(rows[0]), ...patch, name };
      const cols = this.instanceCols(merged);
      delete cols.name;
      const sets = Object.keys(cols).map((c) => `${c} = ?`);
      const out = await db.all(`UPDATE instances SET ${sets.join(', ')} WHERE name = ? RETURNING *`, [...Object.values(cols), name]);
      return instanceOf(out[0] as Row);
    });
  }
  deleteInstance(name: string): Promise<boolean> {
    return this.deleteBy('instances', name);
  }

  private volumeCols(v: Omit<Volume, 'createdAt'>): Record<string, Param> {
    return { name: v.name, instance: v.instance, path: v.path, size_bytes: v.sizeBytes, family: v.family, policy: v.policy, hydrated_path: v.hydratedPath };
  }

  putVolume(v: Omit<Volume, 'createdAt'>): Promise<Volume> {
    return this.upsert('volumes', this.volumeCols(v), volumeOf);
  }
  getVolume(name: string): Promise<Volume | null> {
    return this.one('SELECT * FROM volumes WHERE name = ?', [name], volumeOf);
  }
  async listVolumes(instance?: string): Promise<Volume[]> {
    const rows = instance === undefined ? await this.sql.all('SELECT * FROM volumes ORDER BY name') : await this.sql.all('SELECT * FROM volumes WHERE instance = ? ORDER BY name', [instance]);
    return rows.map(volumeOf);
  }
  updateVolume(name: string, patch: Partial<Omit<Volume, 'name' | 'createdAt'>>): Promise<Volume> {
    return this.sql.tx(async (db) => {
      const rows = await db.all('SELECT * FROM volumes WHERE name = ?', [name]);
      if (!rows[0]) throw new NotFoundError(`no volume named ${name}`);
      const cols = this.volumeCols({ ...volumeOf(rows[0]), ...patch, name });
      delete cols.name;
      const sets = Object.keys(cols).map((c) => `${c} = ?`);
      const out = await db.all(`UPDATE volumes SET ${sets.join(', ')} WHERE name = ? RETURNING *`, [...Object.values(cols), name]);
      return volumeOf(out[0] as Row);
    });
  }
  deleteVolume(name: string): Promise<boolean> {
    return this.deleteBy('volumes', name);
  }

  putProfile(p: Omit<ProfileRecord, 'createdAt'>): Promise<ProfileRecord> {
    return this.upsert('profiles', { name: p.name, family: p.family, volume: p.volume, chunks: p.chunks }, profileOf);
  }
  async listProfiles(family?: string): Promise<ProfileRecord[]> {
    const rows = family === undefined ? await this.sql.all('SELECT * FROM profiles ORDER BY name') : await this.sql.all('SELECT * FROM profiles WHERE family = ? ORDER BY name', [family]);
    return rows.map(profileOf);
  }
  deleteProfile(name: string): Promise<boolean> {
    return this.deleteBy('profiles', name);
  }

  // --- workflows ---------------------------------------------------------------------------

  private async unfinishedOn(db: Sql, target: string): Promise<{ id: string; state: string } | null> {
    const rows = await db.all<{ id: string; state: string }>('SELECT id, state FROM workflows WHERE target = ? AND finished = 0', [target]);
    return rows[0] ?? null;
  }

  private conflictOn(target: string, other: { id: string; state: string } | null): ConflictError {
    return new ConflictError(
      other
        ? `target ${target} already has an unfinished workflow ${other.id} (${other.state}); wait for it, retry or cancel it first`
        : `target ${target} already has an unfinished workflow`,
    );
  }

  async createWorkflow(w: { id: string; kind: WorkflowKind; target: string; input: JsonObject; actor: string }): Promise<Workflow> {
    const t = now();
    try {
      return await this.sql.tx(async (db) => {
        const other = await this.unfinishedOn(db, w.target);
        if (other) throw this.conflictOn(w.target, other);
        // The partial unique index (target WHERE finished = 0) is what holds under concurrency:
        // a second insert waits for the first transaction and then fails.
        const rows = await db.all(
          `INSERT INTO workflows (id, kind, target, input, state, step, outputs, error, actor, created_at, updated_at, finished, event_seq)
           VALUES (?, ?, ?, ?, 'pending', 0, '{}', NULL, ?, ?, ?, 0, 0) RETURNING *`,
          [w.id, w.kind, w.target, JSON.stringify(w.input), w.actor, t, t],
        );
        return workflowOf(rows[0] as Row);
      });
    } catch (e) {
      if (!isUniqueViolation(e)) throw e;
      if (await this.getWorkflow(w.id).catch(() => null)) throw new ConflictError(`a workflow with id ${w.id} exists already`);
      throw this.conflictOn(w.target, await this.unfinishedOn(this.sql, w.target));
    }
  }

  getWorkflow(id: string): Promise<Workflow | null> {
    return this.one('SELECT * FROM workflows WHERE id = ?', [id], workflowOf);
  }

  async listWorkflows(f: WorkflowFilter = {}): Promise<Workflow[]> {
    const where: string[] = [];
    const params: Param[] = [];
    if (f.state !== undefined) {
      where.push('state = ?');
      params.push(f.state);
    }
    if (f.kind !== undefined) {
      where.push('kind = ?');
      params.push(f.kind);
    }
    if (f.target !== undefined) {
      where.push('target = ?');
      params.push(f.target);
    }
    let sql = `SELECT * FROM workflows${where.length ? ` WHERE ${where.join(' AND ')}` : ''} ORDER BY created_at DESC, id DESC`;
    if (f.limit !== undefined) {
      sql += ' LIMIT ?';
      params.push(Math.max(0, Math.floor(f.limit)));
    }
    return (await this.sql.all(sql, params)).map(workflowOf);
  }

  private patchSql(patch: WorkflowPatch): { sets: string[]; params: Param[] } {
    const sets: string[] = [];
    const params: Param[] = [];
    if (patch.state !== undefined) {
      if (!WORKFLOW_STATES.has(patch.state)) throw new InvalidInputError(`unknown workflow state ${JSON.stringify(patch.state)}`);
      sets.push('state = ?', 'finished = ?');
      params.push(patch.state, FINISHED_STATES.includes(patch.state) ? 1 : 0);
    }
    if (patch.step !== undefined) {
      sets.push('step = ?');
      params.push(patch.step);
    }
    if (patch.outputs !== undefined) {
      sets.push('outputs = ?');
      params.push(JSON.stringify(patch.outputs));
    }
    // `error: undefined` present in the patch clears the error
    if ('error' in patch) {
      sets.push('error = ?');
      params.push(patch.error ?? null);
    }
    sets.push('updated_at = ?');
    params.push(now());
    return { sets, params };
  }

  private async patchWorkflow(id: string, from: readonly WorkflowState[] | null, patch: WorkflowPatch): Promise<Workflow | null> {
    const { sets, params } = this.patchSql(patch);
    let sql = `UPDATE workflows SET ${sets.join(', ')} WHERE id = ?`;
    params.push(id);
    if (from) {
      sql += ` AND state IN (${placeholders(from.length)})`;
      params.push(...from);
    }
    try {
      const rows = await this.sql.all(`${sql} RETURNING *`, params);
      return rows[0] ? workflowOf(rows[0]) : null;
    } catch (e) {
      if (!isUniqueViolation(e)) throw e;
      const w = await this.getWorkflow(id);
      throw this.conflictOn(w?.target ?? '?', w ? await this.unfinishedOn(this.sql, w.target) : null);
    }
  }

  async updateWorkflow(id: string, patch: WorkflowPatch): Promise<Workflow> {
    const w = await this.patchWorkflow(id, null, patch);
    if (!w) throw new NotFoundError(`no workflow ${id}`);
    return w;
  }

  transitionWorkflow(id: string, from: readonly WorkflowState[], patch: WorkflowPatch): Promise<Workflow | null> {
    if (from.length === 0) return Promise.resolve(null);
    return this.patchWorkflow(id, from, patch);
  }

  async acquireLease(id: string, owner: string, ttlMs: number): Promise<boolean> {
    const nowMs = this.sql.dialect.nowMs;
    const n = await this.sql.exec(
      `UPDATE workflows SET lease_owner = ?, lease_expires = ${nowMs} + ?
       WHERE id = ? AND (lease_owner IS NULL OR lease_owner = ? OR lease_expires IS NULL OR lease_expires < ${nowMs})`,
      [owner, Math.ceil(ttlMs), id, owner],
    );
    return n > 0;
  }

  async renewLease(id: string, owner: string, ttlMs: number): Promise<Workflow | null> {
    const rows = await this.sql.all(`UPDATE workflows SET lease_expires = ${this.sql.dialect.nowMs} + ? WHERE id = ? AND lease_owner = ? RETURNING *`, [Math.ceil(ttlMs), id, owner]);
    return rows[0] ? workflowOf(rows[0]) : null;
  }

  async releaseLease(id: string, owner: string): Promise<void> {
    await this.sql.exec('UPDATE workflows SET lease_owner = NULL, lease_expires = NULL WHERE id = ? AND lease_owner = ?', [id, owner]);
  }

  async leaseOf(id: string): Promise<{ owner: string | null; expiresAt: number | null }> {
    const rows = await this.sql.all('SELECT lease_owner, lease_expires FROM workflows WHERE id = ?', [id]);
    const r = rows[0];
    if (!r) throw new NotFoundError(`no workflow ${id}`);
    const x = rd(r, `workflow ${id}`);
    return { owner: x.optText('lease_owner') ?? null, expiresAt: x.optNum('lease_expires') ?? null };
  }

  async workflowIds(states: readonly WorkflowState[]): Promise<string[]> {
    if (states.length === 0) return [];
    const rows = await this.sql.all<{ id: string }>(`SELECT id FROM workflows WHERE state IN (${placeholders(states.length)}) ORDER BY created_at, id`, states);
    return rows.map((r) => String(r.id));
  }

  // --- steps and events --------------------------------------------------------------------

  async putStep(s: StepRecord): Promise<void> {
    if (!STEP_STATES.has(s.state)) throw new InvalidInputError(`unknown step state ${JSON.stringify(s.state)}`);
    await this.sql.exec(
      `INSERT INTO steps (workflow, idx, name, state, attempts, output, error, started_at, ended_at)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT (workflow, idx) DO UPDATE SET name = excluded.name, state = excluded.state,
         attempts = excluded.attempts, output = excluded.output, error = excluded.error,
         started_at = excluded.started_at, ended_at = excluded.ended_at`,
      [s.workflow, s.index, s.name, s.state, s.attempts, js(s.output), s.error, s.startedAt, s.endedAt],
    );
  }

  async listSteps(workflow: string): Promise<StepRecord[]> {
    return (await this.sql.all('SELECT * FROM steps WHERE workflow = ? ORDER BY idx', [workflow])).map(stepOf);
  }

  appendEvent(e: Omit<WorkflowEvent, 'seq' | 'at'>): Promise<WorkflowEvent> {
    return this.sql.tx(async (db) => {
      // the row update takes the workflow's row lock on PostgreSQL: appends to one workflow
      // are serialised and each gets the next seq
      const rows = await db.all<{ event_seq: number | string }>('UPDATE workflows SET event_seq = event_seq + 1 WHERE id = ? RETURNING event_seq', [e.workflow]);
      if (!rows[0]) throw new NotFoundError(`no workflow ${e.workflow}`);
      const seq = Number(rows[0].event_seq);
      const out = await db.all(
        'INSERT INTO events (workflow, seq, at, type, step, fraction, message, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING *',
        [e.workflow, seq, now(), e.type, e.step, e.fraction, e.message, js(e.data)],
      );
      return eventOf(out[0] as Row);
    });
  }

  async listEvents(workflow: string, afterSeq = 0, limit?: number): Promise<WorkflowEvent[]> {
    const params: Param[] = [workflow, afterSeq];
    let sql = 'SELECT * FROM events WHERE workflow = ? AND seq > ? ORDER BY seq';
    if (limit !== undefined) {
      sql += ' LIMIT ?';
      params.push(Math.max(0, Math.floor(limit)));
    }
    return (await this.sql.all(sql, params)).map(eventOf);
  }

  // --- audit and tokens --------------------------------------------------------------------

  async audit(e: Omit<AuditEntry, 'id' | 'at'>): Promise<void> {
    await this.sql.exec('INSERT INTO audit (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)', [now(), e.actor, e.action, e.target, JSON.stringify(e.detail)]);
  }

  /** Newest first. */
  async listAudit(f: { target?: string; limit?: number } = {}): Promise<AuditEntry[]> {
    const params: Param[] = [];
    let sql = 'SELECT * FROM audit';
    if (f.target !== undefined) {
      sql += ' WHERE target = ?';
      params.push(f.target);
    }
    sql += ' ORDER BY id DESC';
    if (f.limit !== undefined) {
      sql += ' LIMIT ?';
      params.push(Math.max(0, Math.floor(f.limit)));
    }
    return (await this.sql.all(sql, params)).map(auditOf);
  }

  async createToken(t: { id: string; name: string; role: Role; secretHash: string }): Promise<TokenRecord> {
    if (!SHA256_HEX.test(t.secretHash)) throw new InvalidInputError('a token is stored by the SHA-256 of its secret: 64 lowercase hex digits (hashTokenSecret)');
    if (t.role !== 'viewer' && t.role !== 'operator') throw new InvalidInputError(`unknown role ${JSON.stringify(t.role)}`);
    try {
      const rows = await this.sql.all('INSERT INTO tokens (id, name, role, secret_sha256, created_at) VALUES (?, ?, ?, ?, ?) RETURNING *', [t.id, t.name, t.role, t.secretHash, now()]);
      return tokenOf(rows[0] as Row);
    } catch (e) {
      if (isUniqueViolation(e)) throw new ConflictError(`a token with id ${t.id} or the same secret exists already`);
      throw e;
    }
  }

  findToken(secretHash: string): Promise<TokenRecord | null> {
    return this.one('SELECT * FROM tokens WHERE secret_sha256 = ?', [secretHash.toLowerCase()], tokenOf);
  }

  async listTokens(): Promise<TokenRecord[]> {
    return (await this.sql.all('SELECT * FROM tokens ORDER BY created_at, id')).map(tokenOf);
  }

  async deleteToken(id: string): Promise<boolean> {
    return (await this.sql.exec('DELETE FROM tokens WHERE id = ?', [id])) > 0;
  }
}
