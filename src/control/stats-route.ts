// GET /v1/instances/{name}/stats: what QEMU says about a running instance (run state, CPU time,
// per-disk I/O), read through QMP where it runs.

import { z } from 'zod';

import { route, type Route } from './api/router.js';
import { Name } from './api/schemas.js';
import { ApiError } from './api/errors.js';
import type { Compute } from './compute.js';
import type { Store } from './types.js';

const Stats = z
  .object({
    instance: z.string(),
    host: z.string(),
    status: z.string().meta({ description: "QEMU's run state: running, paused, inmigrate, postmigrate…" }),
    pid: z.number().int(),
    cpu: z.object({ processMs: z.number(), vcpus: z.array(z.object({ index: z.number().int(), ms: z.number().optional() })) }),
    disks: z.array(z.object({ device: z.string(), readBytes: z.number(), writtenBytes: z.number(), reads: z.number(), writes: z.number(), flushes: z.number() })),
  })
  .meta({ id: 'InstanceStats' });

export function statsRoute(store: Store, compute: Compute): Route {
  return route({
    method: 'GET',
    path: '/v1/instances/{name}/stats',
    tag: 'Inventory',
    summary: "A running instance's run state, CPU time and disk I/O counters",
    auth: 'viewer',
    params: { name: Name },
    responses: { 200: { description: 'the statistics', schema: Stats } },
    handler: async ({ params }) => {
      const inst = await store.getInstance(params.name!);
      if (!inst) throw new ApiError(404, 'SPW_ERR_NOT_FOUND', `no instance named "${params.name}"`);
      const host = inst.host ? await store.getHost(inst.host) : null;
      if (!host || !(await compute.running(inst.name, host))) throw new ApiError(409, 'SPW_ERR_CONFLICT', `${inst.name} is not running (state ${inst.state})`);
      return { status: 200, body: { instance: inst.name, host: host.name, ...(await compute.stats(inst.name, host)) } };
    },
  });
}
