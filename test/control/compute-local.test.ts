// The service's compute over real QEMU: a snapshot of a running guest resumes it, also when a
// crash of the service left it paused in the middle of an earlier snapshot (the re-run of the
// clone's snapshot step must not leave the source paused for ever).
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { copyFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { test } from 'node:test';
import { promisify } from 'node:util';

import { QemuVm } from '../../src/compute/qemu/vm.js';
import { LocalCompute } from '../../src/control/compute-local.js';
import { createLogger } from '../../src/log/logger.js';
import type { Host } from '../../src/control/types.js';
import { tempDir } from '../helpers/proc.js';
import { GUEST_APPEND, ensureGuestImages } from '../helpers/vm.js';

const execFileP = promisify(execFile);

test('snapshotDisk of a running guest keeps it running, and resumes one a crashed snapshot left paused', { timeout: 300_000 }, async () => {
  const images = await ensureGuestImages();
  const { dir, cleanup } = await tempDir('spw-cl-');
  const compute = new LocalCompute(path.join(dir, 'vms'), createLogger('compute', new PassThrough()));
  const host: Host = { name: 'h1', site: 's', provider: 'local', vcpus: 2, ramMiB: 1024, iops: 1000, pricePerHour: 0, licences: [], tags: [], ha: false, edge: 'e', state: 'up', createdAt: '' };
  const disk = path.join(dir, 'root.img');
  await copyFile(images.rootImg, disk);
  try {
    await compute.start({ instance: 'g', host, spec: { kernel: images.kernel, initrd: images.initrd, append: GUEST_APPEND, memoryMiB: 160, vcpus: 1, mac: '52:54:00:00:20:01' }, disks: [{ file: disk }] });
    const ready = await compute.waitReady('g', host, 240_000);
    await compute.exec('g', host, 'echo before-snapshot > /data/s.txt && sync');

    await compute.snapshotDisk('g', host, path.join(dir, 'snap1.img'));
    assert.equal((await compute.stats('g', host)).status, 'running');
    await execFileP('e2fsck', ['-fn', path.join(dir, 'snap1.img')]);
    const { stdout } = await execFileP('debugfs', ['-R', 'cat /data/s.txt', path.join(dir, 'snap1.img')]);
    assert.equal(stdout.trim(), 'before-snapshot');

    // What a kill -9 during the copy leaves: the guest paused by us, our marker present.
    const vm = await QemuVm.attach(compute.dirOf('g', host));
    await vm.pause();
    await vm.detach();
    await writeFile(path.join(compute.dirOf('g', host), 'snapshot-pause'), 'crashed\n');
    await compute.snapshotDisk('g', host, path.join(dir, 'snap2.img'));
    assert.equal((await compute.stats('g', host)).status, 'running');
    assert.equal(existsSync(path.join(compute.dirOf('g', host), 'snapshot-pause')), false);
    // Same boot: the guest was paused and resumed, never restarted.
    assert.equal((await compute.exec('g', host, 'cat /proc/sys/kernel/random/boot_id')).output.trim(), ready.bootId);

    // A guest an operator paused (no marker) stays paused.
    const vm2 = await QemuVm.attach(compute.dirOf('g', host));
    await vm2.pause();
    await vm2.detach();
    await compute.snapshotDisk('g', host, path.join(dir, 'snap3.img'));
    assert.equal((await compute.stats('g', host)).status, 'paused');
  } finally {
    await compute.stop('g', host).catch(() => undefined);
    await cleanup();
  }
});
