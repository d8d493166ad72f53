// Fuzzing the NBD server runner (NbdServer.handle) over real UNIX socket pairs, as nbdkit fuzzes
// its server over a socketpair. Three kinds of hostile clients: (a) arbitrary bytes after a valid
// handshake, (b) well-formed but hostile option sequences, (c) arbitrary request headers sent in
// arbitrary pieces. For each case: the server neither throws nor logs an internal error, never
// lets a bad range reach a device, closes the connection once the client is done (bounded), and
// a well-behaved connection opened before the fuzzing keeps reading correct data, as does a new
// one afterwards.

import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import fc from 'fast-check';

import { encodeGoInfo, encodeMetaContext, decodeReplyHeader, NEED_MORE, parseBlockStatusPayload, parseErrorPayload, parseMetaContextReply } from '../../src/nbd/codec.js';
import {
  CMD,
  CMD_FLAG,
  INFO,
  MAX_OPTION_LENGTH,
  MAX_PAYLOAD,
  META_CONTEXT_BASE_ALLOCATION,
  NBD_ERR,
  OPT,
  REP,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  REQUEST_MAGIC,
  REQUEST_SIZE,
  isReplyError,
  isReplyTypeError,
} from '../../src/nbd/protocol.js';
import { NbdServer } from '../../src/nbd/server.js';
import { HARD_PAYLOAD_LIMIT } from '../../src/nbd/validate.js';
import { ReadOnlyDevice } from '../../src/block/readonly.js';
import { closed, connectUnix, memoryDeviceWith, MinimumBlockDevice, patternBytes, RawNbdClient } from '../helpers/nbd-tools.js';
import { tempDir } from '../helpers/proc.js';

const SIZE = 1024 * 1024;
/** Upper bound for one fuzz case; reaching it means the server hung. */
const CASE_BOUND_MS = 15000;
const GOOD_DATA = patternBytes(SIZE, 0x5eed);

interface ExportModel {
  name: string;
  writable: boolean;
  minBlock: number;
}
const EXPORTS: ExportModel[] = [
  { name: '', writable: true, minBlock: 1 },
  { name: 'aligned', writable: true, minBlock: 512 },
  { name: 'good', writable: false, minBlock: 1 },
];
const WIRE_ERRORS = new Set<number>(Object.values(NBD_ERR).filter((e) => e !== 0));

// --------------------------------------------------------------------------------- fixtures

let server: NbdServer;
let listener: net.Server;
let socketPath: string;
let cleanupDir: () => Promise<void>;
let good: RawNbdClient;
/** Server log lines that mean an internal fault: an unexpected exception, or a device error. */
const faults: string[] = [];

before(async () => {
  const t = await tempDir('spw-fuzz-');
  cleanupDir = t.cleanup;
  socketPath = path.join(t.dir, 'nbd.sock');
  server = new NbdServer({
    exports: [
      { name: '', device: await memoryDeviceWith(patternBytes(SIZE, 1)) },
      { name: 'aligned', device: new MinimumBlockDevice(await memoryDeviceWith(patternBytes(SIZE, 2)), 512) },
      { name: 'good', device: new ReadOnlyDevice(await memoryDeviceWith(GOOD_DATA)) },
    ],
    log: (level, msg, fields) => {
      // 'error' = an exception the server did not expect; 'request failed' = a device refused a
      // request: MemoryDevice fails only on bad ranges and ReadOnlyDevice only on writes, so
      // validation at the edge let something through that it must refuse.
      if (level === 'error' || msg === 'request failed') faults.push(`${level} ${msg} ${JSON.stringify(fields)}`);
    },
  });
  // Drive NbdServer.handle() directly, one real UNIX socket per connection.
  listener = net.createServer((sock) => void server.handle(sock));
  await new Promise<void>((r) => listener.listen(socketPath, r));
  good = new RawNbdClient(await connectUnix(socketPath));
  await good.handshake();
  await good.negotiateStructured();
  await good.go('good');
});

after(async () => {
  await good.disconnect();
  await new Promise<void>((r) => listener.close(() => r()));
  await server.close(1000);
  await cleanupDir();
});

// ---------------------------------------------------------------------------------- helpers

function bounded<T>(p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const limit = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} within ${CASE_BOUND_MS} ms`)), CASE_BOUND_MS);
  });
  return Promise.race([p, limit]).finally(() => clearTimeout(timer));
}

/** Wait until every fuzz connection has ended on the server side (only `good` remains). */
async function fuzzConnectionsGone(): Promise<void> {
  await bounded(
    (async () => {
      while (server.connectionCount > 1) await new Promise((r) => server.once('disconnect', r));
    })(),
    'server did not finish the fuzz connection',
  );
}

/** After each case: no internal faults, the fuzz connection is gone, and `good` still reads right. */
async function checkServerHealthy(seed: number): Promise<void> {
  await fuzzConnectionsGone();
  assert.deepEqual(faults, [], 'the server reported an internal fault');
  const offset = (seed * 4096) % (SIZE - 4096);
  assert.deepEqual(await bounded(good.read(offset, 4096), 'the well-behaved connection got no reply'), GOOD_DATA.subarray(offset, offset + 4096));
}

/** A new connection reads the whole 'good' export correctly. */
async function checkNewConnection(): Promise<void> {
  const c = new RawNbdClient(await connectUnix(socketPath));
  await c.handshake();
  await c.go('good');
  assert.deepEqual(await c.read(0, SIZE), GOOD_DATA);
  await c.disconnect();
}

/** Write `bytes` cut at `cuts`, half-close, and collect everything the server sends until it closes. */
async function sendAndCollect(c: RawNbdClient, bytes: Buffer, cuts: number[]): Promise<Buffer> {
  const { stream: sock, buffered } = await c.takeStream();
  const got: Buffer[] = [buffered];
  sock.on('data', (d: Buffer) => got.push(d));
  const done = closed(sock);
  sock.resume();
  let prev = 0;
  for (const p of [...new Set(cuts.map((x) => x % (bytes.length + 1)))].sort((a, b) => a - b).concat(bytes.length)) {
    if (sock.destroyed) break;
    if (p > prev) sock.write(bytes.subarray(prev, p));
    prev = p;
    await new Promise((r) => setImmediate(r));
  }
  sock.end();
  await bounded(done, 'server did not close the connection');
  return Buffer.concat(got);
}

async function connectAndGo(exportName: string, structured: boolean, meta: boolean): Promise<{ c: RawNbdClient; contextId: number }> {
  const c = new RawNbdClient(await connectUnix(socketPath));
  await c.handshake();
  let contextId = -1;
  if (structured) {
    await c.negotiateStructured();
    if (meta) {
      const replies = await c.option(OPT.SET_META_CONTEXT, encodeMetaContext({ name: exportName, queries: [META_CONTEXT_BASE_ALLOCATION] }));
      const m = replies.find((r) => r.type === REP.META_CONTEXT);
      assert.ok(m, 'base:allocation was not selected');
      contextId = parseMetaContextReply(m.data).id;
    }
  }
  await c.go(exportName);
  return { c, contextId };
}

// --------------------------------------------------------------------------- request model

interface FuzzRequest {
  flags: number;
  type: number;
  handle: bigint;
  offset: bigint;
  length: number;
}

function encodeFuzzRequest(r: FuzzRequest): Buffer {
  const b = Buffer.alloc(REQUEST_SIZE);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.handle, 8);
  b.writeBigUInt64BE(r.offset, 16);
  b.writeUInt32BE(r.length, 24);
  return b;
}

const u16 = fc.integer({ min: 0, max: 0xffff });
const requestArb = fc.record({
  type: fc.oneof({ weight: 10, arbitrary: fc.constantFrom(CMD.READ, CMD.WRITE, CMD.FLUSH, CMD.TRIM, CMD.CACHE, CMD.WRITE_ZEROES, CMD.BLOCK_STATUS) }, { weight: 1, arbitrary: fc.constant(CMD.DISC) }, { weight: 2, arbitrary: u16 }),
  flags: fc.oneof({ weight: 4, arbitrary: fc.constant(0) }, { weight: 4, arbitrary: fc.constantFrom(CMD_FLAG.FUA, CMD_FLAG.NO_HOLE, CMD_FLAG.DF, CMD_FLAG.REQ_ONE, CMD_FLAG.FAST_ZERO, CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO) }, { weight: 1, arbitrary: u16 }),
  handleHigh: fc.bigInt({ min: 0n, max: (1n << 48n) - 1n }),
  offset: fc.oneof(
    fc.integer({ min: 0, max: SIZE }).map(BigInt),
    fc.integer({ min: 0, max: SIZE / 512 }).map((n) => BigInt(n * 512)),
    fc.constantFrom(SIZE - 1, SIZE, SIZE + 1, 2 ** 53, 2 ** 53 + 2).map(BigInt),
    fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
  ),
  length: fc.oneof(
    fc.constant(0),
    fc.integer({ min: 1, max: 8192 }),
    fc.integer({ min: 0, max: 128 }).map((n) => n * 512),
    fc.constantFrom(SIZE, SIZE + 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 0xffffffff),
    fc.integer({ min: 0, max: 0xffffffff }),
  ),
});

/** Largest WRITE payload a case actually sends; longer writes are made oversize (a disconnect). */
const MAX_FUZZ_WRITE = 65536;

function toFuzzRequest(g: { type: number; flags: number; handleHigh: bigint; offset: bigint; length: number }, index: number): FuzzRequest {
  let length = g.length;
  if (g.type === CMD.WRITE && length > MAX_FUZZ_WRITE && length <= HARD_PAYLOAD_LIMIT) length %= MAX_FUZZ_WRITE + 1;
  return { type: g.type, flags: g.flags, handle: (g.handleHigh << 16n) | BigInt(index), offset: g.offset, length };
}

/** The request ends the conversation: DISC, or a WRITE too big to buffer (hard disconnect). */
function isTerminal(r: FuzzRequest): boolean {
  return r.type === CMD.DISC || (r.type === CMD.WRITE && r.length > HARD_PAYLOAD_LIMIT);
}

/**
 * What the spec (proto.md "Error values", "Size constraints", "Request types") and our documented
 * choices allow as the reply: [0] for a valid request, else the union of the errors each problem
 * calls for; null when the spec leaves the answer open.
 */
function acceptable(r: FuzzRequest, x: ExportModel, structured: boolean, meta: boolean): number[] | null {
  const { EINVAL, ENOSPC, EPERM } = NBD_ERR;
  const problems: number[] = [];
  const t = r.type;
  if (t > CMD.BLOCK_STATUS) return [EINVAL]; // unknown command (RESIZE was never negotiated)
  // NBD_FLAG_SEND_FUA and NBD_FLAG_SEND_FAST_ZERO are advertised on writable exports only.
  let applicable = x.writable ? CMD_FLAG.FUA : 0;
  if (t === CMD.READ && structured) applicable |= CMD_FLAG.DF;
  if (t === CMD.WRITE_ZEROES) applicable |= CMD_FLAG.NO_HOLE | (x.writable ? CMD_FLAG.FAST_ZERO : 0);
  if (t === CMD.BLOCK_STATUS) applicable |= CMD_FLAG.REQ_ONE;
  if ((r.flags & ~applicable) !== 0) problems.push(EINVAL);
  if (t === CMD.FLUSH) return problems.length > 0 || r.offset !== 0n || r.length !== 0 ? null : [0]; // reserved fields: unspecified
  const writes = t === CMD.WRITE || t === CMD.TRIM || t === CMD.WRITE_ZEROES;
  if (writes && !x.writable) problems.push(EPERM);
  if (t === CMD.BLOCK_STATUS && (!meta || r.length === 0)) problems.push(EINVAL);
  if (x.minBlock > 1 && (r.offset % BigInt(x.minBlock) !== 0n || r.length % x.minBlock !== 0)) problems.push(EINVAL);
  if (r.offset + BigInt(r.length) > BigInt(SIZE)) problems.push(t === CMD.WRITE || t === CMD.WRITE_ZEROES ? ENOSPC : EINVAL);
  if ((t === CMD.READ || t === CMD.WRITE) && r.length > MAX_PAYLOAD) problems.push(EINVAL);
  return problems.length > 0 ? problems : [0];
}

interface ParsedReply {
  handle: bigint;
  error: number;
  data?: Buffer;
  blockStatus?: { contextId: number; descriptors: Array<{ length: number; flags: number }> };
}

/**
 * Parse a whole transmission-phase reply stream. `requests` gives the length of simple READ
 * replies (the only replies that do not describe their own size). Every byte must belong to a
 * complete, well-formed reply, and each handle is completed exactly once.
 */
function parseReplyStream(bytes: Buffer, requests: Map<bigint, FuzzRequest> | null, structured: boolean): ParsedReply[] {
  const done = new Map<bigint, ParsedReply>();
  const open = new Map<bigint, ParsedReply>();
  let off = 0;
  while (off < bytes.length) {
    const h = decodeReplyHeader(bytes, off, MAX_PAYLOAD + 64);
    assert.notEqual(h, NEED_MORE, `truncated reply header at byte ${off} of ${bytes.length}`);
    if (h === NEED_MORE) break;
    off += h.bytesRead;
    const m = h.msg;
    assert.ok(!done.has(m.handle), `second reply for handle ${m.handle}`);
    if (m.kind === 'simple') {
      assert.ok(!structured || requests === null || requests.get(m.handle)?.type !== CMD.READ, 'simple reply to a READ after structured replies were negotiated');
      const req = requests?.get(m.handle);
      if (requests) assert.ok(req, `reply for handle ${m.handle}, which was never sent`);
      let data: Buffer | undefined;
      if (m.error === 0 && req?.type === CMD.READ) {
        assert.ok(bytes.length - off >= req.length, 'simple READ reply is missing data');
        data = bytes.subarray(off, off + req.length);
        off += req.length;
      }
      assert.ok(!open.has(m.handle), 'simple reply in the middle of a structured reply');
      done.set(m.handle, { handle: m.handle, error: m.error, data });
      continue;
    }
    assert.ok(structured, 'structured reply without NBD_OPT_STRUCTURED_REPLY');
    assert.ok(bytes.length - off >= m.length, 'truncated structured reply chunk');
    const body = bytes.subarray(off, off + m.length);
    off += m.length;
    const r = open.get(m.handle) ?? { handle: m.handle, error: 0 };
    open.set(m.handle, r);
    if (isReplyTypeError(m.type)) {
      const e = parseErrorPayload(body, m.type === REPLY_TYPE.ERROR_OFFSET);
      assert.ok(e.error !== 0, 'error chunk with error 0');
      r.error = e.error;
    } else if (m.type === REPLY_TYPE.OFFSET_DATA) {
      assert.ok(body.length > 8, 'OFFSET_DATA chunk without data');
      r.data = Buffer.concat([r.data ?? Buffer.alloc(0), body.subarray(8)]);
    } else if (m.type === REPLY_TYPE.BLOCK_STATUS) {
      r.blockStatus = parseBlockStatusPayload(body);
    } else {
      assert.ok(m.type === REPLY_TYPE.NONE || m.type === REPLY_TYPE.OFFSET_HOLE, `unknown reply chunk type ${m.type}`);
    }
    if ((m.flags & REPLY_FLAG_DONE) !== 0) {
      open.delete(m.handle);
      done.set(m.handle, r);
    }
  }
  assert.equal(open.size, 0, 'structured reply without a DONE chunk');
  return [...done.values()];
}

/** Bytes arbitrary, or requests with the right magic and arbitrary fields, in any mix. */
const afterHandshakeBytes = fc
  .array(
    fc.oneof(
      fc.uint8Array({ maxLength: 64 }).map((a) => Buffer.from(a)),
      fc.tuple(requestArb, fc.nat()).map(([g, i]) => encodeFuzzRequest(toFuzzRequest(g, i))),
      fc.tuple(requestArb, fc.nat(), fc.uint8Array({ maxLength: 64 })).map(([g, i, tail]) => {
        const r = toFuzzRequest({ ...g, type: CMD.WRITE, length: tail.length }, i);
        return Buffer.concat([encodeFuzzRequest(r), Buffer.from(tail)]);
      }),
    ),
    { maxLength: 12 },
  )
  .map((parts) => Buffer.concat(parts));

const cutsArb = fc.array(fc.nat(), { maxLength: 10 });

// -------------------------------------------------------------------------------- (a) bytes

void describe('server fuzz (a): arbitrary bytes after a valid handshake', () => {
  void it('every connection ends cleanly, replies are well formed, other connections keep working', async () => {
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...EXPORTS), fc.boolean(), afterHandshakeBytes, cutsArb, fc.nat(), async (x, structured, bytes, cuts, seed) => {
        const { c } = await connectAndGo(x.name, structured, false);
        const replies = await sendAndCollect(c, bytes, cuts);
        // With structured replies every reply describes its own length, so the stream can be
        // checked without knowing which requests the random bytes happened to form.
        if (structured) parseReplyStream(replies, null, true);
        await checkServerHealthy(seed);
      }),
      { numRuns: 300, includeErrorInReport: true },
    );
    await checkNewConnection();
  });
});

// ------------------------------------------------------------------------- (b) option haggling

type FuzzOption = { option: number; data: Buffer; announced?: number };

const nameArb = fc.oneof(fc.constantFrom('', 'good', 'aligned', 'nope', 'good\0', 'GOOD'), fc.string({ unit: 'binary', maxLength: 20 }));
const bytesArb = (max = 64) => fc.uint8Array({ maxLength: max }).map((a) => Buffer.from(a));
const queryArb = fc.oneof(fc.constantFrom(META_CONTEXT_BASE_ALLOCATION, 'base:', 'base:allocation\0', 'qemu:dirty-bitmap:x', ''), fc.string({ maxLength: 20 }));
const KNOWN_OPTIONS = new Set<number>(Object.values(OPT));

/** Options that never end negotiation by themselves (a GO that succeeds does, and is handled). */
const haggleOptionArb: fc.Arbitrary<FuzzOption> = fc.oneof(
  fc.tuple(fc.constantFrom(OPT.GO, OPT.INFO), nameArb, fc.array(u16, { maxLength: 6 })).map(([option, name, infos]) => ({ option, data: encodeGoInfo({ name, infos }) })),
  fc.tuple(fc.constantFrom(OPT.GO, OPT.INFO, OPT.LIST_META_CONTEXT, OPT.SET_META_CONTEXT), bytesArb()).map(([option, data]) => ({ option, data })),
  fc.tuple(fc.constantFrom(OPT.LIST_META_CONTEXT, OPT.SET_META_CONTEXT), nameArb, fc.array(queryArb, { maxLength: 4 })).map(([option, name, queries]) => ({ option, data: encodeMetaContext({ name, queries }) })),
  fc.tuple(fc.constantFrom(OPT.LIST, OPT.STRUCTURED_REPLY, OPT.STARTTLS, OPT.PEEK_EXPORT, OPT.EXTENDED_HEADERS), fc.oneof(fc.constant(Buffer.alloc(0)), bytesArb())).map(([option, data]) => ({ option, data })),
  fc.tuple(fc.integer({ min: 0, max: 0xffffffff }).filter((o) => !KNOWN_OPTIONS.has(o)), bytesArb()).map(([option, data]) => ({ option, data })),
  // Oversized payload: announced and really sent, so the server must skip it and answer TOO_BIG.
  fc.tuple(fc.constantFrom(OPT.GO, OPT.INFO, OPT.LIST, OPT.SET_META_CONTEXT, 0x1234), fc.integer({ min: 1, max: 4096 })).map(([option, extra]) => ({ option, data: Buffer.alloc(MAX_OPTION_LENGTH + extra) })),
);
const finalOptionArb = fc.oneof(
  fc.constant<FuzzOption | null>(null), // no final option: a plain GO ''
  nameArb.map((name): FuzzOption => ({ option: OPT.EXPORT_NAME, data: Buffer.from(name, 'utf8') })),
  bytesArb().map((data): FuzzOption => ({ option: OPT.ABORT, data })), // the server SHOULD ignore ABORT data
);

/** Reply types an option may send before its final ACK or error (proto.md "Option types"). */
function intermediateTypes(option: number): number[] {
  switch (option) {
    case OPT.LIST:
      return [REP.SERVER];
    case OPT.GO:
    case OPT.INFO:
      return [REP.INFO];
    case OPT.LIST_META_CONTEXT:
    case OPT.SET_META_CONTEXT:
      return [REP.META_CONTEXT];
    default:
      return [];
  }
}

function exportOf(name: string): ExportModel | undefined {
  return EXPORTS.find((x) => x.name === name);
}

void describe('server fuzz (b): hostile option sequences', () => {
  void it('every option is answered in order, then GO/EXPORT_NAME/ABORT behave, other connections keep working', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(haggleOptionArb, { maxLength: 16 }), finalOptionArb, fc.nat(), async (options, final, seed) => {
        const c = new RawNbdClient(await connectUnix(socketPath));
        try {
          await bounded(haggle(c, options, final), 'option haggling did not finish');
        } finally {
          c.destroy();
        }
        await checkServerHealthy(seed);
      }),
      { numRuns: 200, includeErrorInReport: true },
    );
    await checkNewConnection();
  });
});

async function haggle(c: RawNbdClient, options: FuzzOption[], final: FuzzOption | null): Promise<void> {
  await c.handshake();
  let structured = false;
  for (const o of options) {
    const replies = await c.option(o.option, o.data);
    const last = replies.at(-1)!;
    for (const r of replies.slice(0, -1)) assert.ok(intermediateTypes(o.option).includes(r.type), `option ${o.option} got reply type ${r.type}`);
    assert.ok(last.type === REP.ACK || isReplyError(last.type), `option ${o.option} ended with reply type ${last.type}`);
    if (o.data.length > MAX_OPTION_LENGTH) assert.ok(isReplyError(last.type), `oversized option ${o.option} was accepted`);
    if (o.option === OPT.STRUCTURED_REPLY && last.type === REP.ACK) structured = true;
    if (o.option === OPT.GO && last.type === REP.ACK) {
      const name = replies.length > 0 ? decodeGoName(o.data) : '';
      return transmitOnce(c, exportOf(name)!, structured);
    }
  }
  if (final === null) {
    const replies = await c.option(OPT.GO, encodeGoInfo({ name: 'good', infos: [INFO.BLOCK_SIZE] }));
    assert.equal(replies.at(-1)!.type, REP.ACK, 'GO refused after hostile options');
    return transmitOnce(c, exportOf('good')!, structured);
  }
  c.sendOption(final.option, final.data);
  if (final.option === OPT.ABORT) {
    const r = await c.readOptionReply();
    assert.deepEqual([r.option, r.type], [OPT.ABORT, REP.ACK]);
    assert.equal((await c.restUntilClosed()).length, 0, 'server sent more after ABORT');
    return;
  }
  // NBD_OPT_EXPORT_NAME: an unknown name MUST end the session; a known one enters transmission.
  const x = exportOf(final.data.toString('utf8'));
  if (!x) {
    assert.equal((await c.restUntilClosed()).length, 0, 'server answered EXPORT_NAME for an unknown export');
    return;
  }
  const reply = await c.reader.read(10); // size + flags; we asked for NO_ZEROES
  assert.equal(Number(reply.readBigUInt64BE(0)), SIZE);
  return transmitOnce(c, x, structured);
}

function decodeGoName(data: Buffer): string {
  const len = data.readUInt32BE(0);
  return data.toString('utf8', 4, 4 + len);
}

/** One READ in transmission: the right length (and data, for the untouched 'good' export). */
async function transmitOnce(c: RawNbdClient, x: ExportModel, structured: boolean): Promise<void> {
  c.structured = structured;
  const data = await c.read(4096, 4096);
  assert.equal(data.length, 4096);
  if (x.name === 'good') assert.deepEqual(data, GOOD_DATA.subarray(4096, 8192));
  await c.disconnect();
}

// ------------------------------------------------------------------------ (c) request headers

void describe('server fuzz (c): arbitrary request headers in arbitrary pieces', () => {
  void it('each request gets exactly one reply with a spec-allowed error, other connections keep working', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(...EXPORTS),
        fc.boolean(),
        fc.boolean(),
        fc.array(requestArb, { minLength: 1, maxLength: 24 }),
        cutsArb,
        fc.nat(),
        async (x, structured, meta, generated, cuts, seed) => {
          const useMeta = structured && meta;
          const { c, contextId } = await connectAndGo(x.name, structured, useMeta);
          const requests = generated.map(toFuzzRequest);
          const wire: Buffer[] = [];
          const answered = new Map<bigint, FuzzRequest>();
          let terminated = false;
          for (const r of requests) {
            wire.push(encodeFuzzRequest(r));
            if (r.type === CMD.WRITE && !isTerminal(r)) wire.push(patternBytes(r.length, Number(r.handle & 0xffffn)));
            if (isTerminal(r)) {
              terminated = true;
              break;
            }
            answered.set(r.handle, r);
          }
          const bytes = await sendAndCollect(c, Buffer.concat(wire), cuts);
          const replies = parseReplyStream(bytes, answered, structured);
          // Every request before DISC (or before a write too big to take) is answered once.
          assert.deepEqual(new Set(replies.map((r) => r.handle)), new Set(answered.keys()), `answered ${replies.length} of ${answered.size} requests${terminated ? ' before the end' : ''}`);
          for (const reply of replies) {
            const req = answered.get(reply.handle)!;
            const ok = acceptable(req, x, structured, useMeta);
            if (reply.error !== 0) assert.ok(WIRE_ERRORS.has(reply.error), `error ${reply.error} is not an NBD error value`);
            if (ok) assert.ok(ok.includes(reply.error), `${describeRequest(req)} on "${x.name}": got error ${reply.error}, spec allows ${ok.join('|')}`);
            if (reply.error !== 0 && req.type === CMD.READ) continue;
            if (req.type === CMD.READ) {
              assert.equal(reply.data?.length ?? 0, req.length, `READ of ${req.length} returned ${reply.data?.length ?? 0} bytes`);
              if (x.name === 'good' && req.length > 0) assert.deepEqual(reply.data, GOOD_DATA.subarray(Number(req.offset), Number(req.offset) + req.length));
            }
            if (req.type === CMD.BLOCK_STATUS && reply.error === 0) {
              const bs = reply.blockStatus;
              assert.ok(bs, 'BLOCK_STATUS succeeded without a BLOCK_STATUS chunk');
              assert.equal(bs.contextId, contextId);
              assert.ok(bs.descriptors.length >= 1 && bs.descriptors.every((d) => d.length > 0), 'block status descriptors must be non-empty');
              if ((req.flags & CMD_FLAG.REQ_ONE) !== 0) assert.ok(bs.descriptors.length === 1 && bs.descriptors[0]!.length <= req.length, 'REQ_ONE must give one descriptor within the request');
            }
          }
          await checkServerHealthy(seed);
        },
      ),
      { numRuns: 300, includeErrorInReport: true },
    );
    await checkNewConnection();
  });
});

function describeRequest(r: FuzzRequest): string {
  return `type ${r.type} flags 0x${r.flags.toString(16)} offset ${r.offset} length ${r.length}`;
}
