// clone: a new instance from a crash-consistent snapshot of a running one. The snapshot is the
// base every clone of it streams from (one volume at the origin edge, one family), so clones
// share the cloud edge's cache and chunks; each clone gets its own identity (hostname, machine
// id, MAC) on its config drive and keeps its writes at the cloud site.

import { existsSync } from 'node:fs';
import { copyFile, rename } from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';

import type { StepContext, WorkflowDef } from '../types.js';
import { ConflictError, InvalidInputError } from '../types.js';
import { type ControlContext, name, parseInput, hostOf, instanceOf, originEdge, subdir, volumesOf } from './context.js';
import { type CloudPlan, cloudSteps, outputOf, randomMachineId, randomMac } from './steps.js';
import { originHost } from './transfer.js';

const input = z.strictObject({ instance: name, name, host: name.optional(), site: name.optional(), freshBase: z.boolean().default(false) });
type Input = z.infer<typeof input>;

const baseName = (volume: string) => `${volume}-base`;
const cloneVolume = (clone: string, volume: string, source: string) => (volume.startsWith(`${source}-`) ? `${clone}-${volume.slice(source.length + 1)}` : `${clone}-${volume}`);

export function cloneWorkflow(c: ControlContext): WorkflowDef {
  return {
    kind: 'clone',
    target: (i) => String(i.name),
    validate: (i) => parseInput(input, i),
    steps: (raw) => {
      const i = raw as Input;
      const plan: CloudPlan = {
        instance: () => instanceOf(c, i.name),
        volumes: async (ctx: StepContext) => outputOf<{ volumes: Array<{ clone: string; base: string; family: string }> }>(ctx, 'snapshot').volumes.map((v) => ({ remote: v.clone, origin: v.base, family: v.family, writes: 'remote-only' as const })),
        identity: async () => {
          const inst = await instanceOf(c, i.name);
          return { instanceId: inst.identity.machineId, hostname: inst.identity.hostname };
        },
        prefetch: true,
        originEdge: async (ctx) => outputOf<{ edge: string }>(ctx, 'image').edge,
      };
      return [
        {
          name: 'select',
          run: async () => {
            const src = await instanceOf(c, i.instance);
            if (src.placement !== 'origin') throw new InvalidInputError(`${i.instance} is ${src.placement}; clone it while its disks are at its origin`);
            const existing = await c.store.getInstance(i.name);
            if (existing && existing.cloneOf !== i.instance) throw new ConflictError(`an instance named ${i.name} exists already`);
            return { host: await originHost(c, src) };
          },
        },
        {
          name: 'snapshot',
          run: async (ctx) => {
            const src = await instanceOf(c, i.instance);
            const host = await hostOf(c, outputOf<{ host: string }>(ctx, 'select').host);
            const dir = await subdir(c, 'bases');
            const vols = await volumesOf(c, i.instance);
            const out: Array<{ volume: string; clone: string; base: string; file: string; family: string; reused: boolean }> = [];
            for (const [k, v] of vols.entries()) {
              const file = path.join(dir, `${baseName(v.name)}.img`);
              const reuse = existsSync(file) && !(i.freshBase && ctx.attempt === 1);
              if (!reuse) {
                const tmp = `${file}.tmp`;
                ctx.progress(k / vols.length, `snapshot of ${v.name} (${src.name} keeps running)`);
                await ctx.audit('volume.snapshot', { volume: v.name, file });
                // Only the root disk can be frozen through the VM; others are copied as they are.
                if (k === 0 && (await c.compute.running(src.name, host))) await c.compute.snapshotDisk(src.name, host, tmp);
                else await copyFile(v.path, tmp);
                await rename(tmp, file);
              }
              out.push({ volume: v.name, clone: cloneVolume(i.name, v.name, i.instance), base: baseName(v.name), file, family: v.family, reused: reuse });
            }
            return { volumes: out };
          },
        },
        {
          name: 'image',
          run: async (ctx) => {
            const e = await originEdge(c, (await instanceOf(c, i.instance)).origin);
            for (const v of outputOf<{ volumes: Array<{ base: string; file: string; family: string }> }>(ctx, 'snapshot').volumes) {
              await ctx.audit('edge.volume.add', { edge: e.name, volume: v.base, source: v.file });
              await c.edges.addVolume(e.name, { name: v.base, source: v.file, family: v.family });
            }
            return { edge: e.name };
          },
        },
        {
          name: 'register',
          run: async (ctx) => {
            const src = await instanceOf(c, i.instance);
            const existing = await c.store.getInstance(i.name);
            const identity = existing?.identity ?? { hostname: i.name, machineId: randomMachineId() };
            const mac = existing?.spec.mac ?? randomMac();
            await ctx.audit('instance.create', { instance: i.name, cloneOf: i.instance, mac, machineId: identity.machineId });
            await c.store.putInstance({ name: i.name, kind: 'vm', origin: src.origin, host: null, state: 'moving', placement: 'streamed', spec: { ...src.spec, mac }, needs: src.needs, identity, cloneOf: i.instance });
            for (const v of outputOf<{ volumes: Array<{ volume: string; clone: string; file: string; family: string }> }>(ctx, 'snapshot').volumes) {
              const sv = await c.store.getVolume(v.volume);
              await c.store.putVolume({ name: v.clone, instance: i.name, path: v.file, sizeBytes: sv?.sizeBytes ?? 0, family: v.family, policy: 'remote-only' });
            }
            return { hostname: identity.hostname, machineId: identity.machineId, mac };
          },
          undo: async () => {
            for (const v of await c.store.listVolumes(i.name)) await c.store.deleteVolume(v.name);
            await c.store.deleteInstance(i.name);
          },
        },
        ...cloudSteps(c, plan, { host: i.host, site: i.site }),
      ];
    },
  };
}
