// The control plane's store: openStore(url) gives the Store of ../types.ts on SQLite (a file
// path, `sqlite:PATH`, `sqlite::memory:`) or PostgreSQL (`postgres://…`, `postgresql://…`),
// with the schema migrated. See docs/control-db.md.

import { createHash } from 'node:crypto';

import type { Logger } from '../../log/logger.js';
import { migrate } from './schema.js';
import { openPostgres, openSqlite, type Sql } from './sql.js';
import { SqlStore } from './store.js';

export { CorruptDataError } from './errors.js';
export { MIGRATIONS, migrate, type Migration } from './schema.js';
export { isUniqueViolation, type Dialect, type Param, type Row, type Sql } from './sql.js';
export { FINISHED_STATES, SqlStore, UNFINISHED_STATES, type WorkflowPatch, type WorkflowStoreExtensions } from './store.js';

export interface OpenStoreOptions {
  log?: Logger;
  /** PostgreSQL connections in the pool (default 10). */
  poolSize?: number;
}

/** Which database a store URL names, and where. */
export function parseStoreUrl(url: string): { kind: 'sqlite'; file: string } | { kind: 'postgres'; url: string } {
  if (/^postgres(ql)?:\/\//i.test(url)) return { kind: 'postgres', url };
  let file = url;
  if (/^sqlite:/i.test(file)) {
    file = file.slice('sqlite:'.length);
    if (file.startsWith('//')) file = file.slice(2); // sqlite:///abs/path
  }
  if (file === '') throw new Error(`no database file in store URL ${JSON.stringify(url)}`);
  return { kind: 'sqlite', file };
}

/** Open (creating if needed) and migrate the store at `url`. */
export async function openStore(url: string, opts: OpenStoreOptions = {}): Promise<SqlStore> {
  const where = parseStoreUrl(url);
  const sql: Sql = where.kind === 'postgres' ? openPostgres(where.url, opts) : openSqlite(where.file);
  try {
    await migrate(sql);
  } catch (e) {
    await sql.close().catch(() => undefined);
    throw e;
  }
  return new SqlStore(sql);
}

/** The SHA-256 (lowercase hex) of a token's secret: the only form in which the store keeps it. */
export function hashTokenSecret(secret: string): string {
  return createHash('sha256').update(secret, 'utf8').digest('hex');
}
