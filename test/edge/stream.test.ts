// End to end: a disk at one site, read at the other. Two `spillway edge` processes talk through
// `spillway wanem`; real clients (nbdcopy, QEMU) read the cloud edge's export. Checks bytes,
// link bytes (from the relay's own counters), cache reuse across a restart, survival of resets
// and stalls, refusal of peers without a valid certificate, and no plaintext in the cache.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { copyFile, mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import tls from 'node:tls';
import { after, before, describe, it } from 'node:test';

import { makePki, metric, startTwoSites, waitForExport, type TwoSites } from '../helpers/edges.js';
import { makeTestPki } from '../helpers/pki.js';
import { run, tempDir } from '../helpers/proc.js';
import { bootVm, ensureVmImages } from '../helpers/vm.js';

/** An ext4 image with random (incompressible) and text (compressible) files, free space, and a sentinel. */
async function makeImage(dir: string, sentinel: string, randomMiB = 6): Promise<string> {
  const tree = path.join(dir, 'tree');
  await mkdir(path.join(tree, 'data'), { recursive: true });
  await writeFile(path.join(tree, 'data', 'random.bin'), randomBytes(randomMiB * 1024 * 1024));
  await writeFile(path.join(tree, 'data', 'text.txt'), Array.from({ length: 60000 }, (_, i) => `line ${i}: streamed by spillway\n`).join(''));
  await writeFile(path.join(tree, 'data', 'secret.txt'), `${sentinel}\n`.repeat(2000));
  const image = path.join(dir, 'disk.img');
  await run('mkfs.ext4', ['-q', '-F', '-d', tree, image, '64M']);
  return image;
}

async function cmp(a: string, b: string): Promise<void> {
  const r = await run('cmp', [a, b], { allowFail: true });
  assert.equal(r.code, 0, `${a} and ${b} differ: ${r.stdout}${r.stderr}`);
}

async function grepDir(dir: string, needle: Buffer): Promise<string[]> {
  const hits: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (!e.isFile()) continue;
    const p = path.join(e.parentPath, e.name);
    if ((await readFile(p)).includes(needle)) hits.push(p);
  }
  return hits;
}

describe('two edges over an emulated WAN', { timeout: 600_000 }, () => {
  let tmp: { dir: string; cleanup: () => Promise<void> };
  let sites: TwoSites;
  let image: string;
  const sentinel = `SPILLWAY-SENTINEL-${randomBytes(8).toString('hex')}`;

  before(async () => {
    tmp = await tempDir('spw-stream-');
    image = await makeImage(tmp.dir, sentinel);
    sites = await startTwoSites(tmp.dir, image, { wan: { delayMs: 10, rateMbit: 200 } });
  });
  after(async () => {
    await sites?.stop();
    await tmp?.cleanup();
  });

  it('nbdcopy reads the remote export byte-equal to the source; a second read comes from the cache', async (t) => {
    const copy1 = path.join(tmp.dir, 'copy1.img');
    await run('nbdcopy', [sites.uri(), copy1]);
    await cmp(image, copy1);
    const first = await sites.linkBytes();
    t.diagnostic(`first read: ${first} link bytes for a 64 MiB export`);
    assert.ok(first > 6 * 1024 * 1024, 'the random file must have crossed the link');
    assert.ok(first < 32 * 1024 * 1024, 'zeros and text must not cross the link in full');

    const copy2 = path.join(tmp.dir, 'copy2.img');
    await run('nbdcopy', [sites.uri(), copy2]);
    await cmp(image, copy2);
    const second = (await sites.linkBytes()) - first;
    t.diagnostic(`second read: ${second} link bytes`);
    assert.ok(second < 64 * 1024, `a cached read moved ${second} bytes over the link`);
    assert.ok((await metric(sites.metricsUrl, 'spillway_remote_chunk_reads_total', { tier: 'cache' })) > 0);
  });

  it('the cache directory never holds the plaintext of what it caches', async () => {
    assert.ok((await readFile(image)).includes(Buffer.from(sentinel)), 'positive control: the image holds the sentinel');
    const cacheBytes = await metric(sites.metricsUrl, 'spillway_cache_bytes_total', { direction: 'written' });
    assert.ok(cacheBytes > 0, 'something was cached');
    assert.deepEqual(await grepDir(path.join(tmp.dir, 'cache'), Buffer.from(sentinel)), []);
    assert.deepEqual(await grepDir(path.join(tmp.dir, 'state-cloud'), Buffer.from(sentinel)), []);
  });

  it('a restarted cloud edge reuses its cache once the key is delivered again', async (t) => {
    await sites.cloud.stop();
    await sites.startCloud();
    await waitForExport(sites.uri());
    const before = await sites.linkBytes();
    const copy = path.join(tmp.dir, 'copy3.img');
    await run('nbdcopy', [sites.uri(), copy]);
    await cmp(image, copy);
    const moved = (await sites.linkBytes()) - before;
    t.diagnostic(`read after restart: ${moved} link bytes`);
    assert.ok(moved < 64 * 1024, `after a restart the read moved ${moved} bytes over the link`);
    assert.equal(await metric(sites.metricsUrl, 'spillway_remote_chunk_reads_total', { tier: 'link' }), 0);
  });

  it('SIGHUP applies a new cache size while running, evicting down to it', async () => {
    const yaml = path.join(tmp.dir, 'cloud.yaml');
    await writeFile(yaml, (await readFile(yaml, 'utf8')).replace(/size: [^ }]+/, 'size: 2MiB'));
    sites.cloud.child.kill('SIGHUP');
    const deadline = Date.now() + 30000;
    // The edge logs "cache resized" once the cache has evicted and shortened its files.
    while (!/"msg":"cache resized"/.test(sites.cloud.stderr())) {
      assert.ok(Date.now() < deadline, `cache size not applied:\n${sites.cloud.stderr().slice(-2000)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.equal(await metric(sites.metricsUrl, 'spillway_cache_max_bytes'), 2 * 1024 * 1024);
    assert.ok((await metric(sites.metricsUrl, 'spillway_cache_disk_bytes', { kind: 'slab' })) <= 2 * 1024 * 1024);
    // still serves correct data, from the link where the cache let go
    const copy = path.join(tmp.dir, 'copy4.img');
    await run('nbdcopy', [sites.uri(), copy]);
    await cmp(image, copy);
  });

  it('a link without a valid certificate is refused before any link frame', async () => {
    await mkdir(path.join(tmp.dir, 'rogue'), { recursive: true });
    const rogue = await makeTestPki(path.join(tmp.dir, 'rogue'));
    const linkPort = Number(/listen: "127\.0\.0\.1:(\d+)"/.exec(await readFile(path.join(tmp.dir, 'onprem.yaml'), 'utf8'))![1]);
    for (const creds of [{}, { cert: await readFile(rogue.rogueCert), key: await readFile(rogue.rogueKey) }]) {
      const outcome = await new Promise<string>((resolve) => {
        const s = tls.connect({ host: '127.0.0.1', port: linkPort, rejectUnauthorized: false, minVersion: 'TLSv1.3', ...creds });
        let got = 0;
        s.on('data', (d: Buffer) => (got += d.length));
        s.on('error', (e) => resolve(`error after ${got} bytes: ${e.message}`));
        s.on('close', () => resolve(`closed after ${got} bytes`));
        setTimeout(() => {
          s.destroy();
          resolve(`still open after ${got} bytes`);
        }, 5000);
      });
      assert.match(outcome, /(error|closed) after 0 bytes/, outcome);
    }
  });
});

describe('an edge whose certificate the peer does not trust', { timeout: 300_000 }, () => {
  it('gets no volume: the on-prem edge refuses it and says so', async () => {
    const tmp = await tempDir('spw-rogue-');
    try {
      const image = path.join(tmp.dir, 'disk.img');
      await run('truncate', ['-s', '16M', image]);
      const sites = await startTwoSites(tmp.dir, image);
      try {
        // Replace the cloud edge's certificate by one from another CA, with the same name.
        const rogueDir = path.join(tmp.dir, 'rogue');
        await makePki(rogueDir, ['cloud']);
        await sites.cloud.stop();
        await copyFile(path.join(rogueDir, 'pki', 'cloud.pem'), path.join(tmp.dir, 'pki', 'cloud.pem'));
        await copyFile(path.join(rogueDir, 'pki', 'cloud.key'), path.join(tmp.dir, 'pki', 'cloud.key'));
        await run('rm', ['-rf', path.join(tmp.dir, 'cache')]);
        const cloud = await sites.startCloud();
        await new Promise((r) => setTimeout(r, 3000));
        const info = await run('nbdinfo', ['--size', sites.uri()], { allowFail: true });
        assert.notEqual(info.code, 0, 'the volume must not be exported');
        assert.match(sites.onprem.stderr(), /link peer refused/);
        assert.match(cloud.stderr(), /link dial failed/);
      } finally {
        await sites.stop();
      }
    } finally {
      await tmp.cleanup();
    }
  });
});

describe('a copy survives the link dropping and stalling', { timeout: 600_000 }, () => {
  for (const [what, extra] of [
    ['resets', ['--reset-every', '1.5']],
    ['stalls', ['--stall-every', '1', '--stall-for', '0.7']],
  ] as const) {
    it(`nbdcopy completes byte-equal through ${what}`, async (t) => {
      const tmp = await tempDir('spw-flaky-');
      let sites: TwoSites | undefined;
      try {
        const image = await makeImage(tmp.dir, 'x', 24);
        sites = await startTwoSites(tmp.dir, image, { wan: { delayMs: 5, rateMbit: 60 } });
        await sites.wanem.stop();
        await sites.startWanem({ delayMs: 5, rateMbit: 60, extra: [...extra] });
        const copy = path.join(tmp.dir, 'copy.img');
        await run('nbdcopy', [sites.uri(), copy]);
        await cmp(image, copy);
        const stats = JSON.parse(await readFile(path.join(tmp.dir, 'wanem.json'), 'utf8')) as { resets: number; stalls: number };
        t.diagnostic(`relay: ${stats.resets} resets, ${stats.stalls} stalls; fetches resent: ${await metric(sites.metricsUrl, 'spillway_remote_fetches_resent_total')}`);
        if (what === 'resets') assert.ok(stats.resets > 0, 'the relay must have reset the link during the copy');
        else assert.ok(stats.stalls > 0, 'the relay must have stalled the link during the copy');
      } finally {
        await sites?.stop();
        await tmp.cleanup();
      }
    });
  }
});

describe('a VM boots from the remote export while its disk is at the other edge', { timeout: 600_000 }, () => {
  it('boots, reads its files intact, and writes stay at the cloud edge', async (t) => {
    const images = await ensureVmImages();
    const tmp = await tempDir('spw-vm-stream-');
    let sites: TwoSites | undefined;
    try {
      const root = path.join(tmp.dir, 'root.img');
      await copyFile(images.rootImg, root);
      const pristine = await readFile(root);
      sites = await startTwoSites(tmp.dir, root, { volume: 'root', wan: { delayMs: 10, rateMbit: 100 } });
      const boot = await bootVm({ images, driveUri: sites.uri('root'), timeoutMs: 300_000, signal: t.signal, append: 'spw.write=streamed' });
      t.diagnostic(`boot over the link: ready after ${Math.round(boot.timings.readyMs)} ms; ${(await sites.linkBytes())} link bytes`);
      assert.ok(boot.ready && boot.done && !boot.panic && !boot.fail, boot.console.slice(-2000));
      assert.ok(boot.wrote, 'the guest wrote /data.txt');
      assert.ok(Object.keys(boot.checksums).length >= 2, 'the guest checksummed its files');
      // Each checksum the guest printed matches the file in the image it booted from.
      for (const [file, sum] of Object.entries(boot.checksums)) {
        const host = await run('sh', ['-c', `md5sum < "${path.join(images.rootfsDir, file)}"`]);
        assert.equal(sum, host.stdout.split(' ')[0], file);
      }
      assert.ok(pristine.equals(await readFile(root)), 'the origin image is unchanged: writes stay remote until the write-back issue');
    } finally {
      await sites?.stop();
      await tmp.cleanup();
    }
  });
});


describe('a dropped link stalls reads; they fail only after the I/O timeout', { timeout: 300_000 }, () => {
  it('a read waits for the link to come back, and one that waits too long gets EIO', async (t) => {
    const tmp = await tempDir('spw-stall-');
    let sites: TwoSites | undefined;
    try {
      const image = path.join(tmp.dir, 'disk.img');
      await writeFile(image, randomBytes(16 * 1024 * 1024));
      sites = await startTwoSites(tmp.dir, image, { ioTimeout: '8s' });
      const s = sites;
      const qemuRead = (offset: string) => run('qemu-io', ['-r', '-f', 'raw', '-c', `read ${offset} 64k`, s.uri()], { allowFail: true });

      await s.wanem.stop();
      const started = Date.now();
      const waiting = qemuRead('1M');
      await new Promise((r) => setTimeout(r, 2500));
      await s.startWanem();
      const r1 = await waiting;
      t.diagnostic(`read across a 2.5 s outage took ${Date.now() - started} ms`);
      assert.equal(r1.code, 0, `the read must survive the outage: ${r1.stdout}${r1.stderr}`);

      await s.wanem.stop();
      const r2 = await qemuRead('9M');
      assert.notEqual(r2.code, 0, 'with the link gone for longer than ioTimeout the read must fail');
      assert.match(r2.stdout + r2.stderr, /Input\/output error/);
      assert.ok((await metric(s.metricsUrl, 'spillway_remote_fetch_timeouts_total')) >= 1);

      // and everything is right once the link is back
      await s.startWanem();
      const copy = path.join(tmp.dir, 'copy.img');
      await run('nbdcopy', [s.uri(), copy]);
      await cmp(image, copy);
    } finally {
      await sites?.stop();
      await tmp.cleanup();
    }
  });
});
