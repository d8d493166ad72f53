// The shared BlockDevice compliance suite. Every layer runs it in a few lines:
//
//   blockDeviceCompliance('memory', { writable: async (size) => ({ device: new MemoryDevice(size) }) });
//
// A writable factory returns a fresh device (reading as zeroes, or as `initial` when given);
// a read-only factory returns a device presenting exactly `content`. Contents are checked
// against a Buffer model, including a fast-check model test of random operation sequences.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { BlockError, blockStatusOf, type BlockDevice, type Extent } from '../../src/block/device.js';

export interface DeviceUnderTest {
  readonly device: BlockDevice;
  /** what the device reads as when fresh; default all zeroes. */
  readonly initial?: Buffer;
  /** called after device.close(). */
  readonly cleanup?: () => Promise<void>;
}

export interface ComplianceFactory {
  /** a fresh writable device of `size` bytes. */
  readonly writable?: (size: number) => Promise<DeviceUnderTest>;
  /** a read-only device whose contents are exactly `content`. */
  readonly readonly?: (content: Buffer) => Promise<DeviceUnderTest>;
  /** device size for the suite; default 1 MiB + 4 KiB + 123 (unaligned on purpose). */
  readonly size?: number;
  /** fast-check runs of the model test; default 40. */
  readonly modelRuns?: number;
}

export const DEFAULT_SIZE = 1024 * 1024 + 4096 + 123;
const G = 64 * 1024; // a common granule/page size: tests cross it on purpose

/** Deterministic non-zero bytes (1..255) so "reads as zero" can never pass by accident. */
export function pattern(seed: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = ((seed * 131 + i * 7 + (i >> 9) * 3) % 255) + 1;
  return b;
}

export function isZero(buf: Buffer): boolean {
  for (const byte of buf) if (byte !== 0) return false;
  return true;
}

/** assert.ok(a.equals(b)) with the first differing offset in the message. */
export function assertSameBytes(actual: Buffer, expected: Buffer, what: string, base = 0): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  if (actual.equals(expected)) return;
  let i = 0;
  while (i < actual.length && actual[i] === expected[i]) i++;
  assert.fail(`${what}: first difference at device offset ${base + i}: got ${actual[i]}, expected ${expected[i]}`);
}

export async function readAll(dev: BlockDevice, offset = 0, length = dev.size - offset): Promise<Buffer> {
  const buf = Buffer.alloc(length, 0xee);
  await dev.read(offset, buf);
  return buf;
}

/**
 * Query blockStatus over [offset, offset + length) (re-asking where a reply stops early) and
 * check the contract: non-empty replies, extents contiguous from `offset`, in order, positive,
 * inside the range, and `zero` only where `model` is zero. Returns the extents.
 */
export async function checkExtents(dev: BlockDevice, offset: number, length: number, model: Buffer): Promise<Extent[]> {
  const end = offset + length;
  const all: Extent[] = [];
  let pos = offset;
  for (let calls = 0; pos < end; calls++) {
    assert.ok(calls < 100_000, 'blockStatus makes no progress');
    const got = await blockStatusOf(dev, pos, end - pos);
    assert.ok(got.length > 0, `blockStatus(${pos}, ${end - pos}) returned no extents`);
    for (const e of got) {
      assert.equal(e.offset, pos, `extent ${JSON.stringify(e)} is not contiguous/in order (expected offset ${pos})`);
      assert.ok(Number.isSafeInteger(e.length) && e.length > 0, `extent ${JSON.stringify(e)} has a bad length`);
      assert.ok(e.offset + e.length <= end, `extent ${JSON.stringify(e)} goes past the requested end ${end}`);
      assert.equal(typeof e.hole, 'boolean');
      assert.equal(typeof e.zero, 'boolean');
      if (e.zero) {
        assert.ok(isZero(model.subarray(e.offset, e.offset + e.length)), `extent ${JSON.stringify(e)} claims zeroes over data`);
      }
      all.push(e);
      pos += e.length;
    }
  }
  return all;
}

async function rejectsWith(p: Promise<unknown>, errno: string, what: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof BlockError, `${what}: expected a BlockError, got ${String(err)}`);
    assert.equal(err.errno, errno, `${what}: errno`);
    return true;
  });
}

async function withDevice(
  make: () => Promise<DeviceUnderTest>,
  fn: (dev: BlockDevice, model: Buffer) => Promise<void>,
): Promise<void> {
  const dut = await make();
  try {
    const model = dut.initial ? Buffer.from(dut.initial) : Buffer.alloc(dut.device.size);
    assert.equal(model.length, dut.device.size, 'initial content must be as large as the device');
    await fn(dut.device, model);
  } finally {
    await dut.device.close();
    await dut.device.close(); // idempotent
    await dut.cleanup?.();
  }
}

/** Apply an operation to device and model alike. */
async function doWrite(dev: BlockDevice, model: Buffer, offset: number, data: Buffer, fua = false): Promise<void> {
  await dev.write(offset, data, { fua });
  data.copy(model, offset);
}
async function doZero(dev: BlockDevice, model: Buffer, offset: number, length: number, mayTrim: boolean): Promise<void> {
  await dev.writeZeroes(offset, length, { mayTrim });
  model.fill(0, offset, offset + length);
}
async function doTrim(dev: BlockDevice, model: Buffer, offset: number, length: number): Promise<void> {
  await dev.trim(offset, length);
  model.fill(0, offset, offset + length);
}

async function expectModel(dev: BlockDevice, model: Buffer, what: string): Promise<void> {
  assertSameBytes(await readAll(dev), model, what);
}

export function blockDeviceCompliance(name: string, factory: ComplianceFactory): void {
  const size = factory.size ?? DEFAULT_SIZE;
  void describe(`${name}: BlockDevice compliance`, () => {
    const writable = factory.writable;
    if (writable) writableSuite(writable, size, factory.modelRuns ?? 40);
    const readonly = factory.readonly;
    if (readonly) readOnlySuite(readonly, size);
  });
}

function writableSuite(makeOfSize: (size: number) => Promise<DeviceUnderTest>, size: number, modelRuns: number): void {
  const make = () => makeOfSize(size);
  void it('has the expected size and capabilities and reads as its initial content', () =>
    withDevice(make, async (dev, model) => {
      assert.equal(dev.size, size);
      assert.equal(dev.capabilities.writable, true);
      assert.ok(dev.description.length > 0);
      const bs = dev.capabilities.blockSize;
      assert.ok(bs.minimum >= 1 && bs.minimum <= bs.preferred && bs.preferred <= bs.maximum, JSON.stringify(bs));
      if (dev.capabilities.fastZero) assert.ok(dev.capabilities.writable, 'fastZero needs a writable device');
      await expectModel(dev, model, 'fresh device');
      await checkExtents(dev, 0, size, model);
    }));

  void it('reads back writes at aligned, unaligned and granule-crossing offsets', () =>
    withDevice(make, async (dev, model) => {
      const cases: Array<[number, number]> = [
        [0, 4096],
        [3 * 4096, 8192],
        [1, 1],
        [1000, 5000],
        [G - 100, 300],
        [2 * G - 1, 2 * G + 2],
        [5 * G + 17, 3 * G + 5],
      ];
      let seed = 1;
      for (const [off, len] of cases) {
        await doWrite(dev, model, off, pattern(seed++, len));
        assertSameBytes(await readAll(dev, off, len), model.subarray(off, off + len), `read back ${off}+${len}`, off);
        // unaligned sub-reads of what was just written
        if (len > 2) assertSameBytes(await readAll(dev, off + 1, len - 2), model.subarray(off + 1, off + len - 1), 'sub-read', off + 1);
      }
      // overwrite in the middle of earlier writes
      await doWrite(dev, model, 2 * G - 50, pattern(seed++, 100));
      await expectModel(dev, model, 'after writes');
      await checkExtents(dev, 0, size, model);
    }));

  void it('treats zero-length operations as no-ops, at any offset including the end', () =>
    withDevice(make, async (dev, model) => {
      await doWrite(dev, model, 0, pattern(7, 3 * G));
      for (const off of [0, 12345, G, size]) {
        await dev.read(off, Buffer.alloc(0));
        await dev.write(off, Buffer.alloc(0));
        await dev.writeZeroes(off, 0);
        await dev.writeZeroes(off, 0, { mayTrim: true });
        if (dev.capabilities.trim) await dev.trim(off, 0);
      }
      await expectModel(dev, model, 'after zero-length ops');
    }));

  void it('writes, zeroes and reads at the very end of the device', () =>
    withDevice(make, async (dev, model) => {
      await doWrite(dev, model, size - 1, pattern(3, 1));
      await doWrite(dev, model, size - 4097, pattern(4, 4096));
      const lastGranule = Math.floor((size - 1) / G) * G;
      await doWrite(dev, model, lastGranule, pattern(5, size - lastGranule));
      assertSameBytes(await readAll(dev, size - 5000), model.subarray(size - 5000), 'tail', size - 5000);
      await doZero(dev, model, size - 10, 10, false);
      await doZero(dev, model, size - 3000, 1000, true);
      await expectModel(dev, model, 'after tail ops');
      await checkExtents(dev, lastGranule - G, size - lastGranule + G, model);
    }));

  void it('refuses ranges past the end with EINVAL and changes nothing', () =>
    withDevice(make, async (dev, model) => {
      await doWrite(dev, model, size - 4096, pattern(9, 4096));
      await rejectsWith(dev.write(size - 1, Buffer.alloc(2, 1)), 'EINVAL', 'write past end');
      await rejectsWith(dev.read(size, Buffer.alloc(1)), 'EINVAL', 'read past end');
      await rejectsWith(dev.writeZeroes(size - 1, 2), 'EINVAL', 'writeZeroes past end');
      await expectModel(dev, model, 'after refused ops');
    }));

  void it('reads zeroes after trim', async (t) => {
    await withDevice(make, async (dev, model) => {
      if (!dev.capabilities.trim) {
        t.skip('device does not advertise trim');
        return;
      }
      await doWrite(dev, model, 0, pattern(11, 8 * G));
      await doTrim(dev, model, 4096, G);
      await doTrim(dev, model, 100, 200); // inside one page/granule
      await doTrim(dev, model, 3 * G - 50, 100); // across a boundary
      await doTrim(dev, model, 5 * G, 2 * G); // whole granules
      await expectModel(dev, model, 'after trims');
      await checkExtents(dev, 0, size, model);
    });
  });

  void it('writeZeroes with and without mayTrim zeroes exactly the range', () =>
    withDevice(make, async (dev, model) => {
      await doWrite(dev, model, 0, pattern(13, 8 * G + 999));
      await doZero(dev, model, 10, 20, false);
      await doZero(dev, model, G - 1000, 3000, false);
      await doZero(dev, model, 2 * G, 2 * G, false);
      await doZero(dev, model, 4 * G + 1, 2 * G - 2, true);
      await doZero(dev, model, 7 * G - 7, 14, true);
      await expectModel(dev, model, 'after writeZeroes');
      await checkExtents(dev, 0, size, model);
      // zeroes over zeroes, and writing again over zeroed ranges
      await doZero(dev, model, 2 * G, 3 * G, true);
      await doWrite(dev, model, 2 * G + 5, pattern(14, 1000));
      await expectModel(dev, model, 'after rewrite over zeroes');
    }));

  void it('honours fastOnly consistently with capabilities.fastZero', async (t) => {
    await withDevice(make, async (dev, model) => {
      if (!dev.capabilities.fastZero) {
        t.skip('device does not advertise fastZero (callers never send fastOnly)');
        return;
      }
      await doWrite(dev, model, 0, pattern(15, 4 * G));
      for (const [off, len, mayTrim] of [[0, G, false], [G + 10, G, true], [3 * G + 1, 100, false]] as const) {
        try {
          await dev.writeZeroes(off, len, { fastOnly: true, mayTrim });
          model.fill(0, off, off + len);
        } catch (err) {
          assert.ok(err instanceof BlockError && err.errno === 'ENOTSUP', `fastOnly may only fail with ENOTSUP, got ${String(err)}`);
          // the caller falls back to a normal writeZeroes
          await doZero(dev, model, off, len, mayTrim);
        }
      }
      await expectModel(dev, model, 'after fastOnly zeroes');
    });
  });

  void it('reports block status that is contiguous, in order, covering and consistent', () =>
    withDevice(make, async (dev, model) => {
      await doWrite(dev, model, 0, pattern(17, 2 * G));
      await doWrite(dev, model, 5 * G + 123, pattern(18, 10_000));
      if (dev.capabilities.trim) await doTrim(dev, model, G, G / 2);
      await doZero(dev, model, 5 * G + 200, 500, true);
      await doWrite(dev, model, size - 10, pattern(19, 10));
      await checkExtents(dev, 0, size, model);
      for (const [off, len] of [
        [0, 1],
        [1, 1],
        [G - 1, 2],
        [G + 7, 3 * G],
        [5 * G + 150, 700],
        [size - 1, 1],
        [size - 20_000, 20_000],
      ] as const) {
        await checkExtents(dev, off, len, model);
      }
      // data that was written is never reported as zero
      const ext = await checkExtents(dev, 5 * G + 123, 50, model);
      assert.ok(ext.every((e) => !e.zero), 'written data reported as zero');
    }));

  void it('accepts flush and FUA requests without changing contents', () =>
    withDevice(make, async (dev, model) => {
      await doWrite(dev, model, 100, pattern(21, 5000), true);
      await dev.flush();
      await dev.writeZeroes(200, 100, { fua: true });
      model.fill(0, 200, 300);
      if (dev.capabilities.trim) {
        await dev.trim(G, 1000, { fua: true });
        model.fill(0, G, G + 1000);
      }
      await dev.flush();
      await expectModel(dev, model, 'after fua/flush');
    }));

  void it('keeps every piece of concurrent writes to disjoint bytes of the same granule', () =>
    withDevice(make, async (dev, model) => {
      const ops: Array<Promise<void>> = [];
      for (let i = 0; i < 48; i++) {
        // scattered, unaligned, inside granules 2 and 3, interleaved with zeroing in granule 4
        const off = 2 * G + i * 2711;
        const data = pattern(100 + i, 700);
        data.copy(model, off);
        ops.push(dev.write(off, data));
        if (i % 8 === 0) {
          const zoff = 4 * G + i * 1000 + 5;
          model.fill(0, zoff, zoff + 300);
          ops.push(dev.writeZeroes(zoff, 300, { mayTrim: i % 16 === 0 }));
        }
      }
      await Promise.all(ops);
      await expectModel(dev, model, 'after concurrent disjoint writes');
    }));

  void it('leaves each byte of concurrent overlapping operations with a value one of them wrote', () =>
    withDevice(make, async (dev, model) => {
      await doWrite(dev, model, 0, pattern(31, 8 * G));
      // candidates per byte: the values of the operations covering it (0 for zeroing), as a
      // bit mask of operation indexes per byte
      const covering = new Uint16Array(size);
      const values: number[] = [];
      const ops: Array<Promise<void>> = [];
      const cover = (off: number, len: number, value: number): void => {
        const bit = 1 << values.length;
        values.push(value);
        for (let i = off; i < off + len; i++) covering[i] = (covering[i] ?? 0) | bit;
      };
      const isCandidate = (i: number, v: number): boolean => {
        const mask = covering[i] ?? 0;
        return values.some((value, k) => (mask & (1 << k)) !== 0 && value === v);
      };
      const describe = (i: number): string => values.filter((_, k) => ((covering[i] ?? 0) & (1 << k)) !== 0).join(',');
      const ranges: Array<[number, number, 'w' | 'z' | 't']> = [
        [G - 500, 2000, 'w'],
        [G, G, 'w'],
        [G + 100, 50, 'w'],
        [G + 120, 5000, 'z'],
        [2 * G - 1, 3, 'w'],
        [3 * G, 2 * G, 't'],
        [3 * G + 7, 100, 'w'],
        [4 * G - 10, G + 20, 'w'],
        [4 * G, G, 'z'],
      ];
      ranges.forEach(([off, len, kind], i) => {
        if (kind === 'w') {
          cover(off, len, 40 + i);
          ops.push(dev.write(off, Buffer.alloc(len, 40 + i)));
        } else if (kind === 'z') {
          cover(off, len, 0);
          ops.push(dev.writeZeroes(off, len));
        } else if (dev.capabilities.trim) {
          cover(off, len, 0);
          ops.push(dev.trim(off, len));
        }
      });
      // concurrent reads see, per byte, the old value or one of the new ones
      const readOff = G - 600;
      const before = Buffer.from(model.subarray(readOff, readOff + 3 * G));
      const during = Buffer.alloc(3 * G);
      ops.push(dev.read(readOff, during));
      await Promise.all(ops);
      const after = await readAll(dev);
      for (let i = 0; i < size; i++) {
        const v = after[i] ?? -1;
        if (covering[i] !== 0) {
          if (!isCandidate(i, v)) assert.fail(`byte ${i} is ${v}, not one of ${describe(i)} (lost or torn write)`);
        }
        else if (v !== model[i]) assert.fail(`byte ${i} outside every operation changed from ${model[i]} to ${v}`);
      }
      for (let i = 0; i < during.length; i++) {
        const d = during[i] ?? -1;
        if (d !== before[i] && !isCandidate(readOff + i, d)) {
          assert.fail(`concurrent read saw ${d} at ${readOff + i}: neither old (${before[i]}) nor new (${describe(readOff + i)})`);
        }
      }
    }));

  void it('matches a Buffer model over random sequences of write/trim/zero/read (fast-check)', async () => {
    const sz = Math.min(size, 4 * G + 777);
    const range = fc
      .tuple(fc.nat({ max: sz }), fc.nat({ max: 2 * G + 100 }))
      .map(([off, len]) => [off, Math.min(len, sz - off)] as const);
    const command = fc.oneof(
      fc.record({ op: fc.constant('write' as const), r: range, seed: fc.nat(1000) }),
      fc.record({ op: fc.constant('trim' as const), r: range }),
      fc.record({ op: fc.constant('zero' as const), r: range, mayTrim: fc.boolean() }),
      fc.record({ op: fc.constant('read' as const), r: range }),
      fc.record({ op: fc.constant('status' as const), r: range }),
      fc.record({ op: fc.constant('flush' as const) }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(command, { minLength: 1, maxLength: 25 }), async (cmds) => {
        const dut = await makeOfSize(sz);
        await withDevice(
          () => Promise.resolve(dut),
          async (dev, model) => {
            for (const c of cmds) {
              switch (c.op) {
                case 'write':
                  await doWrite(dev, model, c.r[0], pattern(c.seed, c.r[1]));
                  break;
                case 'trim':
                  if (dev.capabilities.trim) await doTrim(dev, model, c.r[0], c.r[1]);
                  break;
                case 'zero':
                  await doZero(dev, model, c.r[0], c.r[1], c.mayTrim);
                  break;
                case 'read':
                  assertSameBytes(await readAll(dev, c.r[0], c.r[1]), model.subarray(c.r[0], c.r[0] + c.r[1]), 'model read', c.r[0]);
                  break;
                case 'status':
                  if (c.r[1] > 0) await checkExtents(dev, c.r[0], c.r[1], model);
                  break;
                case 'flush':
                  await dev.flush();
                  break;
              }
            }
            await expectModel(dev, model, 'model end state');
            await checkExtents(dev, 0, dev.size, model);
          },
        );
      }),
      { numRuns: modelRuns },
    );
  });
}

function readOnlySuite(make: (content: Buffer) => Promise<DeviceUnderTest>, size: number): void {
  const content = Buffer.alloc(size);
  pattern(51, 3 * G).copy(content, 0);
  pattern(52, 5000).copy(content, 6 * G + 333);
  pattern(53, 4096).copy(content, size - 4096);
  const open = () => make(content);

  void it('read-only: says so in its capabilities and reads its content', () =>
    withDevice(open, async (dev) => {
      assert.equal(dev.size, size);
      assert.equal(dev.capabilities.writable, false);
      assert.equal(dev.capabilities.fastZero, false, 'a read-only device cannot advertise fastZero');
      assertSameBytes(await readAll(dev), content, 'read-only content');
      for (const [off, len] of [[0, 0], [1, 10], [G - 3, 6], [6 * G + 300, 100], [size - 1, 1], [size, 0]] as const) {
        assertSameBytes(await readAll(dev, off, len), content.subarray(off, off + len), 'sub-read', off);
      }
    }));

  void it('read-only: refuses write, trim and writeZeroes with EPERM and changes nothing', () =>
    withDevice(open, async (dev) => {
      await rejectsWith(dev.write(0, Buffer.alloc(10, 1)), 'EPERM', 'write');
      await rejectsWith(dev.write(G, Buffer.alloc(10, 1), { fua: true }), 'EPERM', 'fua write');
      await rejectsWith(dev.trim(0, G), 'EPERM', 'trim');
      await rejectsWith(dev.writeZeroes(0, G), 'EPERM', 'writeZeroes');
      await rejectsWith(dev.writeZeroes(0, G, { mayTrim: true }), 'EPERM', 'writeZeroes mayTrim');
      await dev.flush();
      assertSameBytes(await readAll(dev), content, 'content after refused writes');
    }));

  void it('read-only: block status is consistent with the content', () =>
    withDevice(open, async (dev) => {
      await checkExtents(dev, 0, size, content);
      const ext = await checkExtents(dev, 6 * G + 333, 5000, content);
      assert.ok(ext.every((e) => !e.zero), 'data reported as zero');
    }));

  void it('read-only: concurrent reads all return the right bytes', () =>
    withDevice(open, async (dev) => {
      const reads = Array.from({ length: 32 }, (_, i) => {
        const off = (i * 33_333) % (size - 70_000);
        const buf = Buffer.alloc(70_000);
        return dev.read(off, buf).then(() => assertSameBytes(buf, content.subarray(off, off + 70_000), 'concurrent read', off));
      });
      await Promise.all(reads);
    }));
}
