// transfer (burst) and migrate: select → deactivate → image → analyse → adapt → place →
// provision → warm → boot → verify; migrate adds hydrate and, unless told otherwise, the
// detach steps. The instance keeps its identity; its disks stay at the origin, streamed.

import { open } from 'node:fs/promises';
import { z } from 'zod';

import { analyzeVolume } from '../../prefetch/analyze.js';
import type { Instance, JsonObject, StepContext, StepDef, WorkflowDef } from '../types.js';
import { InvalidInputError } from '../types.js';
import { type ControlContext, hostOf, instanceOf, name, originEdge, parseInput, poll, volumesOf } from './context.js';
import { detachSteps } from './detach.js';
import { type CloudPlan, type CloudVolume, cloudSteps, outputOf } from './steps.js';

/** The origin host the instance runs on (or last ran on) at its origin site. */
export async function originHost(c: ControlContext, inst: Instance): Promise<string> {
  if (inst.host) {
    const h = await c.store.getHost(inst.host);
    if (h && h.site === inst.origin) return h.name;
  }
  const hosts = (await c.store.listHosts(inst.origin)).filter((h) => h.state === 'up');
  if (hosts.length === 0) throw new InvalidInputError(`site ${inst.origin} has no host that is up to run ${inst.name}`);
  return hosts[0]!.name;
}

/** select, deactivate, image, analyse: the origin side of a burst. */
export function originSteps(c: ControlContext, instance: string, o: { keepRunning?: boolean } = {}): StepDef[] {
  return [
    {
      name: 'select',
      run: async () => {
        const inst = await instanceOf(c, instance);
        if (inst.placement !== 'origin') throw new InvalidInputError(`${instance} is ${inst.placement}, not at its origin (bring it back first: spillway bring-back ${instance})`);
        if (inst.cloneOf) throw new InvalidInputError(`${instance} is a clone; it has no origin disk of its own to stream`);
        const host = await originHost(c, inst);
        const wasRunning = await c.compute.running(instance, await hostOf(c, host));
        await c.store.updateInstance(instance, { state: 'moving', host });
        return { host, wasRunning };
      },
      undo: async (ctx) => {
        const s = outputOf<{ host: string }>(ctx, 'select');
        const running = await c.compute.running(instance, await hostOf(c, s.host));
        await c.store.updateInstance(instance, { state: running ? 'running' : 'stopped', placement: 'origin', host: s.host });
      },
    },
    {
      name: 'deactivate',
      run: async (ctx) => {
        if (o.keepRunning) return { stopped: false };
        const s = outputOf<{ host: string; wasRunning: boolean }>(ctx, 'select');
        const host = await hostOf(c, s.host);
        if (await c.compute.running(instance, host)) {
          ctx.progress(0, `stopping ${instance} on ${host.name} (guest sync first)`);
          await ctx.audit('vm.stop', { instance, host: host.name });
          await c.compute.stop(instance, host, { sync: true });
        }
        return { stopped: s.wasRunning };
      },
      undo: async (ctx) => {
        const s = outputOf<{ host: string; wasRunning: boolean }>(ctx, 'select');
        if (!s.wasRunning || o.keepRunning) return;
        const host = await hostOf(c, s.host);
        const inst = await instanceOf(c, instance);
        const disks = (await volumesOf(c, instance)).map((v) => ({ file: v.path }));
        await ctx.audit('vm.start', { instance, host: host.name, reason: 'rollback' });
        await c.compute.start({ instance, host, spec: inst.spec, disks });
        await c.compute.waitReady(instance, host, c.bootTimeoutMs, ctx.signal);
      },
    },
    {
      name: 'image',
      run: async (ctx) => {
        const e = await originEdge(c, (await instanceOf(c, instance)).origin);
        const vols = await volumesOf(c, instance);
        for (const v of vols) {
          await ctx.audit('edge.volume.add', { edge: e.name, volume: v.name, source: v.path });
          await c.edges.addVolume(e.name, { name: v.name, source: v.path, family: v.family, ...(o.keepRunning ? { liveWriter: true } : {}) });
        }
        return { edge: e.name, volumes: vols.map((v) => v.name) };
      },
      undo: async (ctx) => {
        const s = outputOf<{ edge: string; volumes: string[] }>(ctx, 'image');
        for (const v of s.volumes) {
          await ctx.audit('edge.volume.remove', { edge: s.edge, volume: v });
          await c.edges.removeVolume(s.edge, v);
        }
      },
    },
    {
      name: 'analyse',
      run: async (ctx) => {
        const [root] = await volumesOf(c, instance);
        const fh = await open(root!.path, 'r');
        try {
          const { size } = await fh.stat();
          const a = await analyzeVolume(
            async (off, len) => {
              const b = Buffer.alloc(len);
              await fh.read(b, 0, len, off);
              return b;
            },
            size,
            { top: 5 },
          );
          const fs = a.filesystems.find((f) => f.os) ?? a.filesystems[0];
          const out = { os: fs?.os?.prettyName ?? 'unknown', filesystems: a.filesystems.length, fstab: fs?.fstab ?? [], network: fs?.network ?? [], swap: a.swap.length };
          ctx.progress(1, `${root!.name}: ${out.os}, ${out.filesystems} filesystem(s), ${out.network.length} network file(s)`);
          return out as unknown as JsonObject;
        } finally {
          await fh.close();
        }
      },
    },
  ];
}

function burstPlan(c: ControlContext, instance: string, o: { writes?: CloudVolume['writes']; hydrate?: { rate?: string | number }; prefetch: boolean }): CloudPlan {
  return {
    instance: () => instanceOf(c, instance),
    volumes: async () => (await volumesOf(c, instance)).map((v) => ({ remote: v.name, origin: v.name, family: v.family, writes: o.writes ?? (v.policy as CloudVolume['writes']) })),
    identity: async () => {
      const i = await instanceOf(c, instance);
      return { instanceId: i.identity.machineId, hostname: i.identity.hostname };
    },
    hydrate: o.hydrate,
    prefetch: o.prefetch,
    originEdge: async (ctx: StepContext) => outputOf<{ edge: string }>(ctx, 'image').edge,
  };
}

const transferInput = z.strictObject({ instance: name, host: name.optional(), site: name.optional() });

export function transferWorkflow(c: ControlContext): WorkflowDef {
  return {
    kind: 'transfer',
    target: (i) => String(i.instance),
    validate: (i) => parseInput(transferInput, i),
    steps: (input) => {
      const i = input as z.infer<typeof transferInput>;
      return [...originSteps(c, i.instance), ...cloudSteps(c, burstPlan(c, i.instance, { prefetch: true }), { host: i.host, site: i.site })];
    },
  };
}

const migrateInput = z.strictObject({ instance: name, host: name.optional(), site: name.optional(), detach: z.boolean().default(true), rate: z.union([z.string(), z.number().nonnegative()]).optional() });

/** Migration: stream at once, hydrate every chunk at the cloud site, then (by default) detach. */
export function migrateWorkflow(c: ControlContext): WorkflowDef {
  return {
    kind: 'migrate',
    target: (i) => String(i.instance),
    validate: (i) => parseInput(migrateInput, i),
    steps: (input) => {
      const i = input as z.infer<typeof migrateInput>;
      // Writes stay at the cloud site: the origin disk is the rollback point until deleted.
      const plan = burstPlan(c, i.instance, { writes: 'remote-only', hydrate: { rate: i.rate }, prefetch: true });
      const steps = [...originSteps(c, i.instance), ...cloudSteps(c, plan, { host: i.host, site: i.site }), hydrateStep(c, i.instance)];
      return i.detach ? [...steps, ...detachSteps(c, i.instance, 'migrate-')] : steps;
    },
  };
}

export function hydrateStep(c: ControlContext, instance: string): StepDef {
  return {
    name: 'hydrate',
    run: async (ctx) => {
      const inst = await instanceOf(c, instance);
      const host = await hostOf(c, inst.host!);
      const vols = await volumesOf(c, instance);
      let last = '';
      await poll(
        'hydration',
        async () => {
          let done = 0;
          let total = 0;
          let complete = true;
          let eta = 0;
          for (const v of vols) {
            const h = (await c.edges.remoteStatus(host.edge, v.name))?.hydration;
            if (!h) throw new Error(`edge ${host.edge} reports no hydration for ${v.name}`);
            done += h.doneChunks;
            total += h.totalChunks;
            eta = Math.max(eta, h.etaSeconds ?? 0);
            complete &&= h.state === 'complete';
          }
          const msg = `hydrated ${done}/${total} chunks${eta > 0 ? `, about ${Math.round(eta)} s left` : ''}`;
          if (msg !== last) ctx.progress(total > 0 ? done / total : undefined, msg, { done, total });
          last = msg;
          return complete ? { done, total } : undefined;
        },
        { timeoutMs: 24 * 3600_000, intervalMs: 1000, signal: ctx.signal },
      );
      return { volumes: vols.map((v) => v.name) };
    },
  };
}
