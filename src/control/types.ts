// The management service's shared vocabulary: inventory records, workflows, steps, events,
// the audit log and API tokens. The store (src/control/db/) persists them on SQLite or
// PostgreSQL; the engine (src/control/engine/) runs workflows; the API (src/control/api/)
// and the CLI show them. See docs/control.md.

import type { QemuVmSpec } from '../compute/qemu/vm.js';

/** JSON values as stored in the database (objects are kept as JSON text). */
export type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
export type JsonObject = { [k: string]: Json };

export interface Site {
  name: string;
  /** 'onprem' sites own disks; 'cloud' sites host burst capacity. */
  kind: 'onprem' | 'cloud';
  region: string;
  /** compliance tags the site satisfies, e.g. ["eu", "pci"]. */
  tags: string[];
  createdAt: string;
}

export interface EdgeRecord {
  name: string;
  site: string;
  /** the edge's control socket (UNIX path; the service runs beside the edges it drives). */
  control: string;
  /** where its storage target listens, host:port (remote role), if any. */
  nbd?: string;
  /** its link address host:port (local role), if any. */
  link?: string;
  /** its cache size in bytes (remote role), as last set by the service. */
  cacheBytes?: number;
  createdAt: string;
}

export interface Host {
  name: string;
  site: string;
  /** which provider starts VMs on it ('local': QEMU processes on this machine). */
  provider: string;
  vcpus: number;
  ramMiB: number;
  iops: number;
  /** price per hour in any currency unit; lower is better. */
  pricePerHour: number;
  licences: string[];
  tags: string[];
  ha: boolean;
  /** the edge whose storage target VMs on this host boot from. */
  edge: string;
  state: 'up' | 'down' | 'maintenance';
  createdAt: string;
}

/** How to start a VM: the QEMU driver's own fields, nothing provider specific. */
export type VmSpec = Pick<QemuVmSpec, 'kernel' | 'initrd' | 'append' | 'memoryMiB' | 'vcpus' | 'mac'>;

export interface Instance {
  name: string;
  kind: 'vm';
  /** the site whose disks the instance's volumes are (its origin). */
  origin: string;
  /** where it runs now, or null when stopped. */
  host: string | null;
  state: 'stopped' | 'running' | 'moving' | 'failed';
  /** where its data path is: at the origin, streamed to a cloud site, or migrated for good. */
  placement: 'origin' | 'streamed' | 'migrated';
  spec: VmSpec;
  /** requirements used for host choice. */
  needs: { licences: string[]; tags: string[]; ha: boolean; iops: number };
  /** the identity the guest sees (hostname, machine id); clones get fresh ones. */
  identity: { hostname: string; machineId: string };
  /** set on clones: the instance it was cloned from. */
  cloneOf?: string;
  createdAt: string;
}

export interface Volume {
  name: string;
  instance: string;
  /** the disk at the origin (a file or block device). */
  path: string;
  sizeBytes: number;
  /** volumes of one base share a family (cache and chunks, hot spots). */
  family: string;
  /** write policy when streamed: remote-only | origin | write-through. */
  policy: string;
  /** the hydrated copy at the cloud site once migrated. */
  hydratedPath?: string;
  createdAt: string;
}

export interface ProfileRecord {
  name: string;
  family: string;
  volume: string;
  chunks: number;
  createdAt: string;
}

export type WorkflowKind = 'transfer' | 'clone' | 'reverse' | 'migrate' | 'detach' | 'resize-edge' | 'live-migrate' | 'start' | 'stop';

/**
 * pending → running → succeeded, or → failed (retry resumes, cancel rolls back),
 * or cancel requested → rolling-back → cancelled.
 */
export type WorkflowState = 'pending' | 'running' | 'succeeded' | 'failed' | 'cancelling' | 'rolling-back' | 'cancelled';

export interface Workflow {
  id: string;
  kind: WorkflowKind;
  /** what it acts on (an instance or edge name), for listing and mutual exclusion. */
  target: string;
  input: JsonObject;
  state: WorkflowState;
  /** index of the step running now (or next to run). */
  step: number;
  /** outputs of finished steps, by step name; a step reads what earlier steps found. */
  outputs: JsonObject;
  error?: string;
  actor: string;
  createdAt: string;
  updatedAt: string;
}

export type StepState = 'running' | 'done' | 'failed' | 'undoing' | 'undone' | 'skipped';

export interface StepRecord {
  workflow: string;
  index: number;
  name: string;
  state: StepState;
  attempts: number;
  output?: Json;
  error?: string;
  startedAt: string;
  endedAt?: string;
}

export interface WorkflowEvent {
  workflow: string;
  /** increasing per workflow; SSE ids and `?after=` use it. */
  seq: number;
  at: string;
  type: 'state' | 'step' | 'progress' | 'log';
  step?: string;
  /** 0..1 for progress events of the step. */
  fraction?: number;
  message: string;
  data?: JsonObject;
}

export interface AuditEntry {
  id: number;
  at: string;
  actor: string;
  /** e.g. "workflow.start", "workflow.cancel", "step.effect", "host.create", "token.create". */
  action: string;
  target: string;
  detail: JsonObject;
}

export type Role = 'viewer' | 'operator';

export interface TokenRecord {
  id: string;
  name: string;
  role: Role;
  createdAt: string;
}

/** Listing filters shared by the store and the API. */
export interface WorkflowFilter {
  state?: WorkflowState;
  kind?: WorkflowKind;
  target?: string;
  limit?: number;
}

/**
 * Persistence, the same on SQLite and PostgreSQL (src/control/db/). Inventory writes are
 * upserts by name where noted; every method is one transaction.
 */
export interface Store {
  readonly kind: 'sqlite' | 'postgres';
  close(): Promise<void>;

  putSite(s: Omit<Site, 'createdAt'>): Promise<Site>;
  getSite(name: string): Promise<Site | null>;
  listSites(): Promise<Site[]>;
  deleteSite(name: string): Promise<boolean>;

  putEdge(e: Omit<EdgeRecord, 'createdAt'>): Promise<EdgeRecord>;
  getEdge(name: string): Promise<EdgeRecord | null>;
  listEdges(site?: string): Promise<EdgeRecord[]>;
  deleteEdge(name: string): Promise<boolean>;

  putHost(h: Omit<Host, 'createdAt'>): Promise<Host>;
  getHost(name: string): Promise<Host | null>;
  listHosts(site?: string): Promise<Host[]>;
  deleteHost(name: string): Promise<boolean>;

  putInstance(i: Omit<Instance, 'createdAt'>): Promise<Instance>;
  getInstance(name: string): Promise<Instance | null>;
  listInstances(): Promise<Instance[]>;
  /** partial update of an existing instance (throws if missing). */
  updateInstance(name: string, patch: Partial<Omit<Instance, 'name' | 'createdAt'>>): Promise<Instance>;
  deleteInstance(name: string): Promise<boolean>;

  putVolume(v: Omit<Volume, 'createdAt'>): Promise<Volume>;
  getVolume(name: string): Promise<Volume | null>;
  listVolumes(instance?: string): Promise<Volume[]>;
  updateVolume(name: string, patch: Partial<Omit<Volume, 'name' | 'createdAt'>>): Promise<Volume>;
  deleteVolume(name: string): Promise<boolean>;

  putProfile(p: Omit<ProfileRecord, 'createdAt'>): Promise<ProfileRecord>;
  listProfiles(family?: string): Promise<ProfileRecord[]>;
  deleteProfile(name: string): Promise<boolean>;

  /**
   * Create a workflow in state 'pending'. Refused (ConflictError) while another workflow on the
   * same target is not finished (pending, running, failed, cancelling, rolling-back).
   */
  createWorkflow(w: { id: string; kind: WorkflowKind; target: string; input: JsonObject; actor: string }): Promise<Workflow>;
  getWorkflow(id: string): Promise<Workflow | null>;
  listWorkflows(f?: WorkflowFilter): Promise<Workflow[]>;
  updateWorkflow(id: string, patch: Partial<Pick<Workflow, 'state' | 'step' | 'outputs' | 'error'>>): Promise<Workflow>;

  /** Upsert the record of step `index` (the engine writes it before the step's effects). */
  putStep(s: StepRecord): Promise<void>;
  listSteps(workflow: string): Promise<StepRecord[]>;

  /** Append an event; the store assigns `seq` and `at`. */
  appendEvent(e: Omit<WorkflowEvent, 'seq' | 'at'>): Promise<WorkflowEvent>;
  listEvents(workflow: string, afterSeq?: number, limit?: number): Promise<WorkflowEvent[]>;

  audit(e: Omit<AuditEntry, 'id' | 'at'>): Promise<void>;
  listAudit(f?: { target?: string; limit?: number }): Promise<AuditEntry[]>;

  /** Store a token (only its SHA-256 is kept); returns the record. */
  createToken(t: { id: string; name: string; role: Role; secretHash: string }): Promise<TokenRecord>;
  /** The token whose secret hashes to `secretHash`, or null. */
  findToken(secretHash: string): Promise<TokenRecord | null>;
  listTokens(): Promise<TokenRecord[]>;
  deleteToken(id: string): Promise<boolean>;
}

/** Typed errors the store and engine throw; the API maps them to 404 / 409 / 400. */
export class NotFoundError extends Error {
  readonly code = 'SPW_ERR_NOT_FOUND';
  constructor(message: string) {
    super(message);
    this.name = 'NotFoundError';
  }
}
export class ConflictError extends Error {
  readonly code = 'SPW_ERR_CONFLICT';
  constructor(message: string) {
    super(message);
    this.name = 'ConflictError';
  }
}
export class InvalidInputError extends Error {
  readonly code = 'SPW_ERR_INVALID';
  constructor(message: string) {
    super(message);
    this.name = 'InvalidInputError';
  }
}

/** What a step sees while it runs. */
export interface StepContext {
  workflow: Workflow;
  /** outputs of the steps before this one, by step name. */
  outputs: JsonObject;
  /** which attempt this is (1 = first run; more after a crash or a retry). */
  attempt: number;
  /** aborted when the workflow is cancelled or the service stops. */
  signal: AbortSignal;
  /** emit a progress event (fraction 0..1 of this step, throttled by the engine). */
  progress(fraction: number | undefined, message: string, data?: JsonObject): void;
  /** record an effect in the audit log before making it. */
  audit(action: string, detail: JsonObject): Promise<void>;
}

export interface StepDef {
  name: string;
  /** Idempotent: run again after a crash, it must converge to the same result. */
  run(ctx: StepContext): Promise<Json | void>;
  /** Undo the step's effects on cancel (idempotent too). Steps without undo are kept. */
  undo?(ctx: StepContext): Promise<void>;
}

export interface WorkflowDef {
  kind: WorkflowKind;
  /** The target name from the (validated) input. */
  target(input: JsonObject): string;
  /** Validate the input at start (throw InvalidInputError with a clear message). */
  validate(input: unknown): Promise<JsonObject> | JsonObject;
  steps(input: JsonObject): StepDef[];
}

/** The engine's face to the API (src/control/engine/). */
export interface WorkflowEngine {
  start(kind: WorkflowKind, input: unknown, actor: string): Promise<Workflow>;
  /** Request cancellation: the running step is aborted, then done steps are undone in reverse. */
  cancel(id: string, actor: string): Promise<Workflow>;
  /** Resume a failed workflow from its failed step. */
  retry(id: string, actor: string): Promise<Workflow>;
  /** Live events of one workflow (after `afterSeq`), for SSE; returns an unsubscribe function. */
  subscribe(id: string, afterSeq: number, onEvent: (e: WorkflowEvent) => void): Promise<() => void>;
  kinds(): WorkflowKind[];
}
