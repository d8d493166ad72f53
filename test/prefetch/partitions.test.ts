// Tests of the partition-table reader (src/prefetch/partitions.ts):
//   - against real tools: images partitioned by sfdisk (MBR with an extended partition and
//     logical partitions, GPT with Linux types), sgdisk (GPT with EFI, Linux and swap, named)
//     and fdisk -b 4096 (GPT on 4 KiB sectors), compared with what the tools report back;
//   - each check, one defect at a time: a bad primary GPT header or entry array falls back to
//     the backup header, both bad is a PartitionTableError; MBR/EBR defects (loops, long chains,
//     entries outside the disk, over the MBR or an EBR) are refused by name;
//   - fuzz (fast-check): arbitrary and structured bytes in the first sectors of a small disk,
//     and bit flips of the tool-made images. The result is a table or a PartitionTableError,
//     every partition lies inside the disk, every read stays inside it, reads are bounded.
// The tools come from the fdisk and gdisk packages, installed by scripts/setup.sh (`make test`);
// when they are missing the tool tests fail saying so, they never skip.

import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { crc32 } from 'node:zlib';
import fc from 'fast-check';

import { MAX_EBR_CHAIN, PartitionTableError, readPartitionTable, swapRanges, type Partition, type PartitionTable } from '../../src/prefetch/partitions.js';
import { haveCommand, run, tempDir } from '../helpers/proc.js';

const RUNS = Number(process.env.SPILLWAY_FUZZ_RUNS ?? 200);
const MiB = 1024 * 1024;
const UNIT = 512; // storage granularity of SparseDisk, whatever the logical sector size

const GUID = {
  efi: 'C12A7328-F81F-11D2-BA4B-00A0C93EC93B',
  linux: '0FC63DAF-8483-4772-8E79-3D69D8477DE4',
  swap: '0657FD6D-A4AB-43C4-84E5-0933C84B4F4F',
  lvm: 'E6D6D379-F507-44C2-A23C-238F2A3DF928',
  raid: 'A19D880F-05FC-4D3B-A006-743F0F84911E',
  rootX64: '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709',
  home: '933AC7E1-2EB4-4F13-B844-0E14E2AEF915',
  srv: '3B8F8425-20E0-4F3B-907F-1A25A76F98E8',
  msData: 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7',
};

// ---------------------------------------------------------------------------------------------
// A sparse in-memory disk that checks and counts the reads made of it

const ZERO_UNIT = Buffer.alloc(UNIT);

class SparseDisk {
  readonly units = new Map<number, Buffer>();
  /** Offsets read since the last reset (outcome() resets it). */
  reads: number[] = [];
  readonly violations: string[] = [];

  constructor(readonly size: number) {}

  static fromBuffer(b: Buffer): SparseDisk {
    const d = new SparseDisk(b.length);
    for (let u = 0; u * UNIT < b.length; u++) {
      const chunk = b.subarray(u * UNIT, (u + 1) * UNIT);
      if (chunk.equals(ZERO_UNIT.subarray(0, chunk.length))) continue;
      const unit = Buffer.alloc(UNIT);
      chunk.copy(unit);
      d.units.set(u, unit);
    }
    return d;
  }

  clone(): SparseDisk {
    const d = new SparseDisk(this.size);
    for (const [u, b] of this.units) d.units.set(u, Buffer.from(b));
    return d;
  }

  /** Walk [offset, offset + length) unit by unit: fn(unit number, offset in unit, offset in range, bytes). */
  private static spans(offset: number, length: number, fn: (u: number, within: number, pos: number, n: number) => void): void {
    for (let pos = 0; pos < length; ) {
      const u = Math.floor((offset + pos) / UNIT);
      const within = offset + pos - u * UNIT;
      const n = Math.min(UNIT - within, length - pos);
      fn(u, within, pos, n);
      pos += n;
    }
  }

  bytes(offset: number, length: number): Buffer {
    const out = Buffer.alloc(length);
    SparseDisk.spans(offset, length, (u, within, pos, n) => this.units.get(u)?.copy(out, pos, within, within + n));
    return out;
  }

  write(offset: number, data: Buffer): void {
    SparseDisk.spans(offset, data.length, (u, within, pos, n) => {
      let b = this.units.get(u);
      if (!b) this.units.set(u, (b = Buffer.alloc(UNIT)));
      data.copy(b, within, pos, pos + n);
    });
  }

  patch(offset: number, length: number, fn: (b: Buffer) => void): void {
    const b = this.bytes(offset, length);
    fn(b);
    this.write(offset, b);
  }

  readonly read = (offset: number, length: number): Promise<Buffer> => {
    this.reads.push(offset);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      this.violations.push(`read(${offset}, ${length}) of a ${this.size}-byte disk`);
      return Promise.resolve(Buffer.alloc(Math.max(0, Math.min(length, 1 << 20))));
    }
    return Promise.resolve(this.bytes(offset, length));
  };
}

// ---------------------------------------------------------------------------------------------
// Checks every result must pass

const KINDS = new Set(['swap', 'linux', 'efi', 'extended', 'lvm', 'raid', 'other']);

function checkTable(t: PartitionTable, size: number, sectorSize: number): void {
  assert.ok(['mbr', 'gpt', 'none'].includes(t.scheme), `scheme ${t.scheme}`);
  assert.equal(t.sectorSize, sectorSize);
  if (t.scheme === 'none') assert.equal(t.partitions.length, 0);
  let lastIndex = 0;
  for (const p of t.partitions) {
    const at = JSON.stringify(p);
    assert.equal(p.scheme, t.scheme, at);
    assert.ok(Number.isSafeInteger(p.index) && p.index > lastIndex, `index order: ${at}`);
    lastIndex = p.index;
    assert.ok(Number.isSafeInteger(p.start) && Number.isSafeInteger(p.length), at);
    assert.ok(p.start >= sectorSize, `partition over sector 0: ${at}`);
    assert.ok(p.length > 0, `empty partition listed: ${at}`);
    assert.ok(p.start + p.length <= size, `partition past the end of a ${size}-byte disk: ${at}`);
    assert.equal(p.start % sectorSize, 0, at);
    assert.equal(p.length % sectorSize, 0, at);
    assert.ok(KINDS.has(p.kind) && p.kind !== 'extended', at);
    if (p.scheme === 'mbr') {
      assert.match(p.type, /^[0-9a-f]{2}$/, at);
      assert.ok(!['00', '05', '0f', '85', 'ee'].includes(p.type), at);
      assert.equal(typeof p.bootable, 'boolean', at);
      if (p.index <= 4) assert.ok(p.index >= 1, at);
    } else {
      assert.match(p.type, /^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$/, at);
      assert.notEqual(p.type, '00000000-0000-0000-0000-000000000000', at);
      assert.match(p.uuid ?? '', /^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$/, at);
      assert.equal(typeof p.name, 'string', at);
    }
  }
  const swaps = swapRanges(t);
  assert.deepEqual(
    swaps,
    t.partitions.filter((p) => p.kind === 'swap').map((p) => ({ offset: p.start, length: p.length })).sort((a, b) => a.offset - b.offset || a.length - b.length),
  );
}

/** Read the table of `d`; a table must pass checkTable, anything thrown must be a PartitionTableError. */
async function outcome(d: SparseDisk, opts: { sectorSize?: number } = {}): Promise<PartitionTable | PartitionTableError> {
  const sectorSize = opts.sectorSize ?? 512;
  d.reads = [];
  try {
    const t = await readPartitionTable(d.read, d.size, opts);
    checkTable(t, d.size, sectorSize);
    return t;
  } catch (e) {
    if (!(e instanceof PartitionTableError)) throw e;
    assert.equal(e.code, 'SPW_ERR_PARTITION_TABLE');
    assert.ok(e.message.length > 0);
    return e;
  } finally {
    assert.deepEqual(d.violations, [], 'reads outside the disk');
    // MBR + 4 extended partitions × 128 EBRs, or MBR + 2 × (GPT header + entry array).
    assert.ok(d.reads.length <= 1 + 4 * MAX_EBR_CHAIN, `${d.reads.length} reads`);
  }
}

async function table(d: SparseDisk, opts: { sectorSize?: number } = {}): Promise<PartitionTable> {
  const r = await outcome(d, opts);
  if (r instanceof PartitionTableError) assert.fail(`expected a table, got: ${r.message}`);
  return r;
}

async function refused(d: SparseDisk, pattern: RegExp, opts: { sectorSize?: number } = {}): Promise<PartitionTableError> {
  const r = await outcome(d, opts);
  if (!(r instanceof PartitionTableError)) assert.fail(`expected PartitionTableError matching ${pattern}, got a table: ${JSON.stringify(r)}`);
  assert.match(r.message, pattern);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Real tools

const TOOL_PACKAGE: Record<string, string> = { sfdisk: 'fdisk', fdisk: 'fdisk', sgdisk: 'gdisk', truncate: 'coreutils' };

async function requireTools(): Promise<void> {
  const missing: string[] = [];
  for (const c of Object.keys(TOOL_PACKAGE)) if (!(await haveCommand(c))) missing.push(c);
  if (missing.length > 0) {
    const pkgs = [...new Set(missing.map((c) => TOOL_PACKAGE[c]))].join(' ');
    throw new Error(`missing ${missing.join(', ')} (Debian packages: ${pkgs}): run \`make test\`, which installs them through scripts/setup.sh`);
  }
}

interface SfdiskJson {
  partitiontable: {
    label: string;
    sectorsize: number;
    partitions: Array<{ node: string; start: number; size: number; type: string; uuid?: string; name?: string; bootable?: boolean }>;
  };
}

async function sfdiskJson(img: string): Promise<SfdiskJson['partitiontable']> {
  const r = await run('sfdisk', ['--json', img]);
  return (JSON.parse(r.stdout) as SfdiskJson).partitiontable;
}

async function makeImage(dir: string, name: string, size: string): Promise<string> {
  const img = path.join(dir, name);
  await run('truncate', ['-s', size, img]);
  return img;
}

async function load(img: string): Promise<SparseDisk> {
  return SparseDisk.fromBuffer(await readFile(img));
}

/** What we report, in the tools' terms (sectors, index from the device node's number). */
function asTool(p: Partition, sectorSize: number): Record<string, unknown> {
  const o: Record<string, unknown> = { index: p.index, start: p.start / sectorSize, size: p.length / sectorSize, type: p.type };
  if (p.scheme === 'mbr') o.bootable = p.bootable;
  else Object.assign(o, { uuid: p.uuid, name: p.name });
  return o;
}

function fromSfdisk(pt: SfdiskJson['partitiontable'], img: string): Array<Record<string, unknown>> {
  return pt.partitions
    .filter((p) => !(pt.label === 'dos' && ['5', 'f', '85'].includes(p.type)))
    .map((p) => {
      const o: Record<string, unknown> = { index: Number(p.node.slice(img.length)), start: p.start, size: p.size };
      if (pt.label === 'dos') Object.assign(o, { type: p.type.padStart(2, '0'), bootable: p.bootable === true });
      else Object.assign(o, { type: p.type.toUpperCase(), uuid: p.uuid, name: p.name ?? '' });
      return o;
    });
}

// Images shared by the tool tests, the defect tests and the fuzz: made once.
let tmp: { dir: string; cleanup: () => Promise<void> } | undefined;
let mbrImg = '';
let gptImg = '';
let mbrDisk: SparseDisk;
let gptDisk: SparseDisk;

async function makeMbrImage(dir: string): Promise<string> {
  const img = await makeImage(dir, 'mbr.img', '16M');
  const script = ['label: dos', 'start=2048, size=4096, type=83, bootable', 'size=2048, type=82', 'type=5', 'size=4096, type=83', 'size=2048, type=82', ''].join('\n');
  await run('sfdisk', ['-q', img], { input: script });
  return img;
}

async function makeGptImage(dir: string): Promise<string> {
  const img = await makeImage(dir, 'gpt.img', '16M');
  // Slot 3 left empty, so the swap partition is number 4.
  await run('sgdisk', ['-n', '1:2048:+1M', '-t', '1:ef00', '-c', '1:EFI System', '-n', '2:0:+4M', '-t', '2:8300', '-c', '2:root fs', '-n', '4:0:+2M', '-t', '4:8200', '-c', '4:swäp 🐧', img]);
  return img;
}

before(async () => {
  await requireTools();
  tmp = await tempDir('spw-partitions-');
  mbrImg = await makeMbrImage(tmp.dir);
  gptImg = await makeGptImage(tmp.dir);
  mbrDisk = await load(mbrImg);
  gptDisk = await load(gptImg);
});

after(async () => {
  await tmp?.cleanup();
});

describe('partition tables made by sfdisk, sgdisk and fdisk', { timeout: 120_000 }, () => {
  it('MBR: linux (bootable), swap, and an extended partition with two logical partitions, one swap', async () => {
    const t = await table(mbrDisk.clone());
    assert.equal(t.scheme, 'mbr');
    const tool = await sfdiskJson(mbrImg);
    assert.equal(tool.label, 'dos');
    assert.deepEqual(
      t.partitions.map((p) => asTool(p, 512)),
      fromSfdisk(tool, mbrImg),
    );
    assert.deepEqual(
      t.partitions.map((p) => [p.index, p.type, p.kind]),
      [
        [1, '83', 'linux'],
        [2, '82', 'swap'],
        [5, '83', 'linux'],
        [6, '82', 'swap'],
      ],
    );
    const logicalSwap = tool.partitions.find((p) => p.node === `${mbrImg}6`)!;
    assert.deepEqual(swapRanges(t), [
      { offset: 6144 * 512, length: 2048 * 512 },
      { offset: logicalSwap.start * 512, length: logicalSwap.size * 512 },
    ]);
  });

  it('GPT: EFI, linux and swap, named, with an empty slot between them', async () => {
    const t = await table(gptDisk.clone());
    assert.equal(t.scheme, 'gpt');
    const tool = await sfdiskJson(gptImg);
    assert.equal(tool.label, 'gpt');
    assert.deepEqual(
      t.partitions.map((p) => asTool(p, 512)),
      fromSfdisk(tool, gptImg),
    );
    assert.deepEqual(
      t.partitions.map((p) => [p.index, p.kind, p.name]),
      [
        [1, 'efi', 'EFI System'],
        [2, 'linux', 'root fs'],
        [4, 'swap', 'swäp 🐧'],
      ],
    );
    assert.deepEqual(swapRanges(t), [{ offset: 12288 * 512, length: 4096 * 512 }]);
  });

  it('kinds: LVM, RAID, EFI and foreign types on MBR; LVM, RAID, discoverable root/home/srv and foreign types on GPT', async () => {
    const dir = tmp!.dir;
    const mbr = await makeImage(dir, 'kinds-mbr.img', '8M');
    await run('sfdisk', ['-q', mbr], { input: ['label: dos', 'size=1MiB, type=ef', 'size=1MiB, type=8e', 'size=1MiB, type=fd', 'size=1MiB, type=7', ''].join('\n') });
    const tm = await table(await load(mbr));
    assert.deepEqual(tm.partitions.map((p) => asTool(p, 512)), fromSfdisk(await sfdiskJson(mbr), mbr));
    assert.deepEqual(
      tm.partitions.map((p) => [p.type, p.kind]),
      [
        ['ef', 'efi'],
        ['8e', 'lvm'],
        ['fd', 'raid'],
        ['07', 'other'],
      ],
    );

    const gpt = await makeImage(dir, 'kinds-gpt.img', '8M');
    const types = [GUID.lvm, GUID.raid, GUID.rootX64, GUID.home, GUID.srv, GUID.msData];
    await run('sfdisk', ['-q', gpt], { input: ['label: gpt', ...types.map((g) => `size=512KiB, type=${g}`), ''].join('\n') });
    const tg = await table(await load(gpt));
    assert.deepEqual(tg.partitions.map((p) => asTool(p, 512)), fromSfdisk(await sfdiskJson(gpt), gpt));
    assert.deepEqual(
      tg.partitions.map((p) => p.kind),
      ['lvm', 'raid', 'linux', 'linux', 'linux', 'other'],
    );
    assert.deepEqual(swapRanges(tg), []);
  });

  it('GPT on 4096-byte sectors (fdisk -b 4096), read with sectorSize 4096', async () => {
    const img = await makeImage(tmp!.dir, 'gpt4k.img', '8M');
    const script = ['g', 'n', '1', '', '+1M', 't', GUID.swap, 'n', '2', '', '', 'w', ''].join('\n');
    await run('fdisk', ['-b', '4096', img], { input: script });
    const listing = await run('fdisk', ['-b', '4096', '-l', '-o', 'Device,Start,Sectors,Type-UUID', img]);
    const rows = listing.stdout
      .split('\n')
      .filter((l) => l.startsWith(img))
      .map((l) => l.trim().split(/\s+/))
      .map(([dev, start, sectors, type]) => ({ index: Number(dev!.slice(img.length)), start: Number(start), size: Number(sectors), type }));
    assert.equal(rows.length, 2, listing.stdout);

    const d = await load(img);
    const t = await table(d, { sectorSize: 4096 });
    assert.deepEqual(
      t.partitions.map((p) => ({ index: p.index, start: p.start / 4096, size: p.length / 4096, type: p.type })),
      rows,
    );
    assert.deepEqual(swapRanges(t), [{ offset: rows[0]!.start * 4096, length: rows[0]!.size * 4096 }]);
    // With the default 512-byte sectors there is no GPT where the protective MBR says: refused, saying which size was assumed.
    await refused(d.clone(), /no valid GPT with 512-byte sectors/);
  });
});

// ---------------------------------------------------------------------------------------------
// Defects, one check at a time

function mbrSector(entries: Array<[boot: number, type: number, lba: number, count: number]>, signature = true): Buffer {
  const b = Buffer.alloc(512);
  entries.forEach(([boot, type, lba, count], i) => {
    const o = 446 + 16 * i;
    b[o] = boot;
    b[o + 4] = type;
    b.writeUInt32LE(lba, o + 8);
    b.writeUInt32LE(count, o + 12);
  });
  if (signature) b.writeUInt16LE(0xaa55, 510);
  return b;
}

/** Patch a field of the GPT header at `lba`, then recompute the header CRC (unless told not to). */
function patchHeader(d: SparseDisk, lba: number, fn: (h: Buffer) => void, reseal = true): void {
  d.patch(lba * 512, 512, (h) => {
    fn(h);
    if (reseal) resealHeader(h);
  });
}

function resealHeader(h: Buffer): void {
  h.writeUInt32LE(0, 16);
  h.writeUInt32LE(crc32(h.subarray(0, Math.min(512, Math.max(0, h.readUInt32LE(12))))), 16);
}

/** Edit the entries of the GPT whose header is at `lba`, then recompute both CRCs. */
function patchEntries(d: SparseDisk, lba: number, fn: (entry: Buffer, slot: number) => void): void {
  d.patch(lba * 512, 512, (h) => {
    const at = Number(h.readBigUInt64LE(72)) * 512;
    const count = h.readUInt32LE(80);
    const size = h.readUInt32LE(84);
    d.patch(at, count * size, (a) => {
      for (let i = 0; i < count; i++) fn(a.subarray(i * size, (i + 1) * size), i + 1);
      h.writeUInt32LE(crc32(a), 88);
    });
    resealHeader(h);
  });
}

function lastLba(d: SparseDisk): number {
  return d.size / 512 - 1;
}

/** Where the entry array of the GPT header at `lba` is. */
function entriesLbaOf(d: SparseDisk, lba: number): number {
  return Number(d.bytes(lba * 512, 512).readBigUInt64LE(72));
}

describe('GPT checks: a bad primary falls back to the backup header, both bad is refused', { timeout: 120_000 }, () => {
  // Each defect, applied to the header at `lba` (1 or the last LBA), and the reason it is refused.
  const defects: Array<[string, (d: SparseDisk, lba: number) => void, RegExp]> = [
    ['no signature', (d, lba) => patchHeader(d, lba, (h) => h.write('EFI PARS', 0, 'latin1')), /no "EFI PART" signature/],
    ['header CRC', (d, lba) => patchHeader(d, lba, (h) => (h[60]! ^= 1), false), /header CRC mismatch/],
    ['entry array CRC', (d, lba) => d.patch(entriesLbaOf(d, lba) * 512, 512, (a) => (a[0]! ^= 1)), /partition entry array CRC mismatch/],
    ['header size below 92', (d, lba) => patchHeader(d, lba, (h) => h.writeUInt32LE(88, 12)), /header size 88 outside 92\.\.512/],
    ['header size above the sector size', (d, lba) => patchHeader(d, lba, (h) => h.writeUInt32LE(513, 12)), /header size 513 outside 92\.\.512/],
    ['header says it is elsewhere', (d, lba) => patchHeader(d, lba, (h) => h.writeBigUInt64LE(BigInt(lba === 1 ? 2 : 1), 24)), /header says it is at LBA [12]\b/],
    ['entry size below 128', (d, lba) => patchHeader(d, lba, (h) => h.writeUInt32LE(120, 84)), /entry size 120 is not a multiple of 8 of at least 128/],
    ['entry size not a multiple of 8', (d, lba) => patchHeader(d, lba, (h) => h.writeUInt32LE(132, 84)), /entry size 132 is not/],
    ['too many entries', (d, lba) => patchHeader(d, lba, (h) => h.writeUInt32LE(4097, 80)), /4097 entries \(at most 4096\)/],
    ['entry array too large', (d, lba) => patchHeader(d, lba, (h) => (h.writeUInt32LE(4096, 80), h.writeUInt32LE(512, 84))), /entry array of 2097152 bytes \(at most 1048576\)/],
    ['entry array past the end of the disk', (d, lba) => patchHeader(d, lba, (h) => h.writeBigUInt64LE(BigInt(lastLba(d)), 72)), /entry array at LBA 32767 \(32 sectors\) is not on the disk/],
    ['entry array at LBA 0', (d, lba) => patchHeader(d, lba, (h) => h.writeBigUInt64LE(0n, 72)), /entry array at LBA 0 \(32 sectors\) is not on the disk/],
    ['entry array beyond 2^53', (d, lba) => patchHeader(d, lba, (h) => h.writeBigUInt64LE(2n ** 60n, 72)), /entry array at LBA 1152921504606846976 /],
    ['entry array over the usable range', (d, lba) => patchHeader(d, lba, (h) => h.writeBigUInt64LE(40n, 72)), /entry array at LBA 40 overlaps the usable range 34\.\.32734/],
    ['last usable LBA past the end of the disk', (d, lba) => patchHeader(d, lba, (h) => h.writeBigUInt64LE(32768n, 48)), /usable range 34\.\.32768 is not inside 2\.\.32767/],
    ['first usable after last usable', (d, lba) => patchHeader(d, lba, (h) => h.writeBigUInt64LE(32735n, 40)), /usable range 32735\.\.32734 is not inside/],
    ['first usable over the primary header', (d, lba) => patchHeader(d, lba, (h) => h.writeBigUInt64LE(1n, 40)), /usable range 1\.\.32734 is not inside/],
  ];

  for (const [name, defect, reason] of defects) {
    it(name, async () => {
      const good = await table(gptDisk.clone());
      const backup = lastLba(gptDisk);

      const d = gptDisk.clone();
      defect(d, 1);
      assert.deepEqual(await table(d), good, 'primary bad: the backup gives the same table');
      assert.ok(d.reads.includes(backup * 512), 'the backup header was not read');

      defect(d, backup);
      const e = await refused(d, /^protective MBR but no valid GPT with 512-byte sectors: /);
      const [primaryWhy, backupWhy] = e.message.split('; ');
      assert.match(primaryWhy!, /primary header \(LBA 1\): /);
      assert.match(primaryWhy!, reason);
      assert.match(backupWhy!, new RegExp(`backup header \\(LBA ${backup}\\): `));
      assert.match(backupWhy!, reason);
    });
  }

  it('checks only the backup header can fail: header inside the usable range, entry array over the header', async () => {
    const backup = lastLba(gptDisk);
    for (const [edit, reason] of [
      [(h: Buffer) => h.writeBigUInt64LE(BigInt(backup), 48), /backup header \(LBA 32767\): header lies inside the usable range 34\.\.32767/],
      [(h: Buffer) => h.writeBigUInt64LE(BigInt(backup - 31), 72), /backup header \(LBA 32767\): entry array at LBA 32736 covers the header/],
    ] as const) {
      const d = gptDisk.clone();
      patchHeader(d, 1, (h) => h.write('EFI PARS', 0, 'latin1'));
      patchHeader(d, backup, edit);
      await refused(d, reason);
    }
  });

  it('a good primary is used without reading the backup', async () => {
    const d = gptDisk.clone();
    d.units.delete(lastLba(d)); // no backup header at all
    const t = await table(d);
    assert.equal(t.partitions.length, 3);
    assert.deepEqual(d.reads, [0, 512, 2 * 512], 'MBR, primary header, primary entry array');
  });

  it('protective MBR without any GPT is refused', async () => {
    const d = new SparseDisk(MiB);
    d.write(0, mbrSector([[0, 0xee, 1, 2047]]));
    await refused(d, /protective MBR but no valid GPT.*primary header \(LBA 1\): no "EFI PART" signature.*backup header \(LBA 2047\): no "EFI PART"/);
  });

  it('a disk too small for a backup header', async () => {
    const d = new SparseDisk(1024);
    d.write(0, mbrSector([[0, 0xee, 1, 1]]));
    await refused(d, /backup header: the disk has no sector after LBA 1/);
  });

  it('entries are checked against the usable range, in both copies (valid CRCs)', async () => {
    for (const [what, edit, pattern] of [
      ['past the last usable LBA', (e: Buffer) => e.writeBigUInt64LE(BigInt(lastLba(gptDisk)), 40), /GPT entry 4 .* is outside the usable range 34\.\.32734/],
      ['before the first usable LBA', (e: Buffer) => e.writeBigUInt64LE(33n, 32), /GPT entry 4 .*LBA 33\.\..* is outside the usable range/],
      ['ending before it starts', (e: Buffer) => e.writeBigUInt64LE(e.readBigUInt64LE(32) - 1n, 40), /GPT entry 4 .* ends before it starts/],
      ['starting beyond 2^53', (e: Buffer) => e.writeBigUInt64LE(2n ** 63n, 32), /GPT entry 4 .*LBA 9223372036854775808\.\./],
    ] as const) {
      const d = gptDisk.clone();
      for (const lba of [1, lastLba(d)]) patchEntries(d, lba, (e, slot) => slot === 4 && edit(e));
      await refused(d, pattern).catch((err: Error) => assert.fail(`${what}: ${err.message}`));
    }
  });

  it('entries with the zero type GUID are skipped; an empty table is a table', async () => {
    const d = gptDisk.clone();
    for (const lba of [1, lastLba(d)]) patchEntries(d, lba, (e, slot) => slot === 2 && e.fill(0, 0, 16));
    assert.deepEqual((await table(d)).partitions.map((p) => p.index), [1, 4]);
    for (const lba of [1, lastLba(d)]) patchEntries(d, lba, (e) => e.fill(0));
    assert.deepEqual(await table(d), { scheme: 'gpt', sectorSize: 512, partitions: [] });
    for (const lba of [1, lastLba(d)]) patchHeader(d, lba, (h) => { h.writeUInt32LE(0, 80); h.writeUInt32LE(crc32(Buffer.alloc(0)), 88); });
    assert.deepEqual(await table(d), { scheme: 'gpt', sectorSize: 512, partitions: [] });
  });

  it('a hybrid MBR (ee plus other entries) is read as GPT', async () => {
    const d = gptDisk.clone();
    d.patch(0, 512, (s) => mbrSector([[0, 0xee, 1, 2047], [0x80, 0x83, 2048, 2048]]).copy(s, 446, 446, 512));
    assert.equal((await table(d)).scheme, 'gpt');
  });
});

describe('MBR checks', { timeout: 120_000 }, () => {
  it('no 55AA signature, or boot indicators other than 00/80 (a FAT boot sector): no table', async () => {
    const d = mbrDisk.clone();
    d.patch(0, 512, (s) => s.writeUInt16LE(0, 510));
    assert.deepEqual(await table(d), { scheme: 'none', sectorSize: 512, partitions: [] });
    const fat = mbrDisk.clone();
    fat.patch(0, 512, (s) => (s[446 + 16]! = 0x12));
    assert.deepEqual(await table(fat), { scheme: 'none', sectorSize: 512, partitions: [] });
  });

  it('disks smaller than a sector, and a zero disk: no table, no reads past the end', async () => {
    for (const size of [0, 1, 511]) assert.equal((await table(new SparseDisk(size))).scheme, 'none');
    assert.equal((await table(new SparseDisk(4096), { sectorSize: 4096 })).scheme, 'none');
    assert.equal((await table(new SparseDisk(4000), { sectorSize: 4096 })).scheme, 'none');
  });

  it('empty entries (type 00 or zero sectors) are skipped, numbers kept', async () => {
    const d = new SparseDisk(MiB);
    d.write(0, mbrSector([[0, 0x83, 1, 100], [0, 0, 200, 100], [0, 0x82, 300, 0], [0, 0x82, 400, 100]]));
    const t = await table(d);
    assert.deepEqual(t.partitions.map((p) => [p.index, p.start / 512, p.length / 512, p.kind]), [
      [1, 1, 100, 'linux'],
      [4, 400, 100, 'swap'],
    ]);
  });

  it('a primary partition past the end of the disk or over the MBR is refused by name', async () => {
    const d = mbrDisk.clone();
    d.patch(0, 512, (s) => s.writeUInt32LE(32768 - 6144 + 1, 446 + 16 + 12));
    await refused(d, /MBR partition 2 \(type 82, sectors 6144\+26625\) ends past the end of the disk \(32768 sectors\)/);
    const z = mbrDisk.clone();
    z.patch(0, 512, (s) => s.writeUInt32LE(0, 446 + 8));
    await refused(z, /MBR partition 1 .* starts at sector 0, over the MBR/);
    const ext = mbrDisk.clone();
    ext.patch(0, 512, (s) => s.writeUInt32LE(0xffffffff, 446 + 32 + 12));
    await refused(ext, /MBR partition 3 \(type 05/);
  });

  /** The EBRs of the sfdisk image: [lba, sector] in chain order. */
  function ebrs(d: SparseDisk): number[] {
    const ext = 8192;
    const out = [ext];
    for (;;) {
      const s = d.bytes(out[out.length - 1]! * 512, 512);
      const link = s.readUInt32LE(446 + 16 + 8);
      if (s[446 + 16 + 4] !== 5) return out;
      out.push(ext + link);
    }
  }

  it('the sfdisk image has the EBR chain the tests below edit', () => {
    assert.equal(ebrs(mbrDisk).length, 2);
  });

  it('an EBR chain that loops is refused', async () => {
    const d = mbrDisk.clone();
    const [, second] = ebrs(d);
    d.patch(second! * 512, 512, (s) => mbrSector([[0, 0x82, 1, 10], [0, 0x05, 0, 10]]).copy(s, 446, 446));
    await refused(d, /EBR chain of MBR partition 3 loops back to sector 8192/);
  });

  it('an EBR link outside the extended partition is refused', async () => {
    const d = mbrDisk.clone();
    d.patch(8192 * 512, 512, (s) => s.writeUInt32LE(24576, 446 + 16 + 8));
    await refused(d, /EBR at sector 8192 links to sector 32768, outside extended partition 3 \(sectors 8192\.\.32767\)/);
  });

  it('a logical partition past the end of the disk or over its own EBR is refused by name', async () => {
    const d = mbrDisk.clone();
    const [, second] = ebrs(d);
    d.patch(second! * 512, 512, (s) => s.writeUInt32LE(1 << 20, 446 + 12));
    await refused(d, new RegExp(`logical partition 6 \\(type 82, EBR at sector ${second}, slot 1, .*\\) ends past the end of the disk`));
    const z = mbrDisk.clone();
    z.patch(8192 * 512, 512, (s) => s.writeUInt32LE(0, 446 + 8));
    await refused(z, /logical partition 5 .* starts on its own EBR/);
  });

  it('an EBR without its signature ends the chain (as Linux)', async () => {
    const d = mbrDisk.clone();
    const [, second] = ebrs(d);
    d.patch(second! * 512, 512, (s) => s.writeUInt16LE(0, 510));
    assert.deepEqual((await table(d)).partitions.map((p) => p.index), [1, 2, 5]);
  });

  it('garbage in EBR slots 3 and 4 outside the extended partition is ignored; inside, it is a logical partition', async () => {
    const d = mbrDisk.clone();
    d.patch(8192 * 512, 512, (s) => mbrSector([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0x83, 30000, 5000], [0, 0x82, 100, 10]]).copy(s, 446 + 32, 446 + 32, 510));
    const t = await table(d);
    assert.deepEqual(t.partitions.map((p) => [p.index, p.start / 512, p.kind]), [
      [1, 2048, 'linux'],
      [2, 6144, 'swap'],
      [5, 10240, 'linux'],
      [6, 8292, 'swap'],
      [7, 16384, 'swap'],
    ]);
  });

  function chain(links: number): SparseDisk {
    const d = new SparseDisk(4 * MiB);
    d.write(0, mbrSector([[0x80, 0x83, 1, 9], [0, 0x0f, 10, 8000]]));
    for (let k = 0; k < links; k++) {
      const entries: Array<[number, number, number, number]> = [[0, k % 2 ? 0x82 : 0x83, 1, 1]];
      if (k + 1 < links) entries.push([0, 0x05, 2 * (k + 1), 2]);
      d.write((10 + 2 * k) * 512, mbrSector(entries));
    }
    return d;
  }

  it(`an EBR chain of ${MAX_EBR_CHAIN} links is read, one more is refused`, async () => {
    const t = await table(chain(MAX_EBR_CHAIN));
    assert.equal(t.partitions.length, 1 + MAX_EBR_CHAIN);
    assert.equal(t.partitions.at(-1)!.index, 4 + MAX_EBR_CHAIN);
    assert.equal(swapRanges(t).length, MAX_EBR_CHAIN / 2);
    await refused(chain(MAX_EBR_CHAIN + 1), new RegExp(`EBR chain of MBR partition 2 is longer than ${MAX_EBR_CHAIN} links`));
  });

  it('read errors propagate unchanged; a short read is a PartitionTableError', async () => {
    const eio = Object.assign(new Error('EIO'), { code: 'EIO' });
    await assert.rejects(readPartitionTable(() => Promise.reject(eio), MiB), (e) => e === eio);
    await assert.rejects(readPartitionTable(() => Promise.resolve(Buffer.alloc(10)), MiB), (e) => e instanceof PartitionTableError && /returned 10 bytes/.test(e.message));
  });

  it('invalid arguments are RangeErrors', async () => {
    const d = new SparseDisk(MiB);
    await assert.rejects(readPartitionTable(d.read, -1), RangeError);
    await assert.rejects(readPartitionTable(d.read, 1.5), RangeError);
    await assert.rejects(readPartitionTable(d.read, MiB, { sectorSize: 1000 }), RangeError);
    await assert.rejects(readPartitionTable(d.read, MiB, { sectorSize: 256 }), RangeError);
  });
});

// ---------------------------------------------------------------------------------------------
// Fuzz

const SMALL_SECTORS = 96;

/** A small disk (1..96 sectors plus a ragged tail) with arbitrary bytes in its first 41 sectors. */
const arbitraryDisk = fc
  .record({
    sectors: fc.integer({ min: 0, max: SMALL_SECTORS }),
    tail: fc.integer({ min: 0, max: 511 }),
    data: fc.array(fc.tuple(fc.integer({ min: 0, max: 40 }), fc.uint8Array({ minLength: 512, maxLength: 512 })), { maxLength: 8 }),
    mbr: fc.option(fc.array(fc.tuple(fc.constantFrom(0, 0x80), fc.constantFrom(0, 0x05, 0x0f, 0x85, 0x82, 0x83, 0xee, 0x07), fc.integer({ min: 0, max: 120 }), fc.integer({ min: 0, max: 120 })), { minLength: 4, maxLength: 4 })),
  })
  .map(({ sectors, tail, data, mbr }) => {
    const d = new SparseDisk(sectors * 512 + tail);
    for (const [lba, bytes] of data) if ((lba + 1) * 512 <= d.size) d.write(lba * 512, Buffer.from(bytes));
    if (mbr && d.size >= 512) d.write(0, mbrSector(mbr));
    return d;
  });

/** Usually `usual`, now and then something from `odd`. */
function mostly<T>(usual: T, odd: fc.Arbitrary<T>): fc.Arbitrary<T> {
  return fc.oneof({ arbitrary: fc.constant(usual), weight: 12 }, { arbitrary: odd, weight: 1 });
}
const jitter = mostly(0, fc.integer({ min: -3, max: 3 }));

type MbrEntrySpec = [boot: number, type: number, lba: number, count: number];
const mbrEntrySpec: fc.Arbitrary<MbrEntrySpec> = fc.tuple(
  mostly(0, fc.constantFrom(0x80, 0x80, 0x80, 0x7f)),
  fc.constantFrom(0, 0x05, 0x0f, 0x85, 0x82, 0x83, 0x8e),
  fc.integer({ min: 0, max: 60 }),
  fc.integer({ min: 0, max: 60 }),
);

/** An MBR and EBRs with small entries (mostly inside the disk): chains, loops, overlaps, links out. */
const structuredMbr = fc
  .record({
    sectors: fc.integer({ min: 41, max: 128 }),
    mbr: fc.array(mbrEntrySpec, { minLength: 4, maxLength: 4 }),
    ebrs: fc.array(
      fc.record({ lba: fc.integer({ min: 1, max: 60 }), signature: mostly(true, fc.constant(false)), entries: fc.array(mbrEntrySpec, { minLength: 4, maxLength: 4 }) }),
      { maxLength: 12 },
    ),
  })
  .map(({ sectors, mbr, ebrs }) => {
    const d = new SparseDisk(sectors * 512);
    for (const e of ebrs) d.write(e.lba * 512, mbrSector(e.entries, e.signature));
    d.write(0, mbrSector(mbr));
    return d;
  });

const gptHeaderSpec = fc.record({
  headerSize: mostly(92, fc.constantFrom(91, 512, 600, 0xffffffff)),
  myLba: jitter,
  firstUsable: jitter,
  lastUsable: jitter,
  entriesLba: mostly<number | 'huge'>(0, fc.oneof(fc.integer({ min: -3, max: 3 }), fc.constant('huge'))),
  count: mostly(4, fc.oneof(fc.integer({ min: 0, max: 16 }), fc.constantFrom(4096, 4097, 0xffffffff))),
  entrySize: mostly(128, fc.constantFrom(256, 136, 120, 130, 0, 0xfffffff8)),
  entries: fc.array(
    fc.record({
      type: fc.constantFrom(GUID.swap, GUID.linux, GUID.efi, GUID.msData, '00000000-0000-0000-0000-000000000000'),
      first: fc.oneof({ arbitrary: fc.integer({ min: -3, max: 100 }), weight: 12 }, { arbitrary: fc.constant<'huge'>('huge'), weight: 1 }),
      length: fc.integer({ min: -2, max: 30 }),
      name: fc.uint8Array({ maxLength: 72 }),
    }),
    { maxLength: 16 },
  ),
  badArrayCrc: mostly(false, fc.constant(true)),
  badHeaderCrc: mostly(false, fc.constant(true)),
});

/** GUID text → its 16 bytes on disk (first three fields little endian). */
function guidBytes(text: string): Buffer {
  const g = Buffer.from(text.replace(/-/g, ''), 'hex');
  return Buffer.concat([g.subarray(0, 4).reverse(), g.subarray(4, 6).reverse(), g.subarray(6, 8).reverse(), g.subarray(8)]);
}

/**
 * A protective MBR and primary/backup GPT headers that are mostly plausible (valid CRCs, fields
 * around where a tool puts them) with now and then one field off, and entries near the usable range.
 */
const structuredGpt = fc
  .record({
    sectors: fc.integer({ min: 8, max: 160 }),
    primary: fc.option(gptHeaderSpec, { freq: 8 }),
    backup: fc.option(gptHeaderSpec, { freq: 3 }),
  })
  .map(({ sectors, primary, backup }) => {
    const d = new SparseDisk(sectors * 512);
    const last = sectors - 1;
    d.write(0, mbrSector([[0, 0xee, 1, Math.min(last, 0xffffffff)]]));
    for (const [lba, h] of [
      [1, primary],
      [last, backup],
    ] as const) {
      if (!h) continue;
      const arraySectors = Math.ceil((h.count * h.entrySize) / 512);
      const plausibleSectors = Math.min(arraySectors, 8);
      const firstUsable = 2 + plausibleSectors + h.firstUsable;
      const lastUsable = last - 1 - plausibleSectors + h.lastUsable;
      const entriesLba = h.entriesLba === 'huge' ? 2 ** 53 + 8 : (lba === 1 ? 2 : last - plausibleSectors) + h.entriesLba;
      const s = Buffer.alloc(512);
      s.write('EFI PART', 0, 'latin1');
      s.writeUInt32LE(0x10000, 8);
      s.writeUInt32LE(h.headerSize, 12);
      s.writeBigUInt64LE(BigInt(Math.max(0, lba + h.myLba)), 24);
      s.writeBigUInt64LE(BigInt(lba === 1 ? last : 1), 32); // alternate LBA (not checked)
      s.writeBigUInt64LE(BigInt(Math.max(0, firstUsable)), 40);
      s.writeBigUInt64LE(BigInt(Math.max(0, lastUsable)), 48);
      s.writeBigUInt64LE(BigInt(Math.max(0, entriesLba)), 72);
      s.writeUInt32LE(h.count >>> 0, 80);
      s.writeUInt32LE(h.entrySize >>> 0, 84);
      if (h.entrySize >= 128 && h.entrySize <= 256 && h.count <= 16 && entriesLba >= 0 && entriesLba < sectors) {
        const array = Buffer.alloc(h.count * h.entrySize);
        h.entries.slice(0, h.count).forEach((e, i) => {
          const o = i * h.entrySize;
          guidBytes(e.type).copy(array, o);
          const first = e.first === 'huge' ? 2n ** 63n : BigInt(Math.max(0, firstUsable + e.first));
          array.writeBigUInt64LE(first, o + 32);
          array.writeBigUInt64LE(first + BigInt(e.length) < 0n ? 0n : first + BigInt(e.length), o + 40);
          Buffer.from(e.name).copy(array, o + 56);
        });
        d.write(entriesLba * 512, array.subarray(0, Math.max(0, d.size - entriesLba * 512)));
        s.writeUInt32LE((crc32(array) ^ (h.badArrayCrc ? 1 : 0)) >>> 0, 88);
      }
      resealHeader(s);
      if (h.badHeaderCrc) s[16]! ^= 1;
      d.write(lba * 512, s);
    }
    return d;
  });

/** 1..8 bit flips in the non-zero sectors of a tool-made image (its table structures). */
function flipsOf(base: () => SparseDisk) {
  return fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 511 }), fc.integer({ min: 0, max: 7 })), { minLength: 1, maxLength: 8 }).map((flips) => {
    const d = base().clone();
    const units = [...d.units.keys()].sort((a, b) => a - b);
    for (const [u, byte, bit] of flips) d.units.get(units[u % units.length]!)![byte]! ^= 1 << bit;
    return d;
  });
}

describe('fuzz: a table or a PartitionTableError, partitions and reads inside the disk', () => {
  const prop = (arb: fc.Arbitrary<SparseDisk>) => fc.assert(fc.asyncProperty(arb, async (d) => void (await outcome(d))), { numRuns: RUNS });

  it('arbitrary bytes in sectors 0..40 of a small disk', { timeout: 120_000 }, () => prop(arbitraryDisk));
  it('structured MBR/EBR sectors', { timeout: 120_000 }, () => prop(structuredMbr));
  it('structured GPT headers with valid CRCs', { timeout: 120_000 }, () => prop(structuredGpt));
  it('bit flips of the sfdisk MBR image', { timeout: 120_000 }, () => prop(flipsOf(() => mbrDisk)));
  it('bit flips of the sgdisk GPT image', { timeout: 120_000 }, () => prop(flipsOf(() => gptDisk)));
  it('bit flips of the sgdisk GPT image read with 4096-byte sectors', { timeout: 120_000 }, () =>
    fc.assert(fc.asyncProperty(flipsOf(() => gptDisk), async (d) => void (await outcome(d, { sectorSize: 4096 }))), { numRuns: RUNS }));
});
