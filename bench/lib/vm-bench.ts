// The boot benchmark's VM: building it (scripts/vm/build-bench-vm.sh, cached under
// .work/bench-vm/) and booting it under QEMU (TCG) from a local file or an NBD export, timed from
// QEMU's start to the guest's ready marker. QEMU is run as test/helpers/vm.ts runs it (setpriv
// --pdeathsig, stopped by pid), but this guest prints its own markers and stays read-only.

import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

import { onCleanup } from './cleanup.js';
import { REPO_ROOT } from './nbd-servers.js';
import { haveCommand, runCommand } from './process.js';

export const BENCH_VM_SCRIPT = path.join(REPO_ROOT, 'scripts', 'vm', 'build-bench-vm.sh');
export const BENCH_VM_DIR = process.env.SPILLWAY_BENCH_VM_DIR ?? path.join(REPO_ROOT, '.work', 'bench-vm');

/** Lines the guest prints on its serial console, each alone on a line. */
export const BENCH_MARKER = {
  /** the root filesystem's /init runs; then the guest's uptime in seconds. */
  init: 'SPILLWAY-BENCH-INIT',
  /** `<sha256> <bytes> <files> <modules>`: what the workload read. */
  digest: 'SPILLWAY-BENCH-DIGEST',
  /** the workload is up; then the guest's uptime in seconds. */
  ready: 'SPILLWAY-BENCH-READY',
  fail: 'SPILLWAY-BENCH-FAIL',
} as const;

/** image.json, written by the build script. */
export interface BenchVmInfo {
  fsBytes: number;
  allocatedBytes: number;
  files: number;
  workload: { digest: string; assetBytes: number; assetFiles: number; modules: number; python: string };
  unread: { by: Record<string, number>; bytes: number };
  params: string;
}

export interface BenchVm {
  dir: string;
  kernel: string;
  initrd: string;
  rootImg: string;
  info: BenchVmInfo;
  /** what the build script printed (sizes). */
  buildLog: string;
}

/** Build the image, or find it up to date (the script decides; it takes a lock). */
export async function ensureBenchVm(dir: string = BENCH_VM_DIR, size?: string): Promise<BenchVm> {
  const r = await runCommand('bash', [BENCH_VM_SCRIPT, dir, ...(size ? ['--size', size] : [])], { timeoutMs: 20 * 60_000 });
  const vm: BenchVm = {
    dir,
    kernel: path.join(dir, 'base', 'vmlinuz'),
    initrd: path.join(dir, 'base', 'initramfs.cpio.gz'),
    rootImg: path.join(dir, 'root.img'),
    info: JSON.parse(await readFile(path.join(dir, 'image.json'), 'utf8')) as BenchVmInfo,
    buildLog: r.stdout.trim(),
  };
  for (const f of [vm.kernel, vm.initrd, vm.rootImg]) if (!existsSync(f)) throw new Error(`${BENCH_VM_SCRIPT} succeeded but ${f} is missing`);
  return vm;
}

export interface BenchBootOptions {
  vm: BenchVm;
  /** a QEMU NBD URI (nbd://127.0.0.1:PORT/EXPORT) or a local image file. */
  drive: { uri: string } | { file: string };
  timeoutMs: number;
  /** QEMU cache mode of the drive (default none: O_DIRECT for files, every read reaches the server). */
  cache?: string;
  memoryMb?: number;
  /** called as soon as the ready marker arrives (e.g. to sample link counters). */
  onReady?: () => void;
}

export interface BenchBoot {
  /** QEMU start → ready marker, s (the bench's figure). */
  readySeconds: number;
  /** QEMU start → the root filesystem's /init, s. */
  initSeconds: number;
  /** QEMU start → QEMU exit, s. */
  exitSeconds: number;
  /** the guest's own uptime at init and at ready, s. */
  guestInitUptime: number;
  guestReadyUptime: number;
  digest: string;
  /** bytes and files the workload read and hashed, stdlib modules it imported. */
  workloadBytes: number;
  workloadFiles: number;
  modules: number;
  args: string[];
}

const ESC = String.fromCharCode(27);
const TERMINAL_ESCAPES = new RegExp(`${ESC}(?:\\[[0-?]*[ -/]*[@-~]|[@-~])`, 'g');
const normalize = (raw: string): string => raw.replace(/\r/g, '').replace(TERMINAL_ESCAPES, '');
const markerRest = (text: string, marker: string): string | undefined => new RegExp(`^${marker}(?:[ :](.*))?$`, 'm').exec(text)?.[1];
const tail = (text: string, lines: number): string => text.split('\n').slice(-lines).join('\n');

/**
 * Boot the bench VM read-only (`ro` on the kernel command line and `readonly=on` on the drive:
 * the image is never modified, so every boot sees the same disk) and wait for QEMU to exit after
 * the ready marker. Rejects with the console's tail when the guest fails, the digest is not the
 * one the build computed, or on timeout; QEMU is killed by pid in every such case.
 */
export async function bootBenchVm(o: BenchBootOptions): Promise<BenchBoot> {
  if (!(await haveCommand('qemu-system-x86_64'))) throw new Error('qemu-system-x86_64 not found: apt-get install -y --no-install-recommends qemu-system-x86');
  const file = 'uri' in o.drive ? o.drive.uri : o.drive.file;
  const args = [
    '-nographic', '-no-reboot', '-m', String(o.memoryMb ?? 512), '-accel', 'tcg',
    '-kernel', o.vm.kernel, '-initrd', o.vm.initrd,
    '-append', 'console=ttyS0 root=/dev/vda ro init=/init panic=-1',
    '-drive', `file=${file.replace(/,/g, ',,')},format=raw,if=virtio,cache=${o.cache ?? 'none'},readonly=on`,
    '-nic', 'none',
  ];
  const usePdeath = await haveCommand('setpriv');
  const [cmd, argv] = usePdeath ? ['setpriv', ['--pdeathsig', 'SIGKILL', '--', 'qemu-system-x86_64', ...args]] : ['qemu-system-x86_64', args];
  const start = performance.now();
  const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  const kill = (): void => {
    if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) child.kill('SIGKILL');
  };
  const unregister = onCleanup({ label: `stop QEMU (pid ${child.pid ?? '?'})`, async: async () => kill(), sync: kill });
  let out = '';
  let err = '';
  let initMs = Number.NaN;
  let readyMs = Number.NaN;
  let failure: string | null = null;
  child.stderr.on('data', (d: Buffer) => {
    err = (err + d.toString()).slice(-16384);
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('error', (e) => {
      failure ??= `cannot run QEMU: ${e.message}`;
      resolve({ code: null, signal: null });
    });
    child.once('close', (code, signal) => resolve({ code, signal }));
  });
  const timer = setTimeout(() => {
    failure ??= `no ${BENCH_MARKER.ready} and QEMU still running after ${o.timeoutMs} ms`;
    kill();
  }, o.timeoutMs);
  let grace: NodeJS.Timeout | undefined;
  child.stdout.on('data', (d: Buffer) => {
    out += d.toString();
    const text = normalize(out);
    const now = performance.now() - start;
    if (Number.isNaN(initMs) && markerRest(text, BENCH_MARKER.init) !== undefined) initMs = now;
    if (Number.isNaN(readyMs) && markerRest(text, BENCH_MARKER.ready) !== undefined) {
      readyMs = now;
      o.onReady?.();
    }
    if (grace === undefined && (/Kernel panic/.test(text) || markerRest(text, BENCH_MARKER.fail) !== undefined)) {
      grace = setTimeout(() => {
        failure ??= 'the guest failed and QEMU did not exit';
        kill();
      }, 5000);
    }
  });
  try {
    const exit = await exited;
    const exitMs = performance.now() - start;
    const text = normalize(out);
    const fail = markerRest(text, BENCH_MARKER.fail);
    const problem =
      failure ??
      (fail !== undefined ? `the guest failed: ${fail}` : /Kernel panic/.test(text) ? `the guest kernel panicked` : Number.isNaN(readyMs) ? `QEMU exited (code ${exit.code}, signal ${exit.signal}) before ${BENCH_MARKER.ready}` : null);
    const digest = (markerRest(text, BENCH_MARKER.digest) ?? '').trim().split(/\s+/);
    if (problem === null && digest[0] !== o.vm.info.workload.digest) {
      throw new Error(`bootBenchVm: the guest read other data than the image holds: digest ${digest[0] ?? '(none)'}, expected ${o.vm.info.workload.digest}\n${tail(text, 40)}`);
    }
    if (problem !== null) throw new Error(`bootBenchVm (${file}): ${problem}\n--- QEMU stderr ---\n${tail(err, 20)}\n--- serial console (tail) ---\n${tail(text, 60)}`);
    return {
      readySeconds: readyMs / 1000,
      initSeconds: initMs / 1000,
      exitSeconds: exitMs / 1000,
      guestInitUptime: Number(markerRest(text, BENCH_MARKER.init)),
      guestReadyUptime: Number(markerRest(text, BENCH_MARKER.ready)),
      digest: digest[0] ?? '',
      workloadBytes: Number(digest[1]),
      workloadFiles: Number(digest[2]),
      modules: Number(digest[3]),
      args: [cmd, ...argv],
    };
  } finally {
    clearTimeout(timer);
    clearTimeout(grace);
    kill();
    await exited;
    unregister();
  }
}
