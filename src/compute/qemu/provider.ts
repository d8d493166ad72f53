// Providers decide where a VM runs. Every provider has the same small interface; `local` runs
// QEMU processes on this machine, one state directory per VM under a base directory. Cloud
// providers (EC2 and peers) come later behind the same interface.
//
// Not done here: running VMs inside a network namespace (one per simulated site). The local
// provider's VMs use QEMU user-mode networking in the machine's own namespace; a namespace
// variant would start QEMU under `ip netns exec NS` with a tap device instead (see
// docs/vm-images.md).

import path from 'node:path';
import { rm, rmdir } from 'node:fs/promises';

import { ComputeError } from './errors.js';
import { QemuVm, listStateDirs, qemuVmPaths, type QemuVmSpec } from './vm.js';

/** Where a started VM is and how to reach it: what the management service records. */
export interface VmHandleInfo {
  provider: string;
  host: string;
  name: string;
  /** The VM's state directory (QemuVm.attach(dir) re-attaches). */
  dir: string;
  pid: number;
  qmpSocket: string;
  consoleSocket: string;
  consoleLog: string;
  qemuLog: string;
  mac: string;
}

/** A VM spec without the state directory: the provider chooses it. */
export type ProviderVmSpec = Omit<QemuVmSpec, 'dir'>;

export interface StartedVm {
  info: VmHandleInfo;
  vm: QemuVm;
}

export interface ProviderVmEntry {
  host: string;
  name: string;
  dir: string;
  state: 'running' | 'gone';
  pid?: number;
  /** Why it is gone, when it is. */
  reason?: string;
}

export interface Provider {
  readonly name: string;
  /** The hosts this provider can start VMs on. */
  hosts(): Promise<string[]>;
  /** Start a VM on `host`; rejects with SPW_ERR_PROVIDER for an unknown host. */
  startVm(host: string, spec: ProviderVmSpec, opts?: { timeoutMs?: number; signal?: AbortSignal }): Promise<StartedVm>;
  /** Re-attach to a VM from its state directory (VmHandleInfo.dir); SPW_ERR_VM_GONE when it is not running. */
  attach(dir: string): Promise<QemuVm>;
  /** The state directory a VM named `name` on `host` has (or would have). */
  vmDir(host: string, name: string): string;
  /** Every VM state directory this provider knows, running or not. */
  list(host?: string): Promise<ProviderVmEntry[]>;
  /** Delete a stopped VM's state directory; SPW_ERR_VM_STATE while it runs. */
  remove(host: string, name: string): Promise<void>;
}

export function handleInfo(provider: string, host: string, vm: QemuVm): VmHandleInfo {
  const p = vm.paths;
  return {
    provider,
    host,
    name: vm.name,
    dir: p.dir,
    pid: vm.pid,
    qmpSocket: p.qmp,
    consoleSocket: p.console,
    consoleLog: p.consoleLog,
    qemuLog: p.log,
    mac: vm.spec.mac,
  };
}

export interface LocalProviderOptions {
  /** One subdirectory per VM, named after it. Keep it short: socket paths must fit 107 bytes. */
  baseDir: string;
  /** The one host this provider offers (default 'local'). */
  hostName?: string;
  /** QEMU binary for VMs whose spec does not name one. */
  qemuBinary?: string;
}

/** QEMU processes on this machine. */
export class LocalProvider implements Provider {
  readonly name = 'local';
  readonly baseDir: string;
  readonly hostName: string;
  private readonly qemuBinary: string | undefined;

  constructor(opts: LocalProviderOptions) {
    this.baseDir = path.resolve(opts.baseDir);
    this.hostName = opts.hostName ?? 'local';
    this.qemuBinary = opts.qemuBinary;
  }

  hosts(): Promise<string[]> {
    return Promise.resolve([this.hostName]);
  }

  vmDir(host: string, name: string): string {
    this.checkHost(host);
    return path.join(this.baseDir, name);
  }

  async startVm(host: string, spec: ProviderVmSpec, opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<StartedVm> {
    const dir = this.vmDir(host, spec.name);
    const qemuBinary = spec.qemuBinary ?? this.qemuBinary;
    const vm = await QemuVm.start({ ...spec, dir, ...(qemuBinary !== undefined ? { qemuBinary } : {}) }, opts);
    return { info: handleInfo(this.name, host, vm), vm };
  }

  attach(dir: string): Promise<QemuVm> {
    return QemuVm.attach(dir);
  }

  async list(host?: string): Promise<ProviderVmEntry[]> {
    if (host !== undefined) this.checkHost(host);
    const out: ProviderVmEntry[] = [];
    for (const dir of await listStateDirs(this.baseDir)) {
      const probe = await QemuVm.probe(dir);
      const name = path.basename(dir);
      out.push(
        probe.state === 'running'
          ? { host: this.hostName, name, dir, state: 'running', pid: probe.pid }
          : { host: this.hostName, name, dir, state: 'gone', reason: probe.reason },
      );
    }
    return out;
  }

  async remove(host: string, name: string): Promise<void> {
    const dir = this.vmDir(host, name);
    const probe = await QemuVm.probe(dir);
    if (probe.state === 'running') throw new ComputeError('SPW_ERR_VM_STATE', `VM ${name} on ${host} still runs (pid ${probe.pid}); stop it before removing ${dir}`);
    // Only what the driver put there, then the directory if that left it empty.
    const p = qemuVmPaths(dir);
    for (const f of [p.spec, p.pid, p.qmp, p.console, p.consoleLog, `${p.consoleLog}.prev`, p.log]) await rm(f, { force: true });
    await rmdir(dir).catch(() => undefined);
  }

  private checkHost(host: string): void {
    if (host !== this.hostName) {
      throw new ComputeError('SPW_ERR_PROVIDER', `provider local: unknown host ${JSON.stringify(host)}; it only has ${JSON.stringify(this.hostName)}`);
    }
  }
}
