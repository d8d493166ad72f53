// End to end with a real guest: a QEMU (TCG) VM boots from the cloud edge's export of a root
// disk that stays at the on-prem edge, writes /data.txt (spw.write=TEXT), syncs, remounts its
// root read-only and powers off. Then, by the volume's write policy:
//   - origin: `spillway volume drain` ships every epoch; the origin image is a clean ext4
//     (e2fsck -fn) holding the guest's file, the cloud edge counted acknowledged epochs, and the
//     cloud export reads exactly what the origin now holds;
//   - remote-only (the default): the origin image is byte-for-byte unchanged, and the file is
//     readable through the cloud export only.
// Nothing here skips: a missing QEMU or e2fsprogs fails the test with the package to install.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import path from 'node:path';
import { describe, it, type TestContext } from 'node:test';

import { metric, startTwoSites, type TwoSites } from '../helpers/edges.js';
import { CLI, haveCommand, run, tempDir } from '../helpers/proc.js';
import { bootVm, ensureVmImages, type VmBoot, type VmImages } from '../helpers/vm.js';

/** The file the guest's run.sh writes for spw.write=TEXT (scripts/vm/build-vm.sh). */
const GUEST_FILE = '/data.txt';
const VOLUME = 'root';
const WAN = { delayMs: 10, rateMbit: 100 };
// e2fsprogs lives in /usr/sbin, which a non-root PATH may lack.
const SBIN_ENV = { ...process.env, PATH: `${process.env.PATH ?? ''}:/usr/sbin:/sbin` };

async function requireTools(): Promise<void> {
  for (const [cmd, pkg] of [['debugfs', 'e2fsprogs'], ['e2fsck', 'e2fsprogs'], ['nbdcopy', 'libnbd-bin'], ['cmp', 'diffutils']] as const) {
    const r = await run('sh', ['-c', `command -v ${cmd}`], { allowFail: true, env: SBIN_ENV });
    assert.equal(r.code, 0, `${cmd} not found; install it with: apt-get install -y --no-install-recommends ${pkg}`);
  }
  assert.ok(await haveCommand('qemu-system-x86_64'), 'qemu-system-x86_64 not found; install it with: apt-get install -y --no-install-recommends qemu-system-x86');
}

/** A unique text the guest can take on its kernel command line (no spaces). */
function uniqueText(what: string): string {
  return `spillway-${what}-${randomBytes(12).toString('hex')}`;
}

async function sha256(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file)) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** Copy an image the way an operator would (reflink when possible, holes kept). */
async function copyImage(from: string, to: string): Promise<void> {
  await run('cp', ['--reflink=auto', '--sparse=always', from, to]);
}

/** The content of PATH inside an ext4 image, or undefined when debugfs cannot find it. */
async function debugfsCat(image: string, file: string): Promise<{ text: string | undefined; stderr: string }> {
  const r = await run('debugfs', ['-R', `cat ${file}`, image], { env: SBIN_ENV });
  // debugfs exits 0 even when the file is missing; it says so on stderr ("File not found by ext2_lookup").
  const missing = /not found|No such file/i.test(r.stderr);
  return { text: missing ? undefined : r.stdout, stderr: r.stderr };
}

async function assertCleanFs(image: string): Promise<void> {
  const r = await run('e2fsck', ['-fn', image], { allowFail: true, env: SBIN_ENV });
  assert.equal(r.code, 0, `e2fsck -fn ${image} exited ${r.code}:\n${r.stdout}${r.stderr}`);
}

async function assertSameBytes(a: string, b: string): Promise<void> {
  const r = await run('cmp', [a, b], { allowFail: true });
  assert.equal(r.code, 0, `${a} and ${b} differ: ${r.stdout}${r.stderr}`);
}

interface VolumeStatus {
  volume: string;
  ready: boolean;
  writes?: { policy: string; lastSealed: number; ackedSeq: number; unshippedBytes: number; unsealedBytes: number; batches: number; lastError: string };
}

async function volumeStatus(sites: TwoSites): Promise<VolumeStatus> {
  const r = await run(process.execPath, [CLI, 'volume', 'status', VOLUME, '--config', sites.cloudYaml, '--json']);
  return JSON.parse(r.stdout) as VolumeStatus;
}

/** What the guest did to the export, from the cloud edge's block metrics. */
async function guestIo(sites: TwoSites): Promise<string> {
  const bytes = (op: string) => metric(sites.metricsUrl, 'spillway_block_bytes_total', { export: VOLUME, op });
  return `guest I/O on the export: ${await bytes('read')} bytes read, ${await bytes('write')} written, ${await bytes('zero')} zeroed, ${await bytes('trim')} trimmed`;
}

/** Boot the VM from the cloud export with spw.write=TEXT; it must finish, having written the file. */
async function bootAndWrite(t: TestContext, images: VmImages, sites: TwoSites, text: string): Promise<VmBoot> {
  const boot = await bootVm({ images, driveUri: sites.uri(VOLUME), timeoutMs: 300_000, signal: t.signal, append: `spw.write=${text}` });
  t.diagnostic(`VM: ready after ${Math.round(boot.timings.readyMs)} ms, done after ${Math.round(boot.timings.doneMs)} ms, exited after ${Math.round(boot.timings.exitMs)} ms`);
  assert.ok(boot.ready && boot.done && !boot.panic && boot.fail === undefined, boot.console.slice(-2000));
  assert.equal(boot.data, undefined, `${GUEST_FILE} must not exist before the guest writes it`);
  assert.ok(boot.wrote, `the guest wrote ${GUEST_FILE}:\n${boot.console.slice(-2000)}`);
  assert.equal(boot.exit.code, 0, `QEMU exits by itself once the guest powers off: ${JSON.stringify(boot.exit)}`);
  return boot;
}

describe('a VM writes to a disk served from the other site', { timeout: 900_000 }, () => {
  it('origin policy: after a drain the origin image is clean ext4 and holds what the guest wrote', async (t) => {
    await requireTools();
    const images = await ensureVmImages();
    const tmp = await tempDir('spw-vm-origin-');
    let sites: TwoSites | undefined;
    try {
      const root = path.join(tmp.dir, 'root.img');
      await copyImage(images.rootImg, root);
      const pristineSum = await sha256(root);
      const text = uniqueText('origin');
      sites = await startTwoSites(tmp.dir, root, { volume: VOLUME, cloudVolume: 'writes: origin, rpo: 2s', wan: WAN });
      assert.equal((await volumeStatus(sites)).writes?.policy, 'origin', 'the cloud volume runs the origin policy');

      await bootAndWrite(t, images, sites, text);
      t.diagnostic(await guestIo(sites));

      // Without being asked (no drain), the shipper sends sealed epochs on its RPO timer (2 s
      // here). A liveness check, not a timing one: the bound is far above the RPO.
      const sealedAtEnd = (await volumeStatus(sites)).writes!.lastSealed;
      const rpoDeadline = Date.now() + 60_000;
      let beforeDrain = await volumeStatus(sites);
      while (beforeDrain.writes!.ackedSeq < sealedAtEnd && Date.now() < rpoDeadline) {
        await new Promise((r) => setTimeout(r, 250));
        beforeDrain = await volumeStatus(sites);
      }
      assert.ok(sealedAtEnd > 0 && beforeDrain.writes!.ackedSeq >= sealedAtEnd, `epochs reach the origin on the RPO timer, before any drain: ${JSON.stringify(beforeDrain.writes)}`);

      const drainStart = Date.now();
      const drained = await run(process.execPath, [CLI, 'volume', 'drain', VOLUME, '--config', sites.cloudYaml, '--timeout', '180'], { allowFail: true });
      assert.equal(drained.code, 0, `spillway volume drain failed:\n${drained.stdout}${drained.stderr}\n--- cloud edge ---\n${sites.cloud.stderr().slice(-3000)}`);
      t.diagnostic(`drain: ${Date.now() - drainStart} ms: ${drained.stdout.trim()}`);

      const status = await volumeStatus(sites);
      t.diagnostic(`status after drain: ${JSON.stringify(status.writes)}`);
      const w = status.writes;
      assert.ok(w, 'the volume reports its writes');
      assert.ok(w.lastSealed > 0, 'the guest\'s writes were sealed into epochs');
      assert.equal(w.ackedSeq, w.lastSealed, 'the origin acknowledged every sealed epoch');
      assert.equal(w.unshippedBytes, 0, 'nothing is left to ship');
      const acked = await metric(sites.metricsUrl, 'spillway_writeback_epochs_total', { volume: VOLUME, event: 'acked' });
      const sealed = await metric(sites.metricsUrl, 'spillway_writeback_epochs_total', { volume: VOLUME, event: 'sealed' });
      t.diagnostic(`epochs: ${sealed} sealed, ${acked} acknowledged; ${await metric(sites.metricsUrl, 'spillway_writeback_shipped_bytes_total', { volume: VOLUME })} bytes shipped`);
      assert.ok(acked > 0, 'the cloud edge counted epochs acknowledged by the origin');
      assert.ok((await metric(sites.metricsUrl, 'spillway_writeback_guest_bytes_total', { volume: VOLUME, policy: 'origin' })) > 0, 'the guest wrote through the origin policy');

      // What the cloud export serves now is what the origin holds (read before the edges stop).
      const exported = path.join(tmp.dir, 'exported.img');
      await run('nbdcopy', [sites.uri(VOLUME), exported]);

      await sites.stop();
      sites = undefined;

      assert.notEqual(await sha256(root), pristineSum, 'the origin image changed');
      await assertCleanFs(root);
      const got = await debugfsCat(root, GUEST_FILE);
      assert.equal(got.text, `${text}\n`, `the origin holds ${GUEST_FILE} as the guest wrote it (debugfs: ${got.stderr.trim()})`);
      await assertSameBytes(root, exported);
    } finally {
      await sites?.stop();
      await tmp.cleanup();
    }
  });

  it('remote-only policy: the origin image stays byte-for-byte unchanged; the write is read back through the cloud export', async (t) => {
    await requireTools();
    const images = await ensureVmImages();
    const tmp = await tempDir('spw-vm-remote-');
    let sites: TwoSites | undefined;
    try {
      const root = path.join(tmp.dir, 'root.img');
      await copyImage(images.rootImg, root);
      const pristineSum = await sha256(root);
      const text = uniqueText('remote');
      sites = await startTwoSites(tmp.dir, root, { volume: VOLUME, wan: WAN });
      assert.equal((await volumeStatus(sites)).writes?.policy, 'remote-only', 'the default policy is remote-only');

      await bootAndWrite(t, images, sites, text);
      t.diagnostic(await guestIo(sites));

      const guestBytes = await metric(sites.metricsUrl, 'spillway_writeback_guest_bytes_total', { volume: VOLUME, policy: 'remote-only' });
      t.diagnostic(`guest wrote ${guestBytes} bytes (remote-only); ${await metric(sites.metricsUrl, 'spillway_writeback_epochs_total', { volume: VOLUME })} epoch events`);
      assert.ok(guestBytes > 0, 'the guest wrote through the remote-only policy');
      assert.equal(await metric(sites.metricsUrl, 'spillway_writeback_guest_bytes_total', { volume: VOLUME, policy: 'origin' }), 0);
      assert.equal(await metric(sites.metricsUrl, 'spillway_writeback_epochs_total', { volume: VOLUME }), 0, 'no epoch was sealed or shipped');

      // The guest's view, read back through the export.
      const exported = path.join(tmp.dir, 'exported.img');
      await run('nbdcopy', [sites.uri(VOLUME), exported]);

      await sites.stop();
      sites = undefined;

      assert.equal(await sha256(root), pristineSum, 'the origin image is byte-for-byte unchanged');
      await assertSameBytes(root, images.rootImg);
      assert.equal((await debugfsCat(root, GUEST_FILE)).text, undefined, `the origin has no ${GUEST_FILE}`);

      await assertCleanFs(exported);
      const got = await debugfsCat(exported, GUEST_FILE);
      assert.equal(got.text, `${text}\n`, `the cloud export holds ${GUEST_FILE} as the guest wrote it (debugfs: ${got.stderr.trim()})`);
    } finally {
      await sites?.stop();
      await tmp.cleanup();
    }
  });
});
