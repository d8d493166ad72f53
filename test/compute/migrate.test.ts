// Live migration between two QEMU processes on this machine sharing one disk file: the
// destination waits with -incoming defer and migrate-incoming on tcp:127.0.0.1:PORT; the source
// migrates with progress reports. The guest's counter (/run/counter) keeps counting across the
// move and its boot id is the same (no reboot); the disk is writable on the destination. A
// migration to a port nobody listens on fails with a typed error and leaves the source running.
// Every QEMU started here is killed by pid at the end whatever happens.

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { copyFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, it } from 'node:test';

import { ComputeError, QemuVm, type MigrationProgress, type QemuVmSpec } from '../../src/compute/qemu/index.js';
import { freePort, haveCommand, tempDir } from '../helpers/proc.js';
import { GUEST_APPEND, ensureGuestImages, type VmImages } from '../helpers/vm.js';

const BOOT_TIMEOUT_MS = 240_000;

void describe('live migration of the sample guest', { timeout: 15 * 60_000 }, () => {
  let images: VmImages;
  let tmp: { dir: string; cleanup: () => Promise<void> };
  const vms: QemuVm[] = [];

  before(async () => {
    assert.ok(await haveCommand('qemu-system-x86_64'), 'qemu-system-x86_64 not found: apt-get install -y --no-install-recommends qemu-system-x86');
    images = await ensureGuestImages();
    tmp = await tempDir('spw-mig-');
  });

  after(async () => {
    for (const vm of vms) {
      try {
        process.kill(vm.pid, 'SIGKILL');
      } catch {
        continue; // already gone
      }
      for (let i = 0; i < 100 && existsSync(`/proc/${vm.pid}`); i++) await sleep(50);
    }
    await tmp?.cleanup();
  });

  void it('moves a running guest to another QEMU: counter continues, same boot id, disk still writable', async (t) => {
    const disk = path.join(tmp.dir, 'root.img');
    await copyFile(images.rootImg, disk);
    const spec = (name: string, extra: Partial<QemuVmSpec> = {}): QemuVmSpec => ({
      name,
      dir: path.join(tmp.dir, name),
      kernel: images.kernel,
      initrd: images.initrd,
      append: GUEST_APPEND,
      memoryMiB: 256,
      vcpus: 1,
      mac: '52:54:00:5b:11:02',
      disks: [{ file: disk }],
      ...extra,
    });

    const src = await QemuVm.start(spec('src'));
    vms.push(src);
    await src.waitForConsole(/^SPILLWAY-GUEST-READY$/, { timeoutMs: BOOT_TIMEOUT_MS, signal: t.signal });
    const bootId = (await src.exec('cat /proc/sys/kernel/random/boot_id')).output.trim();
    assert.match(bootId, /^[0-9a-f-]{36}$/);

    // Nobody listens: failed, typed, and the source keeps running.
    const closed = await freePort();
    await assert.rejects(src.migrate(`tcp:127.0.0.1:${closed}`), (e: unknown) => e instanceof ComputeError && e.code === 'SPW_ERR_MIGRATION_FAILED');
    assert.equal((await src.status()).status, 'running');

    const dst = await QemuVm.start(spec('dst', { incoming: 'defer' }));
    vms.push(dst);
    assert.equal((await dst.status()).status, 'inmigrate');
    const port = await freePort();
    await dst.migrateIncoming(`tcp:127.0.0.1:${port}`);

    const before = Number((await src.exec('cat /run/counter')).output.trim());
    assert.ok(before >= 1, `counter ${before}`);
    const progress: MigrationProgress[] = [];
    const result = await src.migrate(`tcp:127.0.0.1:${port}`, { onProgress: (p) => progress.push(p), pollMs: 100 });
    assert.equal(result.status, 'completed');
    assert.ok(result.totalBytes >= 256 * 1024 * 1024, `RAM total ${result.totalBytes}`);
    assert.ok(result.transferredBytes > 0 && progress.length >= 1);
    assert.equal(progress.at(-1)?.status, 'completed');
    t.diagnostic(
      `migrated in ${result.totalTimeMs} ms (downtime ${result.downtimeMs} ms), ${result.transferredBytes} B transferred over ` +
        `${result.dirtySyncCount} passes; ${progress.length} progress reports (${[...new Set(progress.map((p) => p.status))].join(' → ')})`,
    );

    assert.equal((await src.status()).status, 'postmigrate');
    await dst.waitForStatus('running', { timeoutMs: 30_000 });
    await sleep(1500);
    const afterMove = Number((await dst.exec('cat /run/counter', { timeoutMs: 60_000 })).output.trim());
    assert.ok(afterMove > before, `counter ${before} before, ${afterMove} after`);
    assert.equal((await dst.exec('cat /proc/sys/kernel/random/boot_id')).output.trim(), bootId);
    assert.deepEqual(await dst.exec('echo moved > /data/y; sync; cat /data/y').then((r) => [r.output, r.exitCode]), ['moved\n', 0]);

    // The source is done: killed, it is reported gone (its pid file is stale).
    await src.kill();
    const probe = await QemuVm.probe(src.paths.dir);
    assert.equal(probe.state, 'gone');
    assert.match(probe.state === 'gone' ? probe.reason : '', /killed or crashed/);
    assert.equal((await dst.stop({ gracefulTimeoutMs: 0 })).how, 'quit');
  });
});
