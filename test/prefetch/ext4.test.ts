// Tests of the ext2/3/4 reader (src/prefetch/ext4.ts) against images made by the real tools:
// mkfs.ext4/ext3/ext2 -d DIR (4 KiB and 1 KiB blocks, extents and block maps up to triple
// indirect, inline_data, meta_bg, 128-byte inodes), changed with debugfs -w (a fragmented file,
// fallocated unwritten extents). For every inode the walk reports, its extents are compared with
// what `debugfs stat` prints, every regular file read back through its extents must equal the
// source file, and the set of paths must equal the source tree. Refusals (bigalloc, encrypt,
// not ext) and symlink resolution (relative, absolute, through directories, loops) by name.
// The tools come from e2fsprogs (scripts/setup.sh); when missing the tests fail saying so.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdir, open, readFile, readdir, symlink, truncate, writeFile, link, lstat, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import { Ext4, Ext4Error, type Ext4Entry, type ReadAt } from '../../src/prefetch/ext4.js';
import { haveCommand, run, tempDir } from '../helpers/proc.js';
import { prng } from '../helpers/random.js';

let work: { dir: string; cleanup: () => Promise<void> };
const handles: FileHandle[] = [];

before(async () => {
  for (const tool of ['mkfs.ext4', 'debugfs']) {
    if (!(await haveCommand(tool))) throw new Error(`${tool} is missing: install e2fsprogs (scripts/setup.sh)`);
  }
  work = await tempDir('spw-ext4-');
});
after(async () => {
  for (const h of handles) await h.close();
  await work?.cleanup();
});

function randomBytes(rand: () => number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i += 4) b.writeUInt32LE(Math.floor(rand() * 2 ** 32) >>> 0, i - (i + 4 > n ? i + 4 - n : 0));
  return b;
}

/** The source tree every image is made from; returns the directory. */
async function makeTree(name: string, opts: { big?: number; tripleIndirect?: boolean; bigDir?: boolean; sparse?: boolean } = {}): Promise<string> {
  const rand = prng(name.length * 7919 + 1);
  const src = path.join(work.dir, `${name}-src`);
  await mkdir(path.join(src, 'etc'), { recursive: true });
  await mkdir(path.join(src, 'usr/lib'), { recursive: true });
  await mkdir(path.join(src, 'a/b/c'), { recursive: true });
  await writeFile(path.join(src, 'usr/lib/os-release'), 'ID=spillos\nVERSION_ID="1.2"\nPRETTY_NAME="Spill OS 1.2"\n');
  await symlink('../usr/lib/os-release', path.join(src, 'etc/os-release'));
  await symlink('/usr/lib', path.join(src, 'a/abs-lib'));
  await symlink('b/c', path.join(src, 'a/rel-dir'));
  await symlink(`${'long-target-'.repeat(10)}x`, path.join(src, 'a/slow-link')); // > 60 bytes: a block
  await symlink('loop2', path.join(src, 'a/loop1'));
  await symlink('loop1', path.join(src, 'a/loop2'));
  await writeFile(path.join(src, 'a/b/c/deep.txt'), 'deep\n');
  await writeFile(path.join(src, 'empty'), '');
  await writeFile(path.join(src, 'tiny'), 'x');
  await writeFile(path.join(src, 'big.bin'), randomBytes(rand, opts.big ?? 700_001));
  await link(path.join(src, 'big.bin'), path.join(src, 'a/hardlink.bin'));
  // Sparse file with many holes: more extents than fit in the inode (4), so the tree has depth ≥ 1.
  if (opts.sparse !== false) {
    const sparse = await open(path.join(src, 'sparse.bin'), 'w');
    for (let i = 0; i < 12; i++) await sparse.write(randomBytes(rand, 5000), 0, 5000, i * 200_000);
    await sparse.close();
    await truncate(path.join(src, 'sparse.bin'), 3_000_000);
  }
  if (opts.tripleIndirect) {
    // With 1 KiB blocks, triple indirection starts at (12 + 256 + 65536) KiB.
    const f = await open(path.join(src, 'far.bin'), 'w');
    await f.write(Buffer.from('far away'), 0, 8, 70 * 1024 * 1024);
    await f.close();
  }
  if (opts.bigDir) {
    await mkdir(path.join(src, 'many'));
    for (let i = 0; i < 1000; i++) await writeFile(path.join(src, 'many', `entry-with-a-longish-name-${i}`), i % 100 === 0 ? `file ${i}\n` : '');
  }
  return src;
}

async function mkfs(name: string, src: string, args: string[], size = '32M', tool = 'mkfs.ext4'): Promise<string> {
  const img = path.join(work.dir, `${name}.img`);
  await run(tool, ['-q', '-F', '-E', 'root_owner=0:0', ...args, '-d', src, img, size]);
  return img;
}

async function reader(img: string): Promise<{ read: ReadAt; size: number; bytes: () => number }> {
  const fh = await open(img, 'r');
  handles.push(fh);
  const size = (await fh.stat()).size;
  let bytes = 0;
  return {
    size,
    bytes: () => bytes,
    read: async (offset, length) => {
      assert.ok(offset >= 0 && offset + length <= size, `read ${offset}+${length} outside the ${size}-byte image`);
      const b = Buffer.alloc(length);
      await fh.read(b, 0, length, offset);
      bytes += length;
      return b;
    },
  };
}

interface DebugfsInode {
  extents: Array<{ lblk: number; pblk: number; count: number; uninit: boolean }>;
  treeBlocks: number; // (ETBn), (IND), (DIND), (TIND) entries
  flags: number;
  fastLink?: string;
  inlineSize?: number;
}

/** `debugfs stat <ino>` for many inodes in one run, parsed. */
async function debugfsStat(img: string, inodes: number[]): Promise<Map<number, DebugfsInode>> {
  const cmds = path.join(work.dir, `cmds-${path.basename(img)}`);
  await writeFile(cmds, inodes.map((i) => `stat <${i}>\n`).join(''));
  const { stdout } = await run('debugfs', ['-f', cmds, img]);
  const out = new Map<number, DebugfsInode>();
  let cur: DebugfsInode | undefined;
  let inMap = false;
  for (const line of stdout.split('\n')) {
    const m = /^debugfs: stat <(\d+)>/.exec(line);
    if (m) {
      cur = { extents: [], treeBlocks: 0, flags: 0 };
      out.set(Number(m[1]), cur);
      inMap = false;
      continue;
    }
    if (!cur) continue;
    const fl = /Flags: 0x([0-9a-f]+)/.exec(line);
    if (fl) cur.flags = parseInt(fl[1]!, 16);
    const fast = /^Fast link dest: "(.*)"$/.exec(line);
    if (fast) cur.fastLink = fast[1]!;
    const inl = /^Size of inline data: (\d+)/.exec(line);
    if (inl) cur.inlineSize = Number(inl[1]);
    if (line === 'EXTENTS:' || line === 'BLOCKS:') {
      inMap = true;
      continue;
    }
    if (!inMap) continue;
    if (line.startsWith('TOTAL') || line.trim() === '') {
      inMap = false;
      continue;
    }
    for (const t of line.matchAll(/\(([^)]*)\):(\d+)(?:-(\d+))?/g)) {
      const [, logical, p0, p1] = t as unknown as [string, string, string, string | undefined];
      const lm = /^(\d+)(?:-(\d+))?(\[u\])?$/.exec(logical);
      if (!lm) {
        cur.treeBlocks++;
        continue;
      }
      const l0 = Number(lm[1]);
      const count = (p1 === undefined ? 0 : Number(p1) - Number(p0)) + 1;
      assert.equal(count, (lm[2] === undefined ? 0 : Number(lm[2]) - l0) + 1, `debugfs line ${line}`);
      cur.extents.push({ lblk: l0, pblk: Number(p0), count, uninit: lm[3] !== undefined });
    }
  }
  for (const i of inodes) assert.ok(out.has(i), `debugfs printed nothing for inode ${i}`);
  return out;
}

/** Merge runs adjacent in both logical and physical blocks (both sides split differently). */
function merged(x: Array<{ lblk: number; pblk: number; count: number; uninit: boolean }>): string[] {
  const out: Array<{ lblk: number; pblk: number; count: number; uninit: boolean }> = [];
  for (const e of [...x].sort((a, b) => a.lblk - b.lblk)) {
    const p = out[out.length - 1];
    if (p && p.uninit === e.uninit && p.lblk + p.count === e.lblk && p.pblk + p.count === e.pblk) p.count += e.count;
    else out.push({ ...e });
  }
  return out.map((e) => `${e.lblk}:${e.pblk}+${e.count}${e.uninit ? 'u' : ''}`);
}

async function sourcePaths(src: string): Promise<Map<string, string>> {
  const out = new Map<string, string>([['/', 'dir']]);
  const walk = async (dir: string, rel: string): Promise<void> => {
    for (const name of await readdir(dir)) {
      const p = path.join(dir, name);
      const r = `${rel}/${name}`;
      const st = await lstat(p);
      out.set(r, st.isDirectory() ? 'dir' : st.isSymbolicLink() ? 'symlink' : st.isFile() ? 'file' : 'other');
      if (st.isDirectory()) await walk(p, r);
    }
  };
  await walk(src, '');
  return out;
}

/** Read a file through the extents the walk reported. */
async function readThroughExtents(read: ReadAt, e: Ext4Entry): Promise<Buffer> {
  const out = Buffer.alloc(e.size);
  for (const x of e.extents) {
    if (x.logical >= e.size || x.unwritten) continue;
    const n = Math.min(x.length, e.size - x.logical);
    (await read(x.offset, n)).copy(out, x.logical);
  }
  return out;
}

/**
 * The full check of one image: paths equal the source tree (plus lost+found), every inode's
 * extents equal debugfs's, every regular file's content equals the source's. Returns the entries.
 */
async function checkImage(img: string, src: string, fsOffset = 0): Promise<{ fs: Ext4; entries: Ext4Entry[]; dbg: Map<number, DebugfsInode> }> {
  const { read } = await reader(img);
  const fs = await Ext4.open(read, fsOffset);
  const entries: Ext4Entry[] = [];
  for await (const e of fs.walk()) entries.push(e);
  const want = await sourcePaths(src);
  want.set('/lost+found', 'dir');
  const got = new Map(entries.map((e) => [e.path, e.type]));
  assert.deepEqual([...got.keys()].sort(), [...want.keys()].sort(), 'paths');
  for (const [p, t] of want) assert.equal(got.get(p), t, `type of ${p}`);

  const dbg = await debugfsStat(img, [...new Set(entries.map((e) => e.inode))]);
  const bs = fs.info.blockSize;
  for (const e of entries) {
    const d = dbg.get(e.inode)!;
    const ours = e.extents.map((x) => {
      assert.equal(x.length % bs, 0);
      assert.equal((x.offset - fsOffset) % bs, 0);
      return { lblk: x.logical / bs, pblk: (x.offset - fsOffset) / bs, count: x.length / bs, uninit: x.unwritten === true };
    });
    assert.deepEqual(merged(ours), merged(d.extents), `extents of ${e.path} (inode ${e.inode})`);
    if (d.inlineSize !== undefined) assert.equal(e.inline, true, `${e.path} is inline`);
    if (e.type === 'file') {
      const source = await readFile(path.join(src, e.path));
      assert.equal(e.size, source.length, `size of ${e.path}`);
      const through = e.inline ? await fs.readFile(e.path, e.size) : await readThroughExtents(read, e);
      assert.ok(through?.equals(source), `content of ${e.path} read through its extents`);
      if (!e.path.startsWith('/many/') || e.path.endsWith('-7')) {
        const viaApi = await fs.readFile(e.path, e.size + 10);
        assert.ok(viaApi?.equals(source), `content of ${e.path} from readFile`);
      }
    }
    if (e.type === 'symlink') {
      const target = await readlinkSource(path.join(src, e.path));
      assert.equal(await fs.readLink(e.path), target, `target of ${e.path}`);
      if (d.fastLink !== undefined) assert.equal(e.extents.length, 0);
    }
  }
  // Hard links: the second path names the first, both have the same inode.
  const hl = entries.filter((e) => e.hardLinkOf !== undefined);
  for (const e of hl) assert.equal(entries.find((x) => x.path === e.hardLinkOf)?.inode, e.inode);
  return { fs, entries, dbg };
}

async function readlinkSource(p: string): Promise<string> {
  const { readlink } = await import('node:fs/promises');
  return readlink(p);
}

function sha(b: Buffer | null): string {
  return createHash('sha256').update(b ?? Buffer.alloc(0)).digest('hex');
}

describe('ext4 reader against mkfs/debugfs images', () => {
  it('ext4, 4 KiB blocks: extent trees of depth ≥ 1, htree directory, symlinks, hard links', async () => {
    const src = await makeTree('ext4-4k', { bigDir: true });
    const img = await mkfs('ext4-4k', src, ['-b', '4096', '-L', 'root4k']);
    // mke2fs -d links entries one by one (no index); e2fsck -D rebuilds big directories as htrees.
    const fsck = await run('e2fsck', ['-fyD', img], { allowFail: true });
    assert.ok(fsck.code <= 1, `e2fsck -fyD exited ${fsck.code}: ${fsck.stdout}${fsck.stderr}`);
    const { fs, entries, dbg } = await checkImage(img, src);
    assert.equal(fs.info.type, 'ext4');
    assert.equal(fs.info.label, 'root4k');
    assert.ok(fs.info.features.includes('extent') && fs.info.features.includes('metadata_csum'));
    const sparse = entries.find((e) => e.path === '/sparse.bin')!;
    assert.ok(dbg.get(sparse.inode)!.treeBlocks >= 1, 'sparse.bin has an extent tree of depth ≥ 1');
    assert.ok(sparse.extents.length >= 12, `sparse.bin has ${sparse.extents.length} extents`);
    const many = entries.find((e) => e.path === '/many')!;
    assert.ok(dbg.get(many.inode)!.flags & 0x1000, '/many is an htree directory');
    assert.equal(entries.filter((e) => e.path.startsWith('/many/')).length, 1000);
    assert.equal(entries.find((e) => e.path === '/a/hardlink.bin')?.hardLinkOf ?? entries.find((e) => e.path === '/big.bin')?.hardLinkOf, entries.find((e) => e.hardLinkOf)?.hardLinkOf);
    assert.equal(entries.filter((e) => e.hardLinkOf !== undefined).length, 1);
  });

  it('ext4, 1 KiB blocks', async () => {
    const src = await makeTree('ext4-1k');
    const img = await mkfs('ext4-1k', src, ['-b', '1024']);
    const { fs } = await checkImage(img, src);
    assert.equal(fs.info.blockSize, 1024);
  });

  it('ext3, 1 KiB blocks: block map with double and triple indirect blocks', async () => {
    const src = await makeTree('ext3-1k', { tripleIndirect: true });
    const img = await mkfs('ext3-1k', src, ['-b', '1024'], '32M', 'mkfs.ext3');
    const { fs, entries, dbg } = await checkImage(img, src);
    assert.equal(fs.info.type, 'ext3');
    const far = entries.find((e) => e.path === '/far.bin')!;
    assert.equal(far.extents.length, 1);
    assert.equal(far.extents[0]!.logical, 70 * 1024 * 1024);
    assert.ok(dbg.get(far.inode)!.treeBlocks >= 3, 'far.bin goes through TIND, DIND and IND blocks');
    assert.equal((await fs.readFile('/far.bin', 80 * 1024 * 1024))!.subarray(70 * 1024 * 1024).toString(), 'far away');
  });

  it('ext2, 4 KiB blocks, 128-byte inodes', async () => {
    const src = await makeTree('ext2');
    const img = await mkfs('ext2', src, ['-b', '4096', '-I', '128'], '32M', 'mkfs.ext2');
    const { fs } = await checkImage(img, src);
    assert.equal(fs.info.type, 'ext2');
    assert.equal(fs.info.inodeSize, 128);
  });

  it('ext4 without extents (-O ^extent), 1 KiB blocks, meta_bg', async () => {
    const src = await makeTree('noextent');
    const img = await mkfs('noextent', src, ['-b', '1024', '-O', '^extent,^64bit,^resize_inode,meta_bg', '-g', '1024'], '24M');
    const { fs } = await checkImage(img, src);
    assert.ok(fs.info.features.includes('meta_bg'));
    assert.ok(fs.info.groupCount > 16);
  });

  it('inline_data: small files and directories live in the inode', async () => {
    // No sparse file here: mke2fs 1.47.0 with inline_data drops a trailing hole from i_size.
    const src = await makeTree('inline', { sparse: false });
    await mkdir(path.join(src, 'small-dir'));
    await writeFile(path.join(src, 'small-dir/f'), 'f\n');
    await writeFile(path.join(src, 'hundred'), 'h'.repeat(100)); // past i_block: the rest in system.data
    const img = await mkfs('inline', src, ['-b', '4096', '-O', 'inline_data']);
    const { entries } = await checkImage(img, src);
    const inline = entries.filter((e) => e.inline).map((e) => e.path);
    for (const p of ['/tiny', '/hundred', '/small-dir', '/usr/lib/os-release']) assert.ok(inline.includes(p), `${p} is inline (${inline.join(' ')})`);
  });

  it('a fragmented file (debugfs write into a filesystem with holes) and unwritten extents (fallocate)', async () => {
    const src = path.join(work.dir, 'frag-src');
    await mkdir(src);
    const rand = prng(42);
    for (let i = 0; i < 40; i++) await writeFile(path.join(src, `f${String(i).padStart(2, '0')}`), randomBytes(rand, 24 * 1024));
    const img = await mkfs('frag', src, ['-b', '4096', '-O', '^flex_bg'], '4M');
    const bigSrc = path.join(work.dir, 'frag-big');
    await writeFile(bigSrc, randomBytes(rand, 600 * 1024));
    const cmds = [];
    for (let i = 0; i < 40; i += 2) cmds.push(`rm /f${String(i).padStart(2, '0')}`);
    cmds.push(`write ${bigSrc} big`, 'write /dev/null prealloc', 'fallocate /prealloc 0 39', 'sif /prealloc size 200000');
    await writeFile(path.join(work.dir, 'frag-cmds'), cmds.join('\n') + '\n');
    await run('debugfs', ['-w', '-f', path.join(work.dir, 'frag-cmds'), img]);
    // Mirror the changes in the source tree for checkImage.
    const { rm } = await import('node:fs/promises');
    for (let i = 0; i < 40; i += 2) await rm(path.join(src, `f${String(i).padStart(2, '0')}`));
    await writeFile(path.join(src, 'big'), await readFile(bigSrc));
    await writeFile(path.join(src, 'prealloc'), Buffer.alloc(200000));
    const { entries } = await checkImage(img, src);
    const big = entries.find((e) => e.path === '/big')!;
    assert.ok(big.extents.length > 4, `big is fragmented (${big.extents.length} extents)`);
    const pre = entries.find((e) => e.path === '/prealloc')!;
    assert.ok(pre.extents.length > 0 && pre.extents.every((x) => x.unwritten === true), 'prealloc has only unwritten extents');
  });
});

describe('ext4 reader: paths, refusals', () => {
  let fs: Ext4;
  before(async () => {
    const src = await makeTree('paths');
    fs = await Ext4.open((await reader(await mkfs('paths', src, ['-b', '4096']))).read, 0);
  });

  it('follows relative, absolute and directory symlinks, and bounds loops', async () => {
    const osr = await fs.readFile('/etc/os-release', 4096);
    assert.match(osr!.toString(), /^ID=spillos/);
    assert.equal(sha(await fs.readFile('/a/abs-lib/os-release', 4096)), sha(osr));
    assert.equal((await fs.readFile('/a/rel-dir/deep.txt', 100))!.toString(), 'deep\n');
    assert.equal((await fs.readFile('/a/rel-dir/../c/./deep.txt', 100))!.toString(), 'deep\n');
    assert.equal((await fs.readFile('/usr/lib/os-release', 3))!.toString(), 'ID=');
    assert.equal(await fs.readFile('/nope', 10), null);
    assert.equal(await fs.readFile('/a', 10), null, 'a directory is not a file');
    await assert.rejects(fs.readFile('/a/loop1', 10), (e: unknown) => e instanceof Ext4Error && /symlinks followed/.test(e.message));
    assert.deepEqual((await fs.list('/a/rel-dir'))!.map((e) => e.name), ['deep.txt']);
  });

  it('refuses what is not ext, and unsupported features, with Ext4Error', async () => {
    const zeros = Buffer.alloc(1 << 20);
    await assert.rejects(Ext4.open(async (o, l) => zeros.subarray(o, o + l), 0), (e: unknown) => e instanceof Ext4Error && e.code === 'SPW_ERR_EXT4' && /no ext2\/3\/4 filesystem/.test(e.message));
    const src = path.join(work.dir, 'empty-src');
    await mkdir(src, { recursive: true });
    for (const [feature, pattern] of [
      ['bigalloc', /bigalloc/],
      ['encrypt', /encrypt/],
    ] as const) {
      const img = await mkfs(`refuse-${feature}`, src, ['-b', '4096', '-O', feature]);
      await assert.rejects(Ext4.open((await reader(img)).read, 0), (e: unknown) => e instanceof Ext4Error && pattern.test(e.message), feature);
    }
    // A filesystem larger than the room it is given (a truncated image or a wrong partition table).
    const img = await mkfs('too-big', src, ['-b', '4096'], '8M');
    await assert.rejects(Ext4.open((await reader(img)).read, 0, 4 * 1024 * 1024), (e: unknown) => e instanceof Ext4Error && /truncated/.test(e.message));
  });

  it('maxFiles stops the walk', async () => {
    let n = 0;
    for await (const _ of fs.walk({ maxFiles: 5 })) n++;
    assert.equal(n, 5);
  });
});
