// Detach (POST /v1/volumes/NAME/detach) with real edges and NBD clients: a volume added in
// migration mode hydrates, the guest writes through the export, and detach flattens the
// overlay into the hydrated file, which then equals byte for byte what nbdcopy read through the
// export before. Refused while hydration is incomplete or a client is connected; repeating it
// answers the same. Then the same under kill -9 in the middle of the flatten (held there by the
// SPILLWAY_TEST_FLATTEN_HOLD hook): the file is half flattened, the restarted edge serves the
// volume unchanged from its intact overlay, and a second detach completes the file.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import { bitmapPathOf, statePathOf } from '../../src/hydrate/hydrated-device.js';
import { controlCall, startTwoSites, until, waitForExport, type TwoSites } from '../helpers/edges.js';
import { requireCommands } from '../helpers/nbd-tools.js';
import { run, tempDir } from '../helpers/proc.js';
import { makeSparseImage } from '../helpers/random.js';

const MiB = 1024 * 1024;
const SIZE = 6 * MiB;


interface Hydration {
  state: string;
  doneChunks: number;
  totalChunks: number;
}

/** The guest's writes: data in three places far apart (more than one flatten piece), zeroes
 *  over data, and a partial granule. */
const WRITES = ['write -P 0x11 0 64k', 'write -z 1M 128k', 'write -P 0x22 3145728 8k', 'write -P 0x33 5242880 1000', 'flush'];

describe('detach: flatten a hydrated volume into its file', { timeout: 600_000 }, () => {
  let tmp: { dir: string; cleanup: () => Promise<void> };
  let sites: TwoSites;
  let origin: Buffer;
  const hold = (): string => path.join(tmp.dir, 'hold-flatten');

  before(async () => {
    await requireCommands('nbdinfo', 'nbdcopy', 'qemu-io');
    tmp = await tempDir('spw-detach-');
    const disk = path.join(tmp.dir, 'disk.img');
    origin = await makeSparseImage(disk, SIZE, 11, 0.3);
    sites = await startTwoSites(tmp.dir, disk, { cloudNoVolume: true, env: { cloud: { ...process.env, SPILLWAY_TEST_FLATTEN_HOLD: path.join(tmp.dir, 'hold-flatten') } } });
  });

  after(async () => {
    await sites?.stop();
    await tmp?.cleanup();
  });

  const hydration = async (name: string): Promise<Hydration | undefined> => (await controlCall<{ remote: Array<{ volume: string; hydration?: Hydration }> }>(sites.cloudState, 'GET', '/v1/status')).body.remote.find((v) => v.volume === name)?.hydration;

  /** Add a migration-mode volume, wait until it is hydrated, write through it; returns what
   *  the guest sees (nbdcopy through the export). */
  async function hydratedWithWrites(name: string): Promise<{ file: string; seen: Buffer }> {
    const file = path.join(tmp.dir, `${name}.img`);
    const add = await controlCall(sites.cloudState, 'POST', '/v1/volumes', { name, peer: 'onprem', volume: 'disk', hydrate: { path: file } });
    assert.equal(add.status, 201, JSON.stringify(add.body));
    await waitForExport(sites.uri(name));
    await until(`hydration of ${name}`, async () => (await hydration(name))?.state === 'complete', 120_000);
    await run('qemu-io', ['-f', 'raw', ...WRITES.flatMap((c) => ['-c', c]), sites.uri(name)]);
    const seenFile = path.join(tmp.dir, `${name}.seen`);
    await run('nbdcopy', [sites.uri(name), seenFile]);
    const seen = await readFile(seenFile);
    assert.ok(!seen.equals(origin), 'the guest wrote something');
    assert.ok(seen.subarray(0, 65536).equals(Buffer.alloc(65536, 0x11)));
    assert.ok(seen.subarray(MiB, MiB + 128 * 1024).equals(Buffer.alloc(128 * 1024)));
    return { file, seen };
  }

  it('refuses while hydration is incomplete, and for a volume without hydrate:', async () => {
    const add = await controlCall(sites.cloudState, 'POST', '/v1/volumes', { name: 'paused', peer: 'onprem', volume: 'disk', hydrate: { path: path.join(tmp.dir, 'paused.img'), start: false } });
    assert.equal(add.status, 201);
    await waitForExport(sites.uri('paused'));
    const r = await controlCall<{ error: string }>(sites.cloudState, 'POST', '/v1/volumes/paused/detach', {});
    assert.equal(r.status, 409);
    assert.match(r.body.error, /hydration of "paused" is not complete/);
    await waitForExport(sites.uri('paused'), 5000); // still served
    assert.equal((await controlCall(sites.cloudState, 'DELETE', '/v1/volumes/paused')).status, 200);
    assert.ok(existsSync(path.join(tmp.dir, 'paused.img')), 'the hydrated file is never deleted by a removal');
    assert.equal((await controlCall(sites.cloudState, 'POST', '/v1/volumes', { name: 'plain', peer: 'onprem', volume: 'disk' })).status, 201);
    const p = await controlCall<{ error: string }>(sites.cloudState, 'POST', '/v1/volumes/plain/detach', {});
    assert.equal(p.status, 409);
    assert.match(p.body.error, /not in migration mode/);
    assert.equal((await controlCall(sites.cloudState, 'DELETE', '/v1/volumes/plain')).status, 200);
  });

  it('flattens: the detached file equals what the guest saw; refused while a client is connected; repeatable', async () => {
    const { file, seen } = await hydratedWithWrites('mig');
    // a connected client: refused
    const child = spawn('qemu-io', ['-f', 'raw', sites.uri('mig')], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stdin.write('read 0 512\n');
    try {
      await until('qemu-io to connect', async () => /read 512\/512/.test(out), 30_000);
      const r = await controlCall<{ error: string }>(sites.cloudState, 'POST', '/v1/volumes/mig/detach', {});
      assert.equal(r.status, 409);
      assert.match(r.body.error, /NBD client connected/);
    } finally {
      child.stdin.end('quit\n');
      await new Promise((r) => child.once('exit', r));
    }
    const d = await controlCall<{ volume: string; path: string; size: number; flattenedBytes: number }>(sites.cloudState, 'POST', '/v1/volumes/mig/detach', {});
    assert.equal(d.status, 200, JSON.stringify(d.body));
    assert.equal(d.body.path, file);
    assert.equal(d.body.size, SIZE);
    assert.ok(d.body.flattenedBytes >= 64 * 1024 + 128 * 1024 + 8 * 1024 + 1000, `flattened ${d.body.flattenedBytes} bytes`);
    assert.ok((await readFile(file)).equals(seen), 'the detached file equals what the guest saw, byte for byte');
    for (const f of [bitmapPathOf(file), statePathOf(file), path.join(sites.cloudState, 'overlays', 'mig.overlay'), path.join(sites.cloudState, 'overlays', 'mig.overlay.bitmap')]) {
      assert.equal(existsSync(f), false, `${f} is gone`);
    }
    const gone = await run('nbdinfo', ['--size', sites.uri('mig')], { allowFail: true });
    assert.notEqual(gone.code, 0, 'the export is gone');
    // a raw image a VM (here: qemu-io) opens directly, with the file lock free
    const q = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x11 0 64k', file]);
    assert.match(q.stdout, /read 65536\/65536/);
    // repeated: the same answer
    const again = await controlCall<{ path: string; flattenedBytes: number }>(sites.cloudState, 'POST', '/v1/volumes/mig/detach', {});
    assert.equal(again.status, 200);
    assert.deepEqual(again.body, d.body);
    const st = await controlCall<{ detached: Array<{ volume: string }> }>(sites.cloudState, 'GET', '/v1/status');
    assert.ok(st.body.detached.some((x) => x.volume === 'mig'));
  });

  it('survives kill -9 in the middle of the flatten: the restarted edge serves the volume unchanged and a second detach completes the file', async () => {
    const { file, seen } = await hydratedWithWrites('mig2');
    await writeFile(hold(), 'hold\n');
    const first = controlCall(sites.cloudState, 'POST', '/v1/volumes/mig2/detach', {}).catch((err: Error) => err);
    await until('the flatten to be held', async () => /flatten held/.test(sites.cloud.stderr()), 60_000);
    sites.cloud.child.kill('SIGKILL');
    await sites.cloud.exited;
    assert.ok((await first) instanceof Error, 'the first detach never answered');
    const half = await readFile(file);
    assert.ok(half.subarray(0, 65536).equals(seen.subarray(0, 65536)), 'the first piece was flattened');
    assert.ok(!half.subarray(3 * MiB, 3 * MiB + 8192).equals(seen.subarray(3 * MiB, 3 * MiB + 8192)), 'a later piece was not: the edge died mid-flatten');
    assert.ok(existsSync(path.join(sites.cloudState, 'overlays', 'mig2.overlay')), 'the overlay is intact');
    await rm(hold());

    await sites.startCloud();
    await waitForExport(sites.uri('mig2'));
    const servedFile = path.join(tmp.dir, 'mig2.after-restart');
    await run('nbdcopy', [sites.uri('mig2'), servedFile]);
    assert.ok((await readFile(servedFile)).equals(seen), 'after the crash the volume reads exactly as before');
    await until('the restarted edge to report hydration complete', async () => (await hydration('mig2'))?.state === 'complete', 60_000);
    const d = await controlCall<{ path: string; flattenedBytes: number }>(sites.cloudState, 'POST', '/v1/volumes/mig2/detach', {});
    assert.equal(d.status, 200, JSON.stringify(d.body));
    assert.ok((await readFile(file)).equals(seen), 'the second detach completed the file: it equals what the guest saw');
    assert.equal(existsSync(path.join(sites.cloudState, 'overlays', 'mig2.overlay')), false);
    // after another restart the detached volume stays detached
    await sites.cloud.stop();
    await sites.startCloud();
    const st = await until('the restarted edge', async () => (await controlCall<{ remote: Array<{ volume: string }>; detached: Array<{ volume: string }> }>(sites.cloudState, 'GET', '/v1/status')).body);
    assert.ok(!st.remote.some((v) => v.volume === 'mig2'));
    assert.ok(st.detached.some((v) => v.volume === 'mig2'));
    assert.ok((await readFile(file)).equals(seen));
  });
});
