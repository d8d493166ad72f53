// OverlayDevice: the compliance suite over non-zero bases (so read-modify-write mistakes show),
// persistence across close/reopen with the base untouched, refusal of mismatched bitmaps,
// stale overlay bytes never leaking, the flush ordering (data durable before its bits), and
// serialized read-modify-write under concurrency.

import assert from 'node:assert/strict';
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { BitmapError, GranuleBitmap, type BitmapStore } from '../../src/block/bitmap.js';
import { FilterDevice, type BlockDevice, type IoOptions } from '../../src/block/device.js';
import { FileDevice, FileLockedError } from '../../src/block/file.js';
import { MemoryDevice } from '../../src/block/memory.js';
import { OverlayDevice } from '../../src/block/overlay.js';
import { ReadOnlyDevice } from '../../src/block/readonly.js';
import { assertSameBytes, blockDeviceCompliance, checkExtents, pattern, readAll } from './compliance.js';

const G = 64 * 1024;

/** Base content with data and zero runs, unaligned to granules. */
function baseContent(size: number): Buffer {
  const b = pattern(77, size);
  b.fill(0, G + 100, 3 * G + 5); // a zero run
  b.fill(0, Math.max(0, size - 5000)); // a zero tail
  return b;
}

async function memoryWith(content: Buffer): Promise<MemoryDevice> {
  const mem = new MemoryDevice(content.length);
  await mem.write(0, content);
  return mem;
}

async function tmp(): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'spw-overlay-'));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

blockDeviceCompliance('overlay (64 KiB granules, memory base)', {
  writable: async (size) => {
    const t = await tmp();
    const initial = baseContent(size);
    // the base is read-only: any write reaching it would fail the test with EPERM
    const base = new ReadOnlyDevice(await memoryWith(initial));
    const device = await OverlayDevice.open(base, { path: path.join(t.dir, 'o.overlay') });
    return { device, initial, cleanup: t.cleanup };
  },
});

blockDeviceCompliance('overlay (4 KiB granules, file base)', {
  writable: async (size) => {
    const t = await tmp();
    const initial = baseContent(size);
    const basePath = path.join(t.dir, 'base.raw');
    await writeFile(basePath, initial);
    const base = await FileDevice.open(basePath, { readonly: true });
    const device = await OverlayDevice.open(base, { path: path.join(t.dir, 'o.overlay'), granularity: 4096 });
    return { device, initial, cleanup: t.cleanup };
  },
});

/** Holds data flushes at a gate and records the order of flushes and bitmap saves. */
class GatedFlush extends FilterDevice {
  gate: Promise<void> | undefined;
  constructor(
    inner: BlockDevice,
    private readonly events: string[],
  ) {
    super(inner);
  }
  get description(): string {
    return 'gated';
  }
  override async flush(opts?: IoOptions): Promise<void> {
    this.events.push('data-flush-start');
    await this.gate;
    await super.flush(opts);
    this.events.push('data-flush-end');
  }
}

class RecordingStore implements BitmapStore {
  readonly description = 'recording';
  readonly saved: Buffer[] = [];
  constructor(private readonly events: string[]) {}
  save(encoded: Buffer): Promise<void> {
    this.events.push('bitmap-save');
    this.saved.push(Buffer.from(encoded));
    return Promise.resolve();
  }
}

/** Reads that take several event-loop turns, so other requests run in between. */
class SlowReads extends FilterDevice {
  get description(): string {
    return `slow(${this.inner.description})`;
  }
  override async read(offset: number, buf: Buffer, opts?: IoOptions): Promise<void> {
    for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
    return super.read(offset, buf, opts);
  }
}

void describe('OverlayDevice specifics', () => {
  let dir = '';
  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'spw-overlay-'));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  async function baseFile(name: string, content: Buffer): Promise<string> {
    const p = path.join(dir, name);
    await writeFile(p, content);
    return p;
  }

  void it('persists across close and reopen, and never touches the base', async () => {
    const size = 20 * G + 777;
    const content = baseContent(size);
    const basePath = await baseFile('persist-base.raw', content);
    const ovPath = path.join(dir, 'persist.overlay');
    const model = Buffer.from(content);

    let ov = await OverlayDevice.open(await FileDevice.open(basePath, { readonly: true }), { path: ovPath });
    await ov.write(10, pattern(1, 100)); // partial granule: read-modify-write
    pattern(1, 100).copy(model, 10);
    await ov.write(4 * G, pattern(2, 2 * G)); // whole granules
    pattern(2, 2 * G).copy(model, 4 * G);
    await ov.trim(8 * G + 5, G); // partial trims on both sides
    model.fill(0, 8 * G + 5, 9 * G + 5);
    await ov.writeZeroes(12 * G, 3 * G, { mayTrim: true });
    model.fill(0, 12 * G, 15 * G);
    await ov.writeZeroes(16 * G + 1, G, { mayTrim: false });
    model.fill(0, 16 * G + 1, 17 * G + 1);
    await ov.write(size - 10, pattern(3, 10)); // the short last granule
    pattern(3, 10).copy(model, size - 10);
    const owned = ov.ownedGranules;
    assert.equal(owned, 1 + 2 + 2 + 3 + 2 + 1);
    await ov.close();

    assertSameBytes(await readFile(basePath), content, 'base file after the overlay was used');

    ov = await OverlayDevice.open(await FileDevice.open(basePath, { readonly: true }), { path: ovPath });
    try {
      assert.equal(ov.ownedGranules, owned);
      assertSameBytes(await readAll(ov), model, 'reopened overlay');
      await checkExtents(ov, 0, size, model);
      // owned trimmed granules are reported from the overlay: zero, even where the base has data
      const ext = await ov.blockStatus(12 * G, 3 * G);
      assert.ok(ext.every((e) => e.zero), JSON.stringify(ext));
      await ov.write(15 * G, pattern(4, 5));
      pattern(4, 5).copy(model, 15 * G);
    } finally {
      await ov.close();
    }
    ov = await OverlayDevice.open(await FileDevice.open(basePath, { readonly: true }), { path: ovPath });
    try {
      assertSameBytes(await readAll(ov), model, 'second reopen');
    } finally {
      await ov.close();
    }
    assertSameBytes(await readFile(basePath), content, 'base file at the end');
  });

  void it('refuses a bitmap that does not match, missing or damaged, and stays usable afterwards', async () => {
    const size = 8 * G;
    const basePath = await baseFile('mismatch-base.raw', baseContent(size));
    const ovPath = path.join(dir, 'mismatch.overlay');
    const openBase = () => FileDevice.open(basePath, { readonly: true, lock: false });
    const ov = await OverlayDevice.open(await openBase(), { path: ovPath });
    await ov.write(0, pattern(5, 10));
    await ov.close();

    // a refused open leaves the base to the caller, who closes it
    const refused = async (opts: { granularity?: number }, why: RegExp, base?: BlockDevice) => {
      const b = base ?? (await openBase());
      try {
        await assert.rejects(OverlayDevice.open(b, { path: ovPath, ...opts }), (err: unknown) => {
          assert.ok(err instanceof BitmapError, String(err));
          assert.match(err.message, why);
          return true;
        });
      } finally {
        await b.close();
      }
    };
    await refused({ granularity: 4096 }, /granularity is 65536 bytes but 4096 was requested/);
    {
      // without a granularity, an existing overlay keeps the one its bitmap records
      const again = await OverlayDevice.open(await openBase(), { path: ovPath });
      assert.equal(again.granularity, 65536);
      await again.close();
    }
    await refused({}, /base is \d+ bytes/, new MemoryDevice(size + 512));

    const bitmapPath = `${ovPath}.bitmap`;
    const good = await readFile(bitmapPath);
    const damaged = Buffer.from(good);
    damaged[damaged.length - 1] = (damaged[damaged.length - 1] ?? 0) ^ 0x80;
    await writeFile(bitmapPath, damaged);
    await refused({}, /checksum mismatch/);
    await rm(bitmapPath);
    await refused({}, /bitmap .* does not/);
    await writeFile(bitmapPath, good);

    // refusals released everything: the right parameters open it, with its data
    const again = await OverlayDevice.open(await openBase(), { path: ovPath });
    try {
      assertSameBytes(await readAll(again, 0, 10), pattern(5, 10), 'data after refusals');
    } finally {
      await again.close();
    }
  });

  void it('keeps a second user out of an overlay in use', async () => {
    const basePath = await baseFile('lock-base.raw', baseContent(4 * G));
    const ovPath = path.join(dir, 'lock.overlay');
    const ov = await OverlayDevice.open(await FileDevice.open(basePath, { readonly: true }), { path: ovPath });
    try {
      const base2 = await FileDevice.open(basePath, { readonly: true });
      await assert.rejects(OverlayDevice.open(base2, { path: ovPath }), FileLockedError);
      await base2.close();
    } finally {
      await ov.close();
    }
  });

  void it('never shows stale overlay bytes of a granule it does not own', async () => {
    const size = 8 * G;
    const content = baseContent(size);
    const basePath = await baseFile('stale-base.raw', content);
    const ovPath = path.join(dir, 'stale.overlay');
    const ov = await OverlayDevice.open(await FileDevice.open(basePath, { readonly: true }), { path: ovPath });
    await ov.close();
    // a crash after data was written but before its bit was saved leaves bytes like these
    const fh = await open(ovPath, 'r+');
    await fh.write(Buffer.alloc(3 * G, 0xcc), 0, 3 * G, 3 * G);
    await fh.close();

    const again = await OverlayDevice.open(await FileDevice.open(basePath, { readonly: true }), { path: ovPath });
    try {
      const model = Buffer.from(content);
      assertSameBytes(await readAll(again), model, 'unowned granules read from the base');
      await again.write(3 * G + 100, pattern(6, 10)); // partial write into a stale granule
      pattern(6, 10).copy(model, 3 * G + 100);
      await again.writeZeroes(4 * G + 1000, 10); // partial zero into another
      model.fill(0, 4 * G + 1000, 4 * G + 1010);
      await again.trim(5 * G + 10, G - 20); // partial trim into the third
      model.fill(0, 5 * G + 10, 6 * G - 10);
      assertSameBytes(await readAll(again), model, 'after partial writes over stale bytes');
      await checkExtents(again, 0, size, model);
    } finally {
      await again.close();
    }
  });

  void it('makes data durable before the bits that point at it (flush and FUA)', async () => {
    const size = 16 * G;
    const events: string[] = [];
    const base = new ReadOnlyDevice(await memoryWith(baseContent(size)));
    const data = new GatedFlush(new MemoryDevice(size), events);
    const store = new RecordingStore(events);
    const ov = new OverlayDevice(base, data, new GranuleBitmap(size, G), store);
    const savedBits = (i: number) => {
      const enc = store.saved[i];
      assert.ok(enc, `bitmap save #${i} happened`);
      return GranuleBitmap.decode(enc, { size, granularity: G }, 'saved').bitmap;
    };

    await ov.write(G + 5, pattern(7, 10));
    let open!: () => void;
    data.gate = new Promise((resolve) => (open = resolve));
    const flushing = ov.flush();
    assert.deepEqual(events, ['data-flush-start']);
    await ov.write(7 * G, pattern(8, 10)); // completes while the data flush is held
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(store.saved.length, 0, 'no bit may be saved before the data flush returns');
    open();
    await flushing;
    assert.deepEqual(events, ['data-flush-start', 'data-flush-end', 'bitmap-save']);
    assert.equal(savedBits(0).get(1), true, 'the flushed write is in the saved bitmap');
    assert.equal(savedBits(0).get(7), false, 'a write that completed during the data flush is not');

    data.gate = undefined;
    events.length = 0;
    await ov.write(9 * G, pattern(9, 10), { fua: true });
    assert.deepEqual(events, ['data-flush-start', 'data-flush-end', 'bitmap-save']);
    assert.equal(savedBits(1).get(7), true);
    assert.equal(savedBits(1).get(9), true);

    events.length = 0;
    await ov.write(9 * G + 100, pattern(10, 10)); // owned already: no new bit
    await ov.flush();
    assert.deepEqual(events, ['data-flush-start', 'data-flush-end'], 'nothing new to save');
    await ov.close();
  });

  void it('serializes read-modify-write: a partial write cannot undo a concurrent full-granule write', async () => {
    const size = 8 * G;
    const content = baseContent(size);
    const base = new SlowReads(new ReadOnlyDevice(await memoryWith(content)));
    const ov = new OverlayDevice(base, new MemoryDevice(size), new GranuleBitmap(size, G), new RecordingStore([]));
    // the partial write starts first and reads the base slowly; the full write lands meanwhile
    const partial = ov.write(3 * G + 10, Buffer.alloc(10, 0xaa));
    const full = ov.write(3 * G, Buffer.alloc(G, 0xbb));
    const manyPartials = Array.from({ length: 20 }, (_, i) => ov.write(5 * G + i * 3000, Buffer.alloc(100, i + 1)));
    await Promise.all([partial, full, ...manyPartials]);
    const g3 = await readAll(ov, 3 * G, G);
    for (let i = 0; i < G; i++) {
      const v = g3[i];
      if (i >= 10 && i < 20) assert.ok(v === 0xaa || v === 0xbb, `byte ${i} is ${v}`);
      else if (v !== 0xbb) assert.fail(`byte ${3 * G + i} is ${v}: the full-granule write was lost`);
    }
    const model = Buffer.from(content.subarray(5 * G, 6 * G));
    for (let i = 0; i < 20; i++) model.fill(i + 1, i * 3000, i * 3000 + 100);
    assertSameBytes(await readAll(ov, 5 * G, G), model, 'concurrent partial writes to one granule', 5 * G);
    await ov.close();
  });

  void it('reports block status from the overlay where it owns granules and from the base elsewhere', async () => {
    const size = 8 * G;
    const baseMem = new MemoryDevice(size);
    await baseMem.write(0, pattern(11, 4 * G)); // base: data in granules 0..3, holes after
    const ov = new OverlayDevice(new ReadOnlyDevice(baseMem), new MemoryDevice(size), new GranuleBitmap(size, G), new RecordingStore([]));
    await ov.trim(G, G); // owned, zero, over base data
    await ov.write(6 * G, pattern(12, G)); // owned data over a base hole
    assert.deepEqual(await ov.blockStatus(0, size), [
      { offset: 0, length: G, hole: false, zero: false },
      { offset: G, length: G, hole: true, zero: true },
      { offset: 2 * G, length: 2 * G, hole: false, zero: false },
      { offset: 4 * G, length: 2 * G, hole: true, zero: true },
      { offset: 6 * G, length: G, hole: false, zero: false },
      { offset: 7 * G, length: G, hole: true, zero: true },
    ]);
    assert.deepEqual(await ov.blockStatus(G + 10, 2 * G), [
      { offset: G + 10, length: G - 10, hole: true, zero: true },
      { offset: 2 * G, length: G + 10, hole: false, zero: false },
    ]);
    await ov.close();
  });

  void it('refuses bad granularity and bases of another size', async () => {
    const base = new MemoryDevice(4 * G);
    await assert.rejects(OverlayDevice.open(base, { path: path.join(dir, 'bad.overlay'), granularity: 3000 }), RangeError);
    assert.throws(() => new OverlayDevice(base, new MemoryDevice(5 * G), new GranuleBitmap(4 * G, G), new RecordingStore([])), BitmapError);
  });
});
