// Tests of the disk analyzer (src/prefetch/analyze.ts), the file map (file-map.ts) and
// `spillway analyze` (src/cli/analyze.ts) on real images: a bare ext4 filesystem made with
// mkfs.ext4 -d (as the test VM's root.img), an MBR disk (sfdisk) with an ext4 and a mkswap'd
// partition, a GPT disk (sgdisk) with a swap signature in a Linux-typed partition and an
// unformatted partition that only fstab calls swap. The OS release, fstab, network files and
// swap put in must come out. The CLI is run from dist/ (npm run build first), as a file and
// over NBD through `spillway serve`.

import assert from 'node:assert/strict';
import { mkdir, open, readFile, symlink, writeFile, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { existsSync } from 'node:fs';

import { analyzeVolume, buildFileMap } from '../../src/prefetch/analyze.js';
import { FileMap, FileMapError } from '../../src/prefetch/file-map.js';
import type { ReadAt } from '../../src/prefetch/ext4.js';
import { CLI, haveCommand, run, startServe, tempDir } from '../helpers/proc.js';
import { prng } from '../helpers/random.js';

const MiB = 1024 * 1024;
const SWAP_UUID = '5a7e0000-1111-4222-8333-444455556666';
let work: { dir: string; cleanup: () => Promise<void> };
const handles: FileHandle[] = [];
let rootSrc: string;
let rootImg: string;

async function reader(img: string): Promise<{ read: ReadAt; size: number }> {
  const fh = await open(img, 'r');
  handles.push(fh);
  const size = (await fh.stat()).size;
  return {
    size,
    read: async (offset, length) => {
      assert.ok(offset >= 0 && offset + length <= size, `read ${offset}+${length} outside the image`);
      const b = Buffer.alloc(length);
      await fh.read(b, 0, length, offset);
      return b;
    },
  };
}

/** A guest root: os-release, fstab, network configuration of several kinds, a swap file. */
async function makeRoot(dir: string, fstab: string): Promise<void> {
  const rand = prng(7);
  for (const d of ['etc/netplan', 'etc/network/interfaces.d', 'etc/systemd/network', 'etc/sysconfig/network-scripts', 'usr/lib', 'var/big']) await mkdir(path.join(dir, d), { recursive: true });
  await writeFile(path.join(dir, 'usr/lib/os-release'), 'NAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n');
  await symlink('../usr/lib/os-release', path.join(dir, 'etc/os-release'));
  await writeFile(path.join(dir, 'etc/fstab'), fstab);
  await writeFile(path.join(dir, 'etc/hostname'), 'guest\n');
  await symlink('/run/systemd/resolve/stub-resolv.conf', path.join(dir, 'etc/resolv.conf'));
  await writeFile(path.join(dir, 'etc/netplan/50-cloud-init.yaml'), 'network:\n  version: 2\n');
  await writeFile(path.join(dir, 'etc/netplan/README'), 'not a netplan file\n');
  await writeFile(path.join(dir, 'etc/network/interfaces'), 'auto lo\n');
  await writeFile(path.join(dir, 'etc/network/interfaces.d/eth0'), 'iface eth0 inet dhcp\n');
  await writeFile(path.join(dir, 'etc/systemd/network/10-eth.network'), '[Match]\nName=eth*\n');
  await writeFile(path.join(dir, 'etc/sysconfig/network-scripts/ifcfg-eth0'), 'BOOTPROTO=dhcp\n');
  const big = Buffer.alloc(3 * MiB);
  for (let i = 0; i < big.length; i += 4) big.writeUInt32LE(Math.floor(rand() * 2 ** 32), i); // no zero blocks: mkfs -d would make them holes
  await writeFile(path.join(dir, 'var/big/largest.bin'), big);
  await writeFile(path.join(dir, 'var/big/second.bin'), big.subarray(0, 2 * MiB));
  await writeFile(path.join(dir, 'swapfile'), Buffer.alloc(MiB, 1));
}

before(async () => {
  for (const tool of ['mkfs.ext4', 'debugfs', 'sfdisk', 'sgdisk', 'mkswap']) {
    if (!(await haveCommand(tool))) throw new Error(`${tool} is missing: install e2fsprogs, fdisk, gdisk (scripts/setup.sh)`);
  }
  work = await tempDir('spw-analyze-');
  rootSrc = path.join(work.dir, 'root');
  await makeRoot(rootSrc, `# static file system information\nUUID=${SWAP_UUID} none swap sw 0 0\n/swapfile none swap sw 0 0\nLABEL=root / ext4 errors=remount-ro 0 1\n/dev/vda3 none swap sw 0 0\n`);
  rootImg = path.join(work.dir, 'root.img');
  await run('mkfs.ext4', ['-q', '-F', '-L', 'root', '-E', 'root_owner=0:0', '-d', rootSrc, rootImg, '24M']);
});
after(async () => {
  for (const h of handles) await h.close();
  await work?.cleanup();
});

describe('analyzeVolume', () => {
  it('a bare ext4 filesystem on the whole disk (like the test VM root.img)', async () => {
    const { read, size } = await reader(rootImg);
    const a = await analyzeVolume(read, size, { top: 3 });
    assert.equal(a.partitionTable, 'none');
    assert.equal(a.filesystems.length, 1);
    const f = a.filesystems[0]!;
    assert.equal(f.partition, null);
    assert.equal(f.type, 'ext4');
    assert.equal(f.label, 'root');
    assert.equal(f.sizeBytes, 24 * MiB);
    assert.ok(f.usedBytes > 6 * MiB && f.usedBytes < f.sizeBytes, `used ${f.usedBytes}`);
    assert.deepEqual(f.os, { id: 'debian', versionId: '12', prettyName: 'Debian GNU/Linux 12 (bookworm)' });
    assert.deepEqual(
      f.fstab?.map((m) => [m.spec, m.mountPoint, m.type]),
      [
        [`UUID=${SWAP_UUID}`, 'none', 'swap'],
        ['/swapfile', 'none', 'swap'],
        ['LABEL=root', '/', 'ext4'],
        ['/dev/vda3', 'none', 'swap'],
      ],
    );
    assert.deepEqual(f.network, [
      { path: '/etc/network/interfaces', kind: 'ifupdown' },
      { path: '/etc/network/interfaces.d/eth0', kind: 'ifupdown' },
      { path: '/etc/netplan/50-cloud-init.yaml', kind: 'netplan' },
      { path: '/etc/sysconfig/network-scripts/ifcfg-eth0', kind: 'ifcfg' },
      { path: '/etc/systemd/network/10-eth.network', kind: 'systemd-networkd' },
      { path: '/etc/hostname', kind: 'hostname' },
      { path: '/etc/resolv.conf', kind: 'resolv.conf' },
    ]);
    assert.deepEqual(
      f.largestFiles?.map((l) => [l.path, l.size]),
      [
        ['/var/big/largest.bin', 3 * MiB],
        ['/var/big/second.bin', 2 * MiB],
        ['/swapfile', MiB],
      ],
    );
    assert.ok(f.largestFiles!.every((l) => l.allocatedBytes >= l.size));
    assert.equal(f.fileCount, 12);
    // Only the swap file: no partitions here, and /dev/vda3 or the UUID name nothing on this disk.
    assert.equal(a.swap.length, 1);
    assert.equal(a.swap[0]!.source, 'file');
    assert.equal(a.swap[0]!.path, '/swapfile');
    assert.equal(a.swap[0]!.length, MiB);
    assert.deepEqual((await read(a.swap[0]!.offset, 16)).toString('hex'), '01'.repeat(16));
    assert.ok(JSON.parse(JSON.stringify(a)), 'JSON-able');
  });

  it('an MBR disk: ext4 partition and a mkswap partition named in fstab by UUID', async () => {
    const disk = path.join(work.dir, 'mbr.img');
    await run('truncate', ['-s', '40M', disk]);
    await run('sfdisk', ['-q', disk], { input: 'label: dos\nstart=2048, size=24M, type=83\nstart=51200, size=8M, type=82\n' });
    const swap = path.join(work.dir, 'swap.img');
    await run('truncate', ['-s', '8M', swap]);
    await run('mkswap', ['-U', SWAP_UUID, '-L', 'swp', swap]);
    await run('dd', [`if=${rootImg}`, `of=${disk}`, 'bs=1M', 'seek=1', 'conv=notrunc', 'status=none']);
    await run('dd', [`if=${swap}`, `of=${disk}`, 'bs=512', 'seek=51200', 'conv=notrunc', 'status=none']);
    const { read, size } = await reader(disk);
    const a = await analyzeVolume(read, size);
    assert.equal(a.partitionTable, 'mbr');
    assert.deepEqual(
      a.partitions.map((p) => [p.index, p.start, p.length, p.type, p.swap]),
      [
        [1, MiB, 24 * MiB, '83', false],
        [2, 25 * MiB, 8 * MiB, '82', true],
      ],
    );
    assert.deepEqual(
      a.filesystems.map((f) => [f.partition, f.type, f.uuid ?? null]),
      [
        [1, 'ext4', a.filesystems[0]!.uuid],
        [2, 'swap', SWAP_UUID],
      ],
    );
    assert.equal(a.filesystems[1]!.label, 'swp');
    assert.equal(a.filesystems[0]!.os?.id, 'debian');
    // The swap partition once (fstab's UUID names it too), and the swap file at volume offsets.
    assert.deepEqual(
      a.swap.map((s) => [s.source, s.offset, s.length]),
      [
        ['partition', 25 * MiB, 8 * MiB],
        ...[a.swap.find((s) => s.source === 'file')!].map((s) => ['file', s.offset, s.length]),
      ].sort((x, y) => (x[1] as number) - (y[1] as number)),
    );
    const file = a.swap.find((s) => s.source === 'file')!;
    assert.ok(file.offset > MiB && file.offset < 25 * MiB);
    assert.equal((await read(file.offset, 4)).toString('hex'), '01010101');
  });

  it('a GPT disk: swap signature in a Linux partition, an unformatted partition that fstab calls swap, an unknown filesystem', async () => {
    const disk = path.join(work.dir, 'gpt.img');
    await run('truncate', ['-s', '48M', disk]);
    await run('sgdisk', ['-n', '1:2048:+24M', '-t', '1:8300', '-c', '1:root', '-n', '2:0:+4M', '-t', '2:8300', '-n', '3:0:+4M', '-t', '3:8300', '-n', '4:0:+4M', '-t', '4:0700', disk]);
    const { stdout } = await run('sgdisk', ['-p', disk]);
    const starts = [...stdout.matchAll(/^\s+(\d)\s+(\d+)\s+(\d+)/gm)].map((m) => Number(m[2]) * 512);
    const swap = path.join(work.dir, 'swap4.img');
    await run('truncate', ['-s', '4M', swap]);
    await run('mkswap', [swap]);
    await run('dd', [`if=${rootImg}`, `of=${disk}`, `bs=512`, `seek=${starts[0]! / 512}`, 'conv=notrunc', 'status=none']);
    await run('dd', [`if=${swap}`, `of=${disk}`, `bs=512`, `seek=${starts[1]! / 512}`, 'conv=notrunc', 'status=none']);
    const fat = Buffer.alloc(512);
    fat.write('FAT1', 0x36, 'latin1');
    const fh = await open(disk, 'r+');
    await fh.write(fat, 0, 512, starts[3]!);
    await fh.close();
    const { read, size } = await reader(disk);
    const a = await analyzeVolume(read, size);
    assert.equal(a.partitionTable, 'gpt');
    assert.equal(a.partitions[0]!.name, 'root');
    assert.deepEqual(
      a.partitions.map((p) => p.swap),
      [false, true, false, false],
    );
    assert.deepEqual(
      a.filesystems.map((f) => f.type),
      ['ext4', 'swap', 'unknown', 'unknown'],
    );
    assert.equal(a.filesystems[3]!.detected, 'vfat');
    assert.deepEqual(
      a.swap.map((s) => s.source).sort(),
      ['file', 'fstab', 'partition'],
    );
    const fromFstab = a.swap.find((s) => s.source === 'fstab')!;
    assert.deepEqual([fromFstab.offset, fromFstab.length], [starts[2], 4 * MiB]);
  });
});

describe('FileMap', () => {
  it('maps every chunk of every file back to it, and round-trips through JSON', async () => {
    const { read, size } = await reader(rootImg);
    const map = await buildFileMap(read, size);
    const paths = map.files.map((f) => f.path).sort();
    assert.ok(paths.includes('/var/big/largest.bin') && paths.includes('/etc/fstab') && paths.includes('/usr/lib/os-release'));
    assert.ok(!paths.includes('/etc/os-release'), 'symlinks are not files');
    const chunk = 64 * 1024;
    for (const f of map.files) {
      for (const e of f.extents) {
        assert.equal(map.fileAt(e.offset), f);
        assert.equal(map.fileAt(e.offset + e.length - 1), f);
      }
      const chunks = map.chunksOf(f, chunk);
      assert.deepEqual(chunks, [...new Set(chunks)].sort((x, y) => x - y));
      for (const c of chunks) assert.ok(map.filesInChunk(c, chunk).includes(f), `${f.path} in chunk ${c}`);
    }
    const big = map.files.find((f) => f.path === '/var/big/largest.bin')!;
    assert.ok(map.chunksOf(big, chunk).length >= (3 * MiB) / chunk);
    // Bytes no file owns: the superblock.
    assert.equal(map.fileAt(1024), undefined);
    assert.deepEqual(map.filesIn(0, 2048), []);
    const back = FileMap.fromJSON(JSON.parse(JSON.stringify(map)));
    assert.deepEqual(back.toJSON(), map.toJSON());
    assert.equal(back.fileAt(big.extents[0]!.offset)?.path, big.path);
    assert.throws(() => FileMap.fromJSON({ version: 2, files: [] }), FileMapError);
    assert.throws(() => FileMap.fromJSON({ version: 1, files: [{ path: '/x', inode: 1, fsOffset: 0, size: 1, extents: [[0, -1, 4096, 0]] }] }), FileMapError);
    assert.throws(() => FileMap.fromJSON({ version: 1, files: [{ path: '/x', inode: 1, fsOffset: 0, size: 1, extents: [[0, 0, 4096, 2]] }] }), /must be 0 or 1/);
  });

  it('filesIn stays correct with overlapping extents and ignores unwritten ones in chunksOf', () => {
    const a = { path: '/a', inode: 12, fsOffset: 0, size: 10, extents: [{ logical: 0, offset: 0, length: 10_000 }] };
    const b = { path: '/b', inode: 13, fsOffset: 0, size: 10, extents: [{ logical: 0, offset: 100, length: 100 }, { logical: 100, offset: 20_000, length: 4096, unwritten: true }] };
    const m = new FileMap([a, b]);
    assert.deepEqual(m.filesIn(5000, 1), [a]);
    assert.deepEqual(m.filesIn(150, 1).map((f) => f.path).sort(), ['/a', '/b']);
    assert.deepEqual(m.chunksOf(b, 4096), [0]);
    assert.deepEqual(m.filesInChunk(4, 4096), [b]);
  });
});

describe('spillway analyze (dist/cli.js)', () => {
  before(() => {
    if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run npm run build first`);
  });

  it('prints JSON for a raw image, and a readable summary', async () => {
    const { stdout } = await run(process.execPath, [CLI, 'analyze', rootImg, '--json', '--top', '2']);
    const a = JSON.parse(stdout);
    assert.equal(a.filesystems[0].os.id, 'debian');
    assert.equal(a.filesystems[0].largestFiles.length, 2);
    assert.equal(a.files, undefined);
    const human = (await run(process.execPath, [CLI, 'analyze', rootImg])).stdout;
    assert.match(human, /partition table: none/);
    assert.match(human, /whole disk: ext4, .* used of 24\.0 MiB/);
    assert.match(human, /OS: Debian GNU\/Linux 12 \(bookworm\)/);
    assert.match(human, /\/etc\/netplan\/50-cloud-init\.yaml {2}\(netplan\)/);
    assert.match(human, /file \/swapfile: offset \d+, 1\.00 MiB/);
  });

  it('--files lists every file with its extents; nbd:// through spillway serve gives the same answer', async () => {
    const direct = JSON.parse((await run(process.execPath, [CLI, 'analyze', rootImg, '--json', '--files'])).stdout);
    const big = direct.files.find((f: { path: string }) => f.path === '/var/big/largest.bin');
    assert.ok(big.extents.length >= 1 && big.fsOffset === 0);
    const srcBytes = await readFile(path.join(rootSrc, 'var/big/largest.bin'));
    const img = await readFile(rootImg);
    const e0 = big.extents[0];
    assert.ok(img.subarray(e0.offset, e0.offset + e0.length).equals(srcBytes.subarray(e0.logical, e0.logical + e0.length)));
    const served = await startServe(rootImg, ['--readonly']);
    try {
      const viaNbd = JSON.parse((await run(process.execPath, [CLI, 'analyze', served.uri, '--json', '--files'])).stdout);
      assert.deepEqual(viaNbd, direct);
    } finally {
      await served.stop();
    }
  });

  it('errors: a missing file, a qcow2 image; a non-ext filesystem is reported as unknown', async () => {
    const missing = await run(process.execPath, [CLI, 'analyze', path.join(work.dir, 'nope.img')], { allowFail: true });
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /nope\.img: no such file/);
    if (await haveCommand('qemu-img')) {
      const q = path.join(work.dir, 'disk.qcow2');
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', q, '16M']);
      const r = await run(process.execPath, [CLI, 'analyze', q], { allowFail: true });
      assert.equal(r.code, 1);
      assert.match(r.stderr, /is a qcow2 image, not a raw disk: serve it with qemu-nbd/);
    }
    const other = path.join(work.dir, 'xfs-like.img');
    const b = Buffer.alloc(4 * MiB);
    b.write('XFSB', 0, 'latin1');
    await writeFile(other, b);
    const r = await run(process.execPath, [CLI, 'analyze', other]);
    assert.match(r.stdout, /whole disk: unknown/);
    assert.match(r.stdout, /this looks like xfs; only ext2\/ext3\/ext4 filesystems and Linux swap are analyzed/);
    const j = JSON.parse((await run(process.execPath, [CLI, 'analyze', other, '--json'])).stdout);
    assert.deepEqual([j.filesystems[0].type, j.filesystems[0].detected], ['unknown', 'xfs']);
  });
});
