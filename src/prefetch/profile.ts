// Boot/run profiles (docs/profiles.md): the order in which a run of a guest first touches the
// chunks of a streamed volume, recorded at the remote-role edge and stored by name, so that the
// next run of the same base (the same `family`) can be prefetched in that order (planner.ts).
//
//   - ProfileRecorder sits on the read path: `touch(offset, length)` for every read that reaches
//     the base image. It keeps two bitsets (chunks seen, 4 KiB granules read), paged so memory
//     follows what the run touched rather than the volume's size, and the list of first touches.
//     A touch of chunks already seen costs a few bit tests and allocates nothing.
//   - ProfileStore keeps profiles as JSON files (DIR/NAME.json, mode 0600, replaced atomically
//     and durably) and validates every file it loads: a file is a profile or a ProfileError
//     naming the file and what is wrong, never something half-checked.
//
// Coalescing: a chunk seen for the first time extends the last entry when it directly follows
// that entry's last chunk and its first touch is at most `mergeWindowMs` (default 10 ms) after
// the entry's `t`. So one read that spans several new chunks is one entry, and a sequential scan
// is one entry per 10 ms rather than one per chunk; a chunk's first-touch time is then known to
// within 10 ms, far below what matters for prefetch order.

import { mkdir, open, readdir, unlink } from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';

import { fsyncDir, replaceFileDurably } from '../util/durable.js';

export class ProfileError extends Error {
  readonly code = 'SPW_ERR_PROFILE';
  constructor(message: string) {
    super(message);
    this.name = 'ProfileError';
  }
}

export interface ProfileEntry {
  /** ms since the recording started, of the first touch of `start`. */
  t: number;
  /** first chunk index. */
  start: number;
  /** consecutive chunks first touched together (≥ 1). */
  count: number;
}

export interface Profile {
  version: 1;
  name: string;
  volume: string;
  family: string;
  chunkSize: number;
  size: number;
  /** ISO 8601, when the recording started. */
  createdAt: string;
  durationMs: number;
  /** distinct chunks touched (the sum of the entries' counts). */
  chunks: number;
  /** distinct bytes the run read, at 4 KiB granularity, capped to the volume size. */
  uniqueBytes: number;
  /** reads that reached the base image. */
  reads: number;
  /** in first-touch order; no chunk appears twice. */
  entries: ProfileEntry[];
  /** set when the entry cap was reached: entries are the first part of the run only. */
  truncated?: boolean;
}

export interface ProfileSummary {
  name: string;
  volume: string;
  family: string;
  createdAt: string;
  durationMs: number;
  chunks: number;
  uniqueBytes: number;
}

/** Names of profiles, volumes and families: the rule of volume names in the edge config. */
export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
const NAME_RULE = 'use letters, digits, ".", "_" and "-" (at most 63, starting with a letter or digit)';
/** Granularity of `uniqueBytes`. */
export const GRANULE = 4096;
/** Default cap on entries per profile (≈ 24 MiB while recording, ≈ 50 MiB of JSON). */
export const MAX_ENTRIES = 1_000_000;
/** Default coalescing window, see the top of this file. */
export const MERGE_WINDOW_MS = 10;
/** A profile file larger than this is refused before it is read. */
export const MAX_FILE_BYTES = 128 * 1024 * 1024;

export function checkName(what: string, name: string): void {
  if (!NAME_RE.test(name)) throw new ProfileError(`${what} ${JSON.stringify(name)} is not a valid name: ${NAME_RULE}`);
}

function validChunkSize(cs: number): boolean {
  return Number.isInteger(cs) && cs >= 4096 && cs <= 1024 * 1024 && (cs & (cs - 1)) === 0;
}

export function summarize(p: Profile): ProfileSummary {
  return { name: p.name, volume: p.volume, family: p.family, createdAt: p.createdAt, durationMs: p.durationMs, chunks: p.chunks, uniqueBytes: p.uniqueBytes };
}

// ---------------------------------------------------------------------------------------------
// Paged bitset: pages of 2^19 bits (64 KiB) allocated on first set, so a 16 TiB volume at 4 KiB
// granules costs memory only where it was read.

const PAGE_BITS = 1 << 19;
const PAGE_WORDS = PAGE_BITS >>> 5;

function popcount32(x: number): number {
  x = x - ((x >>> 1) & 0x55555555);
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return (Math.imul((x + (x >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24) & 0xff;
}

export class PagedBitset {
  private readonly pages: Array<Uint32Array | undefined>;
  constructor(readonly length: number) {
    this.pages = new Array<Uint32Array | undefined>(Math.ceil(length / PAGE_BITS));
  }

  has(i: number): boolean {
    const p = Math.floor(i / PAGE_BITS);
    const page = this.pages[p];
    if (!page) return false;
    const b = i - p * PAGE_BITS;
    return (page[b >>> 5]! & (1 << (b & 31))) !== 0;
  }

  /** Set bit i; true when it was clear. */
  add(i: number): boolean {
    const p = Math.floor(i / PAGE_BITS);
    const page = (this.pages[p] ??= new Uint32Array(PAGE_WORDS));
    const b = i - p * PAGE_BITS;
    const w = b >>> 5;
    const bit = 1 << (b & 31);
    const old = page[w]!;
    if ((old & bit) !== 0) return false;
    page[w] = old | bit;
    return true;
  }

  /** Set bits [from, to); returns how many were clear before. */
  setRange(from: number, to: number): number {
    let fresh = 0;
    let i = from;
    while (i < to) {
      const p = Math.floor(i / PAGE_BITS);
      const base = p * PAGE_BITS;
      const page = (this.pages[p] ??= new Uint32Array(PAGE_WORDS));
      const end = Math.min(to, base + PAGE_BITS) - base;
      let b = i - base;
      while (b < end) {
        const w = b >>> 5;
        const lo = b & 31;
        const hi = Math.min(32, end - (w << 5));
        const n = hi - lo;
        const mask = n === 32 ? 0xffffffff : (((1 << n) - 1) << lo) >>> 0;
        const old = page[w]!;
        const add = (mask & ~old) >>> 0;
        if (add !== 0) {
          page[w] = old | add;
          fresh += popcount32(add);
        }
        b = (w + 1) << 5;
      }
      i = base + end;
    }
    return fresh;
  }
}

// ---------------------------------------------------------------------------------------------

export interface RecorderOptions {
  name: string;
  volume: string;
  family: string;
  chunkSize: number;
  /** volume size in bytes. */
  size: number;
  /** wall clock in ms since the epoch; default performance.timeOrigin + performance.now()
   *  (monotonic). `t`, `durationMs` and `createdAt` come from it. */
  now?: () => number;
  /** cap on entries; when reached, no further chunks are recorded and the profile is marked
   *  truncated (reads and uniqueBytes keep counting). Default MAX_ENTRIES. */
  maxEntries?: number;
  /** coalescing window (ms), default MERGE_WINDOW_MS. */
  mergeWindowMs?: number;
}

const defaultNow = () => performance.timeOrigin + performance.now();

export class ProfileRecorder {
  readonly name: string;
  readonly volume: string;
  readonly family: string;
  readonly chunkSize: number;
  readonly size: number;
  /** clock value (see `now`) when recording started. */
  readonly startedAt: number;
  /** clock value of the last read; undefined until the first one (for idle detection). */
  lastTouchAt: number | undefined;
  chunks = 0;
  uniqueBytes = 0;
  reads = 0;
  truncated = false;

  private readonly now: () => number;
  private readonly maxEntries: number;
  private readonly mergeWindowMs: number;
  private readonly chunkCount: number;
  private readonly granules: number;
  private readonly seenChunks: PagedBitset;
  private readonly readGranules: PagedBitset;
  private t = new Float64Array(1024);
  private start = new Float64Array(1024);
  private count = new Float64Array(1024);
  private n = 0;
  private lastT = 0;

  constructor(o: RecorderOptions) {
    checkName('profile', o.name);
    checkName('volume', o.volume);
    checkName('family', o.family);
    if (!validChunkSize(o.chunkSize)) throw new RangeError(`chunkSize ${o.chunkSize} must be a power of two between 4 KiB and 1 MiB`);
    if (!Number.isSafeInteger(o.size) || o.size <= 0) throw new RangeError(`size ${o.size} must be a positive integer`);
    this.name = o.name;
    this.volume = o.volume;
    this.family = o.family;
    this.chunkSize = o.chunkSize;
    this.size = o.size;
    this.now = o.now ?? defaultNow;
    this.maxEntries = o.maxEntries ?? MAX_ENTRIES;
    this.mergeWindowMs = o.mergeWindowMs ?? MERGE_WINDOW_MS;
    if (!(this.maxEntries >= 1)) throw new RangeError('maxEntries must be at least 1');
    this.chunkCount = Math.ceil(o.size / o.chunkSize);
    this.granules = Math.ceil(o.size / GRANULE);
    this.seenChunks = new PagedBitset(this.chunkCount);
    this.readGranules = new PagedBitset(this.granules);
    this.startedAt = this.now();
  }

  /** Entries recorded so far. */
  get entryCount(): number {
    return this.n;
  }

  /** A read of [offset, offset+length) reached the base image. Clipped to the volume. */
  touch(offset: number, length: number): void {
    const from = Math.max(0, offset);
    const to = Math.min(this.size, offset + length);
    if (!(to > from)) return;
    const at = this.now();
    this.reads++;
    this.lastTouchAt = at;

    // distinct bytes, 4 KiB at a time; the last granule may be short
    const g0 = Math.floor(from / GRANULE);
    const g1 = Math.floor((to - 1) / GRANULE) + 1;
    const lastShort = g1 === this.granules && this.size % GRANULE !== 0 && !this.readGranules.has(g1 - 1);
    const fresh = this.readGranules.setRange(g0, g1);
    if (fresh > 0) this.uniqueBytes += fresh * GRANULE - (lastShort ? GRANULE - (this.size % GRANULE) : 0);

    if (this.truncated) return;
    const c0 = Math.floor(from / this.chunkSize);
    const c1 = Math.floor((to - 1) / this.chunkSize);
    // non-decreasing even if the clock steps back
    const t = Math.max(this.lastT, Math.floor(at - this.startedAt));
    for (let c = c0; c <= c1; c++) {
      if (this.seenChunks.has(c)) continue;
      const last = this.n - 1;
      if (last >= 0 && this.start[last]! + this.count[last]! === c && t - this.t[last]! <= this.mergeWindowMs) {
        this.count[last] = this.count[last]! + 1;
      } else {
        if (this.n >= this.maxEntries) {
          this.truncated = true;
          return;
        }
        if (this.n === this.t.length) this.grow();
        this.t[this.n] = t;
        this.start[this.n] = c;
        this.count[this.n] = 1;
        this.n++;
        this.lastT = t;
      }
      this.seenChunks.add(c);
      this.chunks++;
    }
  }

  private grow(): void {
    const cap = Math.min(this.t.length * 2, Math.max(this.maxEntries, 1024));
    const re = (a: Float64Array) => {
      const b = new Float64Array(cap);
      b.set(a);
      return b;
    };
    this.t = re(this.t);
    this.start = re(this.start);
    this.count = re(this.count);
  }

  /** The profile so far (entries in first-touch order). `durationMs` runs to `at`. */
  toProfile(at: number = this.now()): Profile {
    const entries: ProfileEntry[] = new Array<ProfileEntry>(this.n);
    for (let i = 0; i < this.n; i++) entries[i] = { t: this.t[i]!, start: this.start[i]!, count: this.count[i]! };
    const p: Profile = {
      version: 1,
      name: this.name,
      volume: this.volume,
      family: this.family,
      chunkSize: this.chunkSize,
      size: this.size,
      createdAt: new Date(this.startedAt).toISOString(),
      durationMs: Math.max(this.lastT, Math.floor(at - this.startedAt)),
      chunks: this.chunks,
      uniqueBytes: this.uniqueBytes,
      reads: this.reads,
      entries,
    };
    if (this.truncated) p.truncated = true;
    return p;
  }
}

// ---------------------------------------------------------------------------------------------
// Validation: the schema checks shapes and types, checkProfile the relations between fields.

const nat = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);
const nameField = z.string().regex(NAME_RE, NAME_RULE);

const profileSchema = z.strictObject({
  version: z.literal(1),
  name: nameField,
  volume: nameField,
  family: nameField,
  chunkSize: z.number().refine(validChunkSize, 'must be a power of two between 4096 and 1048576'),
  size: nat.min(1),
  createdAt: z.iso.datetime({ offset: true }),
  durationMs: z.number().nonnegative().finite(),
  chunks: nat,
  uniqueBytes: nat,
  reads: nat,
  entries: z.array(z.strictObject({ t: z.number().nonnegative().finite(), start: nat, count: nat.min(1) })).max(MAX_ENTRIES),
  truncated: z.boolean().optional(),
});

/** Relations the schema cannot say; returns what is wrong, or null. `p` has the schema's shape. */
function checkProfile(p: Profile): string | null {
  const chunkCount = Math.ceil(p.size / p.chunkSize);
  const seen = new PagedBitset(chunkCount);
  let prevT = 0;
  let total = 0;
  for (const [i, e] of p.entries.entries()) {
    if (e.t < prevT) return `entries.${i}.t: ${e.t} is before the previous entry's ${prevT} (entries are in first-touch order)`;
    if (e.t > p.durationMs) return `entries.${i}.t: ${e.t} is after the end of the recording (durationMs ${p.durationMs})`;
    if (e.start + e.count > chunkCount) return `entries.${i}: chunks ${e.start}..${e.start + e.count - 1} go past the last chunk (${chunkCount - 1}) of a ${p.size}-byte volume in ${p.chunkSize}-byte chunks`;
    if (seen.setRange(e.start, e.start + e.count) !== e.count) return `entries.${i}: chunks ${e.start}..${e.start + e.count - 1} overlap an earlier entry (each chunk is listed once, at its first touch)`;
    prevT = e.t;
    total += e.count;
  }
  if (p.chunks !== total) return `chunks: ${p.chunks}, but the entries list ${total}`;
  if (p.uniqueBytes > p.size) return `uniqueBytes: ${p.uniqueBytes} is more than the volume size ${p.size}`;
  if (!p.truncated && p.uniqueBytes > p.chunks * p.chunkSize) return `uniqueBytes: ${p.uniqueBytes} is more than the ${p.chunks} chunks touched hold`;
  if (p.chunks > 0 && p.reads === 0) return `reads: 0, but ${p.chunks} chunks were touched`;
  return null;
}

/** Validate an untrusted value as a profile; `source` names it in the message. */
export function parseProfile(raw: unknown, source: string): Profile {
  const r = profileSchema.safeParse(raw);
  if (!r.success) {
    const lines = r.error.issues.slice(0, 10).map((i) => `  ${i.path.join('.') || '(top)'}: ${i.message}`);
    const more = r.error.issues.length > 10 ? `\n  … and ${r.error.issues.length - 10} more` : '';
    throw new ProfileError(`${source} is not a valid profile:\n${lines.join('\n')}${more}\n(see docs/profiles.md)`);
  }
  const p = r.data as Profile;
  const wrong = checkProfile(p);
  if (wrong) throw new ProfileError(`${source} is not a valid profile:\n  ${wrong}\n(see docs/profiles.md)`);
  return p;
}

// ---------------------------------------------------------------------------------------------

export class ProfileStore {
  constructor(readonly dir: string) {}

  fileOf(name: string): string {
    checkName('profile', name);
    return path.join(this.dir, `${name}.json`);
  }

  /** Validate and write DIR/NAME.json (0600): after a crash the old file or the new one. */
  async save(profile: Profile): Promise<void> {
    const file = this.fileOf(profile.name);
    const p = parseProfile(profile, `profile "${profile.name}"`);
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    await replaceFileDurably(file, Buffer.from(JSON.stringify(p)), 0o600);
  }

  async load(name: string): Promise<Profile> {
    const file = this.fileOf(name);
    let text: string;
    try {
      const fh = await open(file, 'r');
      try {
        const { size } = await fh.stat();
        if (size > MAX_FILE_BYTES) throw new ProfileError(`${file} is not a valid profile: ${size} bytes, more than the ${MAX_FILE_BYTES} a profile can have`);
        text = await fh.readFile('utf8');
      } finally {
        await fh.close();
      }
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new ProfileError(`no profile named ${name}; \`spillway profile list\` shows them`);
      throw e;
    }
    let raw: unknown;
    try {
      raw = JSON.parse(text);
    } catch (e) {
      throw new ProfileError(`${file} is not a valid profile: not JSON (${(e as Error).message})`);
    }
    const p = parseProfile(raw, file);
    if (p.name !== name) throw new ProfileError(`${file} is not a valid profile: it holds profile "${p.name}", not "${name}" (a profile's file is NAME.json)`);
    return p;
  }

  /** Names of the stored profiles, sorted. */
  async names(): Promise<string[]> {
    let files: string[];
    try {
      files = await readdir(this.dir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw e;
    }
    return files
      .filter((f) => f.endsWith('.json'))
      .map((f) => f.slice(0, -5))
      .filter((n) => NAME_RE.test(n))
      .sort();
  }

  /** Every valid profile, summarized, sorted by name. Files that are not valid profiles are
   *  left out and passed to `onInvalid` (so one bad file does not hide the others). */
  async list(onInvalid?: (name: string, err: ProfileError) => void): Promise<ProfileSummary[]> {
    return (await this.loadAll(onInvalid)).map(summarize);
  }

  /** Profiles of one family (runs of the same base), oldest first; invalid files as in list(). */
  async forFamily(family: string, onInvalid?: (name: string, err: ProfileError) => void): Promise<Profile[]> {
    return (await this.loadAll(onInvalid)).filter((p) => p.family === family).sort((a, b) => (a.createdAt < b.createdAt ? -1 : a.createdAt > b.createdAt ? 1 : a.name < b.name ? -1 : 1));
  }

  async delete(name: string): Promise<void> {
    const file = this.fileOf(name);
    try {
      await unlink(file);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new ProfileError(`no profile named ${name}; \`spillway profile list\` shows them`);
      throw e;
    }
    await fsyncDir(this.dir);
  }

  private async loadAll(onInvalid?: (name: string, err: ProfileError) => void): Promise<Profile[]> {
    const out: Profile[] = [];
    for (const name of await this.names()) {
      try {
        out.push(await this.load(name));
      } catch (e) {
        if (!(e instanceof ProfileError)) throw e;
        onInvalid?.(name, e);
      }
    }
    return out;
  }
}
