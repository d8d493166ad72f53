// Key schedule and blob sealing.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { blobAad, cipherKey, openBlob, sealBlob } from '../../src/cache/blob-cipher.js';
import { CacheError } from '../../src/cache/errors.js';
import { deriveKeys, keyCheckValue } from '../../src/cache/keys.js';

void test('deriveKeys: deterministic, distinct sub-keys, independent of each other', () => {
  const k = randomBytes(32);
  const a = deriveKeys(k);
  const b = deriveKeys(Buffer.from(k));
  assert.deepEqual(a, b);
  assert.equal(a.cacheKey.length, 32);
  assert.equal(a.signKey.length, 32);
  assert.notDeepEqual(a.cacheKey, a.signKey);
  assert.notDeepEqual(a.cacheKey, k);
  const other = deriveKeys(randomBytes(32));
  assert.notDeepEqual(other.cacheKey, a.cacheKey);
  assert.notDeepEqual(other.signKey, a.signKey);
});

void test('deriveKeys: RFC 5869 HKDF-SHA256 with the documented salt and info', async () => {
  const { hkdfSync } = await import('node:crypto');
  const k = Buffer.alloc(32, 7);
  const expect = Buffer.from(hkdfSync('sha256', k, 'spillway key schedule v1', 'spillway cache aes-256-gcm v1', 32));
  assert.deepEqual(deriveKeys(k).cacheKey, expect);
});

void test('deriveKeys refuses a key of the wrong size', () => {
  assert.throws(() => deriveKeys(randomBytes(16)), (e: unknown) => e instanceof CacheError && e.code === 'SPW_ERR_CACHE_KEY_SIZE');
});

void test('keyCheckValue tells keys apart and is not the key', () => {
  const a = deriveKeys(randomBytes(32)).cacheKey;
  const b = deriveKeys(randomBytes(32)).cacheKey;
  assert.notDeepEqual(keyCheckValue(a), keyCheckValue(b));
  assert.equal(a.indexOf(keyCheckValue(a)), -1);
});

void test('sealBlob/openBlob: round trip; any other key, family, id, nonce, tag or byte fails', () => {
  const key = cipherKey(randomBytes(32));
  const id = randomBytes(32);
  const pt = randomBytes(5000);
  const s = sealBlob(key, blobAad('fam', id), pt);
  assert.equal(s.ciphertext.length, pt.length);
  assert.deepEqual(openBlob(key, blobAad('fam', id), s.nonce, s.ciphertext, s.tag), pt);
  assert.equal(openBlob(cipherKey(randomBytes(32)), blobAad('fam', id), s.nonce, s.ciphertext, s.tag), null);
  assert.equal(openBlob(key, blobAad('fam2', id), s.nonce, s.ciphertext, s.tag), null);
  assert.equal(openBlob(key, blobAad('fam', randomBytes(32)), s.nonce, s.ciphertext, s.tag), null);
  assert.equal(openBlob(key, blobAad('fam', id), randomBytes(12), s.ciphertext, s.tag), null);
  assert.equal(openBlob(key, blobAad('fam', id), s.nonce, s.ciphertext, randomBytes(16)), null);
  const bad = Buffer.from(s.ciphertext);
  bad[1234] = (bad[1234] as number) ^ 1;
  assert.equal(openBlob(key, blobAad('fam', id), s.nonce, bad, s.tag), null);
  assert.equal(openBlob(key, blobAad('fam', id), s.nonce, s.ciphertext.subarray(0, 4999), s.tag), null);
  // fresh nonce per seal
  assert.notDeepEqual(sealBlob(key, blobAad('fam', id), pt).nonce, s.nonce);
});

void test('blobAad is unambiguous across the family/id boundary', () => {
  assert.notDeepEqual(blobAad('ab', Buffer.from('c')), blobAad('a', Buffer.from('bc')));
});
