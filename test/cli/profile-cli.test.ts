// `spillway profile` as a process (from dist/; run `npm run build` first) against a fake control
// socket: a tiny HTTP server on a UNIX socket in a temp dir that implements the control routes of
// docs/profiles.md with canned answers and records what it was asked. The stand-in is here to
// script what a real edge rarely says (409/500 answers, a missing file map, an edge that stops
// a recording by itself); the same commands against a real `spillway edge` and a real VM run in
// test/prefetch/boot-profile.test.ts.
//
// Covered: list (table, JSON, empty), show (per file, --ranges, --limit, no file map), record
// --no-wait (the request body, durations parsed), record waiting until the edge stops it, record
// stopped by Ctrl-C, stop, delete, 409 and 500 answers (message printed, exit 1), bad options,
// and --help of every command.

import assert from 'node:assert/strict';
import http from 'node:http';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import type { Profile, ProfileSummary } from '../../src/prefetch/profile.js';
import { CLI, run, startProc, tempDir } from '../helpers/proc.js';

interface Seen {
  method: string;
  url: string;
  body: unknown;
}

const CS = 65536;
const boot: ProfileSummary = { name: 'web-boot', volume: 'web', family: 'debian12', createdAt: '2025-01-01T00:00:00.000Z', durationMs: 12_500, chunks: 321, uniqueBytes: 15 * 1024 * 1024 };
const db: ProfileSummary = { name: 'db-run', volume: 'db', family: 'pg16', createdAt: '2025-01-02T00:00:00.000Z', durationMs: 60_000, chunks: 7, uniqueBytes: 400 * 1024 };
const bootProfile: Profile = {
  version: 1,
  ...boot,
  chunkSize: CS,
  size: 1024 * CS,
  reads: 999,
  entries: [
    { t: 0, start: 0, count: 2 },
    { t: 1500, start: 40, count: 1 },
  ],
};
const files = [
  { t: 0, path: '(metadata)', offset: 0, length: 4096 },
  { t: 3, path: '/boot/vmlinuz-6.1.0', offset: 1048576, length: 65536 },
  { t: 10, path: '/usr/lib/systemd/systemd', offset: 4194304, length: 8192 },
  { t: 12, path: '/boot/vmlinuz-6.1.0', offset: 1114112, length: 131072 },
  { t: 1500, path: '(unmapped)', offset: 40 * CS, length: CS },
];

/** The fake edge. `state` is changed by tests to script its answers. */
const state = {
  profiles: [boot, db] as ProfileSummary[],
  /** GET /v1/status answers a recording for this many more polls (then the edge has stopped it). */
  recordingPolls: 0,
  recordingName: '',
  statusPolls: 0,
};
const seen: Seen[] = [];

function fakeEdge(socket: string): Promise<http.Server> {
  const server = http.createServer((req, res) => {
    let text = '';
    req.setEncoding('utf8');
    req.on('data', (d: string) => (text += d));
    req.on('end', () => {
      const url = new URL(req.url ?? '/', 'http://edge');
      const body = text ? (JSON.parse(text) as unknown) : undefined;
      seen.push({ method: req.method ?? '', url: url.pathname + url.search, body });
      const reply = (status: number, b: unknown) => {
        res.writeHead(status, { 'content-type': 'application/json' });
        res.end(JSON.stringify(b));
      };
      const m = /^\/v1\/volumes\/([^/]+)\/profile\/(record|stop)$/.exec(url.pathname);
      const prof = /^\/v1\/profiles\/([^/]+)$/.exec(url.pathname);
      if (req.method === 'GET' && url.pathname === '/v1/status') {
        state.statusPolls++;
        const recording = state.recordingPolls > 0 ? { name: state.recordingName, startedAt: '2025-01-03T00:00:00.000Z', chunks: 10 * state.statusPolls, uniqueBytes: 3 * 1048576, reads: 50, idleMs: 250 } : undefined;
        if (state.recordingPolls > 0) state.recordingPolls--;
        return reply(200, { remote: [{ volume: 'web', peer: 'onprem', ready: true, ...(recording ? { recording } : {}) }] });
      }
      if (req.method === 'POST' && m) {
        const volume = decodeURIComponent(m[1]!);
        if (volume === 'broken') return reply(500, { error: 'the cache is full' });
        if (m[2] === 'record') {
          if (volume === 'busy') return reply(409, { error: 'volume busy is already recording profile other' });
          const name = (body as { name: string }).name;
          state.recordingName = name;
          return reply(200, { recording: { volume, name, startedAt: '2025-01-03T00:00:00.000Z', chunks: 0, uniqueBytes: 0, reads: 0 } });
        }
        state.recordingPolls = 0;
        return reply(200, { profile: { ...boot, name: state.recordingName || 'web-boot', volume } });
      }
      if (req.method === 'GET' && url.pathname === '/v1/profiles') return reply(200, { profiles: state.profiles });
      if (prof) {
        const name = decodeURIComponent(prof[1]!);
        if (name !== 'web-boot' && name !== 'plain') return reply(404, { error: `no profile named ${name}; \`spillway profile list\` shows them` });
        if (req.method === 'DELETE') return reply(200, { deleted: name });
        if (req.method === 'GET') return reply(200, name === 'plain' ? { profile: { ...bootProfile, name } } : { profile: bootProfile, ...(url.searchParams.get('files') === '1' ? { files } : {}) });
      }
      reply(404, { error: `no route ${req.method} ${url.pathname}` });
    });
  });
  return new Promise((resolve) => server.listen(socket, () => resolve(server)));
}

void describe('spillway profile (CLI, against a fake control socket)', () => {
  let dir = '';
  let cleanup: () => Promise<void> = async () => undefined;
  let server: http.Server | undefined;
  let socket = '';
  before(async () => {
    ({ dir, cleanup } = await tempDir('spw-profile-cli-'));
    socket = path.join(dir, 'control.sock');
    server = await fakeEdge(socket);
  });
  after(async () => {
    await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
    await cleanup();
  });

  const spw = (...args: string[]) => run(process.execPath, [CLI, 'profile', ...args], { allowFail: true });
  const last = () => seen.at(-1)!;

  void test('list: a table, JSON, and a hint when there are none', async () => {
    const r = await spw('list', '--socket', socket);
    assert.equal(r.code, 0, r.stderr);
    const lines = r.stdout.trimEnd().split('\n');
    assert.match(lines[0]!, /^NAME\s+VOLUME\s+FAMILY\s+RECORDED\s+DURATION\s+CHUNKS\s+READ$/);
    assert.match(lines[1]!, /^web-boot\s+web\s+debian12\s+2025-01-01T00:00:00.000Z\s+12\.5 s\s+321\s+15\.0 MiB$/);
    assert.match(lines[2]!, /^db-run\s+db\s+pg16\s+2025-01-02T00:00:00.000Z\s+60\.0 s\s+7\s+400\.0 KiB$/);
    assert.deepEqual(last(), { method: 'GET', url: '/v1/profiles', body: undefined });

    const j = await spw('list', '--socket', socket, '--json');
    assert.deepEqual(JSON.parse(j.stdout), [boot, db]);

    state.profiles = [];
    try {
      const e = await spw('list', '--socket', socket);
      assert.equal(e.code, 0);
      assert.match(e.stdout, /no profiles yet \(record one with `spillway profile record VOLUME NAME`\)/);
    } finally {
      state.profiles = [boot, db];
    }
  });

  void test('show: one line per file in first-touch order by default, every range with --ranges, --limit', async () => {
    const r = await spw('show', 'web-boot', '--socket', socket);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(last().url, '/v1/profiles/web-boot?files=1');
    assert.match(r.stdout, /^profile web-boot: volume web, family debian12, recorded 2025-01-01T00:00:00.000Z for 12\.5 s$/m);
    assert.match(r.stdout, /321 chunks of 64\.0 KiB touched, 15\.0 MiB distinct bytes read, 999 reads/);
    const table = r.stdout.split('\n\n')[1]!.trimEnd().split('\n');
    assert.match(table[0]!, /TIME\s+PATH\s+OFFSET\s+LENGTH\s+RANGES/);
    assert.equal(table.length, 5, 'four files (two of vmlinuz merged) and a header');
    assert.match(table[1]!, /\+0\.000s\s+\(metadata\)\s+0\s+4\.0 KiB\s+1$/);
    assert.match(table[2]!, /\+0\.003s\s+\/boot\/vmlinuz-6\.1\.0\s+1048576\s+192\.0 KiB\s+2$/);
    assert.match(table[3]!, /\+0\.010s\s+\/usr\/lib\/systemd\/systemd\s+4194304\s+8\.0 KiB\s+1$/);
    assert.match(table[4]!, /\+1\.500s\s+\(unmapped\)\s+2621440\s+64\.0 KiB\s+1$/);

    const raw = await spw('show', 'web-boot', '--socket', socket, '--ranges', '--limit', '3');
    assert.equal(raw.code, 0, raw.stderr);
    const rows = raw.stdout.split('\n\n')[1]!.trimEnd().split('\n');
    assert.match(rows[0]!, /TIME\s+PATH\s+OFFSET\s+LENGTH$/);
    assert.match(rows[2]!, /\+0\.003s\s+\/boot\/vmlinuz-6\.1\.0\s+1048576\s+64\.0 KiB$/);
    assert.match(rows[3]!, /\+0\.010s\s+\/usr\/lib\/systemd\/systemd/);
    assert.equal(rows[4], '… 2 more (--limit 0 shows all)');

    const j = await spw('show', 'web-boot', '--socket', socket, '--json');
    assert.deepEqual(JSON.parse(j.stdout), { profile: bootProfile, files });
  });

  void test('show without a file map lists the chunk ranges', async () => {
    const r = await spw('show', 'plain', '--socket', socket);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /the edge mapped no files for this volume: chunk ranges follow/);
    assert.match(r.stdout, /\+0\.000s\s+\(unmapped\)\s+0\s+128\.0 KiB/);
    assert.match(r.stdout, /\+1\.500s\s+\(unmapped\)\s+2621440\s+64\.0 KiB/);
  });

  void test('record --no-wait sends the name and durations, then stop saves and prints the summary', async () => {
    const r = await spw('record', 'web', 'web-boot', '--socket', socket, '--for', '2m', '--idle', '15s', '--no-wait');
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(last(), { method: 'POST', url: '/v1/volumes/web/profile/record', body: { name: 'web-boot', forMs: 120_000, idleMs: 15_000 } });
    assert.match(r.stdout, /recording profile web-boot of web since 2025-01-03T00:00:00.000Z; `spillway profile stop web` stops and saves it/);

    const bare = await spw('record', 'web', 'x', '--socket', socket, '--no-wait', '--json');
    assert.equal(bare.code, 0, bare.stderr);
    assert.deepEqual(last().body, { name: 'x' });
    assert.equal((JSON.parse(bare.stdout) as { name: string }).name, 'x');

    state.recordingName = 'web-boot';
    const s = await spw('stop', 'web', '--socket', socket);
    assert.equal(s.code, 0, s.stderr);
    assert.deepEqual(last(), { method: 'POST', url: '/v1/volumes/web/profile/stop', body: undefined });
    assert.equal(s.stdout, 'saved profile web-boot (volume web, family debian12): 321 chunks, 15.0 MiB read in 12.5 s\n');
  });

  void test('record waits, showing progress, until the edge stops the recording; then prints what it saved', async () => {
    state.recordingPolls = 2;
    state.statusPolls = 0;
    const from = seen.length;
    const r = await spw('record', 'web', 'web-boot', '--socket', socket, '--idle', '500ms', '--poll-ms', '10');
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /recording profile web-boot of web, until 0\.5 s without reads; Ctrl-C stops and saves it/);
    assert.match(r.stderr, /web-boot: 10 chunks, 3\.0 MiB read, 50 reads, idle 0\.3 s\n.*web-boot: 20 chunks/s);
    assert.equal(r.stdout, 'saved profile web-boot (volume web, family debian12): 321 chunks, 15.0 MiB read in 12.5 s\n');
    const calls = seen.slice(from).map((s) => `${s.method} ${s.url}`);
    assert.deepEqual(calls, ['POST /v1/volumes/web/profile/record', 'GET /v1/status', 'GET /v1/status', 'GET /v1/status', 'GET /v1/profiles']);
  });

  void test('Ctrl-C while waiting stops the recording and prints the saved profile', async () => {
    state.recordingPolls = 1_000_000;
    const from = seen.length;
    const p = startProc(process.execPath, [CLI, 'profile', 'record', 'web', 'web-boot', '--socket', socket, '--poll-ms', '10']);
    try {
      const deadline = Date.now() + 15_000;
      while (!/web-boot: \d+ chunks/.test(p.stderr())) {
        if (Date.now() > deadline || p.child.exitCode !== null) throw new Error(`no progress shown:\n${p.stderr()}`);
        await new Promise((r) => setTimeout(r, 10));
      }
      p.child.kill('SIGINT');
      const { code } = await p.exited;
      assert.equal(code, 0, p.stderr());
      assert.match(p.stderr(), /stopping the recording of web-boot/);
      assert.equal(p.stdout(), 'saved profile web-boot (volume web, family debian12): 321 chunks, 15.0 MiB read in 12.5 s\n');
      assert.ok(seen.slice(from).some((s) => s.method === 'POST' && s.url === '/v1/volumes/web/profile/stop'));
    } finally {
      await p.stop();
      state.recordingPolls = 0;
    }
  });

  void test('delete', async () => {
    const r = await spw('delete', 'web-boot', '--socket', socket);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(last(), { method: 'DELETE', url: '/v1/profiles/web-boot', body: undefined });
    assert.equal(r.stdout, 'deleted profile web-boot\n');
  });

  void test("error answers print the edge's message and exit 1", async () => {
    const cases: Array<[string[], RegExp]> = [
      [['show', 'nope'], /^spillway: no profile named nope; `spillway profile list` shows them\n$/],
      [['delete', 'nope'], /^spillway: no profile named nope/],
      [['record', 'busy', 'p', '--no-wait'], /^spillway: volume busy is already recording profile other \(`spillway profile stop busy` stops that recording\)\n$/],
      [['stop', 'broken'], /^spillway: the cache is full\n$/],
      [['record', 'web', 'p', '--for', 'soon'], /"soon" is not a duration/],
      [['record', 'web', 'p', '--idle', '0s'], /--idle must be a positive duration/],
      [['show', 'web-boot', '--limit', '-1'], /--limit must be a whole number/],
    ];
    for (const [args, re] of cases) {
      const r = await spw(...args, '--socket', socket);
      assert.equal(r.code, 1, args.join(' '));
      assert.match(r.stderr, re, args.join(' '));
      assert.equal(r.stdout, '', args.join(' '));
    }
    const none = await spw('list', '--socket', path.join(dir, 'nobody.sock'));
    assert.equal(none.code, 1);
    assert.match(none.stderr, /no edge is listening on .*nobody\.sock/);
    const which = await spw('list');
    assert.match(which.stderr, /say which edge: --config EDGE\.yaml/);
  });

  void test('--help of each command explains it and gives an example', async () => {
    const top = await run(process.execPath, [CLI, 'profile', '--help']);
    for (const c of ['record', 'stop', 'list', 'show', 'delete']) assert.match(top.stdout, new RegExp(`^ {2}${c} `, 'm'));
    for (const c of ['record', 'stop', 'list', 'show', 'delete']) {
      const h = await run(process.execPath, [CLI, 'profile', c, '--help']);
      assert.match(h.stdout, /Examples?:\n {2}spillway profile /, c);
      assert.match(h.stdout, /--socket <path>/, c);
    }
    const rec = await run(process.execPath, [CLI, 'profile', 'record', '--help']);
    for (const o of ['--for <duration>', '--idle <duration>', '--no-wait']) assert.ok(rec.stdout.includes(o), o);
    assert.ok(!rec.stdout.includes('--poll-ms'), 'the polling interval is a hidden option');
  });
});
