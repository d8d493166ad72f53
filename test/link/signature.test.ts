// Keyed chunk signatures: a known answer (computed with `openssl dgst -sha256 -mac HMAC`, so a
// change of algorithm is a deliberate, visible break of every cache's content ids), stability,
// separation across keys and across content, and distance from unkeyed hashes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import fc from 'fast-check';

import { CHUNK_SIGNATURE_SIZE, ChunkSigner, ChunkSignerKeyError } from '../../src/link/signature.js';
import { SIGNATURE_SIZE } from '../../src/link/protocol.js';

const RUNS = Number(process.env.SPILLWAY_FUZZ_RUNS ?? 200);
const KEY = Buffer.from('000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f', 'hex');
const keyArb = fc.uint8Array({ minLength: 32, maxLength: 32 });
const dataArb = fc.oneof(
  fc.uint8Array({ maxLength: 4096 }),
  fc.integer({ min: 0, max: 70000 }).map((n) => new Uint8Array(n)),
  fc.integer({ min: 1, max: 70000 }).map((n) => new Uint8Array(randomBytes(n))),
);

void test('known answers (openssl dgst -sha256 -mac HMAC -macopt hexkey:00..1f)', () => {
  const s = new ChunkSigner(KEY);
  assert.equal(s.signHex(Buffer.from('spillway chunk')), '8d859c22863f45cd07027a24e2aa1fd82440a4b8c4763843a87f105a02f04d3a');
  assert.equal(s.signHex(Buffer.alloc(65536)), '758d02ad4886db5b15bbae47ffb50ea43fa0ecddc45f73c9827ecff35038fe9b');
});

void test('a signature is 32 bytes (the wire size), and signHex is its hex', () => {
  assert.equal(CHUNK_SIGNATURE_SIZE, SIGNATURE_SIZE);
  fc.assert(
    fc.property(keyArb, dataArb, (key, data) => {
      const s = new ChunkSigner(key);
      const sig = s.sign(data);
      assert.ok(Buffer.isBuffer(sig));
      assert.equal(sig.length, SIGNATURE_SIZE);
      assert.equal(s.signHex(data), sig.toString('hex'));
      assert.match(s.signHex(data), /^[0-9a-f]{64}$/);
    }),
    { numRuns: RUNS },
  );
});

void test('stable: equal content under equal keys signs equally (separate signers, Buffer or Uint8Array)', () => {
  fc.assert(
    fc.property(keyArb, dataArb, (key, data) => {
      const a = new ChunkSigner(key);
      const b = new ChunkSigner(Buffer.from(key));
      assert.ok(a.sign(data).equals(b.sign(Buffer.from(data))));
      assert.ok(a.sign(data).equals(a.sign(data)), 'repeatable on one signer');
    }),
    { numRuns: RUNS },
  );
});

void test('different keys give different signatures for the same content', () => {
  fc.assert(
    fc.property(keyArb, keyArb, dataArb, (k1, k2, data) => {
      fc.pre(!Buffer.from(k1).equals(Buffer.from(k2)));
      assert.ok(!new ChunkSigner(k1).sign(data).equals(new ChunkSigner(k2).sign(data)));
    }),
    { numRuns: RUNS },
  );
  // Keys one bit apart.
  const flipped = Buffer.from(KEY);
  flipped[31] = (flipped[31] as number) ^ 1;
  const data = Buffer.alloc(65536, 7);
  assert.ok(!new ChunkSigner(KEY).sign(data).equals(new ChunkSigner(flipped).sign(data)));
});

void test('different content gives different signatures under one key (incl. one bit, one byte longer)', () => {
  const s = new ChunkSigner(KEY);
  fc.assert(
    fc.property(dataArb, dataArb, (a, b) => {
      fc.pre(!Buffer.from(a).equals(Buffer.from(b)));
      assert.ok(!s.sign(a).equals(s.sign(b)));
    }),
    { numRuns: RUNS },
  );
  const chunk = randomBytes(65536);
  const oneBit = Buffer.from(chunk);
  oneBit[12345] = (oneBit[12345] as number) ^ 0x10;
  assert.ok(!s.sign(chunk).equals(s.sign(oneBit)));
  assert.ok(!s.sign(Buffer.alloc(65536)).equals(s.sign(Buffer.alloc(65537))), 'zero chunks of different lengths');
  assert.ok(!s.sign(Buffer.alloc(0)).equals(s.sign(Buffer.alloc(1))));
});

void test('not an unkeyed hash: differs from SHA-256 of the data and of key || data', () => {
  fc.assert(
    fc.property(keyArb, dataArb, (key, data) => {
      const sig = new ChunkSigner(key).sign(data);
      assert.ok(!sig.equals(createHash('sha256').update(data).digest()));
      assert.ok(!sig.equals(createHash('sha256').update(key).update(data).digest()));
      assert.ok(!sig.equals(createHash('sha256').update(data).update(key).digest()));
    }),
    { numRuns: RUNS },
  );
});

void test('the key is copied: wiping the caller buffer does not change signatures', () => {
  const key = Buffer.from(KEY);
  const s = new ChunkSigner(key);
  const before = s.sign(Buffer.from('chunk'));
  key.fill(0);
  assert.ok(s.sign(Buffer.from('chunk')).equals(before));
});

void test('verify: true for the signature of the data, false for anything else', () => {
  const s = new ChunkSigner(KEY);
  const data = randomBytes(4096);
  const sig = s.sign(data);
  assert.equal(s.verify(data, sig), true);
  assert.equal(s.verify(data, new Uint8Array(sig)), true);
  const bad = Buffer.from(sig);
  bad[0] = (bad[0] as number) ^ 1;
  assert.equal(s.verify(data, bad), false);
  assert.equal(s.verify(Buffer.concat([data, Buffer.alloc(1)]), sig), false);
  assert.equal(s.verify(data, sig.subarray(0, 31)), false);
  assert.equal(s.verify(data, Buffer.alloc(0)), false);
  assert.equal(new ChunkSigner(randomBytes(32)).verify(data, sig), false);
});

void test('keys that are not 32 bytes are refused with a typed error', () => {
  for (const n of [0, 16, 31, 33, 64]) {
    assert.throws(
      () => new ChunkSigner(Buffer.alloc(n, 1)),
      (err: unknown) => err instanceof ChunkSignerKeyError && err.code === 'SPW_ERR_LINK_SIGNATURE_KEY' && err.message.includes(`got ${n} bytes`),
    );
  }
  assert.throws(() => new ChunkSigner('0'.repeat(32) as unknown as Uint8Array), ChunkSignerKeyError);
});
