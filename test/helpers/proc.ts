// Test helpers for real processes: temp dirs, free ports, spawning our CLI and peers, and
// stopping them by pid. Every process a test starts is stopped by that test.

import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CLI = path.join(ROOT, 'dist', 'cli.js');

export async function tempDir(prefix = 'spw-test-'): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), prefix));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/** Resolve once something accepts TCP connections on host:port (or a UNIX socket path). */
export async function waitForListen(target: { port: number; host?: string } | { path: string }, timeoutMs = 15000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = 'path' in target ? net.connect(target.path) : net.connect(target.port, target.host ?? '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listening on ${JSON.stringify(target)} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export interface Proc {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  /** SIGTERM, then SIGKILL after a grace period; resolves with the exit code/signal. */
  stop: (signal?: NodeJS.Signals) => Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

export function startProc(cmd: string, args: string[], opts: SpawnOptions = {}): Proc {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  let out = '';
  let err = '';
  child.on('error', (e) => (err += `spawn ${cmd} failed: ${e.message}\n`));
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.once('error', () => resolve({ code: -1, signal: null }));
  });
  const stop = async (signal: NodeJS.Signals = 'SIGTERM') => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill(signal);
      const t = setTimeout(() => child.kill('SIGKILL'), 5000);
      const r = await exited;
      clearTimeout(t);
      return r;
    }
    return exited;
  };
  return { child, stdout: () => out, stderr: () => err, stop, exited };
}

/** Run a command to completion; rejects with its output when it exits non-zero. */
export function run(cmd: string, args: string[], opts: SpawnOptions & { input?: string | Buffer; allowFail?: boolean } = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], ...opts });
    let stdout = '';
    let stderr = '';
    child.stdout?.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      const r = { code: code ?? -1, stdout, stderr };
      if (code !== 0 && !opts.allowFail) reject(new Error(`${cmd} ${args.join(' ')} exited ${code}\n${stdout}\n${stderr}`));
      else resolve(r);
    });
    if (opts.input !== undefined) child.stdin?.end(opts.input);
    else child.stdin?.end();
  });
}

export interface Served extends Proc {
  /** nbd://127.0.0.1:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH */
  uri: string;
  port?: number;
  socket?: string;
}

/** Wait until `target` listens, failing at once (with its stderr) if the process exits first. */
export async function waitForProc(p: Proc, target: { port: number; host?: string } | { path: string }, timeoutMs = 15000): Promise<void> {
  const early = p.exited.then((r) => {
    throw new Error(`process exited (code ${r.code}, signal ${r.signal}) before listening on ${JSON.stringify(target)}\n${p.stderr()}`);
  });
  try {
    await Promise.race([waitForListen(target, timeoutMs), early]);
  } catch (e) {
    await p.stop();
    throw new Error(`${(e as Error).message}\n${p.stderr()}`);
  } finally {
    early.catch(() => undefined);
  }
}

/** Start `spillway serve` from dist/ on a free TCP port (or a socket if `socket` is given). */
export async function startServe(image: string, extra: string[] = [], opts: { socket?: string; exportName?: string } = {}): Promise<Served> {
  const exportName = opts.exportName ?? '';
  const nameArgs = exportName ? ['--export', exportName] : [];
  if (opts.socket) {
    const p = startProc(process.execPath, [CLI, 'serve', image, '--socket', opts.socket, ...nameArgs, ...extra]);
    await waitForProc(p, { path: opts.socket });
    return { ...p, socket: opts.socket, uri: `nbd+unix:///${exportName}?socket=${opts.socket}` };
  }
  const port = await freePort();
  const p = startProc(process.execPath, [CLI, 'serve', image, '--port', String(port), '--bind', '127.0.0.1', ...nameArgs, ...extra]);
  await waitForProc(p, { port });
  return { ...p, port, uri: `nbd://127.0.0.1:${port}/${exportName}` };
}

/** True when an executable is on PATH (tests that need a peer fail loudly if it is missing). */
export async function haveCommand(cmd: string): Promise<boolean> {
  const r = await run('sh', ['-c', `command -v ${cmd}`], { allowFail: true });
  return r.code === 0;
}
