// End to end with a real guest: record a boot profile, then replay it.
//   1. The cloud edge records the volume's reads (`record:` in its config) while a QEMU (TCG)
//      VM boots from its export; the on-prem edge maps the volume's files and pushes the rest
//      of each file the guest starts reading (group push). The profile is saved when reads go
//      idle; `spillway profile show --json` maps it to the files the guest read.
//   2. The cloud edge restarts with an empty cache and `prefetch: { profiles: [boot] }`: the
//      plan streams into the cache, and a second boot of the same VM reads every chunk from
//      the cache: the plan's chunks were used, none came over the link on demand.

import assert from 'node:assert/strict';
import { copyFile, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, it } from 'node:test';

import { controlCall, metric, startTwoSites, until, type TwoSites } from '../helpers/edges.js';
import { CLI, freePort, haveCommand, run, tempDir } from '../helpers/proc.js';
import { bootVm, ensureVmImages } from '../helpers/vm.js';

const VOLUME = 'root';

interface Status {
  local: Array<{ volume: string; groupPush: { state: string; files?: number } }>;
  remote: Array<{ volume: string; recording?: unknown; prefetch?: { state: string; planned: number; fetched: number; used: number; late: number; alreadyCached: number; hitRate: number | null } }>;
}

/** The edge's whole status, from its control socket. */
async function status(yaml: string): Promise<Status> {
  const state = /state: (.*)/.exec(await readFile(yaml, 'utf8'))![1]!.trim();
  return (await controlCall<Status>(state, 'GET', '/v1/status')).body;
}

describe('boot profiles with a real VM', { timeout: 600_000 }, () => {
  it('records a boot, maps it to files, and a replay serves the next boot from the cache', async (t) => {
    assert.ok(await haveCommand('qemu-system-x86_64'), 'qemu-system-x86_64 not found; install it with: apt-get install -y --no-install-recommends qemu-system-x86');
    const images = await ensureVmImages();
    const tmp = await tempDir('spw-profile-');
    let sites: TwoSites | undefined;
    try {
      const root = path.join(tmp.dir, 'root.img');
      await copyFile(images.rootImg, root);
      const onpremMetrics = await freePort();
      sites = await startTwoSites(tmp.dir, root, {
        volume: VOLUME,
        wan: { delayMs: 10, rateMbit: 200 },
        cloudVolume: 'record: { name: boot, idle: 10m }',
        onpremExtra: `metrics: { listen: "127.0.0.1:${onpremMetrics}" }\n`,
      });
      const s = sites;
      await until('the on-prem file map', async () => (await status(s.onpremYaml)).local[0]?.groupPush.state === 'ready');
      const boot1 = await bootVm({ images, driveUri: s.uri(VOLUME), timeoutMs: 300_000, signal: t.signal });
      assert.ok(boot1.done, 'first boot finished');
      const linkReads1 = await metric(s.metricsUrl, 'spillway_remote_chunk_reads_total', { volume: VOLUME, tier: 'link' });
      const pushed = await metric(s.metricsUrl, 'spillway_remote_chunks_received_total', { kind: 'pushed' });
      const groupQueued = await metric(`http://127.0.0.1:${onpremMetrics}/metrics`, 'spillway_local_group_pushed_total');
      t.diagnostic(`boot 1: ${boot1.timings.doneMs} ms, ${linkReads1} chunk reads went to the link; group push queued ${groupQueued}, ${pushed} pushed chunks arrived`);
      assert.ok(groupQueued > 0, 'the on-prem edge pushed the rest of files the guest read');

      // The operator ends the recording (it would end by itself after `idle`); the profile is saved.
      assert.ok((await status(s.cloudYaml)).remote[0]?.recording, 'recording while the guest runs');
      await run(process.execPath, [CLI, 'profile', 'stop', VOLUME, '--config', s.cloudYaml]);
      assert.equal((await status(s.cloudYaml)).remote[0]?.recording, undefined, 'recording stopped');
      const list = JSON.parse((await run(process.execPath, [CLI, 'profile', 'list', '--json', '--config', s.cloudYaml])).stdout) as unknown;
      const profiles = (Array.isArray(list) ? list : (list as { profiles: unknown[] }).profiles) as Array<{ name: string; chunks: number; uniqueBytes: number }>;
      const boot = profiles.find((p) => p.name === 'boot');
      assert.ok(boot, `profile list shows "boot": ${JSON.stringify(list)}`);
      assert.ok(boot.chunks > 10 && boot.uniqueBytes > 1024 * 1024, `the profile holds the boot's reads: ${JSON.stringify(boot)}`);

      const shown = JSON.parse((await run(process.execPath, [CLI, 'profile', 'show', 'boot', '--json', '--config', s.cloudYaml])).stdout) as { files?: Array<{ t: number; path: string }> };
      const paths = new Set((shown.files ?? []).map((f) => f.path));
      for (const f of ['/bin/busybox', '/data/numbers.txt', '/data/dense.bin', '/data/sparse.bin']) {
        if (!paths.has(f)) t.diagnostic(`files in the profile: ${[...paths].slice(0, 40).join(' ')}`);
        assert.ok(paths.has(f), `profile show maps reads to ${f}`);
      }
      const times = (shown.files ?? []).map((f) => f.t);
      assert.deepEqual(times, [...times].sort((a, b) => a - b), 'profile show lists files in access order');

      // Replay: a fresh cache, the plan streams in before the guest asks.
      await s.cloud.stop();
      await rm(path.join(tmp.dir, 'cache'), { recursive: true, force: true });
      await rm(path.join(tmp.dir, 'state-cloud', 'overlays'), { recursive: true, force: true });
      const yaml = (await readFile(s.cloudYaml, 'utf8')).replace('record: { name: boot, idle: 10m }', 'prefetch: { profiles: [boot] }');
      await writeFile(s.cloudYaml, yaml);
      await s.startCloud();
      const done = await until('the plan to finish', async () => {
        const p = (await status(s.cloudYaml)).remote[0]?.prefetch;
        return p?.state === 'done' ? p : undefined;
      });
      assert.equal(done.fetched + done.alreadyCached, done.planned, 'every chunk of the plan is in the cache');
      assert.ok(done.planned >= boot.chunks * 0.9, `the plan covers the profile (${done.planned} of ${boot.chunks} chunks)`);
      const before = await metric(s.metricsUrl, 'spillway_remote_chunk_reads_total', { volume: VOLUME, tier: 'link' });
      const boot2 = await bootVm({ images, driveUri: s.uri(VOLUME), timeoutMs: 300_000, signal: t.signal });
      assert.ok(boot2.done, 'second boot finished');
      assert.deepEqual(boot2.checksums, boot1.checksums, 'the guest read the same files');
      const after = await status(s.cloudYaml);
      const p = after.remote[0]!.prefetch!;
      const linkReads2 = (await metric(s.metricsUrl, 'spillway_remote_chunk_reads_total', { volume: VOLUME, tier: 'link' })) - before;
      t.diagnostic(`boot 2: ${boot2.timings.doneMs} ms; plan ${p.planned} chunks, used ${p.used}, hit rate ${p.hitRate}; ${linkReads2} chunk reads went to the link`);
      assert.ok(p.used >= boot.chunks * 0.9, `the guest used the prefetched chunks (${p.used} of ${boot.chunks})`);
      // A few chunks may still cross: those the first boot wrote before reading them back (its
      // overlay answered them, so they are not in the profile; this boot starts with no overlay).
      assert.ok(linkReads2 <= Math.max(4, boot.chunks * 0.05), `the second boot read from the cache, not the link (${linkReads2} link reads for ${boot.chunks} profiled chunks)`);
    } finally {
      await sites?.stop();
      await tmp.cleanup();
    }
  });
});
