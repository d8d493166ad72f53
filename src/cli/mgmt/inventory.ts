// `spillway inventory <sites|edges|hosts|instances|volumes|profiles> [list|show|put|delete]`:
// the management service's records (not an edge's own volumes and profiles; for those see
// `spillway volume` and `spillway profile`).

import { readFileSync } from 'node:fs';
import { Command } from 'commander';
import YAML from 'yaml';

import type { EdgeRecord, Host, Instance, ProfileRecord, Site, Volume } from '../../control/types.js';
import { ApiClient, CliError, withApi, type ApiOptions } from './client.js';
import { bytes, table } from './render.js';

interface Kind {
  plural: string;
  singular: string;
  example: string;
  filter?: { option: string; param: string; help: string };
  columns: string[];
  row(r: Record<string, unknown>): Array<string | number | null | undefined>;
}

const an = (w: string) => (/^[aeiou]/.test(w) ? `an ${w}` : `a ${w}`);
const list = (v: unknown) => (Array.isArray(v) && v.length ? v.join(',') : '');

const KINDS: Kind[] = [
  {
    plural: 'sites',
    singular: 'site',
    example: '{"kind": "cloud", "region": "eu-west", "tags": ["eu"]}',
    columns: ['NAME', 'KIND', 'REGION', 'TAGS'],
    row: (x) => {
      const s = x as unknown as Site;
      return [s.name, s.kind, s.region, list(s.tags)];
    },
  },
  {
    plural: 'edges',
    singular: 'edge',
    example: '{"site": "cloud-eu", "control": "/var/lib/spillway/cloud/control.sock", "nbd": "127.0.0.1:10809"}',
    filter: { option: '--site <site>', param: 'site', help: 'only the edges of this site' },
    columns: ['NAME', 'SITE', 'CONTROL', 'NBD', 'LINK', 'CACHE'],
    row: (x) => {
      const e = x as unknown as EdgeRecord;
      return [e.name, e.site, e.control, e.nbd, e.link, e.cacheBytes === undefined ? '' : bytes(e.cacheBytes)];
    },
  },
  {
    plural: 'hosts',
    singular: 'host',
    example: '{"site": "cloud-eu", "edge": "cloud-edge", "vcpus": 8, "ramMiB": 16384, "iops": 20000, "pricePerHour": 0.4}',
    filter: { option: '--site <site>', param: 'site', help: 'only the hosts of this site' },
    columns: ['NAME', 'SITE', 'STATE', 'VCPUS', 'RAM', 'IOPS', 'PRICE/H', 'EDGE', 'TAGS'],
    row: (x) => {
      const h = x as unknown as Host;
      return [h.name, h.site, h.state, h.vcpus, bytes(h.ramMiB * 1048576), h.iops, h.pricePerHour, h.edge, list(h.tags)];
    },
  },
  {
    plural: 'instances',
    singular: 'instance',
    example: '{"origin": "onprem", "spec": {"kernel": "/images/vmlinuz", "initrd": "/images/initrd", "append": "console=ttyS0", "memoryMiB": 1024, "vcpus": 2, "mac": "52:54:00:12:34:56"}}',
    columns: ['NAME', 'ORIGIN', 'HOST', 'STATE', 'PLACEMENT', 'VCPUS', 'MEMORY', 'CLONE OF'],
    row: (x) => {
      const i = x as unknown as Instance;
      return [i.name, i.origin, i.host, i.state, i.placement, i.spec.vcpus, bytes(i.spec.memoryMiB * 1048576), i.cloneOf];
    },
  },
  {
    plural: 'volumes',
    singular: 'volume',
    example: '{"instance": "web-1", "path": "/images/web-1.raw", "sizeBytes": 10737418240, "family": "debian12"}',
    filter: { option: '--instance <instance>', param: 'instance', help: 'only the volumes of this instance' },
    columns: ['NAME', 'INSTANCE', 'SIZE', 'FAMILY', 'POLICY', 'PATH'],
    row: (x) => {
      const v = x as unknown as Volume;
      return [v.name, v.instance, bytes(v.sizeBytes), v.family, v.policy, v.path];
    },
  },
  {
    plural: 'profiles',
    singular: 'profile',
    example: '{"family": "debian12", "volume": "web-1-root", "chunks": 321}',
    filter: { option: '--family <family>', param: 'family', help: 'only the profiles of this volume family' },
    columns: ['NAME', 'FAMILY', 'VOLUME', 'CHUNKS'],
    row: (x) => {
      const p = x as unknown as ProfileRecord;
      return [p.name, p.family, p.volume, p.chunks];
    },
  },
];

/** A record from a JSON (or YAML) file, "-" for stdin. */
function readRecord(file: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(file === '-' ? 0 : file, 'utf8');
  } catch (err) {
    throw new CliError(`cannot read ${file}: ${(err as Error).message}`);
  }
  let v: unknown;
  try {
    v = /\.ya?ml$/i.test(file) ? YAML.parse(text) : JSON.parse(text);
  } catch (err) {
    throw new CliError(`${file} is not ${/\.ya?ml$/i.test(file) ? 'YAML' : 'JSON'}: ${(err as Error).message}`);
  }
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw new CliError(`${file} must hold one object (the record's fields)`);
  return v as Record<string, unknown>;
}

export function registerInventory(program: Command): void {
  const inv = program
    .command('inventory')
    .summary("the management service's records: sites, edges, hosts, instances, volumes, profiles")
    .description(
      "Show and change the management service's inventory over its REST API. Each kind has list (the default), show NAME, put NAME --file F.json and delete NAME. Writes need an operator token.\n\n(`spillway volume` and `spillway profile` talk to one edge directly; these are the service's records.)",
    )
    .addHelpText('after', '\nExamples:\n  spillway inventory hosts\n  spillway inventory instances show web-1 --json\n  spillway inventory sites put cloud-eu --file site.json\n  spillway inventory volumes delete old-disk');

  for (const k of KINDS) {
    const base = `/v1/${k.plural}`;
    const one = (name: string) => `${base}/${encodeURIComponent(name)}`;
    const group = inv
      .command(k.plural)
      .summary(`${k.plural}: list | show NAME | put NAME --file F | delete NAME`)
      .description(`The ${k.plural} of the inventory. Without a subcommand: list.`)
      .addHelpText(
        'after',
        `\nExamples:\n  spillway inventory ${k.plural}\n  spillway inventory ${k.plural} show NAME --json\n  echo '${k.example}' > ${k.singular}.json\n  spillway inventory ${k.plural} put NAME --file ${k.singular}.json\n  spillway inventory ${k.plural} delete NAME`,
      );

    let listCmd = group
      .command('list', { isDefault: true })
      .description(`List the ${k.plural}.`)
      .addHelpText('after', `\nExamples:\n  spillway inventory ${k.plural}\n  spillway inventory ${k.plural} list --json`);
    if (k.filter) listCmd = listCmd.option(k.filter.option, k.filter.help);
    withApi(listCmd).action(async (o: ApiOptions & Record<string, string | undefined>) => {
      const v = k.filter ? o[k.filter.param] : undefined;
      const r = await ApiClient.from(o).request<{ items: Array<Record<string, unknown>> }>('GET', base + (k.filter && v ? `?${k.filter.param}=${encodeURIComponent(v)}` : ''));
      if (o.json) return void process.stdout.write(JSON.stringify(r.items, null, 2) + '\n');
      if (!r.items.length) return void process.stdout.write(`no ${k.plural}\n`);
      process.stdout.write(table(k.columns, r.items.map(k.row)));
    });

    withApi(group.command('show').argument('<name>', `the ${k.singular}`).description(`Show one ${k.singular}, every field.`).addHelpText('after', `\nExample:\n  spillway inventory ${k.plural} show NAME --json`)).action(async (name: string, o: ApiOptions) => {
      const r = await ApiClient.from(o).request<Record<string, unknown>>('GET', one(name));
      process.stdout.write(o.json ? JSON.stringify(r, null, 2) + '\n' : YAML.stringify(r));
    });

    withApi(
      group
        .command('put')
        .argument('<name>', `the ${k.singular}`)
        .requiredOption('-f, --file <file>', 'the record as JSON (or .yaml); "-" reads stdin')
        .description(`Create or replace ${an(k.singular)}. The file holds its fields (the name comes from the argument; GET /openapi.json or docs/api.md lists them).`)
        .addHelpText('after', `\nExample:\n  echo '${k.example}' > ${k.singular}.json\n  spillway inventory ${k.plural} put NAME --file ${k.singular}.json`),
    ).action(async (name: string, o: ApiOptions & { file: string }) => {
      const body = readRecord(o.file);
      const r = await ApiClient.from(o).request<Record<string, unknown>>('PUT', one(name), body);
      process.stdout.write(o.json ? JSON.stringify(r, null, 2) + '\n' : `${k.singular} ${name} saved\n`);
    });

    withApi(
      group
        .command('delete')
        .argument('<name>', `the ${k.singular}`)
        .description(`Delete ${an(k.singular)}. Refused while other records refer to it or an unfinished workflow acts on it.`)
        .addHelpText('after', `\nExample:\n  spillway inventory ${k.plural} delete NAME`),
    ).action(async (name: string, o: ApiOptions) => {
      await ApiClient.from(o).request('DELETE', one(name));
      process.stdout.write(o.json ? JSON.stringify({ deleted: name, kind: k.singular }) + '\n' : `${k.singular} ${name} deleted\n`);
    });
  }
}
