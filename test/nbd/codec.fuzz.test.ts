// Property tests of the pure NBD codec (fast-check): every decoder over arbitrary bytes may only
// return a message, NEED_MORE, or throw NbdProtocolError; encode → decode gives the message back;
// a valid message fed in arbitrary pieces decodes as NEED_MORE until complete, then as itself;
// oversized lengths are refused as soon as the header is there, before any payload is buffered.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';

import {
  decodeClientFlags,
  decodeExportNameReply,
  decodeOption,
  decodeOptionHeader,
  decodeOffsetDataHeader,
  decodeOptionReply,
  decodeReplyHeader,
  decodeRequest,
  decodeServerGreeting,
  encodeBlockStatusPayload,
  encodeClientFlags,
  encodeErrorPayload,
  encodeExportNameReply,
  encodeGoInfo,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContext,
  encodeMetaContextReply,
  encodeOffsetHolePayload,
  encodeOption,
  encodeOptionReply,
  encodeRequest,
  encodeServerEntry,
  encodeServerGreeting,
  encodeSimpleReply,
  encodeStructuredHeader,
  NEED_MORE,
  NbdProtocolError,
  parseBlockStatusPayload,
  parseErrorPayload,
  parseGoInfo,
  parseInfoReply,
  parseMetaContext,
  parseMetaContextReply,
  parseOffsetHolePayload,
  parseServerEntry,
  type Decoded,
} from '../../src/nbd/codec.js';
import * as codec from '../../src/nbd/codec.js';
import {
  IHAVEOPT,
  INFO,
  MAX_OPTION_LENGTH,
  NBDMAGIC,
  OPTION_REPLY_MAGIC,
  REQUEST_MAGIC,
  REQUEST_SIZE,
  SIMPLE_REPLY_MAGIC,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_HEADER_SIZE,
  STRUCTURED_REPLY_MAGIC,
} from '../../src/nbd/protocol.js';

const RUNS = 2000;
const MAX_CHUNK = 1 << 20;

// ------------------------------------------------------------------------------- arbitraries

const u16 = fc.integer({ min: 0, max: 0xffff });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const safeU64 = fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER });

function be64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
}
function be32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}
function be16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
}

/** Every magic a decoder checks, so arbitrary input also reaches the code behind the magic. */
const MAGICS = [
  Buffer.concat([be64(NBDMAGIC), be64(IHAVEOPT)]),
  be64(NBDMAGIC),
  be64(IHAVEOPT),
  be64(OPTION_REPLY_MAGIC),
  be32(REQUEST_MAGIC),
  be32(SIMPLE_REPLY_MAGIC),
  be32(STRUCTURED_REPLY_MAGIC),
];

/** Length-ish fields small enough to make parsers walk deep into a payload. */
const token = fc.oneof(
  fc.uint8Array({ maxLength: 12 }).map((a) => Buffer.from(a)),
  fc.integer({ min: 0, max: 40 }).map(be32),
  fc.integer({ min: 0, max: 8 }).map(be16),
  fc.constantFrom(0xffffffff, MAX_OPTION_LENGTH, MAX_OPTION_LENGTH + 1, 4096, 4097).map(be32),
);
const structuredBytes = fc.array(token, { maxLength: 12 }).map((ts) => Buffer.concat(ts));

/** Arbitrary bytes, biased towards valid magics and plausible length fields. */
const wireBytes = fc.oneof(
  fc.uint8Array({ maxLength: 200 }).map((a) => Buffer.from(a)),
  fc.tuple(fc.constantFrom(...MAGICS), structuredBytes).map(([m, r]) => Buffer.concat([m, r])),
  structuredBytes,
);

/** Strings of any code point; at most 1024 of them keeps the UTF-8 form within 4096 bytes. */
const text = (maxLength = 1024) => fc.string({ unit: 'binary', maxLength });

// ---------------------------------------------------------------------------------- helpers

type StreamDecoder = (buf: Buffer, off: number) => Decoded<unknown>;

/** Classify one decode; anything but a message, NEED_MORE or NbdProtocolError fails the property. */
function outcome(f: () => unknown): 'msg' | 'need' | 'error' {
  try {
    return f() === NEED_MORE ? 'need' : 'msg';
  } catch (err) {
    if (err instanceof NbdProtocolError) return 'error';
    throw err;
  }
}

function checkStreamDecoder(decode: StreamDecoder): void {
  fc.assert(
    fc.property(wireBytes, fc.nat(8), (bytes, lead) => {
      // The message may start anywhere in the buffer: prepend `lead` junk bytes.
      const buf = Buffer.concat([Buffer.alloc(lead, 0xee), bytes]);
      const before = Buffer.from(buf);
      outcome(() => {
        const r = decode(buf, lead);
        if (r !== NEED_MORE) {
          assert.ok(Number.isInteger(r.bytesRead) && r.bytesRead > 0, `bytesRead ${r.bytesRead}`);
          assert.ok(lead + r.bytesRead <= buf.length, `bytesRead ${r.bytesRead} overruns ${bytes.length} bytes`);
        }
        return r;
      });
      assert.deepEqual(buf, before, 'decoder modified its input');
    }),
    { numRuns: RUNS },
  );
}

function checkPayloadParser(parse: (data: Buffer) => unknown): void {
  fc.assert(
    fc.property(wireBytes, (bytes) => {
      outcome(() => parse(bytes));
    }),
    { numRuns: RUNS },
  );
}

/**
 * Feed `wire` in pieces cut at `cuts`, concatenating what arrived so far, after `lead` bytes of
 * junk and followed by `trail` extra bytes: NEED_MORE until every byte is there, then `expected`.
 */
function checkSplit<T>(decode: (buf: Buffer, off: number) => Decoded<T>, wire: Buffer, expected: T, cuts: number[], lead: number, trail: Buffer): void {
  const points = [...new Set(cuts.map((c) => c % (wire.length + 1)))].sort((a, b) => a - b);
  let arrived = Buffer.alloc(lead, 0xee);
  let prev = 0;
  for (const p of [...points, wire.length]) {
    arrived = Buffer.concat([arrived, wire.subarray(prev, p)]);
    prev = p;
    const r = decode(arrived, lead);
    if (p < wire.length) assert.equal(r, NEED_MORE, `decoded a message from ${p} of ${wire.length} bytes`);
  }
  const r = decode(Buffer.concat([arrived, trail]), lead);
  assert.notEqual(r, NEED_MORE, 'complete message still NEED_MORE');
  if (r === NEED_MORE) return;
  assert.equal(r.bytesRead, wire.length);
  assert.deepEqual(r.msg, expected);
}

const splitArgs = { cuts: fc.array(fc.nat(), { maxLength: 8 }), lead: fc.nat(8), trail: fc.uint8Array({ maxLength: 16 }).map((a) => Buffer.from(a)) };

// ------------------------------------------------------------------ arbitrary bytes: decoders

void describe('codec decoders over arbitrary bytes: message, NEED_MORE or NbdProtocolError only', () => {
  const stream: Array<[string, StreamDecoder]> = [
    ['decodeServerGreeting', decodeServerGreeting],
    ['decodeClientFlags', decodeClientFlags],
    ['decodeOptionHeader', decodeOptionHeader],
    ['decodeOption', decodeOption],
    ['decodeOptionReply', decodeOptionReply],
    ['decodeRequest', decodeRequest],
    ['decodeReplyHeader', (b, o) => decodeReplyHeader(b, o, MAX_CHUNK)],
    ['decodeExportNameReply (no zeroes)', (b, o) => decodeExportNameReply(b, o, true)],
    ['decodeExportNameReply (with zeroes)', (b, o) => decodeExportNameReply(b, o, false)],
    ['decodeOffsetDataHeader', decodeOffsetDataHeader],
  ];
  for (const [name, decode] of stream) void it(name, () => checkStreamDecoder(decode));

  const parsers: Array<[string, (d: Buffer) => unknown]> = [
    ['parseGoInfo', parseGoInfo],
    ['parseMetaContext', parseMetaContext],
    ['parseInfoReply', parseInfoReply],
    ['parseServerEntry', parseServerEntry],
    ['parseMetaContextReply', parseMetaContextReply],
    ['parseErrorPayload', (d) => parseErrorPayload(d, false)],
    ['parseErrorPayload (with offset)', (d) => parseErrorPayload(d, true)],
    ['parseBlockStatusPayload', parseBlockStatusPayload],
    ['parseOffsetHolePayload', parseOffsetHolePayload],
  ];
  for (const [name, parse] of parsers) void it(name, () => checkPayloadParser(parse));

  void it('covers every decoder codec.ts exports', () => {
    const fuzzed = new Set([...stream, ...parsers].map(([name]) => name.split(' ')[0]));
    const exported = Object.keys(codec).filter((k) => /^(decode|parse)[A-Z]/.test(k));
    assert.deepEqual(exported.filter((k) => !fuzzed.has(k)), [], 'add the new decoder to the tables above');
  });
});

// ------------------------------------------------------------------------- oversize refusals

void describe('codec refuses oversized lengths from the header alone', () => {
  void it('decodeOption: payload above MAX_OPTION_LENGTH is TOO_BIG before the payload arrives', () => {
    fc.assert(
      fc.property(u32, fc.integer({ min: MAX_OPTION_LENGTH + 1, max: 0xffffffff }), (option, length) => {
        const head = Buffer.concat([be64(IHAVEOPT), be32(option), be32(length)]);
        assert.throws(() => decodeOption(head, 0), (e: unknown) => e instanceof NbdProtocolError && e.code === 'SPW_ERR_NBD_TOO_BIG');
      }),
    );
  });

  void it('decodeOptionReply: payload above MAX_OPTION_LENGTH is TOO_BIG before the payload arrives', () => {
    fc.assert(
      fc.property(u32, u32, fc.integer({ min: MAX_OPTION_LENGTH + 1, max: 0xffffffff }), (option, type, length) => {
        const head = Buffer.concat([be64(OPTION_REPLY_MAGIC), be32(option), be32(type), be32(length)]);
        assert.throws(() => decodeOptionReply(head, 0), (e: unknown) => e instanceof NbdProtocolError && e.code === 'SPW_ERR_NBD_TOO_BIG');
      }),
    );
  });

  void it('decodeReplyHeader: structured chunk above maxChunk is TOO_BIG', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 1 << 24 }), u32, u16, u16, u64, (maxChunk, length, flags, type, handle) => {
        fc.pre(length > maxChunk);
        const b = Buffer.alloc(STRUCTURED_REPLY_HEADER_SIZE);
        encodeStructuredHeader(b, 0, flags, type, handle, length);
        assert.throws(() => decodeReplyHeader(b, 0, maxChunk), (e: unknown) => e instanceof NbdProtocolError && e.code === 'SPW_ERR_NBD_TOO_BIG');
      }),
    );
  });
});

// ------------------------------------------------------------------ round trips (+ splitting)

void describe('codec round trips, fed in arbitrary pieces', () => {
  void it('server greeting', () => {
    fc.assert(
      fc.property(u16, splitArgs.cuts, splitArgs.lead, splitArgs.trail, (flags, cuts, lead, trail) => {
        checkSplit(decodeServerGreeting, encodeServerGreeting(flags), { handshakeFlags: flags }, cuts, lead, trail);
      }),
    );
  });

  void it('client flags', () => {
    fc.assert(
      fc.property(u32, splitArgs.cuts, splitArgs.lead, splitArgs.trail, (flags, cuts, lead, trail) => {
        checkSplit(decodeClientFlags, encodeClientFlags(flags), flags, cuts, lead, trail);
      }),
    );
  });

  void it('option (header and whole option)', () => {
    fc.assert(
      fc.property(u32, fc.uint8Array({ maxLength: 300 }), splitArgs.cuts, splitArgs.lead, splitArgs.trail, (option, bytes, cuts, lead, trail) => {
        const data = Buffer.from(bytes);
        const wire = encodeOption(option, data);
        checkSplit(decodeOption, wire, { option, data }, cuts, lead, trail);
        checkSplit(decodeOptionHeader, wire.subarray(0, 16), { option, length: data.length }, cuts, lead, wire.subarray(16));
      }),
    );
  });

  void it('option reply', () => {
    fc.assert(
      fc.property(u32, u32, fc.uint8Array({ maxLength: 300 }), splitArgs.cuts, splitArgs.lead, splitArgs.trail, (option, type, bytes, cuts, lead, trail) => {
        const data = Buffer.from(bytes);
        checkSplit(decodeOptionReply, encodeOptionReply(option, type, data), { option, type, data }, cuts, lead, trail);
      }),
    );
  });

  void it('request header', () => {
    fc.assert(
      fc.property(u16, u16, u64, safeU64, u32, splitArgs.cuts, splitArgs.lead, splitArgs.trail, (flags, type, handle, offset, length, cuts, lead, trail) => {
        const req = { flags, type, handle, offset, length };
        const wire = Buffer.alloc(REQUEST_SIZE);
        assert.equal(encodeRequest(wire, 0, req), REQUEST_SIZE);
        checkSplit(decodeRequest, wire, req, cuts, lead, trail);
      }),
    );
  });

  void it('simple reply header', () => {
    fc.assert(
      fc.property(u32, u64, splitArgs.cuts, splitArgs.lead, splitArgs.trail, (error, handle, cuts, lead, trail) => {
        const wire = Buffer.alloc(SIMPLE_REPLY_SIZE);
        assert.equal(encodeSimpleReply(wire, 0, error, handle), SIMPLE_REPLY_SIZE);
        checkSplit((b, o) => decodeReplyHeader(b, o, MAX_CHUNK), wire, { kind: 'simple', error, handle }, cuts, lead, trail);
      }),
    );
  });

  void it('structured reply header', () => {
    fc.assert(
      fc.property(u16, u16, u64, fc.integer({ min: 0, max: MAX_CHUNK }), splitArgs.cuts, splitArgs.lead, splitArgs.trail, (flags, type, handle, length, cuts, lead, trail) => {
        const wire = Buffer.alloc(STRUCTURED_REPLY_HEADER_SIZE);
        assert.equal(encodeStructuredHeader(wire, 0, flags, type, handle, length), STRUCTURED_REPLY_HEADER_SIZE);
        checkSplit((b, o) => decodeReplyHeader(b, o, MAX_CHUNK), wire, { kind: 'structured', flags, type, handle, length }, cuts, lead, trail);
      }),
    );
  });

  void it('OFFSET_DATA chunk header', () => {
    fc.assert(
      fc.property(safeU64, splitArgs.cuts, splitArgs.lead, splitArgs.trail, (offset, cuts, lead, trail) => {
        checkSplit(decodeOffsetDataHeader, be64(BigInt(offset)), offset, cuts, lead, trail);
      }),
    );
  });

  void it('export-name reply, with and without the 124 zero bytes', () => {
    fc.assert(
      fc.property(safeU64, u16, fc.boolean(), splitArgs.cuts, splitArgs.lead, splitArgs.trail, (size, flags, noZeroes, cuts, lead, trail) => {
        const wire = encodeExportNameReply(size, flags, noZeroes);
        assert.equal(wire.length, noZeroes ? 10 : 134);
        checkSplit((b, o) => decodeExportNameReply(b, o, noZeroes), wire, { size, flags }, cuts, lead, trail);
      }),
    );
  });
});

void describe('codec round trips of option and reply payloads', () => {
  void it('NBD_OPT_GO / NBD_OPT_INFO request', () => {
    fc.assert(
      fc.property(text(), fc.array(u16, { maxLength: 20 }), (name, infos) => {
        assert.deepEqual(parseGoInfo(encodeGoInfo({ name, infos })), { name, infos });
      }),
    );
  });

  void it('NBD_OPT_LIST/SET_META_CONTEXT request', () => {
    fc.assert(
      fc.property(text(), fc.array(text(64), { maxLength: 10 }), (name, queries) => {
        assert.deepEqual(parseMetaContext(encodeMetaContext({ name, queries })), { name, queries });
      }),
    );
  });

  void it('NBD_INFO_EXPORT', () => {
    fc.assert(
      fc.property(safeU64, u16, (size, flags) => {
        assert.deepEqual(parseInfoReply(encodeInfoExport(size, flags)), { type: INFO.EXPORT, size, flags });
      }),
    );
  });

  void it('NBD_INFO_BLOCK_SIZE', () => {
    fc.assert(
      fc.property(u32, u32, u32, (minimum, preferred, maximum) => {
        assert.deepEqual(parseInfoReply(encodeInfoBlockSize(minimum, preferred, maximum)), { type: INFO.BLOCK_SIZE, minimum, preferred, maximum });
      }),
    );
  });

  void it('NBD_INFO_NAME and NBD_INFO_DESCRIPTION', () => {
    fc.assert(
      fc.property(text(), (s) => {
        assert.deepEqual(parseInfoReply(encodeInfoString(INFO.NAME, s)), { type: INFO.NAME, name: s });
        assert.deepEqual(parseInfoReply(encodeInfoString(INFO.DESCRIPTION, s)), { type: INFO.DESCRIPTION, description: s });
      }),
    );
  });

  void it('NBD_REP_SERVER', () => {
    fc.assert(
      fc.property(text(), text(), (name, description) => {
        assert.deepEqual(parseServerEntry(encodeServerEntry(name, description)), { name, description });
      }),
    );
  });

  void it('NBD_REP_META_CONTEXT', () => {
    fc.assert(
      fc.property(u32, text(), (id, name) => {
        assert.deepEqual(parseMetaContextReply(encodeMetaContextReply(id, name)), { id, name });
      }),
    );
  });

  void it('error chunk payload, with and without offset', () => {
    fc.assert(
      fc.property(u32, text(1024), fc.option(safeU64, { nil: undefined }), (error, message, offset) => {
        fc.pre(message.length <= 1024); // longer messages are truncated by design
        const expected = offset === undefined ? { error, message } : { error, message, offset };
        assert.deepEqual(parseErrorPayload(encodeErrorPayload(error, message, offset), offset !== undefined), expected);
      }),
    );
  });

  void it('OFFSET_HOLE chunk payload', () => {
    fc.assert(
      fc.property(safeU64, u32, (offset, length) => {
        assert.deepEqual(parseOffsetHolePayload(encodeOffsetHolePayload(offset, length)), { offset, length });
      }),
    );
  });

  void it('block status chunk payload', () => {
    fc.assert(
      fc.property(u32, fc.array(fc.tuple(u32, u32).map(([length, flags]) => ({ length, flags })), { minLength: 1, maxLength: 50 }), (contextId, descriptors) => {
        assert.deepEqual(parseBlockStatusPayload(encodeBlockStatusPayload(contextId, descriptors)), { contextId, descriptors });
      }),
    );
  });
});
