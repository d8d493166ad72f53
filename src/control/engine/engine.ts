// The workflow engine: runs registered workflows step by step, durably, so that a killed service
// resumes them (resumeAll) where they were. The promises it keeps (docs/control-db.md):
//
// - Before step i runs, the workflow's step index is i and step i's record says running with
//   attempts + 1; its output is recorded (done, and in workflow.outputs) before step i+1
//   starts. After a crash the step that was running runs again (ctx.attempt > 1); steps that
//   were done are never run again.
// - Every transition is an event, appended to the store before subscribers see it.
// - A step that throws leaves the workflow failed (no automatic rollback): retry resumes at
//   that step; cancel rolls back: the running step is aborted and settles, then the steps that
//   ran are undone in reverse order (those with undo), each recorded undoing → undone, so a
//   crash during the rollback resumes the rollback. An undo that throws leaves the workflow
//   failed; retry (or cancel) continues the rollback: the direction is on record, as the
//   steps' undoing/undone states.
// - State changes are compare-and-set, and a workflow is driven by the service holding its
//   lease (renewed while it runs), so two services on one PostgreSQL database neither run the
//   same workflow twice nor overwrite a cancel with a success.

import { randomBytes, randomUUID } from 'node:crypto';
import os from 'node:os';

import type { Logger } from '../../log/logger.js';
import type { WorkflowPatch, WorkflowStoreExtensions } from '../db/store.js';
import {
  ConflictError,
  InvalidInputError,
  NotFoundError,
  type Json,
  type JsonObject,
  type StepContext,
  type StepDef,
  type StepRecord,
  type Store,
  type Workflow,
  type WorkflowDef,
  type WorkflowEngine,
  type WorkflowEvent,
  type WorkflowKind,
  type WorkflowState,
} from '../types.js';
import { ProgressThrottle } from './progress.js';

export interface EngineOptions {
  store: Store;
  log?: Logger;
  /** at most one progress event per step per this many ms (the last is always kept); 250. */
  progressIntervalMs?: number;
  /** this service's lease owner id. Default: random per Engine, so after a crash the new
   *  process takes the workflows over when their leases expire; a stable id that is unique
   *  among live services (e.g. host + listen address) lets a restart resume them at once. */
  owner?: string;
  /** how long a lease lasts without renewal (renewed every third of it); 15000. */
  leaseMs?: number;
  /** how often to look for workflows to resume (leases expired elsewhere) after resumeAll;
   *  0 = never; default leaseMs / 2. */
  scanIntervalMs?: number;
  /** how often a subscriber looks in the store for events another service appended; 1000. */
  pollMs?: number;
}

/** States in which a workflow is driven by an engine. */
export const ACTIVE_STATES: readonly WorkflowState[] = ['pending', 'running', 'cancelling', 'rolling-back'];
/** States in which a workflow waits for nobody: finished, or failed (waiting for retry/cancel). */
export const RESTING_STATES: readonly WorkflowState[] = ['succeeded', 'failed', 'cancelled'];

type Outcome = 'again' | 'rest' | 'halt';
type Why = 'cancel' | 'stop' | 'lease' | null;

interface Run {
  id: string;
  actor: string | null;
  phase: 'forward' | 'rollback';
  ctrl: AbortController;
  /** why ctrl was aborted */
  why: Why;
  /** state changed by a command while the loop ran: look again before leaving */
  kick: boolean;
  renewing: boolean;
  promise: Promise<void>;
}

const QUIET: Logger = Object.assign(() => undefined, { child: () => QUIET });
const now = (): string => new Date().toISOString();
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** `p`, or 'late' after `ms` (the timer is cleared either way). */
async function within<T>(p: Promise<T>, ms: number): Promise<T | 'late'> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<'late'>((r) => (timer = setTimeout(() => r('late'), ms)));
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}

function messageOf(e: unknown): string {
  if (e instanceof Error) return e.message || e.name;
  return typeof e === 'string' ? e : JSON.stringify(e) ?? String(e);
}

function abortError(message: string): Error {
  const e = new Error(message);
  e.name = 'AbortError';
  return e;
}

function hasExtensions(s: Store): s is Store & WorkflowStoreExtensions {
  const x = s as Partial<WorkflowStoreExtensions>;
  return typeof x.transitionWorkflow === 'function' && typeof x.acquireLease === 'function' && typeof x.workflowIds === 'function';
}

/** WorkflowStoreExtensions over any Store, for one process: transitions serialised here, leases
 *  always granted. (SqlStore implements them atomically in the database.) */
function emulateExtensions(store: Store): WorkflowStoreExtensions {
  let tail: Promise<unknown> = Promise.resolve();
  const serial = <T>(fn: () => Promise<T>): Promise<T> => {
    const r = tail.then(fn);
    tail = r.catch(() => undefined);
    return r;
  };
  return {
    transitionWorkflow: (id, from, patch) =>
      serial(async () => {
        const w = await store.getWorkflow(id);
        return w && from.includes(w.state) ? store.updateWorkflow(id, patch) : null;
      }),
    acquireLease: () => Promise.resolve(true),
    renewLease: (id) => store.getWorkflow(id),
    releaseLease: () => Promise.resolve(),
    leaseOf: () => Promise.resolve({ owner: null, expiresAt: null }),
    workflowIds: async (states) => {
      const out: string[] = [];
      for (const state of states) for (const w of await store.listWorkflows({ state })) out.push(w.id);
      return out;
    },
  };
}

class Subscription {
  private last: number;
  private chain: Promise<void> = Promise.resolve();
  private timer: NodeJS.Timeout | undefined;
  closed = false;

  constructor(
    private readonly store: Store,
    private readonly log: Logger,
    readonly workflow: string,
    afterSeq: number,
    private readonly onEvent: (e: WorkflowEvent) => void,
    pollMs: number,
  ) {
    this.last = afterSeq;
    if (pollMs > 0) {
      this.timer = setInterval(() => void this.enqueue(() => this.catchUp()), pollMs);
      this.timer.unref();
    }
  }

  enqueue(fn: () => Promise<void> | void): Promise<void> {
    const r = this.chain.then(async () => {
      if (!this.closed) await fn();
    });
    this.chain = r.catch((err: unknown) => this.log('warn', 'event subscriber: delivery failed', { workflow: this.workflow, error: messageOf(err) }));
    return this.chain;
  }

  private deliver(e: WorkflowEvent): void {
    if (this.closed || e.seq <= this.last) return;
    this.last = e.seq;
    try {
      this.onEvent(e);
    } catch (err) {
      this.log('warn', 'event subscriber threw', { workflow: this.workflow, error: messageOf(err) });
    }
  }

  /** Deliver what the store holds after the last delivered event. */
  async catchUp(): Promise<void> {
    for (;;) {
      const evs = await this.store.listEvents(this.workflow, this.last, 500);
      for (const e of evs) this.deliver(e);
      if (evs.length < 500 || this.closed) return;
    }
  }

  /** A live event (already in the store): in order, gaps filled from the store. */
  offer(e: WorkflowEvent): void {
    void this.enqueue(async () => {
      if (e.seq <= this.last) return;
      if (e.seq > this.last + 1) await this.catchUp();
      this.deliver(e);
    });
  }

  close(): void {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
  }
}

export class Engine implements WorkflowEngine {
  private readonly store: Store;
  private readonly ext: WorkflowStoreExtensions;
  private readonly log: Logger;
  private readonly progressIntervalMs: number;
  readonly owner: string;
  private readonly leaseMs: number;
  private readonly scanIntervalMs: number;
  private readonly pollMs: number;
  private readonly defs = new Map<WorkflowKind, WorkflowDef>();
  private readonly runs = new Map<string, Run>();
  private readonly chains = new Map<string, Promise<void>>();
  private readonly subs = new Map<string, Set<Subscription>>();
  private scanTimer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(o: EngineOptions) {
    this.store = o.store;
    this.ext = hasExtensions(o.store) ? o.store : emulateExtensions(o.store);
    this.log = o.log ?? QUIET;
    this.progressIntervalMs = o.progressIntervalMs ?? 250;
    this.owner = o.owner ?? `${os.hostname()}/${process.pid}/${randomBytes(4).toString('hex')}`;
    this.leaseMs = o.leaseMs ?? 15_000;
    this.scanIntervalMs = o.scanIntervalMs ?? Math.floor(this.leaseMs / 2);
    this.pollMs = o.pollMs ?? 1000;
  }

  register(def: WorkflowDef): void {
    if (this.defs.has(def.kind)) throw new Error(`workflow kind ${def.kind} is registered already`);
    this.defs.set(def.kind, def);
  }

  kinds(): WorkflowKind[] {
    return [...this.defs.keys()];
  }

  private assertOpen(): void {
    if (this.stopped) throw new Error('the workflow engine is stopped');
  }

  private async get(id: string): Promise<Workflow> {
    const wf = await this.store.getWorkflow(id);
    if (!wf) throw new NotFoundError(`no workflow ${id}`);
    return wf;
  }

  // --- commands ----------------------------------------------------------------------------

  async start(kind: WorkflowKind, input: unknown, actor: string): Promise<Workflow> {
    this.assertOpen();
    const def = this.defs.get(kind);
    if (!def) throw new InvalidInputError(`unknown workflow kind ${JSON.stringify(kind)} (known: ${this.kinds().join(', ') || 'none'})`);
    const valid = await def.validate(input);
    const target = def.target(valid);
    const wf = await this.store.createWorkflow({ id: randomUUID(), kind, target, input: valid, actor });
    try {
      await this.audit(actor, 'workflow.start', wf, { kind });
      await this.emitState(wf, `pending: ${kind} of ${target}, started by ${actor}`, { by: actor });
    } finally {
      this.drive(wf.id, actor); // a failed audit write must not leave the workflow without a runner
    }
    return wf;
  }

  async cancel(id: string, actor: string): Promise<Workflow> {
    this.assertOpen();
    for (let tries = 0; ; tries++) {
      const wf = await this.get(id);
      if (wf.state === 'succeeded' || wf.state === 'cancelled') throw new ConflictError(`workflow ${id} is ${wf.state}: there is nothing to cancel`);
      if (wf.state === 'cancelling' || wf.state === 'rolling-back') return wf; // already on its way
      const t = await this.ext.transitionWorkflow(id, ['pending', 'running', 'failed'], { state: 'cancelling' });
      if (!t) {
        if (tries < 5) continue; // it changed meanwhile: look again
        throw new ConflictError(`workflow ${id} keeps changing state; try again`);
      }
      await this.audit(actor, 'workflow.cancel', t, { from: wf.state });
      await this.emitState(t, `cancelling (was ${wf.state}), by ${actor}`, { by: actor, from: wf.state });
      const run = this.runs.get(id);
      if (run) {
        run.actor = actor;
        run.kick = true;
        if (run.phase === 'forward' && run.why === null) {
          run.why = 'cancel';
          run.ctrl.abort(abortError(`workflow ${id} cancelled by ${actor}`));
        }
      }
      this.drive(id, actor);
      return t;
    }
  }

  async retry(id: string, actor: string): Promise<Workflow> {
    this.assertOpen();
    const wf = await this.get(id);
    if (wf.state !== 'failed') throw new ConflictError(`workflow ${id} is ${wf.state}: only a failed workflow can be retried`);
    const direction = (await this.rollingBack(id)) ? 'rollback' : 'forward';
    const patch: WorkflowPatch = { state: direction === 'rollback' ? 'rolling-back' : 'running', error: undefined };
    const t = await this.ext.transitionWorkflow(id, ['failed'], patch);
    if (!t) throw new ConflictError(`workflow ${id} changed state meanwhile; look again`);
    await this.audit(actor, 'workflow.retry', t, { direction, step: t.step });
    await this.emitState(t, `${t.state}: retried by ${actor} (${direction === 'rollback' ? 'continuing the rollback' : `from step ${t.step}`})`, { by: actor, direction });
    const run = this.runs.get(id);
    if (run) {
      run.kick = true;
      run.actor = actor;
    }
    this.drive(id, actor);
    return t;
  }

  /** Whether the workflow's rollback has begun (the recorded direction: steps undoing/undone). */
  private async rollingBack(id: string): Promise<boolean> {
    return (await this.store.listSteps(id)).some((s) => s.state === 'undoing' || s.state === 'undone');
  }

  async subscribe(id: string, afterSeq: number, onEvent: (e: WorkflowEvent) => void): Promise<() => void> {
    await this.get(id);
    const sub = new Subscription(this.store, this.log, id, afterSeq, onEvent, this.pollMs);
    let set = this.subs.get(id);
    if (!set) this.subs.set(id, (set = new Set()));
    set.add(sub);
    const unsubscribe = () => {
      sub.close();
      const s = this.subs.get(id);
      s?.delete(sub);
      if (s && s.size === 0) this.subs.delete(id);
    };
    await sub.enqueue(() => sub.catchUp());
    return unsubscribe;
  }

  /** Drive every workflow left pending, running, cancelling or rolling back (call at service
   *  start), then keep looking every scanIntervalMs for ones whose lease expired elsewhere.
   *  Resolves with the ids this engine tried to take (those leased by a live service are left). */
  async resumeAll(): Promise<string[]> {
    this.assertOpen();
    const ids = await this.scan();
    if (this.scanIntervalMs > 0 && !this.scanTimer) {
      this.scanTimer = setInterval(() => {
        this.scan().catch((e: unknown) => this.log('warn', 'resume scan failed', { error: messageOf(e) }));
      }, this.scanIntervalMs);
      this.scanTimer.unref();
    }
    return ids;
  }

  private async scan(): Promise<string[]> {
    if (this.stopped) return [];
    const ids = await this.ext.workflowIds(ACTIVE_STATES);
    for (const id of ids) this.drive(id, null);
    return ids;
  }

  /** Abort the running steps without recording them failed (they run again on resume), wait
   *  for them to settle (at most timeoutMs), give the leases up. */
  async stop(timeoutMs = 10_000): Promise<void> {
    this.stopped = true;
    if (this.scanTimer) clearInterval(this.scanTimer);
    this.scanTimer = undefined;
    for (const run of this.runs.values()) {
      run.why = 'stop';
      run.ctrl.abort(abortError('the management service is stopping'));
    }
    for (const set of this.subs.values()) for (const s of set) s.close();
    this.subs.clear();
    const all = Promise.allSettled([...this.runs.values()].map((r) => r.promise));
    if ((await within(all, timeoutMs)) === 'late') this.log('warn', 'stop: some steps did not settle in time', { ids: [...this.runs.keys()] });
    await Promise.allSettled([...this.chains.values()]);
  }

  /** Resolves with the workflow once it rests (succeeded, failed or cancelled) and this engine
   *  is not driving it; for tests and the CLI. */
  async wait(id: string, timeoutMs = 60_000): Promise<Workflow> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const run = this.runs.get(id);
      if (run) {
        await within(run.promise, Math.max(0, deadline - Date.now()));
        // driven again at once (a command came while it finished): wait for that run
        if (this.runs.has(id) && this.runs.get(id) !== run && Date.now() < deadline) continue;
      }
      const wf = await this.get(id);
      if (RESTING_STATES.includes(wf.state) && !this.runs.has(id)) {
        await this.chains.get(id);
        return wf;
      }
      if (Date.now() >= deadline) throw new Error(`workflow ${id} is still ${wf.state} after ${timeoutMs} ms`);
      await sleep(20);
    }
  }

  // --- events and audit ----------------------------------------------------------------------

  /** Append to the store, then publish; per workflow in order. Never throws (logged). */
  private emit(e: Omit<WorkflowEvent, 'seq' | 'at'>): Promise<void> {
    const id = e.workflow;
    const prev = this.chains.get(id) ?? Promise.resolve();
    const p = prev.then(async () => {
      try {
        const ev = await this.store.appendEvent(e);
        for (const s of this.subs.get(id) ?? []) s.offer(ev);
      } catch (err) {
        this.log('warn', 'could not record a workflow event', { workflow: id, message: e.message, error: messageOf(err) });
      }
    });
    this.chains.set(id, p);
    void p.then(() => {
      if (this.chains.get(id) === p) this.chains.delete(id);
    });
    return p;
  }

  private emitState(wf: Workflow, message: string, data: JsonObject = {}): Promise<void> {
    return this.emit({ workflow: wf.id, type: 'state', message, data: { ...data, state: wf.state, step: wf.step } });
  }

  private emitStep(id: string, name: string, index: number, state: string, attempt: number, message: string, extra: JsonObject = {}): Promise<void> {
    return this.emit({ workflow: id, type: 'step', step: name, message, data: { ...extra, index, state, attempt } });
  }

  private async audit(actor: string, action: string, wf: Workflow, detail: JsonObject): Promise<void> {
    try {
      await this.store.audit({ actor, action, target: wf.target, detail: { workflow: wf.id, kind: wf.kind, ...detail } });
    } catch (err) {
      this.log('error', 'could not write the audit log', { workflow: wf.id, action, error: messageOf(err) });
      throw err;
    }
  }

  // --- driving -------------------------------------------------------------------------------

  private drive(id: string, actor: string | null): void {
    if (this.stopped) return;
    const existing = this.runs.get(id);
    if (existing) {
      existing.kick = true;
      if (actor) existing.actor = actor;
      return;
    }
    const run: Run = { id, actor, phase: 'forward', ctrl: new AbortController(), why: null, kick: false, renewing: false, promise: Promise.resolve() };
    this.runs.set(id, run);
    run.promise = this.loop(run);
  }

  private async loop(run: Run): Promise<void> {
    const { id } = run;
    let leased = false;
    let renew: NodeJS.Timeout | undefined;
    let outcome: Outcome = 'halt';
    try {
      if (!(await this.ext.acquireLease(id, this.owner, this.leaseMs))) {
        this.log('debug', 'workflow leased by another service; leaving it', { workflow: id });
        return;
      }
      leased = true;
      renew = setInterval(() => void this.renew(run), Math.max(10, Math.floor(this.leaseMs / 3)));
      renew.unref();
      for (;;) {
        run.kick = false;
        outcome = await this.step(run);
        if (outcome === 'halt') return;
        if (outcome === 'rest' && !run.kick) return;
      }
    } catch (err) {
      outcome = 'halt';
      this.log('error', 'workflow driver failed; the workflow resumes at the next scan or start', { workflow: id, error: messageOf(err) });
    } finally {
      if (renew) clearInterval(renew);
      await this.chains.get(id);
      if (leased && run.why !== 'lease') await this.ext.releaseLease(id, this.owner).catch((e: unknown) => this.log('warn', 'could not release a lease', { workflow: id, error: messageOf(e) }));
      this.runs.delete(id);
      if (outcome === 'rest' && !this.stopped) {
        // a command may have moved it on after the loop's last look (and found the loop busy)
        const wf = await this.store.getWorkflow(id).catch(() => null);
        if (wf && ACTIVE_STATES.includes(wf.state)) this.drive(id, run.actor);
      }
    }
  }

  private async renew(run: Run): Promise<void> {
    if (run.renewing) return;
    run.renewing = true;
    try {
      const wf = await this.ext.renewLease(run.id, this.owner, this.leaseMs);
      if (!wf) {
        if (run.why !== 'stop' && this.runs.get(run.id) === run) {
          this.log('warn', 'lost the lease of a workflow; leaving it to its new owner', { workflow: run.id });
          run.why = 'lease';
          run.ctrl.abort(abortError('the lease of the workflow was lost'));
        }
        return;
      }
      // a cancel made through another service
      if (wf.state === 'cancelling' && run.phase === 'forward' && run.why === null) {
        run.why = 'cancel';
        run.kick = true;
        run.ctrl.abort(abortError(`workflow ${run.id} cancelled`));
      }
    } catch (err) {
      this.log('warn', 'could not renew a lease', { workflow: run.id, error: messageOf(err) });
    } finally {
      run.renewing = false;
    }
  }

  /** One look at the workflow and what its state asks for. */
  private async step(run: Run): Promise<Outcome> {
    if (run.why === 'stop' || run.why === 'lease') return 'halt';
    const wf = await this.store.getWorkflow(run.id);
    if (!wf) return 'halt';
    if (!ACTIVE_STATES.includes(wf.state)) return 'rest';
    const def = this.defs.get(wf.kind);
    if (!def) {
      this.log('warn', 'no definition registered for a workflow kind; leaving the workflow', { workflow: wf.id, kind: wf.kind });
      return 'halt';
    }
    let steps: StepDef[];
    try {
      steps = def.steps(wf.input);
    } catch (err) {
      const t = await this.ext.transitionWorkflow(wf.id, ACTIVE_STATES, { state: 'failed', error: `the steps of the workflow could not be built: ${messageOf(err)}` });
      if (t) await this.emitState(t, `failed: ${t.error ?? ''}`);
      return t ? 'rest' : 'again';
    }
    if (wf.state === 'pending' || wf.state === 'running') return this.forward(run, wf, steps);
    return this.rollback(run, wf, steps);
  }

  private context(run: Run, wf: Workflow, step: StepDef, index: number, attempt: number, outputs: JsonObject): StepContext & { flush(): Promise<void> } {
    const pending: Promise<void>[] = [];
    const throttle = new ProgressThrottle(this.progressIntervalMs, (p) => {
      const fraction = p.fraction === undefined || !Number.isFinite(p.fraction) ? undefined : Math.min(1, Math.max(0, p.fraction));
      pending.push(this.emit({ workflow: wf.id, type: 'progress', step: step.name, fraction, message: p.message, data: p.data ? { ...p.data, index } : { index } }));
    });
    return {
      workflow: wf,
      outputs: { ...outputs },
      attempt,
      signal: run.ctrl.signal,
      progress: (fraction, message, data) => throttle.note({ fraction, message, data }),
      audit: (action, detail) => this.audit(run.actor ?? wf.actor, action, wf, { step: step.name, index, ...detail }),
      flush: async () => {
        throttle.flush();
        await Promise.all(pending);
      },
    };
  }

  private async forward(run: Run, wf0: Workflow, steps: StepDef[]): Promise<Outcome> {
    const id = wf0.id;
    run.phase = 'forward';
    let wf = wf0;
    const actor = (): string => run.actor ?? wf.actor;
    if (wf.state === 'pending') {
      const t = await this.ext.transitionWorkflow(id, ['pending'], { state: 'running' });
      if (!t) return 'again';
      wf = t;
      await this.emitState(wf, 'running');
    }
    const records = new Map((await this.store.listSteps(id)).map((s) => [s.index, s]));
    const outputs: JsonObject = { ...wf.outputs };
    for (let i = wf.step; i < steps.length; i++) {
      if (run.why) return run.why === 'cancel' ? 'again' : 'halt';
      const step = steps[i]!;
      const rec = records.get(i);
      if (rec && rec.state === 'done' && rec.name === step.name) {
        // done, but the process died before the workflow moved on: adopt the recorded output
        outputs[step.name] = rec.output ?? null;
        wf = await this.store.updateWorkflow(id, { outputs, step: i + 1 });
        continue;
      }
      const attempt = (rec && rec.name === step.name ? rec.attempts : 0) + 1;
      const startedAt = now();
      wf = await this.store.updateWorkflow(id, { step: i });
      if (wf.state !== 'running') return 'again'; // cancelled through another service
      const base: StepRecord = { workflow: id, index: i, name: step.name, state: 'running', attempts: attempt, startedAt };
      await this.store.putStep(base);
      await this.emitStep(id, step.name, i, 'running', attempt, `${step.name}: running${attempt > 1 ? ` (attempt ${attempt})` : ''}`);

      const ctx = this.context(run, wf, step, i, attempt, outputs);
      let output: Json | void = undefined;
      let failure: { error: unknown } | null = null;
      try {
        output = await step.run(ctx);
      } catch (error) {
        failure = { error };
      }
      await ctx.flush();

      if (!failure) {
        const out: Json = output === undefined ? null : output;
        await this.store.putStep({ ...base, state: 'done', output: out, endedAt: now() });
        outputs[step.name] = out;
        wf = await this.store.updateWorkflow(id, { outputs, step: i + 1 });
        await this.emitStep(id, step.name, i, 'done', attempt, `${step.name}: done`);
        await this.audit(actor(), 'step.done', wf, { step: step.name, index: i, attempt });
        continue;
      }
      // stopped or lease lost: leave the step running on record; it runs again on resume
      if (run.why === 'stop' || run.why === 'lease') return 'halt';
      const msg = messageOf(failure.error);
      await this.store.putStep({ ...base, state: 'failed', error: msg, endedAt: now() });
      await this.emitStep(id, step.name, i, 'failed', attempt, `${step.name}: failed: ${msg}`, { error: msg });
      if (run.why === 'cancel') return 'again';
      const t = await this.ext.transitionWorkflow(id, ['running'], { state: 'failed', error: `step ${step.name} failed: ${msg}` });
      if (!t) return 'again';
      await this.emitState(t, `failed: step ${step.name} failed: ${msg}`, { error: msg });
      await this.audit(actor(), 'workflow.fail', t, { step: step.name, index: i, attempt, error: msg });
      return 'rest';
    }
    if (run.why) return run.why === 'cancel' ? 'again' : 'halt';
    const t = await this.ext.transitionWorkflow(id, ['running'], { state: 'succeeded', step: steps.length });
    if (!t) return 'again';
    await this.emitState(t, 'succeeded');
    await this.audit(actor(), 'workflow.succeed', t, { steps: steps.length });
    return 'rest';
  }

  private async rollback(run: Run, wf0: Workflow, steps: StepDef[]): Promise<Outcome> {
    const id = wf0.id;
    if (run.phase === 'forward') {
      run.phase = 'rollback';
      // the cancel's abort was for the forward steps; undo runs under a fresh signal
      if (run.why === 'cancel') {
        run.why = null;
        run.ctrl = new AbortController();
      }
    }
    let wf = wf0;
    const actor = (): string => run.actor ?? wf.actor;
    if (wf.state === 'cancelling') {
      const t = await this.ext.transitionWorkflow(id, ['cancelling'], { state: 'rolling-back' });
      if (!t) return 'again';
      wf = t;
      await this.emitState(wf, 'rolling-back');
      await this.audit(actor(), 'workflow.rollback', wf, { step: wf.step });
    }
    const records = (await this.store.listSteps(id)).sort((a, b) => b.index - a.index);
    // A step's output reaches its record before the workflow's outputs: after a crash between
    // the two, the record is the one that has it (undos read their own step's output).
    const outputs = { ...wf.outputs };
    for (const r of records) if (r.output !== undefined && outputs[r.name] === undefined && (r.state === 'done' || r.state === 'undoing')) outputs[r.name] = r.output;
    for (const rec of records) {
      if (run.why) return 'halt';
      if (rec.state !== 'running' && rec.state !== 'done' && rec.state !== 'failed' && rec.state !== 'undoing') continue;
      const step = steps[rec.index];
      if (!step || step.name !== rec.name) {
        this.log('warn', 'rollback: a recorded step is not in the definition any more; kept', { workflow: id, step: rec.name, index: rec.index });
        continue;
      }
      if (!step.undo) continue; // kept
      const attempt = rec.state === 'undoing' ? rec.attempts + 1 : 1;
      wf = await this.store.updateWorkflow(id, { step: rec.index });
      const base: StepRecord = { workflow: id, index: rec.index, name: rec.name, state: 'undoing', attempts: attempt, startedAt: now() };
      if (rec.output !== undefined) base.output = rec.output;
      await this.store.putStep(base);
      await this.emitStep(id, step.name, rec.index, 'undoing', attempt, `${step.name}: undoing${attempt > 1 ? ` (attempt ${attempt})` : ''}`);
      const ctx = this.context(run, wf, step, rec.index, attempt, outputs);
      try {
        await step.undo(ctx);
      } catch (err) {
        await ctx.flush();
        if (run.why) return 'halt';
        const msg = messageOf(err);
        // stays undoing: the record says the rollback is under way, retry continues it
        await this.store.putStep({ ...base, error: msg, endedAt: now() });
        await this.emitStep(id, step.name, rec.index, 'undoing', attempt, `${step.name}: undo failed: ${msg}`, { error: msg });
        const t = await this.ext.transitionWorkflow(id, ['rolling-back'], { state: 'failed', error: `rollback failed at step ${step.name}: ${msg}` });
        if (!t) return 'again';
        await this.emitState(t, `failed: rollback failed at step ${step.name}: ${msg}`, { error: msg });
        await this.audit(actor(), 'workflow.rollback-fail', t, { step: step.name, index: rec.index, attempt, error: msg });
        return 'rest';
      }
      await ctx.flush();
      await this.store.putStep({ ...base, state: 'undone', endedAt: now() });
      await this.emitStep(id, step.name, rec.index, 'undone', attempt, `${step.name}: undone`);
      await this.audit(actor(), 'step.undone', wf, { step: step.name, index: rec.index, attempt });
    }
    if (run.why) return 'halt';
    const t = await this.ext.transitionWorkflow(id, ['rolling-back'], { state: 'cancelled' });
    if (!t) return 'again';
    await this.emitState(t, 'cancelled');
    await this.audit(actor(), 'workflow.cancelled', t, {});
    return 'rest';
  }
}
