// Model check of the engine (fast-check), on SQLite and PostgreSQL: random step lists (with or
// without undo, failing their first runs or undos a random number of times), a cancel at a
// random step, and a random answer to each failure (retry or cancel). The engine's calls (run
// and undo, with ctx.attempt), its state events, its step records and its final state must be
// exactly those of a small model.
import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';

import fc from 'fast-check';

import { openStore } from '../../src/control/db/index.js';
import { Engine } from '../../src/control/engine/index.js';
import type { WorkflowState } from '../../src/control/types.js';
import { DB_KINDS, testDatabases } from '../helpers/postgres.js';
import { scriptedDef, untilAborted, type ScriptStep } from './fixtures/workflows.js';

interface StepSpec {
  undo: boolean;
  /** how many times its run throws before it succeeds */
  fails: number;
  /** how many times its undo throws before it succeeds */
  undoFails: number;
}
interface Scenario {
  steps: StepSpec[];
  /** the step during whose first run the workflow is cancelled (modulo the length), or null */
  cancelAt: number | null;
  /** what the operator does at each failure, in order (then: retry) */
  onFail: ('retry' | 'cancel')[];
}

const scenario: fc.Arbitrary<Scenario> = fc.record({
  steps: fc.array(fc.record({ undo: fc.boolean(), fails: fc.integer({ min: 0, max: 2 }), undoFails: fc.integer({ min: 0, max: 1 }) }), { minLength: 1, maxLength: 6 }),
  cancelAt: fc.option(fc.nat({ max: 5 }), { nil: null }),
  onFail: fc.array(fc.constantFrom('retry' as const, 'cancel' as const), { maxLength: 6 }),
});

interface Outcome {
  state: WorkflowState;
  calls: string[];
  states: WorkflowState[];
  /** final step record states by index */
  records: string[];
}

function model(sc: Scenario): Outcome {
  const n = sc.steps.length;
  const cancelAt = sc.cancelAt === null ? -1 : sc.cancelAt % n;
  const runs = new Array<number>(n).fill(0);
  const undos = new Array<number>(n).fill(0);
  const failsLeft = sc.steps.map((s) => s.fails);
  const undoFailsLeft = sc.steps.map((s) => s.undoFails);
  const records: string[] = [];
  const calls: string[] = [];
  const states: WorkflowState[] = ['pending', 'running'];
  const actions = [...sc.onFail];
  let cancelled = false;
  let mode: 'forward' | 'rollback' = 'forward';
  let i = 0;
  const cancel = () => {
    mode = 'rollback';
    states.push('cancelling', 'rolling-back');
  };
  for (;;) {
    if (mode === 'forward') {
      let stopped = false;
      for (; i < n && !stopped; ) {
        runs[i]!++;
        calls.push(`run ${i}#${runs[i]}`);
        if (i === cancelAt && !cancelled) {
          cancelled = true;
          records[i] = 'failed';
          cancel();
          stopped = true;
        } else if (failsLeft[i]! > 0) {
          failsLeft[i]!--;
          records[i] = 'failed';
          states.push('failed');
          if ((actions.shift() ?? 'retry') === 'cancel') cancel();
          else states.push('running');
          stopped = true;
        } else {
          records[i] = 'done';
          i++;
        }
      }
      if (stopped) continue;
      states.push('succeeded');
      return { state: 'succeeded', calls, states, records };
    }
    let stopped = false;
    for (let j = records.length - 1; j >= 0 && !stopped; j--) {
      if (records[j] === 'undone' || !sc.steps[j]!.undo) continue;
      undos[j]!++;
      calls.push(`undo ${j}#${undos[j]}`);
      if (undoFailsLeft[j]! > 0) {
        undoFailsLeft[j]!--;
        records[j] = 'undoing';
        states.push('failed');
        if ((actions.shift() ?? 'retry') === 'cancel') states.push('cancelling', 'rolling-back');
        else states.push('rolling-back');
        stopped = true;
      } else {
        records[j] = 'undone';
      }
    }
    if (stopped) continue;
    states.push('cancelled');
    return { state: 'cancelled', calls, states, records };
  }
}

const dbs = testDatabases(async (url) => (await openStore(url)).close());
after(() => dbs.close());

for (const kind of DB_KINDS) {
  describe(`engine model check on ${kind}`, () => {
    it('final state, run/undo calls and their order, state events and step records match the model', { timeout: 120_000 }, async () => {
      const store = await openStore(await dbs.fresh(kind));
      const scripts = new Map<string, ScriptStep[]>();
      const engine = new Engine({ store, progressIntervalMs: 0 });
      engine.register(scriptedDef('transfer', scripts));
      let run = 0;
      try {
        await fc.assert(
          fc.asyncProperty(scenario, async (sc) => {
            const target = `model-${run++}`;
            const n = sc.steps.length;
            const cancelAt = sc.cancelAt === null ? -1 : sc.cancelAt % n;
            const calls: string[] = [];
            const failsLeft = sc.steps.map((s) => s.fails);
            const undoFailsLeft = sc.steps.map((s) => s.undoFails);
            let cancelled = false;
            scripts.set(
              target,
              sc.steps.map((spec, i): ScriptStep => {
                const step: ScriptStep = {
                  name: `s${i}`,
                  run: async (ctx) => {
                    calls.push(`run ${i}#${ctx.attempt}`);
                    if (i === cancelAt && !cancelled) {
                      cancelled = true;
                      void engine.cancel(ctx.workflow.id, 'model');
                      await untilAborted(ctx.signal);
                    }
                    if (failsLeft[i]! > 0) {
                      failsLeft[i]!--;
                      throw new Error(`run ${i} fails`);
                    }
                    return { i };
                  },
                };
                if (spec.undo) {
                  step.undo = async (ctx) => {
                    calls.push(`undo ${i}#${ctx.attempt}`);
                    if (undoFailsLeft[i]! > 0) {
                      undoFailsLeft[i]!--;
                      throw new Error(`undo ${i} fails`);
                    }
                  };
                }
                return step;
              }),
            );
            const actions = [...sc.onFail];
            let wf = await engine.start('transfer', { target }, 'model');
            for (let guard = 0; ; guard++) {
              assert.ok(guard < 50, 'the workflow keeps failing');
              wf = await engine.wait(wf.id, 20_000);
              if (wf.state !== 'failed') break;
              if ((actions.shift() ?? 'retry') === 'cancel') await engine.cancel(wf.id, 'model');
              else await engine.retry(wf.id, 'model');
            }
            const want = model(sc);
            const events = await store.listEvents(wf.id);
            assert.deepEqual(
              events.map((e) => e.seq),
              events.map((_, k) => k + 1),
              'event seqs are 1..n',
            );
            const got: Outcome = {
              state: wf.state,
              calls,
              states: events.filter((e) => e.type === 'state').map((e) => e.data?.state as WorkflowState),
              records: (await store.listSteps(wf.id)).map((s) => s.state),
            };
            assert.deepEqual(got, want);
            if (wf.state === 'succeeded') assert.deepEqual(wf.outputs, Object.fromEntries(sc.steps.map((_, i) => [`s${i}`, { i }])));
          }),
          { numRuns: kind === 'sqlite' ? 100 : 30 },
        );
      } finally {
        await engine.stop();
        await store.close();
      }
    });
  });
}
