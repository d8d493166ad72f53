// QemuVm: one QEMU process (TCG) driven over QMP, with its serial console.
//
// Everything about a VM lives in its state directory:
//   spec.json     the QemuVmSpec it was started with (attach() reads it)
//   qemu.pid      written by QEMU (-pidfile) and removed by it on a clean exit
//   qmp.sock      QMP (one client at a time)
//   console.sock  the serial console (one client at a time); console.log has all its output
//                 since the last start (the one before is console.log.prev)
//   qemu.log      QEMU's own stdout and stderr
// QEMU runs in its own session (setsid) with stdio on qemu.log, not as a child that dies with
// us: the management service can be killed (even with SIGKILL) and attach() to the VM later.
// Nothing stops a VM but stop() or kill() (or the guest).

import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { mkdir, readFile, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';

import { SerialConsole, type ConsoleExecOptions, type ConsoleExecResult, type ConsoleMatch, type ConsoleWaitOptions } from './console.js';
import { ComputeError, missingTool } from './errors.js';
import { QmpClient, type QmpExecuteOptions } from './qmp.js';

const execFileP = promisify(execFile);

export interface QemuDiskSpec {
  /** A QEMU block URI: nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH (give this or file). */
  uri?: string;
  /** A local image file (give this or uri). */
  file?: string;
  /** Image format (only raw: the edges serve raw block devices). */
  format?: 'raw';
  readOnly?: boolean;
  /**
   * QEMU cache mode (default none: O_DIRECT, every completed guest write has reached the file or
   * the server). Files on tmpfs need writeback (tmpfs has no O_DIRECT).
   */
  cache?: 'none' | 'writeback' | 'writethrough' | 'directsync' | 'unsafe';
}

/** How to run one VM. The first five fields after dir match the control plane's VmSpec. */
export interface QemuVmSpec {
  /** 1-63 of [A-Za-z0-9_.-], starting with a letter or digit. */
  name: string;
  /** The state directory (created if missing). Socket paths in it must fit 107 bytes. */
  dir: string;
  kernel: string;
  initrd: string;
  /** Kernel command line, e.g. 'console=ttyS0 root=/dev/vda rw init=/init panic=-1'. */
  append: string;
  memoryMiB: number;
  vcpus: number;
  /** The NIC's MAC address, e.g. 52:54:00:12:34:56 (keep it across migration). */
  mac: string;
  /** Virtio disks in order (/dev/vda, /dev/vdb, ...); the first is the root disk. */
  disks: QemuDiskSpec[];
  /** A NoCloud ISO (config-drive.ts), attached read-only as the virtio disk after `disks`. */
  configDrive?: string;
  /** Wait for an incoming migration: 'defer' (then migrateIncoming(uri)) or a URI like tcp:HOST:PORT. */
  incoming?: string;
  /**
   * 'user' (default): QEMU user-mode networking (slirp; the guest can reach out, nothing reaches
   * in) on a virtio-net NIC with `mac`. 'none': no NIC. Network namespaces and taps are not
   * done here (see docs/vm-images.md).
   */
  network?: 'user' | 'none';
  /** Appended to QEMU's arguments as they are. */
  extraArgs?: string[];
  /** Default qemu-system-x86_64 from PATH. */
  qemuBinary?: string;
}

export const QEMU_STATE_FILES = {
  spec: 'spec.json',
  pid: 'qemu.pid',
  qmp: 'qmp.sock',
  console: 'console.sock',
  consoleLog: 'console.log',
  log: 'qemu.log',
} as const;

export interface QemuVmPaths {
  dir: string;
  spec: string;
  pid: string;
  qmp: string;
  console: string;
  consoleLog: string;
  log: string;
}

export function qemuVmPaths(dir: string): QemuVmPaths {
  const d = path.resolve(dir);
  const p = (f: string) => path.join(d, f);
  return {
    dir: d,
    spec: p(QEMU_STATE_FILES.spec),
    pid: p(QEMU_STATE_FILES.pid),
    qmp: p(QEMU_STATE_FILES.qmp),
    console: p(QEMU_STATE_FILES.console),
    consoleLog: p(QEMU_STATE_FILES.consoleLog),
    log: p(QEMU_STATE_FILES.log),
  };
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
const MAC = /^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$/i;
/** sun_path is 108 bytes with the terminating NUL. */
const MAX_SOCKET_PATH = 107;
/** /proc/PID/stat counts CPU time in USER_HZ ticks, 100 per second on Linux. */
const USER_HZ = 100;

function specError(msg: string): ComputeError {
  return new ComputeError('SPW_ERR_VM_SPEC', `VM spec: ${msg}`);
}

/** Throws SPW_ERR_VM_SPEC with what to fix. */
export function validateVmSpec(spec: QemuVmSpec): void {
  if (!NAME.test(spec.name)) throw specError(`name ${JSON.stringify(spec.name)} must be 1-63 of [A-Za-z0-9_.-], starting with a letter or digit`);
  if (!MAC.test(spec.mac)) throw specError(`mac ${JSON.stringify(spec.mac)} must look like 52:54:00:12:34:56`);
  if (!Number.isInteger(spec.memoryMiB) || spec.memoryMiB < 16) throw specError(`memoryMiB must be an integer >= 16 (got ${spec.memoryMiB})`);
  if (!Number.isInteger(spec.vcpus) || spec.vcpus < 1 || spec.vcpus > 255) throw specError(`vcpus must be an integer in 1..255 (got ${spec.vcpus})`);
  if (spec.disks.length === 0) throw specError('at least one disk (the root disk) is needed');
  for (const [i, d] of spec.disks.entries()) {
    if ((d.uri === undefined) === (d.file === undefined)) throw specError(`disk ${i}: give exactly one of uri and file`);
    if (d.format !== undefined && d.format !== 'raw') throw specError(`disk ${i}: format must be raw`);
    if (d.uri !== undefined && !/^nbd(\+unix|\+tcp)?:\/\//.test(d.uri)) throw specError(`disk ${i}: uri ${JSON.stringify(d.uri)} must be nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH`);
  }
  const paths = qemuVmPaths(spec.dir);
  // Commas separate QEMU's suboptions; the state directory appears inside -chardev and -qmp.
  if (paths.dir.includes(',')) throw specError(`the state directory ${paths.dir} must not contain a comma`);
  for (const p of [paths.qmp, paths.console]) {
    if (Buffer.byteLength(p) > MAX_SOCKET_PATH) {
      throw specError(`${p} is ${Buffer.byteLength(p)} bytes, longer than a UNIX socket path can be (${MAX_SOCKET_PATH}); use a shorter state directory`);
    }
  }
}

/** QEMU option values escape a comma by doubling it. */
function optValue(v: string): string {
  return v.replace(/,/g, ',,');
}

/** QEMU's arguments for `spec` (pure; exported for tests and for showing the command). */
export function qemuArgs(spec: QemuVmSpec): string[] {
  const p = qemuVmPaths(spec.dir);
  const args = [
    '-name', `guest=${spec.name},debug-threads=on`,
    '-machine', 'pc', '-accel', 'tcg',
    '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
    '-m', String(spec.memoryMiB), '-smp', String(spec.vcpus),
    '-kernel', spec.kernel, '-initrd', spec.initrd, '-append', spec.append,
    '-pidfile', p.pid,
    '-chardev', `socket,id=qmp0,path=${p.qmp},server=on,wait=off`,
    '-mon', 'chardev=qmp0,mode=control',
    '-chardev', `socket,id=ser0,path=${p.console},server=on,wait=off,logfile=${p.consoleLog},logappend=on`,
    '-serial', 'chardev:ser0',
  ];
  for (const [i, d] of spec.disks.entries()) {
    const file = d.file !== undefined ? path.resolve(d.file) : (d.uri as string);
    args.push('-drive', `file=${optValue(file)},format=raw,if=virtio,cache=${d.cache ?? 'none'},id=disk${i}${d.readOnly ? ',readonly=on' : ''}`);
  }
  if (spec.configDrive !== undefined) {
    args.push('-drive', `file=${optValue(path.resolve(spec.configDrive))},format=raw,if=virtio,readonly=on,id=cidata`);
  }
  if ((spec.network ?? 'user') === 'user') {
    // romfile= : no iPXE option ROM (the kernel is loaded directly; one dependency less).
    args.push('-netdev', 'user,id=n0', '-device', `virtio-net-pci,netdev=n0,mac=${spec.mac},romfile=`);
  } else {
    args.push('-nic', 'none');
  }
  if (spec.incoming !== undefined) args.push('-incoming', spec.incoming);
  args.push(...(spec.extraArgs ?? []));
  return args;
}

interface ProcStat {
  state: string;
  /** Clock ticks after boot when the process started (tells a reused pid apart). */
  startTime: number;
  utime: number;
  stime: number;
}

async function procStat(pid: number, task?: number): Promise<ProcStat | undefined> {
  let text: string;
  try {
    text = await readFile(task === undefined ? `/proc/${pid}/stat` : `/proc/${pid}/task/${task}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // "pid (comm) state ppid ...": comm may hold spaces and parentheses; fields follow the last ')'.
  const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return { state: f[0] ?? '?', utime: Number(f[11]), stime: Number(f[12]), startTime: Number(f[19]) };
}

async function tailOf(file: string, lines = 20): Promise<string> {
  try {
    return (await readFile(file, 'utf8')).trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}

function canConnect(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(socketPath);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

export type QemuVmProbe =
  | { state: 'running'; pid: number; spec: QemuVmSpec }
  | { state: 'gone'; reason: string; spec?: QemuVmSpec };

export interface QemuVmStatus {
  name: string;
  pid: number;
  /** The QEMU process exists (and is the one that was started). */
  alive: boolean;
  /** The guest's CPUs run. */
  running: boolean;
  /** QMP's RunState: running, paused, inmigrate, postmigrate, shutdown, ...; 'gone' when not alive. */
  status: string;
}

export interface QemuStopResult {
  /** How the process ended: it was already gone, the guest powered off, QEMU quit, or SIGKILL. */
  how: 'already-gone' | 'powerdown' | 'quit' | 'kill';
}

export interface BlockDeviceStats {
  /** QEMU's device id: disk0, disk1, ... and cidata. */
  device: string;
  nodeName?: string;
  rdBytes: number;
  wrBytes: number;
  rdOperations: number;
  wrOperations: number;
  flushOperations: number;
  rdTotalTimeNs: number;
  wrTotalTimeNs: number;
  /** Everything query-blockstats said about the device. */
  raw: Record<string, unknown>;
}

export interface CpuStats {
  /** CPU time of the whole QEMU process (all threads: vCPUs, I/O, migration). */
  processCpuMs: number;
  userMs: number;
  systemMs: number;
  vcpus: Array<{ index: number; threadId: number; cpuMs?: number }>;
}

export interface SnapshotResult {
  path: string;
  bytes: number;
  /** How long the guest was paused (0 when it was paused already). */
  pausedMs: number;
}

export interface MigrationProgress {
  /** query-migrate's status: setup, active, device, completed, failed, cancelling, cancelled... */
  status: string;
  transferredBytes: number;
  remainingBytes: number;
  totalBytes: number;
  /** transferred / (transferred + remaining): rough, RAM is dirtied again while it is copied. */
  fraction: number;
  mbps: number;
  dirtyPagesRate: number;
  /** Passes over RAM so far. */
  dirtySyncCount: number;
  elapsedMs: number;
}

export interface MigrationResult extends MigrationProgress {
  totalTimeMs: number;
  downtimeMs: number;
}

export interface MigrateOptions {
  onProgress?: (p: MigrationProgress) => void;
  /** How often to poll query-migrate (default 250 ms). */
  pollMs?: number;
  /** Cancel the migration (migrate_cancel) after this long (default: no limit). */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** migrate-set-parameters max-bandwidth (bytes/s); QEMU's default is 128 MiB/s. */
  maxBandwidthBytesPerSec?: number;
  /** migrate-set-parameters downtime-limit (ms); QEMU's default is 300. */
  downtimeLimitMs?: number;
}

interface QueryMigrate {
  status?: string;
  'total-time'?: number;
  downtime?: number;
  'error-desc'?: string;
  ram?: { transferred?: number; remaining?: number; total?: number; mbps?: number; 'dirty-pages-rate'?: number; 'dirty-sync-count'?: number };
}

function progressOf(info: QueryMigrate, startedMs: number): MigrationProgress {
  const ram = info.ram ?? {};
  const transferred = ram.transferred ?? 0;
  const remaining = ram.remaining ?? 0;
  const done = info.status === 'completed';
  return {
    status: info.status ?? 'none',
    transferredBytes: transferred,
    remainingBytes: remaining,
    totalBytes: ram.total ?? 0,
    fraction: done ? 1 : transferred + remaining > 0 ? transferred / (transferred + remaining) : 0,
    mbps: ram.mbps ?? 0,
    dirtyPagesRate: ram['dirty-pages-rate'] ?? 0,
    dirtySyncCount: ram['dirty-sync-count'] ?? 0,
    elapsedMs: Date.now() - startedMs,
  };
}

async function readSpec(dir: string): Promise<QemuVmSpec | undefined> {
  try {
    return JSON.parse(await readFile(qemuVmPaths(dir).spec, 'utf8')) as QemuVmSpec;
  } catch {
    return undefined;
  }
}

async function readPid(file: string): Promise<number | undefined> {
  try {
    const n = Number((await readFile(file, 'utf8')).trim());
    return Number.isInteger(n) && n > 0 ? n : undefined;
  } catch {
    return undefined;
  }
}

/** The pid runs QEMU for this state directory (not a stranger that got the pid since). */
async function isOurQemu(pid: number, paths: QemuVmPaths): Promise<boolean> {
  const st = await procStat(pid);
  if (!st || st.state === 'Z' || st.state === 'X') return false;
  try {
    return (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').some((a) => a.includes(paths.qmp));
  } catch {
    return false;
  }
}

export class QemuVm {
  private qmpClient: QmpClient | undefined;
  private qmpConnecting: Promise<QmpClient> | undefined;
  private serial: SerialConsole | undefined;

  private constructor(
    readonly spec: QemuVmSpec,
    readonly pid: number,
    private readonly startTime: number,
    qmp: QmpClient,
    /** Only when this process started QEMU: lets Node reap it, nothing else. */
    private readonly child: ChildProcess | undefined,
  ) {
    this.qmpClient = qmp;
  }

  get name(): string {
    return this.spec.name;
  }

  get paths(): QemuVmPaths {
    return qemuVmPaths(this.spec.dir);
  }

  /**
   * Start QEMU for `spec`, detached (own session, stdio on qemu.log, pid file), and connect to
   * QMP. Rejects with SPW_ERR_VM_START and the tail of qemu.log when QEMU exits while starting.
   * A VM waiting for an incoming migration (spec.incoming) is started too, in status inmigrate.
   */
  static async start(spec: QemuVmSpec, opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<QemuVm> {
    validateVmSpec(spec);
    const paths = qemuVmPaths(spec.dir);
    const full: QemuVmSpec = { ...spec, dir: paths.dir };
    await mkdir(paths.dir, { recursive: true });
    const probe = await QemuVm.probe(paths.dir);
    if (probe.state === 'running') {
      throw new ComputeError('SPW_ERR_VM_STATE', `VM ${spec.name}: QEMU (pid ${probe.pid}) already runs in ${paths.dir}; attach() to it or stop it first`);
    }
    for (const f of [paths.pid, paths.qmp, paths.console]) await rm(f, { force: true });
    // A new boot gets a new console log (the previous one is kept as console.log.prev), so that
    // waitForConsole() from the start never matches a marker of an earlier run.
    await rename(paths.consoleLog, `${paths.consoleLog}.prev`).catch(() => undefined);
    await writeFile(paths.spec + '.tmp', JSON.stringify(full, null, 2) + '\n');
    await rename(paths.spec + '.tmp', paths.spec);

    const bin = spec.qemuBinary ?? 'qemu-system-x86_64';
    const args = qemuArgs(full);
    const logFd = openSync(paths.log, 'a');
    let child: ChildProcess;
    try {
      child = spawn(bin, args, { cwd: paths.dir, detached: true, stdio: ['ignore', logFd, logFd] });
    } finally {
      closeSync(logFd);
    }
    const exited = new Promise<string>((resolve) => {
      child.once('error', (e: NodeJS.ErrnoException) => resolve(e.code === 'ENOENT' ? 'ENOENT' : `cannot run ${bin}: ${e.message}`));
      child.once('exit', (code, signal) => resolve(`QEMU exited while starting (code ${code}, signal ${signal})`));
    });
    let exitReason: string | undefined;
    void exited.then((r) => (exitReason = r));
    child.unref();

    const timeoutMs = opts.timeoutMs ?? 30_000;
    const deadline = Date.now() + timeoutMs;
    const failStart = async (why: string): Promise<never> => {
      if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
        child.kill('SIGKILL');
        await exited;
      }
      if (why === 'ENOENT') throw missingTool(bin, 'qemu-system-x86');
      throw new ComputeError('SPW_ERR_VM_START', `VM ${spec.name}: ${why}; ${paths.log} says:\n${await tailOf(paths.log)}`);
    };
    for (;;) {
      if (exitReason !== undefined) return failStart(exitReason);
      if (opts.signal?.aborted) return failStart('aborted while starting');
      if (Date.now() > deadline) return failStart(`QMP socket ${paths.qmp} not ready within ${timeoutMs} ms`);
      if ((await readPid(paths.pid)) !== undefined && (await canConnect(paths.qmp))) break;
      await sleep(50);
    }
    const pid = child.pid as number;
    let qmp: QmpClient;
    try {
      qmp = await QmpClient.connect(paths.qmp, { timeoutMs: Math.max(deadline - Date.now(), 5000) });
    } catch (e) {
      return failStart(`cannot talk QMP: ${(e as Error).message}`);
    }
    const st = await procStat(pid);
    return new QemuVm(full, pid, st?.startTime ?? 0, qmp, child);
  }

  /** Is a VM running in `dir`? Never throws for a missing or stale state directory. */
  static async probe(dir: string): Promise<QemuVmProbe> {
    const paths = qemuVmPaths(dir);
    const spec = await readSpec(paths.dir);
    const withSpec = spec ? { spec } : {};
    const pid = await readPid(paths.pid);
    if (pid === undefined) return { state: 'gone', reason: `no pid file ${paths.pid} (QEMU never started there, or exited cleanly)`, ...withSpec };
    if (!(await isOurQemu(pid, paths))) return { state: 'gone', reason: `pid ${pid} from ${paths.pid} is not QEMU for ${paths.dir} any more (it was killed or crashed; see ${paths.log})`, ...withSpec };
    if (!spec) return { state: 'gone', reason: `QEMU pid ${pid} runs but ${paths.spec} is missing or unreadable` };
    return { state: 'running', pid, spec };
  }

  /**
   * Re-attach to the VM running in state directory `dir` (after this process or another one
   * started it and went away). Rejects with SPW_ERR_VM_GONE, saying why, when it is not running.
   */
  static async attach(dir: string, opts: { timeoutMs?: number } = {}): Promise<QemuVm> {
    const probe = await QemuVm.probe(dir);
    if (probe.state === 'gone') throw new ComputeError('SPW_ERR_VM_GONE', `VM in ${path.resolve(dir)} is gone: ${probe.reason}`);
    const paths = qemuVmPaths(dir);
    const qmp = await QmpClient.connect(paths.qmp, { timeoutMs: opts.timeoutMs ?? 10_000 });
    const st = await procStat(probe.pid);
    return new QemuVm(probe.spec, probe.pid, st?.startTime ?? 0, qmp, undefined);
  }

  /** The QEMU process still exists (and is the one started, not a reused pid). */
  async isAlive(): Promise<boolean> {
    const st = await procStat(this.pid);
    return st !== undefined && st.state !== 'Z' && st.state !== 'X' && (this.startTime === 0 || st.startTime === this.startTime);
  }

  /** The QMP connection, reconnected when it was lost while QEMU still runs. */
  async qmp(): Promise<QmpClient> {
    if (this.qmpClient && !this.qmpClient.closed) return this.qmpClient;
    if (!(await this.isAlive())) throw new ComputeError('SPW_ERR_VM_GONE', `VM ${this.name}: QEMU (pid ${this.pid}) is not running; ${this.paths.log} says:\n${await tailOf(this.paths.log)}`);
    this.qmpConnecting ??= QmpClient.connect(this.paths.qmp).finally(() => (this.qmpConnecting = undefined));
    this.qmpClient = await this.qmpConnecting;
    return this.qmpClient;
  }

  /** Run any QMP command. */
  async execute<T = unknown>(command: string, args?: Record<string, unknown>, opts?: QmpExecuteOptions): Promise<T> {
    return (await this.qmp()).execute<T>(command, args, opts);
  }

  async status(): Promise<QemuVmStatus> {
    const base = { name: this.name, pid: this.pid };
    if (!(await this.isAlive())) return { ...base, alive: false, running: false, status: 'gone' };
    try {
      const s = await this.execute<{ running: boolean; status: string }>('query-status');
      return { ...base, alive: true, running: s.running, status: s.status };
    } catch (e) {
      if (!(await this.isAlive())) return { ...base, alive: false, running: false, status: 'gone' };
      throw e;
    }
  }

  /** Poll query-status until it is one of `statuses`. */
  async waitForStatus(statuses: string | string[], opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<QemuVmStatus> {
    const want = Array.isArray(statuses) ? statuses : [statuses];
    const timeoutMs = opts.timeoutMs ?? 30_000;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const s = await this.status();
      if (want.includes(s.status)) return s;
      if (!s.alive) throw new ComputeError('SPW_ERR_VM_GONE', `VM ${this.name}: QEMU exited while waiting for status ${want.join('|')}; ${this.paths.log} says:\n${await tailOf(this.paths.log)}`);
      if (opts.signal?.aborted || Date.now() > deadline) {
        throw new ComputeError('SPW_ERR_VM_STATE', `VM ${this.name}: status is ${s.status}, not ${want.join('|')}, after ${timeoutMs} ms`);
      }
      await sleep(100);
    }
  }

  /** Pause the guest's CPUs (QMP stop: in-flight disk I/O is drained and flushed first). */
  async pause(): Promise<void> {
    await this.execute('stop');
  }

  async resume(): Promise<void> {
    await this.execute('cont');
  }

  /**
   * Stop the VM: ACPI power button (system_powerdown) and up to `gracefulTimeoutMs` for the guest
   * to power off, then QMP quit and up to `quitTimeoutMs`, then SIGKILL. gracefulTimeoutMs 0
   * skips the power button (a guest without ACPI handling, like the sample guest, ignores it).
   */
  async stop(opts: { gracefulTimeoutMs?: number; quitTimeoutMs?: number } = {}): Promise<QemuStopResult> {
    const graceful = opts.gracefulTimeoutMs ?? 30_000;
    const quit = opts.quitTimeoutMs ?? 10_000;
    try {
      if (!(await this.isAlive())) return { how: 'already-gone' };
      if (graceful > 0) {
        const sent = await this.execute('system_powerdown', undefined, { timeoutMs: 5000 }).then(
          () => true,
          () => false,
        );
        if (sent && (await this.waitForExit(graceful))) return { how: 'powerdown' };
      }
      // QEMU replies to quit and closes the connection; a lost reply is fine.
      await this.execute('quit', undefined, { timeoutMs: 5000 }).catch(() => undefined);
      if (await this.waitForExit(quit)) return { how: 'quit' };
      await this.kill();
      return { how: 'kill' };
    } finally {
      await this.detach();
    }
  }

  /** SIGKILL QEMU and wait until it is gone. */
  async kill(): Promise<void> {
    if (await this.isAlive()) {
      try {
        process.kill(this.pid, 'SIGKILL');
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ESRCH') throw e;
      }
      if (!(await this.waitForExit(10_000))) throw new ComputeError('SPW_ERR_VM_STATE', `VM ${this.name}: QEMU pid ${this.pid} survived SIGKILL for 10 s`);
    }
    await this.detach();
  }

  /** Resolve true once QEMU has exited, false when it still runs after `timeoutMs`. */
  async waitForExit(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (!(await this.isAlive())) return true;
      if (Date.now() > deadline) return false;
      await sleep(50);
    }
  }

  /** Close this object's QMP and console connections; QEMU keeps running (attach() again later). */
  async detach(): Promise<void> {
    const q = this.qmpClient;
    this.qmpClient = undefined;
    const c = this.serial;
    this.serial = undefined;
    await Promise.all([q?.close(), c?.close()]);
    this.child?.removeAllListeners();
  }

  /** Per-device I/O counters (query-blockstats). */
  async blockStats(): Promise<BlockDeviceStats[]> {
    const list = await this.execute<Array<Record<string, unknown>>>('query-blockstats');
    return list.map((d) => {
      const s = (d.stats ?? {}) as Record<string, number | undefined>;
      return {
        device: typeof d.device === 'string' ? d.device : '',
        ...(typeof d['node-name'] === 'string' ? { nodeName: d['node-name'] } : {}),
        rdBytes: s.rd_bytes ?? 0,
        wrBytes: s.wr_bytes ?? 0,
        rdOperations: s.rd_operations ?? 0,
        wrOperations: s.wr_operations ?? 0,
        flushOperations: s.flush_operations ?? 0,
        rdTotalTimeNs: s.rd_total_time_ns ?? 0,
        wrTotalTimeNs: s.wr_total_time_ns ?? 0,
        raw: d,
      };
    });
  }

  /** CPU time of QEMU (/proc/PID/stat) and of each vCPU thread (query-cpus-fast + /proc/PID/task). */
  async cpuStats(): Promise<CpuStats> {
    const cpus = await this.execute<Array<{ 'cpu-index': number; 'thread-id': number }>>('query-cpus-fast');
    const st = await procStat(this.pid);
    if (!st) throw new ComputeError('SPW_ERR_VM_GONE', `VM ${this.name}: QEMU pid ${this.pid} is gone`);
    const ms = (ticks: number) => (ticks * 1000) / USER_HZ;
    const vcpus = await Promise.all(
      cpus.map(async (c) => {
        const t = await procStat(this.pid, c['thread-id']);
        return { index: c['cpu-index'], threadId: c['thread-id'], ...(t ? { cpuMs: ms(t.utime + t.stime) } : {}) };
      }),
    );
    return { processCpuMs: ms(st.utime + st.stime), userMs: ms(st.utime), systemMs: ms(st.stime), vcpus };
  }

  /**
   * A crash-consistent copy of a file-backed disk of the running VM (what the disk would hold
   * after a power cut at that instant). Method: pause the VM with QMP stop, which drains all
   * in-flight guest I/O and flushes it to the file (bdrv_drain_all + bdrv_flush_all), so the file
   * is exactly the disk; copy it with `cp --reflink=auto --sparse=always` (instant on
   * btrfs/XFS, a full copy elsewhere); resume if it was running. The guest is paused for the
   * copy's duration. (blockdev-snapshot-sync would shorten the pause but leave the VM running on
   * a qcow2 overlay that must be committed later; disks on NBD are snapshotted at the edge.)
   */
  async snapshotDisk(opts: { to: string; disk?: number }): Promise<SnapshotResult> {
    const index = opts.disk ?? 0;
    const disk = this.spec.disks[index];
    if (!disk) throw new ComputeError('SPW_ERR_VM_SNAPSHOT', `VM ${this.name}: no disk ${index} (it has ${this.spec.disks.length})`);
    if (disk.file === undefined) {
      throw new ComputeError('SPW_ERR_VM_SNAPSHOT', `VM ${this.name}: disk ${index} is ${disk.uri}, not a file; snapshot it where it is served (the edge)`);
    }
    const source = path.resolve(disk.file);
    const to = path.resolve(opts.to);
    const tmp = `${to}.tmp-${process.pid}`;
    const { running } = await this.status();
    const pausedAt = Date.now();
    if (running) await this.pause();
    let pausedMs = 0;
    try {
      await execFileP('cp', ['--reflink=auto', '--sparse=always', source, tmp]);
    } catch (e) {
      await rm(tmp, { force: true });
      const err = e as NodeJS.ErrnoException & { stderr?: string };
      if (err.code === 'ENOENT') throw missingTool('cp', 'coreutils', e);
      throw new ComputeError('SPW_ERR_VM_SNAPSHOT', `VM ${this.name}: copying ${source} failed: ${err.stderr?.trim() || err.message}`, { cause: e });
    } finally {
      if (running) {
        await this.resume();
        pausedMs = Date.now() - pausedAt;
      }
    }
    await rename(tmp, to);
    return { path: to, bytes: (await stat(to)).size, pausedMs };
  }

  /**
   * Live-migrate RAM and device state to a QEMU waiting with -incoming (migrateIncoming on the
   * other side), e.g. 'tcp:127.0.0.1:4444' or 'unix:/path'. Disks are not copied: both sides
   * must reach the same storage (a shared file, or the same NBD export through the edges).
   * Polls query-migrate, reports progress, resolves on completed (this VM is then paused in
   * postmigrate: stop it), rejects with SPW_ERR_MIGRATION_FAILED or _CANCELLED.
   */
  async migrate(uri: string, opts: MigrateOptions = {}): Promise<MigrationResult> {
    const params: Record<string, number> = {};
    if (opts.maxBandwidthBytesPerSec !== undefined) params['max-bandwidth'] = opts.maxBandwidthBytesPerSec;
    if (opts.downtimeLimitMs !== undefined) params['downtime-limit'] = opts.downtimeLimitMs;
    if (Object.keys(params).length > 0) await this.execute('migrate-set-parameters', params);
    const started = Date.now();
    await this.execute('migrate', { uri });
    const pollMs = opts.pollMs ?? 250;
    let cancelledBy: string | undefined;
    for (;;) {
      const info = await this.execute<QueryMigrate>('query-migrate');
      const progress = progressOf(info, started);
      opts.onProgress?.(progress);
      switch (info.status) {
        case 'completed':
          return { ...progress, totalTimeMs: info['total-time'] ?? Date.now() - started, downtimeMs: info.downtime ?? 0 };
        case 'failed':
          throw new ComputeError('SPW_ERR_MIGRATION_FAILED', `VM ${this.name}: migration to ${uri} failed: ${info['error-desc'] ?? 'no reason given'} (is the destination waiting with -incoming and the same devices?)`);
        case 'cancelled':
          throw new ComputeError('SPW_ERR_MIGRATION_CANCELLED', `VM ${this.name}: migration to ${uri} cancelled${cancelledBy ? ` (${cancelledBy})` : ''}; the VM keeps running here`);
      }
      if (cancelledBy === undefined) {
        if (opts.signal?.aborted) cancelledBy = 'aborted';
        else if (opts.timeoutMs !== undefined && Date.now() - started > opts.timeoutMs) cancelledBy = `not completed within ${opts.timeoutMs} ms`;
        if (cancelledBy !== undefined) await this.execute('migrate_cancel');
      }
      await sleep(pollMs);
    }
  }

  /** On a VM started with incoming 'defer': listen for the migration stream on `uri`. */
  async migrateIncoming(uri: string): Promise<void> {
    await this.execute('migrate-incoming', { uri });
  }

  /** The serial console (one per VM object; connected on first use). */
  get console(): SerialConsole {
    this.serial ??= new SerialConsole(this.paths.console, this.paths.consoleLog);
    return this.serial;
  }

  /** Run a command in the guest's console shell (see console.ts). */
  exec(command: string, opts?: ConsoleExecOptions): Promise<ConsoleExecResult> {
    return this.console.exec(command, opts);
  }

  /** Wait for a console line matching `re` (searched from the start of console.log by default). */
  waitForConsole(re: RegExp, opts?: ConsoleWaitOptions): Promise<ConsoleMatch> {
    return this.console.waitFor(re, opts);
  }
}

/** State directories under `baseDir` (each one VM), for listing. */
export async function listStateDirs(baseDir: string): Promise<string[]> {
  let entries;
  try {
    entries = await readdir(baseDir, { withFileTypes: true });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
  return entries.filter((e) => e.isDirectory()).map((e) => path.join(baseDir, e.name)).sort();
}
