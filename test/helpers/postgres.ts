// A real PostgreSQL for tests: initdb in a temp dir, the server on 127.0.0.1 and a free port
// (its UNIX socket in the same temp dir), stopped by its pid at the end. PostgreSQL refuses to
// run as root, so as root it runs as the `postgres` user (else `nobody`). When it cannot start,
// startPostgres throws with the reason: tests that need it fail, they are not skipped
// (scripts/setup.sh installs postgresql).

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { accessSync, chownSync, constants, existsSync, readdirSync, realpathSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import path from 'node:path';

import pg from 'pg';

import { freePort, tempDir } from './proc.js';

export interface Postgres {
  port: number;
  /** postgres://postgres@127.0.0.1:PORT/DB */
  url(db?: string): string;
  /** A fresh database (empty, or a copy of `template`); resolves with its URL. */
  createDatabase(prefix?: string, template?: string): Promise<string>;
  stop(): Promise<void>;
}

const HINT = 'PostgreSQL is needed by these tests and could not be started (scripts/setup.sh installs the postgresql package)';

function findBinDir(): string {
  const which = spawnSync('sh', ['-c', 'command -v initdb'], { encoding: 'utf8' });
  const onPath = which.status === 0 ? which.stdout.trim() : '';
  if (onPath) {
    const dir = path.dirname(realpathSync(onPath));
    if (existsSync(path.join(dir, 'postgres'))) return dir;
  }
  const base = '/usr/lib/postgresql';
  const versions = existsSync(base) ? readdirSync(base).filter((v) => existsSync(path.join(base, v, 'bin', 'initdb'))) : [];
  versions.sort((a, b) => Number(b) - Number(a));
  if (versions[0]) return path.join(base, versions[0], 'bin');
  throw new Error(`${HINT}: initdb was found neither on PATH nor under ${base}/*/bin`);
}

/** uid/gid to run the server as: ourselves, or (as root) postgres, else nobody. */
function serverUser(): { uid: number; gid: number } | null {
  if (typeof process.getuid !== 'function' || process.getuid() !== 0) return null;
  for (const name of ['postgres', 'nobody']) {
    const u = spawnSync('id', ['-u', name], { encoding: 'utf8' });
    const g = spawnSync('id', ['-g', name], { encoding: 'utf8' });
    if (u.status === 0 && g.status === 0) return { uid: Number(u.stdout.trim()), gid: Number(g.stdout.trim()) };
  }
  throw new Error(`${HINT}: running as root and there is neither a postgres nor a nobody user to run the server as`);
}

function runAs(cmd: string, args: string[], user: { uid: number; gid: number } | null): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C' }, ...(user ?? {}) });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', (e) => resolve({ code: -1, out: `${out}\n${e.message}` }));
    child.on('close', (code) => resolve({ code, out }));
  });
}

async function ready(url: string, child: ChildProcess, log: () => string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`${HINT}: the server exited (${child.exitCode ?? child.signalCode}):\n${log()}`);
    const c = new pg.Client({ connectionString: url, connectionTimeoutMillis: 1000 });
    try {
      await c.connect();
      await c.query('SELECT 1');
      return;
    } catch (e) {
      if (Date.now() > deadline) throw new Error(`${HINT}: no answer after ${timeoutMs} ms (${(e as Error).message}):\n${log()}`);
    } finally {
      await c.end().catch(() => undefined);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

export async function startPostgres(): Promise<Postgres> {
  const bin = findBinDir();
  const user = serverUser();
  const tmp = await tempDir('spw-pg-');
  if (user) chownSync(tmp.dir, user.uid, user.gid);
  const data = path.join(tmp.dir, 'data');
  const init = await runAs(path.join(bin, 'initdb'), ['-D', data, '-A', 'trust', '-U', 'postgres', '-N', '-E', 'UTF8', '--locale=C'], user);
  if (init.code !== 0) {
    await tmp.cleanup();
    throw new Error(`${HINT}: initdb failed (${init.code}):\n${init.out}`);
  }

  let lastErr: unknown;
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    // test settings: nothing here must survive a machine crash
    const args = ['-D', data, '-h', '127.0.0.1', '-p', String(port), '-k', tmp.dir, '-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off', '-c', 'max_connections=200'];
    const child = spawn(path.join(bin, 'postgres'), args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C' }, ...(user ?? {}) });
    let log = '';
    child.stdout?.on('data', (d: Buffer) => (log += d.toString()));
    child.stderr?.on('data', (d: Buffer) => (log += d.toString()));
    child.on('error', (e) => (log += `spawn failed: ${e.message}\n`));
    const exited = new Promise<void>((r) => child.once('exit', () => r()));
    // never leave a server behind, even when the test process dies
    const killOnExit = () => {
      if (child.pid && child.exitCode === null) child.kill('SIGKILL');
    };
    process.once('exit', killOnExit);
    const url = (db = 'postgres') => `postgres://postgres@127.0.0.1:${port}/${db}`;
    try {
      await ready(url(), child, () => log, 30_000);
    } catch (e) {
      lastErr = e;
      child.kill('SIGKILL');
      await exited;
      process.removeListener('exit', killOnExit);
      if (/could not bind|already in use/i.test(log)) continue; // the free port was taken meanwhile
      break;
    }
    let n = 0;
    let stopped: Promise<void> | null = null;
    return {
      port,
      url,
      async createDatabase(prefix = 't', template?: string) {
        const name = `${prefix}_${process.pid}_${++n}_${Date.now().toString(36)}`.toLowerCase().replace(/[^a-z0-9_]/g, '_');
        const c = new pg.Client({ connectionString: url() });
        await c.connect();
        try {
          // FILE_COPY: with fsync off, much faster than the default WAL_LOG copy
          await c.query(`CREATE DATABASE ${name}${template ? ` TEMPLATE ${template}` : ''} STRATEGY FILE_COPY`);
        } finally {
          await c.end();
        }
        return url(name);
      },
      stop() {
        stopped ??= (async () => {
          if (child.exitCode === null && child.signalCode === null) {
            child.kill('SIGINT'); // fast shutdown: disconnects clients
            const t = setTimeout(() => child.kill('SIGKILL'), 10_000);
            await exited;
            clearTimeout(t);
          }
          process.removeListener('exit', killOnExit);
          await tmp.cleanup();
        })();
        return stopped;
      },
    };
  }
  await tmp.cleanup();
  throw lastErr instanceof Error ? lastErr : new Error(`${HINT}: ${String(lastErr)}`);
}

/** A temp dir on tmpfs when there is one (/dev/shm): SQLite's fsync per commit costs nothing
 *  there, and what the tests check (kill -9 of a process, not of the machine) is the same. */
export async function fastTempDir(prefix: string): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  try {
    accessSync('/dev/shm', constants.W_OK);
    const dir = await mkdtemp(path.join('/dev/shm', prefix));
    return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
  } catch {
    return tempDir(prefix);
  }
}

export type DbKind = 'sqlite' | 'postgres';
export const DB_KINDS: readonly DbKind[] = ['sqlite', 'postgres'];

/** Fresh store URLs for tests that run on both databases: a new SQLite file in a temp dir, or a
 *  new database on one PostgreSQL server started on first use (copied from a template database
 *  that `prepare`, e.g. the store's migrations, ran on once). close() stops it all. */
export function testDatabases(prepare?: (url: string) => Promise<void>): { fresh(kind: DbKind): Promise<string>; close(): Promise<void> } {
  let server: Promise<{ pg: Postgres; template: string | undefined }> | null = null;
  let dir: Promise<{ dir: string; cleanup: () => Promise<void> }> | null = null;
  let n = 0;
  return {
    async fresh(kind) {
      if (kind === 'postgres') {
        server ??= (async () => {
          const pg = await startPostgres();
          if (!prepare) return { pg, template: undefined };
          const url = await pg.createDatabase('template');
          await prepare(url);
          return { pg, template: new URL(url).pathname.slice(1) };
        })();
        const { pg, template } = await server;
        return pg.createDatabase('spw', template);
      }
      dir ??= fastTempDir('spw-sqlite-');
      return `sqlite:${path.join((await dir).dir, `store-${++n}.db`)}`;
    },
    async close() {
      const [s, d] = await Promise.allSettled([server, dir]);
      if (s.status === 'fulfilled' && s.value) await s.value.pg.stop();
      if (d.status === 'fulfilled' && d.value) await d.value.cleanup();
    },
  };
}
