// API tokens: `spw_` + 32 random bytes in base64url. The store keeps only the SHA-256 (hex) of
// the whole token, so a leaked database does not leak credentials; the secret is shown once, when
// the token is created. Roles: viewer (GET only) and operator (everything).

import { createHash, randomBytes } from 'node:crypto';

import type { Role, Store, TokenRecord } from '../types.js';
import { ApiError } from './errors.js';

export const TOKEN_PREFIX = 'spw_';
const TOKEN_RE = /^spw_[A-Za-z0-9_-]{43}$/;

export function hashToken(secret: string): string {
  return createHash('sha256').update(secret, 'utf8').digest('hex');
}

/** A fresh token: its id (public, for listing and deleting), its secret and the secret's hash. */
export function newToken(): { id: string; secret: string; secretHash: string } {
  const secret = TOKEN_PREFIX + randomBytes(32).toString('base64url');
  return { id: 'tok_' + randomBytes(6).toString('hex'), secret, secretHash: hashToken(secret) };
}

/** Create a token in the store; the only place its secret is ever seen. */
export async function createToken(store: Store, name: string, role: Role): Promise<TokenRecord & { secret: string }> {
  const t = newToken();
  const rec = await store.createToken({ id: t.id, name, role, secretHash: t.secretHash });
  return { ...rec, secret: t.secret };
}

/**
 * Mint a token without going through the API (which needs one): how the service's CLI makes the
 * first operator token. Audited with actor "bootstrap".
 */
export async function bootstrapToken(store: Store, name: string, role: Role = 'operator'): Promise<TokenRecord & { secret: string }> {
  const t = await createToken(store, name, role);
  await store.audit({ actor: 'bootstrap', action: 'token.create', target: t.id, detail: { name, role } });
  return t;
}

const HOW_TO_GET =
  'an operator creates one with `spillway token create NAME --role viewer|operator`; the service writes the first operator token to STATE/operator.token when it first starts (docs/api.md, "Tokens")';

/** The token of a request, or a 401 ApiError saying what is wrong and how to get one. */
export async function authenticate(store: Store, header: string | undefined): Promise<TokenRecord> {
  const challenge = { 'www-authenticate': 'Bearer realm="spillway"' };
  if (!header) throw new ApiError(401, 'SPW_ERR_UNAUTHORIZED', `missing token: send "Authorization: Bearer spw_..." (${HOW_TO_GET})`, undefined, challenge);
  const m = /^Bearer\s+(\S+)\s*$/i.exec(header);
  if (!m) throw new ApiError(401, 'SPW_ERR_UNAUTHORIZED', `the Authorization header is not "Bearer TOKEN"`, undefined, { 'www-authenticate': 'Bearer realm="spillway", error="invalid_request"' });
  const secret = m[1]!;
  const rec = TOKEN_RE.test(secret) ? await store.findToken(hashToken(secret)) : null;
  if (!rec) throw new ApiError(401, 'SPW_ERR_UNAUTHORIZED', `the token is not valid (unknown, deleted or mistyped; ${HOW_TO_GET})`, undefined, { 'www-authenticate': 'Bearer realm="spillway", error="invalid_token"' });
  return rec;
}

/** 403 unless `token` may do what needs `need`. */
export function authorize(token: TokenRecord, need: Role, what: string): void {
  if (need === 'operator' && token.role !== 'operator') {
    throw new ApiError(403, 'SPW_ERR_FORBIDDEN', `token "${token.name}" has role viewer, which may only read; ${what} needs an operator token`);
  }
}
