// A whole deployment for the management service's end-to-end tests: an on-prem edge, the WAN
// emulator, a cloud edge with an empty cache and no volume, and the service itself (a real
// process, so that tests can kill -9 it), on SQLite or PostgreSQL. Instances are the sample
// guest (scripts/vm/build-vm.sh --guest) on copies of its root image. Every process is stopped
// by stop(), VMs included.

import { copyFile, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';

import { QemuVm, listStateDirs } from '../../src/compute/qemu/vm.js';
import type { Workflow, StepRecord } from '../../src/control/types.js';
import { makePki } from './edges.js';
import { CLI, freePort, startProc, tempDir, waitForListen, waitForProc, type Proc } from './proc.js';
import { GUEST_APPEND, ensureGuestImages } from './vm.js';

export interface LabInstance {
  name: string;
  mac: string;
  machineId: string;
}

export interface ControlLab {
  dir: string;
  state: string;
  api: string;
  token: string;
  onpremMetrics: string;
  cloudMetrics: string;
  /** bytes the WAN relay carried from the on-prem edge to the cloud edge so far. */
  linkBytes(): Promise<number>;
  call<T = unknown>(method: string, url: string, body?: unknown, token?: string | null): Promise<{ status: number; body: T }>;
  start(kind: string, input: Record<string, unknown>): Promise<Workflow>;
  show(id: string): Promise<Workflow & { steps: StepRecord[] }>;
  /** Wait until the workflow is in one of `states` (default: finished); throws on timeout. */
  wait(id: string, states?: string[], timeoutMs?: number): Promise<Workflow & { steps: StepRecord[] }>;
  /** Wait until step `name` has started (its record exists). */
  waitStep(id: string, name: string, timeoutMs?: number): Promise<void>;
  startService(): Promise<void>;
  /** kill -9 of the service process. */
  killService(): Promise<void>;
  stopOnprem(): Promise<void>;
  vmDir(instance: string, host: string): string;
  exec(instance: string, host: string, cmd: string, timeoutMs?: number): Promise<string>;
  stop(): Promise<void>;
}

export interface LabOptions {
  /** the store URL (default: SQLite in the state directory). */
  database?: string;
  instances: string[];
  wan?: { delayMs: number; rateMbit: number };
}

export async function startControlLab(o: LabOptions): Promise<ControlLab> {
  const images = await ensureGuestImages();
  const tmp = await tempDir('spw-ctl-');
  const dir = tmp.dir;
  const state = path.join(dir, 'svc');
  const pki = await makePki(dir, ['dc-edge', 'cloud-edge']);
  const [linkPort, wanPort, nbdPort, cloudMetricsPort, onpremMetricsPort, apiPort] = [await freePort(), await freePort(), await freePort(), await freePort(), await freePort(), await freePort()];
  const onpremYaml = path.join(dir, 'dc-edge.yaml');
  const cloudYaml = path.join(dir, 'cloud-edge.yaml');
  await writeFile(onpremYaml, `site: dc\nname: dc-edge\nstate: ${dir}/dc-edge\ntls: { ca: ${pki}/ca.pem, cert: ${pki}/dc-edge.pem, key: ${pki}/dc-edge.key }\nlink: { listen: "127.0.0.1:${linkPort}" }\nmetrics: { listen: "127.0.0.1:${onpremMetricsPort}" }\n`);
  await writeFile(
    cloudYaml,
    `site: cloud\nname: cloud-edge\nstate: ${dir}/cloud-edge\ntls: { ca: ${pki}/ca.pem, cert: ${pki}/cloud-edge.pem, key: ${pki}/cloud-edge.key }\nnbd: { listen: "127.0.0.1:${nbdPort}" }\nmetrics: { listen: "127.0.0.1:${cloudMetricsPort}" }\ncache: { dir: ${dir}/cache, size: 1GiB }\npeers: [ { name: dc-edge, address: "127.0.0.1:${wanPort}" } ]\n`,
  );
  const instances: LabInstance[] = [];
  const instYaml: string[] = [];
  for (const [k, name] of o.instances.entries()) {
    const disk = path.join(dir, `${name}-root.img`);
    await copyFile(images.rootImg, disk);
    const mac = `52:54:00:00:10:${(k + 1).toString(16).padStart(2, '0')}`;
    const machineId = `${(k + 1).toString(16).padStart(2, '0')}${'ab'.repeat(15)}`;
    instances.push({ name, mac, machineId });
    instYaml.push(
      `    - { name: ${name}, origin: dc, host: dc-1, spec: { kernel: ${images.kernel}, initrd: ${images.initrd}, append: "${GUEST_APPEND}", memoryMiB: 192, vcpus: 1, mac: "${mac}" }, identity: { hostname: ${name}, machineId: "${machineId}" }, volumes: [ { name: ${name}-root, path: ${disk}, family: ${name}, policy: origin } ] }`,
    );
  }
  const svcYaml = path.join(dir, 'control.yaml');
  await writeFile(
    svcYaml,
    `listen: 127.0.0.1:${apiPort}
state: ${state}
${o.database ? `database: ${o.database}\n` : ''}bootTimeout: 300s
inventory:
  sites:
    - { name: dc, kind: onprem, region: eu }
    - { name: cloud, kind: cloud, region: eu, tags: [eu] }
  edges:
    - { name: dc-edge, site: dc, control: ${dir}/dc-edge/control.sock, link: "127.0.0.1:${linkPort}" }
    - { name: cloud-edge, site: cloud, control: ${dir}/cloud-edge/control.sock, nbd: "127.0.0.1:${nbdPort}" }
  hosts:
    - { name: dc-1, site: dc, vcpus: 8, ramMiB: 8192, edge: dc-edge }
    - { name: cloud-1, site: cloud, vcpus: 8, ramMiB: 8192, edge: cloud-edge, pricePerHour: 0.4 }
    - { name: cloud-2, site: cloud, vcpus: 8, ramMiB: 8192, edge: cloud-edge, pricePerHour: 0.9 }
  instances:
${instYaml.join('\n')}
`,
  );
  const procs: { onprem?: Proc; cloud?: Proc; wanem?: Proc; service?: Proc } = {};
  const statsFile = path.join(dir, 'wanem.json');
  const wan = o.wan ?? { delayMs: 10, rateMbit: 200 };
  procs.wanem = startProc(process.execPath, [CLI, 'wanem', '--listen', `127.0.0.1:${wanPort}`, '--target', `127.0.0.1:${linkPort}`, '--delay-ms', String(wan.delayMs), '--rate-mbit', String(wan.rateMbit), '--stats-file', statsFile]);
  await waitForProc(procs.wanem, { port: wanPort });
  procs.onprem = startProc(process.execPath, [CLI, 'edge', '--config', onpremYaml]);
  await waitForProc(procs.onprem, { port: linkPort });
  procs.cloud = startProc(process.execPath, [CLI, 'edge', '--config', cloudYaml]);
  await waitForProc(procs.cloud, { port: nbdPort });
  await waitForListen({ path: `${dir}/cloud-edge/control.sock` });
  await waitForListen({ path: `${dir}/dc-edge/control.sock` });

  const api = `http://127.0.0.1:${apiPort}`;
  const lab: ControlLab = {
    dir,
    state,
    api,
    token: '',
    onpremMetrics: `http://127.0.0.1:${onpremMetricsPort}/metrics`,
    cloudMetrics: `http://127.0.0.1:${cloudMetricsPort}/metrics`,
    async linkBytes() {
      await new Promise((r) => setTimeout(r, 1200));
      try {
        return (JSON.parse(await readFile(statsFile, 'utf8')) as { bytes: { targetToClient: number } }).bytes.targetToClient;
      } catch {
        return 0;
      }
    },
    async call<T>(method: string, url: string, body?: unknown, token: string | null = lab.token) {
      const headers: Record<string, string> = {};
      if (token) headers.authorization = `Bearer ${token}`;
      if (body !== undefined) headers['content-type'] = 'application/json';
      const r = await fetch(`${api}${url}`, { method, headers, body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body) });
      const text = await r.text();
      let parsed: unknown = text;
      try {
        parsed = JSON.parse(text);
      } catch {
        /* not JSON: keep the text */
      }
      return { status: r.status, body: parsed as T };
    },
    async start(kind, input) {
      const r = await lab.call<Workflow>('POST', '/v1/workflows', { kind, input });
      if (r.status !== 202) throw new Error(`starting ${kind} answered ${r.status}: ${JSON.stringify(r.body)}`);
      return r.body;
    },
    async show(id) {
      const r = await lab.call<Workflow & { steps: StepRecord[] }>('GET', `/v1/workflows/${id}`);
      if (r.status !== 200) throw new Error(`GET workflow ${id} answered ${r.status}: ${JSON.stringify(r.body)}`);
      return r.body;
    },
    async wait(id, states = ['succeeded', 'failed', 'cancelled'], timeoutMs = 600_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const w = await lab.show(id).catch(() => null);
        if (w && states.includes(w.state)) return w;
        if (Date.now() > deadline) throw new Error(`workflow ${id} is ${w?.state ?? 'unknown'} (step ${w?.step}), not ${states.join('|')}, after ${timeoutMs / 1000} s: ${JSON.stringify(w)}`);
        await new Promise((r) => setTimeout(r, 500));
      }
    },
    async waitStep(id, name, timeoutMs = 600_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const w = await lab.show(id);
        if (w.steps.some((s) => s.name === name)) return;
        if (['succeeded', 'failed', 'cancelled'].includes(w.state)) throw new Error(`workflow ${id} ended (${w.state}: ${w.error ?? ''}) before step ${name}`);
        if (Date.now() > deadline) throw new Error(`workflow ${id} did not reach step ${name}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    },
    async startService() {
      procs.service = startProc(process.execPath, [CLI, 'service', 'run', '--config', svcYaml]);
      await waitForProc(procs.service, { port: apiPort });
      lab.token = (await readFile(path.join(state, 'operator.token'), 'utf8')).trim();
    },
    async killService() {
      const p = procs.service;
      procs.service = undefined;
      if (!p) return;
      p.child.kill('SIGKILL');
      await p.stop();
    },
    async stopOnprem() {
      await procs.onprem?.stop();
      procs.onprem = undefined;
    },
    vmDir: (instance, host) => path.join(state, 'vms', `${instance}@${host}`),
    async exec(instance, host, cmd, timeoutMs = 60_000) {
      const vm = await QemuVm.attach(lab.vmDir(instance, host));
      try {
        const r = await vm.exec(cmd, { timeoutMs });
        if (r.exitCode !== 0) throw new Error(`guest ${instance}@${host}: \`${cmd}\` exited ${r.exitCode}: ${r.output}`);
        return r.output;
      } finally {
        await vm.detach();
      }
    },
    async stop() {
      await procs.service?.stop();
      for (const d of await listStateDirs(path.join(state, 'vms')).catch(() => [] as string[])) {
        const vm = await QemuVm.attach(d).catch(() => null);
        await vm?.kill().catch(() => undefined);
      }
      await Promise.all([procs.cloud?.stop(), procs.onprem?.stop(), procs.wanem?.stop()]);
      if (!process.env.SPILLWAY_KEEP_TEST_DIRS) await tmp.cleanup();
    },
  };
  try {
    await lab.startService();
  } catch (err) {
    await lab.stop();
    throw err;
  }
  return lab;
}
