// The local role's volume: raw sources are locked so QEMU cannot open them underneath us;
// qcow2 goes through qemu-nbd; the zero map knows holes without reading them; the family key
// is created once and reused.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import { familyKey, LocalVolume } from '../../src/edge/local/volume.js';
import { createLogger } from '../../src/log/logger.js';
import { run, tempDir } from '../helpers/proc.js';

const log = createLogger('test', { write: () => true } as unknown as NodeJS.WritableStream);

describe('local volume', () => {
  let tmp: { dir: string; cleanup: () => Promise<void> };
  let raw: string;
  const data = randomBytes(256 * 1024);

  before(async () => {
    tmp = await tempDir('spw-local-');
    raw = path.join(tmp.dir, 'disk.img');
    await run('truncate', ['-s', '4M', raw]);
    // data at 1 MiB, the rest are holes
    const fh = await import('node:fs/promises').then((m) => m.open(raw, 'r+'));
    await fh.write(data, 0, data.length, 1024 * 1024);
    await fh.close();
  });
  after(() => tmp.cleanup());

  it('locks a raw source so QEMU cannot open it, and releases it on close', async () => {
    const vol = await LocalVolume.open({ name: 'disk', source: raw, chunkSize: 65536 }, { stateDir: tmp.dir, log });
    try {
      for (const args of [['-f', 'raw', '-c', 'write 0 4k', raw], ['-r', '-f', 'raw', '-c', 'read 0 4k', raw]]) {
        const r = await run('qemu-io', args, { allowFail: true });
        assert.notEqual(r.code, 0, `qemu-io ${args.join(' ')} must be refused while the edge owns the disk`);
        assert.match(r.stderr + r.stdout, /lock/i);
      }
    } finally {
      await vol.close();
    }
    const r = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 4k', raw], { allowFail: true });
    assert.equal(r.code, 0, r.stderr);
  });

  it('knows its zero chunks from the allocation map and reads the rest', async () => {
    const vol = await LocalVolume.open({ name: 'disk', source: raw, chunkSize: 65536 }, { stateDir: tmp.dir, log });
    try {
      assert.equal(vol.chunkCount, 64);
      assert.equal(vol.zeroChunks, 60, 'only the 4 chunks holding data are not known zero');
      for (let i = 16; i < 20; i++) assert.equal(vol.isZeroChunk(i), false);
      assert.deepEqual(await vol.readChunk(17), data.subarray(65536, 131072));
    } finally {
      await vol.close();
    }
  });

  it('writes through the writable view land in the source and clear the zero map of their chunks', async () => {
    const copy = path.join(tmp.dir, 'disk-w.img');
    await run('cp', ['--sparse=always', raw, copy]);
    const vol = await LocalVolume.open({ name: 'diskw', source: copy, chunkSize: 65536 }, { stateDir: tmp.dir, log });
    try {
      assert.equal(vol.isZeroChunk(40), true);
      await vol.writable.write(40 * 65536 + 100, Buffer.alloc(10, 7));
      assert.equal(vol.isZeroChunk(40), false, 'a chunk that received data is no longer answered as zeroes');
      assert.equal(vol.isZeroChunk(41), true);
      assert.deepEqual((await vol.readChunk(40)).subarray(100, 110), Buffer.alloc(10, 7));
    } finally {
      await vol.close();
    }
  });

  it('reads qcow2 through qemu-nbd, with the same bytes qemu-img sees', async () => {
    const qcow = path.join(tmp.dir, 'disk.qcow2');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow]);
    const vol = await LocalVolume.open({ name: 'q', source: qcow, format: 'qcow2', chunkSize: 65536 }, { stateDir: tmp.dir, log });
    try {
      assert.equal(vol.size, 4 * 1024 * 1024);
      assert.ok(vol.zeroChunks >= 56, `qcow2 holes must be known zero (got ${vol.zeroChunks})`);
      for (let i = 16; i < 20; i++) assert.deepEqual(await vol.readChunk(i), data.subarray((i - 16) * 65536, (i - 15) * 65536));
      // qemu-nbd holds QEMU's own locks on the image
      const r = await run('qemu-io', ['-f', 'qcow2', '-c', 'write 0 4k', qcow], { allowFail: true });
      assert.notEqual(r.code, 0, 'qemu-io must not write the qcow2 image while the edge serves it');
    } finally {
      await vol.close();
    }
  });

  it('refuses a source that cannot be opened, saying which and why', async () => {
    await assert.rejects(LocalVolume.open({ name: 'x', source: path.join(tmp.dir, 'missing.img'), chunkSize: 65536 }, { stateDir: tmp.dir, log }), /volume x: cannot open .*missing\.img/);
    await assert.rejects(LocalVolume.open({ name: 'x', source: raw, format: 'qcow2', chunkSize: 65536 }, { stateDir: tmp.dir, log }), /qemu-nbd could not open/);
  });

  it('creates a family key once (mode 0600) and returns the same key after', async () => {
    const k1 = await familyKey(tmp.dir, 'web');
    const k2 = await familyKey(tmp.dir, 'web');
    assert.equal(k1.length, 32);
    assert.deepEqual(k1, k2);
    assert.notDeepEqual(k1, await familyKey(tmp.dir, 'db'));
    const st = await stat(path.join(tmp.dir, 'keys', 'web.key'));
    assert.equal(st.mode & 0o777, 0o600);
    await writeFile(path.join(tmp.dir, 'keys', 'bad.key'), 'short');
    await assert.rejects(familyKey(tmp.dir, 'bad'), /not a 32-byte key/);
    assert.deepEqual(await readFile(path.join(tmp.dir, 'keys', 'web.key')), k1);
  });
});
