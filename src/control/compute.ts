// The management service's face to compute: start, stop, watch and move VMs on hosts through
// their provider. Every call names a VM by (instance, host), so a VM can be found again after
// the service restarts: the provider keeps each VM's state in its own directory and the VM
// process outlives the service.

import type { Host, VmSpec } from './types.js';

export interface DiskRef {
  /** an NBD URI of an edge's storage target, or */
  uri?: string;
  /** a file (a disk at its origin, or a hydrated volume after detach). */
  file?: string;
}

export interface VmLaunch {
  instance: string;
  host: Host;
  spec: VmSpec;
  disks: DiskRef[];
  /** a cloud-init NoCloud ISO (adaptations), attached read-only. */
  configDrive?: string;
  /** start paused, waiting for a live migration's state. */
  incoming?: boolean;
}

export interface GuestReady {
  /** from QEMU's start to the guest's ready marker. */
  bootMs: number;
  hostname: string;
  machineId: string;
  mac: string;
  bootId: string;
}

export interface MigrationProgress {
  status: string;
  transferredBytes: number;
  totalBytes: number;
  remainingBytes: number;
}

export interface VmStats {
  status: string;
  pid: number;
  cpu: { processMs: number; vcpus: Array<{ index: number; ms?: number }> };
  disks: Array<{ device: string; readBytes: number; writtenBytes: number; reads: number; writes: number; flushes: number }>;
}

export interface Compute {
  /** Start the VM; when it already runs there, nothing happens. */
  start(l: VmLaunch): Promise<void>;
  /** Stop it (sync the guest first when it answers); a VM that is gone counts as stopped. */
  stop(instance: string, host: Host, o?: { sync?: boolean }): Promise<void>;
  running(instance: string, host: Host): Promise<boolean>;
  /** Wait for the guest's ready marker (it may have been printed before: the log is read whole). */
  waitReady(instance: string, host: Host, timeoutMs: number, signal?: AbortSignal): Promise<GuestReady>;
  /** Run a shell command on the guest's serial console. */
  exec(instance: string, host: Host, cmd: string, timeoutMs?: number): Promise<{ output: string; code: number }>;
  /** A crash-consistent copy of the running VM's root disk file (paused while copying). */
  snapshotDisk(instance: string, host: Host, dest: string): Promise<void>;
  /** Live-migrate RAM and CPU state from one host's VM to the other's (started with incoming). */
  migrate(instance: string, from: Host, to: Host, onProgress: (p: MigrationProgress) => void, signal?: AbortSignal): Promise<void>;
  /** Run state, CPU time and per-disk I/O counters (QMP query-status/blockstats/cpus-fast). */
  stats(instance: string, host: Host): Promise<VmStats>;
  /** Where the provider keeps this VM's files. */
  dirOf(instance: string, host: Host): string;
  /** A NoCloud config drive (ISO) with these contents, written to `file`. */
  configDrive(file: string, d: { instanceId: string; hostname: string; userData?: string; networkConfig?: string }): Promise<void>;
}
