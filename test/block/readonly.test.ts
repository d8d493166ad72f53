// ReadOnlyDevice: the read-only half of the compliance suite over memory and over a file, plus
// checks that refused writes never reach the layer below and that reads pass through.

import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'node:test';
import { BlockError, FilterDevice, type IoOptions } from '../../src/block/device.js';
import { FileDevice } from '../../src/block/file.js';
import { MemoryDevice } from '../../src/block/memory.js';
import { ReadOnlyDevice } from '../../src/block/readonly.js';
import { blockDeviceCompliance, pattern } from './compliance.js';

async function memoryWith(content: Buffer): Promise<MemoryDevice> {
  const mem = new MemoryDevice(content.length);
  for (let off = 0; off < content.length; off += 4096) {
    const chunk = content.subarray(off, Math.min(off + 4096, content.length));
    if (chunk.some((b) => b !== 0)) await mem.write(off, chunk);
  }
  return mem;
}

blockDeviceCompliance('readonly(memory)', {
  readonly: async (content) => ({ device: new ReadOnlyDevice(await memoryWith(content)) }),
});

blockDeviceCompliance('readonly(file)', {
  readonly: async (content) => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'spw-ro-'));
    const file = path.join(dir, 'img.raw');
    await writeFile(file, content);
    // a read-write file below: only the filter stands between the caller and the data
    const device = new ReadOnlyDevice(await FileDevice.open(file));
    return { device, cleanup: () => rm(dir, { recursive: true, force: true }) };
  },
});

/** Counts what reaches the inner device. */
class Recorder extends FilterDevice {
  readonly calls: string[] = [];
  get description(): string {
    return `recorder(${this.inner.description})`;
  }
  override write(offset: number, data: Buffer, opts?: IoOptions): Promise<void> {
    this.calls.push('write');
    return super.write(offset, data, opts);
  }
  override trim(offset: number, length: number, opts?: IoOptions): Promise<void> {
    this.calls.push('trim');
    return super.trim(offset, length, opts);
  }
  override writeZeroes(offset: number, length: number, opts?: IoOptions): Promise<void> {
    this.calls.push('writeZeroes');
    return super.writeZeroes(offset, length, opts);
  }
  override read(offset: number, buf: Buffer, opts?: IoOptions): Promise<void> {
    this.calls.push('read');
    return super.read(offset, buf, opts);
  }
  override flush(opts?: IoOptions): Promise<void> {
    this.calls.push('flush');
    return super.flush(opts);
  }
}

void describe('ReadOnlyDevice specifics', () => {
  void it('turns off every write capability and keeps the rest', () => {
    const inner = new MemoryDevice(4096);
    const ro = new ReadOnlyDevice(inner);
    assert.deepEqual(ro.capabilities, {
      ...inner.capabilities,
      writable: false,
      fua: false,
      trim: false,
      zero: false,
      fastZero: false,
    });
    assert.equal(ro.description, 'readonly(memory:4096)');
    assert.equal(inner.capabilities.writable, true, 'the inner device is not changed');
  });

  void it('never lets a write path reach the inner device', async () => {
    const rec = new Recorder(new MemoryDevice(65536));
    await rec.write(0, pattern(1, 100));
    rec.calls.length = 0;
    const ro = new ReadOnlyDevice(rec);
    const refused = (err: unknown) => err instanceof BlockError && err.errno === 'EPERM' && /read-only/.test(err.message);
    await assert.rejects(ro.write(0, Buffer.alloc(10)), refused);
    await assert.rejects(ro.trim(0, 10), refused);
    await assert.rejects(ro.writeZeroes(0, 10, { mayTrim: true }), refused);
    const buf = Buffer.alloc(100);
    await ro.read(0, buf);
    await ro.flush();
    assert.deepEqual(rec.calls, ['read', 'flush']);
    assert.ok(buf.equals(pattern(1, 100)));
  });
});
