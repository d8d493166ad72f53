// reverse (bring back): stop the instance at the cloud host, ship every pending epoch to the
// origin, take the volumes off both edges, snapshot the origin disks (a rollback point), undo
// the adaptations and restart the instance at its origin.

import { copyFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';

import type { JsonObject, StepContext, StepDef, WorkflowDef } from '../types.js';
import { InvalidInputError } from '../types.js';
import { type ControlContext, name, parseInput, edgeOf, hostOf, instanceOf, nbdUri, originEdge, subdir, volumesOf } from './context.js';
import { drivePath, outputOf } from './steps.js';
import { originHost } from './transfer.js';

const input = z.strictObject({ instance: name });

export function reverseWorkflow(c: ControlContext): WorkflowDef {
  return {
    kind: 'reverse',
    target: (i) => String(i.instance),
    validate: (i) => parseInput(input, i),
    steps: (i) => {
      const instance = String(i.instance);
      const cloud = async (ctx: StepContext) => hostOf(c, outputOf<{ host: string }>(ctx, 'select').host);
      const steps: StepDef[] = [
        {
          name: 'select',
          run: async () => {
            const inst = await instanceOf(c, instance);
            if (inst.cloneOf) throw new InvalidInputError(`${instance} is a clone of ${inst.cloneOf}: it has no origin to come back to (stop and delete it instead)`);
            if (inst.placement !== 'streamed' || !inst.host) throw new InvalidInputError(`${instance} is ${inst.placement}; only a streamed instance can be brought back`);
            const host = await hostOf(c, inst.host);
            return { host: host.name, edge: host.edge, origin: await originHost(c, { ...inst, host: null }), wasRunning: await c.compute.running(instance, host) };
          },
        },
        {
          name: 'stop-remote',
          run: async (ctx) => {
            const host = await cloud(ctx);
            await c.store.updateInstance(instance, { state: 'moving' });
            await ctx.audit('vm.stop', { instance, host: host.name });
            await c.compute.stop(instance, host, { sync: true });
            return {};
          },
          undo: async (ctx) => {
            const s = outputOf<{ wasRunning: boolean }>(ctx, 'select');
            const host = await cloud(ctx);
            if (s.wasRunning) {
              const inst = await instanceOf(c, instance);
              const edge = await edgeOf(c, host.edge);
              const disks = (await volumesOf(c, instance)).map((v) => ({ uri: nbdUri(edge, v.name) }));
              await c.compute.start({ instance, host, spec: inst.spec, disks, configDrive: drivePath(c, instance) });
              await c.compute.waitReady(instance, host, c.bootTimeoutMs, ctx.signal);
            }
            await c.store.updateInstance(instance, { state: s.wasRunning ? 'running' : 'stopped' });
          },
        },
        {
          name: 'drain',
          run: async (ctx) => {
            const host = await cloud(ctx);
            const out: JsonObject = {};
            for (const v of await volumesOf(c, instance)) {
              ctx.progress(undefined, `shipping ${v.name}'s pending writes to the origin`);
              out[v.name] = (await c.edges.drain(host.edge, v.name)) as JsonObject;
            }
            return out;
          },
        },
        {
          name: 'release-remote',
          run: async (ctx) => {
            const host = await cloud(ctx);
            for (const v of await volumesOf(c, instance)) {
              await ctx.audit('edge.volume.remove', { edge: host.edge, volume: v.name, drain: true });
              await c.edges.removeVolume(host.edge, v.name, { drain: true });
            }
            return {};
          },
          undo: async (ctx) => {
            const host = await cloud(ctx);
            const e = await originEdge(c, (await instanceOf(c, instance)).origin);
            for (const v of await volumesOf(c, instance)) await c.edges.addVolume(host.edge, { name: v.name, peer: e.name, volume: v.name, writes: v.policy });
          },
        },
        {
          name: 'snapshot-origin',
          run: async (ctx) => {
            const dir = await subdir(c, 'snapshots');
            const out: Record<string, string> = {};
            for (const v of await volumesOf(c, instance)) {
              const file = path.join(dir, `${v.name}-${ctx.workflow.id}.img`);
              ctx.progress(undefined, `snapshot of ${v.path} → ${file}`);
              await copyFile(v.path, file);
              out[v.name] = file;
            }
            return out;
          },
        },
        {
          name: 'release-origin',
          run: async (ctx) => {
            const e = await originEdge(c, (await instanceOf(c, instance)).origin);
            for (const v of await volumesOf(c, instance)) {
              await ctx.audit('edge.volume.remove', { edge: e.name, volume: v.name });
              await c.edges.removeVolume(e.name, v.name);
            }
            return { edge: e.name };
          },
          undo: async () => {
            const e = await originEdge(c, (await instanceOf(c, instance)).origin);
            for (const v of await volumesOf(c, instance)) await c.edges.addVolume(e.name, { name: v.name, source: v.path, family: v.family });
          },
        },
        {
          name: 'undo-adaptations',
          run: async (ctx) => {
            // Every adaptation lived on the config drive; the disk itself was never rewritten.
            await ctx.audit('config-drive.remove', { file: drivePath(c, instance) });
            await rm(drivePath(c, instance), { force: true });
            return { removed: ['config drive (network, mounts, monitoring agent, identity)'] };
          },
        },
        {
          name: 'restart-origin',
          run: async (ctx) => {
            const s = outputOf<{ origin: string; wasRunning: boolean }>(ctx, 'select');
            const host = await hostOf(c, s.origin);
            const inst = await instanceOf(c, instance);
            const disks = (await volumesOf(c, instance)).map((v) => ({ file: v.path }));
            await c.store.updateInstance(instance, { host: host.name, placement: 'origin' });
            if (!s.wasRunning) {
              await c.store.updateInstance(instance, { state: 'stopped' });
              return { started: false, bootMs: 0 };
            }
            await ctx.audit('vm.start', { instance, host: host.name });
            await c.compute.start({ instance, host, spec: inst.spec, disks });
            const ready = await c.compute.waitReady(instance, host, c.bootTimeoutMs, ctx.signal);
            await c.store.updateInstance(instance, { state: 'running' });
            ctx.progress(1, `${instance} runs at its origin on ${host.name} again`);
            return { started: true, bootMs: ready.bootMs };
          },
        },
      ];
      return steps;
    },
  };
}
