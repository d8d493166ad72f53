// The NBD servers benches compare: ours and two peers nobody here wrote, each serving a raw file
// on 127.0.0.1 with its usual defaults. Started in the foreground and stopped by pid.

import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort, haveCommand, runCommand, startBackground, waitForListen, type Background } from './process.js';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const SPILLWAY_CLI = path.join(REPO_ROOT, 'dist', 'cli.js');

export const NBD_SERVER_KINDS = ['spillway', 'qemu-nbd', 'nbdkit'] as const;
export type NbdServerKind = (typeof NBD_SERVER_KINDS)[number];

export function isNbdServerKind(s: string): s is NbdServerKind {
  return (NBD_SERVER_KINDS as readonly string[]).includes(s);
}

/** Where each server comes from; only spillway's can be changed (to compare another build). */
export interface ServerSource {
  /** Path of spillway's cli.js (default dist/cli.js of this checkout). */
  spillwayCli?: string;
}

interface ServerSpec {
  /** Command and arguments serving `file` on host:port (export name ""). */
  command: (file: string, host: string, port: number, extra: readonly string[], src: ServerSource) => [string, string[]];
  /** How to print its version. */
  version: (src: ServerSource) => string[];
  /** What a missing executable means for the operator. */
  missing: (src: ServerSource) => string;
}

export const NBD_SERVERS: Record<NbdServerKind, ServerSpec> = {
  spillway: {
    command: (file, host, port, extra, src) => [process.execPath, [src.spillwayCli ?? SPILLWAY_CLI, 'serve', file, '--port', String(port), '--bind', host, ...extra]],
    version: (src) => [process.execPath, src.spillwayCli ?? SPILLWAY_CLI, '--version'],
    missing: (src) => `${src.spillwayCli ?? (path.relative(process.cwd(), SPILLWAY_CLI) || SPILLWAY_CLI)} is missing: run \`npm run build\` first`,
  },
  // qemu-nbd's defaults, spelled out: cache=writeback (page cache; a flush is an fdatasync) and
  // aio=threads. It allows one client at a time (--shared=1) and does not advertise multi-conn
  // on a writable export, so nbdcopy uses a single connection with it.
  'qemu-nbd': {
    command: (file, host, port, extra) => ['qemu-nbd', ['-f', 'raw', '-x', '', '-b', host, '-p', String(port), '-t', '--cache=writeback', '--aio=threads', ...extra, file]],
    version: () => ['qemu-nbd', '--version'],
    missing: () => 'qemu-nbd is missing: apt-get install qemu-utils',
  },
  // nbdkit's file plugin with its defaults (page cache; flush is fdatasync; 16 worker threads;
  // advertises multi-conn). --exit-with-parent is only a safety net if the bench is SIGKILLed.
  nbdkit: {
    command: (file, host, port, extra) => ['nbdkit', ['-f', '--exit-with-parent', '-i', host, '-p', String(port), ...extra, 'file', file]],
    version: () => ['nbdkit', '--version'],
    missing: () => 'nbdkit is missing: apt-get install nbdkit',
  },
};

export interface RunningNbdServer {
  kind: NbdServerKind;
  uri: string;
  port: number;
  proc: Background;
  /** The exact command line, for reports. */
  commandLine: string;
  stop: () => Promise<void>;
}

/** Throws with an operator-facing message when a server cannot be started on this machine. */
export async function checkNbdServerAvailable(kind: NbdServerKind, src: ServerSource = {}): Promise<void> {
  const spec = NBD_SERVERS[kind];
  const ok = kind === 'spillway' ? existsSync(src.spillwayCli ?? SPILLWAY_CLI) : await haveCommand(kind);
  if (!ok) throw new Error(spec.missing(src));
}

/** Start `kind` serving `file` on a free port of 127.0.0.1 and wait until it accepts connections. */
export async function startNbdServer(kind: NbdServerKind, file: string, opts: ServerSource & { host?: string; extraArgs?: readonly string[] } = {}): Promise<RunningNbdServer> {
  const host = opts.host ?? '127.0.0.1';
  const port = await freePort(host);
  const [cmd, args] = NBD_SERVERS[kind].command(file, host, port, opts.extraArgs ?? [], opts);
  const proc = startBackground(kind, cmd, args);
  try {
    await waitForListen(port, host, proc);
  } catch (e) {
    await proc.stop();
    throw e;
  }
  return {
    kind,
    uri: `nbd://${host}:${port}/`,
    port,
    proc,
    commandLine: [cmd, ...args].map((a) => (a === '' ? "''" : a)).join(' '),
    stop: async () => {
      const r = await proc.stop();
      // Exiting on SIGTERM is the expected end; anything else is worth a word.
      if (r.signal !== 'SIGTERM' && r.code !== 0 && r.code !== 143) {
        console.error(`warning: ${kind} (pid ${proc.pid}) ended with ${r.code ?? r.signal}\n${proc.stderr()}`);
      }
    },
  };
}

export interface ExportInfo {
  protocol: string | null;
  structuredReplies: boolean | null;
  canMultiConn: boolean | null;
  canFlush: boolean | null;
  canFua: boolean | null;
  blockSizePreferred: number | null;
  blockSizeMaximum: number | null;
  size: number | null;
}

/** What the server advertises for its default export (`nbdinfo --json --no-content`). */
export async function probeExport(uri: string): Promise<ExportInfo> {
  const r = await runCommand('nbdinfo', ['--json', '--no-content', uri], { timeoutMs: 30000 });
  const root = JSON.parse(r.stdout) as Record<string, unknown>;
  const exports = Array.isArray(root['exports']) ? (root['exports'] as Record<string, unknown>[]) : [];
  const e = exports[0] ?? {};
  const bool = (v: unknown) => (typeof v === 'boolean' ? v : null);
  const int = (v: unknown) => (typeof v === 'number' ? v : null);
  return {
    protocol: typeof root['protocol'] === 'string' ? root['protocol'] : null,
    structuredReplies: bool(root['structured']),
    canMultiConn: bool(e['can_multi_conn']),
    canFlush: bool(e['can_flush']),
    canFua: bool(e['can_fua']),
    blockSizePreferred: int(e['block_size_preferred']),
    blockSizeMaximum: int(e['block_size_maximum']),
    size: int(e['export-size']),
  };
}
