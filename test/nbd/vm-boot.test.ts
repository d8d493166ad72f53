// A real VM (QEMU, TCG) boots with its root disk on `spillway serve`: the kernel and initramfs
// come from files, every block of the root filesystem crosses NBD. The guest checksums files it
// reads in full and can write /data.txt; both are checked against the host's view of the same
// bytes. Images: scripts/vm/build-vm.sh, docs/vm-images.md.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { copyFile, readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { before, describe, it, type TestContext } from 'node:test';

import { CLI, haveCommand, run, startServe, tempDir } from '../helpers/proc.js';
import { bootVm, ensureVmImages, type VmBoot, type VmImages } from '../helpers/vm.js';

const BOOT_TIMEOUT_MS = 180_000;

/** Guest path → md5 of every file the guest checksums, computed from the source directory. */
async function hostChecksums(rootfsDir: string): Promise<Record<string, string>> {
  const md5 = async (rel: string) => createHash('md5').update(await readFile(path.join(rootfsDir, rel))).digest('hex');
  const files = ['bin/busybox'];
  for (const e of await readdir(path.join(rootfsDir, 'data'), { withFileTypes: true })) {
    if (e.isFile()) files.push(`data/${e.name}`);
  }
  const out: Record<string, string> = {};
  for (const f of files.sort()) out[`/${f}`] = await md5(f);
  return out;
}

/** Serve `image` with `spillway serve`, boot the VM from it, stop the server. */
async function bootFromServe(t: TestContext, images: VmImages, image: string, append?: string): Promise<VmBoot> {
  const served = await startServe(image);
  let boot: VmBoot;
  try {
    boot = await bootVm({ images, driveUri: served.uri, timeoutMs: BOOT_TIMEOUT_MS, signal: t.signal, ...(append ? { append } : {}) });
  } catch (e) {
    await served.stop();
    throw e;
  }
  const r = await served.stop();
  // The server must stop on SIGTERM by itself: no crash, no SIGKILL after the grace period.
  assert.ok(r.code === 0 || r.code === 128 + 15 || r.signal === 'SIGTERM', `spillway serve exited ${r.code ?? r.signal}\n${served.stderr()}`);
  t.diagnostic(
    `boot from ${served.uri}: READY after ${Math.round(boot.timings.readyMs)} ms, DONE after ${Math.round(boot.timings.doneMs)} ms, ` +
      `QEMU exited after ${Math.round(boot.timings.exitMs)} ms`,
  );
  return boot;
}

/** e2fsck exits 0 only when the filesystem is consistent and clean (journal flushed). */
async function assertFsClean(image: string): Promise<void> {
  const r = await run('e2fsck', ['-f', '-n', image], { allowFail: true });
  assert.equal(r.code, 0, `e2fsck -fn ${image} exited ${r.code}\n${r.stdout}\n${r.stderr}`);
}

async function debugfsCat(image: string, file: string): Promise<{ stdout: string; stderr: string }> {
  const r = await run('debugfs', ['-R', `cat ${file}`, image]);
  return { stdout: r.stdout, stderr: r.stderr };
}

void describe('a real VM boots from spillway serve', { timeout: 10 * 60_000 }, () => {
  let images: VmImages;
  let expected: Record<string, string>;

  before(async () => {
    const needed: [string, string][] = [
      ['qemu-system-x86_64', 'qemu-system-x86'],
      ['e2fsck', 'e2fsprogs'],
      ['debugfs', 'e2fsprogs'],
    ];
    for (const [cmd, pkg] of needed) {
      assert.ok(await haveCommand(cmd), `${cmd} not found: apt-get install -y --no-install-recommends ${pkg}`);
    }
    assert.ok(existsSync(CLI), `${CLI} is missing: run npm run build first`);
    images = await ensureVmImages();
    expected = await hostChecksums(images.rootfsDir);
    assert.ok(Object.keys(expected).length >= 4, `expected busybox and the data files in ${images.rootfsDir}`);
  });

  void it('boots to its root filesystem and reads every byte the host wrote', async (t) => {
    const { dir, cleanup } = await tempDir('spw-vm-');
    try {
      const image = path.join(dir, 'root.img');
      await copyFile(images.rootImg, image);

      const boot = await bootFromServe(t, images, image);

      assert.ok(boot.ready, 'no SPILLWAY-VM-READY on the console');
      assert.equal(boot.fail, undefined, `the guest reported a failure: ${boot.fail}`);
      assert.deepEqual(boot.checksums, expected, 'md5 of the files read by the guest over NBD differ from the host-side files');
      assert.equal(boot.data, undefined, 'a fresh image must not have /data.txt');
      assert.equal(boot.wrote, false);
      assert.equal(boot.exit.code, 0, `QEMU exited ${boot.exit.code ?? boot.exit.signal}`);
      // The guest mounted the root read-write (superblock, journal, atimes) and remounted it
      // read-only before powering off: what it wrote must leave a clean filesystem.
      await assertFsClean(image);
    } finally {
      await cleanup();
    }
  });

  void it('persists a file the guest writes, and a second boot reads it back', async (t) => {
    const { dir, cleanup } = await tempDir('spw-vm-');
    try {
      const image = path.join(dir, 'root.img');
      await copyFile(images.rootImg, image);
      const text = `spillway-${randomBytes(8).toString('hex')}`;

      const first = await bootFromServe(t, images, image, `spw.write=${text}`);
      assert.ok(first.wrote, 'the guest did not report writing /data.txt');
      assert.deepEqual(first.checksums, expected);

      // The server is stopped: the bytes must be in the image file itself.
      await assertFsClean(image);
      const check = path.join(dir, 'check.img');
      await copyFile(image, check);
      const cat = await debugfsCat(check, '/data.txt');
      assert.equal(cat.stdout, `${text}\n`, `debugfs cat /data.txt: ${JSON.stringify(cat.stdout)} ${cat.stderr}`);

      const second = await bootFromServe(t, images, image);
      assert.equal(second.data, text, 'the second boot did not read back /data.txt');
      assert.equal(second.wrote, false);
      assert.deepEqual(second.checksums, expected);
    } finally {
      await cleanup();
    }
  });
});
