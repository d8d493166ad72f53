// Errors of the management API. Every failure answers `{ error: { code, message, details? } }`;
// the typed errors of the store and engine (types.ts) map to 404 / 409 / 400, anything else is a
// 500 with a request id.

import type { z } from 'zod';

export type ErrorCode =
  | 'SPW_ERR_INVALID'
  | 'SPW_ERR_NOT_FOUND'
  | 'SPW_ERR_CONFLICT'
  | 'SPW_ERR_UNAUTHORIZED'
  | 'SPW_ERR_FORBIDDEN'
  | 'SPW_ERR_METHOD'
  | 'SPW_ERR_TOO_LARGE'
  | 'SPW_ERR_UNSUPPORTED_MEDIA'
  | 'SPW_ERR_INTERNAL';

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: ErrorCode | string,
    message: string,
    readonly details?: unknown,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

const TYPED: Record<string, number> = { SPW_ERR_NOT_FOUND: 404, SPW_ERR_CONFLICT: 409, SPW_ERR_INVALID: 400 };

/** The ApiError for a thrown value, or null when it is not one we know (then: 500). */
export function toApiError(err: unknown): ApiError | null {
  if (err instanceof ApiError) return err;
  // NotFoundError, ConflictError, InvalidInputError of types.ts (matched by code, so a copy of
  // the class from another module instance still maps).
  const code = (err as { code?: unknown } | null)?.code;
  if (err instanceof Error && typeof code === 'string' && code in TYPED) return new ApiError(TYPED[code]!, code, err.message);
  return null;
}

/** "spec.vcpus", "needs.tags[2]", or "(body)" for the whole document. */
export function issuePath(path: ReadonlyArray<PropertyKey>): string {
  let s = '';
  for (const p of path) s += typeof p === 'number' ? `[${p}]` : s ? `.${String(p)}` : String(p);
  return s;
}

/** A 400 naming every offending path and what is expected there. */
export function schemaError(what: string, error: z.ZodError): ApiError {
  const issues = error.issues.map((i) => {
    const where = issuePath(i.path);
    const base = { path: where || '(root)', message: i.message } as { path: string; message: string; expected?: unknown; keys?: string[] };
    if ('expected' in i && i.expected !== undefined) base.expected = i.expected;
    if (i.code === 'unrecognized_keys') base.keys = i.keys;
    if (i.code === 'invalid_value') base.expected = i.values;
    return base;
  });
  const text = issues.map((i) => `${i.path}: ${i.message}`).join('; ');
  return new ApiError(400, 'SPW_ERR_INVALID', `${what} is not valid: ${text}`, { issues });
}

/**
 * Where JSON.parse gave up, as { position, line, column, found }. V8's own message carries a
 * position only for some mistakes, so this scans the text with a small JSON grammar.
 */
export function locateJsonError(text: string): { position: number; line: number; column: number; found: string } {
  let i = 0;
  const fail = (): never => {
    throw i;
  };
  const ws = () => {
    while (i < text.length && ' \t\n\r'.includes(text[i]!)) i++;
  };
  const lit = (word: string) => {
    for (const ch of word) {
      if (text[i] !== ch) fail();
      i++;
    }
  };
  const str = () => {
    if (text[i] !== '"') fail();
    i++;
    for (;;) {
      if (i >= text.length) fail();
      const c = text.charCodeAt(i);
      if (c === 0x22) {
        i++;
        return;
      }
      if (c < 0x20) fail();
      if (c === 0x5c) {
        i++;
        const e = text[i];
        if (e === 'u') {
          for (let k = 1; k <= 4; k++) {
            if (!/[0-9a-fA-F]/.test(text[i + k] ?? '')) {
              i += k;
              fail();
            }
          }
          i += 5;
        } else if (e !== undefined && '"\\/bfnrt'.includes(e)) i++;
        else fail();
      } else i++;
    }
  };
  const num = () => {
    const m = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(i, i + 400));
    if (!m || m[0] === '-' || m[0] === '') fail();
    i += m![0].length;
  };
  const value = (depth: number): void => {
    if (depth > 1000) fail();
    ws();
    const c = text[i];
    if (c === '{') {
      i++;
      ws();
      if (text[i] === '}') return void i++;
      for (;;) {
        ws();
        str();
        ws();
        if (text[i] !== ':') fail();
        i++;
        value(depth + 1);
        ws();
        if (text[i] === ',') i++;
        else if (text[i] === '}') return void i++;
        else fail();
      }
    } else if (c === '[') {
      i++;
      ws();
      if (text[i] === ']') return void i++;
      for (;;) {
        value(depth + 1);
        ws();
        if (text[i] === ',') i++;
        else if (text[i] === ']') return void i++;
        else fail();
      }
    } else if (c === '"') str();
    else if (c === 't') lit('true');
    else if (c === 'f') lit('false');
    else if (c === 'n') lit('null');
    else num();
  };
  let pos = text.length;
  try {
    value(0);
    ws();
    if (i < text.length) pos = i;
  } catch (p) {
    pos = typeof p === 'number' ? p : i;
  }
  const before = text.slice(0, pos);
  const line = before.split('\n').length;
  const column = pos - (before.lastIndexOf('\n') + 1) + 1;
  const found = pos >= text.length ? 'the end of the body' : JSON.stringify(text.slice(pos, pos + 10));
  return { position: pos, line, column, found };
}
