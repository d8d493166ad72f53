// bench/nbd: our NBD server side by side with qemu-nbd and nbdkit, all serving the same raw file
// of random data on 127.0.0.1, measured through the same clients (nbdcopy, fio's nbd engine).
// Each workload runs --runs times per server, servers interleaved (A B C A B C), each measurement
// on a freshly started server after one unmeasured warm-up pass; the table shows medians and
// ratios against the peers.
//
//   npx tsx bench/nbd.ts [--size 1G] [--runs 3] [--out bench/results/nbd.json]
//                        [--servers spillway,qemu-nbd,nbdkit] [--workloads seqread,randread,randwrite]
//                        [--runtime 10] [--no-warmup] [--spillway-cli dist/cli.js]
//
// A benchmark, not a test: it exits 0 whether targets are met or missed (see bench/README.md).

import os from 'node:os';
import path from 'node:path';
import { rm } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { installCleanupHandlers, runBench } from './lib/cleanup.js';
import { FIO_PERCENTILE_ARGS, parseFioJson } from './lib/fio.js';
import { copyFileDurable, makeTempDir, writeRandomFile } from './lib/files.js';
import {
  checkNbdServerAvailable,
  isNbdServerKind,
  NBD_SERVER_KINDS,
  NBD_SERVERS,
  probeExport,
  REPO_ROOT,
  SPILLWAY_CLI,
  startNbdServer,
  type ExportInfo,
  type NbdServerKind,
} from './lib/nbd-servers.js';
import { haveCommand, processCpuSeconds, runCommand } from './lib/process.js';
import { machineInfo, writeJsonResult } from './lib/results.js';
import { formatSize, parseSize } from './lib/size.js';
import { median, ratio, spread } from './lib/stats.js';
import { fmt, fmtRatio, formatTable, type Column } from './lib/table.js';
import { positiveInt } from './lib/args.js';

const WORKLOAD_IDS = ['seqread', 'randread', 'randwrite'] as const;
/** fio seconds of the unmeasured warm-up pass (nbdcopy warms up with one whole copy). */
const WARMUP_FIO_SEC = 3;
type WorkloadId = (typeof WORKLOAD_IDS)[number];

interface Options {
  sizeBytes: number;
  runs: number;
  out: string;
  servers: NbdServerKind[];
  workloads: WorkloadId[];
  fioRuntimeSec: number;
  /** spillway's cli.js (default dist/cli.js), e.g. a copy of another build. */
  spillwayCli: string;
  /** One unmeasured pass of each workload per server before the measured runs. */
  warmup: boolean;
}

const USAGE = `Usage: npx tsx bench/nbd.ts [options]

Serves one file of random data with each NBD server in turn and measures it with the same
clients: nbdcopy (sequential read), fio's nbd engine (4 KiB random read and random write with
flushes, QD16). Prints medians and ratios against qemu-nbd and nbdkit; writes them as JSON.

Options:
  --size SIZE         image size, binary units (default 1G)
  --runs N            measurements per workload and server, interleaved (default 3)
  --out FILE          JSON results (default bench/results/nbd.json)
  --servers LIST      comma-separated, from ${NBD_SERVER_KINDS.join(',')} (default all; spillway needs
                      \`npm run build\` first)
  --workloads LIST    comma-separated, from ${WORKLOAD_IDS.join(',')} (default all)
  --runtime SECONDS   fio run time per measurement (default 10)
  --no-warmup         measure from the first pass (default: one unmeasured pass per server
                      and workload first)
  --spillway-cli PATH spillway's cli.js to run (default dist/cli.js), e.g. a copy of a build
                      that others cannot rebuild under the bench's feet
  -h, --help          this text`;

function parseList<T extends string>(text: string, valid: readonly T[], what: string): T[] {
  const items = text
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '');
  for (const item of items) {
    if (!(valid as readonly string[]).includes(item)) throw new Error(`unknown ${what} ${JSON.stringify(item)}; choose from ${valid.join(', ')}`);
  }
  if (items.length === 0) throw new Error(`--${what}s: empty list`);
  return [...new Set(items as T[])];
}


function parseOptions(argv: string[]): Options | null {
  const { values } = parseArgs({
    args: argv,
    options: {
      size: { type: 'string', default: '1G' },
      runs: { type: 'string', default: '3' },
      out: { type: 'string', default: path.join('bench', 'results', 'nbd.json') },
      servers: { type: 'string', default: NBD_SERVER_KINDS.join(',') },
      workloads: { type: 'string', default: WORKLOAD_IDS.join(',') },
      runtime: { type: 'string', default: '10' },
      'spillway-cli': { type: 'string', default: SPILLWAY_CLI },
      'no-warmup': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) return null;
  const sizeBytes = parseSize(values.size);
  if (sizeBytes % 4096 !== 0 || sizeBytes < 2 ** 20) throw new Error('--size must be a multiple of 4 KiB and at least 1 MiB');
  const servers = parseList(values.servers, NBD_SERVER_KINDS, 'server').filter(isNbdServerKind);
  // Report in a fixed order whatever order was typed: ours first, then the peers.
  servers.sort((a, b) => NBD_SERVER_KINDS.indexOf(a) - NBD_SERVER_KINDS.indexOf(b));
  return {
    sizeBytes,
    runs: positiveInt(values.runs, 'runs'),
    out: path.resolve(values.out),
    servers,
    workloads: parseList(values.workloads, WORKLOAD_IDS, 'workload'),
    fioRuntimeSec: positiveInt(values.runtime, 'runtime'),
    spillwayCli: path.resolve(values['spillway-cli']),
    warmup: !values['no-warmup'],
  };
}

// ---------------------------------------------------------------------------------------------
// Workloads: each measures one server at `uri` and returns named figures (null = not reported).

type Metrics = Record<string, number | null>;

interface Workload {
  title: string;
  /** Serve a fresh copy of the image for each measurement (the workload writes). */
  freshCopy: boolean;
  /** The client command line, for the report. */
  client: (uri: string, opts: Options) => [string, string[]];
  measure: (uri: string, opts: Options) => Promise<Metrics>;
  /** Server CPU cost normalised by the work done (the CPU seconds are measured around `measure`). */
  cpuCost: (m: Metrics, cpuSec: number, opts: Options) => Metrics;
  /** One line for the progress log. */
  describe: (m: Metrics) => string;
}

function fioArgs(name: string, uri: string, opts: Options, rw: string[]): string[] {
  // --thread: a forked fio job stuck on a server that stopped answering would keep stdout open
  // after the timeout killed fio, and hang the bench.
  return [`--name=${name}`, '--ioengine=nbd', `--uri=${uri}`, ...rw, '--bs=4k', '--iodepth=16', `--runtime=${opts.fioRuntimeSec}`, '--time_based', '--thread', ...FIO_PERCENTILE_ARGS, '--output-format=json'];
}

async function runFio(args: string[], opts: Options) {
  const r = await runCommand('fio', args, { timeoutMs: (opts.fioRuntimeSec + 120) * 1000 });
  const [job] = parseFioJson(r.stdout);
  if (!job) throw new Error('fio reported no job');
  return job;
}

const WORKLOADS: Record<WorkloadId, Workload> = {
  seqread: {
    title: 'sequential read',
    freshCopy: false,
    client: (uri) => ['nbdcopy', [uri, 'null:']],
    measure: async (uri, opts) => {
      const r = await runCommand('nbdcopy', [uri, 'null:'], { timeoutMs: 900_000 });
      return { seconds: r.seconds, gibPerSec: opts.sizeBytes / 2 ** 30 / r.seconds };
    },
    cpuCost: (_m, cpuSec, opts) => ({ serverCpuSecPerGiB: cpuSec / (opts.sizeBytes / 2 ** 30) }),
    describe: (m) => `${fmt(m['gibPerSec'])} GiB/s (${fmt(m['seconds'])} s), server CPU ${fmt(m['serverCpuSecPerGiB'])} s/GiB`,
  },
  randread: {
    title: '4 KiB random read, QD16',
    freshCopy: false,
    client: (uri, opts) => ['fio', fioArgs('randread', uri, opts, ['--rw=randread'])],
    measure: async (uri, opts) => {
      const job = await runFio(fioArgs('randread', uri, opts, ['--rw=randread']), opts);
      return { kiops: job.read.iops / 1000, p99Us: job.read.clat.p99Us, meanUs: job.read.clat.meanUs, ios: job.read.ios };
    },
    cpuCost: (m, cpuSec) => ({ serverCpuUsPerRequest: (cpuSec * 1e6) / Math.max(1, m['ios'] ?? 0) }),
    describe: (m) => `${fmt(m['kiops'], 1)} kIOPS, p99 ${fmt(m['p99Us'], 0)} µs, server CPU ${fmt(m['serverCpuUsPerRequest'], 1)} µs/request`,
  },
  randwrite: {
    title: '4 KiB random write, QD16, fio fsync=64 (NBD_CMD_FLUSH)',
    freshCopy: true,
    client: (uri, opts) => ['fio', fioArgs('randwrite', uri, opts, ['--rw=randwrite', '--fsync=64'])],
    measure: async (uri, opts) => {
      const job = await runFio(fioArgs('randwrite', uri, opts, ['--rw=randwrite', '--fsync=64']), opts);
      const flushes = job.sync?.ios ?? 0;
      if (flushes === 0) console.error('warning: fio reports no flush sent during randwrite; the figure is for writes only');
      return {
        kiops: job.write.iops / 1000,
        p99Us: job.write.clat.p99Us,
        meanUs: job.write.clat.meanUs,
        ios: job.write.ios,
        flushes,
        writesPerFlush: flushes > 0 ? job.write.ios / flushes : null,
        flushP99Us: job.sync?.lat?.p99Us ?? null,
      };
    },
    cpuCost: (m, cpuSec) => ({ serverCpuUsPerRequest: (cpuSec * 1e6) / Math.max(1, (m['ios'] ?? 0) + (m['flushes'] ?? 0)) }),
    describe: (m) =>
      `${fmt(m['kiops'], 1)} kIOPS, p99 ${fmt(m['p99Us'], 0)} µs, ${fmt(m['flushes'], 0)} flushes (${fmt(m['writesPerFlush'], 1)} writes/flush), server CPU ${fmt(m['serverCpuUsPerRequest'], 1)} µs/request`,
  },
};

// ---------------------------------------------------------------------------------------------
// The summary table: one row per reported figure, with targets on the throughput rows.

interface Target {
  /** Minimum ours/qemu-nbd. */
  vsQemu?: number;
  /** Minimum ours/nbdkit. */
  vsNbdkit?: number;
}

interface Row {
  workload: WorkloadId;
  metric: string;
  label: string;
  digits: number;
  better: 'higher' | 'lower' | 'info';
  target?: Target;
}

const ROWS: Row[] = [
  { workload: 'seqread', metric: 'gibPerSec', label: 'seq read, GiB/s', digits: 2, better: 'higher', target: { vsQemu: 1.0, vsNbdkit: 0.8 } },
  { workload: 'seqread', metric: 'serverCpuSecPerGiB', label: 'seq read server CPU s/GiB (lower=better)', digits: 2, better: 'lower' },
  { workload: 'randread', metric: 'kiops', label: 'randread 4k QD16, kIOPS', digits: 1, better: 'higher', target: { vsQemu: 1.0 } },
  { workload: 'randread', metric: 'p99Us', label: 'randread p99 µs (lower=better)', digits: 0, better: 'lower' },
  { workload: 'randread', metric: 'serverCpuUsPerRequest', label: 'randread server CPU µs/request (lower=better)', digits: 1, better: 'lower' },
  { workload: 'randwrite', metric: 'kiops', label: 'randwrite+flush 4k QD16, kIOPS', digits: 1, better: 'higher', target: { vsQemu: 0.8 } },
  { workload: 'randwrite', metric: 'p99Us', label: 'randwrite p99 µs (lower=better)', digits: 0, better: 'lower' },
  { workload: 'randwrite', metric: 'serverCpuUsPerRequest', label: 'randwrite server CPU µs/request (lower=better)', digits: 1, better: 'lower' },
  { workload: 'randwrite', metric: 'writesPerFlush', label: 'randwrite writes per flush', digits: 1, better: 'info' },
];

function describeTarget(t: Target | undefined): string {
  if (!t) return '-';
  const parts: string[] = [];
  if (t.vsQemu !== undefined) parts.push(`>=${t.vsQemu.toFixed(1)}x qemu-nbd`);
  if (t.vsNbdkit !== undefined) parts.push(`>=${t.vsNbdkit.toFixed(1)}x nbdkit`);
  return parts.join(', ');
}

interface Sample {
  workload: WorkloadId;
  run: number;
  server: NbdServerKind;
  metrics: Metrics;
}

interface SummaryRow {
  label: string;
  workload: WorkloadId;
  metric: string;
  better: Row['better'];
  median: Partial<Record<NbdServerKind, number | null>>;
  /** (max - min) / median over the runs, per server. */
  spread: Partial<Record<NbdServerKind, number | null>>;
  vsQemu: number | null;
  vsNbdkit: number | null;
  target: string;
  result: 'met' | 'missed' | 'n/a' | '';
}

function summarize(samples: Sample[], opts: Options): SummaryRow[] {
  const out: SummaryRow[] = [];
  for (const row of ROWS) {
    if (!opts.workloads.includes(row.workload)) continue;
    const med: SummaryRow['median'] = {};
    const spr: SummaryRow['spread'] = {};
    for (const server of opts.servers) {
      const values = samples
        .filter((s) => s.workload === row.workload && s.server === server)
        .map((s) => s.metrics[row.metric])
        .filter((v): v is number => typeof v === 'number' && Number.isFinite(v));
      med[server] = values.length > 0 ? median(values) : null;
      spr[server] = spread(values);
    }
    const vsQemu = ratio(med.spillway, med['qemu-nbd']);
    const vsNbdkit = ratio(med.spillway, med.nbdkit);
    let result: SummaryRow['result'] = '';
    if (row.target) {
      const checks: (boolean | null)[] = [];
      if (row.target.vsQemu !== undefined) checks.push(vsQemu === null ? null : vsQemu >= row.target.vsQemu);
      if (row.target.vsNbdkit !== undefined) checks.push(vsNbdkit === null ? null : vsNbdkit >= row.target.vsNbdkit);
      result = checks.includes(false) ? 'missed' : checks.includes(null) ? 'n/a' : 'met';
    }
    out.push({ label: row.label, workload: row.workload, metric: row.metric, better: row.better, median: med, spread: spr, vsQemu, vsNbdkit, target: describeTarget(row.target), result });
  }
  return out;
}

function renderTable(summary: SummaryRow[], opts: Options): string {
  const columns: Column[] = [{ header: 'workload' }, ...opts.servers.map((s) => ({ header: s, right: true })), { header: 'vs qemu-nbd', right: true }, { header: 'vs nbdkit', right: true }, { header: 'target' }, { header: 'result' }];
  const rows = summary.map((r) => {
    const digits = ROWS.find((x) => x.workload === r.workload && x.metric === r.metric)?.digits ?? 2;
    return [r.label, ...opts.servers.map((s) => fmt(r.median[s], digits)), fmtRatio(r.vsQemu), fmtRatio(r.vsNbdkit), r.target, r.result];
  });
  return formatTable(columns, rows);
}

// ---------------------------------------------------------------------------------------------

async function checkTools(opts: Options): Promise<void> {
  const needed = new Map<string, string>([['nbdinfo', 'libnbd-bin']]);
  if (opts.workloads.includes('seqread')) needed.set('nbdcopy', 'libnbd-bin');
  if (opts.workloads.some((w) => w !== 'seqread')) needed.set('fio', 'fio');
  const problems: string[] = [];
  for (const [cmd, pkg] of needed) if (!(await haveCommand(cmd))) problems.push(`${cmd} is missing: apt-get install ${pkg}`);
  for (const server of opts.servers) {
    await checkNbdServerAvailable(server, { spillwayCli: opts.spillwayCli }).catch((e: Error) => problems.push(e.message));
  }
  if (problems.length > 0) throw new Error(problems.join('\n'));
}

/** fio before axboe/fio PR #1754 (merged April 2024) issues more than one flush per fsync point. */
function fioFlushNote(fioVersion: string): string {
  return (
    `${fioVersion}: fsync=64 makes fio's nbd engine send NBD_CMD_FLUSH (DDIR_SYNC -> nbd_aio_flush). ` +
    'fio releases without axboe/fio PR #1754 (merged April 2024; Debian 12 ships 3.33) keep issuing flushes ' +
    'at a sync point until the first one completes, so each sync point sends a burst of up to iodepth (16) flushes; ' +
    'the slower a server flushes, the more flushes it gets. "writes per flush" shows what each server received.'
  );
}

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  if (!opts) {
    console.log(USAGE);
    return;
  }
  installCleanupHandlers();
  await checkTools(opts);

  const tools: Record<string, readonly string[]> = { nbdcopy: ['nbdcopy', '--version'], nbdinfo: ['nbdinfo', '--version'], fio: ['fio', '--version'] };
  for (const s of opts.servers) tools[s] = NBD_SERVERS[s].version({ spillwayCli: opts.spillwayCli });
  const machine = await machineInfo(REPO_ROOT, tools);
  const [load1] = machine.loadAverage;
  if (load1 !== undefined && load1 > machine.nproc / 2) {
    console.error(`note: load average ${load1} on ${machine.nproc} CPUs before starting: other work will skew these figures`);
  }

  const tmp = await makeTempDir('spw-bench-nbd-');
  const image = path.join(tmp.dir, 'random.img');
  console.error(`writing ${formatSize(opts.sizeBytes)} of random data to ${image}…`);
  await writeRandomFile(image, opts.sizeBytes);

  // What each server advertises (multi-conn decides how many connections nbdcopy opens).
  const exports: Partial<Record<NbdServerKind, ExportInfo>> = {};
  const commands: Partial<Record<NbdServerKind, string>> = {};
  for (const server of opts.servers) {
    const s = await startNbdServer(server, image, { spillwayCli: opts.spillwayCli });
    try {
      exports[server] = await probeExport(s.uri);
      commands[server] = s.commandLine.replace(String(s.port), 'PORT').replace(image, 'IMAGE').replace(REPO_ROOT + path.sep, '');
    } finally {
      await s.stop();
    }
  }

  const samples: Sample[] = [];
  for (const workloadId of opts.workloads) {
    const w = WORKLOADS[workloadId];
    for (let run = 1; run <= opts.runs; run++) {
      for (const server of opts.servers) {
        // One server at a time (spillway and qemu-nbd both lock the image), a fresh process per
        // measurement, and a fresh copy of the image when the workload writes.
        let file = image;
        if (w.freshCopy) {
          file = path.join(tmp.dir, `${workloadId}-${server}-${run}.img`);
          await copyFileDurable(image, file);
        }
        const s = await startNbdServer(server, file, { spillwayCli: opts.spillwayCli });
        try {
          // A storage target runs warm; without this pass V8's JIT about doubles our CPU cost.
          if (opts.warmup) await w.measure(s.uri, { ...opts, fioRuntimeSec: Math.min(WARMUP_FIO_SEC, opts.fioRuntimeSec) });
          const cpuBefore = await processCpuSeconds(s.proc.pid);
          const measured = await w.measure(s.uri, opts);
          const cpuSec = (await processCpuSeconds(s.proc.pid)) - cpuBefore;
          const metrics = { ...measured, serverCpuSec: cpuSec, ...w.cpuCost(measured, cpuSec, opts) };
          samples.push({ workload: workloadId, run, server, metrics });
          console.error(`[${workloadId} ${run}/${opts.runs}] ${server.padEnd(8)} ${w.describe(metrics)}`);
        } finally {
          await s.stop();
          if (file !== image) await rm(file, { force: true });
        }
      }
    }
  }

  const summary = summarize(samples, opts);
  const table = renderTable(summary, opts);
  const notes = [
    'Whole-process measurements on loopback: client and server share the CPUs. Quote ratios, not absolutes.',
    `Medians of ${opts.runs} run(s) per server, servers interleaved, a fresh server process per measurement (start-up not timed), ${opts.warmup ? `warmed up with one unmeasured pass of the workload (fio: ${Math.min(WARMUP_FIO_SEC, opts.fioRuntimeSec)} s)` : 'not warmed up (--no-warmup)'}.`,
    'seq read throughput = image size / nbdcopy wall time; nbdcopy opens 4 connections only when the server advertises multi-conn.',
    'fio latencies are completion latencies (clat), p99 over the whole run.',
    'server CPU = user+system time of the server process (all threads) during the measurement, per GiB copied or per request (writes and flushes); less sensitive to other load than throughput.',
  ];
  if (opts.workloads.includes('randwrite')) notes.push(fioFlushNote(machine.tools['fio'] ?? 'fio'));

  console.log(`\nbench/nbd: ${formatSize(opts.sizeBytes)} random image, ${opts.runs} run(s), medians; ratios are spillway / peer`);
  console.log(table);
  for (const n of notes) console.log(`- ${n}`);

  const clients: Partial<Record<WorkloadId, string>> = {};
  for (const id of opts.workloads) {
    const [cmd, args] = WORKLOADS[id].client('nbd://127.0.0.1:PORT/', opts);
    clients[id] = [cmd, ...args].join(' ');
  }
  await writeJsonResult(opts.out, {
    bench: 'nbd',
    machine,
    config: { sizeBytes: opts.sizeBytes, runs: opts.runs, fioRuntimeSec: opts.fioRuntimeSec, warmup: opts.warmup, warmupFioSec: Math.min(WARMUP_FIO_SEC, opts.fioRuntimeSec), servers: opts.servers, workloads: opts.workloads, serverCommands: commands, clientCommands: clients },
    exports,
    summary,
    samples,
    notes,
    loadAverageAtEnd: os.loadavg().map((l) => Math.round(l * 100) / 100),
  });
  console.log(`\nresults: ${path.relative(process.cwd(), opts.out) || opts.out}`);
}

runBench('bench/nbd', main);
