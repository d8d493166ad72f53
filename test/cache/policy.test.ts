// SLRU policy: step-by-step comparison with the array model under random operations.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { SEG_NONE, SlruPolicy, type PolicyNode, type Segment } from '../../src/cache/policy.js';
import { SlruModel } from './model.js';

class Node implements PolicyNode {
  lruPrev: PolicyNode | null = null;
  lruNext: PolicyNode | null = null;
  lruSeg: Segment = SEG_NONE;
  constructor(
    readonly key: string,
    readonly lruBytes: number,
  ) {}
}

type Op = { op: 'insert' | 'touch' | 'remove'; key: number; bytes: number } | { op: 'capacity'; cap: number } | { op: 'evict' };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  fc.record({ op: fc.constantFrom('insert' as const, 'touch' as const, 'remove' as const), key: fc.nat(20), bytes: fc.constantFrom(4096, 8192, 65536) }),
  fc.record({ op: fc.constant('capacity' as const), cap: fc.integer({ min: 0, max: 1 << 20 }) }),
  fc.record({ op: fc.constant('evict' as const) }),
);

void test('SLRU policy matches the model (order, victim, bytes)', () => {
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 1 << 20 }), fc.array(opArb, { maxLength: 200 }), (cap, ops) => {
      const policy = new SlruPolicy<Node>(cap);
      const model = new SlruModel(cap);
      const nodes = new Map<string, Node>();
      for (const o of ops) {
        if (o.op === 'capacity') {
          policy.setCapacity(o.cap);
          model.setCapacity(o.cap);
        } else if (o.op === 'evict') {
          const v = policy.victim();
          assert.equal(v?.key ?? null, model.victim());
          if (v) {
            policy.remove(v);
            model.remove(v.key);
            nodes.delete(v.key);
          }
        } else {
          const key = `k${o.key}`;
          const n = nodes.get(key);
          if (o.op === 'insert' && !n) {
            const nn = new Node(key, o.bytes);
            nodes.set(key, nn);
            policy.insert(nn);
            model.insert(key, o.bytes);
          } else if (o.op === 'touch' && n) {
            policy.touch(n);
            model.touch(key);
          } else if (o.op === 'remove' && n) {
            policy.remove(n);
            model.remove(key);
            nodes.delete(key);
            assert.equal(policy.has(n), false);
          }
        }
        assert.deepEqual([...policy.evictionOrder()].map((n) => n.key), model.order());
        assert.equal(policy.bytes, model.bytes);
        assert.equal(policy.count, nodes.size);
      }
    }),
    { numRuns: 300 },
  );
});

void test('SLRU: a one-time scan does not flush what was read twice', () => {
  const policy = new SlruPolicy<Node>(10 * 4096);
  const hot = Array.from({ length: 4 }, (_, i) => new Node(`hot${i}`, 4096));
  for (const n of hot) policy.insert(n);
  for (const n of hot) policy.touch(n); // read twice: protected
  for (let i = 0; i < 100; i++) {
    policy.insert(new Node(`scan${i}`, 4096));
    while (policy.bytes > 10 * 4096) policy.remove(policy.victim() as Node);
  }
  for (const n of hot) assert.ok(policy.has(n), `${n.key} survived the scan`);
});
