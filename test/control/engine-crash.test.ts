// The engine under kill -9, on SQLite and on PostgreSQL: a child process runs a workflow whose
// steps append their effects to a file (test/control/fixtures/engine-crash-child.ts); the test
// kills it with SIGKILL at random moments (after a random number of new effect lines, plus a
// random delay), restarts it (resumeAll), and checks after every kill that:
//   - no step recorded done before the kill runs again; only the step that was in flight (its
//     record says running) may run again, with ctx.attempt one more than recorded;
//   - the same for undos during a rollback (only the undo in flight, recorded undoing, repeats);
// and at the end that the workflow finished, every step's effect is there and its recorded
// output comes from a run that completed it; for a rollback, that it ended cancelled with every
// step that ran undone, in reverse order, including rollbacks resumed after a kill.
//
// Each child runs both scenarios at once (two workflows on two targets), so one kill hits both.
// SPILLWAY_CRASH_ITER=N sets the kills per database and scenario (default 3);
// SPILLWAY_CRASH_SEED fixes the random choices.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';

import { openStore, type SqlStore } from '../../src/control/db/index.js';
import type { StepRecord, Workflow } from '../../src/control/types.js';
import { DB_KINDS, testDatabases, fastTempDir } from '../helpers/postgres.js';
import { ROOT, startProc } from '../helpers/proc.js';
import { prng } from '../helpers/random.js';
import { CANCEL_AT, effectsFile, STEPS } from './fixtures/engine-crash-child.js';

const FIXTURE = path.join(ROOT, 'test', 'control', 'fixtures', 'engine-crash-child.ts');
const ITER = Number(process.env.SPILLWAY_CRASH_ITER ?? 3);
const SEED = Number(process.env.SPILLWAY_CRASH_SEED ?? Math.floor(Math.random() * 1e9));

interface Line {
  kind: 'run' | 'effect' | 'undo-start' | 'undo';
  i: number;
  attempt: number;
  pid: number;
}

function readLines(file: string): Line[] {
  let text = '';
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    return [];
  }
  const out: Line[] = [];
  for (const l of text.split('\n')) {
    const f = l.split(' ');
    if (f[0] === 'run' || f[0] === 'undo-start') out.push({ kind: f[0], i: Number(f[1]), attempt: Number(f[2]), pid: Number(f[3]) });
    else if (f[0] === 'effect' || f[0] === 'undo') out.push({ kind: f[0], i: Number(f[1]), attempt: 0, pid: Number(f[2]) });
  }
  return out;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

type Scenario = 'forward' | 'rollback';

/** One scenario's current workflow (a new target once one finishes), its kills and checks. */
class Track {
  no = 0;
  kills = 0;
  rollbackKills = 0;
  reRuns = 0;
  finished = 0;
  private killsThisWorkflow = 0;
  private before = new Map<number, StepRecord>();
  private earlier: Line[] = [];

  constructor(
    readonly scenario: Scenario,
    private readonly store: SqlStore,
    private readonly dir: string,
  ) {}

  get target(): string {
    return `${this.scenario === 'forward' ? 'fwd' : 'rb'}-${this.no}`;
  }
  get effects(): string {
    return effectsFile(this.dir, this.target);
  }
  lines(): Line[] {
    return readLines(this.effects);
  }
  private async workflow(): Promise<Workflow | null> {
    return (await this.store.listWorkflows({ target: this.target }))[0] ?? null;
  }

  /** Before a child starts: what is on record and in the effects file. */
  async snapshot(): Promise<void> {
    const wf = await this.workflow();
    this.before = new Map(wf ? (await this.store.listSteps(wf.id)).map((s) => [s.index, s]) : []);
    this.earlier = this.lines();
  }

  /** The kill point, as a predicate over this scenario's effect lines: a random number of new
   *  lines, or (the rollback scenario, every other kill) a random number of new undos. */
  trigger(rnd: () => number, undoPhase: boolean): (now: Line[]) => boolean {
    if (undoPhase) {
      const undos = this.earlier.filter((l) => l.kind === 'undo-start').length;
      const u = Math.min(undos + 1 + Math.floor(rnd() * 3), CANCEL_AT + 1);
      return (now) => now.filter((l) => l.kind === 'undo-start').length >= u;
    }
    const total = this.scenario === 'forward' ? 2 * STEPS : 4 * CANCEL_AT + 3;
    const n = this.earlier.length + 1 + Math.floor(rnd() * Math.max(1, total - this.earlier.length));
    return (now) => now.length >= n;
  }

  /** After the child `pid` exited: what it ran is allowed; then, if the workflow finished, its
   *  end state, and on to a new target. */
  async check(pid: number, killed: boolean): Promise<void> {
    const mine = this.lines().filter((l) => l.pid === pid);
    // never a step done before the child started; a step run before only if it was in flight
    // (recorded running), with the next attempt number; at most one such step
    const again = new Set<number>();
    for (const l of mine.filter((x) => x.kind === 'run')) {
      const rec = this.before.get(l.i);
      assert.notEqual(rec?.state, 'done', `${this.target}: step ${l.i} was recorded done before the restart and ran again`);
      assert.ok(rec?.state !== 'undone' && rec?.state !== 'undoing', `${this.target}: step ${l.i} ran forward during a rollback`);
      assert.equal(l.attempt, (rec?.attempts ?? 0) + 1, `${this.target}: step ${l.i}: ctx.attempt`);
      if (this.earlier.some((x) => x.kind === 'run' && x.i === l.i)) {
        again.add(l.i);
        assert.equal(rec?.state, 'running', `${this.target}: step ${l.i} ran again but was not in flight (${rec?.state})`);
      }
    }
    assert.ok(again.size <= 1, `${this.target}: more than the in-flight step ran again: ${[...again].join(', ')}`);
    const undoneAgain = new Set<number>();
    for (const l of mine.filter((x) => x.kind === 'undo-start')) {
      const rec = this.before.get(l.i);
      assert.notEqual(rec?.state, 'undone', `${this.target}: step ${l.i} was recorded undone before the restart and was undone again`);
      if (this.earlier.some((x) => x.kind === 'undo-start' && x.i === l.i)) {
        undoneAgain.add(l.i);
        assert.equal(rec?.state, 'undoing', `${this.target}: step ${l.i} was undone again but its undo was not in flight`);
        assert.equal(l.attempt, rec!.attempts + 1, `${this.target}: undo of step ${l.i}: ctx.attempt`);
      }
    }
    assert.ok(undoneAgain.size <= 1, `${this.target}: more than the undo in flight was repeated: ${[...undoneAgain].join(', ')}`);
    this.reRuns += again.size + undoneAgain.size;

    const wf = await this.workflow();
    const done = wf?.state === 'succeeded' || wf?.state === 'cancelled';
    if (killed && !done && mine.length > 0) {
      this.kills++;
      this.killsThisWorkflow++;
      if (wf?.state === 'rolling-back' || wf?.state === 'cancelling') this.rollbackKills++;
    }
    if (!done) return;
    this.checkFinal(wf, await this.store.listSteps(wf.id));
    this.finished++;
    this.no++;
    this.killsThisWorkflow = 0;
  }

  private checkFinal(wf: Workflow, recs: StepRecord[]): void {
    const lines = this.lines();
    const runs = (i: number) => lines.filter((l) => l.kind === 'run' && l.i === i).length;
    if (this.scenario === 'forward') {
      assert.equal(wf.state, 'succeeded');
      assert.equal(recs.length, STEPS);
      for (let i = 0; i < STEPS; i++) {
        assert.equal(recs[i]?.state, 'done');
        const out = wf.outputs[`step-${i}`] as { i: number; pid: number } | undefined;
        assert.equal(out?.i, i, `output of step ${i}`);
        assert.ok(
          lines.some((l) => l.kind === 'effect' && l.i === i && l.pid === out!.pid),
          `step ${i}'s recorded output comes from a run that completed its effect`,
        );
        assert.ok(runs(i) <= 1 + this.killsThisWorkflow, `step ${i} ran ${runs(i)} times`);
      }
      return;
    }
    assert.equal(wf.state, 'cancelled');
    assert.ok(
      lines.every((l) => l.i <= CANCEL_AT),
      'no step after the cancel ran',
    );
    for (let i = 0; i <= CANCEL_AT; i++) {
      if (i < CANCEL_AT) assert.ok(lines.some((l) => l.kind === 'effect' && l.i === i), `step ${i} completed before the cancel`);
      assert.ok(lines.some((l) => l.kind === 'undo' && l.i === i), `step ${i} was undone`);
      assert.equal(recs[i]?.state, 'undone');
    }
    const order = lines.filter((l) => l.kind === 'undo-start').map((l) => l.i);
    const distinct = order.filter((x, k) => k === 0 || order[k - 1] !== x);
    assert.deepEqual(
      distinct,
      Array.from({ length: CANCEL_AT + 1 }, (_, k) => CANCEL_AT - k),
      `undo order ${order.join(',')}`,
    );
  }
}

const dbs = testDatabases(async (url) => (await openStore(url)).close());
after(() => dbs.close());

describe('engine crash safety (kill -9 of the service)', { concurrency: true }, () => {
  for (const kind of DB_KINDS) {
    it(`${kind}: killed at random points forward and in rollbacks, resumed; done steps never re-run, effects complete`, { timeout: 180_000 }, async (t) => {
      t.diagnostic(`seed ${SEED} (SPILLWAY_CRASH_SEED), ${ITER} kills per scenario (SPILLWAY_CRASH_ITER)`);
      const rnd = prng((SEED ^ (kind === 'sqlite' ? 0x1111 : 0x2222)) >>> 0);
      const url = await dbs.fresh(kind);
      const tmp = await fastTempDir('spw-engine-crash-');
      const store: SqlStore = await openStore(url);
      const fwd = new Track('forward', store, tmp.dir);
      const rb = new Track('rollback', store, tmp.dir);
      let children = 0;

      /** One child: killed at a point chosen on one of the two workflows, or left to finish. */
      const runChild = async (kill: boolean): Promise<void> => {
        await fwd.snapshot();
        await rb.snapshot();
        const watch = rnd() < 0.5 ? fwd : rb;
        const due = watch.trigger(rnd, watch === rb && rb.kills % 2 === 1);
        const extra = rnd() * 8;
        const p = startProc(process.execPath, ['--import', 'tsx', FIXTURE, url, tmp.dir, fwd.target, rb.target, String(Math.floor(rnd() * 1e9))], { cwd: ROOT });
        children++;
        let killed = false;
        try {
          const deadline = Date.now() + 90_000;
          while (p.child.exitCode === null && p.child.signalCode === null) {
            assert.ok(Date.now() < deadline, `the child made no progress: ${p.stderr()}`);
            if (kill && due(watch.lines())) {
              await sleep(extra);
              killed = p.child.kill('SIGKILL');
              break;
            }
            await sleep(2);
          }
        } finally {
          p.child.kill('SIGKILL');
        }
        const r = await p.exited;
        if (!/^finished /m.test(p.stdout())) assert.equal(r.signal, 'SIGKILL', `the child failed (code ${r.code}):\n${p.stderr()}`);
        await fwd.check(p.child.pid!, killed);
        await rb.check(p.child.pid!, killed);
      };

      try {
        for (let round = 0; fwd.kills < ITER || rb.kills < ITER; round++) {
          assert.ok(round < ITER * 6, `too many rounds without kills (${fwd.kills} and ${rb.kills} kills)`);
          await runChild(true);
        }
        await runChild(false);
        assert.ok(fwd.finished >= 1 && rb.finished >= 1, 'the last child finished both workflows');
        t.diagnostic(
          `${children} children; forward: ${fwd.kills} kills, ${fwd.reRuns} in-flight steps re-run, ${fwd.finished} workflows; ` +
            `rollback: ${rb.kills} kills (${rb.rollbackKills} during the rollback), ${rb.reRuns} re-run, ${rb.finished} workflows`,
        );
        if (ITER >= 2) assert.ok(rb.rollbackKills >= 1, 'no kill landed during a rollback');
      } finally {
        await store.close();
        await tmp.cleanup();
      }
    });
  }
});
