// Index record codec: round trips, and arbitrary bytes / split points only ever give a
// record, NEED_MORE or a typed RecordError.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { decodeRecord, encodeRecords, NEED_MORE, REC, RecordError, recordSize, type IndexRecord } from '../../src/cache/records.js';

const name = fc.string({ minLength: 1, maxLength: 40 });
const id = fc.uint8Array({ minLength: 1, maxLength: 64 }).map((a) => Buffer.from(a));
const u32 = fc.nat({ max: 0xffffffff });
const idx = fc.nat({ max: 2 ** 48 - 1 });

const recordArb: fc.Arbitrary<IndexRecord> = fc.oneof(
  fc.record({ type: fc.constant(REC.FAMILY), fid: u32, name, check: fc.uint8Array({ maxLength: 16 }).map((a) => Buffer.from(a)) }),
  fc.record({ type: fc.constant(REC.VOLUME), vid: u32, name, fid: u32 }),
  fc.record({
    type: fc.constant(REC.BLOB),
    fid: u32,
    id,
    slotSize: u32,
    slot: u32,
    length: u32,
    nonce: fc.uint8Array({ minLength: 12, maxLength: 12 }).map((a) => Buffer.from(a)),
    tag: fc.uint8Array({ minLength: 16, maxLength: 16 }).map((a) => Buffer.from(a)),
  }),
  fc.record({ type: fc.constant(REC.DROP), fid: u32, id }),
  fc.record({ type: fc.constant(REC.MAP), vid: u32, index: idx, fid: u32, id }),
  fc.record({ type: fc.constant(REC.ZERO), vid: u32, index: idx }),
  fc.record({ type: fc.constant(REC.UNMAP), vid: u32, index: idx }),
  fc.record({ type: fc.constant(REC.END), count: u32, crc: u32 }),
);

function decodeAll(buf: Buffer): IndexRecord[] {
  const out: IndexRecord[] = [];
  let o = 0;
  while (o < buf.length) {
    const r = decodeRecord(buf, o);
    assert.notEqual(r, NEED_MORE);
    if (r === NEED_MORE) break;
    out.push(r.rec);
    o += r.bytesRead;
  }
  return out;
}

void test('records round-trip', () => {
  fc.assert(
    fc.property(fc.array(recordArb, { maxLength: 20 }), (recs) => {
      const buf = encodeRecords(recs);
      assert.equal(buf.length, recs.reduce((s, r) => s + recordSize(r), 0));
      assert.deepEqual(decodeAll(buf), recs.map((r) => ({ ...r }))); // fc.record objects have a null prototype
    }),
  );
});

void test('a prefix of a record is NEED_MORE, never a wrong record', () => {
  fc.assert(
    fc.property(recordArb, fc.nat(), (rec, cut) => {
      const buf = encodeRecords([rec]);
      const at = cut % buf.length;
      assert.equal(decodeRecord(buf.subarray(0, at), 0), NEED_MORE);
    }),
  );
});

void test('arbitrary bytes decode to a record, NEED_MORE or RecordError', () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 300 }), fc.nat(300), (bytes, at) => {
      const buf = Buffer.from(bytes);
      try {
        const r = decodeRecord(buf, Math.min(at, buf.length));
        if (r !== NEED_MORE) assert.ok(r.bytesRead > 0);
      } catch (err) {
        assert.ok(err instanceof RecordError, String(err));
      }
    }),
  );
});

void test('a flipped bit anywhere in a record is caught', () => {
  fc.assert(
    fc.property(recordArb, fc.nat(), fc.nat(7), (rec, pos, bit) => {
      const buf = encodeRecords([rec]);
      const p = pos % buf.length;
      buf[p] = (buf[p] as number) ^ (1 << bit);
      let decoded: IndexRecord | null = null;
      try {
        const r = decodeRecord(buf, 0);
        if (r !== NEED_MORE && r.bytesRead === buf.length) decoded = r.rec;
      } catch (err) {
        assert.ok(err instanceof RecordError);
      }
      assert.equal(decoded, null, 'a corrupted record was accepted');
    }),
  );
});
