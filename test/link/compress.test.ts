// Per-chunk compression: round trips over arbitrary chunks (empty, zero, random, repetitive,
// mixed), the codec chosen for each kind, the all-zero check, and fuzzing of decompressChunk
// over corrupt, truncated and made-up payloads (the only outcomes are exactly expectedLength
// bytes or a LinkCorruptError).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';

import { CHUNK_CODEC_NAMES, CODEC_ZERO, compressChunk, decompressChunk, isAllZero, LinkCorruptError, MIN_COMPRESS_LENGTH, SKIP_DENOMINATOR, SKIP_NUMERATOR } from '../../src/link/compress.js';
import { CODEC, MAX_CHUNK_SIZE } from '../../src/link/protocol.js';

const RUNS = Number(process.env.SPILLWAY_FUZZ_RUNS ?? 200);
const CHUNK = 64 * 1024;

/** Chunks of every kind the link sees, up to a little over one default chunk. */
const chunkArb: fc.Arbitrary<Buffer> = fc.oneof(
  fc.uint8Array({ maxLength: 2048 }).map((a) => Buffer.from(a)),
  fc.integer({ min: 0, max: CHUNK + 1 }).map((n) => Buffer.alloc(n)),
  fc.integer({ min: 0, max: CHUNK }).map((n) => randomBytes(n)),
  fc.tuple(fc.uint8Array({ minLength: 1, maxLength: 64 }), fc.integer({ min: 1, max: CHUNK })).map(([pat, n]) => Buffer.alloc(n, Buffer.from(pat))),
  fc.tuple(fc.integer({ min: 0, max: CHUNK }), fc.integer({ min: 0, max: CHUNK })).map(([r, z]) => Buffer.concat([randomBytes(r), Buffer.alloc(z), Buffer.from('text '.repeat(r % 500))])),
);

function roundTrip(data: Buffer): void {
  const { codec, payload } = compressChunk(data);
  const back = decompressChunk(codec, payload, data.length);
  assert.ok(back.equals(data), `round trip of ${data.length} bytes via ${CHUNK_CODEC_NAMES[codec]}`);
  if (codec === CODEC.LZ4) assert.ok(payload.length * SKIP_DENOMINATOR <= data.length * SKIP_NUMERATOR, 'lz4 is sent only when it pays');
  if (codec === CODEC.RAW) assert.equal(payload.length, data.length);
  if (codec === CODEC_ZERO) assert.equal(payload.length, 0);
}

void test('round trip: arbitrary chunks (empty, zeros, random, repetitive, mixed)', () => {
  fc.assert(fc.property(chunkArb, roundTrip), { numRuns: RUNS });
});

void test('round trip: edge sizes and the largest chunk the link carries', () => {
  for (const n of [0, 1, MIN_COMPRESS_LENGTH - 1, MIN_COMPRESS_LENGTH, 4095, 4096, CHUNK - 1, CHUNK, CHUNK + 1, MAX_CHUNK_SIZE]) {
    roundTrip(randomBytes(n));
    roundTrip(Buffer.alloc(n, 'ab'));
    roundTrip(Buffer.alloc(n));
  }
});

void test('round trip: a Uint8Array view at an offset into a larger buffer', () => {
  const backing = Buffer.alloc(3 * CHUNK, 'spillway ');
  randomBytes(100).copy(backing, CHUNK + 10);
  const view = new Uint8Array(backing.buffer, backing.byteOffset + CHUNK, CHUNK);
  const { codec, payload } = compressChunk(view);
  assert.equal(codec, CODEC.LZ4);
  assert.ok(decompressChunk(codec, new Uint8Array(payload), CHUNK).equals(Buffer.from(view)));
});

void test('codec per kind: zero marker, lz4 for compressible data, raw when it does not pay', () => {
  const zero = compressChunk(Buffer.alloc(CHUNK));
  assert.equal(zero.codec, CODEC_ZERO);
  assert.equal(zero.payload.length, 0);

  const text = Buffer.alloc(CHUNK, 'Spillway streams VM disks. ');
  const lz4 = compressChunk(text);
  assert.equal(lz4.codec, CODEC.LZ4);
  assert.ok(lz4.payload.length < CHUNK / 8, `text compresses well (${lz4.payload.length} bytes)`);

  const random = randomBytes(CHUNK);
  const raw = compressChunk(random);
  assert.equal(raw.codec, CODEC.RAW);
  assert.equal(raw.payload, random, 'raw payload is the input itself, not a copy');

  // Half random, half repetitive: compresses to ~50%, under 7/8.
  const half = Buffer.concat([randomBytes(CHUNK / 2), Buffer.alloc(CHUNK / 2, 'x')]);
  assert.equal(compressChunk(half).codec, CODEC.LZ4);
  // 15/16 random: compression would save under 1/8, so it is sent raw.
  const mostly = Buffer.concat([randomBytes((CHUNK * 15) / 16), Buffer.alloc(CHUNK / 16, 'x')]);
  assert.equal(compressChunk(mostly).codec, CODEC.RAW);

  const tiny = Buffer.from('aaaaaaaaaaaaaaaaaaaa');
  assert.equal(compressChunk(tiny).codec, CODEC.RAW, 'tiny inputs are not worth a try');
});

void test('compressChunk refuses a chunk larger than the link carries', () => {
  assert.throws(() => compressChunk(Buffer.alloc(MAX_CHUNK_SIZE + 1, 1)), RangeError);
});

void test('isAllZero: empty, zeros of any length, and one non-zero byte anywhere', () => {
  assert.equal(isAllZero(Buffer.alloc(0)), true);
  for (const n of [1, 7, 8, 4096, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, MAX_CHUNK_SIZE]) assert.equal(isAllZero(Buffer.alloc(n)), true, `${n} zero bytes`);
  assert.equal(isAllZero(new Uint8Array(CHUNK)), true, 'plain Uint8Array');
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 3 * CHUNK }), fc.nat(), fc.integer({ min: 1, max: 255 }), (n, at, value) => {
      const b = Buffer.alloc(n);
      b[at % n] = value;
      assert.equal(isAllZero(b), false);
      assert.equal(isAllZero(new Uint8Array(b.buffer, b.byteOffset, b.length)), false);
    }),
    { numRuns: RUNS },
  );
  // A zero view into a buffer whose other bytes are not zero.
  const backing = Buffer.alloc(CHUNK + 2, 0xff);
  backing.fill(0, 1, CHUNK + 1);
  assert.equal(isAllZero(backing.subarray(1, CHUNK + 1)), true);
  assert.equal(isAllZero(backing.subarray(0, CHUNK + 1)), false);
});

/** Either exactly `expected` bytes come back or a LinkCorruptError is thrown; nothing else. */
function decodesOrCorrupt(codec: number, payload: Uint8Array, expected: number): void {
  let out: Buffer;
  try {
    out = decompressChunk(codec, payload, expected);
  } catch (err) {
    assert.ok(err instanceof LinkCorruptError, `expected LinkCorruptError, got ${String(err)}`);
    assert.equal(err.code, 'SPW_ERR_LINK_CORRUPT');
    return;
  }
  assert.equal(out.length, expected);
}

const lz4PayloadArb = fc
  .tuple(fc.integer({ min: MIN_COMPRESS_LENGTH, max: 8192 }), fc.uint8Array({ minLength: 1, maxLength: 32 }), fc.integer({ min: 0, max: 512 }))
  .map(([n, pat, noise]) => {
    const data = Buffer.alloc(n, Buffer.from(pat));
    randomBytes(Math.min(noise, n)).copy(data, 0);
    const c = compressChunk(data);
    return { data, payload: c.payload, codec: c.codec };
  })
  .filter((x) => x.codec === CODEC.LZ4);

void test('fuzz: lz4 payloads with flipped bytes, truncated, extended or overwritten', () => {
  const mutation = fc.oneof(
    fc.record({ kind: fc.constant('flip' as const), at: fc.nat(), xor: fc.integer({ min: 1, max: 255 }) }),
    fc.record({ kind: fc.constant('truncate' as const), at: fc.nat() }),
    fc.record({ kind: fc.constant('append' as const), extra: fc.uint8Array({ minLength: 1, maxLength: 64 }) }),
    fc.record({ kind: fc.constant('overwrite' as const), at: fc.nat(), bytes: fc.uint8Array({ minLength: 1, maxLength: 64 }) }),
  );
  fc.assert(
    fc.property(lz4PayloadArb, fc.array(mutation, { minLength: 1, maxLength: 4 }), ({ data, payload }, mutations) => {
      let p = Buffer.from(payload);
      for (const m of mutations) {
        if (m.kind === 'flip' && p.length > 0) p[m.at % p.length] = (p[m.at % p.length] as number) ^ m.xor;
        else if (m.kind === 'truncate') p = p.subarray(0, m.at % (p.length + 1));
        else if (m.kind === 'append') p = Buffer.concat([p, m.extra]);
        else if (m.kind === 'overwrite' && p.length > 0) Buffer.from(m.bytes).copy(p, m.at % p.length);
      }
      decodesOrCorrupt(CODEC.LZ4, p, data.length);
    }),
    { numRuns: RUNS * 5 },
  );
});

void test('fuzz: arbitrary bytes under every codec value and expected length', () => {
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 255 }), fc.uint8Array({ maxLength: 600 }), fc.oneof(fc.integer({ min: 0, max: 70000 }), fc.integer({ min: 0, max: 0xffffffff })), (codec, payload, expected) => {
      decodesOrCorrupt(codec, payload, expected);
    }),
    { numRuns: RUNS * 5 },
  );
});

void test('fuzz: arbitrary lz4 bodies behind a correct length prefix', () => {
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 70000 }), fc.uint8Array({ maxLength: 2000 }), (expected, body) => {
      const prefix = Buffer.alloc(4);
      prefix.writeUInt32LE(expected);
      decodesOrCorrupt(CODEC.LZ4, Buffer.concat([prefix, body]), expected);
    }),
    { numRuns: RUNS * 5 },
  );
});

void test('corrupt payloads are refused with LinkCorruptError before any large allocation', () => {
  const corrupt = (codec: number, payload: Buffer, expected: number, why: RegExp) =>
    assert.throws(
      () => decompressChunk(codec, payload, expected),
      (err: unknown) => err instanceof LinkCorruptError && err.code === 'SPW_ERR_LINK_CORRUPT' && why.test(err.message),
    );
  const good = compressChunk(Buffer.alloc(CHUNK, 'abc'));
  assert.equal(good.codec, CODEC.LZ4);

  corrupt(CODEC.RAW, Buffer.alloc(CHUNK - 1), CHUNK, /raw chunk payload is 65535 bytes/);
  corrupt(CODEC_ZERO, Buffer.alloc(1), CHUNK, /zero chunk carries/);
  corrupt(CODEC.ZSTD, good.payload, CHUNK, /codec 1 is not one this edge decodes/);
  corrupt(200, Buffer.alloc(0), 0, /codec 200/);
  corrupt(CODEC.LZ4, Buffer.alloc(3), CHUNK, /shorter than its length prefix/);
  // A prefix claiming 4 GiB: refused by comparing with the expected length, nothing allocated.
  const huge = Buffer.from(good.payload);
  huge.writeUInt32LE(0xffffffff, 0);
  corrupt(CODEC.LZ4, huge, CHUNK, /declares 4294967295 bytes, expected 65536/);
  // The right data for another length.
  corrupt(CODEC.LZ4, good.payload, CHUNK * 2, /declares 65536 bytes, expected 131072/);
  // Longer than any LZ4 encoding of the expected length.
  const bloated = Buffer.concat([good.payload.subarray(0, 4), Buffer.alloc(CHUNK * 2)]);
  corrupt(CODEC.LZ4, bloated, CHUNK, /too large/);
  // Truncated in the middle of the block.
  corrupt(CODEC.LZ4, good.payload.subarray(0, good.payload.length - 3), CHUNK, /does not decompress|decompressed to/);
});

void test('a length over the link maximum is corrupt; a negative or fractional one is a caller bug', () => {
  for (const n of [MAX_CHUNK_SIZE + 1, 0xffffffff]) {
    assert.throws(
      () => decompressChunk(CODEC.LZ4, Buffer.alloc(8), n),
      (err: unknown) => err instanceof LinkCorruptError && /exceeds the link's maximum/.test(err.message),
    );
  }
  for (const n of [-1, 1.5, Number.NaN]) assert.throws(() => decompressChunk(CODEC.RAW, Buffer.alloc(0), n), RangeError);
});
