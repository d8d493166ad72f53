// The workflow engine (src/control/engine/) on SQLite and on a real PostgreSQL: the step
// records and outputs, events (store first, then subscribers), audit, failure and retry, cancel
// and rollback (reverse order, the running step too, undo failures and their retry), progress
// throttling, stop and resume, concurrency across targets, and leases between two engines.
import assert from 'node:assert/strict';
import { after, afterEach, describe, it } from 'node:test';

import { openStore, type SqlStore } from '../../src/control/db/index.js';
import { Engine, type EngineOptions } from '../../src/control/engine/index.js';
import { ConflictError, InvalidInputError, NotFoundError, type Store, type WorkflowEvent } from '../../src/control/types.js';
import { DB_KINDS, testDatabases } from '../helpers/postgres.js';
import { scriptedDef, sleepOrAbort, until, untilAborted, type ScriptStep } from './fixtures/workflows.js';

// PostgreSQL databases are copies of one migrated template
const dbs = testDatabases(async (url) => (await openStore(url)).close());
after(() => dbs.close());

for (const kind of DB_KINDS) {
  describe(`engine on ${kind}`, () => {
    const cleanups: (() => Promise<void>)[] = [];
    afterEach(async () => {
      for (const c of cleanups.splice(0).reverse()) await c();
    });

    /** A fresh store and an engine over it with `scripts` as the 'transfer' workflow. */
    async function setup(opts: Partial<EngineOptions> = {}, url?: string) {
      const storeUrl = url ?? (await dbs.fresh(kind));
      const store = await openStore(storeUrl);
      const scripts = new Map<string, ScriptStep[]>();
      const engine = new Engine({ store, progressIntervalMs: 20, ...opts });
      engine.register(scriptedDef('transfer', scripts));
      cleanups.push(async () => {
        await engine.stop();
        await store.close();
      });
      return { store, engine, scripts, url: storeUrl };
    }

    const actions = async (store: SqlStore, target: string) => (await store.listAudit({ target })).reverse().map((a) => `${a.actor}:${a.action}`);

    it('runs the steps in order: outputs passed on and recorded, events and audit for every transition', async () => {
      const { store, engine, scripts } = await setup();
      const seen: unknown[] = [];
      scripts.set('vm-1', [
        { name: 'plan', run: () => Promise.resolve({ chunks: 3 }) },
        {
          name: 'copy',
          run: async (ctx) => {
            seen.push(ctx.outputs, ctx.attempt, ctx.workflow.step);
            await ctx.audit('step.effect', { what: 'copied' });
            return 'copied';
          },
        },
        { name: 'switch', run: () => Promise.resolve() },
      ]);
      assert.deepEqual(engine.kinds(), ['transfer']);
      const wf = await engine.start('transfer', { target: 'vm-1' }, 'alice');
      assert.equal(wf.state, 'pending');
      assert.equal(wf.target, 'vm-1');
      const done = await engine.wait(wf.id);
      assert.equal(done.state, 'succeeded');
      assert.equal(done.step, 3);
      assert.deepEqual(done.outputs, { plan: { chunks: 3 }, copy: 'copied', switch: null });
      assert.deepEqual(seen, [{ plan: { chunks: 3 } }, 1, 1]);
      const steps = await store.listSteps(wf.id);
      assert.deepEqual(
        steps.map((s) => [s.index, s.name, s.state, s.attempts]),
        [
          [0, 'plan', 'done', 1],
          [1, 'copy', 'done', 1],
          [2, 'switch', 'done', 1],
        ],
      );
      assert.ok(steps.every((s) => s.endedAt));
      const evs = await store.listEvents(wf.id);
      assert.deepEqual(
        evs.map((e) => e.seq),
        evs.map((_, i) => i + 1),
      );
      assert.deepEqual(
        evs.map((e) => (e.type === 'state' ? `state:${String(e.data?.state)}` : `${e.type}:${e.step}:${String(e.data?.state)}`)),
        ['state:pending', 'state:running', 'step:plan:running', 'step:plan:done', 'step:copy:running', 'step:copy:done', 'step:switch:running', 'step:switch:done', 'state:succeeded'],
      );
      assert.match(evs.at(-1)!.message, /^succeeded/);
      assert.deepEqual(await actions(store, 'vm-1'), ['alice:workflow.start', 'alice:step.done', 'alice:step.effect', 'alice:step.done', 'alice:step.done', 'alice:workflow.succeed']);
      const effect = (await store.listAudit({ target: 'vm-1' })).find((a) => a.action === 'step.effect');
      assert.deepEqual(effect?.detail, { workflow: wf.id, kind: 'transfer', step: 'copy', index: 1, what: 'copied' });
    });

    it('start refuses unknown kinds, invalid input and a second workflow on a busy target', async () => {
      const { engine, scripts } = await setup();
      scripts.set('vm-1', [{ name: 'wait', run: (ctx) => untilAborted(ctx.signal) }]);
      await assert.rejects(engine.start('clone', { target: 'vm-1' }, 'a'), InvalidInputError);
      await assert.rejects(engine.start('transfer', { nope: 1 }, 'a'), /input.target/);
      const wf = await engine.start('transfer', { target: 'vm-1' }, 'a');
      await assert.rejects(engine.start('transfer', { target: 'vm-1' }, 'b'), (e: unknown) => e instanceof ConflictError && e.message.includes(wf.id));
      await assert.rejects(engine.cancel('ghost', 'a'), NotFoundError);
      await assert.rejects(engine.retry('ghost', 'a'), NotFoundError);
      await assert.rejects(engine.subscribe('ghost', 0, () => undefined), NotFoundError);
      await assert.rejects(engine.retry(wf.id, 'a'), ConflictError, 'only a failed workflow can be retried');
      await engine.cancel(wf.id, 'a');
      assert.equal((await engine.wait(wf.id)).state, 'cancelled');
      await assert.rejects(engine.cancel(wf.id, 'a'), /nothing to cancel/);
    });

    it('a failing step fails the workflow (no rollback); retry resumes at that step, earlier ones are not re-run', async () => {
      const { store, engine, scripts } = await setup();
      const ran: string[] = [];
      let failures = 1;
      scripts.set('vm-2', [
        { name: 'a', run: async () => void ran.push('a'), undo: async () => void ran.push('undo a') },
        {
          name: 'b',
          run: async (ctx) => {
            ran.push(`b#${ctx.attempt}`);
            if (failures-- > 0) throw new Error('disk full');
            return { ok: ctx.attempt };
          },
        },
        { name: 'c', run: async () => void ran.push('c') },
      ]);
      const wf = await engine.start('transfer', { target: 'vm-2' }, 'alice');
      const failed = await engine.wait(wf.id);
      assert.equal(failed.state, 'failed');
      assert.equal(failed.error, 'step b failed: disk full');
      assert.equal(failed.step, 1);
      assert.deepEqual(ran, ['a', 'b#1']);
      assert.deepEqual(
        (await store.listSteps(wf.id)).map((s) => [s.name, s.state, s.error]),
        [
          ['a', 'done', undefined],
          ['b', 'failed', 'disk full'],
        ],
      );
      await assert.rejects(engine.start('transfer', { target: 'vm-2' }, 'bob'), ConflictError, 'a failed workflow still holds its target');
      const r = await engine.retry(wf.id, 'bob');
      assert.equal(r.state, 'running');
      assert.equal(r.error, undefined);
      const done = await engine.wait(wf.id);
      assert.equal(done.state, 'succeeded');
      assert.deepEqual(ran, ['a', 'b#1', 'b#2', 'c']);
      assert.deepEqual(done.outputs.b, { ok: 2 });
      assert.equal((await store.listSteps(wf.id))[1]?.attempts, 2);
      assert.deepEqual(await actions(store, 'vm-2'), ['alice:workflow.start', 'alice:step.done', 'alice:workflow.fail', 'bob:workflow.retry', 'bob:step.done', 'bob:step.done', 'bob:workflow.succeed']);
    });

    it('cancel while running: the running step is aborted and settles, then steps are undone in reverse (the aborted one too)', async () => {
      const { store, engine, scripts } = await setup();
      const log: string[] = [];
      let settled = false;
      scripts.set('vm-3', [
        { name: 'a', run: async () => void log.push('a'), undo: async () => void log.push('undo a') },
        { name: 'b', run: async () => void log.push('b') }, // no undo: kept
        { name: 'c', run: async () => void log.push('c'), undo: async () => void log.push('undo c') },
        {
          name: 'd',
          run: async (ctx) => {
            log.push('d');
            try {
              await untilAborted(ctx.signal);
            } finally {
              await new Promise((r) => setTimeout(r, 30)); // takes a while to settle
              settled = true;
            }
          },
          undo: async () => {
            assert.ok(settled, 'undo starts after the aborted step settled');
            log.push('undo d');
          },
        },
        { name: 'e', run: async () => void log.push('e'), undo: async () => void log.push('undo e') },
      ]);
      const wf = await engine.start('transfer', { target: 'vm-3' }, 'alice');
      const states: string[] = [];
      const unsubscribe = await engine.subscribe(wf.id, 0, (e) => {
        if (e.type === 'state') states.push(String(e.data?.state));
      });
      await until(() => log.includes('d'), 'step d running');
      const c = await engine.cancel(wf.id, 'bob');
      assert.equal(c.state, 'cancelling');
      assert.equal((await engine.cancel(wf.id, 'bob')).state, 'cancelling', 'cancel again: no-op');
      const done = await engine.wait(wf.id);
      unsubscribe();
      assert.equal(done.state, 'cancelled');
      assert.deepEqual(log, ['a', 'b', 'c', 'd', 'undo d', 'undo c', 'undo a']);
      assert.deepEqual(states, ['pending', 'running', 'cancelling', 'rolling-back', 'cancelled']);
      assert.deepEqual(
        (await store.listSteps(wf.id)).map((s) => [s.name, s.state]),
        [
          ['a', 'undone'],
          ['b', 'done'],
          ['c', 'undone'],
          ['d', 'undone'],
        ],
      );
      const acts = await actions(store, 'vm-3');
      assert.deepEqual(acts.slice(-6), ['bob:workflow.cancel', 'bob:workflow.rollback', 'bob:step.undone', 'bob:step.undone', 'bob:step.undone', 'bob:workflow.cancelled']);
    });

    it('cancel of a failed workflow rolls back; an undo that throws fails it ("rollback failed at"), retry continues the rollback', async () => {
      const { store, engine, scripts } = await setup();
      const log: string[] = [];
      let undoFailures = 1;
      scripts.set('vm-4', [
        { name: 'a', run: async () => void log.push('a'), undo: async () => void log.push('undo a') },
        {
          name: 'b',
          run: async () => void log.push('b'),
          undo: async (ctx) => {
            log.push(`undo b#${ctx.attempt}`);
            if (undoFailures-- > 0) throw new Error('edge unreachable');
          },
        },
        {
          name: 'c',
          run: async () => {
            log.push('c');
            throw new Error('boom');
          },
          undo: async () => void log.push('undo c'),
        },
        { name: 'd', run: async () => void log.push('d') },
      ]);
      const wf = await engine.start('transfer', { target: 'vm-4' }, 'alice');
      assert.equal((await engine.wait(wf.id)).state, 'failed');
      await engine.cancel(wf.id, 'bob');
      const f = await engine.wait(wf.id);
      assert.equal(f.state, 'failed');
      assert.equal(f.error, 'rollback failed at step b: edge unreachable');
      assert.deepEqual(
        (await store.listSteps(wf.id)).map((s) => [s.name, s.state]),
        [
          ['a', 'done'],
          ['b', 'undoing'],
          ['c', 'undone'],
        ],
      );
      const r = await engine.retry(wf.id, 'carol');
      assert.equal(r.state, 'rolling-back', 'retry goes on in the direction it was going');
      const done = await engine.wait(wf.id);
      assert.equal(done.state, 'cancelled');
      assert.deepEqual(log, ['a', 'b', 'c', 'undo c', 'undo b#1', 'undo b#2', 'undo a']);
      const acts = await actions(store, 'vm-4');
      assert.ok(acts.includes('bob:workflow.rollback-fail') && acts.includes('carol:workflow.retry'), acts.join(' '));
      assert.equal(acts.at(-1), 'carol:workflow.cancelled');
    });

    it('progress is throttled to one event per interval per step, and the last one is always kept', async () => {
      const { store, engine, scripts } = await setup({ progressIntervalMs: 40 });
      scripts.set('vm-5', [
        {
          name: 'copy',
          run: async (ctx) => {
            for (let i = 1; i <= 200; i++) {
              ctx.progress(i / 200, `copied ${i}`, { i });
              if (i % 20 === 0) await new Promise((r) => setTimeout(r, 10));
            }
          },
        },
      ]);
      const wf = await engine.start('transfer', { target: 'vm-5' }, 'a');
      await engine.wait(wf.id);
      const prog = (await store.listEvents(wf.id)).filter((e) => e.type === 'progress');
      assert.ok(prog.length >= 2 && prog.length <= 6, `${prog.length} progress events for ~100 ms at 40 ms`);
      assert.equal(prog[0]?.message, 'copied 1');
      assert.equal(prog.at(-1)?.message, 'copied 200');
      assert.equal(prog.at(-1)?.fraction, 1);
      assert.deepEqual(prog.at(-1)?.data, { i: 200, index: 0 });
      const evs = await store.listEvents(wf.id);
      assert.ok(
        evs.findIndex((e) => e.message === 'copied 200') < evs.findIndex((e) => e.type === 'step' && e.data?.state === 'done'),
        'the last progress comes before the step is done',
      );
    });

    it('subscribe replays from afterSeq then delivers live events: strictly increasing, no gap, no repeat', async () => {
      const { store, engine, scripts } = await setup();
      let release!: () => void;
      const gate = new Promise<void>((r) => (release = r));
      scripts.set('vm-6', [
        { name: 'one', run: () => Promise.resolve(1) },
        { name: 'two', run: () => gate },
        {
          name: 'three',
          run: async (ctx) => {
            for (let i = 0; i < 10; i++) {
              ctx.progress(i / 10, `p${i}`);
              await new Promise((r) => setTimeout(r, 5));
            }
          },
        },
      ]);
      const wf = await engine.start('transfer', { target: 'vm-6' }, 'a');
      await until(async () => (await store.listSteps(wf.id)).some((s) => s.name === 'two'), 'step two running');
      const got: WorkflowEvent[] = [];
      const got2: WorkflowEvent[] = [];
      const un1 = await engine.subscribe(wf.id, 2, (e) => got.push(e));
      const un2 = await engine.subscribe(wf.id, 0, (e) => got2.push(e));
      assert.equal(got[0]?.seq, 3, 'the replay starts after afterSeq');
      release();
      await engine.wait(wf.id);
      await until(() => got.at(-1)?.type === 'state' && got.at(-1)?.data?.state === 'succeeded', 'the final event delivered');
      un1();
      un2();
      const stored = await store.listEvents(wf.id);
      assert.deepEqual(
        got.map((e) => e.seq),
        stored.filter((e) => e.seq > 2).map((e) => e.seq),
      );
      assert.deepEqual(
        got2.map((e) => e.seq),
        stored.map((e) => e.seq),
      );
      assert.deepEqual(got.at(-1), stored.at(-1));
    });

    it('stop() aborts a running step without failing it; resumeAll on a new engine re-runs only that step (attempt 2)', async () => {
      const { store, engine, scripts, url } = await setup();
      const log: string[] = [];
      const steps = (tag: string): ScriptStep[] => [
        { name: 'a', run: async () => void log.push(`${tag} a`) },
        {
          name: 'b',
          run: async (ctx) => {
            log.push(`${tag} b#${ctx.attempt}`);
            if (ctx.attempt === 1) await untilAborted(ctx.signal);
            return 'b';
          },
        },
        { name: 'c', run: async () => void log.push(`${tag} c`) },
      ];
      scripts.set('vm-7', steps('first'));
      const wf = await engine.start('transfer', { target: 'vm-7' }, 'alice');
      await until(() => log.includes('first b#1'), 'step b running');
      await engine.stop();
      const mid = await store.getWorkflow(wf.id);
      assert.equal(mid?.state, 'running');
      assert.equal(mid?.step, 1);
      assert.deepEqual(
        (await store.listSteps(wf.id)).map((s) => [s.name, s.state, s.attempts]),
        [
          ['a', 'done', 1],
          ['b', 'running', 1],
        ],
      );
      await assert.rejects(engine.start('transfer', { target: 'x' }, 'a'), /stopped/);

      const second = await setup({}, url);
      second.scripts.set('vm-7', steps('second'));
      assert.deepEqual(await second.engine.resumeAll(), [wf.id]);
      const done = await second.engine.wait(wf.id);
      assert.equal(done.state, 'succeeded');
      assert.deepEqual(log, ['first a', 'first b#1', 'second b#2', 'second c']);
      assert.deepEqual(done.outputs, { a: null, b: 'b', c: null });
    });

    it('a step recorded done before a crash that did not advance the workflow is not run again', async () => {
      const { store, engine, scripts } = await setup();
      const log: string[] = [];
      scripts.set('vm-8', [
        { name: 'a', run: async () => void log.push('a') },
        { name: 'b', run: async () => void log.push('b') },
      ]);
      // as left by a process killed between recording step a done and moving the workflow on
      const wf = await store.createWorkflow({ id: 'crashed', kind: 'transfer', target: 'vm-8', input: { target: 'vm-8' }, actor: 'alice' });
      await store.updateWorkflow(wf.id, { state: 'running', step: 0 });
      const t = new Date().toISOString();
      await store.putStep({ workflow: wf.id, index: 0, name: 'a', state: 'done', attempts: 1, output: { from: 'before' }, startedAt: t, endedAt: t });
      await engine.resumeAll();
      const done = await engine.wait(wf.id);
      assert.equal(done.state, 'succeeded');
      assert.deepEqual(log, ['b']);
      assert.deepEqual(done.outputs.a, { from: 'before' });
    });

    it('workflows on different targets run at the same time', async () => {
      const { engine, scripts } = await setup();
      const running = new Set<string>();
      let overlap = false;
      for (const t of ['vm-a', 'vm-b', 'vm-c']) {
        scripts.set(t, [
          {
            name: 'work',
            run: async (ctx) => {
              running.add(t);
              await until(() => running.size === 3 || ctx.signal.aborted, 'all three running', 5000);
              overlap = true;
              return t;
            },
          },
        ]);
      }
      const wfs = await Promise.all(['vm-a', 'vm-b', 'vm-c'].map((t) => engine.start('transfer', { target: t }, 'a')));
      for (const wf of wfs) assert.equal((await engine.wait(wf.id)).state, 'succeeded');
      assert.ok(overlap);
    });

    it('two engines (two services) on one database: each workflow runs once, under one lease', async () => {
      const a = await setup({ owner: 'svc-a' });
      const b = await setup({ owner: 'svc-b' }, a.url);
      const runs = new Map<string, string[]>();
      const ids: string[] = [];
      for (let i = 0; i < 6; i++) {
        const target = `vm-${i}`;
        const script = (who: string): ScriptStep[] => [
          {
            name: 'work',
            run: async (ctx) => {
              runs.set(target, [...(runs.get(target) ?? []), who]);
              const lease = await a.store.leaseOf(ctx.workflow.id);
              assert.equal(lease.owner, who, 'it runs under its own lease');
              await new Promise((r) => setTimeout(r, 20));
            },
          },
        ];
        a.scripts.set(target, script('svc-a'));
        b.scripts.set(target, script('svc-b'));
        ids.push((await a.store.createWorkflow({ id: `two-${i}`, kind: 'transfer', target, input: { target }, actor: 'x' })).id);
      }
      await Promise.all([a.engine.resumeAll(), b.engine.resumeAll()]);
      for (const id of ids) {
        await until(async () => (await a.store.getWorkflow(id))?.state === 'succeeded', `${id} succeeded`);
      }
      for (const [t, who] of runs) assert.equal(who.length, 1, `${t} ran ${who.length} times: ${who.join(', ')}`);
      assert.equal(runs.size, 6);
      for (const id of ids) assert.equal((await a.store.leaseOf(id)).owner, null, 'leases are released at the end');
    });

    it("a workflow leased by a dead service is taken over when the lease expires, not before", async () => {
      const { store, engine, scripts } = await setup({ owner: 'svc-new', leaseMs: 600, scanIntervalMs: 50 });
      const ran: number[] = [];
      scripts.set('vm-9', [{ name: 'a', run: async () => void ran.push(Date.now()) }]);
      const wf = await store.createWorkflow({ id: 'orphan', kind: 'transfer', target: 'vm-9', input: { target: 'vm-9' }, actor: 'x' });
      await store.updateWorkflow(wf.id, { state: 'running' });
      assert.equal(await store.acquireLease(wf.id, 'svc-dead', 400), true);
      const t0 = Date.now();
      await engine.resumeAll();
      await until(async () => (await store.getWorkflow(wf.id))?.state === 'succeeded', 'taken over');
      assert.equal(ran.length, 1);
      assert.ok(ran[0]! - t0 >= 300, `ran ${ran[0]! - t0} ms after start, before the lease expired`);
    });

    it('a cancel made through another service reaches the service running the workflow', async () => {
      const a = await setup({ owner: 'svc-a', leaseMs: 300 });
      const b = await setup({ owner: 'svc-b', leaseMs: 300 }, a.url);
      const log: string[] = [];
      const script: ScriptStep[] = [
        { name: 'a', run: async () => void log.push('a'), undo: async () => void log.push('undo a') },
        {
          name: 'b',
          run: async (ctx) => {
            log.push('b');
            await untilAborted(ctx.signal);
          },
          undo: async () => void log.push('undo b'),
        },
      ];
      a.scripts.set('vm-10', script);
      b.scripts.set('vm-10', script);
      const wf = await a.engine.start('transfer', { target: 'vm-10' }, 'alice');
      await until(() => log.includes('b'), 'step b running on a');
      await b.engine.cancel(wf.id, 'bob');
      const done = await a.engine.wait(wf.id);
      assert.equal(done.state, 'cancelled');
      assert.deepEqual(log, ['a', 'b', 'undo b', 'undo a']);
    });

    it('resumeAll survives a corrupt workflow row: the others resume, the corrupt one is left alone', async () => {
      const { store, engine, scripts } = await setup();
      scripts.set('vm-ok', [{ name: 'a' }]);
      scripts.set('vm-bad', [{ name: 'a' }]);
      const ok = await store.createWorkflow({ id: 'ok', kind: 'transfer', target: 'vm-ok', input: { target: 'vm-ok' }, actor: 'x' });
      const bad = await store.createWorkflow({ id: 'bad', kind: 'transfer', target: 'vm-bad', input: { target: 'vm-bad' }, actor: 'x' });
      await store.sql.exec("UPDATE workflows SET input = '{oops' WHERE id = ?", [bad.id]);
      assert.deepEqual((await engine.resumeAll()).sort(), ['bad', 'ok']);
      assert.equal((await engine.wait(ok.id)).state, 'succeeded');
      await until(async () => (await store.leaseOf(bad.id)).owner === null, 'the driver of the corrupt one gave up');
      await assert.rejects(engine.wait(bad.id, 100), /column input holds invalid JSON/);
    });

    it('works over a plain Store without the lease and compare-and-set extensions (one process)', async () => {
      const { store } = await setup();
      const methods = ['getWorkflow', 'listWorkflows', 'updateWorkflow', 'createWorkflow', 'putStep', 'listSteps', 'appendEvent', 'listEvents', 'audit', 'listAudit'] as const;
      const plain = Object.fromEntries(methods.map((m) => [m, (store[m] as (...a: unknown[]) => unknown).bind(store)])) as unknown as Store;
      const scripts = new Map<string, ScriptStep[]>();
      const engine = new Engine({ store: plain });
      engine.register(scriptedDef('transfer', scripts));
      cleanups.push(() => engine.stop());
      const log: string[] = [];
      scripts.set('vm-p', [
        { name: 'a', run: async () => void log.push('a'), undo: async () => void log.push('undo a') },
        { name: 'b', run: (ctx) => (log.push('b'), untilAborted(ctx.signal)), undo: async () => void log.push('undo b') },
      ]);
      const wf = await engine.start('transfer', { target: 'vm-p' }, 'x');
      await until(() => log.includes('b'), 'b running');
      await engine.cancel(wf.id, 'y');
      assert.equal((await engine.wait(wf.id)).state, 'cancelled');
      assert.deepEqual(log, ['a', 'b', 'undo b', 'undo a']);
    });

    it('sleeping steps: many workflows, cancels at random moments, all end cancelled or succeeded with matching records', async () => {
      const { store, engine, scripts } = await setup();
      const ids: string[] = [];
      for (let i = 0; i < 8; i++) {
        const target = `vm-s${i}`;
        scripts.set(
          target,
          ['a', 'b', 'c'].map((name) => ({ name, run: (ctx) => sleepOrAbort(5 + ((i * 7) % 11), ctx.signal), undo: () => Promise.resolve() })),
        );
        ids.push((await engine.start('transfer', { target }, 'a')).id);
      }
      await new Promise((r) => setTimeout(r, 12));
      await Promise.all(ids.filter((_, i) => i % 2 === 0).map((id) => engine.cancel(id, 'b').catch((e: unknown) => assert.ok(e instanceof ConflictError))));
      for (const id of ids) {
        const wf = await engine.wait(id);
        const steps = await store.listSteps(id);
        if (wf.state === 'succeeded') assert.ok(steps.length === 3 && steps.every((s) => s.state === 'done'));
        else {
          assert.equal(wf.state, 'cancelled');
          assert.ok(steps.every((s) => s.state === 'undone'), JSON.stringify(steps));
        }
      }
    });
  });
}
