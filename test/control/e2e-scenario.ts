// The management service end to end, with real QEMU guests behind the WAN emulator, on one
// database (the two e2e-*.test.ts files run it on SQLite and on PostgreSQL). Every workflow is
// run once with a kill -9 of the service while one of its steps (chosen by the seed) runs, and
// must then complete after a restart, with the world in the state it promises:
//   start, cancel of a burst (rolls back), transfer (burst) → the guest writes → reverse (bring
//   back) → the write is at the origin; clone ×2 of a running source (it keeps running; distinct
//   identities; the second fetches far fewer bytes); live-migrate (the guest's counter keeps
//   counting, same boot); resize-edge; migrate + detach (the guest runs with the origin edge
//   stopped).

import assert from 'node:assert/strict';
import type { TestContext } from 'node:test';

import { startControlLab, type ControlLab } from '../helpers/control.js';
import { prng } from '../helpers/random.js';

const TERMINAL = ['succeeded', 'failed', 'cancelled'];

const STEPS: Record<string, string[]> = {
  transfer: ['select', 'deactivate', 'image', 'analyse', 'adapt', 'place', 'provision', 'warm', 'boot', 'verify'],
  reverse: ['select', 'stop-remote', 'drain', 'release-remote', 'snapshot-origin', 'release-origin', 'undo-adaptations', 'restart-origin'],
  clone: ['select', 'snapshot', 'image', 'register', 'adapt', 'place', 'provision', 'warm', 'boot', 'verify'],
  'live-migrate': ['select', 'image', 'place', 'provision', 'start-destination', 'migrate', 'finish'],
  'resize-edge': ['check', 'resize'],
  migrate: ['select', 'deactivate', 'image', 'analyse', 'adapt', 'place', 'provision', 'warm', 'boot', 'verify', 'hydrate', 'migrate-check', 'migrate-stop', 'migrate-flatten', 'migrate-release-origin', 'migrate-restart'],
};

export async function runScenario(t: TestContext, database: string | undefined): Promise<void> {
  const seed = Number(process.env.SPILLWAY_CRASH_SEED ?? Math.floor(Math.random() * 1e9));
  t.diagnostic(`seed ${seed} (SPILLWAY_CRASH_SEED)`);
  const rnd = prng(seed);
  const lab = await startControlLab({ database, instances: ['web', 'app'] });
  const log = (m: string) => t.diagnostic(m);

  /** Run a workflow; kill -9 the service once a seeded step has started, restart, wait. */
  async function crashRun(kind: string, input: Record<string, unknown>): Promise<Awaited<ReturnType<ControlLab['wait']>>> {
    const steps = STEPS[kind]!;
    const at = steps[Math.floor(rnd() * steps.length)]!;
    const w = await lab.start(kind, input);
    try {
      await lab.waitStep(w.id, at);
      await new Promise((r) => setTimeout(r, Math.floor(rnd() * 1500)));
      await lab.killService();
      log(`${kind}: service killed -9 during step ${at}`);
    } catch (err) {
      log(`${kind}: no kill (${(err as Error).message})`);
    }
    if (!(await lab.show(w.id).then(() => true, () => false))) await lab.startService();
    const done = await lab.wait(w.id, TERMINAL);
    assert.equal(done.state, 'succeeded', `${kind} ended ${done.state}: ${done.error ?? ''}\nsteps: ${JSON.stringify(done.steps.map((s) => [s.name, s.state, s.attempts]))}`);
    // Only the step that was running at the kill may have run twice.
    assert.ok(done.steps.filter((s) => s.attempts > 1).length <= 1, JSON.stringify(done.steps));
    return done;
  }

  async function instance(name: string) {
    const r = await lab.call<{ host: string | null; placement: string; state: string; identity: { hostname: string; machineId: string }; spec: { mac: string } }>('GET', `/v1/instances/${name}`);
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return r.body;
  }

  async function guestIdentity(name: string, host: string) {
    const out = await lab.exec(name, host, 'echo "$(hostname) $(cat /etc/machine-id) $(cat /sys/class/net/eth0/address) $(cat /proc/sys/kernel/random/boot_id) $(cat /run/counter)"');
    const [hostname, machineId, mac, bootId, counter] = out.trim().split(/\s+/);
    return { hostname: hostname!, machineId: machineId!, mac: mac!, bootId: bootId!, counter: Number(counter) };
  }

  let origin: Awaited<ReturnType<typeof guestIdentity>> | undefined;
  try {
    await t.test('start at the origin', async () => {
      const w = await lab.start('start', { instance: 'web' });
      assert.equal((await lab.wait(w.id)).state, 'succeeded');
      const i = await instance('web');
      assert.equal(i.host, 'dc-1');
      // At its origin the guest has its disk's identity; the service learns it at start.
      const g = await guestIdentity('web', 'dc-1');
      assert.deepEqual([i.identity.hostname, i.identity.machineId], [g.hostname, g.machineId]);
      origin = g;
    });

    await t.test('cancel of a burst rolls back: the instance runs at its origin again, nothing is left on the edges', async () => {
      const w = await lab.start('transfer', { instance: 'web' });
      await lab.waitStep(w.id, 'warm');
      const c = await lab.call('POST', `/v1/workflows/${w.id}/cancel`, {});
      assert.ok(c.status === 200 || c.status === 202, JSON.stringify(c.body));
      const done = await lab.wait(w.id);
      assert.equal(done.state, 'cancelled', done.error);
      const i = await instance('web');
      assert.equal(i.placement, 'origin');
      assert.equal(i.host, 'dc-1');
      assert.equal((await guestIdentity('web', 'dc-1')).hostname, origin!.hostname);
      const undone = done.steps.filter((s) => s.state === 'undone').map((s) => s.name);
      assert.ok(undone.includes('provision') && undone.includes('image') && undone.includes('deactivate'), JSON.stringify(done.steps));
    });

    const nonce = `burst-${seed}-${Date.now()}`;
    await t.test('transfer (burst) with a kill -9 of the service; the guest writes in the cloud', async () => {
      const before = await lab.linkBytes();
      const done = await crashRun('transfer', { instance: 'web' });
      const i = await instance('web');
      assert.deepEqual([i.placement, i.state, i.host], ['streamed', 'running', 'cloud-1']);
      const id = await guestIdentity('web', 'cloud-1');
      // A burst keeps the identity (it arrives on the config drive); only clones get new ones.
      assert.deepEqual([id.hostname, id.machineId], [origin!.hostname, origin!.machineId]);
      assert.equal(id.mac, i.spec.mac);
      log(`transfer: ${(await lab.linkBytes()) - before} link bytes; verify: ${JSON.stringify(done.outputs.verify)}`);
      // QEMU's own figures through the API: the guest read its root disk from the cloud edge.
      const st = await lab.call<{ status: string; host: string; disks: Array<{ device: string; readBytes: number }> }>('GET', '/v1/instances/web/stats');
      assert.equal(st.status, 200, JSON.stringify(st.body));
      assert.equal(st.body.status, 'running');
      assert.ok(st.body.disks.some((d) => d.readBytes > 0), JSON.stringify(st.body));
      await lab.exec('web', 'cloud-1', `echo ${nonce} > /data/burst.txt && sync`);
    });

    await t.test('reverse (bring back) with a kill -9: the write made in the cloud is at the origin', async () => {
      await crashRun('reverse', { instance: 'web' });
      const i = await instance('web');
      assert.deepEqual([i.placement, i.state, i.host], ['origin', 'running', 'dc-1']);
      assert.equal((await lab.exec('web', 'dc-1', 'cat /data/burst.txt')).trim(), nonce);
    });

    await t.test('clone twice from a running source: it keeps running, distinct identities, the second fetches far fewer bytes', async () => {
      assert.equal((await lab.wait((await lab.start('start', { instance: 'app' })).id)).state, 'succeeded');
      const source = await guestIdentity('app', 'dc-1');
      const b0 = await lab.linkBytes();
      await crashRun('clone', { instance: 'app', name: 'app-c1' });
      const b1 = await lab.linkBytes();
      const w2 = await lab.start('clone', { instance: 'app', name: 'app-c2' });
      assert.equal((await lab.wait(w2.id)).state, 'succeeded');
      const b2 = await lab.linkBytes();
      const [c1, c2] = [await instance('app-c1'), await instance('app-c2')];
      const [g1, g2] = [await guestIdentity('app-c1', c1.host!), await guestIdentity('app-c2', c2.host!)];
      log(`clone 1: ${b1 - b0} link bytes, clone 2: ${b2 - b1}; identities ${JSON.stringify([g1, g2])}`);
      assert.deepEqual([g1.hostname, g2.hostname], ['app-c1', 'app-c2']);
      assert.notEqual(g1.machineId, g2.machineId);
      assert.notEqual(g1.mac, g2.mac);
      assert.equal(g1.mac, c1.spec.mac);
      assert.equal(g1.machineId, c1.identity.machineId);
      assert.ok(b2 - b1 < (b1 - b0) / 2, `the second clone fetched ${b2 - b1} bytes, the first ${b1 - b0}`);
      // The source was snapshotted while it ran (paused for the copy only): same boot, still counting.
      const after = await guestIdentity('app', 'dc-1');
      assert.equal(after.bootId, source.bootId);
      assert.ok(after.counter > source.counter);
      assert.ok(![g1.machineId, g2.machineId].includes(after.machineId));
      for (const n of ['app-c1', 'app-c2']) assert.equal((await lab.wait((await lab.start('stop', { instance: n })).id)).state, 'succeeded');
      assert.equal((await lab.call('GET', '/v1/instances/app-c1/stats')).status, 409);
    });

    await t.test('live migration with a kill -9: the counter keeps counting, no reboot', async () => {
      const before = await guestIdentity('web', 'dc-1');
      await crashRun('live-migrate', { instance: 'web' });
      const i = await instance('web');
      assert.deepEqual([i.placement, i.state, i.host], ['streamed', 'running', 'cloud-1']);
      const after = await guestIdentity('web', 'cloud-1');
      log(`counter ${before.counter} → ${after.counter}, boot id ${before.bootId} → ${after.bootId}`);
      assert.equal(after.bootId, before.bootId);
      assert.ok(after.counter > before.counter);
      assert.equal((await lab.exec('web', 'cloud-1', 'cat /data/burst.txt')).trim(), nonce);
    });

    await t.test('resize-edge with a kill -9', async () => {
      const done = await crashRun('resize-edge', { edge: 'cloud-edge', sizeBytes: 512 * 2 ** 20 });
      assert.equal((done.outputs.resize as { sizeBytes: number }).sizeBytes, 512 * 2 ** 20);
      const e = await lab.call<{ cacheBytes?: number }>('GET', '/v1/edges/cloud-edge');
      assert.equal(e.body.cacheBytes, 512 * 2 ** 20);
    });

    await t.test('migrate + detach with a kill -9: the guest runs with the origin edge stopped', async () => {
      await crashRun('migrate', { instance: 'app' });
      const i = await instance('app');
      assert.deepEqual([i.placement, i.state], ['migrated', 'running']);
      await lab.stopOnprem();
      const out = await lab.exec('app', i.host!, 'echo after-detach > /data/detached.txt && sync && cat /data/detached.txt && md5sum /bin/busybox');
      assert.match(out, /after-detach/);
    });
  } finally {
    await lab.stop();
  }
}
