// Partition-table reader for a disk we only reach through a read callback: finds the swap
// partitions (they get their own write policy) and gives the disk analyzer the layout.
//
// Supported: MBR (four primary entries, extended partitions followed through their EBR chain,
// logical partitions numbered from 5 in chain order, as Linux numbers them) and GPT (found
// through a protective MBR entry of type ee; primary header at LBA 1, backup header at the last
// LBA when the primary or its entry array is bad). Where the Linux kernel (block/partitions/
// msdos.c, efi.c) and the specifications leave room, we follow the kernel: a 55AA sector whose
// boot indicators are not 0x00/0x80 is a FAT boot sector, not a table; an EBR without its
// signature ends the chain; garbage in EBR slots 3 and 4 that lies outside the extended
// partition is ignored.
//
// The input is untrusted (a guest owns its disk), so:
//   - every read is checked against [0, size) before it is issued, and reads are bounded in
//     number (EBR chain ≤ 128 links, loops detected) and in size (GPT entry array ≤ 1 MiB);
//   - a malformed table throws PartitionTableError naming what is wrong, never another error;
//     a partition that would lie outside the disk, over the MBR/an EBR, or outside the GPT's
//     usable range is refused, not clipped, because a range we get wrong would get the swap
//     write policy applied to data that is not swap;
//   - errors from `read` itself (EIO, a closed link, ...) propagate unchanged: they are not a
//     property of the table.
// Invalid arguments (size, sectorSize) are programming errors: RangeError.

import { crc32 } from 'node:zlib';

/** 'extended' is never listed by readPartitionTable: MBR extended containers are followed, not listed. */
export type PartitionKind = 'swap' | 'linux' | 'efi' | 'extended' | 'lvm' | 'raid' | 'other';

export interface Partition {
  /** 1-based, as Linux numbers them (MBR logical partitions start at 5, GPT keeps entry slots). */
  index: number;
  scheme: 'mbr' | 'gpt';
  /** Bytes from the start of the disk. */
  start: number;
  /** Bytes. */
  length: number;
  /** MBR: two lower-case hex digits like '82'; GPT: type GUID, upper case, 8-4-4-4-12. */
  type: string;
  kind: PartitionKind;
  /** GPT partition name (UTF-16LE decoded, up to the first NUL); '' when unnamed. GPT only. */
  name?: string;
  /** GPT unique partition GUID, upper case. GPT only. */
  uuid?: string;
  /** MBR active flag (boot indicator 0x80). MBR only. */
  bootable?: boolean;
}

export interface PartitionTable {
  scheme: 'mbr' | 'gpt' | 'none';
  sectorSize: number;
  /** Sorted by index; empty entries and MBR extended containers are not listed. */
  partitions: Partition[];
}

export class PartitionTableError extends Error {
  readonly code = 'SPW_ERR_PARTITION_TABLE';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'PartitionTableError';
  }
}

export type ReadFn = (offset: number, length: number) => Promise<Buffer>;

/** Longest EBR chain followed (Linux stops at its partition limit; real tables have a few). */
export const MAX_EBR_CHAIN = 128;
/** Most GPT entries accepted (128 is usual; the specification sets no maximum). */
export const MAX_GPT_ENTRIES = 4096;
/** Largest GPT entry array read (entry count × entry size). */
export const MAX_GPT_ARRAY_BYTES = 1024 * 1024;

const MBR_SIGNATURE_OFFSET = 510;
const MBR_TABLE_OFFSET = 446;
const MBR_ENTRY_SIZE = 16;
const GPT_SIGNATURE = Buffer.from('EFI PART', 'latin1');
const GPT_MIN_HEADER_SIZE = 92;
const GPT_MIN_ENTRY_SIZE = 128;
const GPT_NAME_OFFSET = 56;
const GPT_NAME_BYTES = 72;

const MBR_EXTENDED = new Set([0x05, 0x0f, 0x85]);
const MBR_PROTECTIVE = 0xee;

const MBR_KINDS: Record<number, PartitionKind> = { 0x82: 'swap', 0x83: 'linux', 0xef: 'efi', 0x8e: 'lvm', 0xfd: 'raid' };

const GPT_KINDS: Record<string, PartitionKind> = {
  '0657FD6D-A4AB-43C4-84E5-0933C84B4F4F': 'swap',
  '0FC63DAF-8483-4772-8E79-3D69D8477DE4': 'linux', // generic Linux data
  'C12A7328-F81F-11D2-BA4B-00A0C93EC93B': 'efi',
  'E6D6D379-F507-44C2-A23C-238F2A3DF928': 'lvm',
  'A19D880F-05FC-4D3B-A006-743F0F84911E': 'raid',
  // Discoverable Partitions Specification (systemd): root, /usr, /home, /srv, /var, /var/tmp.
  '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709': 'linux', // root, x86-64
  '44479540-F297-41B2-9AF7-D131D5F0458A': 'linux', // root, x86
  'B921B045-1DF0-41C3-AF44-4C6F280D3FAE': 'linux', // root, aarch64
  '8484680C-9521-48C6-9C11-B0720656F69E': 'linux', // /usr, x86-64
  '933AC7E1-2EB4-4F13-B844-0E14E2AEF915': 'linux', // /home
  '3B8F8425-20E0-4F3B-907F-1A25A76F98E8': 'linux', // /srv
  '4D21B016-B534-45C2-A9FB-5C16E091FD2D': 'linux', // /var
  '7EC6F557-3BC5-4ACA-B293-16EF5DF639D1': 'linux', // /var/tmp
};

/**
 * Read the partition table of a disk of `size` bytes. `read(offset, length)` must return exactly
 * `length` bytes; it is only called with ranges inside [0, size).
 */
export async function readPartitionTable(read: ReadFn, size: number, opts: { sectorSize?: number } = {}): Promise<PartitionTable> {
  const sectorSize = opts.sectorSize ?? 512;
  if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`invalid disk size ${size}`);
  if (!Number.isSafeInteger(sectorSize) || sectorSize < 512 || sectorSize > 65536 || (sectorSize & (sectorSize - 1)) !== 0) {
    throw new RangeError(`sectorSize must be a power of two from 512 to 65536, got ${sectorSize}`);
  }
  const disk = new Disk(read, size, sectorSize);
  const none: PartitionTable = { scheme: 'none', sectorSize, partitions: [] };
  if (disk.sectors < 1) return none;

  const mbr = await disk.sector(0);
  if (mbr.readUInt16LE(MBR_SIGNATURE_OFFSET) !== 0xaa55) return none;
  const entries = [0, 1, 2, 3].map((i) => mbrEntry(mbr, i));
  if (entries.some((e) => e.type === MBR_PROTECTIVE)) {
    return { scheme: 'gpt', sectorSize, partitions: await readGpt(disk) };
  }
  // A 55AA sector with other boot indicators is a FAT/NTFS boot sector (Linux: msdos.c).
  if (entries.some((e) => e.boot !== 0 && e.boot !== 0x80)) return none;
  return { scheme: 'mbr', sectorSize, partitions: await readMbr(disk, entries) };
}

/** Byte ranges of the swap partitions, sorted by offset. */
export function swapRanges(t: PartitionTable): Array<{ offset: number; length: number }> {
  return t.partitions
    .filter((p) => p.kind === 'swap')
    .map((p) => ({ offset: p.start, length: p.length }))
    .sort((a, b) => a.offset - b.offset || a.length - b.length);
}

/** The disk behind `read`, with every access checked against its size. */
class Disk {
  readonly sectors: number;
  constructor(
    private readonly readFn: ReadFn,
    readonly size: number,
    readonly sectorSize: number,
  ) {
    this.sectors = Math.floor(size / sectorSize);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0 || offset + length > this.size) {
      // Unreachable if the checks below are right; refusing beats asking for bytes we may not read.
      throw new PartitionTableError(`refusing to read ${length} bytes at ${offset} of a ${this.size}-byte disk`);
    }
    const b: unknown = await this.readFn(offset, length);
    if (!(b instanceof Uint8Array) || b.length !== length) {
      const got = b instanceof Uint8Array ? `${b.length} bytes` : typeof b;
      throw new PartitionTableError(`read of ${length} bytes at ${offset} returned ${got}`);
    }
    return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  }

  sector(lba: number): Promise<Buffer> {
    return this.read(lba * this.sectorSize, this.sectorSize);
  }

  /** True when sectors [lba, lba + count) are all on the disk. */
  holds(lba: number, count: number): boolean {
    return lba >= 0 && count >= 0 && lba + count <= this.sectors;
  }
}

// ---------------------------------------------------------------------------------------------
// MBR

interface MbrEntry {
  slot: number; // 0..3
  boot: number;
  type: number;
  lba: number; // relative to the sector the entry is relative to
  count: number;
}

function mbrEntry(sector: Buffer, slot: number): MbrEntry {
  const o = MBR_TABLE_OFFSET + slot * MBR_ENTRY_SIZE;
  return { slot, boot: sector[o]!, type: sector[o + 4]!, lba: sector.readUInt32LE(o + 8), count: sector.readUInt32LE(o + 12) };
}

const isEmpty = (e: MbrEntry): boolean => e.type === 0 || e.count === 0;
const hex2 = (t: number): string => t.toString(16).padStart(2, '0');

function mbrPartition(disk: Disk, index: number, e: MbrEntry, lba: number): Partition {
  return {
    index,
    scheme: 'mbr',
    start: lba * disk.sectorSize,
    length: e.count * disk.sectorSize,
    type: hex2(e.type),
    kind: MBR_KINDS[e.type] ?? 'other',
    bootable: e.boot === 0x80,
  };
}

async function readMbr(disk: Disk, entries: MbrEntry[]): Promise<Partition[]> {
  const primaries: Partition[] = [];
  const logicals: Partition[] = [];
  for (const e of entries) {
    if (isEmpty(e)) continue;
    const what = `MBR partition ${e.slot + 1} (type ${hex2(e.type)}, sectors ${e.lba}+${e.count})`;
    if (e.lba === 0) throw new PartitionTableError(`${what} starts at sector 0, over the MBR`);
    if (!disk.holds(e.lba, e.count)) throw new PartitionTableError(`${what} ends past the end of the disk (${disk.sectors} sectors)`);
    if (MBR_EXTENDED.has(e.type)) await readEbrChain(disk, e, logicals);
    else primaries.push(mbrPartition(disk, e.slot + 1, e, e.lba));
  }
  return [...primaries, ...logicals];
}

/**
 * Follow an extended partition's chain of EBRs. In each EBR, data entries are relative to that
 * EBR; the link to the next EBR (the first extended-type entry) is relative to the start of the
 * extended partition. Logical partitions are appended to `out`, numbered on from 5.
 */
async function readEbrChain(disk: Disk, ext: MbrEntry, out: Partition[]): Promise<void> {
  const first = ext.lba;
  const end = ext.lba + ext.count; // exclusive; within the disk (checked by the caller)
  const seen = new Set<number>();
  let ebr = first;
  for (let links = 0; ; links++) {
    if (seen.has(ebr)) throw new PartitionTableError(`EBR chain of MBR partition ${ext.slot + 1} loops back to sector ${ebr}`);
    if (links >= MAX_EBR_CHAIN) throw new PartitionTableError(`EBR chain of MBR partition ${ext.slot + 1} is longer than ${MAX_EBR_CHAIN} links`);
    seen.add(ebr);
    const sector = await disk.sector(ebr);
    if (sector.readUInt16LE(MBR_SIGNATURE_OFFSET) !== 0xaa55) return; // end of chain (as Linux)
    const entries = [0, 1, 2, 3].map((i) => mbrEntry(sector, i));
    for (const e of entries) {
      if (isEmpty(e) || MBR_EXTENDED.has(e.type)) continue;
      const lba = ebr + e.lba;
      // Slots 3 and 4 of an EBR sometimes hold garbage: ignored unless inside the container.
      if (e.slot >= 2 && (lba < first || lba + e.count > end)) continue;
      const index = 5 + out.length;
      const what = `logical partition ${index} (type ${hex2(e.type)}, EBR at sector ${ebr}, slot ${e.slot + 1}, sectors ${lba}+${e.count})`;
      if (e.lba === 0) throw new PartitionTableError(`${what} starts on its own EBR`);
      if (!disk.holds(lba, e.count)) throw new PartitionTableError(`${what} ends past the end of the disk (${disk.sectors} sectors)`);
      out.push(mbrPartition(disk, index, e, lba));
    }
    const link = entries.find((e) => !isEmpty(e) && MBR_EXTENDED.has(e.type));
    if (!link) return;
    const next = first + link.lba;
    if (next < first || next >= end) {
      throw new PartitionTableError(`EBR at sector ${ebr} links to sector ${next}, outside extended partition ${ext.slot + 1} (sectors ${first}..${end - 1})`);
    }
    ebr = next;
  }
}

// ---------------------------------------------------------------------------------------------
// GPT

interface GptHeader {
  lba: number;
  firstUsable: number;
  lastUsable: number;
  entriesLba: number;
  entryCount: number;
  entrySize: number;
}

/** A u64 as a number, or Infinity when beyond 2^53 (so every range check on it fails). */
function u64(b: Buffer, o: number): number {
  const v = b.readBigUInt64LE(o);
  return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : Infinity;
}

/** A GUID in its canonical text form: the first three fields are stored little endian. */
function formatGuid(b: Buffer, o = 0): string {
  const h = (from: number, to: number): string => b.subarray(o + from, o + to).toString('hex');
  const le = (from: number, to: number): string => Buffer.from(b.subarray(o + from, o + to)).reverse().toString('hex');
  return `${le(0, 4)}-${le(4, 6)}-${le(6, 8)}-${h(8, 10)}-${h(10, 16)}`.toUpperCase();
}

async function readGpt(disk: Disk): Promise<Partition[]> {
  const problems: string[] = [];
  const lbas = [1];
  if (disk.sectors - 1 > 1) lbas.push(disk.sectors - 1);
  else problems.push(`backup header: the disk has no sector after LBA 1`);
  for (const lba of lbas) {
    const which = lba === 1 ? 'primary header (LBA 1)' : `backup header (LBA ${lba})`;
    if (!disk.holds(lba, 1)) {
      problems.push(`${which}: beyond the end of the disk`);
      continue;
    }
    const r = await gptHeader(disk, lba);
    if (typeof r === 'string') {
      problems.push(`${which}: ${r}`);
      continue;
    }
    const bytes = r.header.entryCount * r.header.entrySize;
    const array = bytes === 0 ? Buffer.alloc(0) : await disk.read(r.header.entriesLba * disk.sectorSize, bytes);
    if (crc32(array) !== r.arrayCrc) {
      problems.push(`${which}: partition entry array CRC mismatch`);
      continue;
    }
    return gptPartitions(disk, r.header, array);
  }
  throw new PartitionTableError(`protective MBR but no valid GPT with ${disk.sectorSize}-byte sectors: ${problems.join('; ')}`);
}

/** Parse and check the GPT header at `lba`; a string says why it is not valid. */
async function gptHeader(disk: Disk, lba: number): Promise<{ header: GptHeader; arrayCrc: number } | string> {
  const s = await disk.sector(lba);
  if (!s.subarray(0, 8).equals(GPT_SIGNATURE)) return 'no "EFI PART" signature';
  const headerSize = s.readUInt32LE(12);
  if (headerSize < GPT_MIN_HEADER_SIZE || headerSize > disk.sectorSize) return `header size ${headerSize} outside ${GPT_MIN_HEADER_SIZE}..${disk.sectorSize}`;
  const copy = Buffer.from(s.subarray(0, headerSize));
  copy.writeUInt32LE(0, 16);
  if (crc32(copy) !== s.readUInt32LE(16)) return 'header CRC mismatch';
  const myLba = u64(s, 24);
  if (myLba !== lba) return `header says it is at LBA ${s.readBigUInt64LE(24)}`;
  const h: GptHeader = {
    lba,
    firstUsable: u64(s, 40),
    lastUsable: u64(s, 48),
    entriesLba: u64(s, 72),
    entryCount: s.readUInt32LE(80),
    entrySize: s.readUInt32LE(84),
  };
  const raw = (o: number): string => s.readBigUInt64LE(o).toString();
  const lastLba = disk.sectors - 1;
  if (h.firstUsable < 2 || h.firstUsable > h.lastUsable || h.lastUsable > lastLba) {
    return `usable range ${raw(40)}..${raw(48)} is not inside 2..${lastLba}`;
  }
  if (lba >= h.firstUsable && lba <= h.lastUsable) return `header lies inside the usable range ${h.firstUsable}..${h.lastUsable}`;
  if (h.entrySize < GPT_MIN_ENTRY_SIZE || h.entrySize % 8 !== 0) return `entry size ${h.entrySize} is not a multiple of 8 of at least ${GPT_MIN_ENTRY_SIZE}`;
  if (h.entryCount > MAX_GPT_ENTRIES) return `${h.entryCount} entries (at most ${MAX_GPT_ENTRIES})`;
  const bytes = h.entryCount * h.entrySize;
  if (bytes > MAX_GPT_ARRAY_BYTES) return `entry array of ${bytes} bytes (at most ${MAX_GPT_ARRAY_BYTES})`;
  const sectors = Math.ceil(bytes / disk.sectorSize);
  const a = h.entriesLba;
  if (a < 2 || !disk.holds(a, sectors)) return `entry array at LBA ${raw(72)} (${sectors} sectors) is not on the disk after LBA 1`;
  if (a <= lba && lba < a + sectors) return `entry array at LBA ${a} covers the header`;
  if (a <= h.lastUsable && h.firstUsable < a + sectors) return `entry array at LBA ${a} overlaps the usable range ${h.firstUsable}..${h.lastUsable}`;
  return { header: h, arrayCrc: s.readUInt32LE(88) };
}

function gptPartitions(disk: Disk, h: GptHeader, array: Buffer): Partition[] {
  const out: Partition[] = [];
  for (let i = 0; i < h.entryCount; i++) {
    const e = array.subarray(i * h.entrySize, (i + 1) * h.entrySize);
    const type = formatGuid(e, 0);
    if (type === '00000000-0000-0000-0000-000000000000') continue;
    const first = u64(e, 32);
    const last = u64(e, 40); // inclusive
    const what = `GPT entry ${i + 1} (type ${type}, LBA ${e.readBigUInt64LE(32)}..${e.readBigUInt64LE(40)})`;
    if (first > last) throw new PartitionTableError(`${what} ends before it starts`);
    if (first < h.firstUsable || last > h.lastUsable) throw new PartitionTableError(`${what} is outside the usable range ${h.firstUsable}..${h.lastUsable}`);
    out.push({
      index: i + 1,
      scheme: 'gpt',
      start: first * disk.sectorSize,
      length: (last - first + 1) * disk.sectorSize,
      type,
      kind: GPT_KINDS[type] ?? 'other',
      name: gptName(e.subarray(GPT_NAME_OFFSET, GPT_NAME_OFFSET + GPT_NAME_BYTES)),
      uuid: formatGuid(e, 16),
    });
  }
  return out;
}

function gptName(b: Buffer): string {
  let end = 0;
  while (end + 1 < b.length && (b[end] !== 0 || b[end + 1] !== 0)) end += 2;
  return b.subarray(0, end).toString('utf16le');
}
