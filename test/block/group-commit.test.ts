// Group commit: flushes asked while one runs share the next sync; no caller is ever answered
// by a sync that started before its call (that sync may not cover its writes).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';

import { GroupCommit } from '../../src/block/group-commit.js';

const RUNS = Number(process.env.SPILLWAY_FUZZ_RUNS ?? 200);

/** A sync whose completions the test controls, recording when each started. */
function controlledSync() {
  const pending: Array<{ resolve: () => void; reject: (e: Error) => void; startedAt: number }> = [];
  let clock = 0;
  return {
    tick: () => ++clock,
    now: () => clock,
    pending,
    sync: () => new Promise<void>((resolve, reject) => pending.push({ resolve, reject, startedAt: clock })),
  };
}

test('a burst of flushes costs two syncs: the running one and one shared follow-up', async () => {
  const c = controlledSync();
  const g = new GroupCommit(c.sync);
  const first = g.flush();
  const burst = Array.from({ length: 16 }, () => g.flush());
  assert.equal(c.pending.length, 1, 'the burst waits for the running sync');
  c.pending[0]!.resolve();
  await first;
  await new Promise((r) => setImmediate(r));
  assert.equal(c.pending.length, 2, 'one follow-up sync for the whole burst');
  c.pending[1]!.resolve();
  await Promise.all(burst);
  assert.equal(g.syncs, 2);
});

test('no flush is answered by a sync that started before it was asked (model)', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(fc.constantFrom('flush', 'complete', 'fail'), { maxLength: 60 }), async (ops) => {
      const c = controlledSync();
      const g = new GroupCommit(c.sync);
      const waiting: Array<{ askedAt: number; settledBy?: number; p: Promise<void> }> = [];
      let completed = 0;
      for (const op of ops) {
        c.tick();
        if (op === 'flush') {
          const askedAt = c.now();
          const entry: { askedAt: number; settledBy?: number; p: Promise<void> } = { askedAt, p: Promise.resolve() };
          entry.p = g.flush().then(
            () => void (entry.settledBy = c.pending[completed - 1]?.startedAt ?? -1),
            () => void (entry.settledBy = c.pending[completed - 1]?.startedAt ?? -1),
          );
          waiting.push(entry);
        } else if (completed < c.pending.length) {
          const s = c.pending[completed++]!;
          if (op === 'complete') s.resolve();
          else s.reject(new Error('EIO'));
        }
        await new Promise((r) => setImmediate(r));
      }
      // finish everything still running
      while (completed < c.pending.length || waiting.some((w) => w.settledBy === undefined)) {
        if (completed < c.pending.length) c.pending[completed++]!.resolve();
        await new Promise((r) => setImmediate(r));
      }
      for (const w of waiting) assert.ok(w.settledBy! >= w.askedAt, `flush asked at ${w.askedAt} answered by a sync started at ${w.settledBy}`);
    }),
    { numRuns: RUNS },
  );
});

test('a failed sync fails its callers, and the next flush tries again', async () => {
  const c = controlledSync();
  const g = new GroupCommit(c.sync);
  const a = g.flush();
  c.pending[0]!.reject(new Error('EIO'));
  await assert.rejects(a, /EIO/);
  const b = g.flush();
  assert.equal(c.pending.length, 2);
  c.pending[1]!.resolve();
  await b;
});
