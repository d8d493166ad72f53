// The management service's configuration file (YAML), validated like the edge's: a mistake is
// reported with its path and what to write instead. Documented in docs/control.md. Relative
// paths are resolved against the file's directory.

import { readFileSync } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';

import { ConfigError, duration, name, parseYamlConfig, size } from '../edge/config.js';

const words = z.array(z.string()).default([]);

const site = z.strictObject({ name, kind: z.enum(['onprem', 'cloud']), region: z.string().default(''), tags: words });
const edge = z.strictObject({ name, site: name, control: z.string().describe("the edge's STATE/control.sock"), nbd: z.string().optional(), link: z.string().optional(), cacheBytes: size.optional() });
const host = z.strictObject({
  name,
  site: name,
  provider: z.enum(['local']).default('local'),
  vcpus: z.number().int().positive(),
  ramMiB: z.number().int().positive(),
  iops: z.number().int().nonnegative().default(10000),
  pricePerHour: z.number().nonnegative().default(0),
  licences: words,
  tags: words,
  ha: z.boolean().default(false),
  edge: name,
  state: z.enum(['up', 'down', 'maintenance']).default('up'),
});
const instance = z.strictObject({
  name,
  origin: name,
  host: name.optional(),
  spec: z.strictObject({ kernel: z.string(), initrd: z.string(), append: z.string(), memoryMiB: z.number().int().positive().default(256), vcpus: z.number().int().positive().default(1), mac: z.string().regex(/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/, 'a MAC like 52:54:00:12:34:56') }),
  needs: z.strictObject({ licences: words, tags: words, ha: z.boolean().default(false), iops: z.number().int().nonnegative().default(100) }).default({ licences: [], tags: [], ha: false, iops: 100 }),
  identity: z.strictObject({ hostname: z.string(), machineId: z.string().regex(/^[0-9a-f]{32}$/, '32 hex digits') }),
  volumes: z.array(z.strictObject({ name, path: z.string(), family: name.optional(), policy: z.enum(['remote-only', 'origin', 'write-through']).default('origin') })).min(1),
});

export const controlConfigSchema = z.strictObject({
  /** where the REST API listens. */
  listen: z.string().default('127.0.0.1:7080'),
  /** sqlite:PATH (default STATE/control.db) or postgres://… */
  database: z.string().optional(),
  state: z.string(),
  /** how long a guest may take from QEMU start to ready. */
  bootTimeout: duration.default(300_000),
  /** upserted at every start (instances only when absent: their state belongs to the service). */
  inventory: z.strictObject({ sites: z.array(site).default([]), edges: z.array(edge).default([]), hosts: z.array(host).default([]), instances: z.array(instance).default([]) }).default({ sites: [], edges: [], hosts: [], instances: [] }),
});

export type ControlConfig = z.infer<typeof controlConfigSchema>;
export type InstanceSeed = z.infer<typeof instance>;

export function parseControlConfig(text: string, baseDir: string, source = 'config'): ControlConfig {
  const c = parseYamlConfig(controlConfigSchema, text, source, 'a management service configuration', 'docs/control.md');
  const abs = (p: string) => path.resolve(baseDir, p);
  c.state = abs(c.state);
  c.database ??= `sqlite:${path.join(c.state, 'control.db')}`;
  if (c.database.startsWith('sqlite:')) c.database = `sqlite:${abs(c.database.slice('sqlite:'.length))}`;
  for (const e of c.inventory.edges) e.control = abs(e.control);
  for (const i of c.inventory.instances) {
    i.spec.kernel = abs(i.spec.kernel);
    i.spec.initrd = abs(i.spec.initrd);
    for (const v of i.volumes) v.path = abs(v.path);
  }
  return c;
}

export function loadControlConfig(file: string): ControlConfig {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new ConfigError(`cannot read ${file}: ${(e as Error).message}`);
  }
  return parseControlConfig(text, path.dirname(path.resolve(file)), file);
}
