// Steps shared by the workflows that put an instance on a cloud host: adapt (config drive),
// place (best-fit host), provision (remote volumes on the host's edge), warm (prefetch plan),
// boot (from the storage target) and verify (guest ready; cache and link figures). Each is
// idempotent and says how to undo itself.

import { randomBytes } from 'node:crypto';
import { rm } from 'node:fs/promises';
import path from 'node:path';

import { EdgeCallError } from '../edges.js';
import { chooseHost, type HostUsage } from '../placement.js';
import type { Host, Instance, Json, JsonObject, StepContext, StepDef } from '../types.js';
import { InvalidInputError } from '../types.js';
import { type ControlContext, edgeOf, hostOf, instanceOf, nbdUri, poll, subdir } from './context.js';

/** One volume as the cloud edge serves it. */
export interface CloudVolume {
  /** export name at the cloud edge (and name of the overlay, journal, hydrated file). */
  remote: string;
  /** the origin edge's name for it. */
  origin: string;
  family: string;
  writes: 'remote-only' | 'origin' | 'write-through';
}

/** How the cloud steps see the instance they act for. */
export interface CloudPlan {
  instance(ctx: StepContext): Promise<Instance>;
  volumes(ctx: StepContext): Promise<CloudVolume[]>;
  /** identity written on the config drive. */
  identity(ctx: StepContext): Promise<{ instanceId: string; hostname: string }>;
  /** hydrate the volumes at the cloud site (migration mode). */
  hydrate?: { rate?: string | number };
  /** stream prefetch plans (profiles of the family, hot spots) and record one if none exists. */
  prefetch: boolean;
  /** the origin edge's name (the cloud edge's peer). */
  originEdge(ctx: StepContext): Promise<string>;
  /** more keys for each remote volume entry at the cloud edge. */
  volumeSpec?: JsonObject;
}

export function outputOf<T>(ctx: StepContext, step: string): T {
  const o = ctx.outputs[step];
  if (o === undefined) throw new Error(`internal: step ${step} has no recorded output`);
  return o as unknown as T;
}

/** Random locally administered unicast MAC in QEMU's range. */
export function randomMac(): string {
  const b = randomBytes(3);
  return `52:54:00:${[...b].map((x) => x.toString(16).padStart(2, '0')).join(':')}`;
}

export function randomMachineId(): string {
  return randomBytes(16).toString('hex');
}

export function drivePath(c: ControlContext, instance: string): string {
  return path.join(c.dir, 'drives', `${instance}.iso`);
}

export function hydratedPath(c: ControlContext, remote: string): string {
  return path.join(c.dir, 'hydrated', `${remote}.raw`);
}

/** Resources already used on each host by running instances (for placement). */
async function usage(c: ControlContext, except: string): Promise<Map<string, HostUsage>> {
  const m = new Map<string, HostUsage>();
  for (const i of await c.store.listInstances()) {
    if (!i.host || i.name === except || i.state === 'stopped') continue;
    const u = m.get(i.host) ?? { vcpus: 0, ramMiB: 0, iops: 0, families: [] };
    u.vcpus += i.spec.vcpus;
    u.ramMiB += i.spec.memoryMiB;
    u.iops += i.needs.iops;
    for (const v of await c.store.listVolumes(i.name)) u.families.push(v.family);
    m.set(i.host, u);
  }
  return m;
}

export function placeStep(c: ControlContext, plan: CloudPlan, want: { host?: string; site?: string }): StepDef {
  return {
    name: 'place',
    run: async (ctx) => {
      const inst = await plan.instance(ctx);
      const vols = await plan.volumes(ctx);
      const p = chooseHost(
        { vcpus: inst.spec.vcpus, ramMiB: inst.spec.memoryMiB, iops: inst.needs.iops, licences: inst.needs.licences, tags: inst.needs.tags, ha: inst.needs.ha, host: want.host, site: want.site, family: vols[0]?.family },
        await c.store.listHosts(),
        await c.store.listSites(),
        await usage(c, inst.name),
      );
      if (!p.chosen) throw new InvalidInputError(`no host for ${inst.name}: ${p.explanation}`);
      ctx.progress(1, `chose ${p.chosen}: ${p.explanation}`);
      return { host: p.chosen, explanation: p.explanation, candidates: p.candidates as unknown as Json, rejected: p.rejected as unknown as Json };
    },
  };
}

async function chosenHost(c: ControlContext, ctx: StepContext): Promise<Host> {
  return hostOf(c, outputOf<{ host: string }>(ctx, 'place').host);
}

/** The adaptations, delivered on a cloud-init NoCloud drive instead of rewriting the guest disk. */
export function adaptStep(c: ControlContext, plan: CloudPlan): StepDef {
  return {
    name: 'adapt',
    run: async (ctx) => {
      const inst = await plan.instance(ctx);
      const id = await plan.identity(ctx);
      const analysis = (ctx.outputs.analyse ?? {}) as { fstab?: Array<{ spec: string; mountPoint: string; type: string; options: string }>; network?: Array<{ path: string; kind: string }> };
      const adaptations: JsonObject[] = [];
      // Network: the cloud host gives the NIC (with the instance's MAC) an address by DHCP; the
      // origin's static files found by the analysis are listed, not edited.
      const networkConfig = ['version: 2', 'ethernets:', '  nic0:', '    match:', `      macaddress: "${inst.spec.mac}"`, '    set-name: eth0', '    dhcp4: true', ''].join('\n');
      adaptations.push({ kind: 'network', what: `DHCP on eth0 (MAC ${inst.spec.mac})`, replaces: (analysis.network ?? []).map((n) => n.path) });
      // Mounts: disks appear as virtio (vdX) at the cloud host; fstab lines naming sdX/hdX get a mounts entry.
      const mounts = (analysis.fstab ?? []).filter((m) => /^\/dev\/[sh]d[a-z]/.test(m.spec)).map((m) => [m.spec.replace(/^\/dev\/[sh]d/, '/dev/vd'), m.mountPoint, m.type, m.options]);
      adaptations.push({ kind: 'mounts', what: mounts.length > 0 ? `${mounts.length} fstab device name(s) mapped to virtio` : 'fstab needs no change (no sdX/hdX device names)' });
      // Monitoring agent: a heartbeat the guest runs from user-data.
      const userData = ['#!/bin/sh', '# spillway monitoring agent: a heartbeat the cloud side can read', `echo "spillway-agent ${inst.name} start $(date +%s)" > /run/spillway-agent`, '(while :; do date +%s > /run/spillway-agent.beat; sleep 5; done) &', ...mounts.map((m) => `# mount: ${m.join(' ')}`), ''].join('\n');
      adaptations.push({ kind: 'monitoring-agent', what: 'heartbeat started from user-data (/run/spillway-agent.beat)' });
      adaptations.push({ kind: 'identity', what: `hostname ${id.hostname}, instance id ${id.instanceId}` });
      const file = drivePath(c, inst.name);
      await subdir(c, 'drives');
      await ctx.audit('config-drive.write', { file, instance: inst.name });
      await c.compute.configDrive(file, { instanceId: id.instanceId, hostname: id.hostname, userData, networkConfig });
      ctx.progress(1, `config drive ${path.basename(file)}: ${adaptations.map((a) => a.what).join('; ')}`);
      return { drive: file, adaptations };
    },
    undo: async (ctx) => {
      const inst = await plan.instance(ctx);
      await rm(drivePath(c, inst.name), { force: true });
    },
  };
}

export function provisionStep(c: ControlContext, plan: CloudPlan): StepDef {
  return {
    name: 'provision',
    run: async (ctx) => {
      const host = await chosenHost(c, ctx);
      const peer = await plan.originEdge(ctx);
      const vols = await plan.volumes(ctx);
      let profiles: string[] = [];
      if (plan.prefetch) {
        const all = await c.edges.listProfiles(host.edge).catch(() => ({ profiles: [] }));
        profiles = all.profiles.filter((p) => vols.some((v) => v.family === p.family)).map((p) => p.name);
      }
      const added: JsonObject[] = [];
      for (const v of vols) {
        const spec: JsonObject = { ...plan.volumeSpec, name: v.remote, peer, volume: v.origin, writes: v.writes };
        if (plan.prefetch) spec.prefetch = { profiles: profiles.filter((p) => p.startsWith(`${v.family}-`)), hotspots: true };
        // The first boot of a family is recorded, so that later boots and clones have a plan.
        if (plan.prefetch && !profiles.some((p) => p.startsWith(`${v.family}-`))) spec.record = { name: `${v.family}-boot`, idle: '10s' };
        if (plan.hydrate) {
          await subdir(c, 'hydrated');
          spec.hydrate = { path: hydratedPath(c, v.remote), ...(plan.hydrate.rate !== undefined ? { rate: plan.hydrate.rate } : {}) };
        }
        await ctx.audit('edge.volume.add', { edge: host.edge, volume: v.remote });
        await c.edges.addVolume(host.edge, spec).catch(async (err: unknown) => {
          // Re-run after a crash: the spec may differ in what it derived (profiles recorded since),
          // but the volume is ours when the edge serves it from the same peer volume.
          const there = err instanceof EdgeCallError && err.status === 409 ? await c.edges.remoteStatus(host.edge, v.remote) : undefined;
          if (!there || there.peer !== peer || there.origin === 'config') throw err;
          ctx.progress(undefined, `${v.remote} was added by an earlier run of this step`);
        });
        added.push(spec);
        ctx.progress(added.length / vols.length, `${v.remote} added on edge ${host.edge}`);
      }
      return { edge: host.edge, volumes: added, profiles };
    },
    undo: async (ctx) => {
      const host = await chosenHost(c, ctx);
      for (const v of await plan.volumes(ctx)) {
        // A volume that never opened holds no guest write: remove it as it is (the edge keeps
        // any overlay and journal it has). Else ship what the guest wrote first.
        const open = (await c.edges.remoteStatus(host.edge, v.remote))?.ready === true;
        const how: { discard?: boolean; drain?: boolean } = !open ? {} : v.writes === 'remote-only' ? { discard: true } : { drain: true };
        await ctx.audit('edge.volume.remove', { edge: host.edge, volume: v.remote, drain: how.drain === true, discard: how.discard === true });
        await c.edges.removeVolume(host.edge, v.remote, how);
      }
    },
  };
}

export function warmStep(c: ControlContext, plan: CloudPlan): StepDef {
  return {
    name: 'warm',
    run: async (ctx) => {
      const host = await chosenHost(c, ctx);
      const vols = await plan.volumes(ctx);
      for (const v of vols) {
        await poll(`volume ${v.remote} to open on edge ${host.edge}`, async () => {
          const s = await c.edges.remoteStatus(host.edge, v.remote);
          if (s?.error && !s.ready) ctx.progress(0, `${v.remote}: ${s.error}`);
          return s?.ready ? true : undefined;
        }, { timeoutMs: 120_000, signal: ctx.signal });
      }
      // Let the plan lead the guest's demand by a few seconds; the boot does not wait for it all.
      const t0 = Date.now();
      let summary: JsonObject = {};
      while (Date.now() - t0 < 5000) {
        const s = await c.edges.remoteStatus(host.edge, vols[0]!.remote);
        const p = s?.prefetch;
        if (!p) break;
        const got = p.fetched + p.alreadyCached;
        summary = { planned: p.planned, fetched: p.fetched, alreadyCached: p.alreadyCached, state: p.state };
        ctx.progress(p.planned > 0 ? got / p.planned : undefined, `prefetch plan: ${got}/${p.planned} chunks in the cache`, summary);
        if (p.state !== 'running') break;
        await new Promise((r) => setTimeout(r, 500));
      }
      return summary;
    },
  };
}

export function bootStep(c: ControlContext, plan: CloudPlan): StepDef {
  return {
    name: 'boot',
    run: async (ctx) => {
      const host = await chosenHost(c, ctx);
      const inst = await plan.instance(ctx);
      const edge = await edgeOf(c, host.edge);
      const disks = (await plan.volumes(ctx)).map((v) => ({ uri: nbdUri(edge, v.remote) }));
      await c.store.updateInstance(inst.name, { host: host.name, placement: 'streamed', state: 'moving' });
      await ctx.audit('vm.start', { instance: inst.name, host: host.name, disks: disks.map((d) => d.uri) });
      await c.compute.start({ instance: inst.name, host, spec: inst.spec, disks, configDrive: drivePath(c, inst.name) });
      return { host: host.name, disks: disks.map((d) => d.uri) };
    },
    undo: async (ctx) => {
      const host = await chosenHost(c, ctx);
      const inst = await plan.instance(ctx);
      await ctx.audit('vm.stop', { instance: inst.name, host: host.name });
      await c.compute.stop(inst.name, host, { sync: true });
    },
  };
}

/** Cache hits and link reads of the instance's volumes at the cloud edge (Prometheus counters). */
export async function readTiers(c: ControlContext, edge: string, volumes: string[]): Promise<{ cache: number; link: number; local: number }> {
  const text = await c.edges.metrics(edge).catch(() => '');
  const out = { cache: 0, link: 0, local: 0 };
  for (const line of text.split('\n')) {
    const m = /^spillway_remote_chunk_reads_total\{([^}]*)\} (\S+)$/.exec(line);
    if (!m) continue;
    const labels = Object.fromEntries([...m[1]!.matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    if (!volumes.includes(labels.volume ?? '')) continue;
    const tier = labels.tier as keyof typeof out;
    if (tier in out) out[tier] += Number(m[2]);
  }
  return out;
}

export function verifyStep(c: ControlContext, plan: CloudPlan): StepDef {
  return {
    name: 'verify',
    run: async (ctx) => {
      const host = await chosenHost(c, ctx);
      const inst = await plan.instance(ctx);
      const vols = (await plan.volumes(ctx)).map((v) => v.remote);
      const ticker = setInterval(() => {
        void readTiers(c, host.edge, vols).then((t) => ctx.progress(undefined, `booting on ${host.name}: ${t.cache} chunk reads from cache, ${t.link} over the link`, t));
      }, 2000);
      try {
        const ready = await c.compute.waitReady(inst.name, host, c.bootTimeoutMs, ctx.signal);
        const tiers = await readTiers(c, host.edge, vols);
        await c.store.updateInstance(inst.name, { host: host.name, placement: 'streamed', state: 'running' });
        ctx.progress(1, `${inst.name} is running on ${host.name} (guest ready ${(ready.bootMs / 1000).toFixed(1)} s after start; ${tiers.cache} reads from cache, ${tiers.link} over the link)`, { ...tiers, bootMs: ready.bootMs });
        return { ...ready, reads: tiers } as unknown as JsonObject;
      } finally {
        clearInterval(ticker);
      }
    },
  };
}

/** The cloud part of every burst: adapt → place → provision → warm → boot → verify. */
export function cloudSteps(c: ControlContext, plan: CloudPlan, want: { host?: string; site?: string }): StepDef[] {
  return [adaptStep(c, plan), placeStep(c, plan, want), provisionStep(c, plan), warmStep(c, plan), bootStep(c, plan), verifyStep(c, plan)];
}

export { instanceOf };
