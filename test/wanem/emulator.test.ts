// The WAN emulator in-process, with real sockets on loopback: integrity, pacing and delay
// (lower bounds only: nothing here asserts that something is fast), sharing of the rate,
// half-close, stalls, resets, errors, backpressure with bounded memory, runtime parameter
// changes, stop, and the stats file. Stall and reset schedules run on a ManualClock, so those
// tests do not depend on timing at all.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterEach, describe, test } from 'node:test';

import { ManualClock } from '../../src/wanem/clock.js';
import { WanEmulator, type WanEmulatorOptions } from '../../src/wanem/emulator.js';
import { WanemError } from '../../src/wanem/errors.js';
import { StatsFileWriter, type WanStats } from '../../src/wanem/stats.js';
import { createLogger } from '../../src/log/logger.js';
import { freePort, tempDir } from '../helpers/proc.js';

const quiet = createLogger('wanem-test', { write: () => true } as unknown as NodeJS.WritableStream);

// ---- peers ----

interface Peer {
  port: number;
  sockets: Set<net.Socket>;
  close(): Promise<void>;
}

/** A TCP server on 127.0.0.1 running `onSocket` for each connection (half-open allowed). */
async function startPeer(onSocket: (s: net.Socket) => void): Promise<Peer> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer({ allowHalfOpen: true, noDelay: true }, (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => {});
    onSocket(s);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    sockets,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

const echo = () => startPeer((s) => s.pipe(s));

/** Reads everything until the end, replies with `reply` and ends. */
const collector = (reply: Buffer | ((received: Buffer) => Buffer), received: Buffer[][] = []) =>
  startPeer((s) => {
    const chunks: Buffer[] = [];
    received.push(chunks);
    s.on('data', (d: Buffer) => chunks.push(d));
    s.on('end', () => s.end(typeof reply === 'function' ? reply(Buffer.concat(chunks)) : reply));
  });

// ---- clients ----

async function connect(port: number): Promise<net.Socket> {
  const s = net.connect({ port, host: '127.0.0.1', noDelay: true, allowHalfOpen: true });
  await once(s, 'connect');
  return s;
}

/** Write `data` respecting backpressure, then end; resolves with everything read until the end. */
async function exchange(port: number, data: Buffer): Promise<Buffer> {
  const s = await connect(port);
  const chunks: Buffer[] = [];
  s.on('data', (d: Buffer) => chunks.push(d));
  const ended = once(s, 'end');
  for (let off = 0; off < data.length; off += 256 * 1024) {
    if (!s.write(data.subarray(off, off + 256 * 1024))) await once(s, 'drain');
  }
  s.end();
  await ended;
  s.destroy();
  return Buffer.concat(chunks);
}

/** Resolves when the socket is closed, with the error it closed on, if any. */
function closed(s: net.Socket): Promise<NodeJS.ErrnoException | null> {
  return new Promise((resolve) => {
    let error: NodeJS.ErrnoException | null = null;
    s.on('error', (e: NodeJS.ErrnoException) => (error = e));
    if (s.closed) resolve(null);
    else s.once('close', () => resolve(error));
  });
}

async function until(what: string, cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

// ---- emulators, stopped after each test ----

const running: { emulator: WanEmulator; peers: Peer[] }[] = [];

async function relay(target: Peer, opts: Omit<WanEmulatorOptions, 'listen' | 'target'> = {}, more: Peer[] = []): Promise<{ emulator: WanEmulator; port: number }> {
  const emulator = new WanEmulator({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: target.port }, log: quiet, ...opts });
  running.push({ emulator, peers: [target, ...more] });
  const { port } = await emulator.start();
  return { emulator, port };
}

afterEach(async () => {
  for (const { emulator, peers } of running.splice(0)) {
    await emulator.stop();
    assert.equal(emulator.stats().connections.active, 0, 'no relayed connection outlives stop()');
    for (const p of peers) await p.close();
  }
});

void describe('WanEmulator', () => {
  void test('random bytes both ways arrive intact (unlimited, no delay)', async () => {
    const fromTarget = randomBytes(8 << 20);
    const received: Buffer[][] = [];
    const target = await collector(fromTarget, received);
    const { emulator, port } = await relay(target);
    const fromClient = randomBytes(8 << 20);
    const got = await exchange(port, fromClient);
    assert.equal(sha(got), sha(fromTarget));
    assert.equal(sha(Buffer.concat(received[0]!)), sha(fromClient));
    const st = emulator.stats();
    assert.deepEqual(st.bytes, { clientToTarget: 8 << 20, targetToClient: 8 << 20 });
    assert.deepEqual(st.bytesReceived, st.bytes);
    assert.deepEqual(st.queuedBytes, { clientToTarget: 0, targetToClient: 0 });
  });

  void test('random bytes both ways arrive intact through a paced, delayed, jittery link, several connections at once', async () => {
    const target = await startPeer((s) => {
      // Echo, transformed, so each direction carries different bytes.
      s.on('data', (d: Buffer) => {
        const out = Buffer.from(d);
        for (let i = 0; i < out.length; i++) out[i] = out[i]! ^ 0x5a;
        if (!s.write(out)) {
          s.pause();
          s.once('drain', () => s.resume());
        }
      });
      s.on('end', () => s.end());
    });
    const { emulator, port } = await relay(target, { rateMbit: 400, delayMs: 3, jitterMs: 4 });
    const inputs = [randomBytes(3 << 20), randomBytes(1 << 20), randomBytes(12345)];
    const outputs = await Promise.all(inputs.map((b) => exchange(port, b)));
    for (const [i, input] of inputs.entries()) {
      const expected = Buffer.from(input);
      for (let k = 0; k < expected.length; k++) expected[k] = expected[k]! ^ 0x5a;
      assert.equal(sha(outputs[i]!), sha(expected), `connection ${i}`);
    }
    const total = inputs.reduce((n, b) => n + b.length, 0);
    assert.deepEqual(emulator.stats().bytes, { clientToTarget: total, targetToClient: total });
    assert.equal(emulator.stats().connections.accepted, 3);
  });

  void test('the rate limits throughput: a 1 s transfer at 8 Mbit/s is far slower than unlimited, never faster than the rate', async (t) => {
    const target = await collector(Buffer.from('ok'));
    const data = randomBytes(1_000_000); // 1 s at 8 Mbit/s (1 MB/s)
    const unlimited = await relay(target);
    let t0 = performance.now();
    await exchange(unlimited.port, data);
    const fastMs = performance.now() - t0;

    const paced = await relay(target, { rateMbit: 8 });
    t0 = performance.now();
    await exchange(paced.port, data);
    const slowMs = performance.now() - t0;
    const idealMs = (data.length * 8) / (8 * 1000);
    t.diagnostic(`8 Mbit/s: ${data.length} bytes in ${slowMs.toFixed(0)} ms (ideal ${idealMs} ms, ${((data.length * 8) / slowMs / 1000).toFixed(2)} Mbit/s achieved); unlimited ${fastMs.toFixed(0)} ms`);
    assert.ok(slowMs >= 2 * fastMs, `paced ${slowMs} ms vs unlimited ${fastMs} ms`);
    // Pacing runs on a virtual schedule: bytes cannot get through faster than the rate.
    assert.ok(slowMs >= 0.9 * idealMs, `paced ${slowMs} ms, the rate allows no less than ${idealMs} ms`);
    assert.equal(paced.emulator.stats().bytes.clientToTarget, data.length);
  });

  void test('connections going the same way share one link rate', async (t) => {
    const target = await collector(Buffer.from('ok'));
    const { emulator, port } = await relay(target, { rateMbit: 8 });
    const each = 500_000;
    const t0 = performance.now();
    await Promise.all([exchange(port, randomBytes(each)), exchange(port, randomBytes(each))]);
    const ms = performance.now() - t0;
    const idealMs = (2 * each * 8) / (8 * 1000);
    t.diagnostic(`two connections, ${each} bytes each at 8 Mbit/s: ${ms.toFixed(0)} ms (ideal for the shared link ${idealMs} ms)`);
    assert.ok(ms >= 0.9 * idealMs, `two transfers took ${ms} ms; one shared 8 Mbit/s link needs ${idealMs} ms`);
    assert.equal(emulator.stats().bytes.clientToTarget, 2 * each);
  });

  void test('on a manual clock, bytes are delivered exactly when serialization and delay say', async () => {
    const clock = new ManualClock();
    const received: Buffer[] = [];
    const target = await startPeer((s) => s.on('data', (d: Buffer) => received.push(d)));
    // 8 Mbit/s = 1000 bytes per ms; pieces of 1024 bytes; 100 ms one way.
    const { emulator, port } = await relay(target, { clock, rateMbit: 8, delayMs: 100 });
    const s = await connect(port);
    const data = randomBytes(3000);
    s.write(data);
    await until('the relay to read the bytes', () => emulator.stats().bytesReceived.clientToTarget === 3000);
    const delivered = () => emulator.stats().bytes.clientToTarget;
    clock.advance(101);
    assert.equal(delivered(), 0, 'nothing before 1.024 ms of serialization + 100 ms');
    clock.advance(0.1);
    assert.equal(delivered(), 1024);
    clock.advance(1);
    assert.equal(delivered(), 2048);
    clock.advance(0.8);
    assert.equal(delivered(), 2048, 'the last 952 bytes are on the wire until 3.0 ms, then 100 ms away');
    clock.advance(0.2);
    assert.equal(delivered(), 3000);
    await until('the target to read them', () => Buffer.concat(received).length === 3000);
    assert.deepEqual(Buffer.concat(received), data);
    s.destroy();
  });

  void test('every round trip takes at least 2 × delay (jitter only adds)', async (t) => {
    const target = await echo();
    const { port } = await relay(target, { delayMs: 20, jitterMs: 5 });
    const s = await connect(port);
    const rtts: number[] = [];
    for (let i = 0; i < 10; i++) {
      const t0 = performance.now();
      s.write(Buffer.from([i]));
      const [d] = (await once(s, 'data')) as [Buffer];
      rtts.push(performance.now() - t0);
      assert.deepEqual(d, Buffer.from([i]), 'replies come back in order');
    }
    s.destroy();
    t.diagnostic(`RTT with --delay-ms 20 --jitter-ms 5: min ${Math.min(...rtts).toFixed(2)} median ${median(rtts).toFixed(2)} max ${Math.max(...rtts).toFixed(2)} ms`);
    for (const r of rtts) assert.ok(r >= 40, `a round trip took ${r} ms, less than 2 × 20 ms`);
  });

  void test('half-close: the end follows the bytes, and the other direction keeps working', async () => {
    const target = await collector((req) => Buffer.from(`got ${req.length} bytes: ${req.toString()}`));
    const { emulator, port } = await relay(target, { delayMs: 10, rateMbit: 50 });
    const reply = await exchange(port, Buffer.from('hello over the wan'));
    assert.equal(reply.toString(), 'got 18 bytes: hello over the wan');
    await until('the relay to forget the connection', () => emulator.stats().connections.active === 0);
    await until('the target to close its socket', () => target.sockets.size === 0);
  });

  void test('a stall holds bytes in both directions without loss, then delivers them', async () => {
    const clock = new ManualClock();
    const target = await echo();
    const { emulator, port } = await relay(target, { clock, stallEverySec: 10, stallForSec: 2 });
    const s = await connect(port);
    const chunks: Buffer[] = [];
    s.on('data', (d: Buffer) => chunks.push(d));
    const total = () => chunks.reduce((n, c) => n + c.length, 0);

    const before = randomBytes(1000);
    s.write(before);
    await until('the echo before the stall', () => total() === 1000);

    clock.advance(10_000);
    assert.equal(emulator.stats().stalled, true);
    assert.equal(emulator.stats().stalls, 1);
    const during = randomBytes(200_000);
    s.write(during);
    await until('the relay to hold the bytes', () => emulator.stats().bytesReceived.clientToTarget === 201_000);
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(emulator.stats().bytes.clientToTarget, 1000, 'nothing gets through during the stall');
    assert.equal(emulator.stats().queuedBytes.clientToTarget, 200_000);
    // The other direction is held too: bytes the target sends on its own wait in the relay.
    const fromTarget = randomBytes(3000);
    [...target.sockets][0]!.write(fromTarget);
    await until('the relay to hold them', () => emulator.stats().queuedBytes.targetToClient === 3000);
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(total(), 1000);

    clock.advance(2000);
    assert.equal(emulator.stats().stalled, false);
    await until('the echo after the stall', () => total() === 204_000);
    // Stalls come back every period.
    clock.advance(8000);
    assert.equal(emulator.stats().stalls, 2);
    const second = randomBytes(5000);
    s.write(second);
    await until('the relay to hold the bytes', () => emulator.stats().queuedBytes.clientToTarget === 5000);
    clock.advance(2000);
    await until('the echo after the second stall', () => total() === 209_000);
    assert.equal(sha(Buffer.concat(chunks)), sha(Buffer.concat([before, fromTarget, during, second])));
    s.destroy();
  });

  void test('a reset closes every connection on both sides; new connections then work', async () => {
    const clock = new ManualClock();
    const target = await echo();
    const { emulator, port } = await relay(target, { clock, resetEverySec: 5 });
    const a = await connect(port);
    const b = await connect(port);
    a.write('a');
    await once(a, 'data');
    b.write('b');
    await once(b, 'data');
    assert.equal(target.sockets.size, 2);
    const targetSockets = [...target.sockets];
    const closes = [a, b, ...targetSockets].map(closed);
    clock.advance(5000);
    const errors = await Promise.all(closes);
    assert.equal(errors[0]?.code, 'ECONNRESET', 'the client sees a reset');
    assert.equal(errors[1]?.code, 'ECONNRESET');
    assert.equal(target.sockets.size, 0, 'the target sees its connections close');
    const st = emulator.stats();
    assert.equal(st.resets, 1);
    assert.equal(st.connections.reset, 2);
    assert.equal(st.connections.active, 0);

    const reply = await exchange(port, Buffer.from('after the reset'));
    assert.equal(reply.toString(), 'after the reset');
    clock.advance(5000);
    assert.equal(emulator.stats().resets, 2, 'resets go on every period');
  });

  void test('an unreachable target resets the client; nothing leaks', async () => {
    const nobody = await freePort();
    const emulator = new WanEmulator({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: nobody }, log: quiet });
    const { port } = await emulator.start();
    try {
      const s = await connect(port);
      s.write('anyone?');
      const err = await closed(s);
      assert.equal(err?.code, 'ECONNRESET');
      await until('the relay to forget it', () => emulator.stats().connections.active === 0);
      assert.equal(emulator.stats().connections.failed, 1);
    } finally {
      await emulator.stop();
    }
  });

  void test('an error on one side resets the other', async () => {
    const target = await startPeer((s) => s.once('data', () => s.resetAndDestroy()));
    const { emulator, port } = await relay(target, { delayMs: 5 });
    const s = await connect(port);
    s.write('boom');
    const err = await closed(s);
    assert.equal(err?.code, 'ECONNRESET');
    await until('the relay to forget it', () => emulator.stats().connections.active === 0);

    // And the other way round: the client resets, the target's socket closes.
    const quietTarget = await echo();
    const second = await relay(quietTarget, { delayMs: 5 });
    const c = await connect(second.port);
    c.write('x');
    await once(c, 'data');
    const targetSide = [...quietTarget.sockets][0]!;
    const targetClosed = closed(targetSide);
    c.resetAndDestroy();
    assert.equal((await targetClosed)?.code, 'ECONNRESET');
    await until('the relay to forget it', () => second.emulator.stats().connections.active === 0);
  });

  void test('backpressure: a receiver that does not read stops the sender, the relay stays within its bound, and nothing is lost', async () => {
    const received: Buffer[] = [];
    let targetSocket: net.Socket | undefined;
    const target = await startPeer((s) => {
      if (targetSocket) {
        s.pipe(s); // later connections: an echo
        return;
      }
      targetSocket = s;
      s.pause(); // the first one does not read
      s.on('data', (d: Buffer) => received.push(d));
    });
    const queueBytes = 256 * 1024;
    const { emulator, port } = await relay(target, { queueBytes, rateMbit: 0 });
    const s = await connect(port);
    const sent: Buffer[] = [];
    let sawFalse = false;
    let stuck = false;
    for (let i = 0; i < 4096 && !stuck; i++) {
      const chunk = randomBytes(64 * 1024);
      sent.push(chunk);
      if (!s.write(chunk)) {
        sawFalse = true;
        const drained = await Promise.race([once(s, 'drain').then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 500))]);
        stuck = !drained;
      }
    }
    assert.ok(sawFalse, "the sender's write() returned false");
    assert.ok(stuck, `the sender got stuck (wrote ${sent.length} × 64 KiB without being stopped)`);
    const st = emulator.stats();
    assert.equal(st.queue.limitBytes, queueBytes);
    assert.ok(st.queue.peakBytes <= st.queue.boundBytes, `peak ${st.queue.peakBytes} > bound ${st.queue.boundBytes}`);
    assert.ok(st.queuedBytes.clientToTarget >= queueBytes, 'the relay filled its queue before pausing the sender');
    assert.ok(st.queuedBytes.clientToTarget <= st.queue.boundBytes);

    // A stuck receiver holds up its own connection only.
    assert.equal((await exchange(port, Buffer.from('still here'))).toString(), 'still here');

    // The receiver starts reading: every byte arrives, in order.
    const allSent = Buffer.concat(sent);
    targetSocket!.resume();
    s.end();
    await until('every byte to arrive', () => received.reduce((n, b) => n + b.length, 0) === allSent.length, 30_000);
    assert.equal(sha(Buffer.concat(received)), sha(allSent));
    assert.ok(emulator.stats().queue.peakBytes <= emulator.stats().queue.boundBytes);
    s.destroy();
  });

  void test('parameters can be changed while running, and are checked', async () => {
    const target = await echo();
    const { emulator, port } = await relay(target, { delayMs: 1 });
    assert.equal((await exchange(port, Buffer.from('one'))).toString(), 'one');
    emulator.setParams({ rateMbit: 100, delayMs: 25 });
    assert.equal(emulator.params.rateMbit, 100);
    assert.equal(emulator.params.delayMs, 25);
    assert.equal(emulator.queueLimitBytes, 875_000);
    const t0 = performance.now();
    assert.equal((await exchange(port, Buffer.from('two'))).toString(), 'two');
    assert.ok(performance.now() - t0 >= 50, 'the new delay applies');
    assert.throws(() => emulator.setParams({ stallEverySec: 1 }), (e: unknown) => e instanceof WanemError && e.code === 'SPW_ERR_WANEM_PARAM');
    assert.equal(emulator.params.stallEverySec, 0, 'a refused change changes nothing');
    assert.throws(() => new WanEmulator({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: 1 }, delayMs: -5 }), WanemError);
  });

  void test('stop() closes the listener and every connection', async () => {
    const target = await echo();
    const emulator = new WanEmulator({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: target.port }, log: quiet, delayMs: 5 });
    const { port } = await emulator.start();
    await assert.rejects(emulator.start(), (e: unknown) => e instanceof WanemError && e.code === 'SPW_ERR_WANEM_STATE');
    const s = await connect(port);
    s.write('x');
    await once(s, 'data');
    const done = closed(s);
    s.on('end', () => s.end()); // the relay's socket is gone: finish our half too
    await emulator.stop();
    await done;
    assert.equal(emulator.stats().connections.active, 0);
    await until('the target side to close', () => target.sockets.size === 0);
    const refused = net.connect({ port, host: '127.0.0.1' });
    assert.equal((await closed(refused))?.code, 'ECONNREFUSED');
    await emulator.stop(); // idempotent
    await target.close();
  });
});

void describe('stats file', () => {
  void test('rewritten every 500 ms and at stop, always whole JSON', async () => {
    const { dir, cleanup } = await tempDir();
    try {
      const clock = new ManualClock();
      let n = 0;
      const file = path.join(dir, 'stats.json');
      const writer = new StatsFileWriter(file, () => ({ n: n++ }), { clock });
      writer.start();
      const read = () => (JSON.parse(readFileSync(file, 'utf8')) as { n: number }).n;
      assert.equal(read(), 0);
      clock.advance(499);
      assert.equal(read(), 0);
      clock.advance(1);
      assert.equal(read(), 1);
      clock.advance(1000);
      assert.equal(read(), 3);
      writer.stop();
      assert.equal(read(), 4);
      clock.advance(5000);
      assert.equal(read(), 4, 'nothing after stop');
      assert.equal(clock.pending, 0);

      // A failing periodic rewrite is reported, and the writer carries on.
      const errors: Error[] = [];
      const gone = new StatsFileWriter(path.join(dir, 'sub', 'stats.json'), () => ({}), { clock, onError: (e) => errors.push(e) });
      assert.throws(() => gone.start(), /ENOENT/, 'the first write fails loudly');
      mkdirSync(path.join(dir, 'sub'));
      gone.start();
      rmSync(path.join(dir, 'sub'), { recursive: true });
      clock.advance(1000);
      assert.equal(errors.length, 2);
      mkdirSync(path.join(dir, 'sub'));
      clock.advance(500);
      assert.equal(errors.length, 2);
      gone.stop();
    } finally {
      await cleanup();
    }
  });

  void test('the emulator stats have the documented shape', async () => {
    const target = await echo();
    const { emulator, port } = await relay(target, { delayMs: 2, rateMbit: 100 });
    await exchange(port, Buffer.from('abc'));
    const st: WanStats = emulator.stats();
    assert.deepEqual(Object.keys(st).sort(), ['bytes', 'bytesReceived', 'connections', 'listen', 'params', 'queue', 'queuedBytes', 'resets', 'stalled', 'stalls', 'target', 'uptimeMs'].sort());
    assert.equal(st.listen, `127.0.0.1:${port}`);
    assert.equal(st.target, `127.0.0.1:${target.port}`);
    assert.deepEqual(st.bytes, { clientToTarget: 3, targetToClient: 3 });
    assert.equal(st.connections.accepted, 1);
  });
});
