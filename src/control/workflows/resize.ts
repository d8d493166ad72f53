// resize-edge: grow or shrink a cloud edge's cache while it serves (shrinking evicts at once).

import { z } from 'zod';

import { size } from '../../edge/config.js';
import type { WorkflowDef } from '../types.js';
import { InvalidInputError } from '../types.js';
import { type ControlContext, name, parseInput, edgeOf } from './context.js';
import { outputOf } from './steps.js';


const input = z.strictObject({ edge: name, sizeBytes: size });

export function resizeEdgeWorkflow(c: ControlContext): WorkflowDef {
  return {
    kind: 'resize-edge',
    target: (i) => `edge:${String(i.edge)}`,
    validate: (i) => {
      const v = parseInput(input, i);
      if (v.sizeBytes < 16 * 2 ** 20) throw new InvalidInputError('sizeBytes: a cache smaller than 16 MiB is not useful');
      return v;
    },
    steps: (raw) => {
      const i = raw as z.infer<typeof input>;
      return [
        {
          name: 'check',
          run: async () => {
            const e = await edgeOf(c, i.edge);
            const { cache } = await c.edges.status(i.edge);
            return { previousBytes: cache?.maxBytes ?? e.cacheBytes ?? null };
          },
        },
        {
          name: 'resize',
          run: async (ctx) => {
            await ctx.audit('edge.cache.resize', { edge: i.edge, sizeBytes: i.sizeBytes });
            await c.edges.resizeCache(i.edge, i.sizeBytes);
            const e = await edgeOf(c, i.edge);
            await c.store.putEdge({ ...e, cacheBytes: i.sizeBytes });
            ctx.progress(1, `cache of ${i.edge} is now ${(i.sizeBytes / 2 ** 20).toFixed(0)} MiB`);
            return { sizeBytes: i.sizeBytes };
          },
          undo: async (ctx) => {
            const prev = outputOf<{ previousBytes: number | null }>(ctx, 'check').previousBytes;
            if (prev === null) return;
            await c.edges.resizeCache(i.edge, prev);
            const e = await edgeOf(c, i.edge);
            await c.store.putEdge({ ...e, cacheBytes: prev });
          },
        },
      ];
    },
  };
}
