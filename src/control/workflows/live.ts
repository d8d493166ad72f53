// live-migrate (run-state transfer): a running instance moves to a cloud host without a
// reboot. The origin edge serves its disk while the source VM keeps writing it (liveWriter: no
// zero map is trusted), the destination QEMU starts paused on the cloud edge's export, QEMU
// migrates RAM and CPU state, and the source stops. Nothing is read through the cloud edge
// before the switch-over (no prefetch, no recording), so its cache cannot hold a chunk the
// source changed while the migration ran. The guest's devices must match on both sides, so no
// config drive is attached: the instance keeps its identity and is not adapted.

import { z } from 'zod';

import type { StepContext, WorkflowDef } from '../types.js';
import { InvalidInputError } from '../types.js';
import { type ControlContext, name, parseInput, edgeOf, hostOf, instanceOf, nbdUri, volumesOf } from './context.js';
import { type CloudPlan, outputOf, placeStep, provisionStep } from './steps.js';
import { originSteps } from './transfer.js';

const input = z.strictObject({ instance: name, host: name.optional(), site: name.optional() });

export function liveMigrateWorkflow(c: ControlContext): WorkflowDef {
  return {
    kind: 'live-migrate',
    target: (i) => String(i.instance),
    validate: (i) => parseInput(input, i),
    steps: (raw) => {
      const i = raw as z.infer<typeof input>;
      const plan: CloudPlan = {
        instance: () => instanceOf(c, i.instance),
        volumes: async () => (await volumesOf(c, i.instance)).map((v) => ({ remote: v.name, origin: v.name, family: v.family, writes: 'origin' as const })),
        identity: async () => {
          const x = await instanceOf(c, i.instance);
          return { instanceId: x.identity.machineId, hostname: x.identity.hostname };
        },
        prefetch: false,
        // Nothing may be read through the cloud edge before the switch-over: not even the
        // partition table it reads at open to find swap partitions.
        volumeSpec: { swap: 'follow' },
        originEdge: async (ctx) => outputOf<{ edge: string }>(ctx, 'image').edge,
      };
      const source = async (ctx: StepContext) => hostOf(c, outputOf<{ host: string }>(ctx, 'select').host);
      const dest = async (ctx: StepContext) => hostOf(c, outputOf<{ host: string }>(ctx, 'place').host);
      const [select, , image] = originSteps(c, i.instance, { keepRunning: true });
      return [
        {
          ...select!,
          run: async (ctx) => {
            const out = (await select!.run(ctx)) as { wasRunning: boolean };
            if (!out.wasRunning) throw new InvalidInputError(`${i.instance} is not running; a live migration moves a running VM (use spillway burst for a stopped one)`);
            return out;
          },
        },
        image!,
        placeStep(c, plan, { host: i.host, site: i.site }),
        provisionStep(c, plan),
        {
          name: 'start-destination',
          run: async (ctx) => {
            const host = await dest(ctx);
            const inst = await instanceOf(c, i.instance);
            const edge = await edgeOf(c, host.edge);
            const disks = (await volumesOf(c, i.instance)).map((v) => ({ uri: nbdUri(edge, v.name) }));
            await ctx.audit('vm.start', { instance: i.instance, host: host.name, incoming: true });
            await c.compute.start({ instance: i.instance, host, spec: inst.spec, disks, incoming: true });
            return { host: host.name };
          },
          undo: async (ctx) => {
            const host = await dest(ctx);
            // Only while the source's CPUs still run: after the switch-over (source paused in
            // postmigrate, its process still alive) the destination is the only live copy.
            const src = await source(ctx);
            const st = (await c.compute.running(i.instance, src)) ? await c.compute.stats(i.instance, src).catch(() => null) : null;
            if (st?.status === 'running') await c.compute.stop(i.instance, host, { sync: false });
            else if (await c.compute.running(i.instance, host)) throw new Error(`the migration of ${i.instance} had switched over to ${host.name} (source ${st?.status ?? 'gone'}); it runs there now and is not rolled back`);
          },
        },
        {
          name: 'migrate',
          run: async (ctx) => {
            const from = await source(ctx);
            const to = await dest(ctx);
            await ctx.audit('vm.migrate', { instance: i.instance, from: from.name, to: to.name });
            const t0 = Date.now();
            await c.compute.migrate(
              i.instance,
              from,
              to,
              (p) => ctx.progress(p.totalBytes > 0 ? Math.min(1, p.transferredBytes / p.totalBytes) : undefined, `${p.status}: ${(p.transferredBytes / 2 ** 20).toFixed(1)} MiB of RAM sent, ${(p.remainingBytes / 2 ** 20).toFixed(1)} MiB left`, { ...p }),
              ctx.signal,
            );
            return { ms: Date.now() - t0 };
          },
        },
        {
          name: 'finish',
          run: async (ctx) => {
            const from = await source(ctx);
            const to = await dest(ctx);
            // The source is paused after the switch-over; it must not run (or sync) again.
            await ctx.audit('vm.stop', { instance: i.instance, host: from.name, reason: 'migrated away' });
            await c.compute.stop(i.instance, from, { sync: false });
            if (!(await c.compute.running(i.instance, to))) throw new Error(`the destination VM on ${to.name} is not running after the migration`);
            await c.store.updateInstance(i.instance, { host: to.name, placement: 'streamed', state: 'running' });
            const probe = await c.compute.exec(i.instance, to, 'cat /proc/uptime', 30_000).catch(() => null);
            ctx.progress(1, `${i.instance} runs on ${to.name}${probe ? ` (guest uptime ${probe.output.trim().split(' ')[0]} s: no reboot)` : ''}`);
            return { host: to.name };
          },
        },
      ];
    },
  };
}
