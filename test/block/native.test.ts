// The native addon on its own: SEEK_DATA/SEEK_HOLE, fallocate modes, FICLONE, OFD locks, and
// errors carrying errno names that toBlockError maps.

import assert from 'node:assert/strict';
import { closeSync, openSync, writeSync } from 'node:fs';
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { toBlockError } from '../../src/block/device.js';
import { native } from '../../src/block/native.js';

void describe('native addon', () => {
  let dir = '';
  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'spw-native-'));
  });
  after(() => rm(dir, { recursive: true, force: true }));
  const n = native();

  async function sparse(name: string, size: number): Promise<string> {
    const file = path.join(dir, name);
    await writeFile(file, '');
    await truncate(file, size);
    return file;
  }

  void it('finds data and holes, and returns -1 for ENXIO', async () => {
    const file = await sparse('seek.raw', 1024 * 1024);
    const fd = openSync(file, 'r+');
    try {
      assert.equal(await n.seekData(fd, 0), -1, 'an empty sparse file has no data');
      assert.equal(await n.seekHole(fd, 0), 0);
      writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, 256 * 1024);
      assert.equal(await n.seekData(fd, 0), 256 * 1024);
      assert.equal(await n.seekHole(fd, 256 * 1024), 256 * 1024 + 4096);
      assert.equal(await n.seekData(fd, 256 * 1024 + 4096), -1);
      assert.equal(await n.seekHole(fd, 2 * 1024 * 1024), -1, 'past EOF');
      assert.equal(await n.seekEnd(fd), 1024 * 1024);
      await n.punchHole(fd, 256 * 1024, 4096);
      assert.equal(await n.seekData(fd, 0), -1, 'punched');
    } finally {
      closeSync(fd);
    }
  });

  void it('zeroes a range or says EOPNOTSUPP cleanly', async () => {
    const file = await sparse('zero.raw', 64 * 1024);
    const fd = openSync(file, 'r+');
    try {
      writeSync(fd, Buffer.alloc(64 * 1024, 7), 0, 64 * 1024, 0);
      try {
        await n.zeroRange(fd, 100, 1000);
      } catch (err) {
        assert.equal((err as { code?: string }).code, 'EOPNOTSUPP');
        assert.equal(toBlockError(err).errno, 'ENOTSUP');
        return;
      }
      const buf = Buffer.alloc(1200);
      const { readSync } = await import('node:fs');
      readSync(fd, buf, 0, 1200, 0);
      assert.ok(buf.subarray(0, 100).every((b) => b === 7));
      assert.ok(buf.subarray(100, 1100).every((b) => b === 0));
      assert.ok(buf.subarray(1100).every((b) => b === 7));
    } finally {
      closeSync(fd);
    }
  });

  void it('turns errno into Error.code names and refuses bad arguments synchronously', async () => {
    await assert.rejects(n.seekData(1_000_000, 0), (err: unknown) => {
      const e = err as { code?: string; errno?: number; syscall?: string };
      assert.equal(e.code, 'EBADF');
      assert.equal(e.errno, -9);
      assert.equal(e.syscall, 'lseek(SEEK_DATA)');
      return true;
    });
    assert.throws(() => n.punchHole(-1, 0, 1), { code: 'ERR_INVALID_ARG_TYPE' });
    assert.throws(() => n.punchHole(0, 0.5, 1), { code: 'ERR_INVALID_ARG_TYPE' });
    assert.throws(() => n.punchHole(0, 0, 0), { code: 'ERR_OUT_OF_RANGE' });
    assert.throws(() => n.ofdLock(0, { type: 'write', start: 0, len: 0, wait: true as unknown as false }), /would block/);
  });

  void it('clones extents with FICLONE where the file system can, else EOPNOTSUPP/EXDEV/EINVAL', async () => {
    const src = path.join(dir, 'clone-src.raw');
    const dst = path.join(dir, 'clone-dst.raw');
    await writeFile(src, Buffer.alloc(64 * 1024, 9));
    await writeFile(dst, '');
    const s = openSync(src, 'r');
    const d = openSync(dst, 'r+');
    try {
      try {
        await n.ficlone(d, s);
        const { readFileSync } = await import('node:fs');
        assert.ok(readFileSync(dst).equals(readFileSync(src)));
      } catch (err) {
        const code = (err as { code?: string }).code;
        assert.ok(code === 'EOPNOTSUPP' || code === 'EXDEV' || code === 'EINVAL' || code === 'ENOTTY', String(err));
      }
    } finally {
      closeSync(s);
      closeSync(d);
    }
  });

  void it('takes, reports and releases OFD locks per open file description', async () => {
    const file = await sparse('lock.raw', 4096);
    const a = openSync(file, 'r+');
    const b = openSync(file, 'r+'); // a separate open file description, same process
    try {
      n.ofdLock(a, { type: 'write', start: 100, len: 10 });
      assert.throws(() => n.ofdLock(b, { type: 'read', start: 105, len: 1 }), { code: 'EAGAIN' });
      n.ofdLock(b, { type: 'read', start: 110, len: 1 }); // just past the range: fine
      assert.deepEqual(n.ofdGetLock(b, { type: 'read', start: 0, len: 0 }), { type: 'write', start: 100, len: 10, pid: -1 });
      assert.equal(n.ofdGetLock(a, { type: 'write', start: 0, len: 100 }), null);
      n.ofdLock(a, { type: 'unlock', start: 0, len: 0 });
      n.ofdLock(b, { type: 'write', start: 0, len: 0 });
      assert.deepEqual(n.ofdGetLock(a, { type: 'read', start: 5, len: 1 }), { type: 'write', start: 0, len: 0, pid: -1 });
    } finally {
      closeSync(a);
      closeSync(b);
    }
  });
});
