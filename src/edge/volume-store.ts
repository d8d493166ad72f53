// Volumes added to a running edge through its control socket (POST /v1/volumes), kept in
// STATE/volumes.d/NAME.json so that they come back when the edge restarts. Each file holds the
// entry as the caller sent it (one `volumes:` entry of the configuration schema, validated again
// at every load) and, for a detached volume, what the detach produced (a tombstone: the volume
// is not opened again, and a repeated detach answers the same result). Files are replaced
// atomically (temporary file, fsync, rename, directory fsync), so a crash leaves the old record
// or the new one.

import { readdir, readFile, rm } from 'node:fs/promises';
import { mkdirSync } from 'node:fs';
import path from 'node:path';

import { z } from 'zod';

import { fsyncDir, replaceFileDurably } from '../util/durable.js';
import {
  checkVolumeEntry,
  isValidName,
  localVolumeSchema,
  remoteVolumeSchema,
  type EdgeConfig,
  type LocalVolumeEntry,
  type RemoteVolumeEntry,
} from './config.js';
import { EdgeRequestError } from './control.js';

export type VolumeRole = 'local' | 'remote';

/** What a detach produced (the answer of POST /v1/volumes/NAME/detach). */
export interface DetachResult {
  volume: string;
  /** the flattened volume file: a raw disk image with everything the guest wrote. */
  path: string;
  size: number;
  /** bytes the flatten copied from the overlay into the file. */
  flattenedBytes: number;
  /** ISO time the detach completed. */
  at: string;
}

export interface VolumeRecord {
  format: 'spillway-volume';
  version: 1;
  role: VolumeRole;
  /** the entry as the caller sent it. */
  spec: Record<string, unknown>;
  addedAt: string;
  /** set while the volume is being removed: a restart finishes the removal instead of opening
   *  the volume (deleting its files when `deleteFiles`). */
  removing?: { deleteFiles: boolean };
  detached?: DetachResult;
}

/** A parsed entry of either role. */
export type ParsedVolume = { role: 'local'; entry: LocalVolumeEntry } | { role: 'remote'; entry: RemoteVolumeEntry };

/**
 * Validate one volume entry with the configuration's schemas: `source:` makes it a volume this
 * edge owns, `peer:` one served from a peer. Paths must be absolute (there is no file to be
 * relative to). Throws EdgeRequestError(400) saying what is wrong, with the key's path.
 */
export function parseVolumeSpec(raw: unknown, config: Pick<EdgeConfig, 'peers' | 'cache'>): ParsedVolume {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new EdgeRequestError(400, 'the body must be one volume entry: a JSON object like {"name": "web", "source": "/srv/web.img"} or {"name": "web", "peer": "onprem"}');
  const o = raw as Record<string, unknown>;
  const hasPeer = 'peer' in o;
  const hasSource = 'source' in o;
  if (hasPeer === hasSource) {
    throw new EdgeRequestError(400, `a volume entry has either source: (a disk this edge owns) or peer: (a volume served from that peer), ${hasPeer ? 'not both' : 'and this one has neither'}`);
  }
  const schema = hasPeer ? remoteVolumeSchema : localVolumeSchema;
  const r = schema.safeParse(raw);
  if (!r.success) {
    throw new EdgeRequestError(400, `not a valid ${hasPeer ? 'remote' : 'local'} volume entry: ${r.error.issues.map((i) => `${i.path.join('.') || '(entry)'}: ${i.message}`).join('; ')} (see docs/edge.md)`);
  }
  const parsed: ParsedVolume = hasPeer ? { role: 'remote', entry: r.data as RemoteVolumeEntry } : { role: 'local', entry: r.data as LocalVolumeEntry };
  const absolute = (what: string, p: string): string => {
    if (!path.isAbsolute(p)) throw new EdgeRequestError(400, `${what} must be an absolute path (got "${p}"): a volume added while running has no configuration file to be relative to`);
    return path.normalize(p);
  };
  if (parsed.role === 'local') parsed.entry.source = absolute('source', parsed.entry.source);
  else if (parsed.entry.hydrate) parsed.entry.hydrate.path = absolute('hydrate.path', parsed.entry.hydrate.path);
  try {
    checkVolumeEntry(parsed.entry, config, 'volume entry');
  } catch (err) {
    throw new EdgeRequestError(400, (err as Error).message.replace(/^volume entry: /, ''));
  }
  return parsed;
}

/** JSON with object keys sorted: two entries are the same spec when these are equal. */
export function canonical(v: unknown): string {
  return JSON.stringify(v, (_k, x: unknown) => {
    if (x && typeof x === 'object' && !Array.isArray(x)) {
      return Object.fromEntries(Object.entries(x as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
    }
    return x;
  });
}

const recordSchema = z.object({
  format: z.literal('spillway-volume'),
  version: z.literal(1),
  role: z.enum(['local', 'remote']),
  spec: z.record(z.string(), z.unknown()),
  addedAt: z.string(),
  removing: z.object({ deleteFiles: z.boolean() }).optional(),
  detached: z.object({ volume: z.string(), path: z.string(), size: z.number(), flattenedBytes: z.number(), at: z.string() }).optional(),
});

export class VolumeStore {
  constructor(readonly dir: string) {}

  file(name: string): string {
    return path.join(this.dir, `${name}.json`);
  }

  async save(name: string, record: VolumeRecord): Promise<void> {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    await replaceFileDurably(this.file(name), Buffer.from(JSON.stringify(record, null, 2) + '\n'), 0o600);
  }

  async remove(name: string): Promise<void> {
    await rm(this.file(name), { force: true });
    await rm(`${this.file(name)}.tmp`, { force: true });
    await fsyncDir(this.dir).catch(() => undefined);
  }

  /** Every record, in name order; a file that does not read as one is reported, not thrown. */
  async list(): Promise<Array<{ name: string; record?: VolumeRecord; error?: string }>> {
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch (err) {
      if ((err as { code?: string }).code === 'ENOENT') return [];
      throw err;
    }
    const out: Array<{ name: string; record?: VolumeRecord; error?: string }> = [];
    for (const f of names.sort()) {
      if (!f.endsWith('.json')) continue;
      const name = f.slice(0, -'.json'.length);
      if (!isValidName(name)) continue;
      try {
        const r = recordSchema.safeParse(JSON.parse(await readFile(path.join(this.dir, f), 'utf8')));
        if (!r.success) throw new Error(r.error.issues.map((i) => `${i.path.join('.') || '(record)'}: ${i.message}`).join('; '));
        out.push({ name, record: r.data as VolumeRecord });
      } catch (err) {
        out.push({ name, error: `${path.join(this.dir, f)} is not a volume record: ${(err as Error).message}` });
      }
    }
    return out;
  }
}
