// bench/cache: the secure cache next to the storage layouts it could have used, in the same run.
//
//   npx tsx bench/cache.ts [--blobs 2048] [--runs 3] [--qd 8] [--entries 100000]
//                          [--out bench/results/cache.json]
//
// 1. Storage candidates, 64 KiB blobs, no encryption, QD --qd: the slab file this cache uses
//    (pwrite/pread of fixed slots), one file per blob (write tmp + rename / readFile), and SQLite
//    blobs (better-sqlite3, not a dependency: install it outside the project and pass --sqlite,
//    see docs/cache.md; a 5-minute source build here).
// 2. SecureCache (AES-256-GCM, index, SLRU) against the same slab read/written raw: the ratio is
//    what encryption and bookkeeping cost (target: reads >= 0.7x).
// 3. Reopen of an index of --entries chunks: after a clean close (snapshot), after a crash (log
//    replay), and SQLite loading the same rows into maps (when installed).
//
// A benchmark, not a test: it exits 0 whether targets are met or missed (see bench/README.md).

import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { cp, mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { createRequire } from 'node:module';
import { SecureCache } from '../src/cache/cache.js';
import { SlabStore } from '../src/cache/slab.js';
import { installCleanupHandlers, runBench } from './lib/cleanup.js';
import { makeTempDir } from './lib/files.js';
import { REPO_ROOT } from './lib/nbd-servers.js';
import { runCommand } from './lib/process.js';
import { machineInfo, writeJsonResult } from './lib/results.js';
import { median, ratio, spread } from './lib/stats.js';
import { fmt, fmtRatio, formatTable } from './lib/table.js';
import { positiveInt } from './lib/args.js';

const CHUNK = 64 * 1024;

const USAGE = `Usage: npx tsx bench/cache.ts [options]

Measures the secure cache against the storage layouts it could have used and against itself
without encryption; prints medians and ratios, writes them as JSON.

Options:
  --blobs N       64 KiB blobs per throughput measurement (default 2048 = 128 MiB)
  --runs N        measurements per candidate, interleaved (default 3)
  --qd N          operations in flight for the async candidates (default 8)
  --entries N     index entries for the reopen measurement (default 100000)
  --out FILE      JSON results (default bench/results/cache.json)
  --sqlite DIR    directory of an installed better-sqlite3 package, for the SQLite candidates
                  (default: the project's, when installed; skipped otherwise)
  -h, --help      this text`;

interface Options {
  blobs: number;
  runs: number;
  qd: number;
  entries: number;
  out: string;
  sqlite: string | undefined;
}


function parseOptions(argv: string[]): Options | null {
  const { values } = parseArgs({
    args: argv,
    options: {
      blobs: { type: 'string', default: '2048' },
      runs: { type: 'string', default: '3' },
      qd: { type: 'string', default: '8' },
      entries: { type: 'string', default: '100000' },
      out: { type: 'string', default: path.join('bench', 'results', 'cache.json') },
      sqlite: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) return null;
  return {
    blobs: positiveInt(values.blobs, 'blobs'),
    runs: positiveInt(values.runs, 'runs'),
    qd: positiveInt(values.qd, 'qd'),
    entries: positiveInt(values.entries, 'entries'),
    out: values.out,
    sqlite: values.sqlite,
  };
}

/** Run `op(i)` for i in 0..n-1 with `qd` in flight; returns seconds. */
async function timed(n: number, qd: number, op: (i: number) => Promise<unknown> | unknown): Promise<number> {
  const t0 = performance.now();
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < n) await op(next++);
  };
  await Promise.all(Array.from({ length: Math.min(qd, n) }, worker));
  return (performance.now() - t0) / 1000;
}

function shuffled(n: number, seed: number): number[] {
  const a = Array.from({ length: n }, (_, i) => i);
  let x = seed | 1;
  for (let i = n - 1; i > 0; i--) {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    const j = x % (i + 1);
    [a[i], a[j]] = [a[j] as number, a[i] as number];
  }
  return a;
}

interface Sample {
  put: number;
  get: number;
}

/** A storage candidate: fresh store per run, put all blobs, then read them in random order. */
interface Candidate {
  readonly name: string;
  readonly what: string;
  run(dir: string, blobs: readonly Buffer[], order: readonly number[], qd: number): Promise<Sample>;
}

const slabCandidate: Candidate = {
  name: 'slab',
  what: 'slab file, fixed 64 KiB slots, pwrite/pread (the layout used)',
  async run(dir, blobs, order, qd) {
    const store = await SlabStore.open(dir);
    const slab = await store.slab(CHUNK);
    try {
      const put = await timed(blobs.length, qd, (i) => slab.write(slab.allocate(true) as number, blobs[i] as Buffer));
      const get = await timed(order.length, qd, (k) => slab.read(order[k] as number, CHUNK));
      return { put, get };
    } finally {
      await store.close();
    }
  },
};

const filesCandidate: Candidate = {
  name: 'file-per-blob',
  what: 'one file per blob in 256 directories, write tmp + rename / readFile',
  async run(dir, blobs, order, qd) {
    for (let i = 0; i < 256; i++) await mkdir(path.join(dir, i.toString(16).padStart(2, '0')), { recursive: true });
    const file = (i: number): string => path.join(dir, (i & 255).toString(16).padStart(2, '0'), `${i}.blob`);
    const put = await timed(blobs.length, qd, async (i) => {
      await writeFile(`${file(i)}.tmp`, blobs[i] as Buffer);
      await rename(`${file(i)}.tmp`, file(i));
    });
    const get = await timed(order.length, qd, (k) => readFile(file(order[k] as number)));
    return { put, get };
  },
};

type SqliteDb = {
  pragma(s: string): unknown;
  exec(s: string): unknown;
  prepare(s: string): { run(...a: unknown[]): unknown; get(...a: unknown[]): unknown; iterate(...a: unknown[]): Iterable<unknown>; raw(): { iterate(): Iterable<unknown[]> } };
  transaction(fn: (...a: unknown[]) => void): (...a: unknown[]) => void;
  close(): void;
};
type SqliteCtor = new (file: string) => SqliteDb;

/** better-sqlite3 from `dir` (an installed package directory), else from the project, else null. */
function loadSqlite(dir: string | undefined): SqliteCtor | null {
  const require = createRequire(import.meta.url);
  try {
    return require(dir ? path.resolve(dir) : 'better-sqlite3') as SqliteCtor;
  } catch (err) {
    if (dir) throw new Error(`--sqlite ${dir}: ${(err as Error).message}`);
    return null;
  }
}

function sqliteCandidate(Database: SqliteCtor): Candidate {
  return {
    name: 'sqlite-blob',
    what: 'better-sqlite3, blobs in a WAL table, one transaction per put (synchronous calls)',
    async run(dir, blobs, order) {
      const db = new Database(path.join(dir, 'blobs.db'));
      try {
        db.pragma('journal_mode = WAL');
        db.pragma('synchronous = NORMAL');
        db.exec('CREATE TABLE b (k INTEGER PRIMARY KEY, v BLOB)');
        const ins = db.prepare('INSERT INTO b (k, v) VALUES (?, ?)');
        const sel = db.prepare('SELECT v FROM b WHERE k = ?');
        const put = await timed(blobs.length, 1, (i) => ins.run(i, blobs[i]));
        const get = await timed(order.length, 1, (k) => sel.get(order[k]));
        return { put, get };
      } finally {
        db.close();
      }
    },
  };
}

/** SecureCache as a candidate: encrypted puts and gets through the whole cache. */
const secureCandidate: Candidate = {
  name: 'secure-cache',
  what: 'SecureCache: AES-256-GCM + index + SLRU over the same slab layout',
  async run(dir, blobs, order, qd) {
    const cache = await SecureCache.open({ dir, maxBytes: 2 ** 40 });
    try {
      cache.setKey('bench', randomBytes(32));
      const ids = blobs.map((b) => createHash('sha256').update(b).digest());
      const put = await timed(blobs.length, qd, (i) => cache.put('vol', 'bench', i, ids[i] as Buffer, blobs[i] as Buffer));
      const get = await timed(order.length, qd, (k) => cache.get('vol', order[k] as number));
      return { put, get };
    } finally {
      await cache.close();
    }
  },
};

/** AES-256-GCM alone on one core, for context (GB/s encrypt, decrypt). */
function aesGcmRate(bytes: number): { seal: number; open: number } {
  const key = randomBytes(32);
  const pt = randomBytes(CHUNK);
  const n = Math.max(1, Math.floor(bytes / CHUNK));
  const sealed: { iv: Buffer; ct: Buffer; tag: Buffer }[] = [];
  let t0 = performance.now();
  for (let i = 0; i < n; i++) {
    const iv = randomBytes(12);
    const c = createCipheriv('aes-256-gcm', key, iv);
    const ct = c.update(pt);
    c.final();
    if (i < 64) sealed.push({ iv, ct, tag: c.getAuthTag() });
  }
  const seal = (n * CHUNK) / ((performance.now() - t0) / 1000) / 1e9;
  t0 = performance.now();
  for (let i = 0; i < n; i++) {
    const s = sealed[i % sealed.length] as { iv: Buffer; ct: Buffer; tag: Buffer };
    const d = createDecipheriv('aes-256-gcm', key, s.iv);
    d.setAuthTag(s.tag);
    d.update(s.ct);
    d.final();
  }
  const open = (n * CHUNK) / ((performance.now() - t0) / 1000) / 1e9;
  return { seal, open };
}

/** The system OpenSSL's AES-256-GCM rate on 64 KiB blocks (wall clock), as a peer for node:crypto; null without openssl. */
async function opensslGcmRate(): Promise<number | null> {
  try {
    const r = await runCommand('openssl', ['speed', '-elapsed', '-evp', 'aes-256-gcm', '-bytes', '65536', '-seconds', '2'], { allowFail: true, timeoutMs: 30000 });
    const m = /AES-256-GCM\s+([\d.]+)k/i.exec(r.stdout);
    return m ? (Number(m[1]) * 1000) / 1e9 : null;
  } catch {
    return null;
  }
}

interface ReopenFigures {
  cleanMs: number[];
  crashMs: number[];
  sqliteMs: number[];
  /** CPU time of the same opens (less sensitive to other load than wall time). */
  cleanCpuMs: number[];
  crashCpuMs: number[];
  sqliteCpuMs: number[];
  indexBytes: number;
  slabBytes: number;
}

/** Build a cache of `entries` chunks (4 KiB each, the smallest slot), then time reopening it. */
async function reopenBench(root: string, entries: number, runs: number, Database: SqliteCtor | null): Promise<ReopenFigures> {
  const dir = path.join(root, 'reopen');
  const crashCopy = path.join(root, 'reopen-crash');
  const key = randomBytes(32);
  const cache = await SecureCache.open({ dir, maxBytes: 2 ** 40, snapshotMinLogBytes: Number.MAX_SAFE_INTEGER });
  cache.setKey('bench', key);
  const data = randomBytes(4096);
  process.stderr.write(`reopen: writing ${entries} entries...\n`);
  await timed(entries, 16, (i) => {
    data.writeUInt32BE(i, 0);
    return cache.put('vol', 'bench', i, createHash('sha256').update(data).digest(), data);
  });
  await cache.idle();
  // A crash image: everything is in the log (no snapshot since open), copied while open.
  await cp(dir, crashCopy, { recursive: true });
  const { indexBytes, slabBytes } = cache.stats();
  await cache.close();

  const figures: ReopenFigures = { cleanMs: [], crashMs: [], sqliteMs: [], cleanCpuMs: [], crashCpuMs: [], sqliteCpuMs: [], indexBytes, slabBytes };
  const cpuMs = (u: NodeJS.CpuUsage): number => (u.user + u.system) / 1000;
  let sqliteFile: string | null = null;
  if (Database) {
    sqliteFile = path.join(root, 'index.db');
    const db = new Database(sqliteFile);
    db.pragma('journal_mode = WAL');
    db.exec('CREATE TABLE blob (fid INTEGER, id BLOB, slot INTEGER, len INTEGER, nonce BLOB, tag BLOB, PRIMARY KEY (fid, id)) WITHOUT ROWID');
    db.exec('CREATE TABLE map (vid INTEGER, idx INTEGER, fid INTEGER, id BLOB, PRIMARY KEY (vid, idx)) WITHOUT ROWID');
    const ib = db.prepare('INSERT INTO blob VALUES (?, ?, ?, ?, ?, ?)');
    const im = db.prepare('INSERT INTO map VALUES (?, ?, ?, ?)');
    db.transaction(() => {
      for (let i = 0; i < entries; i++) {
        const id = randomBytes(32);
        ib.run(1, id, i, 4096, randomBytes(12), randomBytes(16));
        im.run(1, i, 1, id);
      }
    })();
    db.close();
  }
  for (let r = 0; r < runs; r++) {
    let t0 = performance.now();
    let u0 = process.cpuUsage();
    const a = await SecureCache.open({ dir, maxBytes: 2 ** 40 });
    figures.cleanMs.push(performance.now() - t0);
    figures.cleanCpuMs.push(cpuMs(process.cpuUsage(u0)));
    if (a.stats().blobs !== entries) throw new Error(`reopen found ${a.stats().blobs} blobs, expected ${entries}`);
    await a.close();

    const crashDir = path.join(root, `reopen-crash-${r}`);
    await cp(crashCopy, crashDir, { recursive: true });
    t0 = performance.now();
    u0 = process.cpuUsage();
    const b = await SecureCache.open({ dir: crashDir, maxBytes: 2 ** 40 });
    figures.crashMs.push(performance.now() - t0);
    figures.crashCpuMs.push(cpuMs(process.cpuUsage(u0)));
    if (b.stats().blobs !== entries) throw new Error(`crash reopen found ${b.stats().blobs} blobs, expected ${entries}`);
    await b.close();

    if (Database && sqliteFile) {
      t0 = performance.now();
      u0 = process.cpuUsage();
      const db = new Database(sqliteFile);
      const blobs = new Map<string, unknown>();
      for (const row of db.prepare('SELECT * FROM blob').raw().iterate()) blobs.set((row[1] as Buffer).toString('base64'), row);
      const maps = new Map<number, unknown>();
      for (const row of db.prepare('SELECT * FROM map').raw().iterate()) maps.set(row[1] as number, row[3]);
      db.close();
      figures.sqliteMs.push(performance.now() - t0);
      figures.sqliteCpuMs.push(cpuMs(process.cpuUsage(u0)));
    }
  }
  return figures;
}

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  if (!opts) {
    console.log(USAGE);
    return;
  }
  installCleanupHandlers();
  const machine = await machineInfo(REPO_ROOT, {});
  if ((machine.loadAverage[0] ?? 0) > os.availableParallelism()) {
    process.stderr.write(`note: load average ${machine.loadAverage[0]} on ${os.availableParallelism()} cores; figures will be noisy\n`);
  }
  const tmp = await makeTempDir('spw-bench-cache-');
  const Database = loadSqlite(opts.sqlite);
  const candidates: Candidate[] = [slabCandidate, secureCandidate, filesCandidate];
  if (Database) candidates.push(sqliteCandidate(Database));
  const notes: string[] = [];
  if (!Database) notes.push('better-sqlite3 not found: sqlite candidates skipped (see --sqlite)');

  const blobs = Array.from({ length: opts.blobs }, () => randomBytes(CHUNK));
  const samples: Record<string, Sample[]> = Object.fromEntries(candidates.map((c) => [c.name, []]));
  for (let r = 0; r < opts.runs; r++) {
    const order = shuffled(opts.blobs, r + 1);
    for (const c of candidates) {
      const dir = path.join(tmp.dir, `${c.name}-${r}`);
      await mkdir(dir, { recursive: true });
      process.stderr.write(`run ${r + 1}/${opts.runs}: ${c.name}\n`);
      (samples[c.name] as Sample[]).push(await c.run(dir, blobs, order, opts.qd));
    }
  }
  const mbps = (s: number): number => (opts.blobs * CHUNK) / s / 1e6;
  const summary = candidates.map((c) => {
    const ss = samples[c.name] as Sample[];
    const put = ss.map((s) => mbps(s.put));
    const get = ss.map((s) => mbps(s.get));
    return { name: c.name, what: c.what, putMBps: median(put), getMBps: median(get), putSpread: spread(put), getSpread: spread(get) };
  });
  const by = (n: string): (typeof summary)[number] | undefined => summary.find((s) => s.name === n);
  const readRatio = ratio(by('secure-cache')?.getMBps, by('slab')?.getMBps);
  const putRatio = ratio(by('secure-cache')?.putMBps, by('slab')?.putMBps);
  const aes = aesGcmRate(256 * 1024 * 1024);
  const opensslGcm = await opensslGcmRate();

  const reopen = await reopenBench(tmp.dir, opts.entries, opts.runs, Database);

  console.log(`\n64 KiB blobs, ${opts.blobs} per run, ${opts.runs} runs interleaved, QD ${opts.qd} (sqlite: synchronous, QD 1); medians\n`);
  console.log(
    formatTable(
      [{ header: 'candidate' }, { header: 'put MB/s', right: true }, { header: 'get MB/s', right: true }, { header: 'spread put/get', right: true }, { header: 'what' }],
      summary.map((s) => [s.name, fmt(s.putMBps, 0), fmt(s.getMBps, 0), `${fmt(s.putSpread)}/${fmt(s.getSpread)}`, s.what]),
    ),
  );
  console.log(
    `\nsecure-cache / raw slab: get ${fmtRatio(readRatio)} (target >= 0.70x: ${readRatio === null ? 'n/a' : readRatio >= 0.7 ? 'met' : 'missed'}), put ${fmtRatio(putRatio)}`,
  );
  console.log(
    `AES-256-GCM alone, one core: node:crypto seal ${fmt(aes.seal)} GB/s, open ${fmt(aes.open)} GB/s; system \`openssl speed\` ${fmt(opensslGcm)} GB/s (node / openssl: ${fmtRatio(ratio(aes.seal, opensslGcm))})`,
  );
  console.log(`\nreopen of ${opts.entries} entries (index ${fmt(reopen.indexBytes / 1e6, 1)} MB, slabs ${fmt(reopen.slabBytes / 1e6, 0)} MB); medians\n`);
  console.log(
    formatTable(
      [{ header: 'reopen', right: false }, { header: 'wall ms', right: true }, { header: 'cpu ms', right: true }],
      [
        ['after clean close (snapshot)', fmt(median(reopen.cleanMs), 0), fmt(median(reopen.cleanCpuMs), 0)],
        ['after crash (log replay)', fmt(median(reopen.crashMs), 0), fmt(median(reopen.crashCpuMs), 0)],
        ['sqlite: load rows into maps', reopen.sqliteMs.length > 0 ? fmt(median(reopen.sqliteMs), 0) : '-', reopen.sqliteCpuMs.length > 0 ? fmt(median(reopen.sqliteCpuMs), 0) : '-'],
      ],
    ),
  );
  for (const n of notes) console.log(`note: ${n}`);

  await writeJsonResult(opts.out, {
    machine,
    config: { ...opts, chunk: CHUNK },
    summary: { throughput: summary, readRatio, putRatio, aesGcmGBps: { ...aes, opensslSpeed: opensslGcm }, reopen: { cleanMs: median(reopen.cleanMs), crashMs: median(reopen.crashMs), sqliteMs: reopen.sqliteMs.length > 0 ? median(reopen.sqliteMs) : null, indexBytes: reopen.indexBytes } },
    samples: { throughput: samples, reopen },
    notes,
  });
  process.stderr.write(`wrote ${opts.out}\n`);
}

runBench('bench/cache', main);
