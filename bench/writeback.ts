// bench/writeback: what a guest writing to a disk that lives at the other site feels and costs,
// with the `writes: origin` policy (writes acknowledged at local latency into an epoch and an
// encrypted journal, sealed by the guest's flush, shipped to the origin in coalesced batches).
// Every process is real: startTwoSites (test/helpers/edges.ts) starts a PKI, the on-prem edge
// owning the image, a `spillway wanem` relay and the cloud edge exporting the volume over NBD.
//
//   npx tsx bench/writeback.ts [--parts guest,coalescing,rpo] [--runs 2] [--runtime 10]
//                              [--duration 60] [--quick] [--out bench/results/writeback.json]
//
// Measures:
//   1. guest writes through the cloud edge (fio's nbd engine) next to a local qemu-nbd on a raw
//      file: 4 KiB random writes QD16 with a flush every 64 writes, 1 MiB sequential writes;
//      IOPS or MB/s and p50/p99 completion latency, ratio ours / qemu-nbd (target >= 0.8x)
//   2. an overwrite-heavy workload (4 KiB random writes confined to a hot region), then a drain:
//      guest bytes against shipped extent bytes and the bytes the relay carried to the origin
//      (the coalescing gain), with fio's default buffers and with incompressible data
//   3. the RPO lag under a sustained writer at about half the link rate, sampled every 250 ms,
//      against the configured RPO (target: max <= RPO), and the drain time at the end
// A benchmark, not a test: it exits 0 whether targets are met or missed (see bench/README.md).

import { existsSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { metric } from '../test/helpers/edges.js';
import { positiveInt } from './lib/args.js';
import { installCleanupHandlers, runBench } from './lib/cleanup.js';
import { readRelayStats, type RelayBytes } from './lib/relay.js';
import { copyBuild, startSites, type Sites } from './lib/sites.js';
import { FIO_PERCENTILE_ARGS, parseFioJson, type FioJob } from './lib/fio.js';
import { copyFileDurable, makeTempDir, writeRandomFile } from './lib/files.js';
import { probeExport, REPO_ROOT, startNbdServer, type ExportInfo } from './lib/nbd-servers.js';
import { haveCommand, processCpuSeconds, runCommand } from './lib/process.js';
import { machineInfo, writeJsonResult } from './lib/results.js';
import { formatSize, parseSize } from './lib/size.js';
import { diff, median, ratio, spread, verdict } from './lib/stats.js';
import { fmt, fmtRatio, formatTable } from './lib/table.js';

const PARTS = ['guest', 'coalescing', 'rpo'] as const;
type PartId = (typeof PARTS)[number];

/** fio seconds of the unmeasured warm-up pass before each part-1 measurement (as bench/nbd). */
const WARMUP_FIO_SEC = 3;
/** The volume's name at both edges. */
const VOLUME = 'disk';

const USAGE = `Usage: npx tsx bench/writeback.ts [options]

Writes to a volume exported by a cloud edge with \`writes: origin\` (on-prem edge, \`spillway wanem\`
relay and cloud edge all real processes) and measures: (1) guest write throughput and latency
next to a local qemu-nbd on a raw file, (2) bytes on the link against bytes written for an
overwrite-heavy workload, (3) the RPO lag under a sustained writer. Prints ratios; writes JSON.

Options:
  --parts LIST          comma-separated, from ${PARTS.join(',')} (default all)
  --out FILE            JSON results (default bench/results/writeback.json)
  --size SIZE           image size, binary units (default 1G)
  --spillway-cli PATH   dist/cli.js of another checkout or copy (package.json, node_modules and
                        build/Release beside its dist/); default: a copy of this checkout's dist/
                        taken at start, so a rebuild during the run cannot change the code under test
  --quick               shorter everything: --runs 1 --runtime 5 --overwrite-size 128M --duration 20
                        (options given explicitly still win)
 part 1, guest writes:
  --runs N              measurements of each server and workload, interleaved (default 2)
  --runtime SECONDS     fio seconds per measurement (default 10), after a ${WARMUP_FIO_SEC} s unmeasured warm-up
  --delay-ms N          one-way delay of the relay for parts 1 and 2 (default 20: RTT 40 ms)
  --rate-mbit N         rate of the relay for parts 1 and 2 (default 100)
  --guest-rpo DURATION  cloud volume rpo in part 1 (default 60s: shipping happens in the
                        background, started by shipAt, not by the RPO)
 part 2, coalescing:
  --overwrite-size SIZE bytes fio writes (default 256M)
  --hot-region SIZE     region they are confined to (default 16M)
  --coalescing-rpo D    cloud volume rpo (default 5s)
 part 3, RPO lag:
  --duration SECONDS    how long the writer runs (default 60)
  --rpo DURATION        cloud volume rpo (default 10s)
  --rpo-delay-ms N      one-way delay of the relay (default 25)
  --rpo-rate-mbit N     rate of the relay (default 40)
  --writer-rate RATE    fio --rate of the writer (default 2500k: fio's k is 1024, ~20.5 Mbit/s)
  -h, --help            this text`;

interface Options {
  parts: PartId[];
  out: string;
  sizeBytes: number;
  spillwayCli: string | undefined;
  quick: boolean;
  runs: number;
  runtimeSec: number;
  delayMs: number;
  rateMbit: number;
  guestRpo: string;
  overwriteBytes: number;
  hotRegionBytes: number;
  coalescingRpo: string;
  durationSec: number;
  rpo: string;
  rpoDelayMs: number;
  rpoRateMbit: number;
  writerRate: string;
}

/** A duration as the edge's configuration spells it ("10s", "500ms", "2m"), in ms. */
function durationMs(text: string, name: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m)$/.exec(text.trim());
  if (!m) throw new Error(`--${name} must be a duration like 10s, 500ms or 2m, got ${JSON.stringify(text)}`);
  const n = Number(m[1]) * ({ ms: 1, s: 1000, m: 60_000 } as const)[m[2] as 'ms' | 's' | 'm'];
  if (!(n >= 100)) throw new Error(`--${name} must be at least 100ms (the edge's minimum rpo)`);
  return n;
}

function nonNegativeNumber(text: string, name: string): number {
  const n = Number(text);
  if (!Number.isFinite(n) || n < 0) throw new Error(`--${name} must be a number >= 0, got ${JSON.stringify(text)}`);
  return n;
}

function parseOptions(argv: string[]): Options | null {
  const { values } = parseArgs({
    args: argv,
    options: {
      parts: { type: 'string', default: PARTS.join(',') },
      out: { type: 'string', default: path.join('bench', 'results', 'writeback.json') },
      size: { type: 'string', default: '1G' },
      'spillway-cli': { type: 'string' },
      quick: { type: 'boolean', default: false },
      runs: { type: 'string' },
      runtime: { type: 'string' },
      'delay-ms': { type: 'string', default: '20' },
      'rate-mbit': { type: 'string', default: '100' },
      'guest-rpo': { type: 'string', default: '60s' },
      'overwrite-size': { type: 'string' },
      'hot-region': { type: 'string', default: '16M' },
      'coalescing-rpo': { type: 'string', default: '5s' },
      duration: { type: 'string' },
      rpo: { type: 'string', default: '10s' },
      'rpo-delay-ms': { type: 'string', default: '25' },
      'rpo-rate-mbit': { type: 'string', default: '40' },
      'writer-rate': { type: 'string', default: '2500k' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) return null;
  const quick = values.quick;
  const parts = values.parts.split(',').map((s) => s.trim()).filter((s) => s !== '');
  for (const p of parts) if (!(PARTS as readonly string[]).includes(p)) throw new Error(`unknown part ${JSON.stringify(p)}; choose from ${PARTS.join(', ')}`);
  const sizeBytes = parseSize(values.size);
  const overwriteBytes = parseSize(values['overwrite-size'] ?? (quick ? '128M' : '256M'));
  const hotRegionBytes = parseSize(values['hot-region']);
  if (sizeBytes % 65536 !== 0 || sizeBytes < 64 * 2 ** 20) throw new Error('--size must be a multiple of 64 KiB and at least 64 MiB');
  if (hotRegionBytes % 4096 !== 0 || hotRegionBytes > sizeBytes) throw new Error('--hot-region must be a multiple of 4 KiB and fit in the image');
  if (overwriteBytes % 4096 !== 0) throw new Error('--overwrite-size must be a multiple of 4 KiB');
  if (!/^\d+[kmg]?$/i.test(values['writer-rate'])) throw new Error(`--writer-rate must be a fio rate like 2500k, got ${JSON.stringify(values['writer-rate'])}`);
  for (const n of ['guest-rpo', 'coalescing-rpo', 'rpo'] as const) durationMs(values[n], n);
  return {
    parts: [...new Set(parts as PartId[])],
    out: path.resolve(values.out),
    sizeBytes,
    spillwayCli: values['spillway-cli'] === undefined ? undefined : path.resolve(values['spillway-cli']),
    quick,
    runs: positiveInt(values.runs ?? (quick ? '1' : '2'), 'runs'),
    runtimeSec: positiveInt(values.runtime ?? (quick ? '5' : '10'), 'runtime'),
    delayMs: nonNegativeNumber(values['delay-ms'], 'delay-ms'),
    rateMbit: nonNegativeNumber(values['rate-mbit'], 'rate-mbit'),
    guestRpo: values['guest-rpo'],
    overwriteBytes,
    hotRegionBytes,
    coalescingRpo: values['coalescing-rpo'],
    durationSec: positiveInt(values.duration ?? (quick ? '20' : '60'), 'duration'),
    rpo: values.rpo,
    rpoDelayMs: nonNegativeNumber(values['rpo-delay-ms'], 'rpo-delay-ms'),
    rpoRateMbit: nonNegativeNumber(values['rpo-rate-mbit'], 'rpo-rate-mbit'),
    writerRate: values['writer-rate'],
  };
}

// ------------------------------------------------------------------------------ processes




const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
/** The relay rewrites its stats file every 500 ms: wait for one rewrite after a quiet moment. */
const STATS_SETTLE_MS = 700;

async function cpuOf(pids: Record<string, number>): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const [k, pid] of Object.entries(pids)) out[k] = await processCpuSeconds(pid).catch(() => Number.NaN);
  return out;
}

/** The cloud edge's write-back and fetch counters, by short name. */
const COUNTERS: readonly [string, string, Record<string, string>][] = [
  ['guestBytes', 'spillway_writeback_guest_bytes_total', { volume: VOLUME, policy: 'origin' }],
  ['epochBytes', 'spillway_writeback_epoch_bytes_total', { volume: VOLUME }],
  ['shippedBytes', 'spillway_writeback_shipped_bytes_total', { volume: VOLUME }],
  ['epochFrameBytes', 'spillway_writeback_link_bytes_total', { volume: VOLUME }],
  ['epochsSealed', 'spillway_writeback_epochs_total', { volume: VOLUME, event: 'sealed' }],
  ['epochsShipped', 'spillway_writeback_epochs_total', { volume: VOLUME, event: 'shipped' }],
  ['epochsAcked', 'spillway_writeback_epochs_total', { volume: VOLUME, event: 'acked' }],
  ['batchesApplied', 'spillway_writeback_batches_total', { volume: VOLUME, status: 'applied' }],
  ['batchesAll', 'spillway_writeback_batches_total', { volume: VOLUME }],
  ['shipSecondsSum', 'spillway_writeback_ship_seconds_sum', { volume: VOLUME }],
  ['shipSecondsCount', 'spillway_writeback_ship_seconds_count', { volume: VOLUME }],
  ['chunkReadsLink', 'spillway_remote_chunk_reads_total', { tier: 'link' }],
  ['chunkReadsCache', 'spillway_remote_chunk_reads_total', { tier: 'cache' }],
];
const GAUGES: readonly [string, string][] = [
  ['unshippedBytes', 'spillway_writeback_unshipped_bytes'],
  ['rpoLagSeconds', 'spillway_writeback_rpo_lag_seconds'],
  ['coalescingRatio', 'spillway_writeback_coalescing_ratio'],
];

async function counters(url: string): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const [k, name, labels] of COUNTERS) out[k] = await metric(url, name, labels).catch(() => Number.NaN);
  return out;
}

async function gauges(url: string): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const [k, name] of GAUGES) out[k] = await metric(url, name, { volume: VOLUME }).catch(() => Number.NaN);
  return out;
}

/** `spillway volume drain` through the cloud edge's control socket, timed (process start to exit). */
async function drain(cli: string, s: Sites): Promise<{ seconds: number; output: string }> {
  const r = await runCommand(process.execPath, [cli, 'volume', 'drain', VOLUME, '--config', s.sites.cloudYaml, '--timeout', '900'], { timeoutMs: 960_000 });
  return { seconds: r.seconds, output: r.stdout.trim() };
}

// ------------------------------------------------------------------------------ fio

async function fio(name: string, uri: string, args: string[], timeoutSec: number): Promise<FioJob> {
  // --thread: jobs are threads of the one fio process, so a timeout that kills fio kills them
  // too (a forked job stuck on an NBD request that never completes outlives its parent and
  // keeps fio's stdout open).
  const r = await runCommand('fio', [`--name=${name}`, '--thread', '--ioengine=nbd', `--uri=${uri}`, ...args, ...FIO_PERCENTILE_ARGS, '--output-format=json'], { timeoutMs: timeoutSec * 1000 });
  const [job] = parseFioJson(r.stdout);
  if (!job) throw new Error('fio reported no job');
  return job;
}

/** Part 1 workloads: fio arguments (without the run time). */
const GUEST_WORKLOADS = {
  randwrite: { title: '4 KiB random write QD16, flush every 64 writes', args: ['--rw=randwrite', '--bs=4k', '--iodepth=16', '--fsync=64'] },
  seqwrite: { title: '1 MiB sequential write QD4', args: ['--rw=write', '--bs=1m', '--iodepth=4'] },
} as const;
type GuestWorkloadId = keyof typeof GUEST_WORKLOADS;
const GUEST_WORKLOAD_IDS = Object.keys(GUEST_WORKLOADS) as GuestWorkloadId[];

// ------------------------------------------------------------------------------ part 1

type Server = 'spillway' | 'qemu-nbd';

interface GuestSample {
  run: number;
  server: Server;
  workload: GuestWorkloadId;
  iops: number;
  mbPerSec: number;
  p50Us: number | null;
  p99Us: number | null;
  meanUs: number;
  writes: number;
  flushes: number;
  flushP99Us: number | null;
  /** server-side CPU seconds over the measured pass, by process. */
  cpu: Record<string, number>;
  load: number;
  /** spillway: the cloud edge's counters over the measured pass. */
  counters?: Record<string, number>;
  /** spillway: its gauges at the end of the pass. */
  gaugesAtEnd?: Record<string, number>;
  /** spillway: bytes the relay carried towards the origin during the pass (≈ 0.5 s resolution). */
  relayToOriginBytes?: number;
}

const load1 = (): number => Math.round((os.loadavg()[0] ?? 0) * 100) / 100;

/** One unmeasured warm-up pass, then the measured one, with the CPU of `pids` around it. */
async function guestMeasure(uri: string, w: GuestWorkloadId, opts: Options, pids: Record<string, number>, metricsUrl: string | null, relayStats: string | null): Promise<Omit<GuestSample, 'run' | 'server' | 'workload'>> {
  const base = [...GUEST_WORKLOADS[w].args, '--time_based'];
  await fio(`${w}-warmup`, uri, [...base, `--runtime=${WARMUP_FIO_SEC}`], WARMUP_FIO_SEC + 120);
  const c0 = metricsUrl ? await counters(metricsUrl) : null;
  const r0 = relayStats ? await readRelayStats(relayStats) : null;
  const cpu0 = await cpuOf(pids);
  const job = await fio(w, uri, [...base, `--runtime=${opts.runtimeSec}`], opts.runtimeSec + 120);
  const cpu = diff(await cpuOf(pids), cpu0);
  let relayToOrigin: number | undefined;
  if (relayStats && r0) {
    await sleep(STATS_SETTLE_MS);
    relayToOrigin = (await readRelayStats(relayStats)).clientToTarget - r0.clientToTarget;
  }
  const out: Omit<GuestSample, 'run' | 'server' | 'workload'> = {
    iops: job.write.iops,
    mbPerSec: job.write.bytesPerSec / 1e6,
    p50Us: job.write.clat.p50Us,
    p99Us: job.write.clat.p99Us,
    meanUs: job.write.clat.meanUs,
    writes: job.write.ios,
    flushes: job.sync?.ios ?? 0,
    flushP99Us: job.sync?.lat?.p99Us ?? null,
    cpu,
    load: load1(),
  };
  if (metricsUrl && c0) {
    out.counters = diff(await counters(metricsUrl), c0, 3);
    out.gaugesAtEnd = await gauges(metricsUrl);
    out.relayToOriginBytes = relayToOrigin;
  }
  return out;
}

async function guestSpillway(dir: string, image: string, cli: string, opts: Options, run: number): Promise<{ samples: GuestSample[]; exportInfo: ExportInfo }> {
  const s = await startSites(dir, image, { cli, wan: { delayMs: opts.delayMs, rateMbit: opts.rateMbit }, cloudVolume: `writes: origin, rpo: ${opts.guestRpo}` });
  try {
    const exportInfo = await probeExport(s.sites.uri());
    const samples: GuestSample[] = [];
    for (const w of GUEST_WORKLOAD_IDS) {
      const m = await guestMeasure(s.sites.uri(), w, opts, s.pids, s.sites.metricsUrl, s.statsFile);
      samples.push({ run, server: 'spillway', workload: w, ...m });
    }
    return { samples, exportInfo };
  } finally {
    await s.stop();
  }
}

async function guestQemu(file: string, opts: Options, run: number): Promise<{ samples: GuestSample[]; exportInfo: ExportInfo; commandLine: string }> {
  const q = await startNbdServer('qemu-nbd', file);
  try {
    const exportInfo = await probeExport(q.uri);
    const samples: GuestSample[] = [];
    for (const w of GUEST_WORKLOAD_IDS) {
      const m = await guestMeasure(q.uri, w, opts, { 'qemu-nbd': q.proc.pid }, null, null);
      samples.push({ run, server: 'qemu-nbd', workload: w, ...m });
    }
    return { samples, exportInfo, commandLine: q.commandLine };
  } finally {
    await q.stop();
  }
}

// ------------------------------------------------------------------------------ part 2

const DATA_VARIANTS = {
  'fio-default': { title: "fio's default buffers", args: [] as string[], note: 'fio fills its buffers with random bytes once and reuses them (scrambling a few bytes per write): each 4 KiB block is incompressible, but neighbouring blocks of a merged extent repeat, so LZ4 can shrink extents' },
  incompressible: { title: 'incompressible (refill_buffers)', args: ['--refill_buffers', '--buffer_compress_percentage=0'], note: 'fresh random bytes for every write (--refill_buffers): nothing to compress, the gain is coalescing alone' },
} as const;
type DataVariant = keyof typeof DATA_VARIANTS;

interface CoalescingSample {
  variant: DataVariant;
  fio: { seconds: number; writes: number; flushes: number; iops: number; mbPerSec: number; p99Us: number | null };
  drainSeconds: number;
  /** counters over workload + drain. */
  counters: Record<string, number>;
  relay: RelayBytes;
  cpu: Record<string, number>;
  load: number;
}

async function coalescing(dir: string, image: string, cli: string, opts: Options, variant: DataVariant): Promise<CoalescingSample> {
  const s = await startSites(dir, image, { cli, wan: { delayMs: opts.delayMs, rateMbit: opts.rateMbit }, cloudVolume: `writes: origin, rpo: ${opts.coalescingRpo}` });
  try {
    await sleep(STATS_SETTLE_MS);
    const r0 = await readRelayStats(s.statsFile);
    const c0 = await counters(s.sites.metricsUrl);
    const cpu0 = await cpuOf(s.pids);
    const args = ['--rw=randwrite', '--bs=4k', '--iodepth=16', '--fsync=64', '--offset=0', `--size=${opts.hotRegionBytes}`, `--io_size=${opts.overwriteBytes}`, ...DATA_VARIANTS[variant].args];
    const job = await fio(`overwrite-${variant}`, s.sites.uri(), args, 1800);
    const d = await drain(cli, s);
    const c1 = await counters(s.sites.metricsUrl);
    const cpu = diff(await cpuOf(s.pids), cpu0);
    await s.stop(); // the relay writes its stats one last time as it exits
    const r1 = await readRelayStats(s.statsFile);
    return {
      variant,
      fio: { seconds: job.runtimeSec, writes: job.write.ios, flushes: job.sync?.ios ?? 0, iops: job.write.iops, mbPerSec: job.write.bytesPerSec / 1e6, p99Us: job.write.clat.p99Us },
      drainSeconds: d.seconds,
      counters: diff(c1, c0, 3),
      relay: { clientToTarget: r1.clientToTarget - r0.clientToTarget, targetToClient: r1.targetToClient - r0.targetToClient },
      cpu,
      load: load1(),
    };
  } finally {
    await s.stop();
  }
}

// ------------------------------------------------------------------------------ part 3

interface LagPoint {
  /** seconds since the writer started. */
  t: number;
  lag: number;
  unshipped: number;
}

interface RpoSample {
  points: LagPoint[];
  fio: { seconds: number; writes: number; flushes: number; mbPerSec: number; p99Us: number | null };
  drainSeconds: number;
  /** unshipped bytes when the drain started. */
  unshippedAtDrain: number;
  counters: Record<string, number>;
  relay: RelayBytes;
  cpu: Record<string, number>;
  load: number;
  /** metric reads that failed (the edge did not answer within the sampling period). */
  failedSamples: number;
}

/** Parse fio's --rate value (k/m/g are powers of 1024 under fio's default kb_base) into bytes/s. */
function fioRateBytes(rate: string): number {
  const m = /^(\d+)([kmg]?)$/i.exec(rate) as RegExpExecArray;
  return Number(m[1]) * ({ '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3 } as Record<string, number>)[(m[2] ?? '').toLowerCase()]!;
}

async function rpoLag(dir: string, image: string, cli: string, opts: Options): Promise<RpoSample> {
  const s = await startSites(dir, image, { cli, wan: { delayMs: opts.rpoDelayMs, rateMbit: opts.rpoRateMbit }, cloudVolume: `writes: origin, rpo: ${opts.rpo}` });
  try {
    await sleep(STATS_SETTLE_MS);
    const r0 = await readRelayStats(s.statsFile);
    const c0 = await counters(s.sites.metricsUrl);
    const cpu0 = await cpuOf(s.pids);
    const args = ['--rw=randwrite', '--bsrange=4k-64k', '--iodepth=4', '--fsync=16', `--rate=${opts.writerRate}`, '--refill_buffers', '--buffer_compress_percentage=0', '--time_based', `--runtime=${opts.durationSec}`];
    const points: LagPoint[] = [];
    let failedSamples = 0;
    const started = process.hrtime.bigint();
    let writing = true;
    const sampler = (async () => {
      // Every 250 ms, on a fixed schedule: a slow scrape delays the next one, never shifts them all.
      for (let i = 1; writing; i++) {
        const t = Number(process.hrtime.bigint() - started) / 1e9;
        try {
          // A scrape the edge does not answer within a second counts as failed (an edge whose
          // event loop is stuck must not hang the bench: fio's timeout ends the run).
          const scrape = Promise.all([metric(s.sites.metricsUrl, 'spillway_writeback_rpo_lag_seconds', { volume: VOLUME }), metric(s.sites.metricsUrl, 'spillway_writeback_unshipped_bytes', { volume: VOLUME })]);
          scrape.catch(() => undefined);
          const [lag, unshipped] = await Promise.race([scrape, sleep(1000).then(() => Promise.reject(new Error('scrape timed out')))]);
          points.push({ t: Math.round(t * 1000) / 1000, lag, unshipped });
        } catch {
          failedSamples++;
        }
        const next = i * 0.25 - Number(process.hrtime.bigint() - started) / 1e9;
        if (next > 0) await sleep(next * 1000);
      }
    })();
    let job: FioJob;
    try {
      job = await fio('rpo-writer', s.sites.uri(), args, opts.durationSec + 300);
    } finally {
      writing = false;
      await sampler;
    }
    const unshippedAtDrain = await metric(s.sites.metricsUrl, 'spillway_writeback_unshipped_bytes', { volume: VOLUME });
    const d = await drain(cli, s);
    const c1 = await counters(s.sites.metricsUrl);
    const cpu = diff(await cpuOf(s.pids), cpu0);
    await s.stop();
    const r1 = await readRelayStats(s.statsFile);
    return {
      points,
      fio: { seconds: job.runtimeSec, writes: job.write.ios, flushes: job.sync?.ios ?? 0, mbPerSec: job.write.bytesPerSec / 1e6, p99Us: job.write.clat.p99Us },
      drainSeconds: d.seconds,
      unshippedAtDrain,
      counters: diff(c1, c0, 3),
      relay: { clientToTarget: r1.clientToTarget - r0.clientToTarget, targetToClient: r1.targetToClient - r0.targetToClient },
      cpu,
      load: load1(),
      failedSamples,
    };
  } finally {
    await s.stop();
  }
}

/** The p-th percentile (0..100) by nearest rank; NaN for none. */
function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))] as number;
}

// ------------------------------------------------------------------------------ main

async function checkTools(): Promise<void> {
  const needed: [string, string][] = [
    ['fio', 'fio'],
    ['nbdinfo', 'libnbd-bin'],
    ['qemu-nbd', 'qemu-utils'],
  ];
  const problems: string[] = [];
  for (const [cmd, pkg] of needed) if (!(await haveCommand(cmd))) problems.push(`${cmd} is missing: apt-get install ${pkg}`);
  if (problems.length > 0) throw new Error(problems.join('\n'));
}

const mib = (bytes: number | null | undefined): string => (bytes === null || bytes === undefined || !Number.isFinite(bytes) ? '-' : `${fmt(bytes / 2 ** 20, 1)} MiB`);

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  if (!opts) {
    console.log(USAGE);
    return;
  }
  installCleanupHandlers();
  await checkTools();
  const want = (p: PartId): boolean => opts.parts.includes(p);
  const machine = await machineInfo(REPO_ROOT, { fio: ['fio', '--version'], 'qemu-nbd': ['qemu-nbd', '--version'], nbdinfo: ['nbdinfo', '--version'] });
  const [loadAtStart] = machine.loadAverage;
  if (loadAtStart !== undefined && loadAtStart > machine.nproc / 2) {
    console.error(`note: load average ${loadAtStart} on ${machine.nproc} CPUs before starting: other work will skew these figures`);
  }
  const log = (line: string): void => void process.stderr.write(`${line}\n`);
  const tmp = await makeTempDir('spw-bench-writeback-');
  const cli = opts.spillwayCli ?? (await copyBuild(REPO_ROOT, path.join(tmp.dir, 'build-snapshot')));
  if (!existsSync(cli)) throw new Error(`${cli} is missing`);

  // One image of random data at the origin (the edges' writes change it as batches are applied:
  // nothing here reads it back), and a durable copy qemu-nbd writes into.
  const origin = path.join(tmp.dir, 'origin.raw');
  log(`writing a ${formatSize(opts.sizeBytes)} image of random data…`);
  await writeRandomFile(origin, opts.sizeBytes);
  const notes: string[] = [];
  const t0 = Date.now();

  // ---------------------------------------------------------------- part 1
  const guestSamples: GuestSample[] = [];
  const exportsInfo: Record<string, ExportInfo> = {};
  let qemuCommand = '';
  if (want('guest')) {
    const qemuFile = path.join(tmp.dir, 'qemu.raw');
    await copyFileDurable(origin, qemuFile);
    for (let run = 1; run <= opts.runs; run++) {
      const tag = `[guest ${run}/${opts.runs}]`;
      // Alternate who goes first, so a slow period does not always hit the same server.
      const order: Server[] = run % 2 === 1 ? ['spillway', 'qemu-nbd'] : ['qemu-nbd', 'spillway'];
      for (const server of order) {
        let got: GuestSample[];
        if (server === 'spillway') {
          const dir = path.join(tmp.dir, `guest-${run}`);
          const r = await guestSpillway(dir, origin, cli, opts, run);
          exportsInfo['spillway'] = r.exportInfo;
          got = r.samples;
          await rm(dir, { recursive: true, force: true });
        } else {
          const r = await guestQemu(qemuFile, opts, run);
          exportsInfo['qemu-nbd'] = r.exportInfo;
          qemuCommand = r.commandLine;
          got = r.samples;
        }
        guestSamples.push(...got);
        for (const g of got) {
          const fetched = g.counters ? `, link chunk fetches ${g.counters['chunkReadsLink']}, relay to origin meanwhile ${mib(g.relayToOriginBytes)}, unshipped at end ${mib(g.gaugesAtEnd?.['unshippedBytes'])}` : '';
          log(`${tag} ${server.padEnd(8)} ${g.workload.padEnd(9)} ${fmt(g.iops, 0)} IOPS ${fmt(g.mbPerSec, 1)} MB/s, p50 ${fmt(g.p50Us, 0)} µs p99 ${fmt(g.p99Us, 0)} µs, ${g.flushes} flushes, cpu s ${JSON.stringify(g.cpu)}, load ${g.load}${fetched}`);
        }
      }
    }
    await rm(qemuFile, { force: true });
  }

  // ---------------------------------------------------------------- part 2
  const coalescingSamples: CoalescingSample[] = [];
  if (want('coalescing')) {
    for (const variant of Object.keys(DATA_VARIANTS) as DataVariant[]) {
      const dir = path.join(tmp.dir, `coalescing-${variant}`);
      log(`[coalescing] ${formatSize(opts.overwriteBytes)} of 4 KiB random writes into ${formatSize(opts.hotRegionBytes)}, ${DATA_VARIANTS[variant].title}…`);
      const c = await coalescing(dir, origin, cli, opts, variant);
      coalescingSamples.push(c);
      log(`[coalescing] ${variant}: guest ${mib(c.counters['guestBytes'])} in ${fmt(c.fio.seconds, 1)} s, shipped ${mib(c.counters['shippedBytes'])}, EPOCH frames ${mib(c.counters['epochFrameBytes'])}, relay cloud→on-prem ${mib(c.relay.clientToTarget)}, ${c.counters['batchesAll']} batches, drain ${fmt(c.drainSeconds, 1)} s, cpu s ${JSON.stringify(c.cpu)}, load ${c.load}`);
      await rm(dir, { recursive: true, force: true });
    }
  }

  // ---------------------------------------------------------------- part 3
  let rpoSample: RpoSample | null = null;
  if (want('rpo')) {
    const dir = path.join(tmp.dir, 'rpo');
    log(`[rpo] writer at ${opts.writerRate}B/s for ${opts.durationSec} s over ${opts.rpoRateMbit} Mbit/s, ${opts.rpoDelayMs} ms each way, rpo ${opts.rpo}…`);
    rpoSample = await rpoLag(dir, origin, cli, opts);
    const lags = rpoSample.points.map((p) => p.lag);
    log(`[rpo] max lag ${fmt(Math.max(...lags), 2)} s, unshipped max ${mib(Math.max(...rpoSample.points.map((p) => p.unshipped)))}, drain ${fmt(rpoSample.drainSeconds, 1)} s, ${rpoSample.counters['batchesAll']} batches, cpu s ${JSON.stringify(rpoSample.cpu)}, load ${rpoSample.load}`);
    await rm(dir, { recursive: true, force: true });
  }
  const elapsedSec = (Date.now() - t0) / 1000;

  // ---------------------------------------------------------------- summary
  const out: string[] = [];
  const summary: Record<string, unknown> = {};

  if (want('guest')) {
    const med = (server: Server, w: GuestWorkloadId, pick: (g: GuestSample) => number | null): number | null => {
      const xs = guestSamples.filter((g) => g.server === server && g.workload === w).map(pick).filter((x): x is number => x !== null && Number.isFinite(x));
      return xs.length > 0 ? median(xs) : null;
    };
    const spr = (w: GuestWorkloadId, pick: (g: GuestSample) => number | null): string =>
      (['spillway', 'qemu-nbd'] as const)
        .map((s) =>
          fmt(
            spread(
              guestSamples
                .filter((g) => g.server === s && g.workload === w)
                .map(pick)
                .filter((x): x is number => x !== null),
            ),
          ),
        )
        .join('/');
    interface GuestRow {
      label: string;
      workload: GuestWorkloadId;
      pick: (g: GuestSample) => number | null;
      digits: number;
      /** higher is better: ratio ours / peer; lower is better: peer / ours. */
      higher: boolean;
      target: number | null;
    }
    const cpuPerWrite = (g: GuestSample): number | null => (g.writes > 0 ? ((g.cpu['cloud'] ?? g.cpu['qemu-nbd'] ?? Number.NaN) * 1e6) / (g.writes + g.flushes) : null);
    const rowsDef: GuestRow[] = [
      { label: 'randwrite 4k QD16 + flush/64, kIOPS', workload: 'randwrite', pick: (g) => g.iops / 1000, digits: 2, higher: true, target: 0.8 },
      { label: 'randwrite p50 µs (ratio: peer/ours)', workload: 'randwrite', pick: (g) => g.p50Us, digits: 0, higher: false, target: 0.8 },
      { label: 'randwrite p99 µs (ratio: peer/ours)', workload: 'randwrite', pick: (g) => g.p99Us, digits: 0, higher: false, target: 0.8 },
      { label: 'randwrite writes per flush', workload: 'randwrite', pick: (g) => (g.flushes > 0 ? g.writes / g.flushes : null), digits: 1, higher: true, target: null },
      { label: 'randwrite server CPU µs/request (peer/ours)', workload: 'randwrite', pick: cpuPerWrite, digits: 1, higher: false, target: null },
      { label: 'seqwrite 1M QD4, MB/s', workload: 'seqwrite', pick: (g) => g.mbPerSec, digits: 1, higher: true, target: 0.8 },
      { label: 'seqwrite p50 µs (ratio: peer/ours)', workload: 'seqwrite', pick: (g) => g.p50Us, digits: 0, higher: false, target: 0.8 },
      { label: 'seqwrite p99 µs (ratio: peer/ours)', workload: 'seqwrite', pick: (g) => g.p99Us, digits: 0, higher: false, target: 0.8 },
      { label: 'seqwrite server CPU µs/request (peer/ours)', workload: 'seqwrite', pick: cpuPerWrite, digits: 1, higher: false, target: null },
    ];
    const rows = rowsDef.map((r) => {
      const ours = med('spillway', r.workload, r.pick);
      const peer = med('qemu-nbd', r.workload, r.pick);
      const rat = r.higher ? ratio(ours, peer) : ratio(peer, ours);
      return { measure: r.label, spillway: ours, qemuNbd: peer, ratio: rat, target: r.target === null ? null : `>= ${r.target.toFixed(2)}x`, result: r.target === null ? 'info' : verdict(rat, r.target, true), spread: spr(r.workload, r.pick), digits: r.digits };
    });
    const fetched = guestSamples.filter((g) => g.server === 'spillway').reduce((a, g) => a + (g.counters?.['chunkReadsLink'] ?? 0), 0);
    const shippedMeanwhile = guestSamples.filter((g) => g.server === 'spillway').map((g) => `${g.workload} ${mib(g.relayToOriginBytes)}`);
    out.push(
      `\npart 1, guest writes: cloud edge \`writes: origin, rpo: ${opts.guestRpo}\` (shipAt 64MiB, epochMax 64MiB: the defaults) over wanem ${opts.rateMbit} Mbit/s, ${opts.delayMs} ms each way (RTT ${opts.delayMs * 2} ms) vs local qemu-nbd on a raw file; ${formatSize(opts.sizeBytes)} image, fio ${opts.runtimeSec} s after ${WARMUP_FIO_SEC} s warm-up, medians of ${opts.runs}`,
      formatTable(
        [{ header: 'measure' }, { header: 'spillway', right: true }, { header: 'qemu-nbd', right: true }, { header: 'ratio', right: true }, { header: 'target' }, { header: 'result' }, { header: 'spread ours/peer', right: true }],
        rows.map((r) => [r.measure, fmt(r.spillway, r.digits), fmt(r.qemuNbd, r.digits), fmtRatio(r.ratio), r.target ?? '-', r.result, r.spread]),
      ),
      `  not pre-read: the target area was never read, and chunks fetched over the link during the measured writes: ${fetched} (the overlay has 4 KiB granules, so aligned writes need no read-modify-write); bytes the relay carried towards the origin (background shipping) during each measured pass: ${shippedMeanwhile.join(', ')}`,
    );
    summary['guest'] = { rows: rows.map(({ digits: _d, ...r }) => r), chunkFetchesDuringWrites: fetched };
  }

  if (want('coalescing')) {
    const rows = coalescingSamples.map((c) => {
      const guest = c.counters['guestBytes'] ?? Number.NaN;
      const shipped = c.counters['shippedBytes'] ?? Number.NaN;
      const frames = c.counters['epochFrameBytes'] ?? Number.NaN;
      return {
        variant: c.variant,
        title: DATA_VARIANTS[c.variant].title,
        guestBytes: guest,
        shippedBytes: shipped,
        epochFrameBytes: frames,
        relayCloudToOnprem: c.relay.clientToTarget,
        coalescing: ratio(guest, shipped),
        compression: ratio(shipped, frames),
        gain: ratio(guest, c.relay.clientToTarget),
        batches: c.counters['batchesAll'] ?? null,
        guestMBps: c.fio.mbPerSec,
        drainSeconds: c.drainSeconds,
      };
    });
    const cols = rows.map((r) => r.title);
    const line = (label: string, cell: (r: (typeof rows)[number]) => string): string[] => [label, ...rows.map(cell), 'none set', 'n/a'];
    out.push(
      `\npart 2, coalescing: ${formatSize(opts.overwriteBytes)} of 4 KiB random writes QD16 (flush every 64) confined to ${formatSize(opts.hotRegionBytes)}, cloud edge \`writes: origin, rpo: ${opts.coalescingRpo}\`, wanem ${opts.rateMbit} Mbit/s, ${opts.delayMs} ms each way; then \`spillway volume drain\`. The peer is shipping every write as written: the guest bytes`,
      formatTable(
        [{ header: 'measure' }, ...cols.map((c) => ({ header: c, right: true })), { header: 'target' }, { header: 'result' }],
        [
          line('guest bytes written', (r) => mib(r.guestBytes)),
          line('shipped extent bytes (after coalescing)', (r) => mib(r.shippedBytes)),
          line('EPOCH frame bytes (after LZ4)', (r) => mib(r.epochFrameBytes)),
          line('relay cloud→on-prem bytes', (r) => mib(r.relayCloudToOnprem)),
          line('coalescing: guest / shipped', (r) => fmtRatio(r.coalescing)),
          line('compression: shipped / frames', (r) => fmtRatio(r.compression)),
          line('gain: guest / relay bytes', (r) => fmtRatio(r.gain)),
          line('batches', (r) => fmt(r.batches, 0)),
          line('guest write rate, MB/s', (r) => fmt(r.guestMBps, 1)),
          line('drain after the writes', (r) => `${fmt(r.drainSeconds, 1)} s`),
        ],
      ),
      '  A block overwritten in several epochs of one batch travels once (coalescing); EPOCH frames add 32-byte headers and LZ4 where it pays; the relay figure is everything the cloud edge sent towards the origin meanwhile (TLS records, link frames, control frames).',
    );
    summary['coalescing'] = { rows };
  }

  if (want('rpo') && rpoSample) {
    const r = rpoSample;
    const rpoSec = durationMs(opts.rpo, 'rpo') / 1000;
    const lags = r.points.map((p) => p.lag);
    const maxLag = lags.length > 0 ? Math.max(...lags) : null;
    const p99Lag = lags.length > 0 ? percentile(lags, 99) : null;
    const maxUnshipped = r.points.length > 0 ? Math.max(...r.points.map((p) => p.unshipped)) : null;
    const writerMbit = (r.fio.mbPerSec * 8);
    const linkMbit = r.fio.seconds > 0 ? (r.relay.clientToTarget * 8) / 1e6 / (r.fio.seconds + r.drainSeconds) : null;
    const rows = [
      { measure: 'RPO lag, max', value: maxLag, text: `${fmt(maxLag, 2)} s`, vsRpo: maxLag === null ? null : maxLag / rpoSec, target: `<= ${rpoSec} s (RPO)`, result: verdict(maxLag, rpoSec, false) },
      { measure: 'RPO lag, p99', value: p99Lag, text: `${fmt(p99Lag, 2)} s`, vsRpo: p99Lag === null ? null : p99Lag / rpoSec, target: `<= ${rpoSec} s (RPO)`, result: verdict(p99Lag, rpoSec, false) },
      { measure: 'RPO lag, median', value: lags.length > 0 ? median(lags) : null, text: `${fmt(lags.length > 0 ? median(lags) : null, 2)} s`, vsRpo: lags.length > 0 ? median(lags) / rpoSec : null, target: '-', result: 'info' },
      { measure: 'unshipped bytes, max', value: maxUnshipped, text: mib(maxUnshipped), vsRpo: null, target: '-', result: 'info' },
      { measure: 'writer rate achieved', value: writerMbit, text: `${fmt(writerMbit, 1)} Mbit/s`, vsRpo: null, target: '-', result: 'info' },
      { measure: `drain after the writer (${mib(r.unshippedAtDrain)} unshipped)`, value: r.drainSeconds, text: `${fmt(r.drainSeconds, 1)} s`, vsRpo: null, target: '-', result: 'info' },
    ];
    // The lag is a saw-tooth: it grows until the origin acknowledges a batch, then drops.
    const peaks: number[] = [];
    for (let i = 0; i + 1 < r.points.length; i++) {
      const a = r.points[i] as LagPoint;
      const b = r.points[i + 1] as LagPoint;
      if (b.lag < a.lag - 0.5) peaks.push(Math.round(a.lag * 10) / 10);
    }
    const shipAvg = (r.counters['shipSecondsCount'] ?? 0) > 0 ? (r.counters['shipSecondsSum'] ?? 0) / (r.counters['shipSecondsCount'] ?? 1) : null;
    out.push(
      `\npart 3, RPO lag: fio randwrite 4k-64k QD4, flush every 16 writes, --rate=${opts.writerRate} (incompressible) for ${opts.durationSec} s; cloud edge \`writes: origin, rpo: ${opts.rpo}\` (a batch starts when the oldest epoch is ${rpoSec / 2} s old); wanem ${opts.rpoRateMbit} Mbit/s, ${opts.rpoDelayMs} ms each way; spillway_writeback_rpo_lag_seconds sampled every 250 ms (${r.points.length} samples${r.failedSamples > 0 ? `, ${r.failedSamples} failed` : ''})`,
      formatTable(
        [{ header: 'measure' }, { header: 'spillway', right: true }, { header: '/ RPO', right: true }, { header: 'target' }, { header: 'result' }],
        rows.map((x) => [x.measure, x.text, x.vsRpo === null ? '-' : fmt(x.vsRpo, 2), x.target, x.result]),
      ),
      `  lag peaks before each acknowledgement (s): ${peaks.length > 0 ? peaks.join(', ') : 'none'}${lags.length > 0 && (lags[lags.length - 1] ?? 0) > 0 ? `; ${fmt(lags[lags.length - 1], 1)} s when the writer stopped` : ''}`,
      `  ${r.counters['batchesAll']} batches, mean ship time (send to ack) ${fmt(shipAvg, 2)} s; relay carried ${mib(r.relay.clientToTarget)} towards the origin (${fmt(linkMbit, 1)} Mbit/s over writer + drain, link ${opts.rpoRateMbit} Mbit/s) for ${mib(r.counters['guestBytes'])} written`,
    );
    summary['rpo'] = { rpoSeconds: rpoSec, lagPeaks: peaks, rows: rows.map(({ text: _t, ...x }) => x), maxLagSeconds: maxLag, p99LagSeconds: p99Lag, maxUnshippedBytes: maxUnshipped, drainSeconds: r.drainSeconds, unshippedAtDrain: r.unshippedAtDrain, meanShipSeconds: shipAvg, writerMbit, relayMbit: linkMbit };
  }

  notes.push(
    `Every Spillway figure is through real processes on one ${machine.nproc}-CPU machine: the cloud edge (NBD server, journal, shipper), the relay and the on-prem edge (applier) share it with fio; qemu-nbd shares it with fio only. Read ratios, not absolutes.`,
    `Part 1: a fresh pair of edges, relay, journal and overlay per run (each server gets one unmeasured ${WARMUP_FIO_SEC} s pass of each workload first); qemu-nbd serves a durable copy of the image: \`${qemuCommand || 'qemu-nbd -f raw -x \'\' -b 127.0.0.1 -p PORT -t --cache=writeback --aio=threads FILE'}\` (page cache; a flush is an fdatasync). Spillway acknowledges writes into the epoch and an unsynced journal append; a flush seals the epoch (journal fdatasync). The writes never wait for the link; sealed epochs ship in the background once shipAt (64 MiB) waits.`,
    'fio 3.33 (no axboe/fio PR #1754) sends a burst of up to iodepth flushes at each fsync point until the first completes, so expect fewer than 64 writes per flush, and fewer the slower a server flushes (see bench/README.md).',
    `Part 2: fio --size=${formatSize(opts.hotRegionBytes)} --io_size=${formatSize(opts.overwriteBytes)}: fio walks the region in a random order without repeats, then again, so every 4 KiB block is written ${fmt(opts.overwriteBytes / opts.hotRegionBytes, 0)} times. ${DATA_VARIANTS['fio-default'].note}; ${DATA_VARIANTS.incompressible.note}. Counters are the cloud edge's over the workload and the drain; relay bytes are wanem's clientToTarget.`,
    'Part 3: the RPO lag is the age of the oldest sealed epoch the origin has not acknowledged (writes not yet flushed by the guest are not counted). The drain is `spillway volume drain` (process start to exit).',
  );
  console.log(`\nbench/writeback (${fmt(elapsedSec, 0)} s of measurements)`);
  for (const line of out) console.log(line);
  for (const n of notes) console.log(`- ${n}`);

  await writeJsonResult(opts.out, {
    bench: 'writeback',
    machine,
    config: {
      parts: opts.parts,
      imageSizeBytes: opts.sizeBytes,
      guest: { runs: opts.runs, fioRuntimeSec: opts.runtimeSec, warmupFioSec: WARMUP_FIO_SEC, wan: { delayMs: opts.delayMs, rateMbit: opts.rateMbit }, cloudVolume: `writes: origin, rpo: ${opts.guestRpo}`, workloads: GUEST_WORKLOADS, qemuNbd: qemuCommand },
      coalescing: { overwriteBytes: opts.overwriteBytes, hotRegionBytes: opts.hotRegionBytes, wan: { delayMs: opts.delayMs, rateMbit: opts.rateMbit }, cloudVolume: `writes: origin, rpo: ${opts.coalescingRpo}`, fio: '--rw=randwrite --bs=4k --iodepth=16 --fsync=64 --offset=0 --size=HOT --io_size=TOTAL', variants: DATA_VARIANTS },
      rpo: { durationSec: opts.durationSec, wan: { delayMs: opts.rpoDelayMs, rateMbit: opts.rpoRateMbit }, cloudVolume: `writes: origin, rpo: ${opts.rpo}`, writerRate: opts.writerRate, writerRateBytesPerSec: fioRateBytes(opts.writerRate), fio: `--rw=randwrite --bsrange=4k-64k --iodepth=4 --fsync=16 --rate=${opts.writerRate} --refill_buffers --buffer_compress_percentage=0 --time_based`, sampleEveryMs: 250 },
      client: 'fio --ioengine=nbd',
      spillwayCli: opts.spillwayCli ?? 'snapshot of dist/ taken at start',
    },
    exports: exportsInfo,
    summary,
    samples: { guest: guestSamples, coalescing: coalescingSamples, rpo: rpoSample },
    notes,
    elapsedSeconds: Math.round(elapsedSec),
    loadAverageAtEnd: os.loadavg().map((l) => Math.round(l * 100) / 100),
  });
  console.log(`\nresults: ${path.relative(process.cwd(), opts.out) || opts.out}`);
}

runBench('bench/writeback', main);
