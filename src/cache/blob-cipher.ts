// Sealing of one cache blob: AES-256-GCM with a fresh random 96-bit nonce per blob, and the
// associated data binding the ciphertext to its family and content id. A blob moved under
// another id or family (a swapped slot, a rewritten index) fails authentication, as does a
// torn or tampered one: the caller treats every failure as a miss and never serves the bytes.

import { createCipheriv, createDecipheriv, createSecretKey, randomFillSync, type KeyObject } from 'node:crypto';

export const NONCE_SIZE = 12;
export const TAG_SIZE = 16;

const AAD_LABEL = Buffer.from('spillway-cache-blob-v1', 'utf8');

export interface SealedBlob {
  readonly nonce: Buffer;
  readonly ciphertext: Buffer;
  readonly tag: Buffer;
}

/** A cipher key as a KeyObject; the raw bytes given are not kept (callers may wipe them). */
export function cipherKey(raw: Uint8Array): KeyObject {
  return createSecretKey(Buffer.from(raw));
}

/** label | u16 family length | family (UTF-8) | u8 id length | id: unambiguous by construction. */
export function blobAad(family: string, id: Uint8Array): Buffer {
  const fam = Buffer.from(family, 'utf8');
  const aad = Buffer.allocUnsafe(AAD_LABEL.length + 2 + fam.length + 1 + id.length);
  let o = AAD_LABEL.copy(aad, 0);
  o = aad.writeUInt16BE(fam.length, o);
  o += fam.copy(aad, o);
  o = aad.writeUInt8(id.length, o);
  Buffer.from(id.buffer, id.byteOffset, id.length).copy(aad, o);
  return aad;
}

export function sealBlob(key: KeyObject, aad: Buffer, plaintext: Uint8Array): SealedBlob {
  const nonce = randomFillSync(Buffer.allocUnsafe(NONCE_SIZE));
  const c = createCipheriv('aes-256-gcm', key, nonce, { authTagLength: TAG_SIZE });
  c.setAAD(aad);
  const head = c.update(plaintext);
  const tail = c.final();
  const ciphertext = tail.length === 0 ? head : Buffer.concat([head, tail]);
  return { nonce, ciphertext, tag: c.getAuthTag() };
}

/** The plaintext, or null when authentication fails (wrong key, AAD, nonce, tag or bytes). */
export function openBlob(key: KeyObject, aad: Buffer, nonce: Uint8Array, ciphertext: Uint8Array, tag: Uint8Array): Buffer | null {
  const d = createDecipheriv('aes-256-gcm', key, nonce, { authTagLength: TAG_SIZE });
  d.setAAD(aad);
  d.setAuthTag(tag);
  const head = d.update(ciphertext);
  try {
    const tail = d.final();
    return tail.length === 0 ? head : Buffer.concat([head, tail]);
  } catch {
    head.fill(0); // unauthenticated plaintext never leaves this function
    return null;
  }
}
