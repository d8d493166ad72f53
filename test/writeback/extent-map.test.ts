// ExtentMap and PolicyMap against byte-array models (fast-check).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';

import { ExtentMap } from '../../src/writeback/extent-map.js';
import { PolicyMap, WRITE_POLICIES, type WritePolicy } from '../../src/writeback/policy.js';
import { chunksOfExtents, frames } from '../../src/writeback/shipper.js';
import { MAX_EPOCH_EXTENT } from '../../src/link/protocol.js';

const RUNS = Number(process.env.SPILLWAY_FUZZ_RUNS ?? 200);
const SIZE = 4096;

const op = fc.oneof(
  fc.record({ kind: fc.constant('write' as const), offset: fc.integer({ min: 0, max: SIZE - 1 }), length: fc.integer({ min: 1, max: 600 }), seed: fc.integer({ min: 1, max: 250 }) }),
  fc.record({ kind: fc.constant('zero' as const), offset: fc.integer({ min: 0, max: SIZE - 1 }), length: fc.integer({ min: 1, max: 600 }) }),
);

test('ExtentMap: last write wins; query pieces tile the range; bytes and extents stay consistent', () => {
  fc.assert(
    fc.property(fc.array(op, { maxLength: 60 }), fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: SIZE }), (ops, qOff, qLen) => {
      const m = new ExtentMap();
      // model: -1 = hole, 256 = zero, else byte value
      const model = new Int16Array(SIZE).fill(-1);
      for (const o of ops) {
        const len = Math.min(o.length, SIZE - o.offset);
        if (o.kind === 'write') {
          const data = Buffer.alloc(len);
          for (let i = 0; i < len; i++) data[i] = (o.seed + i) & 0xff;
          m.write(o.offset, data);
          for (let i = 0; i < len; i++) model[o.offset + i] = data[i]!;
        } else {
          m.zero(o.offset, len);
          model.fill(256, o.offset, o.offset + len);
        }
      }
      let covered = 0;
      for (const v of model) if (v !== -1) covered++;
      assert.equal(m.bytes, covered);
      let prevEnd = -1;
      for (const e of m.extents()) {
        assert.ok(e.offset >= prevEnd && e.length > 0, 'extents sorted, non-overlapping, non-empty');
        prevEnd = e.offset + e.length;
      }
      const len = Math.min(qLen, SIZE - qOff);
      let pos = qOff;
      for (const p of m.query(qOff, len)) {
        assert.equal(p.offset, pos, 'pieces tile the range in order');
        for (let i = 0; i < p.length; i++) {
          const want = model[p.offset + i]!;
          if (p.kind === 'hole') assert.equal(want, -1);
          else if (p.kind === 'zero') assert.equal(want, 256);
          else assert.equal(p.data[i], want);
        }
        pos += p.length;
      }
      assert.equal(pos, qOff + len);
      assert.equal(m.overlaps(qOff, len), model.subarray(qOff, qOff + len).some((v) => v !== -1));
    }),
    { numRuns: RUNS * 5 },
  );
});

test('ExtentMap.merge applies the other map as later writes', () => {
  fc.assert(
    fc.property(fc.array(op, { maxLength: 20 }), fc.array(op, { maxLength: 20 }), (a, b) => {
      const apply = (m: ExtentMap, ops: typeof a) => {
        for (const o of ops) {
          const len = Math.min(o.length, SIZE - o.offset);
          if (o.kind === 'write') m.write(o.offset, Buffer.alloc(len, o.seed));
          else m.zero(o.offset, len);
        }
      };
      const one = new ExtentMap();
      apply(one, [...a, ...b]);
      const x = new ExtentMap();
      const y = new ExtentMap();
      apply(x, a);
      apply(y, b);
      x.merge(y);
      assert.deepEqual(x.query(0, SIZE).map((p) => [p.offset, p.length, p.kind, p.kind === 'data' ? p.data.toString('hex') : '']), one.query(0, SIZE).map((p) => [p.offset, p.length, p.kind, p.kind === 'data' ? p.data.toString('hex') : '']));
    }),
    { numRuns: RUNS },
  );
});

test('frames: merge adjacent extents of one kind, split long ones, never exceed the frame limit, cover exactly the extents', () => {
  const m = new ExtentMap();
  m.write(0, Buffer.alloc(1000, 1));
  m.write(1000, Buffer.alloc(1000, 2)); // adjacent data: one frame
  m.zero(2000, 3 * MAX_EPOCH_EXTENT + 5); // long zero: split
  m.write(2000 + 3 * MAX_EPOCH_EXTENT + 5, Buffer.alloc(10, 3));
  const f = frames(m.extents());
  assert.deepEqual(
    f.map((x) => [x.offset, x.length, x.data === null]),
    [
      [0, 2000, false],
      [2000, MAX_EPOCH_EXTENT, true],
      [2000 + MAX_EPOCH_EXTENT, MAX_EPOCH_EXTENT, true],
      [2000 + 2 * MAX_EPOCH_EXTENT, MAX_EPOCH_EXTENT, true],
      [2000 + 3 * MAX_EPOCH_EXTENT, 5, true],
      [2000 + 3 * MAX_EPOCH_EXTENT + 5, 10, false],
    ],
  );
  assert.equal(f[0]!.data!.subarray(999, 1001).toString('hex'), '0102');
  assert.deepEqual(chunksOfExtents(m.extents(), 65536), [...Array(Math.floor((2000 + 3 * MAX_EPOCH_EXTENT + 14) / 65536) + 1).keys()]);
});

test('PolicyMap: later ranges win, pieces cover the volume, split follows the model', () => {
  const pol = fc.constantFrom(...WRITE_POLICIES);
  fc.assert(
    fc.property(pol, fc.array(fc.record({ offset: fc.integer({ min: 0, max: 5000 }), length: fc.integer({ min: 0, max: 3000 }), policy: pol }), { maxLength: 8 }), fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: SIZE }), (def, ranges, off, len0) => {
      const pm = new PolicyMap(SIZE, def, ranges.map((r) => ({ ...r, source: 'test' })));
      const model: WritePolicy[] = new Array<WritePolicy>(SIZE).fill(def);
      for (const r of ranges) for (let i = r.offset; i < Math.min(SIZE, r.offset + r.length); i++) model[i] = r.policy;
      const len = Math.min(len0, SIZE - off);
      let pos = off;
      for (const p of pm.split(off, len)) {
        assert.equal(p.offset, pos);
        for (let i = p.offset; i < p.offset + p.length; i++) assert.equal(model[i], p.policy);
        pos += p.length;
      }
      assert.equal(pos, off + len);
      assert.equal(pm.shipsAnything, model.some((p) => p !== 'remote-only'));
    }),
    { numRuns: RUNS * 2 },
  );
});
