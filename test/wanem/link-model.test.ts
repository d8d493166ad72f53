// The link model on its own: no sockets, no timers, time passed in by hand. Exact arrival
// times for pacing and delay, sharing of the rate between flows, jitter that never reorders,
// stalls that hold bytes, and the queue limits derived from the parameters.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import fc from 'fast-check';

import { Flow, LinkModel, type Piece } from '../../src/wanem/link-model.js';
import { DEFAULT_PARAMS, pieceBytes, queueLimitBytes, queueResumeBytes, resolveParams, type WanParams } from '../../src/wanem/params.js';
import { WanemError } from '../../src/wanem/errors.js';
import { ManualClock } from '../../src/wanem/clock.js';
import { Fifo } from '../../src/wanem/fifo.js';
import { parseHostPort, formatHostPort } from '../../src/wanem/address.js';

/** Take every piece of `flow` that has arrived by `now`. */
function takeAll(link: LinkModel, flow: Flow, now: number): Piece[] {
  const out: Piece[] = [];
  for (let p = link.take(flow, now); p; p = link.take(flow, now)) out.push(p);
  return out;
}

function bytesOf(pieces: Piece[]): Buffer {
  return Buffer.concat(pieces.flatMap((p) => (p.data ? [p.data] : [])));
}

/** Run the model in steps of `stepMs` until `flow` has delivered its end; returns arrival times. */
function drain(link: LinkModel, flows: Flow[], stepMs: number, untilMs = 1e6): Map<Flow, Piece[]> {
  const got = new Map<Flow, Piece[]>(flows.map((f) => [f, []]));
  for (let now = 0; now <= untilMs; now += stepMs) {
    link.advance(now);
    for (const f of flows) got.get(f)!.push(...takeAll(link, f, now));
    if (flows.every((f) => got.get(f)!.at(-1)?.data === null)) break;
  }
  return got;
}

void describe('link model', () => {
  void test('pacing and delay give exact arrival times (8 Mbit/s = 1000 bytes per ms, 10 ms delay)', () => {
    const link = new LinkModel({ rateMbit: 8, delayMs: 10, jitterMs: 0 });
    assert.equal(pieceBytes({ rateMbit: 8 }), 1024, 'one millisecond of link time, at least 1 KiB');
    const flow = new Flow(1);
    link.send(flow, Buffer.alloc(4096, 1), 0);
    link.sendEnd(flow, 0);
    link.advance(0);
    // Only the first piece can start at t=0; the serializer is busy until 1.024 ms.
    assert.equal(flow.inFlight.length, 1);
    assert.equal(link.nextSerializationAt(), 1.024);
    const got = drain(link, [flow], 0.001).get(flow)!;
    assert.deepEqual(
      got.map((p) => [p.data?.length ?? 'end', Number(p.arrivesAt.toFixed(6))]),
      [
        [1024, 11.024],
        [1024, 12.048],
        [1024, 13.072],
        [1024, 14.096],
        ['end', 14.096],
      ],
    );
    assert.equal(link.queuedBytes, 0);
    assert.equal(flow.queuedBytes, 0);
  });

  void test('nothing arrives before its time, and a late caller catches up without losing rate', () => {
    const link = new LinkModel({ rateMbit: 8, delayMs: 5, jitterMs: 0 });
    const flow = new Flow(1);
    link.send(flow, Buffer.alloc(10_240), 0);
    link.advance(0);
    assert.equal(link.take(flow, 5.9), undefined, 'the first piece needs 1.024 ms + 5 ms');
    // Called only at 100 ms: every piece was due long ago, on the link's own schedule.
    link.advance(100);
    const got = takeAll(link, flow, 100);
    assert.equal(got.length, 10);
    assert.equal(Number(got.at(-1)!.arrivesAt.toFixed(6)), 15.24);
  });

  void test('unlimited rate and no delay: chunks pass through as they came, at once', () => {
    const link = new LinkModel({ rateMbit: 0, delayMs: 0, jitterMs: 0 });
    const flow = new Flow(1);
    link.send(flow, Buffer.alloc(65536, 2), 42);
    link.advance(42);
    const got = takeAll(link, flow, 42);
    assert.equal(got.length, 1);
    assert.equal(got[0]!.data!.length, 65536);
  });

  void test('flows going the same way share the rate (one FIFO link)', () => {
    const link = new LinkModel({ rateMbit: 8, delayMs: 0, jitterMs: 0 });
    const a = new Flow(1);
    const b = new Flow(2);
    link.send(a, Buffer.alloc(8192, 0xa), 0);
    link.send(b, Buffer.alloc(8192, 0xb), 0);
    link.sendEnd(a, 0);
    link.sendEnd(b, 0);
    const got = drain(link, [a, b], 0.5);
    // 16 KiB at 1000 bytes/ms: the last byte is out at 16.384 ms, whichever flow it belongs to;
    // a's bytes went first, and its end (queued after b's bytes) waits behind them.
    const lastData = (f: Flow) => Number(got.get(f)!.filter((x) => x.data).at(-1)!.arrivesAt.toFixed(6));
    assert.equal(lastData(a), 8.192);
    assert.equal(lastData(b), 16.384);
    assert.equal(Number(got.get(a)!.at(-1)!.arrivesAt.toFixed(6)), 16.384);
    assert.deepEqual(bytesOf(got.get(a)!), Buffer.alloc(8192, 0xa));
    assert.deepEqual(bytesOf(got.get(b)!), Buffer.alloc(8192, 0xb));
  });

  void test('a stall holds everything, then delivers it all; the serializer restarts at the resume', () => {
    const link = new LinkModel({ rateMbit: 8, delayMs: 2, jitterMs: 0 });
    const flow = new Flow(1);
    link.send(flow, Buffer.alloc(2048, 3), 0);
    link.advance(0);
    link.stall();
    link.send(flow, Buffer.alloc(1024, 4), 1);
    link.sendEnd(flow, 1);
    for (let now = 0; now < 50; now += 0.5) {
      link.advance(now);
      assert.equal(link.take(flow, now), undefined, `nothing is delivered during the stall (t=${now})`);
    }
    assert.equal(link.nextSerializationAt(), undefined);
    assert.equal(link.queuedBytes, 3072, 'every byte is still held');
    link.resume(50);
    link.advance(50);
    // The first piece arrived (3.024 ms) during the stall and is delivered at the resume.
    const first = takeAll(link, flow, 50);
    assert.equal(first.length, 1);
    const rest = drain(link, [flow], 0.25).get(flow)!;
    // Second piece starts at the resume: 50 + 1.024 + 2; third behind it.
    assert.deepEqual(
      rest.map((p) => Number(p.arrivesAt.toFixed(6))),
      [53.024, 54.048, 54.048],
    );
    assert.deepEqual(bytesOf([...first, ...rest]), Buffer.concat([Buffer.alloc(2048, 3), Buffer.alloc(1024, 4)]));
  });

  void test('closing a flow drops its bytes, which then take no link time', () => {
    const link = new LinkModel({ rateMbit: 8, delayMs: 0, jitterMs: 0 });
    const gone = new Flow(1);
    const kept = new Flow(2);
    link.send(gone, Buffer.alloc(100_000), 0);
    link.send(kept, Buffer.alloc(1000), 0);
    link.sendEnd(kept, 0);
    link.advance(0);
    link.close(gone);
    assert.equal(link.queuedBytes, 1000);
    const got = drain(link, [kept], 0.25).get(kept)!;
    // Only the piece of `gone` already on the wire (1.024 ms) delays `kept`.
    assert.equal(Number(got.at(-1)!.arrivesAt.toFixed(6)), 2.024);
    link.send(gone, Buffer.alloc(10), 3);
    assert.equal(link.queuedBytes, 0, 'a closed flow takes no more bytes');
  });

  void test('property: any chunks, any jitter: bytes arrive complete and in order, arrivals never decrease, delay is a lower bound', () => {
    fc.assert(
      fc.property(
        fc.record({
          rateMbit: fc.constantFrom(0, 1, 8, 100, 1000),
          delayMs: fc.integer({ min: 0, max: 50 }),
          jitterMs: fc.integer({ min: 0, max: 50 }),
        }),
        fc.array(fc.record({ at: fc.integer({ min: 0, max: 20 }), size: fc.integer({ min: 1, max: 40_000 }), flow: fc.integer({ min: 0, max: 2 }) }), { minLength: 1, maxLength: 30 }),
        fc.integer({ min: 1, max: 2 ** 31 - 1 }),
        (params, sends, seed) => {
          let state = seed;
          const random = () => {
            state = (state * 1103515245 + 12345) % 2 ** 31;
            return state / 2 ** 31;
          };
          const link = new LinkModel(params, random);
          const flows = [new Flow(0), new Flow(1), new Flow(2)];
          const sent = flows.map(() => [] as Buffer[]);
          const got = flows.map(() => [] as Piece[]);
          const ordered = [...sends].sort((x, y) => x.at - y.at);
          let now = 0;
          const step = () => {
            link.advance(now);
            for (const [i, f] of flows.entries()) got[i]!.push(...takeAll(link, f, now));
          };
          for (const s of ordered) {
            while (now < s.at) {
              now += 0.5;
              step();
            }
            const buf = randomBytes(s.size);
            link.send(flows[s.flow]!, buf, now);
            sent[s.flow]!.push(buf);
            step();
          }
          for (const f of flows) link.sendEnd(f, now);
          // Then jump from event to event, as the runner does.
          for (let n = 0; n < 1_000_000 && !got.every((g) => g.at(-1)?.data === null); n++) {
            const next = Math.min(link.nextSerializationAt() ?? Infinity, ...flows.map((f) => f.nextArrival() ?? Infinity));
            assert.ok(next < Infinity, 'something is still to happen');
            now = Math.max(now, next);
            step();
          }
          for (const [i, pieces] of got.entries()) {
            assert.deepEqual(bytesOf(pieces), Buffer.concat(sent[i]!), `flow ${i} bytes`);
            for (let k = 1; k < pieces.length; k++) assert.ok(pieces[k]!.arrivesAt >= pieces[k - 1]!.arrivesAt, 'arrivals never decrease');
            for (const p of pieces) assert.ok(p.arrivesAt >= p.enqueuedAt + params.delayMs, 'never earlier than the delay');
            if (params.rateMbit > 0) for (const p of pieces) assert.ok((p.data?.length ?? 0) <= pieceBytes(params));
          }
          assert.equal(link.queuedBytes, 0);
        },
      ),
      { numRuns: 150 },
    );
  });
});

void describe('link parameters', () => {
  const p = (over: Partial<WanParams>) => resolveParams(over);

  void test('queue limit: a floor, then rate × RTT plus a margin, capped; 16 MiB when unlimited; explicit wins', () => {
    assert.equal(queueLimitBytes(p({})), 16 * 1024 * 1024);
    assert.equal(queueLimitBytes(p({ rateMbit: 10 })), 256 * 1024, 'floor');
    // 100 Mbit/s = 12_500 bytes/ms; RTT 50 ms → 625_000; margin max(64 KiB, 20 ms = 250_000).
    assert.equal(queueLimitBytes(p({ rateMbit: 100, delayMs: 25 })), 875_000);
    assert.equal(queueLimitBytes(p({ rateMbit: 100, delayMs: 20, jitterMs: 5 })), 875_000, 'jitter counts as delay');
    assert.equal(queueLimitBytes(p({ rateMbit: 10_000, delayMs: 100 })), 64 * 1024 * 1024, 'cap');
    assert.equal(queueLimitBytes(p({ rateMbit: 100, delayMs: 25, queueBytes: 4096 })), 4096);
    assert.equal(queueResumeBytes(p({ queueBytes: 4096 })), 3072);
  });

  void test('piece size: one millisecond of link time between 1 KiB and 16 KiB; no cutting when unlimited', () => {
    assert.equal(pieceBytes({ rateMbit: 0 }), Infinity);
    assert.equal(pieceBytes({ rateMbit: 1 }), 1024);
    assert.equal(pieceBytes({ rateMbit: 100 }), 12_500);
    assert.equal(pieceBytes({ rateMbit: 1000 }), 16 * 1024);
  });

  void test('invalid parameters are refused with SPW_ERR_WANEM_PARAM', () => {
    const bad: Partial<WanParams>[] = [
      { delayMs: -1 },
      { rateMbit: NaN },
      { jitterMs: Infinity },
      { stallEverySec: 5 },
      { stallForSec: 1 },
      { stallEverySec: 1, stallForSec: 1 },
      { queueBytes: 1.5 },
    ];
    for (const b of bad) assert.throws(() => resolveParams(b), (e: unknown) => e instanceof WanemError && e.code === 'SPW_ERR_WANEM_PARAM', JSON.stringify(b));
    assert.deepEqual(resolveParams({}), DEFAULT_PARAMS);
    assert.equal(resolveParams({ delayMs: 3 }, resolveParams({ rateMbit: 5 })).rateMbit, 5, 'a partial update keeps the rest');
  });
});

void describe('helpers of the relay', () => {
  void test('HOST:PORT parsing', () => {
    assert.deepEqual(parseHostPort('127.0.0.1:9000'), { host: '127.0.0.1', port: 9000 });
    assert.deepEqual(parseHostPort('[::1]:9000'), { host: '::1', port: 9000 });
    assert.deepEqual(parseHostPort('localhost:1'), { host: 'localhost', port: 1 });
    assert.deepEqual(parseHostPort('9000', { defaultHost: '127.0.0.1' }), { host: '127.0.0.1', port: 9000 });
    assert.deepEqual(parseHostPort('0.0.0.0:0', { allowPortZero: true }), { host: '0.0.0.0', port: 0 });
    for (const bad of ['9000', 'host', 'host:', ':80', '::1:80', 'h:70000', 'h:0', 'h:8a'])
      assert.throws(() => parseHostPort(bad), (e: unknown) => e instanceof WanemError && e.code === 'SPW_ERR_WANEM_ADDRESS', bad);
    assert.equal(formatHostPort({ host: '::1', port: 5 }), '[::1]:5');
    assert.equal(formatHostPort({ host: '10.0.0.1', port: 5 }), '10.0.0.1:5');
  });

  void test('ManualClock fires due timers in time order, each at its own time, and skips cancelled ones', () => {
    const clock = new ManualClock(100);
    const seen: [string, number][] = [];
    clock.setTimer(() => seen.push(['b', clock.now()]), 20);
    clock.setTimer(() => seen.push(['a', clock.now()]), 10);
    clock.setTimer(() => seen.push(['never', clock.now()]), 5).cancel();
    clock.setTimer(() => {
      seen.push(['c', clock.now()]);
      clock.setTimer(() => seen.push(['d', clock.now()]), 1);
    }, 20);
    clock.advance(15);
    assert.deepEqual(seen, [['a', 110]]);
    clock.advance(100);
    assert.deepEqual(seen, [
      ['a', 110],
      ['b', 120],
      ['c', 120],
      ['d', 121],
    ]);
    assert.equal(clock.now(), 215);
    assert.equal(clock.pending, 0);
  });

  void test('Fifo keeps order across compaction and removal', () => {
    const q = new Fifo<number>();
    for (let i = 0; i < 5000; i++) q.push(i);
    for (let i = 0; i < 3000; i++) assert.equal(q.shift(), i);
    q.removeWhere((n) => n % 2 === 1);
    assert.equal(q.length, 1000);
    assert.equal(q.peek(), 3000);
    q.push(7);
    const rest: number[] = [];
    for (let n = q.shift(); n !== undefined; n = q.shift()) rest.push(n);
    assert.equal(rest.length, 1001);
    assert.equal(rest.at(-1), 7);
  });
});
