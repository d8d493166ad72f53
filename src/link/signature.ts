// Keyed chunk signatures: HMAC-SHA256 of the chunk's bytes under a 32-byte secret key per volume
// family. Equal content under the same key has the same signature, so the local edge can answer
// a read with the signature alone when the remote cache already holds that content; without the
// key nobody can compute a signature, so a signature reveals nothing about the content (an
// unkeyed hash of a known block would tell an observer "this disk holds that file") and cannot
// be forged to make the cache hand out content. Why HMAC-SHA256 and not BLAKE3 or xxh3:
// docs/decisions/compression-and-signatures.md.

import { createHmac, createSecretKey, timingSafeEqual, type KeyObject } from 'node:crypto';

/** Bytes of a signature key and of a signature (protocol.ts SIGNATURE_SIZE). */
export const SIGNATURE_KEY_SIZE = 32;
export const CHUNK_SIGNATURE_SIZE = 32;

export class ChunkSignerKeyError extends Error {
  readonly code = 'SPW_ERR_LINK_SIGNATURE_KEY' as const;
  constructor(message: string) {
    super(message);
    this.name = 'ChunkSignerKeyError';
  }
}

export class ChunkSigner {
  private readonly key: KeyObject;

  /** `key`: 32 secret bytes for one volume family; copied, so the caller may wipe its buffer. */
  constructor(key: Uint8Array) {
    if (!(key instanceof Uint8Array) || key.length !== SIGNATURE_KEY_SIZE) {
      const got = key instanceof Uint8Array ? `${key.length} bytes` : typeof key;
      throw new ChunkSignerKeyError(`a chunk signature key is ${SIGNATURE_KEY_SIZE} bytes, got ${got}`);
    }
    this.key = createSecretKey(Buffer.from(key));
  }

  /** The 32-byte signature of `data`. */
  sign(data: Uint8Array): Buffer {
    return createHmac('sha256', this.key).update(data).digest();
  }

  /** The signature as 64 lowercase hex digits. */
  signHex(data: Uint8Array): string {
    return createHmac('sha256', this.key).update(data).digest('hex');
  }

  /** True when `signature` is the signature of `data` (constant-time comparison). */
  verify(data: Uint8Array, signature: Uint8Array): boolean {
    return signature.length === CHUNK_SIGNATURE_SIZE && timingSafeEqual(this.sign(data), signature);
  }
}
