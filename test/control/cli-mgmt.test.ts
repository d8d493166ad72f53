// The management commands as processes (dist/cli.js; run `npm run build` first) against the
// real API, store and engine of test/control/api-harness.ts, running in this test process.
//
// Covered: --help with examples for every management command (and `spillway volume` / `profile`
// still there); token create (secret once) / list / delete, a token from SPILLWAY_TOKEN and
// SPILLWAY_TOKEN_FILE; inventory put (JSON, YAML, stdin) / list / show / delete, human tables;
// a burst started with --no-wait then `workflow watch --json` (JSON lines, exit 0); a failing
// action watched in plain mode (exit 1, error printed); resize-edge's --size into sizeBytes;
// cancel --watch (exit 1: cancelled); retry --watch (exit 0); workflow list/show/events; Ctrl-C
// while watching (exit 130, the workflow goes on); clear errors: no token, a wrong token, a
// viewer writing, no service at --api.

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import type { TokenRecord, Workflow, WorkflowEvent } from '../../src/control/types.js';
import { CLI, freePort, run, startProc } from '../helpers/proc.js';
import { request, startHarness, until, type Harness } from './api-harness.js';

let h: Harness;

before(async () => {
  assert.ok(existsSync(CLI), `${CLI} is missing: run \`npm run build\` first`);
  h = await startHarness();
  await request(h.url, 'PUT', '/v1/sites/dc', { token: h.operator, body: { kind: 'onprem', region: 'eu' } });
});
after(async () => {
  await h?.close();
});

interface Ran {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run the CLI with --api (and --token unless `token` is null); env without SPILLWAY_*. */
function cli(args: string[], o: { token?: string | null; env?: Record<string, string>; input?: string } = {}): Promise<Ran> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('SPILLWAY_') && v !== undefined) env[k] = v;
  const token = o.token === undefined ? h.operator : o.token;
  return run(process.execPath, [CLI, ...args, '--api', h.url, ...(token ? ['--token', token] : [])], { allowFail: true, env: { ...env, ...o.env }, ...(o.input !== undefined ? { input: o.input } : {}) });
}

function json<T>(r: Ran): T {
  assert.equal(r.code, 0, `exit ${r.code}\n${r.stdout}\n${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

function jsonLines<T>(text: string): T[] {
  return text
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as T);
}

describe('help', () => {
  test('every management command has --help with examples; edge-local volume and profile are still there', async () => {
    const cmds = [
      ['inventory'],
      ['inventory', 'hosts'],
      ['inventory', 'sites', 'list'],
      ['inventory', 'edges', 'show'],
      ['inventory', 'instances', 'put'],
      ['inventory', 'profiles', 'delete'],
      ['workflow'],
      ...['list', 'show', 'watch', 'events', 'start', 'cancel', 'retry'].map((c) => ['workflow', c]),
      ...['burst', 'clone', 'bring-back', 'migrate', 'detach', 'move-live', 'resize-edge'].map((c) => [c]),
      ['token'],
      ...['create', 'list', 'delete'].map((c) => ['token', c]),
    ];
    await Promise.all(
      cmds.map(async (c) => {
        const r = await run(process.execPath, [CLI, ...c, '--help'], { allowFail: true });
        assert.equal(r.code, 0, `${c.join(' ')}: ${r.stderr}`);
        assert.match(r.stdout, /\nExamples?:\n( {2}.*\n)* {2}spillway /, c.join(' '));
      }),
    );
    for (const c of ['burst', 'clone', 'migrate', 'resize-edge', 'workflow watch']) {
      const r = await run(process.execPath, [CLI, ...c.split(' '), '--help']);
      for (const opt of ['--api', '--token', '--json']) assert.ok(r.stdout.includes(opt), `${c} ${opt}`);
    }
    assert.match((await run(process.execPath, [CLI, 'burst', '--help'])).stdout, /--no-wait/);
    assert.match((await run(process.execPath, [CLI, 'migrate', '--help'])).stdout, /--no-detach/);
    assert.match((await run(process.execPath, [CLI, 'volume', '--help'])).stdout, /status/);
    assert.match((await run(process.execPath, [CLI, 'profile', '--help'])).stdout, /record/);
  });
});

describe('tokens', () => {
  test('create prints the secret once, list shows it without the secret, the token works, delete revokes it', async () => {
    const t = json<TokenRecord & { secret: string }>(await cli(['token', 'create', 'grafana', '--role', 'viewer', '--json']));
    assert.equal(t.role, 'viewer');
    assert.match(t.secret, /^spw_/);
    const plain = await cli(['token', 'create', 'alice', '--role', 'operator']);
    assert.equal(plain.code, 0, plain.stderr);
    assert.match(plain.stdout, /^spw_[A-Za-z0-9_-]{43}\n$/);
    assert.match(plain.stderr, /shown only now/);

    const list = json<TokenRecord[]>(await cli(['token', 'list', '--json']));
    assert.ok(list.some((x) => x.id === t.id && x.name === 'grafana'));
    const table = await cli(['token', 'list']);
    assert.match(table.stdout, /^ID\s+NAME\s+ROLE\s+CREATED\n/);
    assert.ok(!table.stdout.includes(t.secret));

    // the viewer token from the environment and from a file
    assert.equal((await cli(['inventory', 'sites', '--json'], { token: null, env: { SPILLWAY_TOKEN: t.secret } })).code, 0);
    const file = path.join(h.dir, 'viewer.token');
    await writeFile(file, t.secret + '\n');
    assert.equal((await cli(['inventory', 'sites', 'list', '--json'], { token: null, env: { SPILLWAY_TOKEN_FILE: file } })).code, 0);
    const denied = await cli(['inventory', 'sites', 'put', 'x', '--file', '-'], { token: t.secret, input: '{"kind":"cloud","region":"x"}' });
    assert.equal(denied.code, 1);
    assert.match(denied.stderr, /role viewer.*operator token/);

    const d = await cli(['token', 'delete', t.id]);
    assert.equal(d.code, 0, d.stderr);
    assert.match(d.stdout, new RegExp(`token ${t.id} deleted`));
    const revoked = await cli(['inventory', 'sites'], { token: t.secret });
    assert.equal(revoked.code, 1);
    assert.match(revoked.stderr, /refused the token.*spillway token create/);
  });

  test('clear errors: no token, a bad role, no service at --api', async () => {
    const none = await cli(['workflow', 'list'], { token: null });
    assert.equal(none.code, 1);
    assert.match(none.stderr, /no API token given: .*spillway token create.*SPILLWAY_TOKEN_FILE/);
    const role = await cli(['token', 'create', 'x', '--role', 'admin']);
    assert.equal(role.code, 1);
    assert.match(role.stderr, /viewer \(read only\) or operator/);
    const port = await freePort();
    const r = await run(process.execPath, [CLI, 'inventory', 'hosts', '--api', `http://127.0.0.1:${port}`, '--token', h.operator], { allowFail: true });
    assert.equal(r.code, 1);
    assert.match(r.stderr, new RegExp(`no management service at http://127.0.0.1:${port} \\(start it with \`spillway service run\``));
  });
});

describe('inventory', () => {
  test('put from JSON, YAML and stdin; list, show, delete; tables for people', async () => {
    const site = path.join(h.dir, 'site.json');
    await writeFile(site, JSON.stringify({ kind: 'cloud', region: 'eu-west', tags: ['eu'] }));
    const s = json<{ name: string; kind: string }>(await cli(['inventory', 'sites', 'put', 'cloud', '--file', site, '--json']));
    assert.deepEqual([s.name, s.kind], ['cloud', 'cloud']);
    const edgeYaml = path.join(h.dir, 'edge.yaml');
    await writeFile(edgeYaml, 'site: cloud\ncontrol: /run/cloud/control.sock\nnbd: 127.0.0.1:10809\n');
    assert.equal((await cli(['inventory', 'edges', 'put', 'ce', '--file', edgeYaml])).stdout, 'edge ce saved\n');
    const hostPut = await cli(['inventory', 'hosts', 'put', 'c1', '--file', '-', '--json'], { input: JSON.stringify({ site: 'cloud', edge: 'ce', vcpus: 8, ramMiB: 8192 }) });
    assert.equal(json<{ state: string }>(hostPut).state, 'up');
    const inst = JSON.stringify({ origin: 'dc', spec: { kernel: '/k', initrd: '/i', append: '', memoryMiB: 512, vcpus: 1, mac: '52:54:00:00:00:01' } });
    for (const n of ['web', 'flaky', 'doomed']) assert.equal((await cli(['inventory', 'instances', 'put', n, '--file', '-'], { input: inst })).code, 0);

    const hosts = json<Array<{ name: string }>>(await cli(['inventory', 'hosts', 'list', '--json']));
    assert.deepEqual(hosts.map((x) => x.name), ['c1']);
    assert.deepEqual(json<unknown[]>(await cli(['inventory', 'hosts', '--site', 'dc', '--json'])), []);
    const table = await cli(['inventory', 'hosts']);
    assert.match(table.stdout, /^NAME\s+SITE\s+STATE\s+VCPUS\s+RAM.*\nc1\s+cloud\s+up\s+8\s+8\.0 GiB/);
    const show = await cli(['inventory', 'hosts', 'show', 'c1']);
    assert.match(show.stdout, /^name: c1\n/m);
    assert.match(show.stdout, /ramMiB: 8192/);

    const bad = await cli(['inventory', 'hosts', 'put', 'c2', '--file', '-'], { input: '{"site": "cloud", "edge": "ce", "vcpus": "many"}' });
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /vcpus: .*expected number/);
    const missing = await cli(['inventory', 'hosts', 'show', 'nope']);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /no host named "nope"/);
    const busy = await cli(['inventory', 'sites', 'delete', 'cloud']);
    assert.equal(busy.code, 1);
    assert.match(busy.stderr, /still referred to by edges "ce"/);

    await cli(['inventory', 'hosts', 'put', 'tmp', '--file', '-'], { input: JSON.stringify({ site: 'cloud', edge: 'ce', vcpus: 1, ramMiB: 1 }) });
    assert.deepEqual(json(await cli(['inventory', 'hosts', 'delete', 'tmp', '--json'])), { deleted: 'tmp', kind: 'host' });
  });
});

describe('workflows', () => {
  test('burst --no-wait, then workflow watch --json: JSON lines of events, exit 0', async () => {
    const wf = json<Workflow>(await cli(['burst', 'web', '--site', 'cloud', '--no-wait', '--json']));
    assert.equal(wf.kind, 'transfer');
    assert.deepEqual(wf.input, { instance: 'web', site: 'cloud' });
    const w = await cli(['workflow', 'watch', wf.id, '--json']);
    assert.equal(w.code, 0, w.stderr);
    const events = jsonLines<WorkflowEvent>(w.stdout);
    assert.deepEqual(events.map((e) => e.seq), events.map((_, i) => i + 1));
    assert.ok(events.some((e) => e.type === 'progress' && e.step === 'copy'));
    assert.equal(events.at(-1)!.data?.state, 'succeeded');

    const list = json<Workflow[]>(await cli(['workflow', 'list', '--target', 'web', '--json']));
    assert.equal(list[0]!.id, wf.id);
    const show = json<Workflow & { steps: unknown[] }>(await cli(['workflow', 'show', wf.id, '--json']));
    assert.equal(show.steps.length, 3);
    const people = await cli(['workflow', 'show', wf.id]);
    assert.match(people.stdout, /state\s+succeeded/);
    assert.match(people.stdout, /copy\s+done\s+1/);
    const evs = json<WorkflowEvent[]>(await cli(['workflow', 'events', wf.id, '--after', '3', '--json']));
    assert.equal(evs[0]!.seq, 4);
    assert.equal(evs.length, events.length - 3);
  });

  test('an action watched without --json on a pipe: plain lines; a failure exits 1 with its error', async () => {
    const ok = await cli(['burst', 'web']);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /step copy: running/);
    assert.match(ok.stdout, /copy 50% copied 50%/);
    assert.match(ok.stdout, /workflow .* \(transfer web\) succeeded in/);
    assert.ok(!ok.stdout.includes('\x1b['), 'no terminal escapes on a pipe');

    const bad = await cli(['bring-back', 'doomed']);
    assert.equal(bad.code, 1);
    assert.match(bad.stdout, /step doomed: failed: always fails/);
    assert.match(bad.stderr, /\(reverse doomed\) failed: step doomed failed: always fails/);
  });

  test('resize-edge --size, cancel --watch (exit 1: cancelled), retry --watch (exit 0)', async () => {
    const wf = json<Workflow>(await cli(['resize-edge', 'ce', '--size', '2GiB', '--no-wait', '--json']));
    assert.deepEqual(wf.input, { edge: 'ce', sizeBytes: 2 * 1024 ** 3 });
    await until(async () => (await h.store.listSteps(wf.id)).some((s) => s.name === 'grow' && s.state === 'running'), 5000, 'grow');
    const c = await cli(['workflow', 'cancel', wf.id, '--watch', '--json']);
    assert.equal(c.code, 1);
    assert.equal(jsonLines<WorkflowEvent>(c.stdout).at(-1)!.data?.state, 'cancelled');
    assert.match(c.stderr, /cancelled/);

    const badSize = await cli(['resize-edge', 'ce', '--size', 'lots']);
    assert.equal(badSize.code, 1);
    assert.match(badSize.stderr, /not a size/);

    const f = json<Workflow>(await cli(['detach', 'flaky', '--no-wait', '--json']));
    assert.equal((await h.engine.wait(f.id, 5000)).state, 'failed');
    const again = await cli(['workflow', 'watch', f.id]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /failed: step flaky failed: the origin did not answer/);
    const r = await cli(['workflow', 'retry', f.id, '--watch', '--json']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(jsonLines<WorkflowEvent>(r.stdout).at(-1)!.data?.state, 'succeeded');
  });

  test('workflow start with a JSON input; a conflict and a bad input are explained', async () => {
    // The first workflow runs until cancelled, so the second start meets it however slow the machine.
    const wf = json<Workflow>(await cli(['workflow', 'start', 'resize-edge', '--input', '{"edge":"ce","sizeBytes":1048576}', '--no-wait', '--json']));
    const dup = await cli(['resize-edge', 'ce', '--size', '1MiB']);
    assert.equal(dup.code, 1);
    assert.match(dup.stderr, /spillway: .*(unfinished|not finished|running|already)/i);
    await h.engine.cancel(wf.id, 'test');
    assert.equal((await h.engine.wait(wf.id, 10000)).state, 'cancelled');
    const bad = await cli(['workflow', 'start', 'transfer', '--input', '{"instance": 5}']);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /input\.instance/);
    const notJson = await cli(['workflow', 'start', 'transfer', '--input', '{nope']);
    assert.equal(notJson.code, 1);
    assert.match(notJson.stderr, /--input is not JSON/);
  });

  test('Ctrl-C while watching stops watching (exit 130); the workflow goes on', async () => {
    const wf = json<Workflow>(await cli(['resize-edge', 'ce', '--size', '1GiB', '--no-wait', '--json']));
    const env: Record<string, string> = {};
    for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('SPILLWAY_') && v !== undefined) env[k] = v;
    const p = startProc(process.execPath, [CLI, 'workflow', 'watch', wf.id, '--api', h.url, '--token', h.operator], { env });
    await until(async () => /grow/.test(p.stdout()), 5000, 'the watch to show the grow step');
    const r = await p.stop('SIGINT');
    assert.equal(r.code, 130, p.stderr());
    assert.match(p.stderr(), new RegExp(`stopped watching; workflow ${wf.id} goes on in the service`));
    assert.equal((await h.store.getWorkflow(wf.id))?.state, 'running');
    assert.equal((await cli(['workflow', 'cancel', wf.id])).code, 0);
    assert.equal((await h.engine.wait(wf.id, 5000)).state, 'cancelled');
  });
});
