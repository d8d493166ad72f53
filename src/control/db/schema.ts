// The control plane's schema, written once for SQLite and PostgreSQL: numbered migrations,
// recorded in `schema_migrations`, applied in order at open inside one transaction (under an
// advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite, so two services opening the same
// database at once apply each migration once). Portable types only: TEXT, INTEGER, BIGINT,
// DOUBLE PRECISION; JSON is TEXT; booleans are INTEGER 0/1; times are ISO-8601 TEXT (the lease
// expiry is BIGINT milliseconds of the database's clock).

import type { Dialect, Sql } from './sql.js';

export interface Migration {
  version: number;
  name: string;
  up(d: Dialect): string[];
}

export const MIGRATIONS: readonly Migration[] = [
  {
    version: 1,
    name: 'inventory, workflows, steps, events, audit, tokens',
    up: (d) => [
      `CREATE TABLE sites (
        name TEXT PRIMARY KEY, kind TEXT NOT NULL, region TEXT NOT NULL, tags TEXT NOT NULL,
        created_at TEXT NOT NULL)`,
      `CREATE TABLE edges (
        name TEXT PRIMARY KEY, site TEXT NOT NULL, control TEXT NOT NULL, nbd TEXT, link TEXT,
        cache_bytes BIGINT, created_at TEXT NOT NULL)`,
      `CREATE INDEX edges_site ON edges (site)`,
      `CREATE TABLE hosts (
        name TEXT PRIMARY KEY, site TEXT NOT NULL, provider TEXT NOT NULL, vcpus INTEGER NOT NULL,
        ram_mib INTEGER NOT NULL, iops INTEGER NOT NULL, price_per_hour DOUBLE PRECISION NOT NULL,
        licences TEXT NOT NULL, tags TEXT NOT NULL, ha INTEGER NOT NULL, edge TEXT NOT NULL,
        state TEXT NOT NULL, created_at TEXT NOT NULL)`,
      `CREATE INDEX hosts_site ON hosts (site)`,
      `CREATE TABLE instances (
        name TEXT PRIMARY KEY, kind TEXT NOT NULL, origin TEXT NOT NULL, host TEXT,
        state TEXT NOT NULL, placement TEXT NOT NULL, spec TEXT NOT NULL, needs TEXT NOT NULL,
        identity TEXT NOT NULL, clone_of TEXT, created_at TEXT NOT NULL)`,
      `CREATE TABLE volumes (
        name TEXT PRIMARY KEY, instance TEXT NOT NULL, path TEXT NOT NULL,
        size_bytes BIGINT NOT NULL, family TEXT NOT NULL, policy TEXT NOT NULL,
        hydrated_path TEXT, created_at TEXT NOT NULL)`,
      `CREATE INDEX volumes_instance ON volumes (instance)`,
      `CREATE TABLE profiles (
        name TEXT PRIMARY KEY, family TEXT NOT NULL, volume TEXT NOT NULL,
        chunks INTEGER NOT NULL, created_at TEXT NOT NULL)`,
      // finished = 1 once succeeded or cancelled; event_seq = the last event's seq
      `CREATE TABLE workflows (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL, input TEXT NOT NULL,
        state TEXT NOT NULL, step INTEGER NOT NULL, outputs TEXT NOT NULL, error TEXT,
        actor TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
        finished INTEGER NOT NULL, event_seq INTEGER NOT NULL)`,
      // one unfinished workflow per target, enforced by the database itself
      `CREATE UNIQUE INDEX workflows_one_unfinished_per_target ON workflows (target) WHERE finished = 0`,
      `CREATE INDEX workflows_state ON workflows (state)`,
      `CREATE INDEX workflows_created ON workflows (created_at)`,
      `CREATE TABLE steps (
        workflow TEXT NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
        attempts INTEGER NOT NULL, output TEXT, error TEXT, started_at TEXT NOT NULL,
        ended_at TEXT, PRIMARY KEY (workflow, idx))`,
      `CREATE TABLE events (
        workflow TEXT NOT NULL, seq INTEGER NOT NULL, at TEXT NOT NULL, type TEXT NOT NULL,
        step TEXT, fraction DOUBLE PRECISION, message TEXT NOT NULL, data TEXT,
        PRIMARY KEY (workflow, seq))`,
      `CREATE TABLE audit (
        id ${d.autoId}, at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        target TEXT NOT NULL, detail TEXT NOT NULL)`,
      `CREATE INDEX audit_target ON audit (target, id)`,
      `CREATE TABLE tokens (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL,
        secret_sha256 TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL)`,
    ],
  },
  {
    version: 2,
    name: 'workflow leases (one service drives a workflow at a time)',
    up: () => [`ALTER TABLE workflows ADD COLUMN lease_owner TEXT`, `ALTER TABLE workflows ADD COLUMN lease_expires BIGINT`],
  },
];

/** An arbitrary constant: the advisory lock that serialises migrations on PostgreSQL. */
const MIGRATION_LOCK = 0x5350_5744; // "SPWD"

/** Apply the migrations the database lacks, in order, in one transaction. Idempotent.
 *  Resolves with the versions applied now. Refuses a database newer than this build. */
export async function migrate(sql: Sql, migrations: readonly Migration[] = MIGRATIONS): Promise<number[]> {
  return sql.tx(async (db) => {
    if (db.dialect.name === 'postgres') await db.all('SELECT pg_advisory_xact_lock(?)', [MIGRATION_LOCK]);
    await db.exec('CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)');
    const rows = await db.all<{ version: number | string }>('SELECT version FROM schema_migrations');
    const have = new Set(rows.map((r) => Number(r.version)));
    const newest = Math.max(0, ...have);
    const known = Math.max(0, ...migrations.map((m) => m.version));
    if (newest > known) throw new Error(`the database's schema is version ${newest}, newer than this build knows (${known}): upgrade Spillway`);
    const applied: number[] = [];
    for (const m of [...migrations].sort((a, b) => a.version - b.version)) {
      if (have.has(m.version)) continue;
      for (const stmt of m.up(db.dialect)) await db.exec(stmt);
      await db.exec('INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)', [m.version, m.name, new Date().toISOString()]);
      applied.push(m.version);
    }
    return applied;
  });
}
