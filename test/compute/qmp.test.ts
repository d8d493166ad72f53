// The QMP line decoder under fast-check (arbitrary bytes and split points: messages or a typed
// QmpProtocolError, nothing else; valid streams decode to what was sent; long lines are refused
// before they are buffered), the QmpClient against a scripted UNIX-socket peer (greeting,
// capabilities, ids, events, QmpError, timeouts, a refused oversized line, close), and the
// console's pure helpers. The real QEMU is in vm.test.ts and migrate.test.ts.

import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import fc from 'fast-check';

import { execLines, parseExecOutput, stripTerminal } from '../../src/compute/qemu/console.js';
import { ComputeError, QmpError, QmpProtocolError } from '../../src/compute/qemu/errors.js';
import { QmpClient, QmpLineDecoder, type QmpMessage } from '../../src/compute/qemu/qmp.js';
import { tempDir } from '../helpers/proc.js';

/** Feed `bytes` to a decoder in pieces cut at `cuts`; collect messages or the error thrown. */
function feed(decoder: QmpLineDecoder, bytes: Uint8Array, cuts: number[]): { msgs: QmpMessage[]; error?: unknown } {
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const msgs: QmpMessage[] = [];
  let prev = 0;
  try {
    for (const p of [...points, bytes.length]) {
      msgs.push(...decoder.push(bytes.subarray(prev, p)));
      prev = p;
    }
    decoder.end();
  } catch (e) {
    return { msgs, error: e };
  }
  return { msgs };
}

const jsonValue = fc.jsonValue({ maxDepth: 3 });
const message = fc.oneof(
  fc.record({ kind: fc.constant('return' as const), id: fc.string({ maxLength: 8 }), value: jsonValue }),
  fc.record({ kind: fc.constant('error' as const), id: fc.string({ maxLength: 8 }), errorClass: fc.string({ maxLength: 20 }), desc: fc.string({ maxLength: 40 }) }),
  fc.record({
    kind: fc.constant('event' as const),
    event: fc.string({ minLength: 1, maxLength: 20 }),
    data: fc.dictionary(fc.string({ maxLength: 6 }), jsonValue, { maxKeys: 3 }),
    timestamp: fc.record({ seconds: fc.nat(), microseconds: fc.nat({ max: 999_999 }) }),
  }),
);

function wire(m: QmpMessage): unknown {
  switch (m.kind) {
    case 'return':
      return { return: m.value, id: m.id };
    case 'error':
      return { id: m.id, error: { class: m.errorClass, desc: m.desc } };
    case 'event':
      return { timestamp: m.timestamp, event: m.event, data: m.data };
    case 'greeting':
      return { QMP: { version: m.version, capabilities: m.capabilities } };
  }
}

void describe('QMP line decoder (fast-check)', () => {
  void it('arbitrary bytes at arbitrary split points give messages or a QmpProtocolError, nothing else', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 600 }), fc.array(fc.nat(), { maxLength: 8 }), fc.integer({ min: 1, max: 300 }), (bytes, cuts, max) => {
        const d = new QmpLineDecoder(max);
        const r = feed(d, bytes, cuts);
        if (r.error !== undefined) {
          assert.ok(r.error instanceof QmpProtocolError, `unexpected ${String(r.error)}`);
          assert.equal((r.error as QmpProtocolError).code, 'SPW_ERR_QMP_PROTOCOL');
          // A broken decoder stays broken.
          assert.throws(() => d.push(Buffer.from('{"return": {}}\n')), QmpProtocolError);
        }
        assert.ok(d.pendingBytes <= max + 1);
      }),
      { numRuns: 2000 },
    );
  });

  void it('JSON-ish garbage lines (valid JSON of the wrong shape included) only give QmpProtocolError', () => {
    const line = fc.oneof(fc.json(), fc.string(), fc.constantFrom('{"error": 1}', '{"event": 5}', '{"QMP": {}}', '[]', 'null', '{"return"', '{}'));
    fc.assert(
      fc.property(fc.array(line, { maxLength: 6 }), fc.array(fc.nat(), { maxLength: 6 }), (lines, cuts) => {
        const r = feed(new QmpLineDecoder(), Buffer.from(lines.map((l) => l.replace(/[\r\n]/g, ' ') + '\n').join('')), cuts);
        if (r.error !== undefined) assert.ok(r.error instanceof QmpProtocolError, `unexpected ${String(r.error)}`);
      }),
      { numRuns: 1000 },
    );
  });

  void it('a valid stream split anywhere decodes to the messages sent (\\n or \\r\\n endings)', () => {
    fc.assert(
      fc.property(fc.array(message, { maxLength: 8 }), fc.boolean(), fc.array(fc.nat(), { maxLength: 10 }), (msgs, crlf, cuts) => {
        const text = msgs.map((m) => JSON.stringify(wire(m)) + (crlf ? '\r\n' : '\n')).join('');
        const r = feed(new QmpLineDecoder(), Buffer.from(text), cuts);
        assert.equal(r.error, undefined);
        assert.deepEqual(r.msgs, JSON.parse(JSON.stringify(msgs)));
      }),
      { numRuns: 500 },
    );
  });

  void it('refuses a line longer than the limit as soon as the limit is passed, before the newline', () => {
    fc.assert(
      fc.property(fc.integer({ min: 8, max: 200 }), fc.integer({ min: 1, max: 50 }), fc.array(fc.nat(), { maxLength: 6 }), (max, extra, cuts) => {
        const d = new QmpLineDecoder(max);
        // No newline at all: the decoder must not wait for one.
        const r = feed(d, Buffer.alloc(max + 1 + extra, 0x41), cuts);
        assert.ok(r.error instanceof QmpProtocolError);
        assert.match((r.error as Error).message, /longer than/);
      }),
    );
    // Exactly at the limit is fine, with either line ending; one byte more is not.
    const line = '{"return": 1}';
    for (const ending of ['\n', '\r\n']) {
      assert.deepEqual(new QmpLineDecoder(line.length).push(Buffer.from(line + ending)), [{ kind: 'return', value: 1 }]);
      assert.throws(() => new QmpLineDecoder(line.length - 1).push(Buffer.from(line + ending)), QmpProtocolError);
    }
  });
});

void describe('console helpers', () => {
  void it('short commands are one typed line; long ones go in acknowledged pieces under 1024 characters', () => {
    const short = execLines('echo hi', 'abc');
    assert.equal(short.pieces.length, 0);
    assert.ok(!short.run.includes('SPWB-abc') && !short.run.includes('SPWE-abc'), 'the echo of the typed line must not contain a marker');
    const long = execLines('x'.repeat(5000), 'abc');
    assert.ok(long.pieces.length >= 6);
    for (const l of [...long.pieces, long.run]) assert.ok(l.length < 1000, `line of ${l.length}`);
  });

  void it('finds output and exit code between the markers, whatever the echo and prompts around them', () => {
    const text = stripTerminal(`web# printf ...\r\r\n\x1b[6nSPWB-abc\r\nhi\r\nthere\r\n\r\nSPWE-abc 3\r\nweb# `);
    assert.deepEqual(parseExecOutput(text, 'abc'), { begun: true, done: { output: 'hi\nthere\n', exitCode: 3 } });
    assert.deepEqual(parseExecOutput('SPWB-abc\n\nSPWE-abc 0\n', 'abc'), { begun: true, done: { output: '', exitCode: 0 } });
    assert.deepEqual(parseExecOutput('SPWB-abc\nno newline\nSPWE-abc 1\n', 'abc'), { begun: true, done: { output: 'no newline', exitCode: 1 } });
    assert.deepEqual(parseExecOutput('SPWB-abc\npartial', 'abc'), { begun: true });
    assert.deepEqual(parseExecOutput('SPWB-abd\n', 'abc'), { begun: false });
  });
});

/** A scripted QMP peer: greets, answers qmp_capabilities, then lets the test script replies. */
async function fakeQemu(sock: string, onCommand: (cmd: { execute: string; id: string; arguments?: unknown }, reply: (obj: unknown) => void, raw: net.Socket) => void) {
  const conns: net.Socket[] = [];
  const server = net.createServer((c) => {
    conns.push(c);
    c.write('{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": ["oob"]}}\r\n');
    let buf = '';
    c.on('data', (d) => {
      buf += d.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) !== -1) {
        const cmd = JSON.parse(buf.slice(0, nl)) as { execute: string; id: string };
        buf = buf.slice(nl + 1);
        const reply = (o: unknown) => c.write(JSON.stringify(o) + '\r\n');
        if (cmd.execute === 'qmp_capabilities') reply({ return: {}, id: cmd.id });
        else onCommand(cmd, reply, c);
      }
    });
    c.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(sock, resolve));
  return {
    close: () =>
      new Promise<void>((resolve) => {
        for (const c of conns) c.destroy();
        server.close(() => resolve());
      }),
  };
}

void describe('QmpClient against a scripted peer', () => {
  let dir: { dir: string; cleanup: () => Promise<void> };
  before(async () => {
    dir = await tempDir('spw-qmp-');
  });
  after(async () => {
    await dir.cleanup();
  });

  void it('matches replies by id, keeps events, maps error replies to QmpError, times out, closes', async () => {
    const sock = path.join(dir.dir, 'a.sock');
    const peer = await fakeQemu(sock, (cmd, reply) => {
      switch (cmd.execute) {
        case 'query-status':
          // Out of order: an event first, then the reply.
          reply({ event: 'STOP', data: {}, timestamp: { seconds: 1, microseconds: 2 } });
          reply({ return: { running: false, status: 'paused' }, id: cmd.id });
          break;
        case 'bogus':
          reply({ error: { class: 'CommandNotFound', desc: 'The command bogus has not been found' }, id: cmd.id });
          break;
        case 'slow':
          break; // never answered
      }
    });
    const qmp = await QmpClient.connect(sock, { timeoutMs: 2000 });
    try {
      assert.deepEqual(qmp.greeting.capabilities, ['oob']);
      const [a, b] = await Promise.all([qmp.execute('query-status'), qmp.execute<{ status: string }>('query-status')]);
      assert.deepEqual(a, { running: false, status: 'paused' });
      assert.equal(b.status, 'paused');
      assert.equal(qmp.events.length, 2);
      assert.equal((await qmp.waitForEvent('STOP', { after: 0 })).seq, 1);
      await assert.rejects(qmp.execute('bogus'), (e: unknown) => e instanceof QmpError && e.errorClass === 'CommandNotFound' && e.code === 'SPW_ERR_QMP_COMMAND');
      await assert.rejects(qmp.execute('slow', undefined, { timeoutMs: 100 }), (e: unknown) => e instanceof ComputeError && e.code === 'SPW_ERR_QMP_TIMEOUT');
      const pending = assert.rejects(qmp.execute('slow', undefined, { timeoutMs: 10_000 }), (e: unknown) => e instanceof ComputeError && e.code === 'SPW_ERR_QMP_CLOSED');
      await qmp.close();
      await pending;
      await assert.rejects(qmp.execute('query-status'), (e: unknown) => e instanceof ComputeError && e.code === 'SPW_ERR_QMP_CLOSED');
    } finally {
      await qmp.close();
      await peer.close();
    }
  });

  void it('drops the connection on an oversized line with SPW_ERR_QMP_PROTOCOL, and times out without a greeting', async () => {
    const sock = path.join(dir.dir, 'b.sock');
    const peer = await fakeQemu(sock, (_cmd, _reply, raw) => {
      raw.write('{"return": "' + 'x'.repeat(5000));
    });
    const qmp = await QmpClient.connect(sock, { timeoutMs: 2000, maxLineBytes: 1024 });
    try {
      await assert.rejects(qmp.execute('anything'), (e: unknown) => e instanceof QmpProtocolError && /longer than 1024/.test(e.message));
      assert.equal(qmp.closed, true);
    } finally {
      await peer.close();
    }

    const mute = path.join(dir.dir, 'c.sock');
    const conns: net.Socket[] = [];
    const server = net.createServer((c) => void conns.push(c));
    await new Promise<void>((resolve) => server.listen(mute, resolve));
    try {
      await assert.rejects(QmpClient.connect(mute, { timeoutMs: 200 }), (e: unknown) => e instanceof ComputeError && e.code === 'SPW_ERR_QMP_CONNECT' && /greeting/.test(e.message));
      await assert.rejects(QmpClient.connect(path.join(dir.dir, 'none.sock'), { timeoutMs: 200 }), (e: unknown) => e instanceof ComputeError && e.code === 'SPW_ERR_QMP_CONNECT');
    } finally {
      for (const c of conns) c.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });
});
