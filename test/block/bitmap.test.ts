// The overlay bitmap: encode/decode round trips, every damaged byte is refused, header
// mismatches are refused with a useful message, runEnd agrees with a naive scan, and
// BitmapFile replaces the file atomically.

import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { BITMAP_HEADER_SIZE, BitmapError, BitmapFile, GranuleBitmap } from '../../src/block/bitmap.js';

const G = 65536;

function bitmapWith(size: number, granularity: number, set: number[]): GranuleBitmap {
  const b = new GranuleBitmap(size, granularity);
  for (const g of set) b.setRange(g, g);
  return b;
}

void describe('GranuleBitmap', () => {
  void it('round-trips through encode/decode', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 300 }), fc.array(fc.nat(299)), fc.nat(1_000_000), (granules, set, gen) => {
        const size = granules * G - (granules > 0 ? 123 : 0);
        const b = bitmapWith(size, G, set.filter((g) => g < Math.ceil(size / G)));
        const { bitmap, generation } = GranuleBitmap.decode(b.encode(gen), { size, granularity: G }, 'test');
        assert.equal(generation, gen);
        assert.equal(bitmap.granules, b.granules);
        for (let g = 0; g < b.granules; g++) assert.equal(bitmap.get(g), b.get(g));
      }),
    );
  });

  void it('refuses a bitmap with any single damaged byte', () => {
    const size = 100 * G + 5;
    const good = bitmapWith(size, G, [0, 3, 64, 100]).encode(7);
    fc.assert(
      fc.property(fc.nat(good.length - 1), fc.integer({ min: 1, max: 255 }), (pos, xor) => {
        const bad = Buffer.from(good);
        bad[pos] = (bad[pos] ?? 0) ^ xor;
        assert.throws(() => GranuleBitmap.decode(bad, { size, granularity: G }, 'x'), BitmapError);
      }),
    );
  });

  void it('refuses mismatched size, granularity, truncation and foreign files with a clear reason', () => {
    const size = 10 * G;
    const enc = bitmapWith(size, G, [1]).encode(1);
    assert.throws(() => GranuleBitmap.decode(enc, { size: size + 1, granularity: G }, 'b'), /655360-byte device but the base is 655361/);
    assert.throws(() => GranuleBitmap.decode(enc, { size, granularity: 4096 }, 'b'), /granularity is 65536 bytes but 4096 was requested/);
    assert.throws(() => GranuleBitmap.decode(enc.subarray(0, enc.length - 1), { size, granularity: G }, 'b'), BitmapError);
    assert.throws(() => GranuleBitmap.decode(Buffer.from('QFI\xfb not a bitmap at all, really not at all....'), { size, granularity: G }, 'b'), /bad magic/);
    assert.throws(() => GranuleBitmap.decode(Buffer.alloc(3), { size, granularity: G }, 'b'), /bad magic/);
    assert.equal(enc.length, BITMAP_HEADER_SIZE + 2);
  });

  void it('finds run ends like a naive scan', () => {
    fc.assert(
      fc.property(fc.array(fc.nat(199)), fc.nat(199), fc.nat(200), (set, g, lim) => {
        const b = bitmapWith(200 * 4096, 4096, set);
        const limit = Math.max(g + 1, lim);
        let naive = g + 1;
        while (naive < limit && b.get(naive) === b.get(g)) naive++;
        assert.equal(b.runEnd(g, limit), naive);
      }),
    );
  });

  void it('counts versions only when a bit changes', () => {
    const b = new GranuleBitmap(4 * G, G);
    assert.equal(b.setRange(1, 2), true);
    const v = b.version;
    assert.equal(b.setRange(1, 1), false);
    assert.equal(b.version, v);
    assert.equal(b.count(), 2);
    assert.throws(() => new GranuleBitmap(100, 3000), RangeError);
  });
});

void describe('BitmapFile', () => {
  void it('saves atomically (no temp file left) and loads what it saved; null when missing', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'spw-bitmap-'));
    try {
      const file = new BitmapFile(path.join(dir, 'o.bitmap'));
      assert.equal(await file.load(), null);
      const a = bitmapWith(8 * G, G, [2]).encode(1);
      const b = bitmapWith(8 * G, G, [2, 5]).encode(2);
      await Promise.all([file.save(a), file.save(b)]); // serialized, last one wins
      assert.ok((await file.load())?.equals(b));
      assert.deepEqual(await readdir(dir), ['o.bitmap']);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
