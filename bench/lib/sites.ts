// The two-site setup benchmarks share: a private snapshot of the build (so a rebuild during a
// long run cannot change the code under test) and the PKI, both edges and the relay started
// through test/helpers/edges.ts, stopped whatever happens (SIGINT, a thrown error).

import { existsSync } from 'node:fs';
import { cp, mkdir, realpath, symlink } from 'node:fs/promises';
import path from 'node:path';

import { metric, startTwoSites, type TwoSites, type TwoSitesOptions } from '../../test/helpers/edges.js';
import { onCleanup } from './cleanup.js';
import { processCpuSeconds } from './process.js';

/**
 * A copy of `fromRoot`'s dist/ with what it needs beside it (package.json, the native addon, a
 * node_modules link), so other people rebuilding dist/ during the run do not change the code
 * under test. Returns the copy's cli.js.
 */
export async function copyBuild(fromRoot: string, toRoot: string): Promise<string> {
  const cli = path.join(fromRoot, 'dist', 'cli.js');
  if (!existsSync(cli)) throw new Error(`${cli} is missing: run \`npm run build\` first`);
  await mkdir(path.join(toRoot, 'build'), { recursive: true });
  await cp(path.join(fromRoot, 'dist'), path.join(toRoot, 'dist'), { recursive: true });
  await cp(path.join(fromRoot, 'package.json'), path.join(toRoot, 'package.json'));
  await symlink(await realpath(path.join(fromRoot, 'node_modules')), path.join(toRoot, 'node_modules'));
  await cp(path.join(fromRoot, 'build', 'Release'), path.join(toRoot, 'build', 'Release'), { recursive: true });
  return path.join(toRoot, 'dist', 'cli.js');
}

export interface Sites {
  sites: TwoSites;
  /** the relay's stats file (rewritten every 500 ms, and once more as it exits). */
  statsFile: string;
  pids: Record<string, number>;
  stop: () => Promise<void>;
}

/** Start the two sites and make sure they are stopped whatever happens. */
export async function startSites(dir: string, image: string, o: TwoSitesOptions): Promise<Sites> {
  await mkdir(dir, { recursive: true });
  const sites = await startTwoSites(dir, image, o);
  const unregister = onCleanup({
    label: `stop the edges and relay in ${dir}`,
    async: () => sites.stop(),
    sync: () => {
      for (const p of [sites.cloud, sites.onprem, sites.wanem]) {
        if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
      }
    },
  });
  return {
    sites,
    statsFile: path.join(dir, 'wanem.json'),
    pids: { cloud: sites.cloud.child.pid ?? 0, onprem: sites.onprem.child.pid ?? 0, relay: sites.wanem.child.pid ?? 0 },
    stop: async () => {
      await sites.stop();
      unregister();
    },
  };
}

/** Cloud-edge read-path counters every streaming bench reports (before/after diffs). */
const COUNTERS: readonly [string, string, Record<string, string>][] = [
  ['readsCache', 'spillway_remote_chunk_reads_total', { tier: 'cache' }],
  ['readsLink', 'spillway_remote_chunk_reads_total', { tier: 'link' }],
  ['receivedData', 'spillway_remote_chunks_received_total', { kind: 'data' }],
  ['receivedZero', 'spillway_remote_chunks_received_total', { kind: 'zero' }],
  ['receivedSignature', 'spillway_remote_chunks_received_total', { kind: 'signature' }],
  ['coalesced', 'spillway_remote_fetches_coalesced_total', {}],
  ['readAheadChunks', 'spillway_remote_readahead_chunks_total', {}],
  ['timeouts', 'spillway_remote_fetch_timeouts_total', {}],
  ['corrupt', 'spillway_remote_chunks_corrupt_total', {}],
];

export async function counters(url: string): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const [k, name, labels] of COUNTERS) out[k] = await metric(url, name, labels).catch(() => Number.NaN);
  return out;
}

/** CPU seconds of each process so far (NaN when it is gone). */
export async function cpuOf(procs: Record<string, number>): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const [k, pid] of Object.entries(procs)) out[k] = await processCpuSeconds(pid).catch(() => Number.NaN);
  return out;
}
