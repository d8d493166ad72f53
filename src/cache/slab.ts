// Blob storage: one slab file per slot size, an array of fixed-size slots. A blob's ciphertext
// fills one slot (nonce and tag live in the index), so a 64 KiB chunk takes exactly one
// 64 KiB slot, aligned, with no header and no rounding waste; a short chunk at the end of a
// volume takes a slot of its length rounded up to 4 KiB. Freed slots are reused lowest first,
// and free slots at the end of a file are truncated away, so a file is as long as its
// highest live slot. Slots hold nothing that identifies them: which blob owns which slot is
// the index's business, and AES-GCM (AAD = family + content id) catches any disagreement.
//
// This layer does I/O only; which slot to use, and when a slot may be reused, is decided by
// the cache (which pins slots that are being read).

import { constants as fsc } from 'node:fs';
import { open, readdir, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';

export const SLOT_ALIGN = 4096;
const SLAB_RE = /^slab-(\d+)\.dat$/;

export function slotSizeFor(length: number): number {
  return Math.max(SLOT_ALIGN, Math.ceil(length / SLOT_ALIGN) * SLOT_ALIGN);
}

export function slabFileName(slotSize: number): string {
  return `slab-${slotSize}.dat`;
}

/** A min-heap of slot numbers; stale entries are skipped by the owner (lazy deletion). */
class MinHeap {
  private readonly a: number[] = [];
  get size(): number {
    return this.a.length;
  }
  push(v: number): void {
    const a = this.a;
    let i = a.length;
    a.push(v);
    while (i > 0) {
      const p = (i - 1) >> 1;
      const pv = a[p] as number;
      if (pv <= v) break;
      a[i] = pv;
      i = p;
    }
    a[i] = v;
  }
  peek(): number | undefined {
    return this.a[0];
  }
  pop(): number | undefined {
    const a = this.a;
    const top = a[0];
    const last = a.pop();
    if (a.length > 0 && last !== undefined) {
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        if (l >= a.length) break;
        const r = l + 1;
        const c = r < a.length && (a[r] as number) < (a[l] as number) ? r : l;
        if ((a[c] as number) >= last) break;
        a[i] = a[c] as number;
        i = c;
      }
      a[i] = last;
    }
    return top;
  }
  clear(): void {
    this.a.length = 0;
  }
}

export class Slab<T = unknown> {
  /** who holds each slot (set by the owner of the store; undefined while a slot is free or being filled). */
  readonly owners: (T | undefined)[] = [];
  /** slots in use or free below the high-water mark; the file is count × slotSize long. */
  count = 0;
  private readonly free = new Set<number>();
  private readonly freeHeap = new MinHeap();
  private pendingTruncate: Promise<void> | null = null;

  constructor(
    readonly slotSize: number,
    readonly file: string,
    private readonly fh: FileHandle,
  ) {}

  get freeCount(): number {
    return this.free.size;
  }

  get liveCount(): number {
    return this.count - this.free.size;
  }

  isFree(slot: number): boolean {
    return slot >= this.count || this.free.has(slot);
  }

  /** The lowest free slot below the high-water mark, or undefined. */
  lowestFree(): number | undefined {
    for (;;) {
      const s = this.freeHeap.peek();
      if (s === undefined) return undefined;
      if (s < this.count && this.free.has(s)) return s;
      this.freeHeap.pop();
    }
  }

  /** Take the lowest free slot, or a new one at the end when `grow`; null when neither. */
  allocate(grow: boolean): number | null {
    const s = this.lowestFree();
    if (s !== undefined) {
      this.freeHeap.pop();
      this.free.delete(s);
      return s;
    }
    if (!grow) return null;
    return this.count++;
  }

  /** Mark a slot as used while loading the index. */
  adopt(slot: number): void {
    if (slot >= this.count) {
      for (let s = this.count; s < slot; s++) this.markFree(s);
      this.count = slot + 1;
    } else if (this.free.delete(slot)) {
      // was free: now used (stale heap entry skipped lazily)
    }
  }

  /** Give a slot back; trailing free slots are cut off the file. */
  release(slot: number): void {
    if (slot >= this.count || this.free.has(slot)) throw new Error(`slab ${this.slotSize}: slot ${slot} released twice`);
    this.markFree(slot);
    const before = this.count;
    while (this.count > 0 && this.free.has(this.count - 1)) {
      this.free.delete(this.count - 1);
      this.count--;
    }
    if (this.owners.length > this.count) this.owners.length = this.count;
    if (this.count !== before) void this.scheduleTruncate().catch(() => undefined); // a failed truncate leaves the file longer; harmless
  }

  private markFree(slot: number): void {
    this.owners[slot] = undefined;
    this.free.add(slot);
    this.freeHeap.push(slot);
  }

  /** Truncate the file to the high-water mark (at the time the truncate runs). */
  scheduleTruncate(): Promise<void> {
    const prev = (this.pendingTruncate ?? Promise.resolve()).catch(() => undefined);
    const p: Promise<void> = prev.then(async () => {
      await this.fh.truncate(this.count * this.slotSize);
      if (this.pendingTruncate === p) this.pendingTruncate = null;
    });
    this.pendingTruncate = p;
    return p;
  }

  async write(slot: number, data: Uint8Array): Promise<void> {
    if (data.length > this.slotSize) throw new Error(`slab ${this.slotSize}: ${data.length} bytes do not fit a slot`);
    if (this.pendingTruncate) await this.pendingTruncate.catch(() => undefined);
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.fh.write(data, done, data.length - done, slot * this.slotSize + done);
      done += bytesWritten;
    }
  }

  /** `length` bytes of a slot, or null when the file ends before them (a torn append). */
  async read(slot: number, length: number): Promise<Buffer | null> {
    const buf = Buffer.allocUnsafeSlow(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.fh.read(buf, done, length - done, slot * this.slotSize + done);
      if (bytesRead === 0) return null;
      done += bytesRead;
    }
    return buf;
  }

  async fileSize(): Promise<number> {
    return (await this.fh.stat()).size;
  }

  async sync(): Promise<void> {
    await this.fh.datasync();
  }

  async close(): Promise<void> {
    if (this.pendingTruncate) await this.pendingTruncate.catch(() => undefined);
    await this.fh.close();
  }
}

/** The set of slabs of one cache directory, by slot size. */
export class SlabStore<T = unknown> {
  private readonly slabs = new Map<number, Slab<T>>();

  private constructor(private readonly dir: string) {}

  /** Open every slab file already in `dir`; new ones are created on demand. */
  static async open<T>(dir: string): Promise<SlabStore<T>> {
    const store = new SlabStore<T>(dir);
    for (const name of await readdir(dir)) {
      const m = SLAB_RE.exec(name);
      if (!m) continue;
      const slotSize = Number(m[1]);
      if (!Number.isSafeInteger(slotSize) || slotSize <= 0 || slotSize % SLOT_ALIGN !== 0) continue;
      await store.slab(slotSize);
    }
    return store;
  }

  all(): IterableIterator<Slab<T>> {
    return this.slabs.values();
  }

  get(slotSize: number): Slab<T> | undefined {
    return this.slabs.get(slotSize);
  }

  /** The slab of `slotSize`, opening (creating) its file if needed. */
  async slab(slotSize: number): Promise<Slab<T>> {
    let s = this.slabs.get(slotSize);
    if (!s) {
      const file = path.join(this.dir, slabFileName(slotSize));
      const fh = await open(file, fsc.O_RDWR | fsc.O_CREAT, 0o600);
      s = this.slabs.get(slotSize); // another caller may have opened it meanwhile
      if (s) {
        await fh.close();
      } else {
        s = new Slab<T>(slotSize, file, fh);
        this.slabs.set(slotSize, s);
      }
    }
    return s;
  }

  /** Bytes the slab files span (live and free slots below each high-water mark). */
  get allocatedBytes(): number {
    let n = 0;
    for (const s of this.slabs.values()) n += s.count * s.slotSize;
    return n;
  }

  get liveBytes(): number {
    let n = 0;
    for (const s of this.slabs.values()) n += s.liveCount * s.slotSize;
    return n;
  }

  /** After loading: cut every file to its high-water mark; remove empty files. */
  async settleFiles(): Promise<void> {
    for (const [size, s] of [...this.slabs]) {
      if (s.count === 0) {
        await s.close();
        this.slabs.delete(size);
        await unlink(s.file).catch(() => undefined);
      } else {
        await s.scheduleTruncate();
      }
    }
  }

  async sync(): Promise<void> {
    for (const s of this.slabs.values()) await s.sync();
  }

  async close(): Promise<void> {
    for (const s of this.slabs.values()) await s.close();
    this.slabs.clear();
  }
}
