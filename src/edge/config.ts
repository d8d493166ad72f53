// The edge's configuration file (YAML), validated with a schema so that a mistake is reported
// with its path in the file and what to write instead. Documented in docs/edge.md. Relative
// paths are resolved against the file's directory.

import { readFileSync } from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';
import { z } from 'zod';

import { parseRate } from '../hydrate/hydrator.js';

export class ConfigError extends Error {
  readonly code = 'SPW_ERR_CONFIG';
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

const UNITS: Record<string, number> = { '': 1, b: 1, k: 1024, kb: 1000, kib: 1024, m: 1024 ** 2, mb: 1000 ** 2, mib: 1024 ** 2, g: 1024 ** 3, gb: 1000 ** 3, gib: 1024 ** 3, t: 1024 ** 4, tb: 1000 ** 4, tib: 1024 ** 4 };

/** "64KiB", "10GiB", "1.5G", 4096 → bytes. */
export function parseSize(v: string | number): number {
  if (typeof v === 'number') return v;
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(v);
  const unit = m ? UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) throw new Error(`"${v}" is not a size (examples: 65536, 64KiB, 10GiB)`);
  return Math.round(Number(m[1]) * unit);
}

/** "120s", "500ms", "2m", 30000 (ms) → milliseconds. */
export function parseDuration(v: string | number): number {
  if (typeof v === 'number') return v;
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$/.exec(v);
  if (!m) throw new Error(`"${v}" is not a duration (examples: 500ms, 120s, 2m)`);
  return Number(m[1]) * { ms: 1, s: 1000, m: 60000, h: 3600000 }[m[2] as 'ms' | 's' | 'm' | 'h'];
}

/** "host:port", "[v6]:port" or ":port" / "port" (then 0.0.0.0). */
export function parseAddress(v: string, defaultHost = '0.0.0.0'): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*))?:?(\d{1,5})$/.exec(v.trim());
  if (!m) throw new Error(`"${v}" is not HOST:PORT`);
  const port = Number(m[3]);
  if (port > 65535) throw new Error(`port ${port} is above 65535`);
  return { host: m[1] ?? (m[2] || defaultHost), port };
}

export const size = z.union([z.number().int().nonnegative(), z.string()]).transform((v, ctx) => {
  try {
    return parseSize(v);
  } catch (e) {
    ctx.addIssue({ code: 'custom', message: (e as Error).message });
    return z.NEVER;
  }
});
export const duration = z.union([z.number().nonnegative(), z.string()]).transform((v, ctx) => {
  try {
    return parseDuration(v);
  } catch (e) {
    ctx.addIssue({ code: 'custom', message: (e as Error).message });
    return z.NEVER;
  }
});
const address = z.string().transform((v, ctx) => {
  try {
    return parseAddress(v);
  } catch (e) {
    ctx.addIssue({ code: 'custom', message: (e as Error).message });
    return z.NEVER;
  }
});
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
export const name = z.string().regex(NAME_RE, 'use letters, digits, ".", "_" and "-" (at most 63)');

/** A valid name of a site, edge, peer, volume or family: letters, digits, ".", "_", "-". */
export function isValidName(s: string): boolean {
  return NAME_RE.test(s);
}

const tlsFiles = z.strictObject({ ca: z.string(), cert: z.string(), key: z.string() });

const localVolume = z.strictObject({
  name,
  source: z.string().describe('raw image, block device, or any image qemu-nbd opens'),
  format: z.string().default('raw'),
  chunkSize: size.default(64 * 1024),
  family: name.optional(),
  /** group push: when a chunk of a file is fetched, push the rest of the file, up to this many
   *  bytes per file (0 turns it off). */
  groupPush: size.default(4 * 1024 * 1024),
  /** the source may be written directly by a running VM on this site (QEMU live migration): no
   *  zero map and no lock; every chunk is read from the file when it is asked for. raw only. */
  liveWriter: z.boolean().default(false),
});

const policy = z.enum(['remote-only', 'origin', 'write-through']);

const remoteVolume = z.strictObject({
  name,
  peer: name,
  volume: name.optional().describe('the volume name at the peer (default: name)'),
  ioTimeout: duration.default(120_000),
  readAhead: z.number().int().min(0).max(1024).default(64),
  /** where the guest's writes live; 'read-only' exports the volume without writes. */
  writes: z.enum(['remote-only', 'origin', 'write-through', 'read-only']).default('remote-only'),
  /** byte ranges with their own policy (later entries win). */
  ranges: z.array(z.strictObject({ offset: size, length: size, writes: policy })).default([]),
  /** swap partitions found in the partition table: remote-only (default) or like the rest. */
  swap: z.enum(['remote-only', 'follow']).default('remote-only'),
  rpo: duration.default(30_000),
  shipAt: size.default(64 * 1024 * 1024),
  epochMax: size.default(64 * 1024 * 1024),
  onJournalCorruption: z.enum(['refuse', 'discard-tail']).default('refuse'),
  /** stream a plan made from recorded profiles into the cache as soon as the volume opens. */
  prefetch: z
    .strictObject({
      profiles: z.array(name).default([]),
      /** also merge every profile of the volume's family (other instances of the same base). */
      hotspots: z.boolean().default(false),
      /** bytes of cache the plan may fill (default: half the cache). */
      budget: size.optional(),
    })
    .optional(),
  /** record a profile of this volume's reads from its first read, saved when reads go idle. */
  record: z.strictObject({ name, idle: duration.default(15_000), for: duration.optional() }).optional(),
  /** migration mode: copy every chunk into a volume file at this site, in the background. */
  hydrate: z
    .strictObject({
      path: z.string(),
      /** link bandwidth hydration may use: bytes/s or e.g. "50Mbit" (0 = whatever is free). */
      rate: z
        .union([z.number().nonnegative(), z.string()])
        .default(0)
        .transform((v, ctx) => {
          try {
            return parseRate(v);
          } catch (e) {
            ctx.addIssue({ code: 'custom', message: (e as Error).message });
            return z.NEVER;
          }
        }),
      /** most chunks of hydration in flight (the background gate may allow fewer). */
      inFlight: z.number().int().min(1).max(256).default(8),
      /** start copying at once (else: paused until `spillway volume hydrate NAME --resume`). */
      start: z.boolean().default(true),
    })
    .optional(),
});

export const edgeConfigSchema = z.strictObject({
  site: name,
  name: name.optional(),
  state: z.string(),
  tls: tlsFiles,
  link: z
    .strictObject({
      listen: address.optional(),
      window: size.default(8 * 1024 * 1024),
      rateMbit: z.number().nonnegative().default(0),
    })
    .default({ window: 8 * 1024 * 1024, rateMbit: 0 }),
  nbd: z
    .strictObject({
      listen: z.string().default('127.0.0.1:10809'),
      socket: z.string().optional(),
      tls: z.strictObject({ cert: z.string(), key: z.string(), ca: z.string().optional() }).optional(),
    })
    .default({ listen: '127.0.0.1:10809' }),
  metrics: z.strictObject({ listen: z.string() }).optional(),
  cache: z.strictObject({ dir: z.string(), size: size }).optional(),
  peers: z
    .array(
      z.strictObject({
        name,
        address,
        connections: z.number().int().min(1).max(64).default(2),
      }),
    )
    .default([]),
  volumes: z.array(z.union([remoteVolume, localVolume])).default([]),
});

/** One `volumes:` entry of each role, for callers that take a single entry (the control
 *  socket's POST /v1/volumes); checkVolumeEntry() adds the checks the schema cannot make. */
export const localVolumeSchema = localVolume;
export const remoteVolumeSchema = remoteVolume;

export type EdgeConfig = z.infer<typeof edgeConfigSchema>;
export type LocalVolumeEntry = z.infer<typeof localVolume>;
export type RemoteVolumeEntry = z.infer<typeof remoteVolume>;

export function isRemoteVolume(v: LocalVolumeEntry | RemoteVolumeEntry): v is RemoteVolumeEntry {
  return 'peer' in v;
}

/** YAML text → a schema's value, or a ConfigError listing each path and what is wrong. */
export function parseYamlConfig<T extends z.ZodType>(schema: T, text: string, source: string, what: string, doc: string): z.infer<T> {
  let raw: unknown;
  try {
    raw = YAML.parse(text);
  } catch (e) {
    throw new ConfigError(`${source}: not valid YAML: ${(e as Error).message}`);
  }
  const r = schema.safeParse(raw);
  if (!r.success) {
    const lines = r.error.issues.map((i) => `  ${i.path.join('.') || '(top)'}: ${i.message}`);
    throw new ConfigError(`${source} is not ${what}:\n${lines.join('\n')}\n(see ${doc})`);
  }
  return r.data;
}

/** Parse and validate; relative paths become absolute against `baseDir`. */
export function parseEdgeConfig(text: string, baseDir: string, source = 'config'): EdgeConfig {
  const c = parseYamlConfig(edgeConfigSchema, text, source, 'an edge configuration', 'docs/edge.md');
  const abs = (p: string) => path.resolve(baseDir, p);
  c.state = abs(c.state);
  c.tls = { ca: abs(c.tls.ca), cert: abs(c.tls.cert), key: abs(c.tls.key) };
  if (c.cache) c.cache.dir = abs(c.cache.dir);
  if (c.nbd.socket) c.nbd.socket = abs(c.nbd.socket);
  for (const v of c.volumes) if (isRemoteVolume(v) && v.hydrate) v.hydrate.path = abs(v.hydrate.path);
  if (c.nbd.tls) c.nbd.tls = { cert: abs(c.nbd.tls.cert), key: abs(c.nbd.tls.key), ca: c.nbd.tls.ca ? abs(c.nbd.tls.ca) : undefined };
  const seen = new Set<string>();
  for (const v of c.volumes) {
    const key = `${isRemoteVolume(v) ? 'remote' : 'local'}:${v.name}`;
    if (seen.has(key)) throw new ConfigError(`${source}: volume "${v.name}" is listed twice`);
    seen.add(key);
    if (!isRemoteVolume(v)) v.source = abs(v.source);
    checkVolumeEntry(v, c, source);
  }
  return c;
}

/** The checks of one volume entry that the schema cannot make (against the rest of the
 *  configuration: its peers and cache). Throws ConfigError naming `source`. */
export function checkVolumeEntry(v: LocalVolumeEntry | RemoteVolumeEntry, c: Pick<EdgeConfig, 'peers' | 'cache'>, source: string): void {
  if (isRemoteVolume(v)) {
    if (!c.peers.some((p) => p.name === v.peer)) throw new ConfigError(`${source}: volume "${v.name}" names peer "${v.peer}", which is not under peers:`);
    if (!c.cache) throw new ConfigError(`${source}: volume "${v.name}" is served from a peer, so the edge needs a cache: section (dir, size)`);
    if (v.rpo < 100) throw new ConfigError(`${source}: volume "${v.name}": rpo must be at least 100ms`);
    if (v.epochMax < 1024 * 1024) throw new ConfigError(`${source}: volume "${v.name}": epochMax must be at least 1MiB`);
    if (v.writes === 'read-only' && v.ranges.length > 0) throw new ConfigError(`${source}: volume "${v.name}" is read-only, so it cannot have write ranges`);
  } else {
    const cs = v.chunkSize;
    if (cs < 4096 || cs > 1024 * 1024 || (cs & (cs - 1)) !== 0) throw new ConfigError(`${source}: volume "${v.name}": chunkSize must be a power of two between 4KiB and 1MiB`);
    if (v.liveWriter && v.format !== 'raw') throw new ConfigError(`${source}: volume "${v.name}": liveWriter needs format raw (qemu-nbd would cache a ${v.format} image's metadata while the VM changes it)`);
  }
}

export function loadEdgeConfig(file: string): EdgeConfig {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new ConfigError(`cannot read ${file}: ${(e as Error).message}`);
  }
  return parseEdgeConfig(text, path.dirname(path.resolve(file)), file);
}
