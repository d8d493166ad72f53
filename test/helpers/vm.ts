// Test helpers for booting a real VM under QEMU (TCG) with its root disk on an NBD export or a
// file. The images come from scripts/vm/build-vm.sh (see docs/vm-images.md); the guest prints
// marker lines on its serial console, which bootVm collects and parseVmConsole reads.

import { existsSync } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { ROOT, haveCommand, run, startProc } from './proc.js';

/** Where ensureVmImages() builds by default (gitignored); SPILLWAY_VM_DIR overrides it. */
export const VM_CACHE_DIR = process.env.SPILLWAY_VM_DIR ?? path.join(ROOT, '.work', 'vm');
export const VM_BUILD_SCRIPT = path.join(ROOT, 'scripts', 'vm', 'build-vm.sh');
/** Where ensureGuestImages() builds by default (gitignored); SPILLWAY_GUEST_DIR overrides it. */
export const GUEST_CACHE_DIR = process.env.SPILLWAY_GUEST_DIR ?? path.join(ROOT, '.work', 'vm-guest');

/** Marker lines the guest prints, each alone on a line. */
export const VM_MARKER = {
  /** The root filesystem's /init runs (kernel, initramfs and root mount all worked). */
  ready: 'SPILLWAY-VM-READY',
  /** The check script finished and the root filesystem is remounted read-only. */
  done: 'SPILLWAY-VM-DONE',
  /** Something in the guest failed; the rest of the line says what. */
  fail: 'SPILLWAY-VM-FAIL',
  /** `SPILLWAY-VM-MD5 <md5>  <path>`: one per file the guest read in full. */
  md5: 'SPILLWAY-VM-MD5',
  /** `SPILLWAY-VM-DATA <text>`: /data.txt existed at boot and held this. */
  data: 'SPILLWAY-VM-DATA',
  /** `spw.write=TEXT` was given and /data.txt was written and synced. */
  wrote: 'SPILLWAY-VM-WROTE',
} as const;

export interface VmImages {
  dir: string;
  kernel: string;
  initrd: string;
  /** The pristine root filesystem image: copy it before booting from it. */
  rootImg: string;
  /** The directory root.img was made from (hash files here to know what the guest must see). */
  rootfsDir: string;
}

const builds = new Map<string, Promise<VmImages>>();

/**
 * Build (or reuse) the VM images in `dir`, once per process. The script itself is idempotent and
 * takes a lock, so test files running in parallel processes share one cache directory safely.
 */
export function ensureVmImages(dir: string = VM_CACHE_DIR): Promise<VmImages> {
  return cachedBuild(dir, []);
}

/**
 * The long-running sample guest (build-vm.sh --guest, docs/vm-images.md), built like
 * ensureVmImages into its own directory. Boot it with GUEST_APPEND; it never powers off.
 */
export function ensureGuestImages(dir: string = GUEST_CACHE_DIR): Promise<VmImages> {
  return cachedBuild(dir, ['--guest']);
}

/** Kernel command line of the sample guest. */
export const GUEST_APPEND = 'console=ttyS0 root=/dev/vda rw init=/init panic=-1';

/** Marker lines of the sample guest. */
export const GUEST_MARKER = {
  /** `SPILLWAY-GUEST hostname=H machine-id=M mac=MAC boot-id=B` */
  identity: 'SPILLWAY-GUEST',
  /** The counter runs and the console shell starts. */
  ready: 'SPILLWAY-GUEST-READY',
} as const;

export interface GuestIdentity {
  hostname: string;
  machineId: string;
  mac: string;
  bootId: string;
}

/** Parse the guest's identity line (SPILLWAY-GUEST key=value ...); undefined if it is not one. */
export function parseGuestIdentity(line: string): GuestIdentity | undefined {
  const m = /^SPILLWAY-GUEST hostname=(\S+) machine-id=(\S+) mac=(\S+) boot-id=(\S+)$/.exec(line.trim());
  if (!m) return undefined;
  return { hostname: m[1] as string, machineId: m[2] as string, mac: m[3] as string, bootId: m[4] as string };
}

function cachedBuild(dir: string, flags: string[]): Promise<VmImages> {
  const key = path.resolve(dir);
  let p = builds.get(key);
  if (!p) {
    p = buildVmImages(key, flags);
    builds.set(key, p);
    p.catch(() => builds.delete(key));
  }
  return p;
}

async function buildVmImages(dir: string, flags: string[]): Promise<VmImages> {
  await run('bash', [VM_BUILD_SCRIPT, dir, ...flags]);
  const images: VmImages = {
    dir,
    kernel: path.join(dir, 'vmlinuz'),
    initrd: path.join(dir, 'initramfs.cpio.gz'),
    rootImg: path.join(dir, 'root.img'),
    rootfsDir: path.join(dir, 'rootfs'),
  };
  for (const f of [images.kernel, images.initrd, images.rootImg, images.rootfsDir]) {
    if (!existsSync(f)) throw new Error(`${VM_BUILD_SCRIPT} succeeded but ${f} is missing`);
  }
  return images;
}

export interface BootVmOptions {
  /** Root disk as a QEMU NBD URI, e.g. nbd://127.0.0.1:PORT/ (give this or drivePath). */
  driveUri?: string;
  /** Root disk as a local image file (give this or driveUri). */
  drivePath?: string;
  /** Extra kernel command-line arguments, e.g. `spw.write=TEXT`. */
  append?: string;
  /** Kill QEMU and reject when the guest has not finished by then. */
  timeoutMs: number;
  /** QEMU block format of the drive (default raw). */
  format?: string;
  /** QEMU cache mode of the drive (default none: every guest I/O reaches the server). */
  cache?: string;
  /** Images to boot (default: ensureVmImages() in the shared cache directory). */
  images?: VmImages;
  memoryMb?: number;
  /** Kill QEMU and reject when this aborts (pass node:test's `t.signal`). */
  signal?: AbortSignal;
}

export interface VmConsole {
  ready: boolean;
  done: boolean;
  /** Text of the first SPILLWAY-VM-FAIL line, if any. */
  fail?: string;
  panic: boolean;
  /** Guest path → md5 hex, from the SPILLWAY-VM-MD5 lines. */
  checksums: Record<string, string>;
  /** Content of /data.txt at boot, when it existed. */
  data?: string;
  wrote: boolean;
}

export interface VmBoot extends VmConsole {
  /** The serial console, normalized (normalizeConsole). */
  console: string;
  /** QEMU's own stderr. */
  stderr: string;
  exit: { code: number | null; signal: NodeJS.Signals | null };
  /** Milliseconds from starting QEMU to the READY marker, the DONE marker and QEMU's exit. */
  timings: { readyMs: number; doneMs: number; exitMs: number };
  args: string[];
}

export class VmBootError extends Error {
  constructor(
    message: string,
    readonly console: string,
    readonly stderr: string,
  ) {
    super(`${message}\n--- QEMU stderr ---\n${tail(stderr, 20)}\n--- serial console (tail) ---\n${tail(console, 60)}`);
    this.name = 'VmBootError';
  }
}

function tail(text: string, lines: number): string {
  return text.split('\n').slice(-lines).join('\n');
}

function markerLine(text: string, marker: string): string | undefined {
  const re = new RegExp(`^${marker}(?:[ :](.*))?$`, 'm');
  const m = re.exec(text);
  return m ? (m[1] ?? '') : undefined;
}

// Terminal escape sequences (SeaBIOS clears the screen with ESC c, ESC [2J ...): stripped, or a
// marker printed right after one would not start its line.
const ESC = String.fromCharCode(27);
const TERMINAL_ESCAPES = new RegExp(`${ESC}(?:\\[[0-?]*[ -/]*[@-~]|[@-~])`, 'g');

/** The serial console as plain text: no \r, no terminal escape sequences. */
export function normalizeConsole(raw: string): string {
  return raw.replace(/\r/g, '').replace(TERMINAL_ESCAPES, '');
}

/** Read the guest's marker lines out of a serial console transcript. */
export function parseVmConsole(text: string): VmConsole {
  const t = normalizeConsole(text);
  const checksums: Record<string, string> = {};
  for (const m of t.matchAll(new RegExp(`^${VM_MARKER.md5} ([0-9a-f]{32}) +(\\S+)$`, 'gm'))) {
    checksums[m[2] as string] = m[1] as string;
  }
  const fail = markerLine(t, VM_MARKER.fail);
  const data = markerLine(t, VM_MARKER.data);
  return {
    ready: markerLine(t, VM_MARKER.ready) !== undefined,
    done: markerLine(t, VM_MARKER.done) !== undefined,
    ...(fail !== undefined ? { fail: fail.trim() } : {}),
    panic: /Kernel panic/.test(t),
    checksums,
    ...(data !== undefined ? { data } : {}),
    wrote: markerLine(t, VM_MARKER.wrote) !== undefined,
  };
}

function qemuDrive(opts: BootVmOptions): string {
  const file = opts.driveUri ?? opts.drivePath;
  if (!file || (opts.driveUri && opts.drivePath)) throw new Error('bootVm: give exactly one of driveUri and drivePath');
  // QEMU option values escape a comma by doubling it.
  return `file=${file.replace(/,/g, ',,')},format=${opts.format ?? 'raw'},if=virtio,cache=${opts.cache ?? 'none'}`;
}

/**
 * Boot the tiny VM and wait until the guest prints SPILLWAY-VM-DONE and QEMU exits. Rejects with
 * the console tail when QEMU exits without DONE (panic, guest failure, QEMU error), on timeout,
 * or when `signal` aborts; QEMU is killed by pid in every such case.
 */
export async function bootVm(opts: BootVmOptions): Promise<VmBoot> {
  const images = opts.images ?? (await ensureVmImages());
  if (!(await haveCommand('qemu-system-x86_64'))) {
    throw new Error('qemu-system-x86_64 not found; install it with: apt-get install -y --no-install-recommends qemu-system-x86');
  }
  const cmdline = ['console=ttyS0', 'root=/dev/vda', 'rw', 'init=/init', 'panic=-1', opts.append ?? ''].join(' ').trim();
  const args = [
    '-nographic', '-no-reboot', '-m', String(opts.memoryMb ?? 256), '-accel', 'tcg',
    '-kernel', images.kernel, '-initrd', images.initrd, '-append', cmdline,
    '-drive', qemuDrive(opts), '-nic', 'none',
  ];
  opts.signal?.throwIfAborted();

  // setpriv execs QEMU (same pid) with a parent-death signal, so QEMU cannot outlive this
  // process even if it is SIGKILLed.
  const usePdeath = await haveCommand('setpriv');
  const start = performance.now();
  const proc = usePdeath
    ? startProc('setpriv', ['--pdeathsig', 'SIGKILL', '--', 'qemu-system-x86_64', ...args])
    : startProc('qemu-system-x86_64', args);
  const child = proc.child;
  const killOnExit = () => child.kill('SIGKILL');
  process.once('exit', killOnExit);

  let readyMs = NaN;
  let doneMs = NaN;
  const consoleText = () => normalizeConsole(proc.stdout());

  try {
    return await new Promise<VmBoot>((resolve, reject) => {
      let settled = false;
      // Set when we decided to kill QEMU; reported once QEMU is gone and the console complete.
      let failure: VmBootError | undefined;
      let graceTimer: NodeJS.Timeout | undefined;
      const settle = (exit: { code: number | null; signal: NodeJS.Signals | null }) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        clearTimeout(graceTimer);
        opts.signal?.removeEventListener('abort', onAbort);
        if (failure) {
          reject(failure);
          return;
        }
        const text = consoleText();
        const parsed = parseVmConsole(text);
        if (!parsed.done) {
          const why = parsed.panic
            ? `the guest kernel panicked: ${/Kernel panic.*$/m.exec(text)?.[0] ?? ''}`
            : parsed.fail !== undefined
              ? `the guest failed: ${parsed.fail}`
              : `QEMU exited (code ${exit.code}, signal ${exit.signal}) before ${VM_MARKER.done}`;
          reject(new VmBootError(`bootVm: ${why}`, text, proc.stderr()));
          return;
        }
        resolve({ ...parsed, console: text, stderr: proc.stderr(), exit, timings: { readyMs, doneMs, exitMs: performance.now() - start }, args });
      };
      const fail = (message: string) => {
        if (settled || failure) return;
        failure = new VmBootError(message, consoleText(), proc.stderr());
        child.kill('SIGKILL');
      };
      const timer = setTimeout(() => fail(`bootVm: no ${VM_MARKER.done} and QEMU still running after ${opts.timeoutMs} ms`), opts.timeoutMs);
      const onAbort = () => fail('bootVm: aborted');
      opts.signal?.addEventListener('abort', onAbort, { once: true });

      child.once('error', (e) => {
        failure ??= new VmBootError(`bootVm: cannot run QEMU: ${e.message}`, consoleText(), proc.stderr());
        settle({ code: null, signal: null });
      });
      child.stdout?.on('data', () => {
        const text = consoleText();
        const now = performance.now() - start;
        if (Number.isNaN(readyMs) && markerLine(text, VM_MARKER.ready) !== undefined) readyMs = now;
        if (Number.isNaN(doneMs) && markerLine(text, VM_MARKER.done) !== undefined) doneMs = now;
        // A panicked or failed guest normally makes QEMU exit at once (panic=-1, -no-reboot,
        // poweroff -f); give it a moment, then stop waiting for the full timeout.
        if (graceTimer === undefined && (/Kernel panic/.test(text) || markerLine(text, VM_MARKER.fail) !== undefined)) {
          graceTimer = setTimeout(() => fail('bootVm: the guest failed and QEMU did not exit'), 5000);
        }
      });
      // 'close' comes after 'exit' and after stdout has ended, so the console is complete.
      child.once('close', (code, signal) => settle({ code, signal }));
    });
  } finally {
    // (No pid: QEMU never started, and there is nothing to stop.)
    if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) await proc.stop('SIGKILL');
    process.removeListener('exit', killOnExit);
  }
}
