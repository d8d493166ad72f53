// bench/boot: time to a running VM whose disk is at the other site, over an emulated WAN
// (`spillway wanem`, default 20 Mbit/s and 50 ms RTT). The VM (scripts/vm/build-bench-vm.sh) is
// a 3 GiB ext4 root whose /init starts the system Python, which imports ~150 stdlib modules and
// reads and hashes ~53 MiB over ~470 files, then prints SPILLWAY-BENCH-READY. Every process is
// real: QEMU (TCG), qemu-nbd, qemu-img, both edges and the relays.
//
//   npx tsx bench/boot.ts [--parts d,a,b,c] [--runs 1] [--rate-mbit 20] [--delay-ms 25]
//                         [--out bench/results/boot.json]
//
// Parts, each timed to the ready marker:
//   (d) local: QEMU boots the image file (the lower bound)
//   (a) copy-first: `qemu-img convert` from `qemu-nbd -r` at the origin through a relay to a
//       local sparse file, then (d) on the copy; time = copy + boot
//   (b) Spillway cold: QEMU boots the cloud edge's export, empty cache, no profile; the edge
//       records a boot profile meanwhile
//   (c) Spillway with that profile: the edges restarted, the cache emptied, the volume
//       configured with `prefetch: { profiles: [NAME] }`, so the edge streams the profile's plan
//       into the cache while the VM boots; time from QEMU's start (the edge's head start printed)
// Targets: (a) / (b) >= 10x; (c) / (d) <= 1.3x; link bytes of (c) <= 1.2x the profile's
// uniqueBytes (distinct bytes the guest read, 4 KiB granularity).
// A benchmark, not a test: it exits 0 whether targets are met or missed (see bench/README.md).

import { rm, readFile, writeFile } from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import YAML from 'yaml';

import { waitForExport } from '../test/helpers/edges.js';
import { positiveInt } from './lib/args.js';
import { installCleanupHandlers, runBench } from './lib/cleanup.js';
import { makeTempDir } from './lib/files.js';
import { REPO_ROOT } from './lib/nbd-servers.js';
import { haveCommand, runCommand, type Background } from './lib/process.js';
import { machineInfo, writeJsonResult } from './lib/results.js';
import { readRelayStats, startQemuNbd, startRelay, type RelayBytes } from './lib/relay.js';
import { copyBuild, counters, cpuOf, startSites, type Sites } from './lib/sites.js';
import { formatSize, parseSize } from './lib/size.js';
import { diff, median, ratio, spread, verdict } from './lib/stats.js';
import { fmt, fmtRatio, formatTable } from './lib/table.js';
import { BENCH_VM_DIR, BENCH_VM_SCRIPT, bootBenchVm, ensureBenchVm, type BenchBoot, type BenchVm } from './lib/vm-bench.js';

const PARTS = ['d', 'a', 'b', 'c'] as const;
type PartId = (typeof PARTS)[number];
const PART_NAMES: Record<PartId, string> = { a: '(a) copy-first', b: '(b) spillway cold', c: '(c) spillway + profile', d: '(d) local' };
const VOLUME = 'disk';

const USAGE = `Usage: npx tsx bench/boot.ts [options]

Boots a VM whose 3 GiB root disk lives at the origin, over \`spillway wanem\`: (a) copy it first
with qemu-img convert from qemu-nbd, then boot; (b) boot it through the two edges, cold; (c) the
same with the boot profile recorded in (b) prefetched; (d) boot a local copy. Times each to the
guest's ready marker and prints ratios; writes JSON.

Options:
  --parts LIST        comma-separated, from d,a,b,c (default all; run in the order d, a, b, c;
                      c needs the profile b records, so c adds b)
  --runs N            repetitions of every part, medians reported (default 1)
  --rate-mbit N       link rate of every relay (default 20)
  --delay-ms N        one-way delay of every relay (default 25: RTT 50 ms)
  --out FILE          JSON results (default bench/results/boot.json)
  --vm-dir DIR        where the image is built and cached (default .work/bench-vm)
  --image-size SIZE   file system size, whole GiB (default 3G)
  --memory MB         guest memory (default 512)
  --qemu-cache MODE   QEMU cache mode of the drive (default none: O_DIRECT for the local files)
  --idle DURATION     recording's idle time in (b), e.g. 15s (default 15s)
  --connections N     cloud edge peers[].connections (default: the helper's, 2)
  --read-ahead N      cloud edge volumes[].readAhead in chunks (default: the edge's)
  --timeout SECONDS   give up on one boot after this long (default 1200)
  --spillway-cli PATH dist/cli.js of another checkout or copy; default: a copy of this
                      checkout's dist/ taken at start
  -h, --help          this text`;

interface Options {
  parts: PartId[];
  runs: number;
  rateMbit: number;
  delayMs: number;
  out: string;
  vmDir: string;
  imageSize: string;
  memoryMb: number;
  qemuCache: string;
  idleMs: number;
  connections: number | undefined;
  readAhead: number | undefined;
  timeoutMs: number;
  spillwayCli: string | undefined;
}

function durationMs(text: string, name: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m)$/.exec(text.trim());
  if (!m) throw new Error(`--${name} must be a duration like 15s or 500ms, got ${JSON.stringify(text)}`);
  return Number(m[1]) * ({ ms: 1, s: 1000, m: 60_000 } as const)[m[2] as 'ms' | 's' | 'm'];
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
      parts: { type: 'string', default: PARTS.join(',') },
      runs: { type: 'string', default: '1' },
      'rate-mbit': { type: 'string', default: '20' },
      'delay-ms': { type: 'string', default: '25' },
      out: { type: 'string', default: path.join('bench', 'results', 'boot.json') },
      'vm-dir': { type: 'string', default: BENCH_VM_DIR },
      'image-size': { type: 'string', default: '3G' },
      memory: { type: 'string', default: '512' },
      'qemu-cache': { type: 'string', default: 'none' },
      idle: { type: 'string', default: '15s' },
      connections: { type: 'string' },
      'read-ahead': { type: 'string' },
      timeout: { type: 'string', default: '1200' },
      'spillway-cli': { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) return null;
  const parts = new Set<PartId>();
  for (const p of values.parts.split(',').map((s) => s.trim().replace(/^\((.)\)$/, '$1')).filter((s) => s !== '')) {
    if (!(PARTS as readonly string[]).includes(p)) throw new Error(`unknown part ${JSON.stringify(p)}; choose from ${PARTS.join(', ')}`);
    parts.add(p as PartId);
  }
  if (parts.has('c')) parts.add('b');
  if (!/^\d+G$/.test(values['image-size']) || parseSize(values['image-size']) < 2 * 2 ** 30) throw new Error('--image-size must be whole GiB, at least 2G (e.g. 3G)');
  if (!['none', 'writeback', 'writethrough', 'directsync', 'unsafe'].includes(values['qemu-cache'])) throw new Error(`--qemu-cache: not a QEMU cache mode: ${values['qemu-cache']}`);
  const readAhead = values['read-ahead'] === undefined ? undefined : Number(values['read-ahead']);
  if (readAhead !== undefined && (!Number.isInteger(readAhead) || readAhead < 0 || readAhead > 1024)) throw new Error('--read-ahead must be an integer 0..1024');
  return {
    parts: PARTS.filter((p) => parts.has(p)),
    runs: positiveInt(values.runs, 'runs'),
    rateMbit: positiveNumber(values['rate-mbit'], 'rate-mbit'),
    delayMs: positiveNumber(values['delay-ms'], 'delay-ms'),
    out: path.resolve(values.out),
    vmDir: path.resolve(values['vm-dir']),
    imageSize: values['image-size'],
    memoryMb: positiveInt(values.memory, 'memory'),
    qemuCache: values['qemu-cache'],
    idleMs: durationMs(values.idle, 'idle'),
    connections: values.connections === undefined ? undefined : positiveInt(values.connections, 'connections'),
    readAhead,
    timeoutMs: positiveInt(values.timeout, 'timeout') * 1000,
    spillwayCli: values['spillway-cli'] === undefined ? undefined : path.resolve(values['spillway-cli']),
  };
}

// ------------------------------------------------------------------------------ helpers

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const log = (line: string): void => void process.stderr.write(`${line}\n`);


/** One JSON request to the cloud edge's control socket (STATE/control.sock). */
function control<T>(socketPath: string, method: string, route: string, body?: unknown): Promise<T> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = http.request({ socketPath, method, path: route, headers: payload === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => {
        let parsed: unknown;
        try {
          parsed = JSON.parse(text);
        } catch {
          parsed = text;
        }
        if ((res.statusCode ?? 500) >= 300) reject(new Error(`${method} ${route}: ${res.statusCode} ${typeof parsed === 'object' && parsed && 'error' in parsed ? String((parsed as { error: unknown }).error) : text.trim()}`));
        else resolve(parsed as T);
      });
    });
    req.on('error', (e) => reject(new Error(`${method} ${route} on ${socketPath}: ${e.message}`)));
    req.setTimeout(120_000, () => req.destroy(new Error('timed out')));
    req.end(payload);
  });
}

interface PrefetchStatus {
  state: string;
  planned: number;
  plannedBytes?: number;
  fetched: number;
  fetchedBytes?: number;
  alreadyCached?: number;
  failed?: number;
  used: number;
  late?: number;
  unused?: number;
  wasted: number;
  hitRate?: number | null;
  elapsedSeconds?: number;
}

interface EdgeStatus {
  remote: Array<{ volume: string; prefetch?: PrefetchStatus; recording?: unknown }>;
}

interface ProfileInfo {
  name: string;
  uniqueBytes: number;
  chunks: number;
  reads?: number;
  durationMs?: number;
  chunkSize?: number;
}


const sitesPids = (s: Sites): Record<string, number> => ({ cloud: s.sites.cloud.child.pid ?? 0, onprem: s.sites.onprem.child.pid ?? 0, relay: s.sites.wanem.child.pid ?? 0 });

// ------------------------------------------------------------------------------ parts

interface Sample {
  run: number;
  part: PartId;
  /** the figure: seconds to the ready marker (for (a): copy + boot). */
  seconds: number;
  boot: BenchBoot;
  /** (a): qemu-img convert wall time. */
  copySeconds?: number;
  /** bytes the relay carried towards the reader: the whole copy (a), the boot (b), restart + boot + rest of the plan (c). */
  linkBytes?: number;
  /** of those, up to the ready marker (sampled from the relay's stats file, ±0.5 s). */
  linkBytesAtReady?: number;
  /** bytes the relay carried towards the origin. */
  linkBytesUp?: number;
  /** (c): seconds from starting the cloud edge to starting QEMU (the prefetch's head start). */
  headStartSeconds?: number;
  /** (c): what the prefetcher reports after the boot. */
  prefetch?: PrefetchStatus | null;
  /** (b): the profile recorded. */
  profile?: ProfileInfo | null;
  counters?: Record<string, number>;
  cpu?: Record<string, number>;
  load: number;
}

const load1 = (): number => Math.round((os.loadavg()[0] ?? 0) * 100) / 100;

function bootOpts(vm: BenchVm, opts: Options): { vm: BenchVm; timeoutMs: number; cache: string; memoryMb: number } {
  return { vm, timeoutMs: opts.timeoutMs, cache: opts.qemuCache, memoryMb: opts.memoryMb };
}

/** (d): boot the image file itself (local disk, O_DIRECT by default). */
async function localBoot(vm: BenchVm, opts: Options, run: number): Promise<Sample> {
  const boot = await bootBenchVm({ ...bootOpts(vm, opts), drive: { file: vm.rootImg } });
  return { run, part: 'd', seconds: boot.readySeconds, boot, load: load1() };
}

/** (a): qemu-img convert through a relay from qemu-nbd at the origin, then boot the copy. */
async function copyFirstBoot(vm: BenchVm, opts: Options, run: number, dir: string, cli: string): Promise<Sample> {
  const copy = path.join(dir, `copy-${run}.img`);
  const statsFile = path.join(dir, `wanem-copy-${run}.json`);
  const q = await startQemuNbd(vm.rootImg);
  let relay: { port: number; proc: Background } | null = null;
  let copySeconds: number;
  let stats: RelayBytes;
  let cpu: Record<string, number>;
  try {
    relay = await startRelay(cli, q.port, statsFile, opts);
    const pids = { 'qemu-nbd': q.proc.pid, relay: relay.proc.pid };
    const cpu0 = await cpuOf(pids);
    // -O raw to a new local file: qemu-img asks the server for allocation (base:allocation) and
    // copies only allocated extents, leaving holes in the copy.
    const r = await runCommand('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', `nbd://127.0.0.1:${relay.port}/`, copy], { timeoutMs: 3 * 3_600_000 });
    copySeconds = r.seconds;
    cpu = diff(await cpuOf(pids), cpu0);
    await relay.proc.stop(); // the relay writes its stats a last time as it exits
    stats = await readRelayStats(statsFile);
  } finally {
    await relay?.proc.stop();
    await q.proc.stop();
  }
  log(`  copied in ${fmt(copySeconds, 1)} s: ${formatSize(stats.targetToClient)} over the link, copy allocates ${formatSize(await allocated(copy))}`);
  try {
    const boot = await bootBenchVm({ ...bootOpts(vm, opts), drive: { file: copy } });
    return { run, part: 'a', seconds: copySeconds + boot.readySeconds, boot, copySeconds, linkBytes: stats.targetToClient, linkBytesUp: stats.clientToTarget, cpu, load: load1() };
  } finally {
    await rm(copy, { force: true });
  }
}

async function allocated(file: string): Promise<number> {
  const r = await runCommand('stat', ['-c', '%b %B', file]);
  const [blocks, unit] = r.stdout.trim().split(/\s+/).map(Number);
  return (blocks ?? 0) * (unit ?? 512);
}

/** The relay's delivered bytes now (its stats file is rewritten every 500 ms). */
async function relayNow(s: Sites): Promise<number> {
  try {
    return (await readRelayStats(s.statsFile)).targetToClient;
  } catch {
    return Number.NaN;
  }
}

interface SpillwayRun {
  sites: Sites;
  dir: string;
  profileName: string;
}

/** (b): cold boot through fresh edges and cache, recording the boot profile `profileName`. */
async function spillwayCold(vm: BenchVm, opts: Options, run: number, dir: string, cli: string, record: boolean, notes: string[]): Promise<{ sample: Sample; state: SpillwayRun }> {
  const profileName = `boot-${run}`;
  const s = await startSites(dir, vm.rootImg, {
    wan: { delayMs: opts.delayMs, rateMbit: opts.rateMbit },
    cacheSize: `${Math.ceil((vm.info.fsBytes * 1.25) / 2 ** 20)}MiB`,
    connections: opts.connections,
    readAhead: opts.readAhead,
    cloudVolume: 'writes: remote-only',
    cli,
  });
  const sock = path.join(dir, 'state-cloud', 'control.sock');
  let recording = false;
  if (record) {
    try {
      await control(sock, 'POST', `/v1/volumes/${VOLUME}/profile/record`, { name: profileName, idleMs: opts.idleMs });
      recording = true;
    } catch (e) {
      notes.push(`run ${run}: could not start recording a profile in (b): ${(e as Error).message}`);
      log(`  no recording: ${(e as Error).message}`);
    }
  }
  const before = await s.sites.linkBytes();
  const relay0 = await relayNow(s);
  const { boot, cpu, counters: c, atReady } = await measuredBoot(s, vm, opts);
  const after = await s.sites.linkBytes();
  let profile: ProfileInfo | null = null;
  if (recording) {
    try {
      await control(sock, 'POST', `/v1/volumes/${VOLUME}/profile/stop`);
    } catch (e) {
      // The recording may have ended by itself (idle): then it is saved already.
      log(`  profile stop: ${(e as Error).message}`);
    }
    try {
      profile = (await control<{ profile: ProfileInfo }>(sock, 'GET', `/v1/profiles/${profileName}`)).profile;
      log(`  profile ${profileName}: ${formatSize(profile.uniqueBytes)} distinct bytes read in ${profile.chunks} chunks`);
    } catch (e) {
      notes.push(`run ${run}: no profile ${profileName} after (b): ${(e as Error).message}`);
    }
  }
  const sample: Sample = { run, part: 'b', seconds: boot.readySeconds, boot, linkBytes: after - before, linkBytesAtReady: (await atReady) - relay0, profile, counters: c, cpu, load: load1() };
  return { sample, state: { sites: s, dir, profileName } };
}

/** Boot through the cloud export, with the edges' CPU and counters around it and the relay's
 *  count when the guest printed its ready marker (NaN if it never did). */
async function measuredBoot(s: Sites, vm: BenchVm, opts: Options): Promise<{ boot: BenchBoot; cpu: Record<string, number>; counters: Record<string, number>; atReady: Promise<number> }> {
  const pids = sitesPids(s);
  const c0 = await counters(s.sites.metricsUrl);
  const cpu0 = await cpuOf(pids);
  let atReady: Promise<number> = Promise.resolve(Number.NaN);
  const boot = await bootBenchVm({ ...bootOpts(vm, opts), drive: { uri: s.sites.uri(VOLUME) }, onReady: () => (atReady = relayNow(s)) });
  const cpu = diff(await cpuOf(pids), cpu0);
  return { boot, cpu, counters: diff(await counters(s.sites.metricsUrl), c0, 0), atReady };
}

/**
 * (c): every process of (b) restarted (so no session state survives), the cloud cache emptied,
 * the volume configured to prefetch the profile; boot as soon as the volume is exported.
 */
async function spillwayProfiled(vm: BenchVm, opts: Options, run: number, st: SpillwayRun): Promise<Sample> {
  const { sites: s, dir, profileName } = st;
  await s.sites.stop();
  await rm(path.join(dir, 'cache'), { recursive: true, force: true });
  const doc = YAML.parse(await readFile(s.sites.cloudYaml, 'utf8')) as { volumes: Array<Record<string, unknown>> };
  const vol = doc.volumes.find((v) => v['name'] === VOLUME);
  if (!vol) throw new Error(`${s.sites.cloudYaml} has no volume ${VOLUME}`);
  vol['prefetch'] = { profiles: [profileName] };
  await writeFile(s.sites.cloudYaml, YAML.stringify(doc));
  await s.sites.startOnprem();
  await s.sites.startWanem();
  const before = await s.sites.linkBytes(); // waits for the new relay's first stats
  const relay0 = await relayNow(s); // the new relay's own count (it started from zero)
  const cloudStart = performance.now();
  await s.sites.startCloud();
  await waitForExport(s.sites.uri(VOLUME));
  const headStartSeconds = (performance.now() - cloudStart) / 1000;
  const { boot, cpu, counters: c, atReady } = await measuredBoot(s, vm, opts);
  // The plan may still be streaming after the boot: its bytes are part of the cost.
  const sock = path.join(dir, 'state-cloud', 'control.sock');
  let prefetch: PrefetchStatus | null = null;
  const deadline = Date.now() + 120_000;
  for (;;) {
    const status = await control<EdgeStatus>(sock, 'GET', '/v1/status').catch(() => null);
    prefetch = status?.remote.find((r) => r.volume === VOLUME)?.prefetch ?? null;
    if (!prefetch || prefetch.state !== 'running' || Date.now() > deadline) break;
    await sleep(500);
  }
  const after = await s.sites.linkBytes();
  const ready = await atReady;
  return {
    run,
    part: 'c',
    seconds: boot.readySeconds,
    boot,
    linkBytes: after - before,
    linkBytesAtReady: ready - relay0,
    headStartSeconds,
    prefetch,
    counters: c,
    cpu,
    load: load1(),
  };
}

// ------------------------------------------------------------------------------ main

async function checkTools(): Promise<void> {
  const needed: [string, string][] = [
    ['qemu-system-x86_64', 'qemu-system-x86'],
    ['qemu-img', 'qemu-utils'],
    ['qemu-nbd', 'qemu-utils'],
    ['nbdinfo', 'libnbd-bin'],
    ['mkfs.ext4', 'e2fsprogs'],
  ];
  const problems: string[] = [];
  for (const [cmd, pkg] of needed) if (!(await haveCommand(cmd))) problems.push(`${cmd} is missing: apt-get install ${pkg}`);
  if (problems.length > 0) throw new Error(problems.join('\n'));
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
    'qemu-system-x86_64': ['qemu-system-x86_64', '--version'],
    'qemu-img': ['qemu-img', '--version'],
    'qemu-nbd': ['qemu-nbd', '--version'],
    nbdinfo: ['nbdinfo', '--version'],
    'mkfs.ext4': ['mkfs.ext4', '-V'],
    python: ['/usr/bin/python3.11', '--version'],
  });
  const [l1] = machine.loadAverage;
  if (l1 !== undefined && l1 > machine.nproc / 2) log(`note: load average ${l1} on ${machine.nproc} CPUs before starting: other work will skew these figures`);
  log(`building or checking the VM image (${path.relative(REPO_ROOT, BENCH_VM_SCRIPT)} ${opts.vmDir} --size ${opts.imageSize})…`);
  const vm = await ensureBenchVm(opts.vmDir, opts.imageSize);
  console.log(vm.buildLog);
  const tmp = await makeTempDir('spw-bench-boot-');
  const cli = opts.spillwayCli ?? (await copyBuild(REPO_ROOT, path.join(tmp.dir, 'build-snapshot')));
  const notes: string[] = [];
  const want = (p: PartId): boolean => opts.parts.includes(p);
  const samples: Sample[] = [];
  let unmeasured = false;
  const started = performance.now();

  for (let run = 1; run <= opts.runs; run++) {
    const tag = `[run ${run}/${opts.runs}]`;
    const show = (x: Sample): void => {
      const link = x.linkBytes === undefined ? '' : `, link ${formatSize(x.linkBytes)}`;
      log(`${tag} ${PART_NAMES[x.part].padEnd(24)} ready after ${fmt(x.seconds, 1)} s (boot ${fmt(x.boot.readySeconds, 1)} s, guest uptime ${fmt(x.boot.guestReadyUptime, 1)} s${x.copySeconds === undefined ? '' : `, copy ${fmt(x.copySeconds, 1)} s`})${link}, load ${x.load}`);
    };
    if (want('d')) {
      log(`${tag} (d) booting the local image…`);
      const x = await localBoot(vm, opts, run);
      samples.push(x);
      show(x);
    }
    if (want('a')) {
      log(`${tag} (a) copying ${formatSize(vm.info.allocatedBytes)} allocated of ${formatSize(vm.info.fsBytes)} with qemu-img convert at ${opts.rateMbit} Mbit/s (expect ~${fmt((vm.info.allocatedBytes * 8) / (opts.rateMbit * 1e6) / 60, 0)} min)…`);
      const x = await copyFirstBoot(vm, opts, run, tmp.dir, cli);
      samples.push(x);
      show(x);
    }
    if (want('b')) {
      log(`${tag} (b) booting through the edges, cold${want('c') ? ', recording the boot profile' : ''}…`);
      const dir = path.join(tmp.dir, `sites-${run}`);
      const { sample, state } = await spillwayCold(vm, opts, run, dir, cli, true, notes);
      try {
        samples.push(sample);
        show(sample);
        if (want('c')) {
          if (!sample.profile) {
            notes.push(`run ${run}: (c) not measured: (b) recorded no profile`);
            unmeasured = true;
          } else {
            log(`${tag} (c) restarting the edges with an empty cache and prefetch: { profiles: [${state.profileName}] }…`);
            try {
              const x = await spillwayProfiled(vm, opts, run, state);
              x.profile = sample.profile;
              samples.push(x);
              show(x);
              if (x.prefetch) log(`  prefetch: ${JSON.stringify(x.prefetch)}`);
            } catch (e) {
              // Keep what (a), (b) and (d) measured: report, write the results, exit non-zero.
              notes.push(`run ${run}: (c) failed: ${(e as Error).message.split('\n').slice(0, 3).join(' | ')}`);
              log(`${tag} (c) failed: ${(e as Error).stack ?? String(e)}`);
              unmeasured = true;
            }
          }
        }
      } finally {
        await state.sites.stop();
        await rm(dir, { recursive: true, force: true });
      }
    }
  }

  // Summary.
  const of = (p: PartId): Sample[] => samples.filter((x) => x.part === p);
  const med = (xs: number[]): number | null => (xs.length > 0 && xs.every(Number.isFinite) ? median(xs) : null);
  const secs = (p: PartId): number | null => med(of(p).map((x) => x.seconds));
  const link = (p: PartId): number | null => med(of(p).map((x) => x.linkBytes ?? Number.NaN));
  const [ta, tb, tc, td] = [secs('a'), secs('b'), secs('c'), secs('d')];
  const uniqueBytes = med(of('b').flatMap((x) => (x.profile ? [x.profile.uniqueBytes] : [])));
  const speedupB = ratio(ta, tb);
  const cOverD = ratio(tc, td);
  const linkC = link('c');
  const linkCOverNeeded = ratio(linkC, uniqueBytes);
  const s = (v: number | null, digits = 1): string => (v === null ? '-' : `${fmt(v, digits)} s`);
  const size = (v: number | null): string => (v === null ? '-' : formatSize(Math.round(v)));
  const spr = (p: PartId): string => fmt(spread(of(p).map((x) => x.seconds)));

  const partRows = opts.parts.map((p) => {
    const xs = of(p);
    const detail =
      p === 'a'
        ? `copy ${s(med(xs.map((x) => x.copySeconds ?? Number.NaN)))} + boot ${s(med(xs.map((x) => x.boot.readySeconds)))}`
        : p === 'c'
          ? `edge head start ${s(med(xs.map((x) => x.headStartSeconds ?? Number.NaN)), 2)}`
          : p === 'b'
            ? `profile ${size(uniqueBytes)} distinct`
            : 'image file, no link';
    return [PART_NAMES[p], s(secs(p)), detail, size(link(p)), size(med(xs.map((x) => x.linkBytesAtReady ?? Number.NaN))), spr(p), fmt(med(xs.map((x) => x.load)))];
  });
  const partTable = formatTable(
    [{ header: 'part' }, { header: 'time to ready', right: true }, { header: 'of which' }, { header: 'link bytes', right: true }, { header: 'link at ready', right: true }, { header: 'spread', right: true }, { header: 'load', right: true }],
    partRows,
  );
  const targets = [
    { target: '(a) / (b): cold streaming vs copy-first', figure: speedupB, figureText: fmtRatio(speedupB), goal: '>= 10.00x', result: verdict(speedupB, 10, true) },
    { target: '(c) / (d): profiled vs local', figure: cOverD, figureText: fmtRatio(cOverD), goal: '<= 1.30x', result: verdict(cOverD, 1.3, false) },
    { target: '(c) link bytes / bytes the boot needed (profile uniqueBytes)', figure: linkCOverNeeded, figureText: fmtRatio(linkCOverNeeded), goal: '<= 1.20x', result: verdict(linkCOverNeeded, 1.2, false) },
  ];
  const targetTable = formatTable(
    [{ header: 'target' }, { header: 'figure', right: true }, { header: 'goal' }, { header: 'result' }],
    targets.map((t) => [t.target, t.figureText, t.goal, t.result]),
  );

  // A ratio of two boots is only as good as the conditions they ran in: TCG needs a whole core.
  const loadOf = (p: PartId): number | null => med(of(p).map((x) => x.load));
  for (const [x, y] of [['c', 'd'], ['a', 'b']] as const) {
    const [lx, ly] = [loadOf(x), loadOf(y)];
    if (lx !== null && ly !== null && Math.abs(lx - ly) > os.availableParallelism() / 2) {
      notes.push(`load average ${lx} during ${PART_NAMES[x]} but ${ly} during ${PART_NAMES[y]} (${os.availableParallelism()} CPUs): their ratio says more about the machine than about Spillway; rerun with --runs 3 on a quiet machine.`);
    }
  }
  notes.unshift(
    `Link: \`spillway wanem\` at ${opts.rateMbit} Mbit/s and ${opts.delayMs} ms each way (RTT ${opts.delayMs * 2} ms): between the edges for (b) and (c), between qemu-img and qemu-nbd for (a); a fresh relay for every part.`,
    `Times run from QEMU's start to the guest's SPILLWAY-BENCH-READY line on its serial console (QEMU TCG, ${opts.memoryMb} MiB, drive cache=${opts.qemuCache}, readonly, kernel \`ro\`); (a) adds qemu-img convert's wall time. (c) counts from QEMU's start; the edge started "head start" seconds earlier (cloud edge process start to the export answering), during which the plan may already stream.`,
    `Image: ${formatSize(vm.info.fsBytes)} ext4, ${formatSize(vm.info.allocatedBytes)} allocated; the workload reads ${formatSize(vm.info.workload.assetBytes)} in ${vm.info.workload.assetFiles} files after importing ${vm.info.workload.modules} stdlib modules; ${formatSize(vm.info.unread.bytes)} of host trees and generated data are never read by the boot (the interpreter's few libraries in /usr/lib/x86_64-linux-gnu aside).`,
    'Link bytes: what the relay delivered towards the reader (TLS and link frames for the edges, NBD replies for qemu-nbd). For (c), from starting the cloud edge until the plan finished after the boot. "link at ready": the same up to the ready marker (sampled from the relay stats file, rewritten every 500 ms).',
    `Medians of ${opts.runs} run(s); each boot checks the digest the workload prints against the one the build computed.`,
  );

  console.log(`\nbench/boot: ${formatSize(vm.info.fsBytes)} VM image over ${opts.rateMbit} Mbit/s, RTT ${opts.delayMs * 2} ms; medians of ${opts.runs}`);
  console.log(partTable);
  console.log('');
  console.log(targetTable);
  for (const n of notes) console.log(`- ${n}`);

  await writeJsonResult(opts.out, {
    bench: 'boot',
    machine,
    config: {
      parts: opts.parts,
      runs: opts.runs,
      rateMbit: opts.rateMbit,
      delayMs: opts.delayMs,
      memoryMb: opts.memoryMb,
      qemuCache: opts.qemuCache,
      recordingIdleMs: opts.idleMs,
      cloudEdge: { connections: opts.connections ?? 2, readAhead: opts.readAhead ?? 'edge default', writes: 'remote-only', cache: `${Math.ceil((vm.info.fsBytes * 1.25) / 2 ** 20)}MiB` },
      copyFirst: 'qemu-nbd -r -f raw -t -x \'\' -b 127.0.0.1 -p PORT root.img behind spillway wanem; qemu-img convert -f raw -O raw nbd://127.0.0.1:RELAY/ copy.img',
      qemu: samples[0]?.boot.args ?? null,
      spillwayCli: opts.spillwayCli ?? 'snapshot of dist/ taken at start',
    },
    image: { dir: vm.dir, ...vm.info },
    summary: {
      seconds: { a: ta, b: tb, c: tc, d: td },
      copySeconds: med(of('a').map((x) => x.copySeconds ?? Number.NaN)),
      linkBytes: { a: link('a'), b: link('b'), c: link('c') },
      profileUniqueBytes: uniqueBytes,
      targets: targets.map((t) => ({ target: t.target, figure: t.figure, goal: t.goal, result: t.result })),
    },
    samples,
    notes,
    elapsedSeconds: Math.round((performance.now() - started) / 1000),
    loadAverageAtEnd: os.loadavg().map((l) => Math.round(l * 100) / 100),
  });
  console.log(`\nresults: ${path.relative(process.cwd(), opts.out) || opts.out}`);
  if (unmeasured) process.exitCode = 1;
}

runBench('bench/boot', main);
