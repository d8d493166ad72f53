// Migration mode end to end, with real processes and a real guest:
//   1. a cloud edge hydrates a VM's root disk from the on-prem edge behind `wanem`, rate
//      limited, while the VM boots from the cloud export (its demand reads land in the volume);
//   2. the cloud edge is killed with SIGKILL at random moments and restarted; each time it
//      resumes from its bitmap (what was durable before the kill is still done after it);
//   3. when hydration is complete the hydrated file is byte-equal to the origin;
//   4. the on-prem edge and the relay are stopped, the cloud edge restarts with the origin
//      unreachable, and the VM boots and runs from the hydrated volume.
// SPILLWAY_CRASH_ITER scales the number of kills (default 4); SPILLWAY_CRASH_SEED fixes them.

import assert from 'node:assert/strict';
import { copyFile, readFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, it } from 'node:test';

import { controlCall, startTwoSites, until, type TwoSites } from '../helpers/edges.js';
import { haveCommand, tempDir } from '../helpers/proc.js';
import { prng } from '../helpers/random.js';
import { bootVm, ensureVmImages } from '../helpers/vm.js';

const VOLUME = 'root';

interface Hydration {
  state: string;
  doneChunks: number;
  totalChunks: number;
  durableChunks: number;
  demandLanded: number;
  etaSeconds: number | null;
}

describe('migration mode: hydration with kills, then the origin goes away', { timeout: 900_000 }, () => {
  it('hydrates through kill -9, equals the origin, and boots with the origin stopped', async (t) => {
    assert.ok(await haveCommand('qemu-system-x86_64'), 'qemu-system-x86_64 not found; install it with: apt-get install -y --no-install-recommends qemu-system-x86');
    const kills = Math.max(1, Math.round(Number(process.env.SPILLWAY_CRASH_ITER ?? 30) / 7.5));
    const seed = Number(process.env.SPILLWAY_CRASH_SEED ?? Math.floor(Math.random() * 1e6));
    t.diagnostic(`seed ${seed}, ${kills} kills (SPILLWAY_CRASH_SEED to repeat)`);
    const rand = prng(seed);
    const images = await ensureVmImages();
    const tmp = await tempDir('spw-migrate-');
    let sites: TwoSites | undefined;
    try {
      const root = path.join(tmp.dir, 'root.img');
      await copyFile(images.rootImg, root);
      const hydrated = path.join(tmp.dir, 'hydrated.img');
      sites = await startTwoSites(tmp.dir, root, { volume: VOLUME, wan: { delayMs: 5, rateMbit: 100 }, cloudVolume: `hydrate: { path: ${hydrated}, rate: 1Mbit }` });
      const s = sites;
      const cloudState = path.join(tmp.dir, 'state-cloud');
      const hydration = async (): Promise<Hydration | undefined> => {
        try {
          const st = (await controlCall<{ remote: Array<{ hydration?: Hydration }> }>(cloudState, 'GET', '/v1/status')).body;
          return st.remote[0]?.hydration;
        } catch {
          return undefined;
        }
      };

      // 1. The guest boots while hydration runs; its reads land in the volume.
      const boot1 = await bootVm({ images, driveUri: s.uri(VOLUME), timeoutMs: 300_000, signal: t.signal });
      assert.ok(boot1.done, 'the VM booted during hydration');
      const h1 = (await hydration())!;
      t.diagnostic(`after the first boot: ${h1.doneChunks}/${h1.totalChunks} chunks, ${h1.demandLanded} landed by demand, ETA ${h1.etaSeconds} s`);
      assert.ok(h1.demandLanded > 0, 'demand reads landed in the hydrated volume');

      // 2. Kill -9 at random moments; each restart resumes from what was durable.
      let killed = 0;
      for (let k = 0; k < kills; k++) {
        const h = await hydration();
        if (!h || h.state === 'complete') break;
        await new Promise((r) => setTimeout(r, 200 + rand() * 1500));
        const before = (await hydration())?.durableChunks ?? 0;
        s.cloud.child.kill('SIGKILL');
        await s.cloud.exited;
        killed++;
        await s.startCloud();
        const after = await until('the restarted edge to report hydration', hydration, 60_000);
        t.diagnostic(`kill ${killed}: ${before} chunks durable before, ${after.doneChunks} done after the restart`);
        assert.ok(after.doneChunks >= before, `no durable chunk is hydrated again after a kill (${before} durable before, ${after.doneChunks} after)`);
      }
      await controlCall(cloudState, 'POST', `/v1/volumes/${VOLUME}/hydrate`, { rate: 0 });
      const done = await until('hydration to complete', async () => ((await hydration())?.state === 'complete' ? hydration() : undefined), 300_000);
      assert.equal(done!.doneChunks, done!.totalChunks);

      // 3. Byte-equal to the origin.
      assert.ok((await readFile(hydrated)).equals(await readFile(root)), 'the hydrated volume equals the origin');

      // 4. Origin gone: the cloud edge restarts and serves the VM from the hydrated volume.
      await s.onprem.stop();
      await s.wanem.stop();
      await s.cloud.stop();
      await s.startCloud();
      const boot2 = await bootVm({ images, driveUri: s.uri(VOLUME), timeoutMs: 300_000, signal: t.signal });
      assert.ok(boot2.done, 'the VM booted with the origin stopped');
      assert.deepEqual(boot2.checksums, boot1.checksums, 'it read the same files');
    } finally {
      await sites?.stop();
      await tmp.cleanup();
    }
  });
});
