// The management API's zod schemas: request bodies, query strings, answers. They validate
// requests at run time and are the only source of the OpenAPI document (openapi.ts generates it
// with z.toJSONSchema), so what the API checks and what it documents cannot drift apart.
//
// Request schemas are registered in `requestSchemas`, answers in `responseSchemas`; both
// registries give each schema its component name in the OpenAPI document.

import { z } from 'zod';

import type { AuditEntry, EdgeRecord, Host, Instance, ProfileRecord, Site, StepRecord, TokenRecord, Volume, Workflow, WorkflowEvent } from '../types.js';

export const requestSchemas = z.registry<{ id: string }>();
export const responseSchemas = z.registry<{ id: string }>();

function request<T extends z.ZodType>(id: string, s: T): T {
  requestSchemas.add(s, { id });
  return s;
}
function response<T extends z.ZodType>(id: string, s: T): T {
  responseSchemas.add(s, { id });
  return s;
}

// ---- names -------------------------------------------------------------------------------

export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
export const NAME_RULE = 'a name is 1 to 63 letters, digits, ".", "_" or "-", starting with a letter or digit';
export const Name = z.string().regex(NAME_RE, NAME_RULE).meta({ description: NAME_RULE, examples: ['web-1'] });

export const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$/;
export const Id = z.string().regex(ID_RE, 'an id is 1 to 100 letters, digits, ".", "_", ":" or "-"');

const HostPort = z.string().regex(/^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/, 'expected HOST:PORT, e.g. 10.0.0.5:10809');
const Timestamp = z.string().meta({ description: 'ISO 8601 time', examples: ['2025-01-01T00:00:00.000Z'] });
const Tags = z.array(z.string().min(1).max(100)).max(100);
const NonNegInt = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);
const PosInt = z.number().int().min(1).max(Number.MAX_SAFE_INTEGER);
const JsonObj = z.record(z.string(), z.unknown());

// ---- inventory -------------------------------------------------------------------------------
// Each resource has a record schema (the answer) and a PUT body: the record without `createdAt`;
// `name` comes from the path (the body may repeat it, and then it must be the same).

export const SiteRecord = response(
  'Site',
  z.object({
    name: Name,
    kind: z.enum(['onprem', 'cloud']).meta({ description: "'onprem' sites own disks; 'cloud' sites host burst capacity" }),
    region: z.string(),
    tags: z.array(z.string()).meta({ description: 'compliance tags the site satisfies, e.g. ["eu", "pci"]' }),
    createdAt: Timestamp,
  }),
);
export const SitePut = request(
  'SitePut',
  z.strictObject({
    name: Name.optional(),
    kind: SiteRecord.shape.kind,
    region: z.string().min(1).max(100),
    tags: Tags.default([]),
  }),
);

export const EdgeRecordSchema = response(
  'Edge',
  z.object({
    name: Name,
    site: Name,
    control: z.string().meta({ description: "the edge's control socket (UNIX path)" }),
    nbd: z.string().optional().meta({ description: 'where its storage target listens, HOST:PORT (remote role)' }),
    link: z.string().optional().meta({ description: 'its link address HOST:PORT (local role)' }),
    cacheBytes: NonNegInt.optional().meta({ description: 'its cache size in bytes (remote role)' }),
    createdAt: Timestamp,
  }),
);
export const EdgePut = request(
  'EdgePut',
  z.strictObject({
    name: Name.optional(),
    site: Name,
    control: z.string().min(1).max(4096),
    nbd: HostPort.optional(),
    link: HostPort.optional(),
    cacheBytes: NonNegInt.optional(),
  }),
);

export const HostRecord = response(
  'Host',
  z.object({
    name: Name,
    site: Name,
    provider: z.string().meta({ description: "which provider starts VMs on it ('local': QEMU processes on the service's machine)" }),
    vcpus: PosInt,
    ramMiB: PosInt,
    iops: NonNegInt,
    pricePerHour: z.number().min(0).meta({ description: 'price per hour in any currency unit; lower is better' }),
    licences: z.array(z.string()),
    tags: z.array(z.string()),
    ha: z.boolean(),
    edge: Name.meta({ description: 'the edge whose storage target VMs on this host boot from' }),
    state: z.enum(['up', 'down', 'maintenance']),
    createdAt: Timestamp,
  }),
);
export const HostPut = request(
  'HostPut',
  z.strictObject({
    name: Name.optional(),
    site: Name,
    provider: z.string().min(1).max(100).default('local'),
    vcpus: PosInt,
    ramMiB: PosInt,
    iops: NonNegInt.default(0),
    pricePerHour: z.number().min(0).max(1e9).default(0),
    licences: Tags.default([]),
    tags: Tags.default([]),
    ha: z.boolean().default(false),
    edge: Name,
    state: HostRecord.shape.state.default('up'),
  }),
);

export const VmSpecSchema = z.strictObject({
  kernel: z.string().min(1).max(4096),
  initrd: z.string().max(4096),
  append: z.string().max(4096),
  memoryMiB: PosInt,
  vcpus: PosInt,
  mac: z.string().regex(/^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/, 'expected a MAC address like 52:54:00:12:34:56'),
});
const Needs = z.object({ licences: z.array(z.string()), tags: z.array(z.string()), ha: z.boolean(), iops: NonNegInt });
const Identity = z.object({ hostname: z.string(), machineId: z.string() });

export const InstanceRecord = response(
  'Instance',
  z.object({
    name: Name,
    kind: z.literal('vm'),
    origin: Name.meta({ description: "the site whose disks the instance's volumes are" }),
    host: Name.nullable().meta({ description: 'where it runs now, or null when stopped' }),
    state: z.enum(['stopped', 'running', 'moving', 'failed']),
    placement: z.enum(['origin', 'streamed', 'migrated']),
    spec: z.object(VmSpecSchema.shape),
    needs: Needs,
    identity: Identity,
    cloneOf: Name.optional(),
    createdAt: Timestamp,
  }),
);
export const InstancePut = request(
  'InstancePut',
  z.strictObject({
    name: Name.optional(),
    kind: z.literal('vm').default('vm'),
    origin: Name,
    host: Name.nullable().default(null),
    state: InstanceRecord.shape.state.default('stopped'),
    placement: InstanceRecord.shape.placement.default('origin'),
    spec: VmSpecSchema,
    needs: z
      .strictObject({ licences: Tags.default([]), tags: Tags.default([]), ha: z.boolean().default(false), iops: NonNegInt.default(0) })
      .default({ licences: [], tags: [], ha: false, iops: 0 }),
    identity: z
      .strictObject({ hostname: z.string().min(1).max(253), machineId: z.string().regex(/^[0-9a-f]{32}$/, 'expected 32 lowercase hex digits') })
      .optional()
      .meta({ description: 'default: the existing identity, or hostname = name and a fresh machine id' }),
    cloneOf: Name.optional(),
  }),
);

export const VOLUME_POLICIES = ['remote-only', 'origin', 'write-through'] as const;
export const VolumeRecord = response(
  'Volume',
  z.object({
    name: Name,
    instance: Name,
    path: z.string().meta({ description: 'the disk at the origin (a file or block device)' }),
    sizeBytes: NonNegInt,
    family: z.string(),
    policy: z.string().meta({ description: 'write policy when streamed: remote-only | origin | write-through' }),
    hydratedPath: z.string().optional(),
    createdAt: Timestamp,
  }),
);
export const VolumePut = request(
  'VolumePut',
  z.strictObject({
    name: Name.optional(),
    instance: Name,
    path: z.string().min(1).max(4096),
    sizeBytes: NonNegInt,
    family: z.string().min(1).max(100),
    policy: z.enum(VOLUME_POLICIES).default('remote-only'),
    hydratedPath: z.string().min(1).max(4096).optional(),
  }),
);

export const ProfileRecordSchema = response(
  'Profile',
  z.object({ name: Name, family: z.string(), volume: Name, chunks: NonNegInt, createdAt: Timestamp }),
);
export const ProfilePut = request(
  'ProfilePut',
  z.strictObject({ name: Name.optional(), family: z.string().min(1).max(100), volume: Name, chunks: NonNegInt }),
);

// ---- workflows -------------------------------------------------------------------------------

export const WORKFLOW_KINDS = ['transfer', 'clone', 'reverse', 'migrate', 'detach', 'resize-edge', 'live-migrate', 'start', 'stop'] as const;
export const WORKFLOW_STATES = ['pending', 'running', 'succeeded', 'failed', 'cancelling', 'rolling-back', 'cancelled'] as const;
/** States a workflow rests in until someone acts: the events stream ends there. */
export const RESTING_STATES: ReadonlySet<string> = new Set(['succeeded', 'failed', 'cancelled']);

export const WorkflowKindSchema = z.enum(WORKFLOW_KINDS);
export const WorkflowStateSchema = z.enum(WORKFLOW_STATES);

/**
 * The documented input of each kind. Objects are loose: the API checks the fields it knows
 * and passes everything to the workflow's own validate(), which has the last word.
 */
export const WorkflowInputs = {
  transfer: z.looseObject({ instance: Name, host: Name.optional(), site: Name.optional() }).meta({ description: 'burst: run the instance on a cloud host, streaming its disks' }),
  clone: z
    .looseObject({ instance: Name, name: Name, host: Name.optional(), site: Name.optional(), freshBase: z.boolean().optional() })
    .meta({ description: 'start a copy of the instance with a fresh identity' }),
  reverse: z.looseObject({ instance: Name }).meta({ description: 'bring a streamed instance back to its origin' }),
  migrate: z
    .looseObject({ instance: Name, host: Name.optional(), site: Name.optional(), detach: z.boolean().optional(), rate: z.union([z.string(), z.number().min(0)]).optional() })
    .meta({ description: 'burst, hydrate the disks at the cloud site, and detach from the origin unless detach is false' }),
  detach: z.looseObject({ instance: Name }).meta({ description: 'cut a migrated instance loose from its origin' }),
  'live-migrate': z.looseObject({ instance: Name, host: Name.optional(), site: Name.optional() }).meta({ description: 'move a running instance to another host without stopping it' }),
  'resize-edge': z
    .looseObject({ edge: Name, sizeBytes: z.union([PosInt, z.string().min(1).max(40)]).meta({ description: 'bytes, or a size like "2GiB"' }) })
    .meta({ description: "set an edge's cache size" }),
  start: z.looseObject({ instance: Name }).meta({ description: 'start a stopped instance' }),
  stop: z.looseObject({ instance: Name }).meta({ description: 'stop a running instance' }),
} satisfies Record<(typeof WORKFLOW_KINDS)[number], z.ZodType>;

export const WorkflowStart = request(
  'WorkflowStart',
  z.discriminatedUnion(
    'kind',
    WORKFLOW_KINDS.map((k) => z.strictObject({ kind: z.literal(k), input: WorkflowInputs[k] })) as unknown as [
      z.ZodObject<{ kind: z.ZodLiteral<string>; input: z.ZodObject }>,
      ...z.ZodObject<{ kind: z.ZodLiteral<string>; input: z.ZodObject }>[],
    ],
  ),
);

export const WorkflowRecord = response(
  'Workflow',
  z.object({
    id: z.string(),
    kind: WorkflowKindSchema,
    target: z.string().meta({ description: 'what it acts on (an instance or edge name)' }),
    input: JsonObj,
    state: WorkflowStateSchema,
    step: NonNegInt.meta({ description: 'index of the step running now (or next to run)' }),
    outputs: JsonObj.meta({ description: 'outputs of finished steps, by step name' }),
    error: z.string().optional(),
    actor: z.string(),
    createdAt: Timestamp,
    updatedAt: Timestamp,
  }),
);

export const StepRecordSchema = response(
  'Step',
  z.object({
    workflow: z.string(),
    index: NonNegInt,
    name: z.string(),
    state: z.enum(['running', 'done', 'failed', 'undoing', 'undone', 'skipped']),
    attempts: NonNegInt,
    output: z.unknown().optional(),
    error: z.string().optional(),
    startedAt: Timestamp,
    endedAt: Timestamp.optional(),
  }),
);

export const WorkflowDetail = response('WorkflowDetail', WorkflowRecord.extend({ steps: z.array(StepRecordSchema) }));

export const WorkflowEventSchema = response(
  'WorkflowEvent',
  z.object({
    workflow: z.string(),
    seq: PosInt.meta({ description: 'increasing per workflow; the SSE id' }),
    at: Timestamp,
    type: z.enum(['state', 'step', 'progress', 'log']),
    step: z.string().optional(),
    fraction: z.number().min(0).max(1).optional(),
    message: z.string(),
    data: JsonObj.optional(),
  }),
);

export const AuditEntrySchema = response(
  'AuditEntry',
  z.object({ id: NonNegInt, at: Timestamp, actor: z.string(), action: z.string(), target: z.string(), detail: JsonObj }),
);

export const RoleSchema = z.enum(['viewer', 'operator']);
export const TokenRecordSchema = response('Token', z.object({ id: z.string(), name: z.string(), role: RoleSchema, createdAt: Timestamp }));
export const TokenCreated = response(
  'TokenCreated',
  TokenRecordSchema.extend({ secret: z.string().meta({ description: 'the bearer token; shown this once, only its SHA-256 is kept' }) }),
);
export const TokenCreate = request('TokenCreate', z.strictObject({ name: z.string().min(1).max(100), role: RoleSchema }));

// ---- lists, errors, service ------------------------------------------------------------------

function list<T extends z.ZodType>(id: string, item: T) {
  return response(id, z.object({ items: z.array(item) }));
}
export const SiteList = list('SiteList', SiteRecord);
export const EdgeList = list('EdgeList', EdgeRecordSchema);
export const HostList = list('HostList', HostRecord);
export const InstanceList = list('InstanceList', InstanceRecord);
export const VolumeList = list('VolumeList', VolumeRecord);
export const ProfileList = list('ProfileList', ProfileRecordSchema);
export const WorkflowList = list('WorkflowList', WorkflowRecord);
export const EventList = list('WorkflowEventList', WorkflowEventSchema);
export const AuditList = list('AuditList', AuditEntrySchema);
export const TokenList = list('TokenList', TokenRecordSchema);

export const ErrorBody = response(
  'Error',
  z.object({
    error: z.object({
      code: z.string().meta({ examples: ['SPW_ERR_INVALID', 'SPW_ERR_NOT_FOUND', 'SPW_ERR_CONFLICT', 'SPW_ERR_UNAUTHORIZED'] }),
      message: z.string(),
      details: z.unknown().optional(),
    }),
  }),
);

export const Health = response('Health', z.object({ status: z.literal('ok'), version: z.string(), store: z.string(), kinds: z.array(WorkflowKindSchema) }));

// ---- query strings -----------------------------------------------------------------------------

const Limit = z.coerce.number().int().min(1).max(10000);
export const WorkflowQuery = z.strictObject({ state: WorkflowStateSchema.optional(), kind: WorkflowKindSchema.optional(), target: z.string().min(1).max(200).optional(), limit: Limit.optional() });
export const EventsQuery = z.strictObject({
  after: z.coerce.number().int().min(0).optional().meta({ description: 'only events with a larger seq (SSE: the Last-Event-ID header wins)' }),
  format: z.enum(['sse', 'json']).optional().meta({ description: 'json: a plain list of the stored events instead of a stream' }),
  limit: Limit.optional().meta({ description: 'format=json only: at most this many' }),
});
export const AuditQuery = z.strictObject({ target: z.string().min(1).max(200).optional(), limit: Limit.optional() });
export const SiteFilter = z.strictObject({ site: Name.optional() });
export const InstanceFilter = z.strictObject({ instance: Name.optional() });
export const FamilyFilter = z.strictObject({ family: z.string().min(1).max(100).optional() });
export const NoQuery = z.strictObject({});

// ---- the schemas describe exactly the records of types.ts ------------------------------------

type Equals<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
const _checks: [
  Equals<z.output<typeof SiteRecord>, Site>,
  Same<z.output<typeof EdgeRecordSchema>, EdgeRecord>,
  Equals<z.output<typeof HostRecord>, Host>,
  Same<z.output<typeof InstanceRecord>, Instance>,
  Same<z.output<typeof VolumeRecord>, Volume>,
  Equals<z.output<typeof ProfileRecordSchema>, ProfileRecord>,
  // (a new WorkflowKind in types.ts fails here until WORKFLOW_KINDS and WorkflowInputs know it)
  Same<Omit<z.output<typeof WorkflowRecord>, 'input' | 'outputs'>, Omit<Workflow, 'input' | 'outputs'>>,
  Same<Omit<z.output<typeof StepRecordSchema>, 'output'>, Omit<StepRecord, 'output'>>,
  Same<Omit<z.output<typeof WorkflowEventSchema>, 'data'>, Omit<WorkflowEvent, 'data'>>,
  Same<Omit<z.output<typeof AuditEntrySchema>, 'detail'>, Omit<AuditEntry, 'detail'>>,
  Equals<z.output<typeof TokenRecordSchema>, TokenRecord>,
] = [true, true, true, true, true, true, true, true, true, true, true];
void _checks;
