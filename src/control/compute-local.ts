// Compute for hosts of the `local` provider: QEMU processes on this machine, one state
// directory per (instance, host) under the service's state. QEMU runs detached, so a VM
// outlives a crash of the service; every call re-attaches through the directory.

import { existsSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';

import { buildConfigDrive } from '../compute/qemu/config-drive.js';
import { QemuVm, type QemuDiskSpec } from '../compute/qemu/vm.js';
import type { Logger } from '../log/logger.js';
import type { Compute, GuestReady, MigrationProgress, VmLaunch, VmStats } from './compute.js';
import type { Host } from './types.js';
import { InvalidInputError } from './types.js';

const BOOT_FILE = 'boot.json';

export class LocalCompute implements Compute {
  constructor(
    private readonly baseDir: string,
    private readonly log: Logger,
  ) {}

  dirOf(instance: string, host: Host): string {
    return path.join(this.baseDir, `${instance}@${host.name}`);
  }

  private check(host: Host): void {
    if (host.provider !== 'local') throw new InvalidInputError(`host ${host.name} uses provider ${host.provider}; this service only has the local provider`);
  }

  private async attach(instance: string, host: Host): Promise<QemuVm | null> {
    const dir = this.dirOf(instance, host);
    if ((await QemuVm.probe(dir)).state !== 'running') return null;
    return QemuVm.attach(dir).catch(() => null);
  }

  async start(l: VmLaunch): Promise<void> {
    this.check(l.host);
    const dir = this.dirOf(l.instance, l.host);
    const running = await this.attach(l.instance, l.host);
    if (running) {
      await running.detach();
      return;
    }
    await mkdir(dir, { recursive: true, mode: 0o700 });
    // Each start begins a fresh console.log (the previous one becomes console.log.prev).
    await writeFile(path.join(dir, BOOT_FILE), JSON.stringify({ startedAt: Date.now() }));
    const disks: QemuDiskSpec[] = l.disks.map((d) => (d.uri ? { uri: d.uri, format: 'raw' } : { file: d.file!, format: 'raw' }));
    this.log('info', 'starting VM', { instance: l.instance, host: l.host.name, disks: l.disks, incoming: !!l.incoming });
    const vm = await QemuVm.start({
      // Field by field: a spec read from the database must not carry driver options
      // (qemuBinary, extraArgs) into QEMU's command line.
      name: l.instance,
      dir,
      kernel: l.spec.kernel,
      initrd: l.spec.initrd,
      append: l.spec.append,
      memoryMiB: l.spec.memoryMiB,
      vcpus: l.spec.vcpus,
      mac: l.spec.mac,
      disks,
      ...(l.configDrive && existsSync(l.configDrive) ? { configDrive: l.configDrive } : {}),
      ...(l.incoming ? { incoming: 'defer' } : {}),
    });
    await vm.detach();
  }

  async stop(instance: string, host: Host, o: { sync?: boolean } = {}): Promise<void> {
    const vm = await this.attach(instance, host);
    if (!vm) return;
    if (o.sync && (await vm.status()).running) await vm.exec('sync', { timeoutMs: 20_000 }).catch((err: Error) => this.log('warn', 'guest did not answer sync before stop', { instance, err: err.message }));
    // The sample guest has no ACPI handling: quit at once (the guest synced, or is paused).
    await vm.stop({ gracefulTimeoutMs: 0 });
  }

  async running(instance: string, host: Host): Promise<boolean> {
    return (await QemuVm.probe(this.dirOf(instance, host))).state === 'running';
  }

  async waitReady(instance: string, host: Host, timeoutMs: number, signal?: AbortSignal): Promise<GuestReady> {
    const dir = this.dirOf(instance, host);
    const boot = JSON.parse(await readFile(path.join(dir, BOOT_FILE), 'utf8').catch(() => '{"startedAt":0}')) as { startedAt: number };
    const vm = await QemuVm.attach(dir);
    try {
      const id = await vm.waitForConsole(/SPILLWAY-GUEST hostname=(\S*) machine-id=(\S*) mac=(\S*) boot-id=(\S*)/, { timeoutMs, signal });
      await vm.waitForConsole(/SPILLWAY-GUEST-READY/, { timeoutMs, signal, fromOffset: id.offset });
      const [, hostname, machineId, mac, bootId] = id.match;
      return { bootMs: Date.now() - boot.startedAt, hostname: hostname!, machineId: machineId!, mac: mac!, bootId: bootId! };
    } finally {
      await vm.detach();
    }
  }

  async exec(instance: string, host: Host, cmd: string, timeoutMs = 30_000): Promise<{ output: string; code: number }> {
    const vm = await QemuVm.attach(this.dirOf(instance, host));
    try {
      const r = await vm.exec(cmd, { timeoutMs });
      return { output: r.output, code: r.exitCode };
    } finally {
      await vm.detach();
    }
  }

  async stats(instance: string, host: Host): Promise<VmStats> {
    const vm = await QemuVm.attach(this.dirOf(instance, host));
    try {
      const [st, cpu, disks] = [await vm.status(), await vm.cpuStats(), await vm.blockStats()];
      return {
        status: st.status,
        pid: st.pid,
        cpu: { processMs: cpu.processCpuMs, vcpus: cpu.vcpus.map((v) => ({ index: v.index, ms: v.cpuMs })) },
        disks: disks.map((d) => ({ device: d.device, readBytes: d.rdBytes, writtenBytes: d.wrBytes, reads: d.rdOperations, writes: d.wrOperations, flushes: d.flushOperations })),
      };
    } finally {
      await vm.detach();
    }
  }

  /**
   * The driver pauses a running guest for the copy. A marker file says the pause is ours: if the
   * service dies mid-copy, the guest stays paused, and the re-run (which finds it paused) must
   * still resume it.
   */
  async snapshotDisk(instance: string, host: Host, dest: string): Promise<void> {
    const dir = this.dirOf(instance, host);
    const marker = path.join(dir, 'snapshot-pause');
    const vm = await QemuVm.attach(dir);
    try {
      const st = await vm.status();
      const ours = existsSync(marker);
      if (st.running) await writeFile(marker, `${Date.now()}\n`);
      await vm.snapshotDisk({ to: dest });
      if (!st.running && ours && st.status === 'paused') {
        this.log('info', 'resuming a guest left paused by a snapshot interrupted by a crash', { instance });
        await vm.resume();
      }
      await rm(marker, { force: true });
    } finally {
      await vm.detach();
    }
  }

  /**
   * Idempotent across service crashes: QEMU carries on with a migration the service started, so
   * a re-run first asks the source where it stands and only starts one when none ran.
   */
  async migrate(instance: string, from: Host, to: Host, onProgress: (p: MigrationProgress) => void, signal?: AbortSignal): Promise<void> {
    const src = await this.attach(instance, from);
    const dst = await this.attach(instance, to);
    try {
      if (!dst) throw new Error(`the destination VM of ${instance} on ${to.name} is not running`);
      if (!src) {
        if ((await dst.status()).running) return; // finished before a crash of the service
        throw new Error(`the source VM of ${instance} on ${from.name} is gone and the destination is not running`);
      }
      const q = await src.execute<{ status?: string }>('query-migrate');
      if (q.status === 'completed') return;
      if (q.status !== 'active' && q.status !== 'setup' && q.status !== 'device') {
        const st = await dst.status();
        if (st.status !== 'inmigrate') throw new Error(`the destination VM of ${instance} is ${st.status}, not waiting for a migration`);
        // A destination that was told where to listen before a crash cannot be told again: restart it.
        const port = await freePortLocal();
        await dst.migrateIncoming(`tcp:127.0.0.1:${port}`).catch(async (err: Error) => {
          throw new Error(`the destination did not accept the incoming migration (${err.message}); stop it and run the step again`);
        });
        await src.migrate(`tcp:127.0.0.1:${port}`, { onProgress: (p) => onProgress(p), signal });
      } else {
        for (;;) {
          const r = await src.execute<{ status?: string; ram?: { transferred?: number; remaining?: number; total?: number } }>('query-migrate');
          onProgress({ status: r.status ?? '?', transferredBytes: r.ram?.transferred ?? 0, remainingBytes: r.ram?.remaining ?? 0, totalBytes: r.ram?.total ?? 0 });
          if (r.status === 'completed') break;
          if (r.status === 'failed' || r.status === 'cancelled') throw new Error(`migration of ${instance} ${r.status}`);
          await new Promise((res) => setTimeout(res, 250));
        }
      }
      await dst.waitForStatus('running', { timeoutMs: 60_000 });
    } finally {
      await src?.detach();
      await dst?.detach();
    }
  }

  async configDrive(file: string, d: { instanceId: string; hostname: string; userData?: string; networkConfig?: string }): Promise<void> {
    await buildConfigDrive(file, d);
  }
}

async function freePortLocal(): Promise<number> {
  const net = await import('node:net');
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      s.close(() => resolve(typeof a === 'object' && a ? a.port : 0));
    });
  });
}
