// Fuzz of the ext reader and the disk analyzer: small real images (mkfs.ext4 -d with an extent
// tree, inline data, a directory of 200 entries; mkfs.ext3 with indirect blocks) get random bytes
// written into their metadata — superblock, group descriptors, inode table, directory blocks,
// extent and indirect blocks — and are then opened, walked, read (readFile) and analyzed. The
// only outcomes allowed are success or Ext4Error/PartitionTableError; every walk must end within
// a bounded number of reads. Seeded (test/helpers/random.ts): a failure prints its seed.
// SPILLWAY_FUZZ_RUNS sets the iterations per image (default 500).

import assert from 'node:assert/strict';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import fc from 'fast-check';

import { analyzeVolume } from '../../src/prefetch/analyze.js';
import { Ext4, Ext4Error, type ReadAt } from '../../src/prefetch/ext4.js';
import { PartitionTableError } from '../../src/prefetch/partitions.js';
import { haveCommand, run, tempDir } from '../helpers/proc.js';
import { prng } from '../helpers/random.js';

const RUNS = Number(process.env.SPILLWAY_FUZZ_RUNS ?? 500);
const MAX_READS = 200_000;

let work: { dir: string; cleanup: () => Promise<void> };
const images: Array<{ name: string; bytes: Buffer; targets: Array<[number, number]> }> = [];

class TooManyReads extends Error {}

/** A reader of `b` with `patches` (offset → byte) applied, without copying the image. */
function memReader(b: Buffer, patches: Map<number, number> = new Map()): { read: ReadAt; reads: () => number } {
  let reads = 0;
  return {
    reads: () => reads,
    read: async (offset, length) => {
      if (++reads > MAX_READS) throw new TooManyReads(`more than ${MAX_READS} reads: unbounded walk`);
      assert.ok(Number.isSafeInteger(offset) && offset >= 0 && length > 0 && offset + length <= b.length, `read ${offset}+${length} outside the ${b.length}-byte image`);
      assert.ok(length <= 1 << 20, `read of ${length} bytes`);
      const out = Buffer.from(b.subarray(offset, offset + length));
      for (const [at, v] of patches) if (at >= offset && at < offset + length) out[at - offset] = v;
      return out;
    },
  };
}

/** Byte ranges worth corrupting: superblock, descriptors, inode tables, directory data, extent/indirect blocks. */
async function metadataRanges(img: string, bytes: Buffer): Promise<Array<[number, number]>> {
  const fs = await Ext4.open(memReader(bytes).read, 0);
  const bs = fs.info.blockSize;
  const out: Array<[number, number]> = [
    [1024, 1024],
    [(bs === 1024 ? 2 : 1) * bs, bs],
  ];
  for await (const e of fs.walk()) {
    if (e.type === 'dir') for (const x of e.extents) out.push([x.offset, Math.min(x.length, 4 * bs)]);
  }
  // Inode tables and extent-tree / indirect blocks, as debugfs names them.
  const { stdout } = await run('debugfs', ['-R', 'stats', img]);
  for (const m of stdout.matchAll(/Inode table at (\d+)-/g)) out.push([Number(m[1]) * bs, 4 * bs]);
  const blocks = await run('debugfs', ['-R', 'stat /sparse', img]);
  for (const m of blocks.stdout.matchAll(/\((?:ETB\d|IND|DIND|TIND)\):(\d+)/g)) out.push([Number(m[1]) * bs, bs]);
  return out;
}

before(async () => {
  if (!(await haveCommand('mkfs.ext4')) || !(await haveCommand('debugfs'))) throw new Error('mkfs.ext4/debugfs missing: install e2fsprogs (scripts/setup.sh)');
  work = await tempDir('spw-ext4-fuzz-');
  const src = path.join(work.dir, 'src');
  await mkdir(path.join(src, 'etc/dir'), { recursive: true });
  await writeFile(path.join(src, 'etc/os-release'), 'ID=fuzz\n');
  await writeFile(path.join(src, 'etc/fstab'), '/swapfile none swap sw 0 0\n');
  await writeFile(path.join(src, 'swapfile'), Buffer.alloc(8192, 1));
  for (let i = 0; i < 200; i++) await writeFile(path.join(src, 'etc/dir', `f${i}`), `${i}`);
  const { open } = await import('node:fs/promises');
  const f = await open(path.join(src, 'sparse'), 'w');
  for (let i = 0; i < 8; i++) await f.write(Buffer.alloc(1024, i + 1), 0, 1024, i * 300 * 1024);
  await f.close();
  for (const [name, tool, args] of [
    ['ext4', 'mkfs.ext4', ['-b', '1024', '-O', 'inline_data']],
    ['ext3', 'mkfs.ext3', ['-b', '1024']],
  ] as const) {
    const img = path.join(work.dir, `${name}.img`);
    await run(tool, ['-q', '-F', '-N', '256', ...args, '-d', src, img, '4M']);
    const bytes = await readFile(img);
    images.push({ name, bytes, targets: await metadataRanges(img, bytes) });
  }
});
after(async () => {
  await work?.cleanup();
});

async function exercise(bytes: Buffer, patches: Map<number, number>, analyze: boolean): Promise<void> {
  const { read } = memReader(bytes, patches);
  try {
    const fs = await Ext4.open(read, 0, bytes.length);
    let n = 0;
    for await (const e of fs.walk()) {
      n++;
      for (const x of e.extents) assert.ok(x.offset >= 0 && x.offset + x.length <= bytes.length && x.length > 0, `extent of ${e.path} outside the image`);
    }
    assert.ok(n <= 100_000);
    await fs.readFile('/etc/os-release', 4096);
    await fs.readFile('/etc/dir/f7', 4096);
    await fs.readFile('/sparse', 256 * 1024);
  } catch (err) {
    if (!(err instanceof Ext4Error)) throw err;
  }
  if (!analyze) return;
  try {
    await analyzeVolume(memReader(bytes, patches).read, bytes.length, { top: 3 });
  } catch (err) {
    if (!(err instanceof Ext4Error) && !(err instanceof PartitionTableError)) throw err;
  }
}

describe('ext4 fuzz', () => {
  it('the clean images walk without error', async () => {
    for (const im of images) {
      const fs = await Ext4.open(memReader(im.bytes).read, 0);
      let n = 0;
      for await (const _ of fs.walk()) n++;
      assert.ok(n > 200, `${im.name}: ${n} entries`);
      assert.ok(im.targets.length > 4);
    }
  });

  it('random bytes in metadata: only typed errors, bounded work', async () => {
    for (const im of images) {
      const seed = 0x5eed ^ im.name.length;
      const rand = prng(seed);
      for (let i = 0; i < RUNS; i++) {
        const patches = new Map<number, number>();
        const edits = 1 + Math.floor(rand() * 4);
        for (let k = 0; k < edits; k++) {
          const [start, len] = im.targets[Math.floor(rand() * im.targets.length)]!;
          const at = start + Math.floor(rand() * len);
          const r = rand();
          if (r < 0.5) patches.set(at, Math.floor(rand() * 256));
          else if (r < 0.8) patches.set(at, im.bytes[at]! ^ (1 << Math.floor(rand() * 8)));
          else for (let j = 0; j < 4; j++) patches.set(at + j, Math.floor(rand() * 256));
        }
        try {
          await exercise(im.bytes, patches, i % 4 === 0);
        } catch (err) {
          assert.fail(`${im.name}, seed ${seed}, iteration ${i}: ${(err as Error).stack}`);
        }
      }
    }
  });

  it('fast-check: arbitrary bytes over the superblock and first blocks', async () => {
    const base = images[0]!.bytes;
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1024, max: 16 * 1024 }), fc.uint8Array({ minLength: 1, maxLength: 64 }), async (at, patch) => {
        const patches = new Map<number, number>();
        patch.forEach((v, j) => patches.set(at + j, v));
        await exercise(base, patches, true);
      }),
      { numRuns: Math.max(50, Math.floor(RUNS / 5)), seed: 42 },
    );
  });
});
