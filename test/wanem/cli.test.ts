// `spillway wanem` as a process (from dist/): complete --help and docs, refused options, and
// real NBD traffic through it (nbdcopy ↔ qemu-nbd, both directions, with delay and rate),
// checked byte for byte; the stats file, SIGUSR1 and SIGTERM.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { CLI, ROOT, freePort, haveCommand, run, startProc, tempDir, waitForListen, type Proc } from '../helpers/proc.js';
import type { WanStats } from '../../src/wanem/stats.js';

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

async function until(what: string, cond: () => boolean, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function wanem(args: string[]): Proc {
  return startProc(process.execPath, [CLI, 'wanem', ...args], { env: { ...process.env, SPILLWAY_LOG_LEVEL: 'warn' } });
}

void describe('spillway wanem (CLI)', () => {
  void test('--help documents every option, the RTT and examples; docs/wanem.md covers every option', async () => {
    const { stdout } = await run(process.execPath, [CLI, 'wanem', '--help']);
    for (const opt of ['--listen', '--target', '--delay-ms', '--rate-mbit', '--jitter-ms', '--stall-every', '--stall-for', '--reset-every', '--queue-kib', '--stats-file', '--pid-file'])
      assert.ok(stdout.includes(opt), `--help mentions ${opt}`);
    assert.match(stdout, /RTT = 2 × this/);
    assert.match(stdout, /shared by (all|every) connection/);
    assert.match(stdout, /Examples:/);
    const docs = readFileSync(path.join(ROOT, 'docs', 'wanem.md'), 'utf8');
    const longOptions = [...stdout.matchAll(/^\s+(?:-\w, )?(--[a-z-]+)/gm)].map((m) => m[1]!).filter((o) => o !== '--help');
    assert.ok(longOptions.length >= 11);
    for (const o of longOptions) assert.ok(docs.includes(`\`${o}`), `docs/wanem.md documents ${o}`);
    const top = await run(process.execPath, [CLI, '--help']);
    assert.match(top.stdout, /wanem/);
  });

  void test('refuses bad options with a message that says what is wrong', async () => {
    const cases: [string[], RegExp][] = [
      [['--listen', '127.0.0.1:0', '--delay-ms', '1', '--rate-mbit', '0'], /--target/],
      [['--listen', '127.0.0.1:0', '--target', 'nowhere', '--delay-ms', '1', '--rate-mbit', '0'], /not HOST:PORT/],
      [['--listen', '127.0.0.1:0', '--target', '1', '--delay-ms', '-1', '--rate-mbit', '0'], /number ≥ 0/],
      [['--listen', '127.0.0.1:0', '--target', '1', '--delay-ms', '1', '--rate-mbit', '0', '--stall-every', '5'], /--stall-every and --stall-for go together/],
      [['--listen', '127.0.0.1:0', '--target', '1', '--delay-ms', '1', '--rate-mbit', '0', '--stall-every', '2', '--stall-for', '2'], /must be shorter/],
      [['--listen', '127.0.0.1:0', '--target', '1', '--delay-ms', '1', '--rate-mbit', '0', '--queue-kib', '0'], /positive whole number/],
    ];
    const results = await Promise.all(cases.map(([args]) => run(process.execPath, [CLI, 'wanem', ...args], { allowFail: true })));
    for (const [i, [args, message]] of cases.entries()) {
      assert.notEqual(results[i]!.code, 0, args.join(' '));
      assert.match(results[i]!.stderr, message, args.join(' '));
    }
  });

  void describe('relaying NBD between nbdcopy and qemu-nbd', () => {
    let dir = '';
    let cleanup: () => Promise<void> = async () => {};
    let qemuNbd: Proc | undefined;
    let relay: Proc | undefined;
    let relayPort = 0;
    const size = 24 << 20;
    const image = () => path.join(dir, 'disk.img');
    const statsFile = () => path.join(dir, 'wan.json');
    const pidFile = () => path.join(dir, 'wan.pid');
    const readStats = () => JSON.parse(readFileSync(statsFile(), 'utf8')) as WanStats;

    before(async () => {
      for (const cmd of ['qemu-nbd', 'nbdcopy'])
        assert.ok(await haveCommand(cmd), `${cmd} is missing: run scripts/setup.sh (make deps) to install the test peers`);
      ({ dir, cleanup } = await tempDir('spw-wanem-'));
      writeFileSync(image(), randomBytes(size));
      const nbdPort = await freePort();
      qemuNbd = startProc('qemu-nbd', ['-t', '-b', '127.0.0.1', '-p', String(nbdPort), '-f', 'raw', '-e', '8', image()]);
      await waitForListen({ port: nbdPort });
      relayPort = await freePort();
      relay = wanem([
        '--listen',
        `127.0.0.1:${relayPort}`,
        '--target',
        `127.0.0.1:${nbdPort}`,
        '--delay-ms',
        '2',
        '--rate-mbit',
        '400',
        '--jitter-ms',
        '1',
        '--stats-file',
        statsFile(),
        '--pid-file',
        pidFile(),
      ]);
      await until('the pid file', () => existsSync(pidFile()) || relay!.child.exitCode !== null).catch(() => {});
      assert.ok(existsSync(pidFile()), `spillway wanem did not start:\n${relay.stderr()}`);
    });

    after(async () => {
      await relay?.stop();
      await qemuNbd?.stop();
      await cleanup();
    });

    void test('nbdcopy reads the disk through the relay, byte for byte', async () => {
      const out = path.join(dir, 'copy.img');
      await run('nbdcopy', [`nbd://127.0.0.1:${relayPort}/`, out]);
      assert.equal(sha(readFileSync(out)), sha(readFileSync(image())));
      await until('the stats file to count the reads', () => readStats().bytes.targetToClient >= size, 5000);
    });

    void test('nbdcopy writes the disk through the relay, byte for byte', async () => {
      const src = path.join(dir, 'new.img');
      const data = randomBytes(size);
      writeFileSync(src, data);
      await run('nbdcopy', ['--flush', src, `nbd://127.0.0.1:${relayPort}/`]);
      assert.equal(sha(readFileSync(image())), sha(data));
      await until('the stats file to count the writes', () => readStats().bytes.clientToTarget >= size, 5000);
    });

    void test('SIGUSR1 prints the counters (whatever the log level); SIGTERM stops cleanly with a final stats file and no pid file', async () => {
      const pid = Number(readFileSync(pidFile(), 'utf8'));
      assert.equal(pid, relay!.child.pid);
      process.kill(pid, 'SIGUSR1');
      await until('the stats line on stderr', () => relay!.stderr().includes('"msg":"stats"'));
      const line = relay!.stderr().split('\n').find((l) => l.includes('"msg":"stats"'))!;
      const logged = JSON.parse(line) as WanStats & { component: string };
      assert.equal(logged.component, 'wanem');
      assert.ok(logged.bytes.targetToClient >= size && logged.bytes.clientToTarget >= size);
      assert.ok(logged.connections.accepted >= 2);

      const exit = await relay!.stop('SIGTERM');
      assert.deepEqual(exit, { code: 0, signal: null });
      assert.equal(existsSync(pidFile()), false, 'the pid file is removed');
      const final = readStats();
      assert.equal(final.connections.active, 0);
      assert.deepEqual(final.bytes, logged.bytes);
      assert.equal(final.params.delayMs, 2);
      assert.equal(final.params.rateMbit, 400);
      assert.equal(final.listen, `127.0.0.1:${relayPort}`);
      relay = undefined;
    });
  });
});
