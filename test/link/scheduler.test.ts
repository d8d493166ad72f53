// The link sender's deterministic cores: the priority queue (strict priority, FIFO within a
// class, de-duplication with priority upgrade, cancel, bounds) checked against a model, and the
// token bucket with an injected clock.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';

import { ChunkQueue, QueueFullError, TokenBucket, type ChunkJob } from '../../src/link/scheduler.js';
import type { Priority } from '../../src/link/protocol.js';

const RUNS = Number(process.env.SPILLWAY_FUZZ_RUNS ?? 200);
const prio = fc.constantFrom(0, 1, 2, 3) as fc.Arbitrary<Priority>;

type Op = { op: 'push'; index: number; priority: Priority } | { op: 'shift' } | { op: 'cancel'; priority: Priority; start: number; count: number };

test('queue matches a model: strict priority, FIFO per class, one job per chunk at its best priority', () => {
  const op: fc.Arbitrary<Op> = fc.oneof(
    fc.record({ op: fc.constant('push' as const), index: fc.integer({ min: 0, max: 20 }), priority: prio }),
    fc.record({ op: fc.constant('shift' as const) }),
    fc.record({ op: fc.constant('cancel' as const), priority: prio, start: fc.integer({ min: 0, max: 20 }), count: fc.integer({ min: 0, max: 6 }) }),
  );
  fc.assert(
    fc.property(fc.array(op, { maxLength: 120 }), (ops) => {
      const q = new ChunkQueue();
      // model: array of [index, priority] in arrival order per class
      const model: Array<Array<number>> = [[], [], [], []];
      for (const o of ops) {
        if (o.op === 'push') {
          const at = model.findIndex((c) => c.includes(o.index));
          const changed = q.push({ handle: 1, index: o.index, priority: o.priority, pushed: false });
          if (at === -1) {
            model[o.priority]!.push(o.index);
            assert.equal(changed, true);
          } else if (o.priority < at) {
            model[at] = model[at]!.filter((i) => i !== o.index);
            model[o.priority]!.push(o.index);
            assert.equal(changed, true);
          } else assert.equal(changed, false);
        } else if (o.op === 'shift') {
          const cls = model.findIndex((c) => c.length > 0);
          const got = q.shift();
          if (cls === -1) assert.equal(got, undefined);
          else {
            const want = model[cls]!.shift();
            assert.equal(got?.index, want);
            assert.equal(got?.priority, cls);
          }
        } else {
          let removed = 0;
          for (let p = o.priority; p < 4; p++) {
            const before = model[p]!.length;
            model[p] = model[p]!.filter((i) => !(i >= o.start && i < o.start + o.count));
            removed += before - model[p]!.length;
          }
          assert.equal(q.cancel(1, o.priority, [{ start: o.start, count: o.count }]), removed);
        }
        assert.equal(q.size, model.reduce((n, c) => n + c.length, 0));
      }
    }),
    { numRuns: RUNS },
  );
});

test('a demand request for a chunk queued as a push is answered, not treated as a push', () => {
  const q = new ChunkQueue();
  q.push({ handle: 1, index: 7, priority: 3, pushed: true });
  q.push({ handle: 1, index: 7, priority: 0, pushed: false });
  const j = q.shift() as ChunkJob;
  assert.deepEqual([j.priority, j.pushed], [0, false]);
  assert.equal(q.shift(), undefined);
});

test('each class is bounded and refuses with a typed error past its limit', () => {
  const q = new ChunkQueue([10, 10, 10, 2]);
  q.push({ handle: 1, index: 1, priority: 3, pushed: true });
  q.push({ handle: 1, index: 2, priority: 3, pushed: true });
  assert.throws(() => q.push({ handle: 1, index: 3, priority: 3, pushed: true }), QueueFullError);
  // other classes still accept
  assert.equal(q.push({ handle: 1, index: 3, priority: 0, pushed: false }), true);
});

test('dropVolume forgets only that volume', () => {
  const q = new ChunkQueue();
  q.push({ handle: 1, index: 1, priority: 0, pushed: false });
  q.push({ handle: 2, index: 1, priority: 0, pushed: false });
  q.dropVolume(1);
  assert.equal(q.size, 1);
  assert.equal(q.shift()?.handle, 2);
});

test('token bucket: spends, refills at the rate, and caps at the burst', () => {
  let now = 0;
  const b = new TokenBucket(1000, 500, () => now);
  assert.equal(b.delayFor(500), 0);
  b.take(500);
  assert.equal(b.delayFor(100), 100); // 100 bytes at 1000 B/s
  now += 100;
  assert.equal(b.delayFor(100), 0);
  now += 1e6;
  b.take(0);
  assert.equal(b.delayFor(500), 0);
  assert.equal(b.delayFor(501), 0, 'requests above the burst are capped to the burst');
  b.take(1000); // one frame may overdraw
  assert.ok(b.delayFor(1) > 0);
});

test('token bucket with rate 0 is unlimited', () => {
  const b = new TokenBucket(0, 0, () => 0);
  b.take(1e12);
  assert.equal(b.delayFor(1e9), 0);
  assert.equal(b.unlimited, true);
});
