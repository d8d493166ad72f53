// Link frame codec: round trips for every message type, incremental decoding at every split
// point, and fuzzing over arbitrary bytes (the only outcomes are a message, NEED_MORE, or a
// typed LinkProtocolError).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';

import { decodeFrame, encodeMessage, LinkProtocolError, NEED_MORE, type LinkMessage } from '../../src/link/codec.js';
import { FRAME_HEADER_SIZE, MAX_FRAME_PAYLOAD } from '../../src/link/protocol.js';

const RUNS = Number(process.env.SPILLWAY_FUZZ_RUNS ?? 200);

const str = fc.string({ maxLength: 40 });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const idx = fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER });
const prio = fc.constantFrom(0, 1, 2, 3) as fc.Arbitrary<0 | 1 | 2 | 3>;
const sig = fc.uint8Array({ minLength: 32, maxLength: 32 }).map((a) => Buffer.from(a));
const jid = fc.uint8Array({ minLength: 16, maxLength: 16 }).map((a) => Buffer.from(a));
const ranges = fc.array(fc.record({ start: idx, count: u32 }), { maxLength: 20 });

const message: fc.Arbitrary<LinkMessage> = fc.oneof(
  fc.record({ type: fc.constant('hello' as const), version: fc.integer({ min: 0, max: 65535 }), site: str, edgeId: str, credit: u32, features: u32 }),
  fc.record({ type: fc.constant('error' as const), reqId: u32, code: fc.integer({ min: 0, max: 65535 }), message: str }),
  fc.record({ type: fc.constant('open' as const), reqId: u32, volume: str }),
  fc.record({ type: fc.constant('opened' as const), reqId: u32, volume: str, handle: u32, size: idx, chunkSize: u32, family: str, dataKey: sig }),
  fc.record({ type: fc.constant('fetch' as const), handle: u32, priority: prio, token: idx, ranges }),
  fc.record({ type: fc.constant('chunk' as const), handle: u32, index: idx, priority: prio, pushed: fc.boolean(), token: idx, codec: fc.integer({ min: 0, max: 255 }), rawLength: u32, signature: sig, payload: fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a)) }),
  fc.record({ type: fc.constant('chunk-sig' as const), handle: u32, index: idx, priority: prio, pushed: fc.boolean(), token: idx, rawLength: u32, signature: sig }),
  fc.record({ type: fc.constant('chunk-zero' as const), handle: u32, index: idx, priority: prio, pushed: fc.boolean(), token: idx }),
  fc.record({ type: fc.constant('need-data' as const), handle: u32, index: idx, priority: prio }),
  fc.record({ type: fc.constant('cancel' as const), handle: u32, priority: prio, ranges }),
  fc.record({ type: fc.constant('credit' as const), bytes: u32 }),
  fc.record({ type: fc.constant('metrics-request' as const), reqId: u32 }),
  fc.record({ type: fc.constant('metrics' as const), reqId: u32, json: str }),
  fc.record({ type: fc.constant('ping' as const), nonce: u32 }),
  fc.record({ type: fc.constant('pong' as const), nonce: u32 }),
  fc.record({ type: fc.constant('close-volume' as const), handle: u32 }),
  fc.record({ type: fc.constant('epoch-query' as const), reqId: u32, handle: u32, journalId: jid }),
  fc.record({ type: fc.constant('epoch-state' as const), reqId: u32, handle: u32, journalId: jid, appliedSeq: idx }),
  fc
    .record({ type: fc.constant('epoch-begin' as const), handle: u32, batch: u32, journalId: jid, firstSeq: fc.integer({ min: 1, max: 2 ** 40 }), span: fc.integer({ min: 0, max: 1000 }), extents: u32, bytes: idx })
    .map(({ span, ...m }) => ({ ...m, lastSeq: m.firstSeq + span })),
  fc.oneof(
    fc.record({ type: fc.constant('epoch-data' as const), handle: u32, batch: u32, offset: idx, length: fc.integer({ min: 1, max: 1024 * 1024 }), zero: fc.constant(false), codec: fc.integer({ min: 0, max: 255 }), payload: fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a)) }),
    fc.record({ type: fc.constant('epoch-data' as const), handle: u32, batch: u32, offset: idx, length: fc.integer({ min: 1, max: 1024 * 1024 }), zero: fc.constant(true), codec: fc.constant(0), payload: fc.constant(Buffer.alloc(0)) }),
  ),
  fc.record({ type: fc.constant('epoch-end' as const), handle: u32, batch: u32, digest: sig }),
  fc.record({ type: fc.constant('epoch-ack' as const), handle: u32, batch: u32, status: fc.integer({ min: 0, max: 255 }), appliedSeq: idx, message: str }),
);

function normalize(m: LinkMessage): unknown {
  return JSON.parse(JSON.stringify(m, (_k, v: unknown) => (v && typeof v === 'object' && (v as { type?: string }).type === 'Buffer' ? Buffer.from((v as { data: number[] }).data).toString('hex') : v)));
}

test('every message survives encode → decode unchanged', () => {
  fc.assert(
    fc.property(message, (m) => {
      const frame = encodeMessage(m);
      const d = decodeFrame(frame, 0);
      assert.notEqual(d, NEED_MORE);
      if (d === NEED_MORE) return;
      assert.equal(d.bytesRead, frame.length);
      assert.deepEqual(normalize(d.msg), normalize(m));
    }),
    { numRuns: RUNS * 5 },
  );
});

test('a frame split at any point decodes as NEED_MORE until it is complete', () => {
  fc.assert(
    fc.property(message, (m) => {
      const frame = encodeMessage(m);
      for (let cut = 0; cut < frame.length; cut++) assert.equal(decodeFrame(frame.subarray(0, cut), 0), NEED_MORE, `cut at ${cut}`);
      assert.notEqual(decodeFrame(frame, 0), NEED_MORE);
    }),
    { numRuns: RUNS },
  );
});

test('back-to-back frames decode in order from offsets', () => {
  fc.assert(
    fc.property(fc.array(message, { minLength: 1, maxLength: 8 }), (ms) => {
      const all = Buffer.concat(ms.map(encodeMessage));
      let off = 0;
      for (const m of ms) {
        const d = decodeFrame(all, off);
        assert.notEqual(d, NEED_MORE);
        if (d === NEED_MORE) return;
        assert.equal(d.msg.type, m.type);
        off += d.bytesRead;
      }
      assert.equal(off, all.length);
    }),
    { numRuns: RUNS },
  );
});

test('arbitrary bytes give a message, NEED_MORE, or a typed LinkProtocolError', () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 200 }), (bytes) => {
      try {
        decodeFrame(Buffer.from(bytes), 0);
      } catch (err) {
        assert.ok(err instanceof LinkProtocolError, `unexpected ${String(err)}`);
        assert.match(err.code, /^SPW_ERR_LINK_/);
      }
    }),
    { numRuns: RUNS * 10 },
  );
});

test('mutated valid frames never crash the decoder', () => {
  fc.assert(
    fc.property(message, fc.integer({ min: 0, max: 10000 }), fc.integer({ min: 0, max: 255 }), (m, pos, byte) => {
      const frame = Buffer.from(encodeMessage(m));
      frame[pos % frame.length] = byte;
      try {
        decodeFrame(frame, 0);
      } catch (err) {
        assert.ok(err instanceof LinkProtocolError, `unexpected ${String(err)}`);
      }
    }),
    { numRuns: RUNS * 5 },
  );
});

test('an oversized frame is refused from its header alone, before its payload arrives', () => {
  const h = Buffer.alloc(FRAME_HEADER_SIZE);
  h.writeUInt8(6, 0);
  h.writeUInt32BE(MAX_FRAME_PAYLOAD + 1, 4);
  assert.throws(() => decodeFrame(h, 0), (e: unknown) => e instanceof LinkProtocolError && e.code === 'SPW_ERR_LINK_TOO_BIG');
});

test('unknown frame types and trailing bytes are protocol errors', () => {
  const unknown = Buffer.alloc(FRAME_HEADER_SIZE);
  unknown.writeUInt8(200, 0);
  assert.throws(() => decodeFrame(unknown, 0), LinkProtocolError);
  const credit = encodeMessage({ type: 'credit', bytes: 5 });
  const longer = Buffer.concat([credit, Buffer.alloc(1)]);
  longer.writeUInt32BE(5, 4);
  assert.throws(() => decodeFrame(longer, 0), /trailing/);
});
