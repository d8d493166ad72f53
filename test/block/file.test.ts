// FileDevice: the compliance suite on raw files (ext4/xfs under the temp dir, and tmpfs where
// fallocate ZERO_RANGE is missing), plus real peers: holes agree with `qemu-img map`, and the
// OFD lock keeps out a second open and `qemu-io` (and we see qemu-io's locks).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, open, readFile, rm, stat, truncate } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { BlockError } from '../../src/block/device.js';
import { FileDevice, FileLockedError } from '../../src/block/file.js';
import { haveCommand, run } from '../helpers/proc.js';
import { assertSameBytes, blockDeviceCompliance, checkExtents, isZero, pattern, readAll } from './compliance.js';

const G = 64 * 1024;

/** A sparse raw image of `size` bytes holding `content` (zero 4 KiB blocks left as holes). */
async function makeImage(dir: string, size: number, content?: Buffer): Promise<string> {
  const file = path.join(dir, `img-${Math.random().toString(36).slice(2)}.raw`);
  const fh = await open(file, 'wx');
  try {
    await fh.truncate(size);
    if (content) {
      for (let off = 0; off < size; off += 4096) {
        const chunk = content.subarray(off, Math.min(off + 4096, size));
        if (!isZero(chunk)) await fh.write(chunk, 0, chunk.length, off);
      }
    }
  } finally {
    await fh.close();
  }
  return file;
}

function fileFactory(root: string) {
  const tmp = () => mkdtemp(path.join(root, 'spw-file-'));
  return {
    writable: async (size: number) => {
      const dir = await tmp();
      const device = await FileDevice.open(await makeImage(dir, size));
      return { device, cleanup: () => rm(dir, { recursive: true, force: true }) };
    },
    readonly: async (content: Buffer) => {
      const dir = await tmp();
      const device = await FileDevice.open(await makeImage(dir, content.length, content), { readonly: true });
      return { device, cleanup: () => rm(dir, { recursive: true, force: true }) };
    },
  };
}

blockDeviceCompliance('file (temp dir)', fileFactory(os.tmpdir()));
// tmpfs has PUNCH_HOLE but no ZERO_RANGE: writeZeroes without mayTrim takes the write fallback
if (existsSync('/dev/shm')) blockDeviceCompliance('file (tmpfs)', fileFactory('/dev/shm'));

void describe('FileDevice specifics', () => {
  let dir = '';
  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'spw-file-'));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  void it('reports the same data/hole layout as qemu-img map', async () => {
    const size = 4 * 1024 * 1024 + 1000;
    const file = await makeImage(dir, size);
    // no lock: QEMU refuses to open a file we hold locked, even with -U (force share)
    const dev = await FileDevice.open(file, { lock: false });
    try {
      await dev.write(0, pattern(1, G));
      await dev.write(200_000, pattern(2, 1));
      await dev.write(1024 * 1024, pattern(3, 512 * 1024));
      await dev.trim(1024 * 1024 + 100 * 1024, 100 * 1024); // punch inside the data
      await dev.writeZeroes(1024 * 1024 + 300 * 1024, 64 * 1024); // zero range, no trim
      await dev.writeZeroes(8192, 8192, { mayTrim: true }); // punch inside the first write
      await dev.write(size - 100, pattern(4, 100));
      await dev.flush();
      const model = await readFile(file);
      const ours = await checkExtents(dev, 0, size, model);
      const r = await run('qemu-img', ['map', '-U', '-f', 'raw', '--output=json', file]);
      // QEMU rounds a raw image's length up to 512 bytes and maps the padding as a hole: clip it
      const theirs = (JSON.parse(r.stdout) as Array<{ start: number; length: number; data: boolean; zero: boolean }>)
        .filter((e) => e.start < size)
        .map((e) => ({ start: e.start, end: Math.min(e.start + e.length, size), data: e.data }));
      const norm = (xs: Array<{ start: number; end: number; data: boolean }>) =>
        xs.reduce<Array<{ start: number; end: number; data: boolean }>>((acc, x) => {
          const last = acc[acc.length - 1];
          if (last && last.data === x.data && last.end === x.start) last.end = x.end;
          else acc.push({ ...x });
          return acc;
        }, []);
      const mine = norm(ours.map((e) => ({ start: e.offset, end: e.offset + e.length, data: !e.hole })));
      assert.deepEqual(mine, norm(theirs));
      // and the layout is not trivial: holes and data both present
      assert.ok(mine.length >= 5, `expected a fragmented layout, got ${JSON.stringify(mine)}`);
      assert.equal(mine[0]?.data, true);
    } finally {
      await dev.close();
    }
  });

  void it('takes the size of a regular file from fstat and refuses other file types', async () => {
    const file = await makeImage(dir, 123_457);
    const dev = await FileDevice.open(file, { lock: false });
    assert.equal(dev.size, 123_457);
    assert.equal(dev.description, `file:${file}`);
    await dev.close();
    await assert.rejects(FileDevice.open(dir, { readonly: true }), (err: unknown) => err instanceof BlockError && err.errno === 'EINVAL');
    await assert.rejects(FileDevice.open('/dev/null', { lock: false }), (err: unknown) => err instanceof BlockError && err.errno === 'EINVAL');
  });

  void it('serves a block device (loop device) with its size from lseek(SEEK_END)', async (t) => {
    if (process.getuid?.() !== 0 || !(await haveCommand('losetup'))) {
      t.skip('needs root and losetup');
      return;
    }
    const backing = await makeImage(dir, 8 * 1024 * 1024);
    const attach = await run('losetup', ['-f', '--show', backing], { allowFail: true });
    if (attach.code !== 0) {
      t.skip(`losetup failed here: ${attach.stderr.trim()}`);
      return;
    }
    const loop = attach.stdout.trim();
    const model = Buffer.alloc(8 * 1024 * 1024);
    try {
      const dev = await FileDevice.open(loop);
      try {
        assert.equal(dev.isBlockDevice, true);
        assert.equal(dev.size, model.length);
        await dev.write(100, pattern(5, 10_000));
        pattern(5, 10_000).copy(model, 100);
        await dev.writeZeroes(300, 9000); // unaligned: head and tail written, middle fallocated
        model.fill(0, 300, 9300);
        await dev.trim(G, G);
        model.fill(0, G, 2 * G);
        await dev.flush();
        assertSameBytes(await readAll(dev), model, 'loop device contents');
        await checkExtents(dev, 0, dev.size, model);
      } finally {
        await dev.close();
      }
      // what we wrote reached the backing file
      assertSameBytes((await readFile(backing)).subarray(0, 3 * G), model.subarray(0, 3 * G), 'backing file');
    } finally {
      await run('losetup', ['-d', loop]);
    }
  });

  void it('refuses a second open while the lock is held, and names the holder', async () => {
    const file = await makeImage(dir, G);
    const first = await FileDevice.open(file);
    try {
      await assert.rejects(FileDevice.open(file), (err: unknown) => {
        assert.ok(err instanceof FileLockedError, String(err));
        assert.equal(err.errno, 'EPERM');
        assert.equal(err.code, 'SPW_ERR_FILE_LOCKED');
        assert.match(err.message, new RegExp(`pid ${process.pid}\\b`));
        assert.ok(err.holders.some((h) => h.pid === process.pid && /OFDLCK/.test(h.lock)), JSON.stringify(err.holders));
        return true;
      });
      await assert.rejects(FileDevice.open(file, { readonly: true }), FileLockedError);
      const unlocked = await FileDevice.open(file, { lock: false });
      await unlocked.close();
    } finally {
      await first.close();
    }
    // released on close
    const again = await FileDevice.open(file);
    await again.close();
  });

  void it('lets read-only opens share the image but keeps writers out', async () => {
    const file = await makeImage(dir, G);
    const r1 = await FileDevice.open(file, { readonly: true });
    const r2 = await FileDevice.open(file, { readonly: true });
    try {
      await assert.rejects(FileDevice.open(file), FileLockedError);
    } finally {
      await r1.close();
      await r2.close();
    }
  });

  void it('keeps qemu-io out while our write lock is held (QEMU locks bytes 100..)', async () => {
    const file = await makeImage(dir, G);
    const dev = await FileDevice.open(file);
    try {
      for (const args of [['-c', 'write 0 4k'], ['-r', '-c', 'read 0 4k']]) {
        const r = await run('qemu-io', ['-f', 'raw', ...args, file], { allowFail: true });
        assert.notEqual(r.code, 0, `qemu-io ${args.join(' ')} should fail while we hold the image:\n${r.stdout}`);
        assert.match(r.stderr, /lock/i);
      }
    } finally {
      await dev.close();
    }
    // the same command works once we let go: the failure above was the lock
    const r = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 4k', file]);
    assert.match(r.stdout, /wrote 4096\/4096/);
    assert.equal((await readFile(file))[4095], 0x5a);
  });

  void it('keeps qemu-io out of the image while our read lock is held', async () => {
    const file = await makeImage(dir, G);
    const dev = await FileDevice.open(file, { readonly: true });
    try {
      // QEMU tests its "shared permission" bytes (200..) with a write-lock probe; our read lock
      // over the whole file makes it refuse even a read-only open
      for (const args of [['-c', 'write 0 4k'], ['-r', '-c', 'read 0 4k']]) {
        const r = await run('qemu-io', ['-f', 'raw', ...args, file], { allowFail: true });
        assert.notEqual(r.code, 0, `qemu-io ${args.join(' ')} should fail while we hold the image:\n${r.stdout}`);
        assert.match(r.stderr, /lock/i);
      }
    } finally {
      await dev.close();
    }
  });

  void it('refuses to open an image qemu-io holds for writing, and names qemu-io', async () => {
    const file = await makeImage(dir, G);
    const qemu = spawn('qemu-io', ['-f', 'raw', file], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    qemu.stdout.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise((resolve) => qemu.once('exit', resolve));
    try {
      // once qemu-io answers a command, it has the image open and locked
      await new Promise<void>((resolve, reject) => {
        qemu.stdout.on('data', () => {
          if (out.includes('read 512/512')) resolve();
        });
        qemu.once('exit', (code) => reject(new Error(`qemu-io exited ${code}: ${out}`)));
        qemu.stdin.write('read 0 512\n');
      });
      await assert.rejects(FileDevice.open(file), (err: unknown) => {
        assert.ok(err instanceof FileLockedError, String(err));
        assert.ok(
          err.holders.some((h) => h.pid === qemu.pid && h.command.includes('qemu-io')),
          `holders ${JSON.stringify(err.holders)} should include qemu-io pid ${qemu.pid}`,
        );
        assert.match(err.message, /qemu-io/);
        return true;
      });
    } finally {
      qemu.stdin.end('quit\n');
      await exited;
    }
  });

  void it('falls back to writing zeroes when fallocate cannot, and fastOnly then fails with ENOTSUP', async (t) => {
    const shm = '/dev/shm';
    if (!existsSync(shm)) {
      t.skip('no tmpfs at /dev/shm');
      return;
    }
    const sdir = await mkdtemp(path.join(shm, 'spw-file-'));
    try {
      const file = await makeImage(sdir, 4 * G);
      const dev = await FileDevice.open(file);
      try {
        await dev.write(0, pattern(6, 4 * G));
        // tmpfs has no ZERO_RANGE: without mayTrim there is no fast way
        await assert.rejects(dev.writeZeroes(G, G, { fastOnly: true }), (err: unknown) => err instanceof BlockError && err.errno === 'ENOTSUP');
        assertSameBytes(await readAll(dev, G, G), pattern(6, 4 * G).subarray(G, 2 * G), 'unchanged after ENOTSUP', G);
        await dev.writeZeroes(G, 3 * G - 5); // fallback path: real zero writes
        assert.ok(isZero(await readAll(dev, G, 3 * G - 5)));
        // the written zeroes are allocated data, not holes
        const ext = await dev.blockStatus(G, G);
        assert.ok(ext.every((e) => !e.hole), JSON.stringify(ext));
        // with mayTrim the punch is fast
        await dev.writeZeroes(G, G, { mayTrim: true, fastOnly: true });
        assert.deepEqual(await dev.blockStatus(G, G), [{ offset: G, length: G, hole: true, zero: true }]);
      } finally {
        await dev.close();
      }
    } finally {
      await rm(sdir, { recursive: true, force: true });
    }
  });

  void it('fails reads with EIO when the file shrank underneath, and requests after close with ESHUTDOWN', async () => {
    const file = await makeImage(dir, 2 * G);
    const dev = await FileDevice.open(file, { lock: false });
    await truncate(file, G);
    await assert.rejects(dev.read(G, Buffer.alloc(100)), (err: unknown) => err instanceof BlockError && err.errno === 'EIO');
    await dev.close();
    await assert.rejects(dev.read(0, Buffer.alloc(1)), (err: unknown) => err instanceof BlockError && err.errno === 'ESHUTDOWN');
    assert.equal((await stat(file)).size, G);
  });

  void it('refuses writes on a read-only open with EPERM before touching the file', async () => {
    const file = await makeImage(dir, G, pattern(7, G));
    const dev = await FileDevice.open(file, { readonly: true });
    try {
      assert.equal(dev.capabilities.writable, false);
      await assert.rejects(dev.write(0, Buffer.alloc(1)), (err: unknown) => err instanceof BlockError && err.errno === 'EPERM');
    } finally {
      await dev.close();
    }
    assertSameBytes(await readFile(file), pattern(7, G), 'file unchanged');
  });
});
