// The secure cache of the remote edge (docs/cache.md): chunks stored content-addressed by
// their signature, encrypted at rest with a per-family key held in memory only, and a
// persistent index (volume, chunk index) → content | zero.
//
//   memory   families, volumes (chunk → blob key | ZERO), blobs (slot, nonce, tag), SLRU order
//   disk     slab-<slot size>.dat   ciphertext, one blob per fixed-size slot   (slab.ts)
//            index.<gen>.snap/.log  the index: snapshot + redo log            (index-journal.ts)
//
// Every mutation changes memory and queues its index record in one synchronous step, and the
// call resolves once the record is written (invalidate: once it is fdatasynced). Blob bytes are
// written to their slot before the record that points at them. Nothing needs fsync for
// correctness: anything torn, stale or swapped fails AES-GCM authentication (AAD = family +
// content id) and is dropped as a miss, never served.
//
// lookup() and hasContent() answer from memory; get() and getContent() read and decrypt.

import { writeFile, readFile, mkdir, unlink } from 'node:fs/promises';
import path from 'node:path';
import type { KeyObject } from 'node:crypto';
import { blobAad, cipherKey, openBlob, sealBlob } from './blob-cipher.js';
import { CacheError } from './errors.js';
import { IndexJournal, type ReplayReport } from './index-journal.js';
import { deriveKeys, keyCheckValue, keyChecksEqual } from './keys.js';
import {
  cacheBytes,
  cacheCompactions,
  cacheEvictions,
  cacheGaugeSources,
  cacheMisses,
  cachePuts,
  readHits,
  readMisses,
  type CacheGaugeSource,
  type CacheMissReason,
} from './metrics.js';
import { SEG_NONE, SlruPolicy, type PolicyNode, type Segment } from './policy.js';
import { MAX_CHUNK_INDEX, MAX_ID, MAX_NAME, REC, type IndexRecord } from './records.js';
import { SlabStore, slotSizeFor, type Slab } from './slab.js';

/** Largest plaintext one blob may hold (the link's chunks are at most 1 MiB). */
export const MAX_BLOB = 16 * 1024 * 1024;
/** Snapshot once the log is larger than this and than the last snapshot. */
const DEFAULT_SNAPSHOT_MIN_LOG = 16 * 1024 * 1024;
/** Work done by resize() between two yields to the event loop. */
const EVICT_STEP = 64;
const MOVE_STEP = 8;
/** Blob writes in flight at once; further puts wait their turn (backpressure, not buffering). */
const MAX_WRITES_IN_FLIGHT = 32;
/** Chunks whose last invalidation is remembered for fill tokens (then: a floor). */
const MAX_INVALIDATION_MEMORY = 65536;

export interface SecureCacheOptions {
  /** directory of the cache files (created 0700 if missing). */
  readonly dir: string;
  /** bound on the bytes of the blob slabs (see docs/cache.md for what counts). */
  readonly maxBytes: number;
  /** share of maxBytes the protected SLRU segment may hold (default 0.8). */
  readonly protectedShare?: number;
  /** log size that triggers a snapshot (default 16 MiB); tests use small values. */
  readonly snapshotMinLogBytes?: number;
  readonly signal?: AbortSignal;
}

export interface OpOptions {
  readonly signal?: AbortSignal;
}

export interface FillOptions extends OpOptions {
  /**
   * From fillToken(), taken before the data was fetched. When the chunk was invalidated since,
   * the mapping is not installed (the call resolves false): a fill that raced with a write
   * must not bring old data back (I5).
   */
  readonly fillToken?: number;
}

export interface SetKeyOptions {
  /**
   * The family's key changed (the owner rotated it): drop the content sealed under the old
   * key instead of refusing the new one.
   */
  readonly replace?: boolean;
}

export type LookupResult = { readonly kind: 'zero' } | { readonly kind: 'content'; readonly id: Buffer };

export interface CacheStats {
  /** read-path view: this layer is the 'cache' tier. */
  readonly tiers: { readonly cache: { readonly hits: number; readonly misses: number } };
  readonly hits: { readonly content: number; readonly zero: number };
  readonly misses: Readonly<Record<CacheMissReason, number>>;
  readonly evictions: number;
  readonly puts: number;
  readonly slotsMoved: number;
  readonly blobs: number;
  readonly segments: { readonly probation: number; readonly protected: number };
  readonly volumes: number;
  readonly families: number;
  /** bytes of slots holding blobs. */
  readonly liveBytes: number;
  /** bytes the slab files span (live + free slots below each file's end); bounded by maxBytes. */
  readonly slabBytes: number;
  /** bytes of the index log and last snapshot. */
  readonly indexBytes: number;
  readonly maxBytes: number;
  /** how the last open went. */
  readonly recovery: ReplayReport & { readonly blobsLoaded: number; readonly droppedOnLoad: number };
}

const ZERO = 0 as const;
/** A chunk of a volume: all zeroes, or the key of a blob. */
type ChunkRef = typeof ZERO | string;

interface Family {
  readonly fid: number;
  readonly name: string;
  check: Buffer;
  key: KeyObject | null;
}

interface Volume {
  readonly vid: number;
  name: string;
  fid: number;
  readonly chunks: Map<number, ChunkRef>;
}

class Blob implements PolicyNode {
  lruPrev: PolicyNode | null = null;
  lruNext: PolicyNode | null = null;
  lruSeg: Segment = SEG_NONE;
  readonly lruBytes: number;
  /** readers (and a mover) holding the current slot; slots are freed only at zero. */
  pins = 0;
  /** slots to free once pins drop to zero. */
  pendingFree: number[] = [];
  dropped = false;

  constructor(
    readonly key: string,
    readonly fid: number,
    readonly id: Buffer,
    readonly slotSize: number,
    public slot: number,
    readonly length: number,
    readonly nonce: Buffer,
    readonly tag: Buffer,
  ) {
    this.lruBytes = slotSize;
  }
}

/** Map key of a blob: family number and the id's bytes as a one-byte string (cheap to build and hash). */
function blobKey(fid: number, id: Uint8Array): string {
  const b = Buffer.isBuffer(id) ? id : Buffer.from(id.buffer, id.byteOffset, id.length);
  return `${fid}:${b.toString('latin1')}`;
}

function checkName(what: string, name: string): void {
  const n = Buffer.byteLength(name, 'utf8');
  if (typeof name !== 'string' || n === 0 || n > MAX_NAME) {
    throw new CacheError('SPW_ERR_CACHE_ARGUMENT', `${what} name must be 1..${MAX_NAME} bytes of UTF-8`);
  }
}

function checkIndex(index: number): void {
  if (!Number.isSafeInteger(index) || index < 0 || index > MAX_CHUNK_INDEX) {
    throw new CacheError('SPW_ERR_CACHE_ARGUMENT', `chunk index ${index} is not an integer in 0..${MAX_CHUNK_INDEX}`);
  }
}

function checkId(id: Uint8Array): void {
  if (!(id instanceof Uint8Array) || id.length === 0 || id.length > MAX_ID) {
    throw new CacheError('SPW_ERR_CACHE_ARGUMENT', `a content id is 1..${MAX_ID} bytes`);
  }
}

function checkMaxBytes(maxBytes: number): void {
  if (!Number.isSafeInteger(maxBytes) || maxBytes < 0) throw new CacheError('SPW_ERR_CACHE_ARGUMENT', `maxBytes must be a non-negative integer, got ${maxBytes}`);
}

function signalOnce(): { promise: Promise<void>; resolve: () => void } {
  let resolve: () => void = () => undefined;
  const promise = new Promise<void>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

function yieldToLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Directories opened by this process (a second open would corrupt the index). */
const openDirs = new Set<string>();
async function takeLock(dir: string): Promise<string> {
  const lock = path.join(dir, 'LOCK');
  if (openDirs.has(dir)) throw new CacheError('SPW_ERR_CACHE_LOCKED', `cache directory ${dir} is already open in this process`);
  for (let attempt = 0; ; attempt++) {
    try {
      await writeFile(lock, `${process.pid}\n`, { flag: 'wx', mode: 0o600 });
      openDirs.add(dir);
      return lock;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || attempt > 0) throw err;
    }
    const pid = Number((await readFile(lock, 'utf8').catch(() => '')).trim());
    let alive = false;
    if (Number.isInteger(pid) && pid > 0 && pid !== process.pid) {
      try {
        process.kill(pid, 0);
        alive = true;
      } catch (e) {
        alive = (e as NodeJS.ErrnoException).code === 'EPERM';
      }
    }
    if (alive) throw new CacheError('SPW_ERR_CACHE_LOCKED', `cache directory ${dir} is in use by process ${pid}; stop it or use another directory`);
    await unlink(lock).catch(() => undefined); // stale: its process is gone
  }
}

export class SecureCache implements CacheGaugeSource {
  readonly dir: string;
  private maxBytesValue: number;
  private readonly policy: SlruPolicy<Blob>;
  private readonly families = new Map<string, Family>();
  private readonly familiesById = new Map<number, Family>();
  private readonly volumes = new Map<string, Volume>();
  private readonly blobs = new Map<string, Blob>();
  private nextFid = 1;
  private nextVid = 1;
  /** puts of one blob in flight, so concurrent puts of the same content write it once. */
  private readonly storing = new Map<string, Promise<Blob | null>>();
  /** bytes of dropped blobs whose slots wait for readers to finish. */
  private deferredBytes = 0;
  /** resolved (and replaced) whenever a pin is released or a put settles. */
  private progress = signalOnce();
  /** slots reserved by puts that are still writing them. */
  private writing = 0;
  /** puts holding one of the MAX_WRITES_IN_FLIGHT turns, and those waiting for one. */
  private writeTurns = 0;
  private readonly writeQueue: (() => void)[] = [];
  private invalSeq = 0;
  private invalFloor = 0;
  private readonly lastInval = new Map<string, number>();
  private readonly inflight = new Set<Promise<unknown>>();
  private maintenance: Promise<void> | null = null;
  private closed = false;
  private readonly counters = {
    hitContent: 0,
    hitZero: 0,
    miss: { absent: 0, nokey: 0, corrupt: 0 } as Record<CacheMissReason, number>,
    evictions: 0,
    puts: 0,
    moved: 0,
  };

  private constructor(
    dir: string,
    maxBytes: number,
    private readonly slabs: SlabStore<Blob>,
    private journal: IndexJournal,
    private readonly lockFile: string,
    private readonly snapshotMinLog: number,
    protectedShare: number,
    private recovery: CacheStats['recovery'],
  ) {
    this.dir = dir;
    this.maxBytesValue = maxBytes;
    this.policy = new SlruPolicy<Blob>(maxBytes, protectedShare);
  }

  /** Open (or create) the cache in `dir`. Content is readable once setKey() is called. */
  static async open(opts: SecureCacheOptions): Promise<SecureCache> {
    checkMaxBytes(opts.maxBytes);
    opts.signal?.throwIfAborted();
    const dir = path.resolve(opts.dir);
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const lockFile = await takeLock(dir);
    try {
      return await SecureCache.load(dir, opts, lockFile);
    } catch (err) {
      openDirs.delete(dir);
      await unlink(lockFile).catch(() => undefined);
      throw err;
    }
  }

  private static async load(dir: string, opts: SecureCacheOptions, lockFile: string): Promise<SecureCache> {
    // Replay into plain maps first; build the live structures once everything is known.
    const fams = new Map<number, { name: string; check: Buffer }>();
    const vols = new Map<number, { name: string | null; fid: number; chunks: Map<number, ChunkRef> }>();
    const blobs = new Map<string, Extract<IndexRecord, { type: typeof REC.BLOB }>>();
    const slotOwner = new Map<string, string>(); // "size:slot" → blob key
    const volOf = (vid: number): { name: string | null; fid: number; chunks: Map<number, ChunkRef> } => {
      let v = vols.get(vid);
      if (!v) {
        v = { name: null, fid: 0, chunks: new Map() };
        vols.set(vid, v);
      }
      return v;
    };
    const dropBlob = (key: string): void => {
      const b = blobs.get(key);
      if (!b) return;
      blobs.delete(key);
      const sk = `${b.slotSize}:${b.slot}`;
      if (slotOwner.get(sk) === key) slotOwner.delete(sk);
    };
    const apply = (rec: IndexRecord): void => {
      switch (rec.type) {
        case REC.FAMILY:
          fams.set(rec.fid, { name: rec.name, check: rec.check });
          break;
        case REC.VOLUME: {
          const v = volOf(rec.vid);
          v.name = rec.name;
          v.fid = rec.fid;
          break;
        }
        case REC.BLOB: {
          const key = blobKey(rec.fid, rec.id);
          dropBlob(key); // a move: the old slot is released
          const sk = `${rec.slotSize}:${rec.slot}`;
          const prev = slotOwner.get(sk);
          if (prev !== undefined) dropBlob(prev); // the slot was reused: the earlier owner is stale
          blobs.set(key, rec);
          slotOwner.set(sk, key);
          break;
        }
        case REC.DROP:
          dropBlob(blobKey(rec.fid, rec.id));
          break;
        case REC.MAP:
          volOf(rec.vid).chunks.set(rec.index, blobKey(rec.fid, rec.id));
          break;
        case REC.ZERO:
          volOf(rec.vid).chunks.set(rec.index, ZERO);
          break;
        case REC.UNMAP:
          volOf(rec.vid).chunks.delete(rec.index);
          break;
        case REC.END:
          break;
      }
    };
    const { journal, report } = await IndexJournal.open(dir, apply);
    let slabs: SlabStore<Blob> | null = null;
    try {
      slabs = await SlabStore.open<Blob>(dir);
      const cache = new SecureCache(
        dir,
        opts.maxBytes,
        slabs,
        journal,
        lockFile,
        opts.snapshotMinLogBytes ?? DEFAULT_SNAPSHOT_MIN_LOG,
        opts.protectedShare ?? 0.8,
        { ...report, blobsLoaded: 0, droppedOnLoad: 0 },
      );
      let droppedOnLoad = 0;
      for (const [fid, f] of fams) {
        const fam: Family = { fid, name: f.name, check: f.check, key: null };
        cache.families.set(f.name, fam);
        cache.familiesById.set(fid, fam);
        cache.nextFid = Math.max(cache.nextFid, fid + 1);
      }
      // Numbers are never reused, even those of records whose family did not survive.
      for (const r of blobs.values()) cache.nextFid = Math.max(cache.nextFid, r.fid + 1);
      for (const v of vols.values()) cache.nextFid = Math.max(cache.nextFid, v.fid + 1);
      const slabBySize = new Map<number, Slab<Blob>>();
      for (const [key, r] of blobs) {
        if (!cache.familiesById.has(r.fid)) {
          droppedOnLoad++;
          continue;
        }
        let slab = slabBySize.get(r.slotSize);
        if (!slab) {
          slab = await slabs.slab(r.slotSize);
          slabBySize.set(r.slotSize, slab);
        }
        if (!slab.isFree(r.slot) || r.length > r.slotSize) {
          droppedOnLoad++;
          continue;
        }
        const b = new Blob(key, r.fid, r.id, r.slotSize, r.slot, r.length, r.nonce, r.tag);
        slab.adopt(r.slot);
        slab.owners[r.slot] = b;
        cache.blobs.set(key, b);
        cache.policy.insert(b); // snapshot order is eviction order, then the log's puts
      }
      for (const [vid, v] of vols) {
        cache.nextVid = Math.max(cache.nextVid, vid + 1);
        if (v.name === null) continue;
        // Mappings to blobs that were not kept dangle harmlessly: lookup() sees no blob.
        const vol: Volume = { vid, name: v.name, fid: cache.familiesById.has(v.fid) ? v.fid : 0, chunks: v.chunks };
        cache.volumes.set(v.name, vol);
      }
      cache.recovery = { ...report, blobsLoaded: cache.blobs.size, droppedOnLoad };
      await slabs.settleFiles();
      // A smaller limit than last time: converge before serving.
      await cache.shrinkTo(opts.maxBytes, opts.signal);
      // A fresh snapshot makes the next open fast; the logs replay fine meanwhile.
      cache.maybeSnapshot(true);
      cacheGaugeSources.add(cache);
      return cache;
    } catch (err) {
      await journal.close().catch(() => undefined);
      await slabs?.close().catch(() => undefined);
      throw err;
    }
  }

  get maxBytes(): number {
    return this.maxBytesValue;
  }

  // ---------------------------------------------------------------- keys

  /**
   * Deliver the 32-byte data key of a family (kept in memory only). The cipher key is derived
   * with HKDF (keys.ts). A key that does not match the content stored for the family is refused
   * (SPW_ERR_CACHE_KEY_MISMATCH) unless `replace`, which drops that content.
   */
  setKey(family: string, dataKey: Uint8Array, opts: SetKeyOptions = {}): void {
    this.assertOpen();
    checkName('family', family);
    const { cacheKey, signKey } = deriveKeys(dataKey);
    signKey.fill(0);
    const check = keyCheckValue(cacheKey);
    const key = cipherKey(cacheKey);
    cacheKey.fill(0);
    let fam = this.families.get(family);
    if (fam && fam.check.length > 0 && !keyChecksEqual(fam.check, check)) {
      if (!opts.replace) {
        throw new CacheError(
          'SPW_ERR_CACHE_KEY_MISMATCH',
          `the key delivered for family ${JSON.stringify(family)} does not open the content cached for it; if the owner rotated the key, call setKey with { replace: true } to drop that content`,
        );
      }
      const recs: IndexRecord[] = [];
      for (const b of [...this.blobs.values()]) if (b.fid === fam.fid) this.dropBlob(b, recs);
      this.background(this.journal.append(recs));
    }
    if (!fam) {
      fam = { fid: this.nextFid++, name: family, check, key };
      this.families.set(family, fam);
      this.familiesById.set(fam.fid, fam);
    } else {
      fam.key = key;
      if (keyChecksEqual(fam.check, check)) return;
      fam.check = check;
    }
    this.background(this.journal.append([{ type: REC.FAMILY, fid: fam.fid, name: family, check }]));
  }

  /** Drop a family's key from memory; its content stays on disk, unreadable until setKey. */
  forgetKey(family: string): void {
    const fam = this.families.get(family);
    if (fam) fam.key = null;
  }

  hasKey(family: string): boolean {
    return this.families.get(family)?.key != null;
  }

  /** Record that `volume` belongs to `family` (put() does it too); needed before map(). */
  attachVolume(volume: string, family: string): void {
    this.assertOpen();
    checkName('volume', volume);
    checkName('family', family);
    const recs: IndexRecord[] = [];
    this.volumeFor(volume, this.familyFor(family, recs), recs);
    if (recs.length > 0) this.background(this.journal.append(recs));
  }

  // ---------------------------------------------------------------- reads

  /** What the index says about a chunk, from memory. Content whose blob is gone is null. */
  lookup(volume: string, index: number): LookupResult | null {
    const ref = this.volumes.get(volume)?.chunks.get(index);
    if (ref === undefined) return null;
    if (ref === ZERO) return { kind: 'zero' };
    const b = this.blobs.get(ref);
    return b ? { kind: 'content', id: Buffer.from(b.id) } : null;
  }

  /** Whether the content is stored and readable (its family's key is present). */
  hasContent(family: string, id: Uint8Array): boolean {
    const fam = this.families.get(family);
    return fam?.key != null && this.blobs.has(blobKey(fam.fid, id));
  }

  /** A chunk of a volume, decrypted; 'zero' for a zero chunk; null on a miss. */
  async get(volume: string, index: number, opts: OpOptions = {}): Promise<Buffer | 'zero' | null> {
    this.assertOpen();
    opts.signal?.throwIfAborted();
    const ref = this.volumes.get(volume)?.chunks.get(index);
    if (ref === undefined) return this.miss('absent');
    if (ref === ZERO) {
      this.counters.hitZero++;
      readHits.inc({ tier: 'cache' });
      return 'zero';
    }
    const b = this.blobs.get(ref);
    if (!b) return this.miss('absent');
    return this.track(this.readBlob(b, opts.signal));
  }

  /** Content by family and id, decrypted; null on a miss. */
  async getContent(family: string, id: Uint8Array, opts: OpOptions = {}): Promise<Buffer | null> {
    this.assertOpen();
    opts.signal?.throwIfAborted();
    const fam = this.families.get(family);
    const b = fam && this.blobs.get(blobKey(fam.fid, id));
    if (!b) return this.miss('absent');
    return this.track(this.readBlob(b, opts.signal));
  }

  private miss(reason: CacheMissReason): null {
    this.counters.miss[reason]++;
    cacheMisses.inc({ reason });
    readMisses.inc({ tier: 'cache' });
    return null;
  }

  private async readBlob(b: Blob, signal?: AbortSignal): Promise<Buffer | null> {
    const fam = this.familiesById.get(b.fid);
    const key = fam?.key;
    if (!fam || !key) return this.miss('nokey');
    const slab = this.slabs.get(b.slotSize);
    if (!slab) return this.miss('absent');
    const slot = b.slot;
    b.pins++;
    let ciphertext: Buffer | null;
    try {
      ciphertext = await slab.read(slot, b.length);
    } catch (err) {
      throw new CacheError('SPW_ERR_CACHE_IO', `cannot read the cache slab ${slab.file}: ${(err as Error).message}`, { cause: err });
    } finally {
      this.unpin(b);
    }
    signal?.throwIfAborted();
    const plain = ciphertext && openBlob(key, blobAad(fam.name, b.id), b.nonce, ciphertext, b.tag);
    if (!plain) {
      // Torn, tampered, or swapped: never served. Dropped unless it changed meanwhile.
      if (!b.dropped && b.slot === slot && fam.key === key) {
        const recs: IndexRecord[] = [];
        this.dropBlob(b, recs);
        this.background(this.journal.append(recs));
      }
      return this.miss('corrupt');
    }
    if (!b.dropped) this.policy.touch(b);
    this.counters.hitContent++;
    readHits.inc({ tier: 'cache' });
    cacheBytes.inc({ direction: 'read' }, plain.length);
    return plain;
  }

  private unpin(b: Blob): void {
    b.pins--;
    if (b.pins === 0 && b.pendingFree.length > 0) {
      const slab = this.slabs.get(b.slotSize);
      for (const s of b.pendingFree) {
        slab?.release(s);
        if (b.dropped) this.deferredBytes -= b.slotSize;
      }
      b.pendingFree = [];
    }
    this.notifyProgress();
  }

  private notifyProgress(): void {
    this.progress.resolve();
    this.progress = signalOnce();
  }

  // ---------------------------------------------------------------- writes

  /**
   * A token to pass to put/putZero/map for a chunk about to be fetched: if invalidate() runs
   * for that chunk before the fill lands, the fill does not install the mapping.
   */
  fillToken(volume: string, index: number): number {
    void volume;
    void index;
    return this.invalSeq;
  }

  /** Whether a fill with `token` would be refused now (the chunk was invalidated since). */
  isStale(volume: string, index: number, token: number): boolean {
    return this.tokenStale(volume, index, token);
  }

  private tokenStale(volume: string, index: number, token: number | undefined): boolean {
    if (token === undefined) return false;
    if (token < this.invalFloor) return true;
    return (this.lastInval.get(`${index}\0${volume}`) ?? -1) > token;
  }

  /**
   * Store `plaintext` as content `id` of `family` and map chunk `index` of `volume` to it.
   * Resolves true once the mapping is recorded; false when the chunk was not cached (no key
   * for the family, larger than the cache, or a stale fill token). Idempotent.
   */
  async put(volume: string, family: string, index: number, id: Uint8Array, plaintext: Uint8Array, opts: FillOptions = {}): Promise<boolean> {
    this.assertOpen();
    checkName('volume', volume);
    checkName('family', family);
    checkIndex(index);
    checkId(id);
    if (!(plaintext instanceof Uint8Array) || plaintext.length === 0 || plaintext.length > MAX_BLOB) {
      throw new CacheError('SPW_ERR_CACHE_ARGUMENT', `a chunk is 1..${MAX_BLOB} bytes, got ${plaintext?.length}`);
    }
    opts.signal?.throwIfAborted();
    const fam = this.families.get(family);
    if (!fam?.key) return false;
    // Checked now (before any await) so a mismatch throws before anything is stored.
    const pre: IndexRecord[] = [];
    this.volumeFor(volume, fam, pre);
    if (pre.length > 0) this.background(this.journal.append(pre));
    return this.track(this.putTask(volume, fam, index, Buffer.from(id), plaintext, opts));
  }

  private async putTask(volume: string, fam: Family, index: number, id: Buffer, plaintext: Uint8Array, opts: FillOptions): Promise<boolean> {
    const key = blobKey(fam.fid, id);
    let b = this.blobs.get(key) ?? null;
    if (!b) {
      let pending = this.storing.get(key);
      if (!pending) {
        pending = this.storeBlob(key, fam, id, plaintext, opts.signal).finally(() => {
          this.storing.delete(key);
          this.notifyProgress();
        });
        this.storing.set(key, pending);
      }
      b = await pending;
      if (!b || b.dropped) return false;
    } else {
      this.policy.touch(b);
    }
    opts.signal?.throwIfAborted();
    if (this.closed || this.tokenStale(volume, index, opts.fillToken)) return false;
    const recs: IndexRecord[] = [];
    const vol = this.volumeFor(volume, fam, recs);
    if (vol.chunks.get(index) !== key) {
      vol.chunks.set(index, key);
      recs.push({ type: REC.MAP, vid: vol.vid, index, fid: fam.fid, id: b.id });
    }
    if (recs.length > 0) await this.journal.append(recs);
    return true;
  }

  /** Seal, find a slot, write, then publish the blob and its record. */
  private async storeBlob(key: string, fam: Family, id: Buffer, plaintext: Uint8Array, signal?: AbortSignal): Promise<Blob | null> {
    const cipherKeyNow = fam.key;
    if (!cipherKeyNow) return null;
    if (this.writeTurns >= MAX_WRITES_IN_FLIGHT) await new Promise<void>((resolve) => this.writeQueue.push(resolve));
    else this.writeTurns++;
    try {
      return await this.storeBlobTurn(key, fam, cipherKeyNow, id, plaintext, signal);
    } finally {
      const next = this.writeQueue.shift();
      if (next) next(); // the turn passes on
      else this.writeTurns--;
    }
  }

  private async storeBlobTurn(key: string, fam: Family, cipherKeyNow: KeyObject, id: Buffer, plaintext: Uint8Array, signal?: AbortSignal): Promise<Blob | null> {
    signal?.throwIfAborted();
    this.assertOpen();
    const sealed = sealBlob(cipherKeyNow, blobAad(fam.name, id), plaintext);
    const slotSize = slotSizeFor(sealed.ciphertext.length);
    const place = await this.reserveSlot(slotSize, signal);
    if (!place) return null;
    const { slab, slot } = place;
    this.writing++;
    try {
      signal?.throwIfAborted();
      await slab.write(slot, sealed.ciphertext);
      signal?.throwIfAborted();
    } catch (err) {
      slab.release(slot);
      throw err instanceof Error && err.name === 'AbortError' ? err : new CacheError('SPW_ERR_CACHE_IO', `cannot write to the cache slab ${slab.file}: ${(err as Error).message}`, { cause: err });
    } finally {
      this.writing--;
    }
    if (this.closed || fam.key !== cipherKeyNow) {
      // closed, or the key was replaced while writing: the blob would be unreadable
      slab.release(slot);
      return null;
    }
    const b = new Blob(key, fam.fid, id, slotSize, slot, sealed.ciphertext.length, sealed.nonce, sealed.tag);
    slab.owners[slot] = b;
    this.blobs.set(key, b);
    this.policy.insert(b);
    this.counters.puts++;
    cachePuts.inc();
    cacheBytes.inc({ direction: 'written' }, plaintext.length);
    await this.journal.append([{ type: REC.BLOB, fid: fam.fid, id, slotSize, slot, length: b.length, nonce: b.nonce, tag: b.tag }]);
    this.maybeSnapshot();
    return b;
  }

  /**
   * A slot of `slotSize` within the size limit: a free one, a new one at the end of the slab,
   * or one made by moving blobs down (when holes elsewhere would do) or by evicting.
   * Null when the blob cannot fit at all.
   */
  private async reserveSlot(slotSize: number, signal?: AbortSignal): Promise<{ slab: Slab<Blob>; slot: number } | null> {
    if (slotSize > this.maxBytesValue) return null;
    const slab = await this.slabs.slab(slotSize);
    for (;;) {
      signal?.throwIfAborted();
      this.assertOpen();
      const free = slab.allocate(false);
      if (free !== null) return { slab, slot: free };
      if (this.slabs.allocatedBytes + slotSize <= this.maxBytesValue) return { slab, slot: slab.allocate(true) as number };
      const live = this.slabs.liveBytes - this.deferredBytes;
      if (live + slotSize <= this.maxBytesValue && this.slabs.allocatedBytes > this.slabs.liveBytes) {
        // Enough room once holes in other slabs are closed up.
        if (await this.compactStep(signal)) continue;
      }
      const victim = this.policy.victim();
      if (victim) {
        const recs: IndexRecord[] = [];
        this.evict(victim, recs);
        this.background(this.journal.append(recs));
        continue;
      }
      if (this.deferredBytes > 0 || this.writing > 0) {
        // Space is held by readers or by other puts in flight: wait for one to finish.
        await this.progress.promise;
        continue;
      }
      return null;
    }
  }

  private evict(b: Blob, recs: IndexRecord[]): void {
    this.dropBlob(b, recs);
    this.counters.evictions++;
    cacheEvictions.inc();
  }

  /** Forget a blob; its slot is freed now, or when its last reader is done. */
  private dropBlob(b: Blob, recs: IndexRecord[]): void {
    if (b.dropped) return;
    b.dropped = true;
    this.policy.remove(b);
    if (this.blobs.get(b.key) === b) this.blobs.delete(b.key);
    recs.push({ type: REC.DROP, fid: b.fid, id: b.id });
    const slab = this.slabs.get(b.slotSize);
    if (!slab) return;
    if (slab.owners[b.slot] === b) slab.owners[b.slot] = undefined;
    if (b.pins > 0) {
      b.pendingFree.push(b.slot);
      this.deferredBytes += b.slotSize;
    } else {
      slab.release(b.slot);
    }
  }

  /** Chunk `index` of `volume` is all zeroes (no blob is stored). */
  async putZero(volume: string, index: number, opts: FillOptions = {}): Promise<boolean> {
    this.assertOpen();
    checkName('volume', volume);
    checkIndex(index);
    opts.signal?.throwIfAborted();
    if (this.tokenStale(volume, index, opts.fillToken)) return false;
    const recs: IndexRecord[] = [];
    const vol = this.volumeFor(volume, null, recs);
    if (vol.chunks.get(index) !== ZERO) {
      vol.chunks.set(index, ZERO);
      recs.push({ type: REC.ZERO, vid: vol.vid, index });
    }
    if (recs.length > 0) await this.track(this.journal.append(recs));
    this.maybeSnapshot();
    return true;
  }

  /**
   * Point chunk `index` of `volume` at content already stored (dedup across clones, or a
   * signature-only answer from the link). Resolves false when the content is not stored, or
   * when the cache does not know the volume's family yet (call attachVolume() when a volume
   * is opened, or put() once): the caller then fetches the data.
   */
  async map(volume: string, index: number, id: Uint8Array, opts: FillOptions = {}): Promise<boolean> {
    this.assertOpen();
    checkName('volume', volume);
    checkIndex(index);
    checkId(id);
    opts.signal?.throwIfAborted();
    const vol = this.volumes.get(volume);
    const fam = vol && vol.fid !== 0 ? this.familiesById.get(vol.fid) : undefined;
    if (!vol || !fam) return false;
    const key = blobKey(fam.fid, id);
    const b = this.blobs.get(key);
    if (!b || this.tokenStale(volume, index, opts.fillToken)) return false;
    this.policy.touch(b);
    if (vol.chunks.get(index) === key) return true;
    vol.chunks.set(index, key);
    await this.track(this.journal.append([{ type: REC.MAP, vid: vol.vid, index, fid: fam.fid, id: b.id }]));
    this.maybeSnapshot();
    return true;
  }

  /**
   * Forget what chunk `index` of `volume` holds (the write path calls this when a write to the
   * chunk is accepted: I5). Effective in memory at once; resolves once durable on disk.
   */
  async invalidate(volume: string, index: number, opts: OpOptions = {}): Promise<void> {
    this.assertOpen();
    checkName('volume', volume);
    checkIndex(index);
    opts.signal?.throwIfAborted();
    this.invalSeq++;
    if (this.lastInval.size >= MAX_INVALIDATION_MEMORY) {
      this.lastInval.clear();
      this.invalFloor = this.invalSeq; // every older token is now considered stale
    }
    this.lastInval.set(`${index}\0${volume}`, this.invalSeq);
    const vol = this.volumes.get(volume);
    if (vol?.chunks.delete(index)) {
      await this.track(this.journal.append([{ type: REC.UNMAP, vid: vol.vid, index }], true));
      this.maybeSnapshot();
    } else {
      // Nothing mapped now, but an earlier UNMAP may still be on its way to disk.
      await this.track(this.journal.sync());
    }
  }

  /**
   * Forget every chunk mapped for `volume` (the edge calls this when the volume leaves it: the
   * origin may change before it comes back, and a cached mapping is trusted without asking the
   * peer). Blobs stay for other volumes of the family that map them. Resolves once durable.
   */
  async dropVolume(volume: string, opts: OpOptions = {}): Promise<number> {
    this.assertOpen();
    checkName('volume', volume);
    opts.signal?.throwIfAborted();
    const vol = this.volumes.get(volume);
    const indices = vol ? [...vol.chunks.keys()] : [];
    for (const index of indices) {
      this.invalSeq++;
      if (this.lastInval.size >= MAX_INVALIDATION_MEMORY) {
        this.lastInval.clear();
        this.invalFloor = this.invalSeq;
      }
      this.lastInval.set(`${index}\0${volume}`, this.invalSeq);
      vol!.chunks.delete(index);
    }
    // Fills in flight for chunks never mapped must be refused too.
    this.invalFloor = Math.max(this.invalFloor, ++this.invalSeq);
    if (indices.length > 0) await this.track(this.journal.append(indices.map((index) => ({ type: REC.UNMAP, vid: vol!.vid, index })), true));
    else await this.track(this.journal.sync());
    this.maybeSnapshot();
    return indices.length;
  }

  // ---------------------------------------------------------------- size

  /**
   * Change the size limit. Shrinking evicts at once (in steps of a few dozen blobs, yielding
   * to the event loop between steps, so reads go on), then moves blobs down to shorten the
   * slab files. Resolves when the slabs fit the new limit.
   */
  async resize(maxBytes: number, opts: OpOptions = {}): Promise<void> {
    this.assertOpen();
    checkMaxBytes(maxBytes);
    opts.signal?.throwIfAborted();
    this.maxBytesValue = maxBytes;
    this.policy.setCapacity(maxBytes);
    await this.track(this.shrinkTo(maxBytes, opts.signal));
  }

  private async shrinkTo(maxBytes: number, signal?: AbortSignal): Promise<void> {
    while (this.slabs.liveBytes - this.deferredBytes > this.maxBytesValue) {
      signal?.throwIfAborted();
      const recs: IndexRecord[] = [];
      for (let i = 0; i < EVICT_STEP && this.slabs.liveBytes - this.deferredBytes > this.maxBytesValue; i++) {
        const v = this.policy.victim();
        if (!v) break;
        this.evict(v, recs);
      }
      if (recs.length === 0) break;
      await this.journal.append(recs);
      await yieldToLoop();
    }
    while (this.slabs.allocatedBytes > this.maxBytesValue && this.maxBytesValue === maxBytes) {
      signal?.throwIfAborted();
      if (!(await this.compactStep(signal))) {
        if (this.slabs.allocatedBytes <= this.maxBytesValue) break;
        if (this.policy.count === 0 && this.deferredBytes === 0 && this.writing === 0) break;
        await Promise.race([this.progress.promise, yieldToLoop()]);
        // Evict if compaction alone cannot get there (blobs pinned at file ends).
        if (this.slabs.liveBytes - this.deferredBytes > this.maxBytesValue) return this.shrinkTo(maxBytes, signal);
      }
      await yieldToLoop();
    }
  }

  /**
   * Move up to MOVE_STEP blobs from the ends of slab files into holes lower down, so the files
   * can be cut. Returns whether anything moved.
   */
  private async compactStep(signal?: AbortSignal): Promise<boolean> {
    let moved = 0;
    for (const slab of this.slabs.all()) {
      while (moved < MOVE_STEP && slab.freeCount > 0) {
        const hole = slab.lowestFree();
        const tail = slab.count - 1;
        const b = slab.owners[tail];
        if (hole === undefined || hole >= tail || !b || b.pins > 0 || b.dropped) break;
        const to = slab.allocate(false) as number; // == hole
        b.pins++; // the mover holds the old slot like a reader
        try {
          const data = await slab.read(tail, b.length);
          if (data) await slab.write(to, data);
          if (!data || b.dropped) {
            slab.release(to);
          } else {
            slab.owners[to] = b;
            if (slab.owners[tail] === b) slab.owners[tail] = undefined;
            b.slot = to;
            b.pendingFree.push(tail);
            this.background(this.journal.append([{ type: REC.BLOB, fid: b.fid, id: b.id, slotSize: b.slotSize, slot: to, length: b.length, nonce: b.nonce, tag: b.tag }]));
            moved++;
            this.counters.moved++;
            cacheCompactions.inc();
          }
        } finally {
          this.unpin(b);
        }
        signal?.throwIfAborted();
      }
      if (moved >= MOVE_STEP) break;
    }
    return moved > 0;
  }

  // ---------------------------------------------------------------- bookkeeping

  stats(): CacheStats {
    const c = this.counters;
    const seg = this.policy.segmentCounts();
    return {
      tiers: { cache: { hits: c.hitContent + c.hitZero, misses: c.miss.absent + c.miss.nokey + c.miss.corrupt } },
      hits: { content: c.hitContent, zero: c.hitZero },
      misses: { ...c.miss },
      evictions: c.evictions,
      puts: c.puts,
      slotsMoved: c.moved,
      blobs: this.blobs.size,
      segments: seg,
      volumes: this.volumes.size,
      families: this.families.size,
      liveBytes: this.slabs.liveBytes - this.deferredBytes,
      slabBytes: this.slabs.allocatedBytes,
      indexBytes: this.journal.bytes,
      maxBytes: this.maxBytesValue,
      recovery: this.recovery,
    };
  }

  gaugeSample(): { slabBytes: number; indexBytes: number; maxBytes: number; probation: number; protected: number } {
    const seg = this.policy.segmentCounts();
    return { slabBytes: this.slabs.allocatedBytes, indexBytes: this.journal.bytes, maxBytes: this.maxBytesValue, ...seg };
  }

  /** Wait until every call in flight and background work has finished. */
  async idle(): Promise<void> {
    while (this.inflight.size > 0 || this.maintenance) {
      await Promise.allSettled([...this.inflight, this.maintenance]);
    }
    await this.journal.drain();
  }

  /** Finish what is in flight, write a snapshot (fast reopen), close the files. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.notifyProgress();
    await this.idle();
    cacheGaugeSources.delete(this);
    try {
      await this.journal.writeSnapshot(this.snapshotRecords());
    } finally {
      await this.journal.close();
      await this.slabs.close();
      for (const f of this.families.values()) f.key = null;
      openDirs.delete(this.dir);
      await unlink(this.lockFile).catch(() => undefined);
    }
  }

  private assertOpen(): void {
    if (this.closed) throw new CacheError('SPW_ERR_CACHE_CLOSED', `the cache in ${this.dir} is closed`);
  }

  private track<T>(p: Promise<T>): Promise<T> {
    this.inflight.add(p);
    const done = (): void => {
      this.inflight.delete(p);
    };
    p.then(done, done);
    return p;
  }

  /** Fire-and-forget work whose failure makes the index refuse further appends. */
  private background(p: Promise<unknown>): void {
    this.track(p).catch(() => undefined);
  }

  private familyFor(name: string, recs: IndexRecord[]): Family {
    let fam = this.families.get(name);
    if (!fam) {
      fam = { fid: this.nextFid++, name, check: Buffer.alloc(0), key: null };
      this.families.set(name, fam);
      this.familiesById.set(fam.fid, fam);
      recs.push({ type: REC.FAMILY, fid: fam.fid, name, check: fam.check });
    }
    return fam;
  }

  private volumeFor(name: string, fam: Family | null, recs: IndexRecord[]): Volume {
    let vol = this.volumes.get(name);
    if (!vol) {
      vol = { vid: this.nextVid++, name, fid: fam?.fid ?? 0, chunks: new Map() };
      this.volumes.set(name, vol);
      recs.push({ type: REC.VOLUME, vid: vol.vid, name, fid: vol.fid });
    } else if (fam && vol.fid !== fam.fid) {
      if (vol.fid !== 0) {
        const had = this.familiesById.get(vol.fid)?.name;
        throw new CacheError('SPW_ERR_CACHE_FAMILY_MISMATCH', `volume ${JSON.stringify(name)} belongs to family ${JSON.stringify(had)}, not ${JSON.stringify(fam.name)}`);
      }
      vol.fid = fam.fid;
      recs.push({ type: REC.VOLUME, vid: vol.vid, name, fid: vol.fid });
    }
    return vol;
  }

  private maybeSnapshot(force = false): void {
    if (this.maintenance || this.closed || (!force && !this.journal.needsSnapshot(this.snapshotMinLog))) return;
    this.maintenance = this.journal
      .writeSnapshot(this.snapshotRecords())
      .catch(() => undefined)
      .finally(() => {
        this.maintenance = null;
      });
  }

  /**
   * The whole index as records, generated lazily while the snapshot is written (see
   * index-journal.ts for why a state that changes meanwhile is fine). Blobs go in eviction
   * order, so the next open rebuilds roughly the same SLRU order.
   */
  private *snapshotRecords(): Generator<IndexRecord> {
    for (const f of [...this.families.values()]) yield { type: REC.FAMILY, fid: f.fid, name: f.name, check: f.check };
    for (const v of [...this.volumes.values()]) yield { type: REC.VOLUME, vid: v.vid, name: v.name, fid: v.fid };
    for (const b of [...this.policy.evictionOrder()]) {
      if (b.dropped) continue;
      yield { type: REC.BLOB, fid: b.fid, id: b.id, slotSize: b.slotSize, slot: b.slot, length: b.length, nonce: b.nonce, tag: b.tag };
    }
    for (const v of this.volumes.values()) {
      for (const [index, ref] of v.chunks) {
        if (ref === ZERO) {
          yield { type: REC.ZERO, vid: v.vid, index };
        } else {
          const b = this.blobs.get(ref);
          if (b) yield { type: REC.MAP, vid: v.vid, index, fid: b.fid, id: b.id };
        }
      }
    }
  }
}
