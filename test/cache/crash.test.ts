// kill -9 crash test: a child process changes the cache in a loop and is killed with SIGKILL
// at a random point (sometimes while it is still recovering from the previous kill). After
// each kill, a copy of the directory is opened here and every chunk is checked:
// - what is served is exactly the content its header names (no torn, stale or foreign bytes);
// - it is the outcome of the last acknowledged operation on that chunk, or of one started
//   after it (an unacknowledged operation may or may not have landed);
// - nothing failed authentication (writes are ordered so a crash leaves no torn blob behind
//   an index record).
// The next child then recovers the crashed directory itself.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { cp, mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { SecureCache } from '../../src/cache/cache.js';
import { CHUNKS, crashContent, CRASH_KEY } from './crash-model.js';
import { tempDir } from './helpers.js';

const CHILD = path.join(path.dirname(fileURLToPath(import.meta.url)), 'crash-child.ts');
const ROUNDS = Number(process.env.SPILLWAY_CRASH_ROUNDS ?? 8);

type Outcome = { kind: 'absent' } | { kind: 'zero' } | { kind: 'content'; cv: number };
interface Op {
  readonly v: number;
  readonly outcome: Outcome;
  acked: boolean;
}

function sameOutcome(a: Outcome, b: Outcome): boolean {
  return a.kind === b.kind && (a.kind !== 'content' || (b.kind === 'content' && a.cv === b.cv));
}

function show(o: Outcome): string {
  return o.kind === 'content' ? `content v${o.cv}` : o.kind;
}

/** Run one child until it has printed `lines` lines (0: kill as soon as it is spawned), then SIGKILL it. */
async function runChild(dir: string, round: number, lines: number, history: Map<string, Op[]>): Promise<number> {
  const child = spawn(process.execPath, ['--import', 'tsx', CHILD, dir, String(round)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  let seen = 0;
  let buf = '';
  // 'close', not 'exit': lines still in the pipe when the child dies must be read first.
  const exited = new Promise<number | null>((resolve) => child.once('close', (code) => resolve(code)));
  const onLine = (line: string): void => {
    const [tag, vol, index, kind, v, cv] = line.split(' ');
    if (tag === 'open' || !vol || !index || !kind || !v) return;
    const key = `${vol}:${index}`;
    const ops = history.get(key) ?? [];
    history.set(key, ops);
    const version = Number(v);
    if (tag === 'S') {
      const outcome: Outcome = kind === 'zero' ? { kind: 'zero' } : kind === 'inval' ? { kind: 'absent' } : { kind: 'content', cv: Number(cv) };
      ops.push({ v: version, outcome, acked: false });
    } else if (tag === 'A') {
      const op = ops.find((o) => o.v === version);
      if (op) op.acked = true;
    } else if (tag === 'N') {
      const i = ops.findIndex((o) => o.v === version);
      if (i >= 0) ops.splice(i, 1);
    }
  };
  if (lines === 0) child.kill('SIGKILL');
  child.stdout.on('data', (d: Buffer) => {
    buf += d.toString();
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      seen++;
      onLine(line);
      if (seen === lines) child.kill('SIGKILL');
    }
  });
  const code = await exited;
  assert.equal(code, null, `the child exited by itself (code ${code}) instead of being killed:\n${stderr}`);
  return seen;
}

void test('kill -9 at random points: reopening never serves wrong data and keeps what was acknowledged', async (t) => {
  const root = await tempDir(t, 'spw-cache-crash-');
  const dir = path.join(root, 'cache');
  await mkdir(dir); // a child killed before it opened the cache leaves an empty directory
  const history = new Map<string, Op[]>();
  const seed = Number(process.env.SPILLWAY_CRASH_SEED ?? Date.now() % 100000);
  let x = seed | 1;
  const rand = (n: number): number => {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    return x % n;
  };
  t.diagnostic(`seed ${seed} (SPILLWAY_CRASH_SEED to replay the same kill points)`);
  let verifiedChunks = 0;
  for (let round = 1; round <= ROUNDS; round++) {
    // kill points: right away (during recovery), early, or after a few hundred operations
    const pick = rand(10);
    const lines = pick === 0 ? 0 : pick < 3 ? 1 + rand(20) : 20 + rand(600);
    const seen = await runChild(dir, round, lines, history);

    const copy = path.join(root, `verify-${round}`);
    await cp(dir, copy, { recursive: true });
    const cache = await SecureCache.open({ dir: copy, maxBytes: 1 << 30 });
    try {
      cache.setKey('fam', CRASH_KEY);
      for (const vol of ['base', 'clone']) {
        for (let index = 0; index < CHUNKS; index++) {
          const got = await cache.get(vol, index);
          let outcome: Outcome;
          if (got === null) outcome = { kind: 'absent' };
          else if (got === 'zero') outcome = { kind: 'zero' };
          else {
            assert.ok(got.length >= 8, `${vol}:${index}: ${got.length} bytes`);
            assert.equal(got.readUInt32BE(0), index, `${vol}:${index} served the content of chunk ${got.readUInt32BE(0)}`);
            const cv = got.readUInt32BE(4);
            assert.ok(got.equals(crashContent(index, cv).data), `${vol}:${index}: content v${cv} is not byte-exact`);
            outcome = { kind: 'content', cv };
          }
          const ops = (history.get(`${vol}:${index}`) ?? []).sort((a, b) => a.v - b.v);
          let lastAcked = -1;
          ops.forEach((o, i) => {
            if (o.acked) lastAcked = i;
          });
          const allowed: Outcome[] = lastAcked < 0 ? [{ kind: 'absent' }] : [];
          for (let i = Math.max(lastAcked, 0); i < ops.length; i++) allowed.push((ops[i] as Op).outcome);
          assert.ok(
            allowed.some((a) => sameOutcome(a, outcome)),
            `round ${round} (killed after ${seen} lines): ${vol}:${index} is ${show(outcome)}; allowed: ${allowed.map(show).join(', ')}`,
          );
          // What recovery kept is the new baseline (the next child recovers the same files).
          const v = ops.find((o) => sameOutcome(o.outcome, outcome) && ops.indexOf(o) >= Math.max(lastAcked, 0))?.v ?? 0;
          history.set(`${vol}:${index}`, outcome.kind === 'absent' && v === 0 ? [] : [{ v, outcome, acked: true }]);
          if (outcome.kind !== 'absent') verifiedChunks++;
        }
      }
      assert.equal(cache.stats().misses.corrupt, 0, 'a blob behind an index record failed authentication');
    } finally {
      await cache.close();
      await rm(copy, { recursive: true, force: true });
    }
  }
  assert.ok(verifiedChunks > 0, 'the children got far enough to write something');
});
