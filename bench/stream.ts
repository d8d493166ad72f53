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
//   5. warm read with the secure cache (AES-256-GCM) ÷ the same build with the cipher swapped
//      for a pass-through (a private copy of dist/, never the tree), plus the in-process
//      SecureCache ÷ raw slab figure of bench/cache.ts for context
// A benchmark, not a test: it exits 0 whether targets are met or missed (see bench/README.md).

import { existsSync } from 'node:fs';
import { cp, mkdir, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { createHash, randomBytes } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { pathToFileURL } from 'node:url';
import { SecureCache } from '../src/cache/cache.js';
import { SlabStore } from '../src/cache/slab.js';
import type { TwoSitesOptions } from '../test/helpers/edges.js';
import { installCleanupHandlers, runBench } from './lib/cleanup.js';
import { readRelayStats, startQemuNbd, startRelay } from './lib/relay.js';
import { copyBuild, counters, cpuOf, startSites } from './lib/sites.js';
import { makeTempDir, writeRandomFile } from './lib/files.js';
import { buildFsImage, DEFAULT_FS_MIX, imageCensus, SYSTEM_SOURCES, type FsImageReport, type ImageCensus } from './lib/image.js';
import { REPO_ROOT } from './lib/nbd-servers.js';
import { haveCommand, runCommand, type Background } from './lib/process.js';
import { machineInfo, writeJsonResult } from './lib/results.js';
import { formatSize, parseSize } from './lib/size.js';
import { diff, median, ratio, spread, verdict } from './lib/stats.js';
import { fmt, fmtRatio, formatTable } from './lib/table.js';
import { positiveInt } from './lib/args.js';

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
  --spillway-cli PATH dist/cli.js of another checkout or copy (package.json, node_modules and
                      build/Release beside its dist/); default: a copy of this checkout's dist/
                      taken at start, so a rebuild during the run cannot change the code under test
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


/** What the unencrypted build's cloud edge logs as it loads the cache. */
const INSECURE_MARK = 'INSECURE benchmark-only build';

/** The pass-through that replaces AES-256-GCM in the benchmark-only unencrypted build. */
const PLAIN_CIPHER_JS = `// BENCHMARK-ONLY, INSECURE: written by bench/stream.ts into a private copy of dist/ to measure
// what encryption costs the secure cache. Blobs are stored in the clear, nothing is authenticated.
export * from './blob-cipher.aes.js';
process.stderr.write(JSON.stringify({ time: new Date().toISOString(), level: 'warn', component: 'cache', msg: '${INSECURE_MARK} (bench/stream.ts): the cache does NOT encrypt or authenticate blobs' }) + '\\n');
const ZERO_NONCE = Buffer.alloc(12);
const ZERO_TAG = Buffer.alloc(16);
export function sealBlob(_key, _aad, plaintext) {
  // A copy, as the cipher makes one: the caller may reuse its buffer once this returns.
  return { nonce: ZERO_NONCE, ciphertext: Buffer.from(plaintext), tag: ZERO_TAG };
}
export function openBlob(_key, _aad, _nonce, ciphertext, _tag) {
  return Buffer.isBuffer(ciphertext) ? ciphertext : Buffer.from(ciphertext.buffer, ciphertext.byteOffset, ciphertext.length);
}
`;

/** What dist/cache/blob-cipher.js must export for the swap to be a like-for-like replacement. */
const CIPHER_EXPORTS = ['NONCE_SIZE', 'TAG_SIZE', 'blobAad', 'cipherKey', 'openBlob', 'sealBlob'];

/**
 * A second snapshot whose cache cipher is a pass-through (benchmark only, logged as insecure by
 * the edge at start), or the reason it cannot be made from this build.
 */
async function plainCacheBuild(dir: string, encryptedCli: string): Promise<{ cli: string } | { skipped: string }> {
  const from = path.dirname(path.dirname(encryptedCli));
  const cipher = path.join(from, 'dist', 'cache', 'blob-cipher.js');
  if (!existsSync(cipher)) return { skipped: `${cipher} not found: this build has no blob-cipher module to swap` };
  const mod = (await import(pathToFileURL(cipher).href)) as Record<string, unknown>;
  const names = Object.keys(mod).sort();
  if (names.join(',') !== CIPHER_EXPORTS.join(',')) return { skipped: `blob-cipher.js exports ${names.join(', ')}, expected ${CIPHER_EXPORTS.join(', ')}: the pass-through would not be a like-for-like swap` };
  const root = path.join(dir, 'build-snapshot-plain');
  const cli = await copyBuild(from, root);
  const target = path.join(root, 'dist', 'cache');
  await cp(path.join(target, 'blob-cipher.js'), path.join(target, 'blob-cipher.aes.js'));
  await writeFile(path.join(target, 'blob-cipher.js'), PLAIN_CIPHER_JS);
  return { cli };
}



// ------------------------------------------------------------------------------ measurements

/** A window of CLOCK_MONOTONIC in µs: the clock V8's CPU profiles use, shared by every process. */
interface Phase {
  fromUs: number;
  toUs: number;
}

const nowUs = (): number => Number(process.hrtime.bigint() / 1000n);

interface ReadSample {
  /** nbdcopy wall time, s. */
  seconds: number;
  /** 1-minute load average when the read ended. */
  load: number;
  /** CPU seconds used during the read, by process. */
  cpu: Record<string, number>;
  /** through a relay: bytes it delivered towards the reader, and towards the server. */
  linkBytes?: number;
  linkBytesUp?: number;
  /** cloud edge counters for this read (spillway only). */
  counters?: Record<string, number>;
  phase: Phase;
  /** warm reads: the times of every measured read (the sample is the median one). */
  allSeconds?: number[];
}


/** nbdcopy of `uri` to null:, with the CPU time of `pids` over the copy. */
async function timedRead(uri: string, pids: Record<string, number>): Promise<ReadSample> {
  const cpu0 = await cpuOf(pids);
  const fromUs = nowUs();
  const r = await runCommand('nbdcopy', [uri, 'null:'], { timeoutMs: 3_600_000 });
  const toUs = nowUs();
  return { seconds: r.seconds, load: Math.round(os.loadavg()[0]! * 100) / 100, cpu: diff(await cpuOf(pids), cpu0), phase: { fromUs, toUs } };
}

/**
 * Warm reads after a cold one: the first is not measured (it warms up V8's JIT on the cached
 * path), the median of the others is the sample.
 */
const WARM_READS = 4;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
/** The relay rewrites its stats file every 500 ms: wait for one rewrite after a quiet moment. */
const STATS_SETTLE_MS = 700;

interface SpillwayReadOptions {
  cli: string;
  /** relay parameters (default: the bench's link). */
  wan?: { delayMs: number; rateMbit: number };
  /** full reads after the cold one, on the same cache: the first is not measured, the median of the others is returned as warm. */
  warmReads: number;
  nodeArgs?: TwoSitesOptions['nodeArgs'];
  /** the build is the unencrypted one: check that the cloud edge said so as it started. */
  insecure?: boolean;
}


/** Cold full read through a fresh pair of edges, relay and cache, then warm reads on that cache. */
async function spillwayRead(dir: string, image: string, imageSize: number, opts: Options, o: SpillwayReadOptions): Promise<{ cold: ReadSample; warm: ReadSample | null }> {
  const { sites, stop } = await startSites(dir, image, {
    wan: o.wan ?? { delayMs: opts.delayMs, rateMbit: opts.rateMbit },
    cacheSize: `${Math.ceil((imageSize * 1.5) / 2 ** 20)}MiB`,
    connections: opts.connections,
    window: opts.window,
    readAhead: opts.readAhead,
    cli: o.cli,
    nodeArgs: o.nodeArgs,
  });
  try {
    if (o.insecure !== undefined && sites.cloud.stderr().includes(INSECURE_MARK) !== o.insecure) {
      throw new Error(`the cloud edge run from ${o.cli} ${o.insecure ? 'did not log' : 'logged'} "${INSECURE_MARK}": the encrypted/unencrypted builds are mixed up`);
    }
    const pids = { cloud: sites.cloud.child.pid ?? 0, onprem: sites.onprem.child.pid ?? 0, relay: sites.wanem.child.pid ?? 0 };
    const statsFile = path.join(dir, 'wanem.json');
    await sleep(STATS_SETTLE_MS);
    const before = await readRelayStats(statsFile);
    const c0 = await counters(sites.metricsUrl);
    const cold = await timedRead(sites.uri(), pids);
    const c1 = await counters(sites.metricsUrl);
    cold.counters = diff(c1, c0, 0);
    const warmReads: ReadSample[] = [];
    let cPrev = c1;
    for (let i = 0; i < o.warmReads; i++) {
      const w = await timedRead(sites.uri(), pids);
      const c = await counters(sites.metricsUrl);
      w.counters = diff(c, cPrev, 0);
      cPrev = c;
      if (i > 0 || o.warmReads === 1) warmReads.push(w);
    }
    // The median read (by time) stands for the lot; the others' times are kept beside it.
    const sorted = [...warmReads].sort((a, b) => a.seconds - b.seconds);
    const mid = sorted[Math.floor((sorted.length - 1) / 2)];
    const warm: ReadSample | null = mid ? { ...mid, allSeconds: warmReads.map((w) => w.seconds) } : null;
    await stop(); // the relay writes its stats one last time as it exits
    const after = await readRelayStats(statsFile);
    cold.linkBytes = after.targetToClient - before.targetToClient;
    cold.linkBytesUp = after.clientToTarget - before.clientToTarget;
    return { cold, warm };
  } finally {
    await stop();
  }
}

/** The copy-first baseline: nbdcopy from qemu-nbd at the origin through a relay like the edges'. */
async function qemuRelayRead(dir: string, image: string, opts: Options, cli: string): Promise<ReadSample> {
  await mkdir(dir, { recursive: true });
  const q = await startQemuNbd(image);
  const statsFile = path.join(dir, 'wanem-qemu.json');
  let relay: { port: number; proc: Background } | null = null;
  try {
    relay = await startRelay(cli, q.port, statsFile, opts);
    const r = await timedRead(`nbd://127.0.0.1:${relay.port}/`, { 'qemu-nbd': q.proc.pid, relay: relay.proc.pid });
    await relay.proc.stop();
    const s = await readRelayStats(statsFile);
    return { ...r, linkBytes: s.targetToClient, linkBytesUp: s.clientToTarget };
  } finally {
    await relay?.proc.stop();
    await q.proc.stop();
  }
}

/** A local qemu-nbd on the image file, no relay: what a cached read should come close to. */
async function qemuLocalRead(image: string): Promise<ReadSample> {
  const q = await startQemuNbd(image);
  try {
    return await timedRead(`nbd://127.0.0.1:${q.port}/`, { 'qemu-nbd': q.proc.pid });
  } finally {
    await q.proc.stop();
  }
}

// ------------------------------------------------------------------------------ cache, in process

interface CacheSample {
  /** the chunks read through SecureCache.get (decrypt + verify), s. */
  secureGet: number;
  /** the same chunks read raw from the same slab layout, s. */
  rawGet: number;
  securePut: number;
  rawPut: number;
}

/**
 * bench/cache.ts's approach over the image's own data chunks: SecureCache put/get against the
 * same slab layout written and read raw, QD 8 (context for the end-to-end figure).
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
    const slab = await store.slab(65536);
    const slots = chunks.map(() => slab.allocate(true) as number);
    rawPut = await timed(chunks.length, (i) => slab.write(slots[i] as number, chunks[i] as Buffer));
    rawGet = await timed(chunks.length, (i) => slab.read(slots[i] as number, 65536));
  } finally {
    await store.close();
  }
  return { secureGet, rawGet, securePut, rawPut };
}

/** Up to `max` non-zero 64 KiB chunks of the image, spread over it. */
async function dataChunks(image: string, sizeBytes: number, max: number): Promise<Buffer[]> {
  const fh = await open(image, 'r');
  const out: Buffer[] = [];
  const zero = Buffer.alloc(65536);
  try {
    const n = sizeBytes / 65536;
    const step = Math.max(1, Math.floor(n / (max * 2)));
    for (let i = 0; i < n && out.length < max; i += step) {
      const b = Buffer.alloc(65536);
      await fh.read(b, 0, 65536, i * 65536);
      if (!b.equals(zero)) out.push(b);
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

interface FnTime {
  fn: string;
  where: string;
  ms: number;
  /** of the busy (non-idle) samples in the window. */
  share: number;
}

interface ProfileSummary {
  phase: string;
  sampledMs: number;
  idleMs: number;
  /** self time: where the CPU was. */
  self: FnTime[];
  /** inclusive time of the project's own functions: which code path it was on. */
  inclusive: FnTime[];
}

/** Frames that say nothing about where the time goes. */
const PLUMBING = new Set(['(root)', '(idle)', '(program)', 'processTicksAndRejections', 'runMicrotasks', 'emit', 'listOnTimeout', 'processTimers']);

function frameWhere(n: ProfileNode): string {
  const url = n.callFrame.url.replace(/^file:\/\//, '');
  if (url === '') return '(native)';
  const rel = url.includes('/dist/') ? url.slice(url.lastIndexOf('/dist/') + 6) : url.includes('node_modules/') ? url.slice(url.lastIndexOf('node_modules/') + 13) : url;
  return `${rel}:${n.callFrame.lineNumber + 1}`;
}

/** Self and inclusive time per function of a V8 .cpuprofile, over the samples in `phase`. */
function summarizeProfile(profile: CpuProfile, phaseName: string, phase: Phase | null, topN = 12): ProfileSummary {
  const byId = new Map<number, ProfileNode>(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const self = new Map<number, number>();
  let t = profile.startTime;
  for (let i = 0; i < profile.samples.length; i++) {
    t += profile.timeDeltas[i] ?? 0;
    if (phase && (t < phase.fromUs || t > phase.toUs)) continue;
    const id = profile.samples[i] as number;
    self.set(id, (self.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0));
  }
  const selfBy = new Map<string, FnTime>();
  const inclBy = new Map<string, FnTime>();
  let total = 0;
  let idle = 0;
  for (const [id, us] of self) {
    const n = byId.get(id);
    if (!n) continue;
    total += us;
    if (n.callFrame.functionName === '(idle)') {
      idle += us;
      continue;
    }
    const add = (m: Map<string, FnTime>, node: ProfileNode): void => {
      const fn = node.callFrame.functionName || '(anonymous)';
      const where = frameWhere(node);
      const key = `${fn}@${where}`;
      const e = m.get(key) ?? { fn, where, ms: 0, share: 0 };
      e.ms += us / 1000;
      m.set(key, e);
    };
    add(selfBy, n);
    // Inclusive: each of our own functions once per sample, however deep the recursion.
    const seen = new Set<string>();
    for (let x: number | undefined = id; x !== undefined; x = parent.get(x)) {
      const node = byId.get(x);
      if (!node || !node.callFrame.url.includes('/dist/') || PLUMBING.has(node.callFrame.functionName)) continue;
      const key = `${node.callFrame.functionName}@${frameWhere(node)}`;
      if (seen.has(key)) continue;
      seen.add(key);
      add(inclBy, node);
    }
  }
  const busyMs = Math.max(1, (total - idle) / 1000);
  const top = (m: Map<string, FnTime>): FnTime[] =>
    [...m.values()]
      .filter((e) => !PLUMBING.has(e.fn))
      .sort((a, b) => b.ms - a.ms)
      .slice(0, topN)
      .map((e) => ({ ...e, ms: Math.round(e.ms), share: Math.round((e.ms / busyMs) * 1000) / 1000 }));
  return { phase: phaseName, sampledMs: Math.round(total / 1000), idleMs: Math.round(idle / 1000), self: top(selfBy), inclusive: top(inclBy) };
}

interface ProfileResult {
  dir: string;
  cold: ReadSample;
  warm: ReadSample | null;
  /** edge → phase summaries. */
  summaries: Record<string, ProfileSummary[]>;
}

/** One more cold + warm read of `image` with both edges under `node --cpu-prof`. */
async function profileRun(dir: string, image: string, imageSize: number, opts: Options, cli: string): Promise<ProfileResult> {
  const profDir = opts.profileDir as string;
  await rm(profDir, { recursive: true, force: true });
  const args = (who: string): string[] => ['--cpu-prof', `--cpu-prof-dir=${path.join(profDir, who)}`];
  const r = await spillwayRead(dir, image, imageSize, opts, { cli, warmReads: 2, nodeArgs: { cloud: args('cloud'), onprem: args('onprem') } });
  const summaries: Record<string, ProfileSummary[]> = {};
  for (const who of ['cloud', 'onprem']) {
    const files = existsSync(path.join(profDir, who)) ? (await readdir(path.join(profDir, who))).filter((x) => x.endsWith('.cpuprofile')) : [];
    const file = files[0];
    if (!file) throw new Error(`the ${who} edge wrote no CPU profile into ${path.join(profDir, who)}`);
    const profile = JSON.parse(await readFile(path.join(profDir, who, file), 'utf8')) as CpuProfile;
    const list = [summarizeProfile(profile, 'cold read', r.cold.phase)];
    if (r.warm && who === 'cloud') list.push(summarizeProfile(profile, 'warm read', r.warm.phase));
    summaries[who] = list;
  }
  await writeFile(path.join(profDir, 'summary.json'), `${JSON.stringify(summaries, null, 2)}\n`);
  return { dir: profDir, cold: r.cold, warm: r.warm, summaries };
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

interface Sample {
  run: number;
  what: string;
  sample: ReadSample;
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
  const log = (line: string): void => void process.stderr.write(`${line}\n`);
  const tmp = await makeTempDir('spw-bench-stream-');
  const cli = opts.spillwayCli ?? (await copyBuild(REPO_ROOT, path.join(tmp.dir, 'build-snapshot')));
  const notes: string[] = [];
  const want = (m: MeasureId): boolean => opts.measures.includes(m);

  let plainCli: string | null = null;
  if (want('cache')) {
    const plain = await plainCacheBuild(tmp.dir, cli);
    if ('cli' in plain) plainCli = plain.cli;
    else notes.push(`5 (end to end) skipped: ${plain.skipped}`);
  }

  // Images.
  const fsImage = path.join(tmp.dir, 'fs.img');
  const randomImage = path.join(tmp.dir, 'random.img');
  log(`building a ${formatSize(opts.imageSize)} ext4 image (mkfs.ext4 -d from a tree of system, random and zero-filled files)…`);
  const fsReport = await buildFsImage(fsImage, tmp.dir, opts.imageSize);
  const census = await imageCensus(fsImage);
  if (want('random')) {
    log(`writing ${formatSize(opts.randomSize)} of random data…`);
    await writeRandomFile(randomImage, opts.randomSize);
  }
  console.log(describeImage(fsReport, census));

  // Measurements, configurations interleaved within each run.
  const samples: Sample[] = [];
  const mbit = (bytes: number, s: number): string => fmt((bytes * 8) / s / 1e6, 1);
  const unlimited = { delayMs: 0, rateMbit: 0 };
  for (let run = 1; run <= opts.runs; run++) {
    const tag = `[run ${run}/${opts.runs}]`;
    if (want('cold') || want('warm')) {
      const dir = path.join(tmp.dir, `sites-fs-${run}`);
      const r = await spillwayRead(dir, fsImage, opts.imageSize, opts, { cli, warmReads: want('warm') ? WARM_READS : 0 });
      samples.push({ run, what: 'spillway-cold', sample: r.cold });
      log(`${tag} spillway cold        ${fmt(r.cold.seconds, 1)} s, link ${formatSize(r.cold.linkBytes ?? 0)} (${mbit(r.cold.linkBytes ?? 0, r.cold.seconds)} Mbit/s), cpu s ${JSON.stringify(r.cold.cpu)}, load ${r.cold.load}`);
      if (r.warm) {
        samples.push({ run, what: 'spillway-warm', sample: r.warm });
        log(`${tag} spillway warm        ${fmt(r.warm.seconds, 2)} s, cpu s ${JSON.stringify(r.warm.cpu)}, load ${r.warm.load}`);
      }
      await rm(dir, { recursive: true, force: true });
    }
    if (want('cold')) {
      const dir = path.join(tmp.dir, `qemu-fs-${run}`);
      const q = await qemuRelayRead(dir, fsImage, opts, cli);
      samples.push({ run, what: 'qemu-relay', sample: q });
      log(`${tag} qemu-nbd via relay   ${fmt(q.seconds, 1)} s, link ${formatSize(q.linkBytes ?? 0)} (${mbit(q.linkBytes ?? 0, q.seconds)} Mbit/s), load ${q.load}`);
      await rm(dir, { recursive: true, force: true });
    }
    if (want('random')) {
      const dir = path.join(tmp.dir, `sites-rand-${run}`);
      const r = await spillwayRead(dir, randomImage, opts.randomSize, opts, { cli, warmReads: 0 });
      samples.push({ run, what: 'spillway-random', sample: r.cold });
      log(`${tag} spillway random      ${fmt(r.cold.seconds, 1)} s = ${mbit(opts.randomSize, r.cold.seconds)} Mbit/s of data, link ${formatSize(r.cold.linkBytes ?? 0)}, load ${r.cold.load}`);
      await rm(dir, { recursive: true, force: true });
      const qdir = path.join(tmp.dir, `qemu-rand-${run}`);
      const q = await qemuRelayRead(qdir, randomImage, opts, cli);
      samples.push({ run, what: 'qemu-relay-random', sample: q });
      log(`${tag} qemu-nbd random      ${fmt(q.seconds, 1)} s = ${mbit(opts.randomSize, q.seconds)} Mbit/s of data, load ${q.load}`);
      await rm(qdir, { recursive: true, force: true });
    }
    if (want('warm')) {
      const l = await qemuLocalRead(fsImage);
      samples.push({ run, what: 'qemu-local', sample: l });
      log(`${tag} qemu-nbd local       ${fmt(l.seconds, 2)} s, load ${l.load}`);
    }
    if (want('cache') && plainCli) {
      // Same build with and without the cipher; the cache filled over an unlimited relay (the
      // link plays no part in a cached read), then one measured warm read each.
      for (const [what, c, insecure] of [['cache-encrypted', cli, false], ['cache-plain', plainCli, true]] as const) {
        const dir = path.join(tmp.dir, `${what}-${run}`);
        const r = await spillwayRead(dir, fsImage, opts.imageSize, opts, { cli: c, wan: unlimited, warmReads: WARM_READS, insecure });
        if (r.warm) samples.push({ run, what, sample: r.warm });
        log(`${tag} warm read, ${what.padEnd(16)} ${fmt(r.warm?.seconds, 2)} s, cloud cpu ${fmt(r.warm?.cpu['cloud'], 2)} s, load ${r.warm?.load}`);
        await rm(dir, { recursive: true, force: true });
      }
    }
  }

  const cacheSamples: CacheSample[] = [];
  if (want('cache')) {
    const chunks = await dataChunks(fsImage, opts.imageSize, 2048);
    for (let run = 1; run <= opts.runs; run++) {
      const dir = path.join(tmp.dir, `cache-${run}`);
      const s = await cacheCompare(dir, chunks, 8);
      cacheSamples.push(s);
      log(`[cache ${run}/${opts.runs}] in process, ${chunks.length} chunks: SecureCache.get ${fmt(s.secureGet, 2)} s, raw slab read ${fmt(s.rawGet, 2)} s`);
      await rm(dir, { recursive: true, force: true });
    }
  }

  let profile: ProfileResult | null = null;
  if (opts.profileDir) {
    log(`profiling one more cold + warm read with both edges under node --cpu-prof (${opts.profileDir})…`);
    profile = await profileRun(path.join(tmp.dir, 'sites-profile'), fsImage, opts.imageSize, opts, cli);
  }

  // Summary.
  const of = (what: string): ReadSample[] => samples.filter((s) => s.what === what).map((s) => s.sample);
  const secs = (what: string): number[] => of(what).map((s) => s.seconds);
  const links = (what: string): number[] => of(what).map((s) => s.linkBytes ?? Number.NaN);
  const med = (xs: number[]): number | null => (xs.length > 0 ? median(xs) : null);
  const rateBytes = (opts.rateMbit * 1e6) / 8;
  const coldSpw = med(secs('spillway-cold'));
  const coldQemu = med(secs('qemu-relay'));
  const speedup = ratio(coldQemu, coldSpw);
  const linkSpw = med(links('spillway-cold'));
  const linkQemu = med(links('qemu-relay'));
  const linkPerRead = linkSpw === null ? null : linkSpw / opts.imageSize;
  const linkPerReadQemu = linkQemu === null ? null : linkQemu / opts.imageSize;
  const randSpw = med(secs('spillway-random'));
  const randQemu = med(secs('qemu-relay-random'));
  const randOfLink = randSpw === null ? null : opts.randomSize / randSpw / rateBytes;
  const randOfLinkQemu = randQemu === null ? null : opts.randomSize / randQemu / rateBytes;
  const warmSpw = med(secs('spillway-warm'));
  const localQemu = med(secs('qemu-local'));
  const warmRatio = ratio(localQemu, warmSpw);
  const encWarm = med(secs('cache-encrypted'));
  const plainWarm = med(secs('cache-plain'));
  const encRatio = ratio(plainWarm, encWarm);
  const cloudCpu = (what: string): number | null => med(of(what).map((x) => x.cpu['cloud'] ?? Number.NaN));
  const encCpuRatio = ratio(cloudCpu('cache-plain'), cloudCpu('cache-encrypted'));
  const inProcGet = cacheSamples.length > 0 ? ratio(median(cacheSamples.map((s) => s.rawGet)), median(cacheSamples.map((s) => s.secureGet))) : null;
  const inProcPut = cacheSamples.length > 0 ? ratio(median(cacheSamples.map((s) => s.rawPut)), median(cacheSamples.map((s) => s.securePut))) : null;
  // Ratios within each run (the configurations of one run ran back to back): a check on the
  // ratio of medians when the load changed between runs.
  const perRun = (peer: string, ours: string): (number | null)[] =>
    Array.from({ length: opts.runs }, (_, i) => {
      const a = samples.find((x) => x.run === i + 1 && x.what === peer)?.sample.seconds;
      const b = samples.find((x) => x.run === i + 1 && x.what === ours)?.sample.seconds;
      return ratio(a, b);
    });
  const spr = (a: string, b: string): string => `${fmt(spread(secs(a)))}/${fmt(spread(secs(b)))}`;
  const s = (v: number | null, digits = 1): string => (v === null ? '-' : `${fmt(v, digits)} s`);

  interface Row {
    id: MeasureId;
    label: string;
    spillway: string;
    peer: string;
    figure: number | null;
    figureText: string;
    target: string;
    result: string;
    spread: string;
  }
  const allRows: Row[] = [
    { id: 'cold', label: `1. cold full read, ${formatSize(opts.imageSize)} ext4: qemu-nbd time / ours`, spillway: s(coldSpw), peer: s(coldQemu), figure: speedup, figureText: fmtRatio(speedup), target: '>= 1.50x', result: verdict(speedup, 1.5, true), spread: spr('spillway-cold', 'qemu-relay') },
    {
      id: 'cold',
      label: '2. link bytes / bytes read, cold',
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
      label: `3. cold read, ${formatSize(opts.randomSize)} random: data rate / link rate`,
      spillway: s(randSpw),
      peer: s(randQemu),
      figure: randOfLink,
      figureText: `${fmt(randOfLink, 3)} (peer ${fmt(randOfLinkQemu, 3)})`,
      target: '>= 0.90',
      result: verdict(randOfLink, 0.9, true),
      spread: spr('spillway-random', 'qemu-relay-random'),
    },
    { id: 'warm', label: '4. warm full read: local qemu-nbd time / ours', spillway: s(warmSpw, 2), peer: s(localQemu, 2), figure: warmRatio, figureText: fmtRatio(warmRatio), target: '>= 0.80x', result: verdict(warmRatio, 0.8, true), spread: spr('spillway-warm', 'qemu-local') },
    {
      id: 'cache',
      label: '5. warm read, encrypted cache: unencrypted time / ours',
      spillway: s(encWarm, 2),
      peer: s(plainWarm, 2),
      figure: encRatio,
      figureText: `${fmtRatio(encRatio)} (cloud CPU ${fmtRatio(encCpuRatio)}; in process: get ${fmtRatio(inProcGet)}, put ${fmtRatio(inProcPut)})`,
      target: '>= 0.70x',
      result: verdict(encRatio, 0.7, true),
      spread: spr('cache-encrypted', 'cache-plain'),
    },
  ];
  const rows = allRows.filter((r) => want(r.id));

  const table = formatTable(
    [{ header: 'measure' }, { header: 'spillway', right: true }, { header: 'peer', right: true }, { header: 'figure', right: true }, { header: 'target' }, { header: 'result' }, { header: 'spread ours/peer', right: true }],
    rows.map((r) => [r.label, r.spillway, r.peer, r.figureText, r.target, r.result, r.spread]),
  );
  notes.unshift(
    `Link: \`spillway wanem\` at ${opts.rateMbit} Mbit/s and ${opts.delayMs} ms each way (RTT ${opts.delayMs * 2} ms); a fresh relay process per read, the edges' and the peer's alike.`,
    'Peers: rows 1-3 nbdcopy from `qemu-nbd -r -f raw -t` on the image at the origin through a second relay with the same parameters; row 4 the same qemu-nbd with no relay; row 5 our own build with the cache cipher replaced by a pass-through.',
    'Times are nbdcopy wall times (process start to exit, including connect) to null:. nbdcopy opens 4 connections when the server advertises multi-conn (the cloud edge does; qemu-nbd -r does not), and asks for extents: it skips what the server reports as holes/zeroes (qemu-nbd: the file\'s holes; the cloud edge: zero chunks its cache knows, none when a cold read starts).',
    'Link bytes: what the relay delivered towards the reader (TLS, link frames; NBD replies for the peer). Bytes read: the image size.',
    `Medians of ${opts.runs} run(s), configurations interleaved in each run; fresh edges, relay and cloud cache for every cold read; row 4's warm figure is the median of reads 2-${WARM_READS} after the cold one on that cache (the first warms up V8's JIT on the cached path).`,
    `Row 5: each run fills a fresh cache over an unlimited relay (the link plays no part in a cached read), then reads it ${WARM_READS} more times and keeps the median of reads 2-${WARM_READS}; "cloud CPU" compares the cloud edge's CPU seconds over those reads (less sensitive to other load than wall time); the unencrypted build is a private copy of dist/ with dist/cache/blob-cipher.js replaced by a pass-through (nothing in src/ changes; the edge logs that it is insecure). In-process figures: bench/cache.ts's approach (SecureCache.get/put vs the raw slab, QD 8) over 64 KiB data chunks of the image.`,
  );

  console.log(`\nbench/stream: ${formatSize(opts.imageSize)} ext4 image over ${opts.rateMbit} Mbit/s, RTT ${opts.delayMs * 2} ms; cloud edge: connections ${opts.connections ?? 2}, window ${opts.window ?? '8MiB'}, readAhead ${opts.readAhead ?? 64}; medians of ${opts.runs}`);
  console.log(table);
  for (const n of notes) console.log(`- ${n}`);
  if (profile) printProfiles(profile);

  await writeJsonResult(opts.out, {
    bench: 'stream',
    machine,
    config: {
      runs: opts.runs,
      imageSizeBytes: opts.imageSize,
      randomSizeBytes: opts.randomSize,
      delayMs: opts.delayMs,
      rateMbit: opts.rateMbit,
      cloudEdge: { connections: opts.connections ?? 2, window: opts.window ?? '8MiB (default)', readAhead: opts.readAhead ?? 64 },
      measures: opts.measures,
      client: 'nbdcopy URI null:',
      peers: { relay: 'qemu-nbd -r -f raw -t -x \'\' -b 127.0.0.1 -p PORT IMAGE, behind spillway wanem --delay-ms D --rate-mbit R', local: 'the same qemu-nbd, no relay' },
      spillwayCli: opts.spillwayCli ?? 'snapshot of dist/ taken at start',
    },
    image: { report: fsReport, census, systemSources: SYSTEM_SOURCES, mix: DEFAULT_FS_MIX },
    summary: {
      rows: rows.map((r) => ({ measure: r.label, spillway: r.spillway, peer: r.peer, figure: r.figure, target: r.target, result: r.result, spread: r.spread })),
      coldSeconds: { spillway: coldSpw, qemuRelay: coldQemu, speedup },
      linkBytesPerByteRead: { spillway: linkPerRead, qemuRelay: linkPerReadQemu },
      randomDataRateOfLink: { spillway: randOfLink, qemuRelay: randOfLinkQemu },
      warm: { spillwaySeconds: warmSpw, qemuLocalSeconds: localQemu, ratio: warmRatio, cpuSeconds: { cloudEdge: cloudCpu('spillway-warm'), qemuNbd: med(of('qemu-local').map((x) => x.cpu['qemu-nbd'] ?? Number.NaN)) } },
      perRunRatios: { cold: perRun('qemu-relay', 'spillway-cold'), warm: perRun('qemu-local', 'spillway-warm'), encryption: perRun('cache-plain', 'cache-encrypted') },
      encryption: { encryptedSeconds: encWarm, plainSeconds: plainWarm, ratio: encRatio, cloudCpuSeconds: { encrypted: cloudCpu('cache-encrypted'), plain: cloudCpu('cache-plain') }, cloudCpuRatio: encCpuRatio, inProcessGetRatio: inProcGet, inProcessPutRatio: inProcPut },
    },
    samples,
    cacheSamples,
    profile: profile ? { dir: profile.dir, cold: profile.cold, warm: profile.warm, summaries: profile.summaries } : null,
    notes,
    loadAverageAtEnd: os.loadavg().map((l) => Math.round(l * 100) / 100),
  });
  console.log(`\nresults: ${path.relative(process.cwd(), opts.out) || opts.out}`);
}

function describeImage(r: FsImageReport, c: ImageCensus): string {
  const pct = (n: number): string => `${fmt((n / r.sizeBytes) * 100, 1)} %`;
  return [
    `image: ${formatSize(r.sizeBytes)} ext4, ${r.mkfs}`,
    `  files: system ${formatSize(r.tree.systemBytes)} in ${r.tree.systemFiles} files (${Object.entries(r.tree.bySource)
      .map(([d, b]) => `${d} ${formatSize(b)}`)
      .join(', ')})`,
    `         random ${formatSize(r.tree.randomBytes)} in ${r.tree.randomFiles} files, zero-filled ${formatSize(r.tree.zeroBytes)} in ${r.tree.zeroFiles} files; file system free space ${r.fsFreeBytes === null ? '?' : formatSize(r.fsFreeBytes)}`,
    `  ${c.chunks} chunks of 64 KiB: zero ${c.zeroChunks} (${pct(c.zeroChunks * c.chunkSize)}), LZ4-compressed ${c.lz4Chunks} (${pct(c.lz4RawBytes)}, ${fmt(c.lz4RawBytes / Math.max(1, c.lz4Bytes), 2)}:1), raw ${c.rawChunks} (${pct(c.rawBytes)})`,
    `  not holes in the file: ${formatSize(c.allocatedBytes)} (${pct(c.allocatedBytes)}); chunk payload of one full read over the link: ${formatSize(c.linkPayloadBytes)} (${fmt(c.linkPayloadBytes / r.sizeBytes, 3)} of the image)`,
  ].join('\n');
}

function printProfiles(p: ProfileResult): void {
  console.log(`\nprofiles (node --cpu-prof, one extra unmeasured run; raw files and summary.json in ${p.dir}):`);
  for (const [who, list] of Object.entries(p.summaries)) {
    for (const s of list) {
      const busy = s.sampledMs - s.idleMs;
      console.log(`\n${who} edge, ${s.phase}: ${fmt(busy / 1000, 1)} s busy of ${fmt(s.sampledMs / 1000, 1)} s sampled`);
      const rows = Array.from({ length: Math.max(s.self.length, s.inclusive.length) }, (_, i) => {
        const a = s.self[i];
        const b = s.inclusive[i];
        return [a ? `${a.fn} (${a.where})` : '', a ? `${fmt(a.share * 100, 1)} %` : '', b ? `${b.fn} (${b.where})` : '', b ? `${fmt(b.share * 100, 1)} %` : ''];
      });
      console.log(formatTable([{ header: 'self time' }, { header: 'share', right: true }, { header: 'inclusive (our code)' }, { header: 'share', right: true }], rows));
    }
  }
}

runBench('bench/stream', main);
