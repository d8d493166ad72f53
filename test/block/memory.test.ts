// MemoryDevice: the compliance suite, plus its sparseness (pages allocated on write, holes in
// blockStatus, whole-page zeroing frees pages).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { MemoryDevice } from '../../src/block/memory.js';
import { blockDeviceCompliance, pattern } from './compliance.js';

blockDeviceCompliance('memory (64 KiB pages)', { writable: (size) => Promise.resolve({ device: new MemoryDevice(size) }) });
blockDeviceCompliance('memory (4 KiB pages)', {
  writable: (size) => Promise.resolve({ device: new MemoryDevice(size, { pageSize: 4096 }) }),
});

void describe('MemoryDevice specifics', () => {
  const P = 64 * 1024;

  void it('allocates pages only on write and reports the others as holes', async () => {
    const dev = new MemoryDevice(10 * P + 5);
    assert.equal(dev.allocatedBytes, 0);
    assert.deepEqual(await dev.blockStatus(0, dev.size), [{ offset: 0, length: dev.size, hole: true, zero: true }]);
    await dev.write(P + 10, pattern(1, 20)); // page 1
    await dev.write(4 * P - 1, pattern(2, 2)); // pages 3 and 4
    await dev.write(10 * P, pattern(3, 5)); // the short last page
    assert.equal(dev.allocatedBytes, 4 * P);
    assert.deepEqual(await dev.blockStatus(0, dev.size), [
      { offset: 0, length: P, hole: true, zero: true },
      { offset: P, length: P, hole: false, zero: false },
      { offset: 2 * P, length: P, hole: true, zero: true },
      { offset: 3 * P, length: 2 * P, hole: false, zero: false },
      { offset: 5 * P, length: 5 * P, hole: true, zero: true },
      { offset: 10 * P, length: 5, hole: false, zero: false },
    ]);
    // a sub-range starts exactly at the requested offset
    assert.deepEqual(await dev.blockStatus(P + 100, P), [
      { offset: P + 100, length: P - 100, hole: false, zero: false },
      { offset: 2 * P, length: 100, hole: true, zero: true },
    ]);
    await dev.close();
  });

  void it('frees whole pages on trim/writeZeroes and zero-fills partial ones', async () => {
    const dev = new MemoryDevice(4 * P);
    await dev.write(0, pattern(4, 4 * P));
    await dev.trim(P, P);
    await dev.writeZeroes(2 * P + 1, P - 2);
    assert.equal(dev.allocatedBytes, 3 * P);
    const buf = Buffer.alloc(P);
    await dev.read(2 * P, buf);
    assert.equal(buf[0], pattern(4, 2 * P + 1)[2 * P]);
    assert.ok(buf.subarray(1, P - 1).every((b) => b === 0));
    await dev.close();
  });

  void it('rejects bad construction parameters and requests after close', async () => {
    assert.throws(() => new MemoryDevice(-1), RangeError);
    assert.throws(() => new MemoryDevice(100, { pageSize: 3000 }), RangeError);
    const dev = new MemoryDevice(100);
    await dev.close();
    await assert.rejects(dev.read(0, Buffer.alloc(1)), { errno: 'ESHUTDOWN' });
  });
});
