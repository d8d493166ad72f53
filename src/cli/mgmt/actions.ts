// Action shortcuts: each starts one workflow with the input built from its arguments, then
// watches it (unless --no-wait). `spillway burst web-1` is `spillway workflow start transfer
// --input '{"instance":"web-1"}'` followed by `spillway workflow watch`.

import { Command, InvalidArgumentError } from 'commander';

import { parseSize } from '../../edge/config.js';
import { ApiClient, withApi, type ApiOptions } from './client.js';
import { bytes, seconds, table } from './render.js';
import { startAndWatch } from './workflow.js';

/** "2GiB", "512MiB", "1073741824" → bytes (the units of the edge configuration). */
export function parseSizeArg(v: string): number {
  let n: number;
  try {
    n = parseSize(v);
  } catch (e) {
    throw new InvalidArgumentError((e as Error).message);
  }
  if (n <= 0) throw new InvalidArgumentError('the size must be above 0');
  return n;
}

type Opts = ApiOptions & { wait?: boolean; host?: string; site?: string; name?: string; detach?: boolean; size?: number };

interface Action {
  command: string;
  kind: string;
  args: string;
  summary: string;
  description: string;
  options?: (c: Command) => Command;
  input(arg: string, o: Opts): Record<string, unknown>;
  examples: string[];
}

const ACTIONS: Action[] = [
  {
    command: 'burst',
    kind: 'transfer',
    args: '<instance>',
    summary: 'run an instance on cloud capacity, its disks streamed from the origin',
    description: 'Start a transfer workflow: the instance stops at its origin and boots on a cloud host (chosen by placement unless --host or --site says where), its disks streamed from the origin.',
    options: (c) => c.option('--host <host>', 'this cloud host (it still has to fit)').option('--site <site>', 'any host of this site'),
    input: (instance, o) => ({ instance, ...(o.host ? { host: o.host } : {}), ...(o.site ? { site: o.site } : {}) }),
    examples: ['spillway burst web-1', 'spillway burst web-1 --site cloud-eu --no-wait'],
  },
  {
    command: 'clone',
    kind: 'clone',
    args: '<instance>',
    summary: 'start a copy of an instance with a fresh identity',
    description: 'Start a clone workflow: a new instance NAME from the instance\'s disks, with its own identity (hostname, machine id).',
    options: (c) => c.requiredOption('--name <name>', 'the new instance').option('--host <host>', 'where it runs (default: placement chooses)').option('--site <site>', 'any host of this site'),
    input: (instance, o) => ({ instance, name: o.name, ...(o.host ? { host: o.host } : {}), ...(o.site ? { site: o.site } : {}) }),
    examples: ['spillway clone web-1 --name web-2', 'spillway clone web-1 --name web-test --host cloud-a --json'],
  },
  {
    command: 'bring-back',
    kind: 'reverse',
    args: '<instance>',
    summary: 'bring a streamed instance back to its origin',
    description: 'Start a reverse workflow: writes made in the cloud drain to the origin, then the instance runs at its origin again.',
    input: (instance) => ({ instance }),
    examples: ['spillway bring-back web-1'],
  },
  {
    command: 'migrate',
    kind: 'migrate',
    args: '<instance>',
    summary: 'move an instance to the cloud for good (hydrate its disks there)',
    description: 'Start a migrate workflow: burst, then copy the disks to the cloud site in the background (hydration) and, unless --no-detach, cut the instance loose from its origin when the copy is complete.',
    options: (c) => c.option('--no-detach', 'keep streaming from the origin after hydration (detach later with `spillway detach`)'),
    input: (instance, o) => ({ instance, detach: o.detach !== false }),
    examples: ['spillway migrate db-1', 'spillway migrate db-1 --no-detach'],
  },
  {
    command: 'detach',
    kind: 'detach',
    args: '<instance>',
    summary: 'cut a migrated instance loose from its origin',
    description: 'Start a detach workflow: the hydrated copy becomes the only copy the instance uses; the origin is no longer needed.',
    input: (instance) => ({ instance }),
    examples: ['spillway detach db-1'],
  },
  {
    command: 'move-live',
    kind: 'live-migrate',
    args: '<instance>',
    summary: 'move a running instance to another host without stopping it',
    description: 'Start a live-migrate workflow: the guest keeps running while it moves to the new host.',
    options: (c) => c.option('--host <host>', 'the destination host (default: placement chooses)').option('--site <site>', 'any host of this site'),
    input: (instance, o) => ({ instance, ...(o.host ? { host: o.host } : {}), ...(o.site ? { site: o.site } : {}) }),
    examples: ['spillway move-live web-1 --host cloud-b'],
  },
  {
    command: 'resize-edge',
    kind: 'resize-edge',
    args: '<edge>',
    summary: "set an edge's cache size",
    description: "Start a resize-edge workflow: the edge's cache takes the new size.",
    options: (c) => c.requiredOption('--size <size>', 'the new cache size, e.g. 2GiB', parseSizeArg),
    input: (edge, o) => ({ edge, sizeBytes: o.size }),
    examples: ['spillway resize-edge cloud-edge --size 2GiB'],
  },
  {
    command: 'start',
    kind: 'start',
    args: '<instance>',
    summary: 'start an instance where its data path is now (origin, streamed or migrated)',
    description: 'Start a start workflow: the instance boots on its host, from its origin disks, from the cloud edge, or from its hydrated disks.',
    input: (instance) => ({ instance }),
    examples: ['spillway start web-1'],
  },
  {
    command: 'stop',
    kind: 'stop',
    args: '<instance>',
    summary: 'stop an instance (the guest syncs first)',
    description: 'Start a stop workflow: the guest syncs its disks on its console, then QEMU quits.',
    input: (instance) => ({ instance }),
    examples: ['spillway stop web-1'],
  },
];

export function registerActions(program: Command): void {
  for (const a of ACTIONS) {
    let c = program.command(a.command).argument(a.args, a.args === '<edge>' ? 'the edge (see `spillway inventory edges list`)' : 'the instance (see `spillway inventory instances list`)').summary(a.summary);
    c = a.options ? a.options(c) : c;
    withApi(
      c
        .option('--no-wait', 'print the started workflow and return instead of watching it')
        .description(`${a.description}\n\nThen follows it like \`spillway workflow watch\`: exit code 0 when it succeeded, 1 when it failed or was cancelled. Ctrl-C stops watching, not the workflow.`)
        .addHelpText('after', `\nExamples:\n${a.examples.map((e) => `  ${e}`).join('\n')}`),
    ).action(async (arg: string, o: Opts) => startAndWatch(o, a.kind, a.input(arg, o)));
  }
}

interface InstanceStats {
  instance: string;
  host: string;
  status: string;
  pid: number;
  cpu: { processMs: number };
  disks: Array<{ device: string; readBytes: number; writtenBytes: number; reads: number; writes: number; flushes: number }>;
}

/** `spillway stats INSTANCE`: GET /v1/instances/{name}/stats. */
export function registerStats(program: Command): void {
  withApi(
    program
      .command('stats')
      .argument('<instance>', 'a running instance')
      .summary("a running instance's run state, CPU time and disk I/O (from QEMU)")
      .description("What QEMU reports for a running instance through QMP where it runs: run state, the process's CPU time, and per-disk read/write counters.")
      .addHelpText('after', '\nExample:\n  spillway stats web-1 --json'),
  ).action(async (instance: string, o: ApiOptions) => {
    const s = await ApiClient.from(o).request<InstanceStats>('GET', `/v1/instances/${encodeURIComponent(instance)}/stats`);
    if (o.json) {
      process.stdout.write(`${JSON.stringify(s)}\n`);
      return;
    }
    process.stdout.write(`${s.instance} on ${s.host}: ${s.status}, QEMU pid ${s.pid}, ${seconds(s.cpu.processMs)} of CPU\n`);
    process.stdout.write(`${table(['DISK', 'READ', 'WRITTEN', 'READS', 'WRITES', 'FLUSHES'], s.disks.map((d) => [d.device, bytes(d.readBytes), bytes(d.writtenBytes), d.reads, d.writes, d.flushes]))}\n`);
  });
}
