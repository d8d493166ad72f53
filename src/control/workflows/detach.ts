// detach (cut-over): once every chunk is hydrated at the cloud site, stop the instance, flatten
// its overlay into the hydrated files, take both edges out of its data path and restart it on
// those files. The origin disk is left as it was: a rollback point until the operator deletes it.

import { z } from 'zod';

import type { StepDef, WorkflowDef } from '../types.js';
import { InvalidInputError } from '../types.js';
import { type ControlContext, name, parseInput, hostOf, instanceOf, originEdge, volumesOf } from './context.js';
import { drivePath, hydratedPath } from './steps.js';


/** The detach steps; `prefix` keeps their names unique inside migrate. */
export function detachSteps(c: ControlContext, instance: string, prefix = ''): StepDef[] {
  return [
    {
      name: `${prefix}check`,
      run: async () => {
        const inst = await instanceOf(c, instance);
        if (inst.placement === 'migrated') return { already: true, host: inst.host ?? '' };
        if (inst.placement !== 'streamed' || !inst.host) throw new InvalidInputError(`${instance} is ${inst.placement}; only a streamed instance can be detached`);
        const host = await hostOf(c, inst.host);
        for (const v of await volumesOf(c, instance)) {
          const s = await c.edges.remoteStatus(host.edge, v.name);
          if (!s) continue; // detached already by an earlier run of this step list
          const h = s.hydration;
          if (!h) throw new InvalidInputError(`${v.name} is not hydrating at edge ${host.edge}; migrate the instance (spillway migrate ${instance}) instead of detaching it`);
          if (h.state !== 'complete') throw new InvalidInputError(`${v.name} is not completely hydrated yet (${h.doneChunks}/${h.totalChunks} chunks); wait for it (spillway volume status on the edge)`);
        }
        return { already: false, host: inst.host };
      },
    },
    {
      name: `${prefix}stop`,
      run: async (ctx) => {
        const inst = await instanceOf(c, instance);
        if (inst.placement === 'migrated') return { stopped: false };
        const host = await hostOf(c, inst.host!);
        await ctx.audit('vm.stop', { instance, host: host.name, reason: 'detach' });
        await c.compute.stop(instance, host, { sync: true });
        return { stopped: true };
      },
    },
    {
      name: `${prefix}flatten`,
      run: async (ctx) => {
        const inst = await instanceOf(c, instance);
        const host = await hostOf(c, inst.host!);
        const out: Record<string, string> = {};
        for (const v of await volumesOf(c, instance)) {
          await ctx.audit('edge.volume.detach', { edge: host.edge, volume: v.name });
          const r = await c.edges.detach(host.edge, v.name);
          const file = r?.path ?? v.hydratedPath ?? hydratedPath(c, v.name);
          await c.store.updateVolume(v.name, { hydratedPath: file });
          out[v.name] = file;
          ctx.progress(undefined, r ? `${v.name}: ${r.flattenedBytes} bytes of guest writes flattened into ${file}` : `${v.name}: detached already`);
        }
        return out;
      },
    },
    {
      name: `${prefix}release-origin`,
      run: async (ctx) => {
        const inst = await instanceOf(c, instance);
        const e = await originEdge(c, inst.origin);
        for (const v of await volumesOf(c, instance)) {
          await ctx.audit('edge.volume.remove', { edge: e.name, volume: v.name, reason: 'detach' });
          await c.edges.removeVolume(e.name, v.name);
        }
        return { edge: e.name, originKept: (await volumesOf(c, instance)).map((v) => v.path) };
      },
    },
    {
      name: `${prefix}restart`,
      run: async (ctx) => {
        const inst = await instanceOf(c, instance);
        const host = await hostOf(c, inst.host!);
        const vols = await volumesOf(c, instance);
        const disks = vols.map((v) => ({ file: v.hydratedPath ?? hydratedPath(c, v.name) }));
        await ctx.audit('vm.start', { instance, host: host.name, disks: disks.map((d) => d.file) });
        await c.compute.start({ instance, host, spec: inst.spec, disks, configDrive: drivePath(c, instance) });
        const ready = await c.compute.waitReady(instance, host, c.bootTimeoutMs, ctx.signal);
        await c.store.updateInstance(instance, { placement: 'migrated', state: 'running' });
        ctx.progress(1, `${instance} runs on ${host.name} from its own disks; no edge is in its data path`);
        return { bootMs: ready.bootMs, disks: disks.map((d) => d.file) };
      },
    },
  ];
}

const input = z.strictObject({ instance: name });

export function detachWorkflow(c: ControlContext): WorkflowDef {
  return {
    kind: 'detach',
    target: (i) => String(i.instance),
    validate: (i) => parseInput(input, i),
    steps: (i) => detachSteps(c, String(i.instance)),
  };
}
