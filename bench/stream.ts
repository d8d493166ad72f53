// bench/stream: reading a disk that lives at the other site, over an emulated WAN, through the
// two edges (on-prem edge → `spillway wanem` → cloud edge → NBD), next to the copy-first way of
// doing it: qemu-nbd at the origin read through the same kind of relay. Every process is real.
//
//   npx tsx bench/stream.ts [--runs 3] [--image-size 1G] [--random-size 256M]
//                           [--out bench/results/stream.json] [--delay-ms 20] [--rate-mbit 100]
//                           [--connections N] [--window SIZE] [--read-ahead N]
//                           [--profile DIR] [--spillway-cli PATH]
//
// Measures, on an ext4 image built from a tree that looks like a VM disk (bench/lib/image.ts)
// and on an image of random data:
//   1. cold full read through the edges (fresh cloud cache) ÷ qemu-nbd through a relay
//   2. link bytes ÷ bytes read for that cold read
//   3. cold read of the random image: throughput ÷ link rate
//   4. warm (cached) full read ÷ a local qemu-nbd serving the image file (no relay)
//   5. the secure cache (AES-256-GCM) ÷ the same cache path without encryption
// A benchmark, not a test: it exits 0 whether targets are met or missed (see bench/README.md).

import { existsSync } from 'node:fs';
import { cp, mkdir, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { createHash, randomBytes } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { SecureCache } from '../src/cache/cache.js';
import { SlabStore, slotSizeFor } from '../src/cache/slab.js';
import { metric, startTwoSites, type TwoSites, type TwoSitesOptions } from '../test/helpers/edges.js';
import { installCleanupHandlers, onCleanup, runCleanups } from './lib/cleanup.js';
import { makeTempDir, writeRandomFile } from './lib/files.js';
import { buildFsImage, DEFAULT_FS_MIX, imageCensus, SYSTEM_SOURCES, type FsImageReport, type ImageCensus } from './lib/image.js';
import { REPO_ROOT, SPILLWAY_CLI } from './lib/nbd-servers.js';
import { freePort, haveCommand, processCpuSeconds, runCommand, startBackground, waitForListen, type Background } from './lib/process.js';
import { machineInfo, writeJsonResult } from './lib/results.js';
import { formatSize, parseSize } from './lib/size.js';
import { median, ratio, spread } from './lib/stats.js';
import { fmt, fmtRatio, formatTable } from './lib/table.js';

const MEASURES = ['cold', 'random', 'warm', 'cache'] as const;
type MeasureId = (typeof MEASURES)[number];

const USAGE = `Usage: npx tsx bench/stream.ts [options]

Streams a disk image from an on-prem edge to a cloud edge through \`spillway wanem\` and reads it
with nbdcopy; compares with qemu-nbd read through the same kind of relay, and with a local
qemu-nbd for cached reads. Prints medians and ratios; writes them as JSON.

Options:
  --runs N            measurements of each configuration, interleaved (default 3)
  --image-size SIZE   ext4 image size, binary units (default 1G)
  --random-size SIZE  all-random image for the link-rate measurement (default 256M)
  --out FILE          JSON results (default bench/results/stream.json)
  --delay-ms N        one-way delay of the relays (default 20: RTT 40 ms)
  --rate-mbit N       rate of the relays (default 100)
  --connections N     cloud edge peers[].connections (default: the helper's, 2)
  --window SIZE       cloud edge link.window, e.g. 16MiB (default: the edge's)
  --read-ahead N      cloud edge volumes[].readAhead in chunks (default: the edge's)
  --measures LIST     comma-separated, from ${MEASURES.join(',')} (default all)
  --profile DIR       after the measured runs, one more cold + warm read of the ext4 image with
                      both edges under \`node --cpu-prof\`; profiles and a summary go to DIR
  --spillway-cli PATH cli.js to run (default: a snapshot of dist/ taken at start, so a rebuild
                      by someone else during the run cannot change the code under test)
  -h, --help          this text`;

interface Options {
  runs: number;
  imageSize: number;
  randomSize: number;
  out: string;
  delayMs: number;
  rateMbit: number;
  connections: number | undefined;
  window: string | undefined;
  readAhead: number | undefined;
  measures: MeasureId[];
  profileDir: string | undefined;
  spillwayCli: string | undefined;
}

function positiveInt(text: string, name: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n <= 0) throw new Error(`--${name} must be a positive integer, got ${JSON.stringify(text)}`);
  return n;
}

function positiveNumber(text: string, name: string): number {
  const n = Number(text);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`--${name} must be a positive number, got ${JSON.stringify(text)}`);
  return n;
}

function parseOptions(argv: string[]): Options | null {
  const { values } = parseArgs({
    args: argv,
    options: {
      runs: { type: 'string', default: '3' },
      'image-size': { type: 'string', default: '1G' },
      'random-size': { type: 'string', default: '256M' },
      out: { type: 'string', default: path.join('bench', 'results', 'stream.json') },
      'delay-ms': { type: 'string', default: '20' },
      'rate-mbit': { type: 'string', default: '100' },
      connections: { type: 'string' },
      window: { type: 'string' },
      'read-ahead': { type: 'string' },
      measures: { type: 'string', default: MEASURES.join(',') },
      profile: { type: 'string' },
      'spillway-cli': { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) return null;
  const imageSize = parseSize(values['image-size']);
  const randomSize = parseSize(values['random-size']);
  for (const [n, v] of [['image-size', imageSize], ['random-size', randomSize]] as const) {
    if (v % 65536 !== 0 || v < 64 * 2 ** 20) throw new Error(`--${n} must be a multiple of 64 KiB and at least 64 MiB`);
  }
  const measures = values.measures.split(',').map((s) => s.trim()).filter((s) => s !== '');
  for (const m of measures) if (!(MEASURES as readonly string[]).includes(m)) throw new Error(`unknown measure ${JSON.stringify(m)}; choose from ${MEASURES.join(', ')}`);
  const readAhead = values['read-ahead'] === undefined ? undefined : Number(values['read-ahead']);
  if (readAhead !== undefined && (!Number.isInteger(readAhead) || readAhead < 0 || readAhead > 1024)) throw new Error('--read-ahead must be an integer 0..1024');
  if (values.window !== undefined && !/^\d+(\.\d+)?\s*(|k|m|g|kib|mib|gib|kb|mb|gb)$/i.test(values.window)) throw new Error(`--window: not a size: ${values.window}`);
  return {
    runs: positiveInt(values.runs, 'runs'),
    imageSize,
    randomSize,
    out: path.resolve(values.out),
    delayMs: positiveNumber(values['delay-ms'], 'delay-ms'),
    rateMbit: positiveNumber(values['rate-mbit'], 'rate-mbit'),
    connections: values.connections === undefined ? undefined : positiveInt(values.connections, 'connections'),
    window: values.window,
    readAhead,
    measures: [...new Set(measures as MeasureId[])],
    profileDir: values.profile === undefined ? undefined : path.resolve(values.profile),
    spillwayCli: values['spillway-cli'] === undefined ? undefined : path.resolve(values['spillway-cli']),
  };
}

// ------------------------------------------------------------------------------ processes

/**
 * A copy of dist/ with what it needs beside it (package.json, the native addon, node_modules),
 * so other people rebuilding dist/ during the run do not change the code under test.
 */
async function snapshotBuild(dir: string): Promise<string> {
  if (!existsSync(SPILLWAY_CLI)) throw new Error(`${path.relative(process.cwd(), SPILLWAY_CLI)} is missing: run \`npm run build\` first`);
  const root = path.join(dir, 'build-snapshot');
  await mkdir(root, { recursive: true });
  await cp(path.join(REPO_ROOT, 'dist'), path.join(root, 'dist'), { recursive: true });
  await cp(path.join(REPO_ROOT, 'package.json'), path.join(root, 'package.json'));
  await symlink(path.join(REPO_ROOT, 'node_modules'), path.join(root, 'node_modules'));
  await mkdir(path.join(root, 'build'));
  await cp(path.join(REPO_ROOT, 'build', 'Release'), path.join(root, 'build', 'Release'), { recursive: true });
  return path.join(root, 'dist', 'cli.js');
}

/** Start the two sites and make sure they are stopped whatever happens. */
async function startSites(dir: string, image: string, o: TwoSitesOptions): Promise<{ sites: TwoSites; stop: () => Promise<void> }> {
  await mkdir(dir, { recursive: true });
  const sites = await startTwoSites(dir, image, o);
  const unregister = onCleanup({
    label: `stop the edges and relay in ${dir}`,
    async: () => sites.stop(),
    sync: () => {
      for (const p of [sites.cloud, sites.onprem, sites.wanem]) {
        if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
      }
    },
  });
  return {
    sites,
    stop: async () => {
      await sites.stop();
      unregister();
    },
  };
}

interface RelayStats {
  bytes: { clientToTarget: number; targetToClient: number };
}

async function readRelayStats(file: string): Promise<RelayStats> {
  return JSON.parse(await readFile(file, 'utf8')) as RelayStats;
}

/** A `spillway wanem` relay in its own process, in front of `target`. */
async function startRelay(cli: string, target: number, statsFile: string, opts: Options): Promise<{ port: number; proc: Background }> {
  const port = await freePort();
  const proc = startBackground('wanem', process.execPath, [cli, 'wanem', '--listen', `127.0.0.1:${port}`, '--target', `127.0.0.1:${target}`, '--delay-ms', String(opts.delayMs), '--rate-mbit', String(opts.rateMbit), '--stats-file', statsFile]);
  await waitForListen(port, '127.0.0.1', proc);
  return { port, proc };
}

/** qemu-nbd serving `image` read-only (as the origin would, for a copy). */
async function startQemuNbd(image: string): Promise<{ port: number; proc: Background; command: string }> {
  const port = await freePort();
  const args = ['-r', '-f', 'raw', '-t', '-x', '', '-b', '127.0.0.1', '-p', String(port), image];
  const proc = startBackground('qemu-nbd', 'qemu-nbd', args);
  await waitForListen(port, '127.0.0.1', proc);
  return { port, proc, command: `qemu-nbd ${args.map((a) => (a === '' ? "''" : a)).join(' ')}`.replace(String(port), 'PORT').replace(image, 'IMAGE') };
}

async function nbdcopy(uri: string): Promise<number> {
  const r = await runCommand('nbdcopy', [uri, 'null:'], { timeoutMs: 3_600_000 });
  return r.seconds;
}

// ------------------------------------------------------------------------------ measurements

interface ColdSample {
  /** nbdcopy wall time, s. */
  seconds: number;
  /** bytes the relay carried towards the reader during the read. */
  linkBytes: number;
  /** bytes the reader sent towards the server (requests). */
  linkBytesUp: number;
  /** CPU seconds used during the read, by process. */
  cpu: Record<string, number>;
  /** cloud edge counters after the read (spillway only). */
  counters?: Record<string, number>;
}

interface WarmSample {
  seconds: number;
  cpu: Record<string, number>;
  counters?: Record<string, number>;
}

const COUNTERS: readonly [string, string, Record<string, string>][] = [
  ['readsCache', 'spillway_remote_chunk_reads_total', { tier: 'cache' }],
  ['readsLink', 'spillway_remote_chunk_reads_total', { tier: 'link' }],
  ['receivedData', 'spillway_remote_chunks_received_total', { kind: 'data' }],
  ['receivedZero', 'spillway_remote_chunks_received_total', { kind: 'zero' }],
  ['receivedSignature', 'spillway_remote_chunks_received_total', { kind: 'signature' }],
  ['coalesced', 'spillway_remote_fetches_coalesced_total', {}],
  ['readAheadChunks', 'spillway_remote_readahead_chunks_total', {}],
  ['timeouts', 'spillway_remote_fetch_timeouts_total', {}],
  ['corrupt', 'spillway_remote_chunks_corrupt_total', {}],
];

async function counters(url: string): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const [k, name, labels] of COUNTERS) out[k] = await metric(url, name, labels).catch(() => Number.NaN);
  return out;
}

async function cpuOf(procs: Record<string, number>): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const [k, pid] of Object.entries(procs)) out[k] = await processCpuSeconds(pid).catch(() => Number.NaN);
  return out;
}

function cpuDelta(after: Record<string, number>, before: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const k of Object.keys(after)) out[k] = Math.round(((after[k] ?? 0) - (before[k] ?? 0)) * 100) / 100;
  return out;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
/** The relay rewrites its stats file every 500 ms: wait for one rewrite after a quiet moment. */
const STATS_SETTLE_MS = 700;

/**
 * Cold full read through the edges, then (if asked) a warm one on the same cloud cache.
 * A fresh pair of edges, relay and cache per call.
 */
async function spillwayRead(dir: string, image: string, opts: Options, cli: string, warm: boolean, env?: TwoSitesOptions['env']): Promise<{ cold: ColdSample; warm: WarmSample | null }> {
  const { sites, stop } = await startSites(dir, image, {
    wan: { delayMs: opts.delayMs, rateMbit: opts.rateMbit },
    cacheSize: `${Math.ceil((opts.imageSize * 1.5) / 2 ** 20)}MiB`,
    connections: opts.connections,
    window: opts.window,
    readAhead: opts.readAhead,
    cli,
    env,
  });
  try {
    const pids = { cloud: sites.cloud.child.pid ?? 0, onprem: sites.onprem.child.pid ?? 0, relay: sites.wanem.child.pid ?? 0 };
    const statsFile = path.join(dir, 'wanem.json');
    await sleep(STATS_SETTLE_MS);
    const before = await readRelayStats(statsFile);
    const cpu0 = await cpuOf(pids);
    const seconds = await nbdcopy(sites.uri());
    const cpu1 = await cpuOf(pids);
    const c1 = await counters(sites.metricsUrl);
    let warmSample: WarmSample | null = null;
    if (warm) {
      const w0 = await cpuOf(pids);
      const wSeconds = await nbdcopy(sites.uri());
      const w1 = await cpuOf(pids);
      const c2 = await counters(sites.metricsUrl);
      const diff: Record<string, number> = {};
      for (const k of Object.keys(c2)) diff[k] = (c2[k] ?? 0) - (c1[k] ?? 0);
      warmSample = { seconds: wSeconds, cpu: cpuDelta(w1, w0), counters: diff };
    }
    await stop(); // the relay writes its stats one last time on exit
    const after = await readRelayStats(statsFile);
    return {
      cold: {
        seconds,
        linkBytes: after.bytes.targetToClient - before.bytes.targetToClient,
        linkBytesUp: after.bytes.clientToTarget - before.bytes.clientToTarget,
        cpu: cpuDelta(cpu1, cpu0),
        counters: c1,
      },
      warm: warmSample,
    };
  } finally {
    await stop();
  }
}

/** The copy-first baseline: nbdcopy from qemu-nbd at the origin through a relay. */
async function qemuRelayRead(dir: string, image: string, opts: Options, cli: string): Promise<ColdSample> {
  await mkdir(dir, { recursive: true });
  const q = await startQemuNbd(image);
  const statsFile = path.join(dir, 'wanem-qemu.json');
  let relay: { port: number; proc: Background } | null = null;
  try {
    relay = await startRelay(cli, q.port, statsFile, opts);
    const pids = { 'qemu-nbd': q.proc.pid, relay: relay.proc.pid };
    const cpu0 = await cpuOf(pids);
    const seconds = await nbdcopy(`nbd://127.0.0.1:${relay.port}/`);
    const cpu1 = await cpuOf(pids);
    await relay.proc.stop();
    const s = await readRelayStats(statsFile);
    return { seconds, linkBytes: s.bytes.targetToClient, linkBytesUp: s.bytes.clientToTarget, cpu: cpuDelta(cpu1, cpu0) };
  } finally {
    await relay?.proc.stop();
    await q.proc.stop();
  }
}

/** A local qemu-nbd on the image file, no relay: what a cached read should come close to. */
async function qemuLocalRead(image: string): Promise<WarmSample> {
  const q = await startQemuNbd(image);
  try {
    const cpu0 = await cpuOf({ 'qemu-nbd': q.proc.pid });
    const seconds = await nbdcopy(`nbd://127.0.0.1:${q.port}/`);
    const cpu1 = await cpuOf({ 'qemu-nbd': q.proc.pid });
    return { seconds, cpu: cpuDelta(cpu1, cpu0) };
  } finally {
    await q.proc.stop();
  }
}

// ------------------------------------------------------------------------------ cache (5)

interface CacheSample {
  /** reads of the image's data chunks through SecureCache.get (decrypt + verify), s. */
  secureGet: number;
  /** the same chunks read raw from the same slab layout, s. */
  rawGet: number;
  securePut: number;
  rawPut: number;
}

/**
 * Until the cache offers an unencrypted mode, measured in process (bench/cache.ts's approach,
 * over the image's own data chunks): SecureCache put/get against the same slab layout written
 * and read raw, with the cache's concurrency (QD 8).
 */
async function cacheCompare(dir: string, chunks: readonly Buffer[], qd: number): Promise<CacheSample> {
  const timed = async (n: number, op: (i: number) => Promise<unknown>): Promise<number> => {
    const t0 = performance.now();
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < n) await op(next++);
    };
    await Promise.all(Array.from({ length: Math.min(qd, n) }, worker));
    return (performance.now() - t0) / 1000;
  };
  const secureDir = path.join(dir, 'secure');
  const rawDir = path.join(dir, 'raw');
  await mkdir(secureDir, { recursive: true });
  await mkdir(rawDir, { recursive: true });
  const cache = await SecureCache.open({ dir: secureDir, maxBytes: 2 ** 40 });
  let secureGet: number;
  let securePut: number;
  try {
    cache.setKey('bench', randomBytes(32));
    const ids = chunks.map((b) => createHash('sha256').update(b).digest());
    securePut = await timed(chunks.length, (i) => cache.put('vol', 'bench', i, ids[i] as Buffer, chunks[i] as Buffer));
    secureGet = await timed(chunks.length, (i) => cache.get('vol', i));
  } finally {
    await cache.close();
  }
  const store = await SlabStore.open(rawDir);
  let rawGet: number;
  let rawPut: number;
  try {
    const slots: { slab: Awaited<ReturnType<SlabStore['slab']>>; slot: number; len: number }[] = [];
    const t0 = performance.now();
    for (const c of chunks) {
      const slab = await store.slab(slotSizeFor(c.length));
      slots.push({ slab, slot: slab.allocate(true) as number, len: c.length });
    }
    rawPut = (performance.now() - t0) / 1000 + (await timed(chunks.length, (i) => (slots[i] as (typeof slots)[number]).slab.write((slots[i] as (typeof slots)[number]).slot, chunks[i] as Buffer)));
    rawGet = await timed(chunks.length, (i) => (slots[i] as (typeof slots)[number]).slab.read((slots[i] as (typeof slots)[number]).slot, (slots[i] as (typeof slots)[number]).len));
  } finally {
    await store.close();
  }
  return { secureGet, rawGet, securePut, rawPut };
}

/** Up to `max` non-zero 64 KiB chunks of the image, spread over it. */
async function dataChunks(image: string, sizeBytes: number, max: number): Promise<Buffer[]> {
  const { open } = await import('node:fs/promises');
  const fh = await open(image, 'r');
  const out: Buffer[] = [];
  try {
    const n = sizeBytes / 65536;
    const step = Math.max(1, Math.floor(n / (max * 2)));
    for (let i = 0; i < n && out.length < max; i += step) {
      const b = Buffer.alloc(65536);
      await fh.read(b, 0, 65536, i * 65536);
      if (!b.equals(Buffer.alloc(65536))) out.push(b);
    }
  } finally {
    await fh.close();
  }
  return out;
}

// ------------------------------------------------------------------------------ profiles

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}
interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

export interface ProfileSummary {
  file: string;
  totalMs: number;
  idleMs: number;
  top: { fn: string; where: string; selfMs: number; share: number }[];
  byFile: { where: string; selfMs: number; share: number }[];
}

/** Self time per function and per source file of a .cpuprofile (V8's format). */
function summarizeProfile(file: string, profile: CpuProfile, topN = 15): ProfileSummary {
  const byId = new Map<number, ProfileNode>(profile.nodes.map((n) => [n.id, n]));
  const self = new Map<number, number>();
  for (let i = 0; i < profile.samples.length; i++) {
    const id = profile.samples[i] as number;
    self.set(id, (self.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0));
  }
  const fnTotals = new Map<string, { fn: string; where: string; us: number }>();
  const fileTotals = new Map<string, number>();
  let total = 0;
  let idle = 0;
  for (const [id, us] of self) {
    const n = byId.get(id);
    if (!n) continue;
    total += us;
    const fn = n.callFrame.functionName || '(anonymous)';
    if (fn === '(idle)') idle += us;
    const url = n.callFrame.url.replace(/^file:\/\//, '');
    const rel = url.includes('/dist/') ? url.slice(url.indexOf('/dist/') + 1) : url.includes('node_modules/') ? url.slice(url.indexOf('node_modules/')) : url || '(native)';
    const where = `${rel}${n.callFrame.url ? `:${n.callFrame.lineNumber + 1}` : ''}`;
    const key = `${fn}@${where}`;
    const t = fnTotals.get(key) ?? { fn, where, us: 0 };
    t.us += us;
    fnTotals.set(key, t);
    fileTotals.set(rel, (fileTotals.get(rel) ?? 0) + us);
  }
  const busy = Math.max(1, total - idle);
  return {
    file,
    totalMs: total / 1000,
    idleMs: idle / 1000,
    top: [...fnTotals.values()]
      .filter((t) => t.fn !== '(idle)')
      .sort((a, b) => b.us - a.us)
      .slice(0, topN)
      .map((t) => ({ fn: t.fn, where: t.where, selfMs: Math.round(t.us / 1000), share: Math.round((t.us / busy) * 1000) / 1000 })),
    byFile: [...fileTotals.entries()]
      .sort((a, b) => b[1] - a[1])
      .slice(0, topN)
      .map(([where, us]) => ({ where, selfMs: Math.round(us / 1000), share: Math.round((us / busy) * 1000) / 1000 })),
  };
}

async function profileRun(dir: string, image: string, opts: Options, cli: string): Promise<{ cold: ColdSample; warm: WarmSample | null; profiles: Record<string, ProfileSummary[]> }> {
  const profDir = opts.profileDir as string;
  const envFor = (who: string): NodeJS.ProcessEnv => ({ ...process.env, NODE_OPTIONS: `${process.env['NODE_OPTIONS'] ?? ''} --cpu-prof --cpu-prof-dir=${path.join(profDir, who)}`.trim() });
  await rm(profDir, { recursive: true, force: true });
  await mkdir(path.join(profDir, 'cloud'), { recursive: true });
  await mkdir(path.join(profDir, 'onprem'), { recursive: true });
  // The PKI commands also run node: only the edges get the profiler (through their env).
  const r = await spillwayRead(dir, image, opts, cli, true, { cloud: envFor('cloud'), onprem: envFor('onprem') });
  const profiles: Record<string, ProfileSummary[]> = {};
  for (const who of ['cloud', 'onprem']) {
    profiles[who] = [];
    for (const f of (await readdir(path.join(profDir, who))).filter((x) => x.endsWith('.cpuprofile'))) {
      const file = path.join(profDir, who, f);
      const s = summarizeProfile(file, JSON.parse(await readFile(file, 'utf8')) as CpuProfile);
      profiles[who]?.push(s);
    }
  }
  await writeFile(path.join(profDir, 'summary.json'), `${JSON.stringify(profiles, null, 2)}\n`);
  return { ...r, profiles };
}

// ------------------------------------------------------------------------------ main

async function checkTools(): Promise<void> {
  const needed: [string, string][] = [
    ['nbdcopy', 'libnbd-bin'],
    ['nbdinfo', 'libnbd-bin'],
    ['qemu-nbd', 'qemu-utils'],
    ['mkfs.ext4', 'e2fsprogs'],
    ['dumpe2fs', 'e2fsprogs'],
  ];
  const problems: string[] = [];
  for (const [cmd, pkg] of needed) if (!(await haveCommand(cmd))) problems.push(`${cmd} is missing: apt-get install ${pkg}`);
  if (problems.length > 0) throw new Error(problems.join('\n'));
}

function verdict(value: number | null, target: number, higherIsBetter: boolean): string {
  if (value === null || !Number.isFinite(value)) return 'n/a';
  return (higherIsBetter ? value >= target : value <= target) ? 'met' : 'missed';
}

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  if (!opts) {
    console.log(USAGE);
    return;
  }
  installCleanupHandlers();
  await checkTools();
  const machine = await machineInfo(REPO_ROOT, {
    nbdcopy: ['nbdcopy', '--version'],
    'qemu-nbd': ['qemu-nbd', '--version'],
    'mkfs.ext4': ['mkfs.ext4', '-V'],
  });
  const [load1] = machine.loadAverage;
  if (load1 !== undefined && load1 > machine.nproc / 2) {
    console.error(`note: load average ${load1} on ${machine.nproc} CPUs before starting: other work will skew these figures`);
  }
  const tmp = await makeTempDir('spw-bench-stream-');
  const cli = opts.spillwayCli ?? (await snapshotBuild(tmp.dir));
  const log = (s: string): void => void process.stderr.write(`${s}\n`);

  // Images.
  const fsImage = path.join(tmp.dir, 'fs.img');
  const randomImage = path.join(tmp.dir, 'random.img');
  log(`building a ${formatSize(opts.imageSize)} ext4 image (mkfs.ext4 -d from a tree of system, random and zero files)…`);
  const fsReport: FsImageReport = await buildFsImage(fsImage, tmp.dir, opts.imageSize);
  const census: ImageCensus = await imageCensus(fsImage);
  if (opts.measures.includes('random')) {
    log(`writing ${formatSize(opts.randomSize)} of random data…`);
    await writeRandomFile(randomImage, opts.randomSize);
  }
  const composition = describeImage(fsReport, census);
  console.log(composition);

  // Measurements, interleaved.
  const samples: { run: number; what: string; sample: ColdSample | WarmSample }[] = [];
  const add = (run: number, what: string, sample: ColdSample | WarmSample | null): void => {
    if (sample) samples.push({ run, what, sample });
  };
  const mbps = (bytes: number, s: number): number => (bytes * 8) / s / 1e6;
  const wantCold = opts.measures.includes('cold');
  const wantWarm = opts.measures.includes('warm');
  for (let run = 1; run <= opts.runs; run++) {
    const tag = `[run ${run}/${opts.runs}]`;
    if (wantCold || wantWarm) {
      const r = await spillwayRead(path.join(tmp.dir, `sites-fs-${run}`), fsImage, opts, cli, wantWarm);
      add(run, 'spillway-cold', r.cold);
      add(run, 'spillway-warm', r.warm);
      log(`${tag} spillway cold   ${fmt(r.cold.seconds, 1)} s, link ${formatSize(r.cold.linkBytes)} (${fmt(mbps(r.cold.linkBytes, r.cold.seconds), 1)} Mbit/s), cpu ${JSON.stringify(r.cold.cpu)}`);
      if (r.warm) log(`${tag} spillway warm   ${fmt(r.warm.seconds, 2)} s, cpu ${JSON.stringify(r.warm.cpu)}`);
      await rm(path.join(tmp.dir, `sites-fs-${run}`), { recursive: true, force: true });
    }
    if (wantCold) {
      const q = await qemuRelayRead(path.join(tmp.dir, `qemu-fs-${run}`), fsImage, opts, cli);
      add(run, 'qemu-relay', q);
      log(`${tag} qemu-nbd relay  ${fmt(q.seconds, 1)} s, link ${formatSize(q.linkBytes)} (${fmt(mbps(q.linkBytes, q.seconds), 1)} Mbit/s)`);
    }
    if (opts.measures.includes('random')) {
      const r = await spillwayRead(path.join(tmp.dir, `sites-rand-${run}`), randomImage, { ...opts, imageSize: opts.randomSize }, cli, false);
      add(run, 'spillway-random', r.cold);
      log(`${tag} spillway random ${fmt(r.cold.seconds, 1)} s = ${fmt(mbps(opts.randomSize, r.cold.seconds), 1)} Mbit/s of data, link ${fmt(mbps(r.cold.linkBytes, r.cold.seconds), 1)} Mbit/s`);
      await rm(path.join(tmp.dir, `sites-rand-${run}`), { recursive: true, force: true });
      const q = await qemuRelayRead(path.join(tmp.dir, `qemu-rand-${run}`), randomImage, opts, cli);
      add(run, 'qemu-relay-random', q);
      log(`${tag} qemu-nbd random ${fmt(q.seconds, 1)} s = ${fmt(mbps(opts.randomSize, q.seconds), 1)} Mbit/s`);
    }
    if (wantWarm) {
      const l = await qemuLocalRead(fsImage);
      add(run, 'qemu-local', l);
      log(`${tag} qemu-nbd local  ${fmt(l.seconds, 2)} s`);
    }
  }

  // (5) the cache with and without encryption.
  const cacheSamples: CacheSample[] = [];
  if (opts.measures.includes('cache')) {
    const chunks = await dataChunks(fsImage, opts.imageSize, 2048);
    for (let run = 1; run <= opts.runs; run++) {
      const dir = path.join(tmp.dir, `cache-${run}`);
      const s = await cacheCompare(dir, chunks, 8);
      cacheSamples.push(s);
      log(`[cache ${run}/${opts.runs}] secure get ${fmt(s.secureGet, 2)} s, raw get ${fmt(s.rawGet, 2)} s (${chunks.length} chunks)`);
      await rm(dir, { recursive: true, force: true });
    }
  }

  let profile: Awaited<ReturnType<typeof profileRun>> | null = null;
  if (opts.profileDir) {
    log(`profiling one more cold + warm read into ${opts.profileDir}…`);
    profile = await profileRun(path.join(tmp.dir, 'sites-profile'), fsImage, opts, cli);
  }

  // Summary.
  const of = (what: string): (ColdSample | WarmSample)[] => samples.filter((s) => s.what === what).map((s) => s.sample);
  const secs = (what: string): number[] => of(what).map((s) => s.seconds);
  const links = (what: string): number[] => of(what).map((s) => (s as ColdSample).linkBytes);
  const rateBytes = (opts.rateMbit * 1e6) / 8;
  const coldSpw = median(secs('spillway-cold'));
  const coldQemu = median(secs('qemu-relay'));
  const speedup = ratio(coldQemu, coldSpw);
  const linkPerRead = links('spillway-cold').length > 0 ? median(links('spillway-cold')) / opts.imageSize : null;
  const linkPerReadQemu = links('qemu-relay').length > 0 ? median(links('qemu-relay')) / opts.imageSize : null;
  const randSpw = median(secs('spillway-random'));
  const randQemu = median(secs('qemu-relay-random'));
  const randOfLink = Number.isFinite(randSpw) ? opts.randomSize / randSpw / rateBytes : null;
  const randOfLinkQemu = Number.isFinite(randQemu) ? opts.randomSize / randQemu / rateBytes : null;
  const warmSpw = median(secs('spillway-warm'));
  const localQemu = median(secs('qemu-local'));
  const warmRatio = ratio(localQemu, warmSpw);
  const cacheGet = cacheSamples.length > 0 ? ratio(median(cacheSamples.map((s) => s.rawGet)), median(cacheSamples.map((s) => s.secureGet))) : null;
  const cachePut = cacheSamples.length > 0 ? ratio(median(cacheSamples.map((s) => s.rawPut)), median(cacheSamples.map((s) => s.securePut))) : null;

  const gib = opts.imageSize / 2 ** 30;
  const rows = [
    {
      id: 'cold',
      label: `1. cold full read, ${formatSize(opts.imageSize)} ext4 image`,
      spillway: `${fmt(coldSpw, 1)} s`,
      peer: `${fmt(coldQemu, 1)} s`,
      figure: speedup,
      figureText: `${fmtRatio(speedup)} faster`,
      target: '>= 1.50x',
      result: verdict(speedup, 1.5, true),
      spread: `${fmt(spread(secs('spillway-cold')))}/${fmt(spread(secs('qemu-relay')))}`,
    },
    {
      id: 'link',
      label: '2. link bytes / bytes read (cold)',
      spillway: fmt(linkPerRead, 3),
      peer: fmt(linkPerReadQemu, 3),
      figure: linkPerRead,
      figureText: fmt(linkPerRead, 3),
      target: '<= 0.50',
      result: verdict(linkPerRead, 0.5, false),
      spread: `${fmt(spread(links('spillway-cold')))}/${fmt(spread(links('qemu-relay')))}`,
    },
    {
      id: 'random',
      label: `3. cold read, ${formatSize(opts.randomSize)} random: throughput / link rate`,
      spillway: `${fmt(randSpw, 1)} s`,
      peer: `${fmt(randQemu, 1)} s`,
      figure: randOfLink,
      figureText: `${fmt(randOfLink, 2)} (qemu-nbd ${fmt(randOfLinkQemu, 2)})`,
      target: '>= 0.90',
      result: verdict(randOfLink, 0.9, true),
      spread: `${fmt(spread(secs('spillway-random')))}/${fmt(spread(secs('qemu-relay-random')))}`,
    },
    {
      id: 'warm',
      label: '4. warm full read vs local qemu-nbd',
      spillway: `${fmt(warmSpw, 2)} s`,
      peer: `${fmt(localQemu, 2)} s`,
      figure: warmRatio,
      figureText: fmtRatio(warmRatio),
      target: '>= 0.80x',
      result: verdict(warmRatio, 0.8, true),
      spread: `${fmt(spread(secs('spillway-warm')))}/${fmt(spread(secs('qemu-local')))}`,
    },
    {
      id: 'cache',
      label: '5. encrypted / unencrypted cache, get (put)',
      spillway: cacheSamples.length > 0 ? `${fmt(median(cacheSamples.map((s) => s.secureGet)), 2)} s` : '-',
      peer: cacheSamples.length > 0 ? `${fmt(median(cacheSamples.map((s) => s.rawGet)), 2)} s` : '-',
      figure: cacheGet,
      figureText: `${fmtRatio(cacheGet)} (${fmtRatio(cachePut)})`,
      target: '>= 0.70x',
      result: verdict(cacheGet, 0.7, true),
      spread: cacheSamples.length > 0 ? `${fmt(spread(cacheSamples.map((s) => s.secureGet)))}/${fmt(spread(cacheSamples.map((s) => s.rawGet)))}` : '-',
    },
  ].filter((r) => opts.measures.includes(r.id === 'link' ? 'cold' : (r.id as MeasureId)));

  const table = formatTable(
    [{ header: 'measure' }, { header: 'spillway', right: true }, { header: 'peer', right: true }, { header: 'figure', right: true }, { header: 'target' }, { header: 'result' }, { header: 'spread s/p', right: true }],
    rows.map((r) => [r.label, r.spillway, r.peer, r.figureText, r.target, r.result, r.spread]),
  );
  const notes = [
    `Link: \`spillway wanem\` at ${opts.rateMbit} Mbit/s, ${opts.delayMs} ms each way (RTT ${opts.delayMs * 2} ms), one relay process per measurement.`,
    'Peers: 1-2 and 3 (context) nbdcopy from `qemu-nbd -r -f raw -t` at the origin through a second relay with the same parameters; 4 nbdcopy from that qemu-nbd on the image file, no relay.',
    'Times are nbdcopy wall times (process start to exit, including connect), to `null:`; nbdcopy opens 4 connections when the server advertises multi-conn (the cloud edge does; qemu-nbd -r does not).',
    'nbdcopy asks the source for extents and skips holes/zeroes: qemu-nbd reports the image file\'s holes, the cloud edge reports the zero chunks its cache knows (none at the start of a cold read).',
    'Link bytes = bytes the relay delivered towards the reader (TLS, frames, NBD replies); bytes read = the image size.',
    `Medians of ${opts.runs} run(s), configurations interleaved; a fresh cloud cache, edges and relay per cold read.`,
  ];
  if (opts.measures.includes('cache')) notes.push('5: the cache offers no unencrypted mode; measured in process over 64 KiB data chunks of the image: SecureCache.get/put (AES-256-GCM, index, SLRU) against the same slab layout read/written raw, QD 8.');

  console.log(`\nbench/stream: ${formatSize(opts.imageSize)} ext4 image over ${opts.rateMbit} Mbit/s, RTT ${opts.delayMs * 2} ms; medians of ${opts.runs}`);
  console.log(table);
  for (const n of notes) console.log(`- ${n}`);
  if (profile) printProfiles(profile.profiles);

  await writeJsonResult(opts.out, {
    bench: 'stream',
    machine,
    config: {
      runs: opts.runs,
      imageSizeBytes: opts.imageSize,
      randomSizeBytes: opts.randomSize,
      delayMs: opts.delayMs,
      rateMbit: opts.rateMbit,
      cloudEdge: { connections: opts.connections ?? 2, window: opts.window ?? 'default (8MiB)', readAhead: opts.readAhead ?? 'default (64)' },
      measures: opts.measures,
      client: 'nbdcopy URI null:',
      spillwayCli: opts.spillwayCli ?? 'snapshot of dist/',
    },
    image: { report: fsReport, census, systemSources: SYSTEM_SOURCES, mix: DEFAULT_FS_MIX },
    summary: {
      coldSeconds: { spillway: coldSpw, qemuRelay: coldQemu },
      coldSpeedup: speedup,
      linkBytesPerByteRead: { spillway: linkPerRead, qemuRelay: linkPerReadQemu },
      randomThroughputOfLink: { spillway: randOfLink, qemuRelay: randOfLinkQemu },
      warmSeconds: { spillway: warmSpw, qemuLocal: localQemu, ratio: warmRatio, gibPerSec: { spillway: gib / warmSpw, qemuLocal: gib / localQemu } },
      cache: { getRatio: cacheGet, putRatio: cachePut },
      rows: rows.map((r) => ({ measure: r.label, spillway: r.spillway, peer: r.peer, figure: r.figure, target: r.target, result: r.result, spread: r.spread })),
    },
    samples,
    cacheSamples,
    profile: profile ? { cold: profile.cold, warm: profile.warm, profiles: profile.profiles } : null,
    notes,
    loadAverageAtEnd: os.loadavg().map((l) => Math.round(l * 100) / 100),
  });
  console.log(`\nresults: ${path.relative(process.cwd(), opts.out) || opts.out}`);
}

function describeImage(r: FsImageReport, c: ImageCensus): string {
  const pct = (n: number): string => `${fmt((n / r.sizeBytes) * 100, 1)} %`;
  const lines = [
    `image: ${formatSize(r.sizeBytes)} ext4 (${r.mkfs})`,
    `  files: system ${formatSize(r.tree.systemBytes)} in ${r.tree.systemFiles} files (${Object.entries(r.tree.bySource).map(([d, b]) => `${d} ${formatSize(b)}`).join(', ')})`,
    `         random ${formatSize(r.tree.randomBytes)} in ${r.tree.randomFiles} files; zero-filled ${formatSize(r.tree.zeroBytes)} in ${r.tree.zeroFiles} files; fs free ${r.fsFreeBytes === null ? '?' : formatSize(r.fsFreeBytes)}`,
    `  64 KiB chunks: ${c.chunks}; zero ${c.zeroChunks} (${pct(c.zeroChunks * c.chunkSize)}), LZ4 ${c.lz4Chunks} (${pct(c.lz4RawBytes)} → ${formatSize(c.lz4Bytes)}, ${fmt(c.lz4RawBytes / Math.max(1, c.lz4Bytes), 2)}:1), raw ${c.rawChunks} (${pct(c.rawBytes)})`,
    `  allocated in the file (not holes): ${formatSize(c.allocatedBytes)} (${pct(c.allocatedBytes)}); link payload for a full read: ${formatSize(c.linkPayloadBytes)} (${fmt(c.linkPayloadBytes / r.sizeBytes, 3)} of the image)`,
  ];
  return lines.join('\n');
}

function printProfiles(profiles: Record<string, ProfileSummary[]>): void {
  for (const [who, list] of Object.entries(profiles)) {
    for (const p of list) {
      console.log(`\nprofile ${who} (${path.basename(p.file)}): ${fmt(p.totalMs / 1000, 1)} s sampled, ${fmt((p.idleMs / Math.max(1, p.totalMs)) * 100, 0)} % idle; top self time of the busy part:`);
      console.log(formatTable([{ header: 'function' }, { header: 'where' }, { header: 'self ms', right: true }, { header: 'share', right: true }], p.top.map((t) => [t.fn, t.where, String(t.selfMs), `${fmt(t.share * 100, 1)} %`])));
    }
  }
}

void main()
  .catch((e: unknown) => {
    console.error(`bench/stream: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    process.exitCode = 1;
  })
  .finally(() => runCleanups());

