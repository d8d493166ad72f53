// Key schedule. Each volume family (a base image and its clones) has one 32-byte data key,
// chosen by the local-role edge and delivered over the link; the remote edge keeps it in
// memory only. Sub-keys come from HKDF-SHA256 (RFC 5869) with a distinct `info` per use, so
// the cache cipher key and the link's chunk-signature key are independent: knowing one says
// nothing about the other or about the data key.

import { createHmac, hkdfSync, timingSafeEqual } from 'node:crypto';
import { CacheError } from './errors.js';

export const DATA_KEY_SIZE = 32;
export const SUB_KEY_SIZE = 32;
/** Bytes of the key check value kept on disk per family (see keyCheckValue). */
export const KEY_CHECK_SIZE = 16;

const SALT = Buffer.from('spillway key schedule v1', 'utf8');
const INFO_CACHE = Buffer.from('spillway cache aes-256-gcm v1', 'utf8');
const INFO_SIGN = Buffer.from('spillway chunk signature v1', 'utf8');
const INFO_JOURNAL = Buffer.from('spillway journal aes-256-gcm v1', 'utf8');
const CHECK_LABEL = Buffer.from('spillway cache key check v1', 'utf8');

export interface DerivedKeys {
  /** AES-256-GCM key of the secure cache (blobs at rest). */
  readonly cacheKey: Buffer;
  /** key of the chunk signature (keyed hash) computed by the sender, used by src/link. */
  readonly signKey: Buffer;
  /** AES-256-GCM key of the remote edge's write-back journal (records at rest). */
  readonly journalKey: Buffer;
}

function hkdf(ikm: Buffer, info: Buffer): Buffer {
  return Buffer.from(hkdfSync('sha256', ikm, SALT, info, SUB_KEY_SIZE));
}

/** Derive the sub-keys of one family from its 32-byte data key. Pure and deterministic. */
export function deriveKeys(dataKey: Uint8Array): DerivedKeys {
  if (dataKey.length !== DATA_KEY_SIZE) {
    throw new CacheError('SPW_ERR_CACHE_KEY_SIZE', `a family data key is ${DATA_KEY_SIZE} bytes, got ${dataKey.length}; check what the local-role edge sent`);
  }
  const ikm = Buffer.from(dataKey);
  try {
    return { cacheKey: hkdf(ikm, INFO_CACHE), signKey: hkdf(ikm, INFO_SIGN), journalKey: hkdf(ikm, INFO_JOURNAL) };
  } finally {
    ikm.fill(0);
  }
}

/**
 * A one-way value that tells whether a key is the one the stored content was sealed with,
 * without revealing anything usable about the key (HMAC of a fixed label, truncated). Stored
 * on disk per family, so a wrong key is refused instead of turning every blob into a
 * counted-and-dropped authentication failure.
 */
export function keyCheckValue(cacheKey: Uint8Array): Buffer {
  return createHmac('sha256', cacheKey).update(CHECK_LABEL).digest().subarray(0, KEY_CHECK_SIZE);
}

export function keyChecksEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}
