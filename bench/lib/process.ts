// Processes for benches: servers started in the background and stopped by pid, and commands run
// to completion with their wall-clock time. Every process is registered with cleanup.ts while it
// runs, so an error or Ctrl-C never leaves one behind.

import { spawn, type ChildProcess } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import { onCleanup } from './cleanup.js';

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** Keep only the last `max` characters of a stream (enough for an error message). */
class Tail {
  private text = '';
  constructor(private readonly max = 16384) {}
  push(chunk: Buffer): void {
    this.text += chunk.toString();
    if (this.text.length > this.max * 2) this.text = this.text.slice(-this.max);
  }
  toString(): string {
    return this.text.slice(-this.max);
  }
}

function exitPromise(child: ChildProcess): Promise<ExitInfo> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) {
      resolve({ code: child.exitCode, signal: child.signalCode });
      return;
    }
    child.once('exit', (code, signal) => resolve({ code, signal }));
    // A spawn failure (ENOENT) emits 'error' and possibly no 'exit'.
    child.once('error', () => resolve({ code: child.exitCode ?? -1, signal: null }));
  });
}

function alive(child: ChildProcess): boolean {
  return child.exitCode === null && child.signalCode === null && child.pid !== undefined;
}

/** Send `signal` to the pid, then SIGKILL after `graceMs`; resolves when it has exited. */
async function stopChild(child: ChildProcess, exited: Promise<ExitInfo>, signal: NodeJS.Signals, graceMs: number): Promise<ExitInfo> {
  if (!alive(child) || child.pid === undefined) return exited;
  const pid = child.pid;
  try {
    process.kill(pid, signal);
  } catch {
    return exited;
  }
  const timer = setTimeout(() => {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Already gone.
    }
  }, graceMs);
  try {
    return await exited;
  } finally {
    clearTimeout(timer);
  }
}

export interface Background {
  name: string;
  /** 0 when the spawn failed (the reason is in stderr()). */
  pid: number;
  /** Resolves when the process exits, for whatever reason. */
  exited: Promise<ExitInfo>;
  stdout: () => string;
  stderr: () => string;
  /** SIGTERM by pid, SIGKILL after `graceMs`; idempotent. */
  stop: (graceMs?: number) => Promise<ExitInfo>;
}

/** Start a long-running process (a server). Its output is kept (tail) for error messages. */
export function startBackground(name: string, cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; cwd?: string } = {}): Background {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env, cwd: opts.cwd });
  const out = new Tail();
  const err = new Tail();
  child.stdout?.on('data', (d: Buffer) => out.push(d));
  child.stderr?.on('data', (d: Buffer) => err.push(d));
  // A spawn failure (ENOENT, EACCES) arrives as 'error'; keep it where stderr is reported.
  child.on('error', (e) => err.push(Buffer.from(`spawn error: ${e.message}\n`)));
  const exited = exitPromise(child);
  const unregister = onCleanup({
    label: `stop ${name} (pid ${child.pid ?? '?'})`,
    async: async () => {
      await stopChild(child, exited, 'SIGTERM', 5000);
    },
    sync: () => {
      if (alive(child) && child.pid !== undefined) process.kill(child.pid, 'SIGKILL');
    },
  });
  void exited.then(unregister);
  return {
    name,
    pid: child.pid ?? 0,
    exited,
    stdout: () => out.toString(),
    stderr: () => err.toString(),
    stop: (graceMs = 5000) => stopChild(child, exited, 'SIGTERM', graceMs),
  };
}

export interface RunResult extends ExitInfo {
  stdout: string;
  stderr: string;
  /** Wall-clock seconds from spawn to exit. */
  seconds: number;
}

export class CommandError extends Error {
  readonly code = 'SPW_ERR_BENCH_COMMAND';
  constructor(
    message: string,
    readonly result: RunResult,
  ) {
    super(message);
    this.name = 'CommandError';
  }
}

/**
 * Run a command to completion and time it (wall clock, spawn to exit, so process start-up is
 * included). Rejects with CommandError on a non-zero exit unless `allowFail`, and kills the
 * command after `timeoutMs`.
 */
export function runCommand(cmd: string, args: string[], opts: { allowFail?: boolean; timeoutMs?: number; env?: NodeJS.ProcessEnv; cwd?: string } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const started = process.hrtime.bigint();
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env, cwd: opts.cwd });
    const exited = exitPromise(child);
    const unregister = onCleanup({
      label: `stop ${cmd} (pid ${child.pid ?? '?'})`,
      async: async () => {
        await stopChild(child, exited, 'SIGTERM', 2000);
      },
      sync: () => {
        if (alive(child) && child.pid !== undefined) process.kill(child.pid, 'SIGKILL');
      },
    });
    let stdout = '';
    const stderr = new Tail(65536);
    let spawnError: Error | null = null;
    child.stdout?.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr?.on('data', (d: Buffer) => stderr.push(d));
    child.on('error', (e) => (spawnError = e));
    let timedOut = false;
    const timer =
      opts.timeoutMs === undefined
        ? null
        : setTimeout(() => {
            timedOut = true;
            void stopChild(child, exited, 'SIGTERM', 2000);
          }, opts.timeoutMs);
    child.on('close', (code, signal) => {
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      if (timer) clearTimeout(timer);
      unregister();
      const result: RunResult = { code, signal, stdout, stderr: stderr.toString(), seconds };
      const line = `${cmd} ${args.join(' ')}`;
      if (spawnError) reject(new CommandError(`${line}: ${(spawnError as Error).message}`, result));
      else if (timedOut) reject(new CommandError(`${line}: timed out after ${opts.timeoutMs} ms\n${result.stderr}`, result));
      else if (code !== 0 && !opts.allowFail) reject(new CommandError(`${line}: exited ${code ?? signal}\n${result.stderr}`, result));
      else resolve(result);
    });
  });
}

/** True when `cmd` is an executable on PATH. */
export async function haveCommand(cmd: string): Promise<boolean> {
  const r = await runCommand('sh', ['-c', 'command -v "$0"', cmd], { allowFail: true });
  return r.code === 0;
}

/** A TCP port that was free a moment ago on `host`. */
export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, host, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/**
 * Resolve once something accepts TCP connections on host:port. Rejects early, with its stderr,
 * if `proc` exits first, and after `timeoutMs` otherwise.
 */
export async function waitForListen(port: number, host: string, proc: Background, timeoutMs = 15000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let exited: ExitInfo | null = null;
  void proc.exited.then((e) => (exited = e));
  for (;;) {
    if (exited) {
      const e: ExitInfo = exited;
      throw new Error(`${proc.name} exited (${e.code ?? e.signal}) before listening on ${host}:${port}\n${proc.stderr()}`);
    }
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, host);
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`${proc.name}: nothing listening on ${host}:${port} after ${timeoutMs} ms\n${proc.stderr()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

let clockTicks: number | null = null;

/**
 * CPU time (user + system, all threads) a live process has used so far, in seconds, from
 * /proc/PID/stat (Linux). Resolution is one clock tick (usually 10 ms). Less sensitive to other
 * load on the machine than wall-clock throughput: compare it per GiB or per I/O.
 */
export async function processCpuSeconds(pid: number): Promise<number> {
  if (clockTicks === null) {
    const r = await runCommand('getconf', ['CLK_TCK'], { allowFail: true }).catch(() => null);
    const n = Number(r?.stdout.trim());
    clockTicks = Number.isInteger(n) && n > 0 ? n : 100;
  }
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  // The command name (field 2) is in parentheses and may contain spaces: split after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
  const utime = Number(fields[11]);
  const stime = Number(fields[12]);
  if (!Number.isFinite(utime) || !Number.isFinite(stime)) throw new Error(`cannot parse /proc/${pid}/stat`);
  return (utime + stime) / clockTicks;
}
