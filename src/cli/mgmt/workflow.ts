// `spillway workflow list|show|watch|events|start|cancel|retry`, and watchWorkflow(), which
// the action shortcuts (burst, clone, ...) use to follow what they started.

import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { Command, InvalidArgumentError } from 'commander';

import type { StepRecord, Workflow, WorkflowEvent } from '../../control/types.js';
import { ApiClient, CliError, withApi, type ApiOptions } from './client.js';
import { seconds, table, watcher } from './render.js';

type Detail = Workflow & { steps: StepRecord[] };
const RESTING = new Set(['succeeded', 'failed', 'cancelled']);
const path = (id: string, rest = '') => `/v1/workflows/${encodeURIComponent(id)}${rest}`;

/** What a watch ended with: the workflow, or that the user stopped watching (Ctrl-C). */
export type WatchEnd = { kind: 'finished'; workflow: Detail } | { kind: 'interrupted' };

/**
 * Follow a workflow's events until it rests (succeeded, failed, cancelled), reconnecting
 * (with Last-Event-ID) if the connection drops. Ctrl-C stops watching, not the workflow.
 */
export async function watchWorkflow(client: ApiClient, id: string, o: { json?: boolean }): Promise<WatchEnd> {
  let wf = await client.request<Detail>('GET', path(id));
  const w = watcher(wf, { json: o.json, tty: !o.json && !!process.stdout.isTTY });
  const abort = new AbortController();
  const onSigint = () => abort.abort();
  process.once('SIGINT', onSigint);
  let after = 0;
  let failures = 0;
  try {
    for (;;) {
      try {
        await client.events(id, after, (e: WorkflowEvent) => {
          if (e.seq <= after) return;
          after = e.seq;
          failures = 0;
          w.event(e);
        }, abort.signal);
      } catch (err) {
        if (abort.signal.aborted) throw err;
        if (!(err instanceof CliError) || err.status !== undefined || ++failures > 10) throw err;
        // the connection dropped: try again from the last event seen
        await sleep(Math.min(5000, 250 * 2 ** failures), undefined, { signal: abort.signal });
        continue;
      }
      wf = await client.request<Detail>('GET', path(id));
      if (RESTING.has(wf.state)) break;
      await sleep(250, undefined, { signal: abort.signal });
    }
    w.finish(wf);
    return { kind: 'finished', workflow: wf };
  } catch (err) {
    if (abort.signal.aborted) {
      w.stop();
      process.stderr.write(`\nstopped watching; workflow ${id} goes on in the service (follow it again: spillway workflow watch ${id}; stop it: spillway workflow cancel ${id})\n`);
      return { kind: 'interrupted' };
    }
    w.stop();
    throw err;
  } finally {
    process.off('SIGINT', onSigint);
  }
}


/** The exit code of a watch: 0 succeeded, 1 failed or cancelled, 130 when the user stopped it. */
export function exitCodeOf(end: WatchEnd): number {
  if (end.kind === 'interrupted') return 130;
  return end.workflow.state === 'succeeded' ? 0 : 1;
}

/** Start a workflow; then watch it unless --no-wait (then print it). Sets process.exitCode. */
export async function startAndWatch(o: ApiOptions & { wait?: boolean }, kind: string, input: Record<string, unknown>): Promise<void> {
  const client = ApiClient.from(o);
  const wf = await client.request<Workflow>('POST', '/v1/workflows', { kind, input });
  if (o.wait === false) {
    process.stdout.write(o.json ? JSON.stringify(wf, null, 2) + '\n' : `started workflow ${wf.id} (${wf.kind} ${wf.target}); follow it with: spillway workflow watch ${wf.id}\n`);
    return;
  }
  if (!o.json) process.stderr.write(`started workflow ${wf.id} (${wf.kind} ${wf.target}); Ctrl-C stops watching, not the workflow\n`);
  process.exitCode = exitCodeOf(await watchWorkflow(client, wf.id, o));
}

function positiveInt(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError('expected a positive whole number');
  return n;
}
function nonNegInt(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError('expected a whole number (0 or more)');
  return n;
}

function describe(w: Detail): string {
  const lines = [
    `workflow ${w.id}`,
    `  kind      ${w.kind}`,
    `  target    ${w.target}`,
    `  state     ${w.state}${w.error ? ` (${w.error})` : ''}`,
    `  actor     ${w.actor}`,
    `  created   ${w.createdAt}`,
    `  updated   ${w.updatedAt} (${seconds(Date.parse(w.updatedAt) - Date.parse(w.createdAt))} after creation)`,
    `  input     ${JSON.stringify(w.input)}`,
  ];
  const out = lines.join('\n') + '\n';
  if (!w.steps.length) return out + '  (no step has run yet)\n';
  return (
    out +
    '\n' +
    table(
      ['#', 'STEP', 'STATE', 'ATTEMPTS', 'TOOK', 'ERROR'],
      w.steps.map((s) => [s.index, s.name, s.state, s.attempts, s.endedAt ? seconds(Date.parse(s.endedAt) - Date.parse(s.startedAt)) : '', s.error]),
    )
  );
}

export function registerWorkflow(program: Command): void {
  const wfc = program
    .command('workflow')
    .summary('list, follow, cancel and retry management workflows')
    .description('Workflows move instances (burst, clone, bring-back, migrate, detach, move-live) and resize edges; the management service runs them durably. These commands talk to it over its REST API (docs/api.md).')
    .addHelpText('after', '\nExamples:\n  spillway workflow list --state running\n  spillway workflow watch wf_2x8k3l\n  spillway workflow cancel wf_2x8k3l --watch\n  spillway workflow retry wf_2x8k3l');

  withApi(
    wfc
      .command('list')
      .description('List workflows, newest first.')
      .option('--state <state>', 'only this state: pending, running, succeeded, failed, cancelling, rolling-back, cancelled')
      .option('--kind <kind>', 'only this kind: transfer, clone, reverse, migrate, detach, live-migrate, resize-edge, ...')
      .option('--target <name>', 'only those acting on this instance or edge')
      .option('--limit <n>', 'at most this many (default 100)', positiveInt)
      .addHelpText('after', '\nExamples:\n  spillway workflow list\n  spillway workflow list --state failed --json\n  spillway workflow list --target web-1'),
  ).action(async (o: ApiOptions & { state?: string; kind?: string; target?: string; limit?: number }) => {
    const q = new URLSearchParams();
    for (const k of ['state', 'kind', 'target', 'limit'] as const) if (o[k] !== undefined) q.set(k, String(o[k]));
    const r = await ApiClient.from(o).request<{ items: Workflow[] }>('GET', `/v1/workflows${q.size ? `?${q}` : ''}`);
    if (o.json) return void process.stdout.write(JSON.stringify(r.items, null, 2) + '\n');
    if (!r.items.length) return void process.stdout.write('no workflows\n');
    process.stdout.write(table(['ID', 'KIND', 'TARGET', 'STATE', 'STEP', 'ACTOR', 'UPDATED'], r.items.map((w) => [w.id, w.kind, w.target, w.state, w.step, w.actor, w.updatedAt])));
  });

  withApi(wfc.command('show').argument('<id>', 'the workflow id').description('Show a workflow: its input, state, error and each step.').addHelpText('after', '\nExample:\n  spillway workflow show wf_2x8k3l --json')).action(async (id: string, o: ApiOptions) => {
    const w = await ApiClient.from(o).request<Detail>('GET', path(id));
    process.stdout.write(o.json ? JSON.stringify(w, null, 2) + '\n' : describe(w));
  });

  withApi(
    wfc
      .command('watch')
      .argument('<id>', 'the workflow id')
      .description('Follow a workflow until it succeeds, fails or is cancelled: progress bars on a terminal, one line per event otherwise, JSON lines with --json. Exit code 0 when it succeeded, 1 when it failed or was cancelled (the error is printed). Ctrl-C stops watching; the workflow goes on.')
      .addHelpText('after', '\nExamples:\n  spillway workflow watch wf_2x8k3l\n  spillway workflow watch wf_2x8k3l --json | jq -c .'),
  ).action(async (id: string, o: ApiOptions) => {
    process.exitCode = exitCodeOf(await watchWorkflow(ApiClient.from(o), id, o));
  });

  withApi(
    wfc
      .command('events')
      .argument('<id>', 'the workflow id')
      .option('--after <seq>', 'only events after this seq', nonNegInt)
      .description('Print the events a workflow has recorded so far (no following; see watch).')
      .addHelpText('after', '\nExample:\n  spillway workflow events wf_2x8k3l --after 10 --json'),
  ).action(async (id: string, o: ApiOptions & { after?: number }) => {
    const r = await ApiClient.from(o).request<{ items: WorkflowEvent[] }>('GET', path(id, `/events?format=json${o.after !== undefined ? `&after=${o.after}` : ''}`));
    if (o.json) return void process.stdout.write(JSON.stringify(r.items, null, 2) + '\n');
    for (const e of r.items) process.stdout.write(`${String(e.seq).padStart(5)}  ${e.at}  ${e.type.padEnd(8)} ${e.step ? `${e.step}: ` : ''}${e.fraction !== undefined ? `${Math.round(e.fraction * 100)}% ` : ''}${e.message}\n`);
  });

  withApi(
    wfc
      .command('start')
      .argument('<kind>', 'transfer, clone, reverse, migrate, detach, live-migrate, resize-edge, ...')
      .requiredOption('-i, --input <json>', 'the input as JSON, or @FILE to read it from a file')
      .option('--no-wait', 'print the workflow and return at once instead of watching it')
      .description('Start any workflow with an input given as JSON (the shortcuts burst, clone, bring-back, migrate, detach, move-live and resize-edge build the input for you).')
      .addHelpText('after', `\nExample:\n  spillway workflow start transfer --input '{"instance":"web-1","site":"cloud-eu"}'`),
  ).action(async (kind: string, o: ApiOptions & { input: string; wait?: boolean }) => {
    let text = o.input;
    if (text.startsWith('@')) text = readFileSync(text.slice(1), 'utf8');
    let input: unknown;
    try {
      input = JSON.parse(text);
    } catch (err) {
      throw new CliError(`--input is not JSON: ${(err as Error).message}`);
    }
    if (!input || typeof input !== 'object' || Array.isArray(input)) throw new CliError('--input must be a JSON object');
    await startAndWatch(o, kind, input as Record<string, unknown>);
  });

  for (const [verb, what] of [
    ['cancel', 'Cancel a workflow: the running step is aborted and the steps done are undone in reverse order. Prints the workflow (cancelling); --watch follows the rollback.'],
    ['retry', 'Retry a failed workflow from its failed step. Prints the workflow; --watch follows it.'],
  ] as const) {
    withApi(
      wfc
        .command(verb)
        .argument('<id>', 'the workflow id')
        .option('--watch', 'then follow it (exit code as for watch)')
        .description(what)
        .addHelpText('after', `\nExamples:\n  spillway workflow ${verb} wf_2x8k3l\n  spillway workflow ${verb} wf_2x8k3l --watch`),
    ).action(async (id: string, o: ApiOptions & { watch?: boolean }) => {
      const client = ApiClient.from(o);
      const w = await client.request<Workflow>('POST', path(id, `/${verb}`));
      if (!o.watch) return void process.stdout.write(o.json ? JSON.stringify(w, null, 2) + '\n' : `workflow ${w.id} (${w.kind} ${w.target}): ${w.state}\n`);
      process.exitCode = exitCodeOf(await watchWorkflow(client, w.id, o));
    });
  }
}
