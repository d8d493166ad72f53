// liveWriter: an owned volume whose source a VM on this site writes while the edge serves it
// (QEMU live migration). Two identical sparse sources are added to the on-prem edge, one with
// liveWriter, one without; then data is written straight into a hole of each file (as the VM
// would), and only then does the cloud edge add and read them. With liveWriter the new data
// comes through; without it the zero map made when the volume was added still answers the
// chunk as zeroes (the stale answer liveWriter exists to prevent).

import assert from 'node:assert/strict';
import { open, readFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import { controlCall, startTwoSites, waitForExport, type TwoSites } from '../helpers/edges.js';
import { requireCommands } from '../helpers/nbd-tools.js';
import { run, tempDir } from '../helpers/proc.js';
import { prng } from '../helpers/random.js';

const MiB = 1024 * 1024;

/** 4 MiB: random data in the first MiB, a hole after it. */
async function sparseSource(file: string): Promise<void> {
  const rnd = prng(5);
  const data = Buffer.alloc(MiB);
  for (let i = 0; i < data.length; i += 4) data.writeUInt32LE(Math.floor(rnd() * 0xffffffff), i);
  const fh = await open(file, 'w');
  try {
    await fh.truncate(4 * MiB);
    await fh.write(data, 0, data.length, 0);
  } finally {
    await fh.close();
  }
}

/** What a running VM does to its disk: write in place (no lock of ours is in its way). */
async function vmWrites(file: string, offset: number, data: Buffer): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    await fh.write(data, 0, data.length, offset);
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

describe('liveWriter: a source written by a VM while the edge serves it', { timeout: 300_000 }, () => {
  let tmp: { dir: string; cleanup: () => Promise<void> };
  let sites: TwoSites;

  before(async () => {
    await requireCommands('nbdinfo', 'nbdcopy', 'qemu-io');
    tmp = await tempDir('spw-live-');
    const disk = path.join(tmp.dir, 'disk.img');
    await sparseSource(disk);
    sites = await startTwoSites(tmp.dir, disk, { cloudNoVolume: true });
  });

  after(async () => {
    await sites?.stop();
    await tmp?.cleanup();
  });

  it('reads a hole written after the volume was added as the new data (and without liveWriter as stale zeroes)', async () => {
    const live = path.join(tmp.dir, 'live.img');
    const stale = path.join(tmp.dir, 'stale.img');
    await sparseSource(live);
    await sparseSource(stale);
    const a = await controlCall<{ zeroChunks: number; liveWriter: boolean }>(sites.onpremState, 'POST', '/v1/volumes', { name: 'live', source: live, liveWriter: true });
    assert.equal(a.status, 201, JSON.stringify(a.body));
    assert.equal(a.body.liveWriter, true);
    assert.equal(a.body.zeroChunks, 0, 'no zero map for a live writer');
    const b = await controlCall<{ zeroChunks: number; liveWriter: boolean }>(sites.onpremState, 'POST', '/v1/volumes', { name: 'stale', source: stale });
    assert.equal(b.status, 201, JSON.stringify(b.body));
    assert.equal(b.body.zeroChunks, 48, 'the hole (3 MiB of 64 KiB chunks) is known zero');

    // The VM writes into the hole. With liveWriter the edge took no lock, so QEMU could open
    // the image too; without it the source is locked.
    const fresh = Buffer.alloc(64 * 1024, 0xc3);
    await vmWrites(live, 2 * MiB, fresh);
    await vmWrites(stale, 2 * MiB, fresh);
    const qemuLive = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0xc3 2M 64k', live], { allowFail: true });
    assert.equal(qemuLive.code, 0, `QEMU opens a liveWriter source: ${qemuLive.stderr}`);
    const qemuStale = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 4k', stale], { allowFail: true });
    assert.notEqual(qemuStale.code, 0, 'a volume without liveWriter is locked against QEMU');

    for (const name of ['live', 'stale']) {
      const r = await controlCall(sites.cloudState, 'POST', '/v1/volumes', { name, peer: 'onprem' });
      assert.equal(r.status, 201, JSON.stringify(r.body));
      await waitForExport(sites.uri(name));
    }
    await run('nbdcopy', [sites.uri('live'), path.join(tmp.dir, 'live.copy')]);
    await run('nbdcopy', [sites.uri('stale'), path.join(tmp.dir, 'stale.copy')]);
    const liveCopy = await readFile(path.join(tmp.dir, 'live.copy'));
    const staleCopy = await readFile(path.join(tmp.dir, 'stale.copy'));
    assert.ok(liveCopy.subarray(2 * MiB, 2 * MiB + fresh.length).equals(fresh), 'liveWriter: the written hole reads as the new data');
    assert.ok(liveCopy.equals(await readFile(live)), 'liveWriter: the whole volume equals the file as it is now');
    assert.ok(staleCopy.subarray(2 * MiB, 2 * MiB + fresh.length).equals(Buffer.alloc(fresh.length)), 'without liveWriter the zero map answers the chunk as zeroes (stale)');
    assert.ok(staleCopy.subarray(0, MiB).equals(liveCopy.subarray(0, MiB)), 'the data written before is the same in both');
  });

  it('refuses liveWriter for a format qemu-nbd would cache', async () => {
    const r = await controlCall<{ error: string }>(sites.onpremState, 'POST', '/v1/volumes', { name: 'q', source: path.join(tmp.dir, 'live.img'), format: 'qcow2', liveWriter: true });
    assert.equal(r.status, 400);
    assert.match(r.body.error, /liveWriter needs format raw/);
  });
});
