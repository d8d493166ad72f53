// What every bench result file records besides its figures: the machine, the tool versions, the
// date and the git commit, so a number can be traced to what produced it. Written atomically.

import { mkdir, rename, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { runCommand } from './process.js';

export interface MachineInfo {
  date: string;
  hostKernel: string;
  nproc: number;
  cpuModel: string;
  memoryGiB: number;
  /** 1, 5 and 15 minute load averages when the bench started: other work skews the figures. */
  loadAverage: number[];
  node: string;
  git: { commit: string | null; dirty: boolean | null };
  /** Tool name → first line of its version output (or an error note). */
  tools: Record<string, string>;
}

/** First non-empty line of a command's output, or a note saying why there is none. */
export async function versionLine(cmd: string, args: string[] = ['--version']): Promise<string> {
  try {
    const r = await runCommand(cmd, args, { allowFail: true, timeoutMs: 15000 });
    const line = `${r.stdout}\n${r.stderr}`.split('\n').find((l) => l.trim() !== '');
    return line?.trim() ?? `(no output, exit ${r.code})`;
  } catch (e) {
    return `(unavailable: ${(e as Error).message.split('\n')[0]})`;
  }
}

/** HEAD of the repository at `cwd` and whether the work tree has changes (read-only git calls). */
export async function gitInfo(cwd: string): Promise<MachineInfo['git']> {
  const head = await runCommand('git', ['rev-parse', 'HEAD'], { cwd, allowFail: true }).catch(() => null);
  const status = await runCommand('git', ['status', '--porcelain', '--untracked-files=no'], { cwd, allowFail: true }).catch(() => null);
  return {
    commit: head && head.code === 0 ? head.stdout.trim() : null,
    dirty: status && status.code === 0 ? status.stdout.trim() !== '' : null,
  };
}

/** Machine facts plus the versions of `tools` (name → [command, ...args]). */
export async function machineInfo(repoDir: string, tools: Record<string, readonly string[]>): Promise<MachineInfo> {
  const versions: Record<string, string> = {};
  for (const [name, [cmd, ...args]] of Object.entries(tools)) {
    versions[name] = cmd === undefined ? '(no command)' : await versionLine(cmd, args);
  }
  return {
    date: new Date().toISOString(),
    hostKernel: `${os.type()} ${os.release()}`,
    nproc: os.availableParallelism(),
    cpuModel: os.cpus()[0]?.model ?? 'unknown',
    memoryGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    loadAverage: os.loadavg().map((l) => Math.round(l * 100) / 100),
    node: process.version,
    git: await gitInfo(repoDir),
    tools: versions,
  };
}

/** Write `data` as pretty JSON to `file` via a .tmp file and a rename (no half-written results). */
export async function writeJsonResult(file: string, data: unknown): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  const tmp = `${file}.${process.pid}.tmp`;
  await writeFile(tmp, `${JSON.stringify(data, null, 2)}\n`);
  await rename(tmp, file);
}
