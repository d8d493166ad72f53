// bench/codecs: the per-chunk compressors and keyed chunk-signature hashes the link could use,
// measured on 64 KiB chunks of a real ext4 image (system files: text, binaries, already
// compressed files), of random data and of zero chunks. One core, one process, sync calls on the
// main thread (the async-only candidate is awaited chunk by chunk). Times are this process's CPU
// time; passes are interleaved (A B C A B C) after a warm-up pass, and the table shows the best
// pass of each (the one least disturbed by other load on a shared machine).
//
//   npx tsx bench/codecs.ts [--image PATH] [--fs-size 320M] [--random-size 64M] [--max-data 384M]
//                           [--chunk 64K] [--repeats 5] [--codecs LIST] [--hashes LIST]
//                           [--modules DIR,...] [--out bench/results/codecs.json]
//
// Candidates are loaded from the project's node_modules and then from every --modules DIR (a
// scratch directory where the rejected candidates were installed with `npm install`, so the
// whole comparison can be run again without adding them to the project); a candidate found in
// neither is reported as not installed. See docs/decisions/compression-and-signatures.md.
//
// A benchmark, not a test: it exits 0 whatever the figures are.

import { createHash, createHmac, randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, statSync, type Dirent } from 'node:fs';
import { copyFile, mkdir, open, rm, stat } from 'node:fs/promises';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import zlib from 'node:zlib';
import { installCleanupHandlers, runBench } from './lib/cleanup.js';
import { makeTempDir, writeRandomFile } from './lib/files.js';
import { REPO_ROOT } from './lib/nbd-servers.js';
import { runCommand } from './lib/process.js';
import { machineInfo, writeJsonResult } from './lib/results.js';
import { formatSize, parseSize } from './lib/size.js';
import { median, spread } from './lib/stats.js';
import { fmt, formatTable, type Column } from './lib/table.js';
import { prng } from '../test/helpers/random.js';

const MiB = 2 ** 20;
/** Links the decision is sized for, in MiB/s of payload (decimal bits on the wire). */
const LINKS = [
  { name: '100 Mbit/s', mibPerSec: 100e6 / 8 / MiB },
  { name: '1 Gbit/s', mibPerSec: 1e9 / 8 / MiB },
] as const;
/** The skip rule: a compressed chunk is sent only when it is at most this fraction of the input. */
const SKIP_NUM = 7;
const SKIP_DEN = 8;

const USAGE = `Usage: npx tsx bench/codecs.ts [options]

Measures per-chunk compression (ratio, compress and decompress MiB/s, per-call cost) and keyed
chunk-signature hashes on 64 KiB chunks of an ext4 image of system files, random data and zero
chunks, one core. Prints tables and writes JSON.

Options:
  --image PATH        disk image to use (raw, or qcow2 converted with qemu-img); default: build
                      an ext4 image with mkfs.ext4 -d from a copy of /usr/lib, /usr/share, /usr/bin
  --fs-size SIZE      bytes of system files copied into the built image (default 320M)
  --random-size SIZE  bytes of random data, written as a raw image (default 64M)
  --max-data SIZE     use at most this many bytes of non-zero image chunks, evenly sampled (default 384M)
  --chunk SIZE        chunk size (default 64K)
  --repeats N         timed passes per candidate and data set, interleaved; the best is
                      reported (default 5)
  --codecs LIST       comma-separated codec ids (default all; see the table)
  --hashes LIST       comma-separated hash ids (default all)
  --modules DIRS      comma-separated directories whose node_modules hold extra candidates
  --out FILE          JSON results (default bench/results/codecs.json)
  -h, --help          this text`;

interface Options {
  image: string | null;
  fsBytes: number;
  randomBytes: number;
  maxDataBytes: number;
  chunk: number;
  repeats: number;
  codecs: string[] | null;
  hashes: string[] | null;
  modules: string[];
  out: string;
}

function parseOptions(argv: string[]): Options | null {
  const { values } = parseArgs({
    args: argv,
    options: {
      image: { type: 'string' },
      'fs-size': { type: 'string', default: '320M' },
      'random-size': { type: 'string', default: '64M' },
      'max-data': { type: 'string', default: '384M' },
      chunk: { type: 'string', default: '64K' },
      repeats: { type: 'string', default: '5' },
      codecs: { type: 'string' },
      hashes: { type: 'string' },
      modules: { type: 'string', default: '' },
      out: { type: 'string', default: path.join('bench', 'results', 'codecs.json') },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) return null;
  const repeats = Number(values.repeats);
  if (!Number.isInteger(repeats) || repeats <= 0) throw new Error(`--repeats must be a positive integer, got ${JSON.stringify(values.repeats)}`);
  const chunk = parseSize(values.chunk);
  if (chunk % 4096 !== 0 || chunk > 1024 * 1024) throw new Error('--chunk must be a multiple of 4 KiB, at most 1 MiB');
  const list = (s: string | undefined) =>
    s === undefined
      ? null
      : s
          .split(',')
          .map((x) => x.trim())
          .filter((x) => x !== '');
  return {
    image: values.image === undefined ? null : path.resolve(values.image),
    fsBytes: parseSize(values['fs-size']),
    randomBytes: parseSize(values['random-size']),
    maxDataBytes: parseSize(values['max-data']),
    chunk,
    repeats,
    codecs: list(values.codecs),
    hashes: list(values.hashes),
    modules: (list(values.modules) ?? []).map((d) => path.resolve(d)),
    out: path.resolve(values.out),
  };
}

// ---------------------------------------------------------------------------------------------
// Loading candidates from the project or from --modules directories.

interface PackageFacts {
  name: string;
  version: string;
  /** preinstall/install/postinstall scripts, as npm would run them ("" when none). */
  installScripts: string;
  /** Where it was loaded from: "project" or the --modules directory. */
  from: string;
}

class Loader {
  private readonly roots: { label: string; req: NodeJS.Require }[];
  constructor(modules: readonly string[]) {
    this.roots = [{ label: 'project', req: createRequire(path.join(REPO_ROOT, 'package.json')) }, ...modules.map((d) => ({ label: d, req: createRequire(path.join(d, 'package.json')) }))];
  }

  /** The module `spec` (a package or a subpath) and its package's facts; throws when absent. */
  load(spec: string): { mod: unknown; pkg: PackageFacts } {
    const errors: string[] = [];
    for (const root of this.roots) {
      let resolved: string;
      try {
        resolved = root.req.resolve(spec);
      } catch {
        errors.push(`not in ${root.label}`);
        continue;
      }
      return { mod: root.req(resolved) as unknown, pkg: packageFacts(resolved, spec, root.label) };
    }
    throw new Error(`${spec} is not installed (${errors.join(', ')})`);
  }
}

function packageName(spec: string): string {
  const parts = spec.split('/');
  return spec.startsWith('@') ? parts.slice(0, 2).join('/') : (parts[0] ?? spec);
}

/** Walk up from a resolved file to its package.json (exports maps may hide it from require). */
function packageFacts(resolved: string, spec: string, from: string): PackageFacts {
  const name = packageName(spec);
  let dir = path.dirname(resolved);
  for (;;) {
    try {
      const pj = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string; scripts?: Record<string, string>; gypfile?: boolean };
      if (pj.name === name) {
        const s = pj.scripts ?? {};
        const scripts = ['preinstall', 'install', 'postinstall'].filter((k) => s[k] !== undefined).map((k) => `${k}: ${s[k]}`);
        // npm runs `node-gyp rebuild` for a package with a binding.gyp and no install script.
        if (scripts.length === 0 && pj.gypfile) scripts.push('install: node-gyp rebuild (implicit, binding.gyp)');
        return { name, version: pj.version ?? '?', installScripts: scripts.join('; '), from };
      }
    } catch {
      // no package.json here
    }
    const up = path.dirname(dir);
    if (up === dir) return { name, version: '?', installScripts: '?', from };
    dir = up;
  }
}

// ---------------------------------------------------------------------------------------------
// Compression candidates. Each exposes the fastest one-shot API it has, used as the link would:
// compress one chunk, decompress one payload whose original length is known.

type Bytes = Uint8Array;
type MaybeAsync<T> = T | Promise<T>;

interface CodecImpl {
  /** null for a decompressor only (its input is produced by `inputFrom`'s compressor). */
  compress: ((src: Buffer) => MaybeAsync<Bytes>) | null;
  decompress: (payload: Bytes, expectedLength: number) => MaybeAsync<Bytes>;
  /** For a decompressor only: the compressor producing its input. */
  inputFrom?: (src: Buffer) => Bytes;
  async: boolean;
  pkg: PackageFacts | null;
}

interface CodecSpec {
  id: string;
  family: 'zstd' | 'lz4' | 'deflate';
  level: number | null;
  /** native-prebuilt (binary inside npm packages), native-source (compiled at install), wasm, js, builtin */
  kind: 'native-prebuilt' | 'native-source' | 'wasm' | 'js' | 'builtin';
  packageSpec: string | null;
  load: (loader: Loader, chunk: number) => Promise<CodecImpl>;
}

interface ZstdNapiBinding {
  CCtx: new () => { compress(dst: Bytes, src: Bytes, level: number): number };
  DCtx: new () => { decompress(dst: Bytes, src: Bytes): number };
  compressBound(n: number): number;
}

function zstdNapi(level: number): CodecSpec {
  return {
    id: `zstd-napi-${level}`,
    family: 'zstd',
    level,
    kind: 'native-source',
    packageSpec: 'zstd-napi',
    load: async (loader, chunk) => {
      const { mod, pkg } = loader.load('zstd-napi/binding');
      const b = mod as ZstdNapiBinding;
      const cctx = new b.CCtx();
      const dctx = new b.DCtx();
      const scratch = Buffer.allocUnsafe(b.compressBound(chunk));
      return {
        async: false,
        pkg,
        compress: (src) => Buffer.from(scratch.subarray(0, cctx.compress(scratch, src, level))),
        decompress: (p, n) => {
          const out = Buffer.allocUnsafe(n);
          if (dctx.decompress(out, p) !== n) throw new Error('short output');
          return out;
        },
      };
    },
  };
}

function mongodbZstd(level: number): CodecSpec {
  return {
    id: `mongodb-zstd-${level}`,
    family: 'zstd',
    level,
    kind: 'native-prebuilt',
    packageSpec: '@mongodb-js/zstd',
    load: async (loader) => {
      const { mod, pkg } = loader.load('@mongodb-js/zstd');
      const z = mod as { compress(b: Buffer, level: number): Promise<Buffer>; decompress(b: Buffer): Promise<Buffer> };
      if (pkg.version.split('.')[0] !== '1') throw new Error(`@mongodb-js/zstd ${pkg.version}: only the 1.x (napi-rs, prebuilt) line is measured here`);
      return { async: true, pkg, compress: (src) => z.compress(src, level), decompress: (p) => z.decompress(Buffer.from(p.buffer, p.byteOffset, p.byteLength)) };
    },
  };
}

function bokuwebZstd(level: number): CodecSpec {
  return {
    id: `zstd-wasm-${level}`,
    family: 'zstd',
    level,
    kind: 'wasm',
    packageSpec: '@bokuweb/zstd-wasm',
    load: async (loader) => {
      const { mod, pkg } = loader.load('@bokuweb/zstd-wasm');
      const z = mod as { init(): Promise<void>; compress(b: Bytes, level: number): Bytes; decompress(b: Bytes): Bytes };
      await z.init();
      return { async: false, pkg, compress: (src) => z.compress(src, level), decompress: (p) => z.decompress(p) };
    },
  };
}

function zstdCodec(level: number): CodecSpec {
  return {
    id: `zstd-codec-${level}`,
    family: 'zstd',
    level,
    kind: 'wasm',
    packageSpec: 'zstd-codec',
    load: async (loader) => {
      const { mod, pkg } = loader.load('zstd-codec');
      type Simple = { compress(b: Bytes, level: number): Bytes | null; decompress(b: Bytes): Bytes | null };
      const zc = (mod as { ZstdCodec: { run(cb: (zstd: { Simple: new () => Simple }) => void): void } }).ZstdCodec;
      const simple = await new Promise<Simple>((resolve) => zc.run((zstd) => resolve(new zstd.Simple())));
      const must = (b: Bytes | null) => {
        if (b === null) throw new Error('zstd-codec failed');
        return b;
      };
      return { async: false, pkg, compress: (src) => must(simple.compress(src, level)), decompress: (p) => must(simple.decompress(p)) };
    },
  };
}

function hpccZstd(level: number): CodecSpec {
  return {
    id: `hpcc-zstd-wasm-${level}`,
    family: 'zstd',
    level,
    kind: 'wasm',
    packageSpec: '@hpcc-js/wasm-zstd',
    load: async (loader) => {
      const { mod, pkg } = loader.load('@hpcc-js/wasm-zstd');
      type Z = { compress(b: Bytes, level: number): Bytes; decompress(b: Bytes): Bytes };
      const z = await (mod as { Zstd: { load(): Promise<Z> } }).Zstd.load();
      return { async: false, pkg, compress: (src) => z.compress(src, level), decompress: (p) => z.decompress(p) };
    },
  };
}

function toondepauwZstd(level: number): CodecSpec {
  return {
    id: `node-zstd-${level}`,
    family: 'zstd',
    level,
    kind: 'native-prebuilt',
    packageSpec: '@toondepauw/node-zstd',
    load: async (loader) => {
      const { mod, pkg } = loader.load('@toondepauw/node-zstd');
      const m = mod as { Encoder: new (level: number) => { encodeSync(b: Buffer): Buffer }; Decoder: new () => { decodeSync(b: Buffer): Buffer } };
      const enc = new m.Encoder(level);
      const dec = new m.Decoder();
      return { async: false, pkg, compress: (src) => enc.encodeSync(src), decompress: (p) => dec.decodeSync(Buffer.from(p.buffer, p.byteOffset, p.byteLength)) };
    },
  };
}

const FZSTD: CodecSpec = {
  id: 'fzstd-d',
  family: 'zstd',
  level: null,
  kind: 'js',
  packageSpec: 'fzstd',
  load: async (loader, chunk) => {
    const { mod, pkg } = loader.load('fzstd');
    const f = mod as { decompress(b: Bytes, out?: Bytes): Bytes };
    // Decompression only: its input is zstd level 1 from whichever zstd is installed.
    let inputFrom: (src: Buffer) => Bytes;
    try {
      const c = await zstdNapi(1).load(loader, chunk);
      inputFrom = c.compress as (src: Buffer) => Bytes;
    } catch {
      const c = await bokuwebZstd(1).load(loader, chunk);
      inputFrom = c.compress as (src: Buffer) => Bytes;
    }
    return { async: false, pkg, compress: null, inputFrom, decompress: (p, n) => f.decompress(p, Buffer.allocUnsafe(n)) };
  },
};

const LZ4_NAPI: CodecSpec = {
  id: 'lz4-napi',
  family: 'lz4',
  level: null,
  kind: 'native-prebuilt',
  packageSpec: 'lz4-napi',
  load: async (loader) => {
    const { mod, pkg } = loader.load('lz4-napi');
    const l = mod as { compressSync(b: Buffer): Buffer; uncompressSync(b: Bytes): Buffer };
    return { async: false, pkg, compress: (src) => l.compressSync(src), decompress: (p) => l.uncompressSync(p) };
  },
};

const NODE_LZ4: CodecSpec = {
  id: 'lz4-node',
  family: 'lz4',
  level: null,
  kind: 'native-source',
  packageSpec: 'lz4',
  load: async (loader, chunk) => {
    const { mod, pkg } = loader.load('lz4');
    const l = mod as { encodeBound(n: number): number; encodeBlock(src: Buffer, dst: Buffer): number; decodeBlock(src: Bytes, dst: Buffer): number };
    const scratch = Buffer.allocUnsafe(l.encodeBound(chunk));
    return {
      async: false,
      pkg,
      compress: (src) => {
        const n = l.encodeBlock(src, scratch);
        // 0 means "incompressible": the link would send it raw.
        return n === 0 ? src : Buffer.from(scratch.subarray(0, n));
      },
      decompress: (p, n) => {
        if (p.length === n) return p;
        const out = Buffer.allocUnsafe(n);
        if (l.decodeBlock(Buffer.from(p.buffer, p.byteOffset, p.byteLength), out) !== n) throw new Error('short output');
        return out;
      },
    };
  },
};

const LZ4JS: CodecSpec = {
  id: 'lz4js',
  family: 'lz4',
  level: null,
  kind: 'js',
  packageSpec: 'lz4js',
  load: async (loader) => {
    const { mod, pkg } = loader.load('lz4js');
    const l = mod as { compress(b: Bytes): Bytes; decompress(b: Bytes, max?: number): Bytes };
    return { async: false, pkg, compress: (src) => l.compress(src), decompress: (p, n) => l.decompress(p, n) };
  },
};

const LZ4_WASM: CodecSpec = {
  id: 'lz4-wasm',
  family: 'lz4',
  level: null,
  kind: 'wasm',
  packageSpec: 'lz4-wasm-nodejs',
  load: async (loader) => {
    const { mod, pkg } = loader.load('lz4-wasm-nodejs');
    const l = mod as { compress(b: Bytes): Bytes; decompress(b: Bytes): Bytes };
    return { async: false, pkg, compress: (src) => l.compress(src), decompress: (p) => l.decompress(p) };
  },
};

const DEFLATE_1: CodecSpec = {
  id: 'zlib-deflate-1',
  family: 'deflate',
  level: 1,
  kind: 'builtin',
  packageSpec: null,
  load: async () => ({
    async: false,
    pkg: null,
    compress: (src) => zlib.deflateRawSync(src, { level: 1 }),
    decompress: (p, n) => zlib.inflateRawSync(p, { maxOutputLength: n }),
  }),
};

const CODECS: CodecSpec[] = [
  zstdNapi(1),
  zstdNapi(3),
  mongodbZstd(1),
  mongodbZstd(3),
  bokuwebZstd(1),
  bokuwebZstd(3),
  hpccZstd(1),
  hpccZstd(3),
  zstdCodec(1),
  zstdCodec(3),
  toondepauwZstd(1),
  toondepauwZstd(3),
  FZSTD,
  LZ4_NAPI,
  NODE_LZ4,
  LZ4_WASM,
  LZ4JS,
  DEFLATE_1,
];

// ---------------------------------------------------------------------------------------------
// Keyed signature candidates (and two unkeyed references that are not acceptable as signatures).

interface HashSpec {
  id: string;
  keyed: boolean;
  kind: CodecSpec['kind'];
  packageSpec: string | null;
  /** Same output as another candidate (for a cross-check), e.g. "blake3-keyed". */
  function: string;
  load: (loader: Loader, key: Buffer) => Promise<{ sign: (data: Buffer) => Bytes; pkg: PackageFacts | null }>;
}

const HASHES: HashSpec[] = [
  {
    id: 'hmac-sha256',
    keyed: true,
    kind: 'builtin',
    packageSpec: null,
    function: 'hmac-sha256',
    load: async (_l, key) => ({ pkg: null, sign: (d) => createHmac('sha256', key).update(d).digest() }),
  },
  {
    id: 'blake3-keyed-napi',
    keyed: true,
    kind: 'native-prebuilt',
    packageSpec: '@napi-rs/blake-hash',
    function: 'blake3-keyed',
    load: async (loader, key) => {
      const { mod, pkg } = loader.load('@napi-rs/blake-hash');
      const B = (mod as { Blake3Hasher: { newKeyed(k: Buffer): { reset(): void; update(d: Bytes): unknown; digestBuffer(): Buffer } } }).Blake3Hasher;
      const h = B.newKeyed(key);
      return {
        pkg,
        sign: (d) => {
          h.reset();
          h.update(d);
          return h.digestBuffer();
        },
      };
    },
  },
  {
    id: 'blake3-keyed-hash-wasm',
    keyed: true,
    kind: 'wasm',
    packageSpec: 'hash-wasm',
    function: 'blake3-keyed',
    load: async (loader, key) => {
      const { mod, pkg } = loader.load('hash-wasm');
      type Hasher = { init(): Hasher; update(d: Bytes): Hasher; digest(f: 'binary'): Uint8Array };
      const h = await (mod as { createBLAKE3(bits: number, key: Bytes): Promise<Hasher> }).createBLAKE3(256, key);
      return { pkg, sign: (d) => h.init().update(d).digest('binary') };
    },
  },
  {
    id: 'blake3-keyed-noble',
    keyed: true,
    kind: 'js',
    packageSpec: '@noble/hashes',
    function: 'blake3-keyed',
    load: async (loader, key) => {
      const { mod, pkg } = loader.load('@noble/hashes/blake3.js');
      const b3 = (mod as { blake3(d: Bytes, o: { key: Bytes }): Uint8Array }).blake3;
      return { pkg, sign: (d) => b3(d, { key }) };
    },
  },
  {
    id: 'sha256-unkeyed',
    keyed: false,
    kind: 'builtin',
    packageSpec: null,
    function: 'sha256',
    load: async () => ({ pkg: null, sign: (d) => createHash('sha256').update(d).digest() }),
  },
  {
    id: 'xxh3-unkeyed',
    keyed: false,
    kind: 'wasm',
    packageSpec: 'hash-wasm',
    function: 'xxh3-64',
    load: async (loader) => {
      const { mod, pkg } = loader.load('hash-wasm');
      type Hasher = { init(): Hasher; update(d: Bytes): Hasher; digest(f: 'binary'): Uint8Array };
      const h = await (mod as { createXXHash3(): Promise<Hasher> }).createXXHash3();
      return { pkg, sign: (d) => h.init().update(d).digest('binary') };
    },
  },
];

// ---------------------------------------------------------------------------------------------
// Data: an ext4 image of real system files, random data, zero chunks.

const SOURCE_ROOTS = ['/usr/lib', '/usr/share', '/usr/bin'];
const MAX_FILE = 64 * MiB;

/** Regular files under `root` in sorted depth-first order (unreadable directories skipped). */
function* walkFiles(root: string): Generator<{ file: string; size: number }> {
  let entries: Dirent[];
  try {
    entries = readdirSync(root, { withFileTypes: true });
  } catch {
    return;
  }
  entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  for (const e of entries) {
    const p = path.join(root, e.name);
    if (e.isDirectory()) yield* walkFiles(p);
    else if (e.isFile()) {
      try {
        const size = statSync(p).size;
        if (size <= MAX_FILE) yield { file: p, size };
      } catch {
        // vanished or unreadable
      }
    }
  }
}

interface BuiltImage {
  path: string;
  files: number;
  fileBytes: number;
  imageBytes: number;
  /** Files and bytes taken from each source root. */
  sources: Record<string, { files: number; bytes: number }>;
  mkfs: string;
}

/** mulberry32 (test/helpers/random.ts): one machine always builds the same image. */
const seededRandom = prng;

/**
 * Copy system files into a staging tree, then mkfs.ext4 -d. Each root gives an equal share of
 * the bytes (so the text, compressed documentation and images of /usr/share weigh as much as the
 * binaries of /usr/lib and /usr/bin); within a root, files come in a seeded random order, so
 * the sample spans the whole tree rather than its first directories.
 */
async function buildExt4Image(dir: string, budget: number): Promise<BuiltImage> {
  const staging = path.join(dir, 'staging');
  const random = seededRandom(0x5b111a7);
  const roots = SOURCE_ROOTS.map((root) => {
    const list = [...walkFiles(root)];
    for (let i = list.length - 1; i > 0; i--) {
      const j = Math.floor(random() * (i + 1));
      [list[i], list[j]] = [list[j] as (typeof list)[number], list[i] as (typeof list)[number]];
    }
    return { root, list, next: 0, files: 0, bytes: 0 };
  });
  let files = 0;
  let fileBytes = 0;
  let blocks = 0;
  const dirs = new Set<string>();
  for (;;) {
    // The root with the fewest bytes so far gives the next file.
    const open = roots.filter((r) => r.next < r.list.length);
    if (fileBytes >= budget || open.length === 0) break;
    const r = open.reduce((a, b) => (b.bytes < a.bytes ? b : a));
    const pick = r.list[r.next++] as { file: string; size: number };
    const dest = path.join(staging, path.relative('/', pick.file));
    const destDir = path.dirname(dest);
    if (!dirs.has(destDir)) {
      await mkdir(destDir, { recursive: true });
      dirs.add(destDir);
    }
    try {
      await copyFile(pick.file, dest);
    } catch {
      continue;
    }
    r.files++;
    r.bytes += pick.size;
    files++;
    fileBytes += pick.size;
    blocks += Math.ceil(pick.size / 4096);
  }
  const perRoot = Object.fromEntries(roots.map((r) => [r.root, { files: r.files, bytes: r.bytes }]));
  const img = path.join(dir, 'ext4.img');
  // Room for the data, metadata, the journal and some free space (free space is zero chunks).
  const imageMiB = Math.ceil(((blocks + dirs.size) * 4096 * 1.15) / MiB) + 64;
  const inodes = files + dirs.size * 2 + 4096;
  const args = ['-q', '-F', '-t', 'ext4', '-b', '4096', '-m', '0', '-N', String(inodes), '-E', 'lazy_itable_init=0,lazy_journal_init=0', '-d', staging, img, `${imageMiB}M`];
  await runCommand('mkfs.ext4', args, { timeoutMs: 600_000 });
  await rm(staging, { recursive: true, force: true });
  return { path: img, files, fileBytes, imageBytes: (await stat(img)).size, sources: perRoot, mkfs: `mkfs.ext4 ${args.join(' ')}` };
}

/** A raw view of `image`: qcow2 is converted with qemu-img into `dir`. */
async function rawImage(image: string, dir: string): Promise<{ path: string; format: string }> {
  const fh = await open(image, 'r');
  const magic = Buffer.alloc(4);
  try {
    await fh.read(magic, 0, 4, 0);
  } finally {
    await fh.close();
  }
  if (!magic.equals(Buffer.from([0x51, 0x46, 0x49, 0xfb]))) return { path: image, format: 'raw' };
  const out = path.join(dir, 'converted.raw');
  await runCommand('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, out], { timeoutMs: 600_000 });
  return { path: out, format: 'qcow2' };
}

interface Datasets {
  /** Non-zero chunks of the image (evenly sampled down to --max-data). */
  data: Buffer[];
  random: Buffer[];
  zero: Buffer[];
  imageChunks: number;
  imageZeroChunks: number;
  imageDataChunks: number;
}

function isZeroReference(b: Buffer, zero: Buffer): boolean {
  return b.equals(zero);
}

async function readChunks(file: string, chunk: number, maxDataBytes: number): Promise<Omit<Datasets, 'random' | 'zero'>> {
  const size = (await stat(file)).size;
  const count = Math.floor(size / chunk);
  const zero = Buffer.alloc(chunk);
  const fh = await open(file, 'r');
  const nonZeroIndexes: number[] = [];
  let zeros = 0;
  const scratch = Buffer.allocUnsafe(chunk);
  try {
    for (let i = 0; i < count; i++) {
      await fh.read(scratch, 0, chunk, i * chunk);
      if (isZeroReference(scratch, zero)) zeros++;
      else nonZeroIndexes.push(i);
    }
    const keep = Math.min(nonZeroIndexes.length, Math.floor(maxDataBytes / chunk));
    const big = Buffer.allocUnsafe(keep * chunk);
    const data: Buffer[] = [];
    for (let k = 0; k < keep; k++) {
      const i = nonZeroIndexes[Math.floor((k * nonZeroIndexes.length) / keep)] as number;
      const b = big.subarray(k * chunk, (k + 1) * chunk);
      await fh.read(b, 0, chunk, i * chunk);
      data.push(b);
    }
    return { data, imageChunks: count, imageZeroChunks: zeros, imageDataChunks: nonZeroIndexes.length };
  } finally {
    await fh.close();
  }
}

async function readAll(file: string, chunk: number): Promise<Buffer[]> {
  const fh = await open(file, 'r');
  try {
    const size = (await fh.stat()).size;
    const count = Math.floor(size / chunk);
    const big = Buffer.allocUnsafe(count * chunk);
    await fh.read(big, 0, count * chunk, 0);
    return Array.from({ length: count }, (_, i) => big.subarray(i * chunk, (i + 1) * chunk));
  } finally {
    await fh.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Measurement.

// Time is measured as this process's CPU time (user + system, all threads), not wall-clock time:
// the machines this runs on are shared, and CPU time is what "per core" means. Wall-clock time is
// recorded too (JSON only), so a reader can see how contended the run was.
interface Mark {
  wall: bigint;
  cpu: NodeJS.CpuUsage;
}
interface Elapsed {
  wall: number;
  cpu: number;
}
const mark = (): Mark => ({ wall: process.hrtime.bigint(), cpu: process.cpuUsage() });
function since(m: Mark): Elapsed {
  const c = process.cpuUsage(m.cpu);
  return { wall: Number(process.hrtime.bigint() - m.wall) / 1e9, cpu: (c.user + c.system) / 1e6 };
}
/** CPU µs per call of `f`, looping until at least `minSec` of CPU time has passed. */
function usPerCall(f: () => unknown, minSec = 0.05): number {
  let n = 0;
  const m = mark();
  let e = since(m);
  while (e.cpu < minSec) {
    for (let i = 0; i < 100; i++) f();
    n += 100;
    e = since(m);
  }
  return (e.cpu * 1e6) / n;
}

interface DatasetFigures {
  chunks: number;
  inBytes: number;
  /** Sum of compressed sizes, every chunk compressed. */
  outBytes: number;
  /** Sum of what the link sends with the skip rule (raw when compressed > 7/8 of the input). */
  keptBytes: number;
  skippedChunks: number;
  ratio: number;
  ratioWithSkip: number;
  compressMiBs: number | null;
  decompressMiBs: number;
  compressUsPerChunk: number | null;
  decompressUsPerChunk: number;
  compressSpread: number | null;
  /** Wall-clock over CPU time of the compress passes (1 on an idle machine, higher when contended). */
  wallOverCpu: number | null;
  /** Compressed size of each measured chunk (for the pre-check study; not written to JSON). */
  sizes: Int32Array;
}

async function compressAll(impl: CodecImpl, chunks: readonly Buffer[], out: Bytes[]): Promise<Elapsed> {
  const f = impl.compress ?? impl.inputFrom;
  if (!f) throw new Error('no compressor');
  let i = 0;
  try {
    const m = mark();
    if (impl.async) {
      for (; i < chunks.length; i++) out[i] = await (f(chunks[i] as Buffer) as Promise<Bytes>);
    } else {
      for (; i < chunks.length; i++) out[i] = f(chunks[i] as Buffer) as Bytes;
    }
    return since(m);
  } catch (e) {
    throw new Error(`compressing chunk ${i} of ${chunks.length}: ${(e as Error).message}`, { cause: e });
  }
}

async function decompressAll(impl: CodecImpl, payloads: readonly Bytes[], lengths: number): Promise<Elapsed> {
  let sink = 0;
  let i = 0;
  const m = mark();
  try {
    if (impl.async) {
      for (; i < payloads.length; i++) sink += (await (impl.decompress(payloads[i] as Bytes, lengths) as Promise<Bytes>)).length;
    } else {
      for (; i < payloads.length; i++) sink += (impl.decompress(payloads[i] as Bytes, lengths) as Bytes).length;
    }
  } catch (e) {
    throw new Error(`decompressing payload ${i} of ${payloads.length} (${payloads[i]?.length ?? '?'} bytes): ${(e as Error).message}`, { cause: e });
  }
  const e = since(m);
  if (sink !== payloads.length * lengths) throw new Error(`decompressed ${sink} bytes, expected ${payloads.length * lengths}`);
  return e;
}

async function verifyRoundTrip(impl: CodecImpl, chunks: readonly Buffer[], payloads: readonly Bytes[]): Promise<void> {
  const step = Math.max(1, Math.floor(chunks.length / 200));
  for (let i = 0; i < chunks.length; i += step) {
    const src = chunks[i] as Buffer;
    let back: Bytes;
    try {
      back = await impl.decompress(payloads[i] as Bytes, src.length);
    } catch (e) {
      throw new Error(`round trip of chunk ${i}: ${(e as Error).message}`, { cause: e });
    }
    if (!Buffer.from(back.buffer, back.byteOffset, back.byteLength).equals(src)) throw new Error(`round trip differs at chunk ${i}`);
  }
}

/** Fixed cost of one call: compress and decompress a 16-byte input many times. */
async function callCost(impl: CodecImpl): Promise<{ compressUs: number | null; decompressUs: number }> {
  const src = Buffer.from('spillway-chunk-0');
  const f = impl.compress ?? impl.inputFrom;
  if (!f) throw new Error('no compressor');
  const payload = await f(src);
  if (!impl.async) {
    const c = impl.compress;
    return { compressUs: c ? usPerCall(() => c(src)) : null, decompressUs: usPerCall(() => impl.decompress(payload, src.length)) };
  }
  const n = 2000;
  let compressUs: number | null = null;
  if (impl.compress) {
    const m = mark();
    for (let i = 0; i < n; i++) await impl.compress(src);
    compressUs = (since(m).cpu * 1e6) / n;
  }
  const m = mark();
  for (let i = 0; i < n; i++) await impl.decompress(payload, src.length);
  return { compressUs, decompressUs: (since(m).cpu * 1e6) / n };
}

// ---------------------------------------------------------------------------------------------
// The "does it pay" pre-check: the cost of trying on incompressible data, and two cheap checks.

/** Shannon entropy (bits per byte) of every `stride`-th byte. */
function sampledEntropy(b: Buffer, stride: number, hist: Uint32Array): number {
  hist.fill(0);
  let n = 0;
  for (let i = 0; i < b.length; i += stride) {
    hist[b[i] as number]!++;
    n++;
  }
  let h = 0;
  for (let s = 0; s < 256; s++) {
    const c = hist[s] as number;
    if (c !== 0) {
      const p = c / n;
      h -= p * Math.log2(p);
    }
  }
  return h;
}

/** CPU seconds one pass over the image data may take before a candidate is sampled. */
const SLOW_PASS_SEC = 8;
const ENTROPY_STRIDE = 16;
const ENTROPY_THRESHOLDS = [7.0, 7.5, 7.8, 7.9];
const SAMPLE_BYTES = 4096;

interface PrecheckRow {
  codec: string;
  check: string;
  /** Cost of the check alone per chunk. */
  checkUs: number;
  /** Random data: share of chunks the check skips, and µs per chunk with the check (check + trying what it lets through). */
  randomSkipped: number;
  randomUsPerChunk: number;
  randomUsPerChunkTryAlways: number;
  /** Image data: share of chunks skipped, share of the skip rule's savings lost, µs per chunk. */
  dataSkipped: number;
  dataSavingsLost: number;
  dataUsPerChunk: number;
  dataUsPerChunkTryAlways: number;
}

/** CPU µs per chunk of `f` over `chunks` (repeated until 50 ms of CPU time). */
function checkTime(chunks: readonly Buffer[], f: (b: Buffer) => unknown): number {
  let k = 0;
  return usPerCall(() => f(chunks[k++ % chunks.length] as Buffer));
}

function precheckStudy(codecId: string, impl: CodecImpl, data: DatasetFigures, random: DatasetFigures, ds: Datasets): PrecheckRow[] {
  const compress = impl.compress as (src: Buffer) => Bytes;
  const rows: PrecheckRow[] = [];
  const hist = new Uint32Array(256);
  const usData = data.compressUsPerChunk ?? 0;
  const usRandom = random.compressUsPerChunk ?? 0;
  const chunk = ds.data[0]?.length ?? 0;
  const limit = Math.floor((chunk * SKIP_NUM) / SKIP_DEN);
  const savings = (sizes: Int32Array, skip: (i: number) => boolean) => {
    let all = 0;
    let lost = 0;
    for (let i = 0; i < sizes.length; i++) {
      const s = sizes[i] as number;
      const saved = s <= limit ? chunk - s : 0;
      all += saved;
      if (skip(i)) lost += saved;
    }
    return all === 0 ? 0 : lost / all;
  };
  const entropyOf = (chunks: readonly Buffer[]) => Float64Array.from(chunks, (c) => sampledEntropy(c, ENTROPY_STRIDE, hist));
  const eData = entropyOf(ds.data);
  const eRandom = entropyOf(ds.random);
  const entropyUs = checkTime(ds.data, (c) => sampledEntropy(c, ENTROPY_STRIDE, hist));
  for (const th of ENTROPY_THRESHOLDS) {
    const skipData = (i: number) => (eData[i] as number) >= th;
    const skipRandom = (i: number) => (eRandom[i] as number) >= th;
    const share = (n: number, f: (i: number) => boolean) => Array.from({ length: n }, (_, i) => f(i)).filter(Boolean).length / Math.max(1, n);
    const rs = share(ds.random.length, skipRandom);
    const dsk = share(ds.data.length, skipData);
    rows.push({
      codec: codecId,
      check: `entropy of 1/${ENTROPY_STRIDE} bytes >= ${th.toFixed(1)}`,
      checkUs: entropyUs,
      randomSkipped: rs,
      randomUsPerChunk: entropyUs + (1 - rs) * usRandom,
      randomUsPerChunkTryAlways: usRandom,
      dataSkipped: dsk,
      dataSavingsLost: savings(data.sizes, skipData),
      dataUsPerChunk: entropyUs + (1 - dsk) * usData,
      dataUsPerChunkTryAlways: usData,
    });
  }
  // Compress a 4 KiB sample from the middle of the chunk; skip when it does not shrink below 7/8.
  const sampleOf = (c: Buffer) => c.subarray((c.length - SAMPLE_BYTES) >> 1, (c.length + SAMPLE_BYTES) >> 1);
  const sampleSkips = (c: Buffer) => compress(sampleOf(c)).length > (SAMPLE_BYTES * SKIP_NUM) / SKIP_DEN;
  const sData = ds.data.map(sampleSkips);
  const sRandom = ds.random.map(sampleSkips);
  const sampleUs = checkTime(ds.data, sampleSkips);
  const rs = sRandom.filter(Boolean).length / Math.max(1, sRandom.length);
  const dsk = sData.filter(Boolean).length / Math.max(1, sData.length);
  rows.push({
    codec: codecId,
    check: `compress a ${SAMPLE_BYTES / 1024} KiB sample, skip if > ${SKIP_NUM}/${SKIP_DEN}`,
    checkUs: sampleUs,
    randomSkipped: rs,
    randomUsPerChunk: sampleUs + (1 - rs) * usRandom,
    randomUsPerChunkTryAlways: usRandom,
    dataSkipped: dsk,
    dataSavingsLost: savings(data.sizes, (i) => sData[i] === true),
    dataUsPerChunk: sampleUs + (1 - dsk) * usData,
    dataUsPerChunkTryAlways: usData,
  });
  return rows;
}

// ---------------------------------------------------------------------------------------------
// The all-zero check.

interface ZeroCheckRow {
  method: string;
  zeroUsPerChunk: number;
  dataUsPerChunk: number;
  zeroGiBs: number;
}

function zeroChecks(ds: Datasets, chunk: number): ZeroCheckRow[] {
  const zeroRef = Buffer.alloc(chunk);
  const methods: { method: string; f: (b: Buffer) => boolean }[] = [
    { method: 'buf.equals(zero buffer) (memcmp)', f: (b) => b.equals(zeroRef) },
    {
      method: 'JS loop over BigUint64Array',
      f: (b) => {
        const w = new BigUint64Array(b.buffer, b.byteOffset, b.length >> 3);
        for (let i = 0; i < w.length; i++) if (w[i] !== 0n) return false;
        return true;
      },
    },
    {
      method: 'JS loop over Uint32Array',
      f: (b) => {
        const w = new Uint32Array(b.buffer, b.byteOffset, b.length >> 2);
        for (let i = 0; i < w.length; i++) if (w[i] !== 0) return false;
        return true;
      },
    },
  ];
  const rows: ZeroCheckRow[] = [];
  for (const m of methods) {
    checkTime(ds.zero, m.f); // warm-up
    const z = median([0, 1, 2].map(() => checkTime(ds.zero, m.f)));
    const d = median([0, 1, 2].map(() => checkTime(ds.data, m.f)));
    rows.push({ method: m.method, zeroUsPerChunk: z, dataUsPerChunk: d, zeroGiBs: chunk / (z * 1e-6) / 2 ** 30 });
  }
  return rows;
}

// ---------------------------------------------------------------------------------------------

interface CodecResult {
  id: string;
  family: string;
  level: number | null;
  kind: string;
  package: PackageFacts | null;
  available: boolean;
  error: string | null;
  /** 1: every chunk measured; k: every k-th chunk (a candidate too slow for the whole data set). */
  sampleStride: number;
  callCost: { compressUs: number | null; decompressUs: number } | null;
  datasets: Record<string, Omit<DatasetFigures, 'sizes'>>;
}

interface HashResult {
  id: string;
  keyed: boolean;
  kind: string;
  function: string;
  package: PackageFacts | null;
  available: boolean;
  error: string | null;
  /** 1: every chunk timed; k: every k-th chunk (too slow for all of them). */
  sampleStride: number;
  mibPerSec: number | null;
  usPerChunk: number | null;
  callUs: number | null;
  spread: number | null;
  /** Equal output to the other implementations of the same function, on the same key and data. */
  crossCheck: 'agrees' | 'differs' | 'alone' | null;
}

function pct(x: number): string {
  return `${(x * 100).toFixed(1)}%`;
}

/**
 * Load, warm up and time every codec candidate over the three data sets (interleaved passes),
 * then derive the figures and the pre-check study. A candidate that fails is reported, not fatal.
 */
async function measureCodecs(ds: Datasets, loader: Loader, opts: Options): Promise<{ results: Map<string, CodecResult>; precheck: PrecheckRow[] }> {
  const chunk = opts.chunk;
  const sets: [string, Buffer[]][] = [
    ['data', ds.data],
    ['random', ds.random],
    ['zero', ds.zero],
  ];
  // Load codecs.
  const codecSpecs = CODECS.filter((c) => !opts.codecs || opts.codecs.includes(c.id));
  const loaded: { spec: CodecSpec; impl: CodecImpl; stride: number }[] = [];
  const results = new Map<string, CodecResult>();
  for (const spec of codecSpecs) {
    const r: CodecResult = { id: spec.id, family: spec.family, level: spec.level, kind: spec.kind, package: null, available: false, error: null, sampleStride: 1, callCost: null, datasets: {} };
    results.set(spec.id, r);
    try {
      const impl = await spec.load(loader, chunk);
      r.package = impl.pkg;
      // Warm up (JIT, wasm tiers, allocator) and check the round trip before timing anything.
      const warm = ds.data.slice(0, 64).concat(ds.random.slice(0, 8), ds.zero.slice(0, 8));
      const out: Bytes[] = [];
      await compressAll(impl, warm, out);
      await verifyRoundTrip(impl, warm, out);
      // A very slow candidate is measured on every k-th chunk, so that one pass over the data
      // takes about SLOW_PASS_SEC; its figures say so.
      const probe = ds.data.slice(0, 32);
      const probeOut: Bytes[] = [];
      const pc = await compressAll(impl, probe, probeOut);
      const pd = await decompressAll(impl, probeOut, chunk);
      const estimate = ((pc.cpu + pd.cpu) / Math.max(1, probe.length)) * ds.data.length;
      const stride = Math.max(1, Math.ceil(estimate / SLOW_PASS_SEC));
      r.available = true;
      r.sampleStride = stride;
      loaded.push({ spec, impl, stride });
    } catch (e) {
      r.error = (e as Error).message.split('\n')[0] ?? 'error';
      console.error(`${spec.id}: ${r.error}`);
    }
  }

  // Timed passes, interleaved: repeat → codec → data set.
  const times = new Map<string, { c: Elapsed[]; d: Elapsed[] }>();
  const sizes = new Map<string, Int32Array>();
  // Pass 0 is a warm-up (first-touch page faults, JIT and wasm tiers, the codec's own tables),
  // checks the round trip and records the sizes; passes 1..repeats are timed.
  for (let rep = 0; rep <= opts.repeats; rep++) {
    for (const entry of [...loaded]) {
      const { spec, impl, stride } = entry;
      let failedSet = '';
      process.stderr.write(`\r${rep === 0 ? 'warm-up' : `pass ${rep}/${opts.repeats}`}: ${spec.id.padEnd(20)}`);
      try {
        for (const [name, all] of sets) {
          failedSet = name;
          const key = `${spec.id}/${name}`;
          const chunks = stride === 1 ? all : all.filter((_, i) => i % stride === 0);
          const out: Bytes[] = new Array<Bytes>(chunks.length);
          const c = await compressAll(impl, chunks, out);
          if (rep === 0) {
            await verifyRoundTrip(impl, chunks, out);
            sizes.set(key, Int32Array.from(out, (b) => b.length));
          }
          const d = await decompressAll(impl, out, chunk);
          if (rep === 0) continue;
          const t = times.get(key) ?? { c: [], d: [] };
          t.c.push(c);
          t.d.push(d);
          times.set(key, t);
        }
      } catch (e) {
        // A candidate that fails on real data is a finding, not the end of the bench.
        const r = results.get(spec.id) as CodecResult;
        r.available = false;
        r.error = `failed on data set "${failedSet}", pass ${rep}: ${(e as Error).message.split('\n')[0] ?? 'error'}`;
        console.error(`\n${spec.id}: ${r.error}`);
        loaded.splice(loaded.indexOf(entry), 1);
      }
    }
  }
  process.stderr.write('\n');

  const figures = new Map<string, DatasetFigures>();
  for (const { spec, impl, stride } of loaded) {
    const r = results.get(spec.id) as CodecResult;
    r.callCost = await callCost(impl);
    for (const [name, all] of sets) {
      const chunks = stride === 1 ? all : all.filter((_, i) => i % stride === 0);
      const key = `${spec.id}/${name}`;
      const sz = sizes.get(key) as Int32Array;
      const t = times.get(key) as { c: Elapsed[]; d: Elapsed[] };
      const inBytes = chunks.length * chunk;
      let outBytes = 0;
      let keptBytes = 0;
      let skipped = 0;
      const limit = Math.floor((chunk * SKIP_NUM) / SKIP_DEN);
      for (const s of sz) {
        outBytes += s;
        if (s > limit) {
          skipped++;
          keptBytes += chunk;
        } else keptBytes += s;
      }
      // Best of the timed passes: the one least disturbed by whatever else runs on the machine.
      const cSec = impl.compress ? Math.min(...t.c.map((e) => e.cpu)) : null;
      const dSec = Math.min(...t.d.map((e) => e.cpu));
      const f: DatasetFigures = {
        chunks: chunks.length,
        inBytes,
        outBytes,
        keptBytes,
        skippedChunks: skipped,
        ratio: inBytes / outBytes,
        ratioWithSkip: inBytes / keptBytes,
        compressMiBs: cSec === null ? null : inBytes / MiB / cSec,
        decompressMiBs: inBytes / MiB / dSec,
        compressUsPerChunk: cSec === null ? null : (cSec * 1e6) / chunks.length,
        decompressUsPerChunk: (dSec * 1e6) / chunks.length,
        compressSpread: impl.compress ? spread(t.c.map((e) => e.cpu)) : null,
        wallOverCpu: impl.compress ? median(t.c.map((e) => e.wall)) / median(t.c.map((e) => e.cpu)) : null,
        sizes: sz,
      };
      figures.set(key, f);
      const { sizes: _omit, ...json } = f;
      r.datasets[name] = json;
    }
  }

  // Pre-check study, for the sync compressors.
  const precheck: PrecheckRow[] = [];
  for (const { spec, impl, stride } of loaded) {
    if (impl.async || !impl.compress || stride !== 1) continue;
    precheck.push(...precheckStudy(spec.id, impl, figures.get(`${spec.id}/data`) as DatasetFigures, figures.get(`${spec.id}/random`) as DatasetFigures, ds));
  }

  return { results, precheck };
}

/** Time every hash candidate over the image's data chunks; cross-check equal functions. */
async function measureHashes(ds: Datasets, loader: Loader, opts: Options): Promise<HashResult[]> {
  const chunk = opts.chunk;
  const key = randomBytes(32);
  const hashSpecs = HASHES.filter((h) => !opts.hashes || opts.hashes.includes(h.id));
  const hashResults: HashResult[] = [];
  const hashLoaded: { spec: HashSpec; sign: (d: Buffer) => Bytes; res: HashResult; chunks: Buffer[] }[] = [];
  for (const spec of hashSpecs) {
    const res: HashResult = { id: spec.id, keyed: spec.keyed, kind: spec.kind, function: spec.function, package: null, available: false, error: null, sampleStride: 1, mibPerSec: null, usPerChunk: null, callUs: null, spread: null, crossCheck: null };
    hashResults.push(res);
    try {
      const { sign, pkg } = await spec.load(loader, key);
      res.package = pkg;
      const m = mark();
      for (const c of ds.data.slice(0, 64)) sign(c);
      // As for codecs: a very slow hash is timed on every k-th chunk.
      const estimate = (since(m).cpu / Math.min(64, Math.max(1, ds.data.length))) * ds.data.length;
      res.sampleStride = Math.max(1, Math.ceil(estimate / SLOW_PASS_SEC));
      const chunks = res.sampleStride === 1 ? ds.data : ds.data.filter((_, i) => i % res.sampleStride === 0);
      res.available = true;
      hashLoaded.push({ spec, sign, res, chunks });
    } catch (e) {
      res.error = (e as Error).message.split('\n')[0] ?? 'error';
      console.error(`${spec.id}: ${res.error}`);
    }
  }
  const hashTimes = new Map<string, number[]>();
  for (let rep = 0; rep <= opts.repeats; rep++) {
    for (const h of hashLoaded) {
      process.stderr.write(`\r${rep === 0 ? 'warm-up' : `pass ${rep}/${opts.repeats}`}: ${h.spec.id.padEnd(24)}`);
      const m = mark();
      for (const c of h.chunks) h.sign(c);
      if (rep > 0) hashTimes.set(h.spec.id, [...(hashTimes.get(h.spec.id) ?? []), since(m).cpu]);
    }
  }
  process.stderr.write('\n');
  const probe = ds.data.slice(0, 16);
  for (const h of hashLoaded) {
    const s = Math.min(...(hashTimes.get(h.spec.id) ?? []));
    h.res.mibPerSec = (h.chunks.length * chunk) / MiB / s;
    h.res.usPerChunk = (s * 1e6) / h.chunks.length;
    h.res.spread = spread(hashTimes.get(h.spec.id) ?? []);
    const tiny = Buffer.from('spillway-chunk-0');
    h.res.callUs = usPerCall(() => h.sign(tiny));
    const peers = hashLoaded.filter((o) => o !== h && o.spec.function === h.spec.function);
    h.res.crossCheck = peers.length === 0 ? 'alone' : peers.every((o) => probe.every((c) => Buffer.from(o.sign(c)).equals(Buffer.from(h.sign(c))))) ? 'agrees' : 'differs';
  }
  return hashResults;
}

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  if (!opts) {
    console.log(USAGE);
    return;
  }
  installCleanupHandlers();
  const loadAtStart = os.loadavg().map((l) => Math.round(l * 100) / 100);
  const loader = new Loader(opts.modules);
  const tmp = await makeTempDir('spw-codecs-');
  const chunk = opts.chunk;

  // Data.
  let imageInfo: Record<string, unknown>;
  let imagePath: string;
  if (opts.image) {
    const raw = await rawImage(opts.image, tmp.dir);
    imagePath = raw.path;
    imageInfo = { source: opts.image, format: raw.format, bytes: (await stat(raw.path)).size };
  } else {
    console.error(`building an ext4 image from ${formatSize(opts.fsBytes)} of ${SOURCE_ROOTS.join(', ')} …`);
    const built = await buildExt4Image(tmp.dir, opts.fsBytes);
    const mix = Object.entries(built.sources).map(([root, v]) => `${root} ${v.files} files ${formatSize(v.bytes)}`);
    console.error(`image: ${formatSize(built.imageBytes)} ext4 holding ${mix.join(', ')}`);
    imagePath = built.path;
    imageInfo = { source: 'built', format: 'raw ext4', ...built, path: undefined };
  }
  const fromImage = await readChunks(imagePath, chunk, opts.maxDataBytes);
  const randomFile = path.join(tmp.dir, 'random.raw');
  await writeRandomFile(randomFile, opts.randomBytes);
  const ds: Datasets = {
    ...fromImage,
    random: await readAll(randomFile, chunk),
    zero: Array.from({ length: Math.max(64, Math.floor((16 * MiB) / chunk)) }, () => Buffer.alloc(chunk)),
  };
  await tmp.remove();
  console.error(
    `image: ${fromImage.imageChunks} chunks of ${formatSize(chunk)}, ${fromImage.imageZeroChunks} zero, ${fromImage.imageDataChunks} data (${ds.data.length} used); random: ${ds.random.length}; zero: ${ds.zero.length}`,
  );
  const { results, precheck } = await measureCodecs(ds, loader, opts);
  const zero = zeroChecks(ds, chunk);
  const hashResults = await measureHashes(ds, loader, opts);

  // ------------------------------------------------------------------------------------------
  // Report.
  const machine = await machineInfo(REPO_ROOT, { 'mkfs.ext4': ['mkfs.ext4', '-V'], 'qemu-img': ['qemu-img', '--version'] });
  const pkgLabel = (p: PackageFacts | null) => (p ? `${p.name}@${p.version}` : 'node:builtin');
  const dataMiB = (ds.data.length * chunk) / MiB;

  const cCols: Column[] = [
    { header: 'codec' },
    { header: 'package' },
    { header: 'kind' },
    { header: 'chunks', right: true },
    { header: 'ratio', right: true },
    { header: `ratio ${SKIP_NUM}/${SKIP_DEN}`, right: true },
    { header: 'raw', right: true },
    { header: 'comp MiB/s', right: true },
    { header: 'dec MiB/s', right: true },
    { header: 'comp µs', right: true },
    { header: 'dec µs', right: true },
    { header: 'rnd comp µs', right: true },
    { header: 'zero comp µs', right: true },
    { header: 'call µs c/d', right: true },
  ];
  const cRows: string[][] = [];
  for (const r of results.values()) {
    const d = r.datasets['data'];
    const rnd = r.datasets['random'];
    const z = r.datasets['zero'];
    if (!r.available || !d || !rnd || !z) {
      cRows.push([r.id, r.package ? pkgLabel(r.package) : (CODECS.find((s) => s.id === r.id)?.packageSpec ?? '-'), r.kind, `not measured: ${r.error ?? '?'}`]);
      continue;
    }
    cRows.push([
      r.id,
      pkgLabel(r.package),
      r.kind,
      r.sampleStride === 1 ? 'all' : `1/${r.sampleStride}`,
      fmt(d.ratio),
      fmt(d.ratioWithSkip),
      pct(d.skippedChunks / d.chunks),
      fmt(d.compressMiBs, 0),
      fmt(d.decompressMiBs, 0),
      fmt(d.compressUsPerChunk, 1),
      fmt(d.decompressUsPerChunk, 1),
      fmt(rnd.compressUsPerChunk, 1),
      fmt(z.compressUsPerChunk, 1),
      `${fmt(r.callCost?.compressUs, 2)}/${fmt(r.callCost?.decompressUs, 2)}`,
    ]);
  }
  const imgRatioNote = `image: ${fromImage.imageDataChunks} data + ${fromImage.imageZeroChunks} zero chunks; the zero ones are sent as a marker, so the image's ratio is the data ratio × ${fmt(fromImage.imageChunks / fromImage.imageDataChunks)}`;
  console.log(`\nbench/codecs: compression of ${ds.data.length} non-zero ${formatSize(chunk)} chunks of the image (${fmt(dataMiB, 0)} MiB), one core, CPU time, best of ${opts.repeats}`);
  console.log('ratio = in/out over all chunks; ratio 7/8 = what the link sends with the skip rule; raw = share of chunks sent raw;');
  console.log('µs per chunk; rnd/zero = compress µs for a random / an all-zero chunk; call = fixed cost of one call (16-byte input);');
  console.log(`chunks = all, or 1/k for a candidate too slow to measure on every chunk (more than ${SLOW_PASS_SEC} s of CPU per pass)`);
  console.log(formatTable(cCols, cRows));
  console.log(`- ${imgRatioNote}`);

  // Link needs.
  const lCols: Column[] = [{ header: 'codec' }, { header: `ratio ${SKIP_NUM}/${SKIP_DEN}`, right: true }];
  for (const l of LINKS) lCols.push({ header: `${l.name}: input MiB/s`, right: true }, { header: 'chunks/s', right: true }, { header: 'comp cores', right: true }, { header: 'dec cores', right: true });
  const lRows: string[][] = [];
  const linkNeeds: Record<string, unknown>[] = [];
  for (const r of results.values()) {
    const d = r.datasets['data'];
    if (!r.available || !d || d.compressMiBs === null) continue;
    const row = [r.id, fmt(d.ratioWithSkip)];
    const perLink: Record<string, unknown> = {};
    for (const l of LINKS) {
      const input = l.mibPerSec * d.ratioWithSkip;
      const compCores = input / d.compressMiBs;
      const decCores = input / d.decompressMiBs;
      row.push(fmt(input, 0), fmt((input * MiB) / chunk, 0), fmt(compCores, 2), fmt(decCores, 2));
      perLink[l.name] = { inputMiBs: input, chunksPerSec: (input * MiB) / chunk, compressCores: compCores, decompressCores: decCores };
    }
    lRows.push(row);
    linkNeeds.push({ codec: r.id, ratioWithSkip: d.ratioWithSkip, links: perLink });
  }
  const rawNeeds = LINKS.map((l) => `${l.name}: ${fmt((l.mibPerSec * MiB) / chunk, 0)} chunks/s raw`).join(', ');
  console.log(`\nwhat a saturated link needs per core on this image's data (input = uncompressed MiB/s the link then carries; ${rawNeeds})`);
  console.log(formatTable(lCols, lRows));

  if (precheck.length > 0) {
    console.log(`\nskip when it does not pay: trying every chunk vs. a pre-check (random data / image data), µs per chunk`);
    const pCols: Column[] = [
      { header: 'codec' },
      { header: 'pre-check' },
      { header: 'check µs', right: true },
      { header: 'rnd skipped', right: true },
      { header: 'rnd µs (try all)', right: true },
      { header: 'data skipped', right: true },
      { header: 'savings lost', right: true },
      { header: 'data µs (try all)', right: true },
    ];
    console.log(
      formatTable(
        pCols,
        precheck.map((p) => [
          p.codec,
          p.check,
          fmt(p.checkUs, 1),
          pct(p.randomSkipped),
          `${fmt(p.randomUsPerChunk, 1)} (${fmt(p.randomUsPerChunkTryAlways, 1)})`,
          pct(p.dataSkipped),
          pct(p.dataSavingsLost),
          `${fmt(p.dataUsPerChunk, 1)} (${fmt(p.dataUsPerChunkTryAlways, 1)})`,
        ]),
      ),
    );
  }

  console.log(`\nall-zero check, µs per ${formatSize(chunk)} chunk`);
  console.log(
    formatTable(
      [{ header: 'method' }, { header: 'zero chunk µs', right: true }, { header: 'GiB/s', right: true }, { header: 'data chunk µs', right: true }],
      zero.map((z) => [z.method, fmt(z.zeroUsPerChunk, 2), fmt(z.zeroGiBs, 1), fmt(z.dataUsPerChunk, 3)]),
    ),
  );

  console.log(`\nchunk signatures over the same ${ds.data.length} chunks, one core, CPU time, best of ${opts.repeats}`);
  console.log(
    formatTable(
      [
        { header: 'hash' },
        { header: 'package' },
        { header: 'kind' },
        { header: 'keyed' },
        { header: 'MiB/s', right: true },
        { header: 'µs/chunk', right: true },
        { header: 'call µs', right: true },
        { header: 'cores @1G raw', right: true },
        { header: 'cross-check' },
      ],
      hashResults.map((h) =>
        h.available
          ? [h.id, pkgLabel(h.package), h.kind, h.keyed ? 'yes' : 'NO', `${fmt(h.mibPerSec, 0)}${h.sampleStride > 1 ? ` (1/${h.sampleStride})` : ''}`, fmt(h.usPerChunk, 1), fmt(h.callUs, 2), fmt(h.mibPerSec ? LINKS[1].mibPerSec / h.mibPerSec : null, 2), h.crossCheck ?? '-']
          : [h.id, h.package ? pkgLabel(h.package) : (HASHES.find((s) => s.id === h.id)?.packageSpec ?? '-'), h.kind, h.keyed ? 'yes' : 'NO', `not measured: ${h.error ?? '?'}`],
      ),
    ),
  );
  console.log('- cores @1G raw: cores to sign what an uncompressed 1 Gbit/s link carries; multiply by the compression ratio for a compressed link');

  await writeJsonResult(opts.out, {
    bench: 'codecs',
    machine,
    config: { chunk, repeats: opts.repeats, fsBytes: opts.fsBytes, randomBytes: opts.randomBytes, maxDataBytes: opts.maxDataBytes, modules: opts.modules, skipRule: `${SKIP_NUM}/${SKIP_DEN}` },
    image: { ...imageInfo, chunks: fromImage.imageChunks, zeroChunks: fromImage.imageZeroChunks, dataChunks: fromImage.imageDataChunks, dataChunksUsed: ds.data.length },
    datasets: { data: ds.data.length, random: ds.random.length, zero: ds.zero.length },
    codecs: [...results.values()],
    linkNeeds,
    precheck,
    zeroCheck: zero,
    hashes: hashResults,
    loadAverageAtStart: loadAtStart,
    loadAverageAtEnd: os.loadavg().map((l) => Math.round(l * 100) / 100),
  });
  console.log(`\nresults: ${path.relative(process.cwd(), opts.out) || opts.out}`);
}

runBench('bench/codecs', main);
