// start and stop: run an instance where its data path is now (origin disks, the cloud edge's
// export, or its hydrated disks), or stop it after syncing the guest.

import { existsSync } from 'node:fs';
import { z } from 'zod';

import type { DiskRef } from '../compute.js';
import type { Instance, WorkflowDef } from '../types.js';
import { InvalidInputError } from '../types.js';
import { type ControlContext, name, parseInput, edgeOf, hostOf, instanceOf, nbdUri, volumesOf } from './context.js';
import { drivePath, hydratedPath } from './steps.js';
import { originHost } from './transfer.js';

const input = z.strictObject({ instance: name });

async function disksOf(c: ControlContext, inst: Instance, edge: string | null): Promise<DiskRef[]> {
  const vols = await volumesOf(c, inst.name);
  if (inst.placement === 'origin') return vols.map((v) => ({ file: v.path }));
  if (inst.placement === 'migrated') return vols.map((v) => ({ file: v.hydratedPath ?? hydratedPath(c, v.name) }));
  const e = await edgeOf(c, edge!);
  return vols.map((v) => ({ uri: nbdUri(e, v.name) }));
}

export function startWorkflow(c: ControlContext): WorkflowDef {
  return {
    kind: 'start',
    target: (i) => String(i.instance),
    validate: (i) => parseInput(input, i),
    steps: (i) => [
      {
        name: 'start',
        run: async (ctx) => {
          const inst = await instanceOf(c, String(i.instance));
          const hostName = inst.host ?? (inst.placement === 'origin' ? await originHost(c, inst) : null);
          if (!hostName) throw new InvalidInputError(`${inst.name} has no host; burst or migrate it instead`);
          const host = await hostOf(c, hostName);
          const drive = inst.placement !== 'origin' && existsSync(drivePath(c, inst.name)) ? drivePath(c, inst.name) : undefined;
          await ctx.audit('vm.start', { instance: inst.name, host: host.name });
          await c.compute.start({ instance: inst.name, host, spec: inst.spec, disks: await disksOf(c, inst, host.edge), configDrive: drive });
          await c.store.updateInstance(inst.name, { host: host.name, state: 'running' });
          const ready = await c.compute.waitReady(inst.name, host, c.bootTimeoutMs, ctx.signal);
          // At its origin the guest's identity is its own disk's: learn it, so that a burst keeps it.
          if (inst.placement === 'origin') await c.store.updateInstance(inst.name, { identity: { hostname: ready.hostname, machineId: ready.machineId } });
          ctx.progress(1, `${inst.name} is running on ${host.name} (ready in ${(ready.bootMs / 1000).toFixed(1)} s)`);
          return { host: host.name, bootMs: ready.bootMs };
        },
      },
    ],
  };
}

export function stopWorkflow(c: ControlContext): WorkflowDef {
  return {
    kind: 'stop',
    target: (i) => String(i.instance),
    validate: (i) => parseInput(input, i),
    steps: (i) => [
      {
        name: 'stop',
        run: async (ctx) => {
          const inst = await instanceOf(c, String(i.instance));
          if (inst.host) {
            const host = await hostOf(c, inst.host);
            await ctx.audit('vm.stop', { instance: inst.name, host: host.name });
            await c.compute.stop(inst.name, host, { sync: true });
          }
          await c.store.updateInstance(inst.name, { state: 'stopped' });
          return {};
        },
      },
    ],
  };
}
