// Read-only ext2/ext3/ext4 reader for a filesystem we only reach through a read callback. The
// disk analyzer (analyze.ts) uses it to list every file with the volume byte ranges its data
// occupies (the file map behind the link's group push), and to read a few small files
// (/etc/os-release, /etc/fstab) to describe the guest.
//
// Supported: revision 0 and 1 superblocks; 1 KiB..64 KiB blocks; 32- and 64-byte group
// descriptors (64bit); meta_bg; flex_bg; any inode size; extent trees (depth ≤ 5, unwritten
// extents reported with `unwritten: true`); the ext2/ext3 block map (direct, indirect, double and
// triple indirect); linear and htree directories (htree leaves are ordinary dirent blocks, and
// interior blocks look like empty dirents, so reading every block in order finds every name);
// inline_data files and directories (i_block plus the in-inode "system.data" attribute); fast and
// slow symlinks; hard links (reported once per path, later paths name the first one).
// Refused with Ext4Error at open: compression, journal devices, dirdata, encryption, bigalloc and
// any incompat feature this reader does not know. Checksums (metadata_csum) are not verified.
//
// The input is untrusted (a guest owns its disk), so:
//   - every read is checked against the filesystem's extent before it is issued and every block
//     number against the block count; reads are at most one block (or an inode) long;
//   - work is bounded: extent depth ≤ 5 and must decrease by one per level, extents must come in
//     increasing logical order, extents per file ≤ MAX_EXTENTS_PER_FILE, directories ≤
//     MAX_DIR_BYTES, entries per walk ≤ maxEntries, each directory inode is walked once (a cycle
//     through a corrupt directory hard link ends there), symlinks are followed ≤ 40 times;
//   - anything malformed throws Ext4Error naming what and where; errors from `read` itself (EIO,
//     a closed link, ...) propagate unchanged.

export type ReadAt = (offset: number, length: number) => Promise<Buffer>;

export class Ext4Error extends Error {
  readonly code = 'SPW_ERR_EXT4';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'Ext4Error';
  }
}

/** A run of a file's data: `length` bytes at file offset `logical`, stored at volume offset `offset`. */
export interface FileExtent {
  /** Byte offset in the file. */
  logical: number;
  /** Absolute byte offset in the volume (the disk the ReadAt reads), not in the filesystem. */
  offset: number;
  /** Bytes (a whole number of blocks). */
  length: number;
  /** Allocated but never written (reads as zeros). */
  unwritten?: boolean;
}

export type Ext4FileType = 'file' | 'dir' | 'symlink' | 'other';

export interface Ext4Entry {
  /** Absolute path inside the filesystem, '/' for the root. */
  path: string;
  inode: number;
  type: Ext4FileType;
  /** i_size in bytes. */
  size: number;
  /** Hard-link count (i_links_count). */
  links: number;
  /** Sorted by `logical`. Empty for inline data, fast symlinks, devices, FIFOs and sockets. */
  extents: FileExtent[];
  /** The data lives in the inode (inline_data). */
  inline?: boolean;
  /** Set on the second and later paths of a hard-linked inode: the path it was first seen at. */
  hardLinkOf?: string;
}

export interface Ext4Info {
  /** 'ext4' | 'ext3' | 'ext2', decided from the feature flags as blkid does. */
  type: 'ext4' | 'ext3' | 'ext2';
  blockSize: number;
  blocksCount: number;
  freeBlocks: number;
  inodesCount: number;
  freeInodes: number;
  inodeSize: number;
  groupCount: number;
  /** Lower case 8-4-4-4-12. */
  uuid: string;
  label: string;
  lastMounted: string;
  features: string[];
  /** The journal needs recovery (the filesystem was in use when the image was taken). */
  needsRecovery: boolean;
}

export interface WalkOptions {
  /** Stop after this many entries (default: no limit other than maxEntries). */
  maxFiles?: number;
  /** Throw Ext4Error past this many entries (default MAX_WALK_ENTRIES). */
  maxEntries?: number;
}

export const MAX_EXTENT_DEPTH = 5;
export const MAX_EXTENTS_PER_FILE = 1 << 20;
export const MAX_DIR_BYTES = 256 * 1024 * 1024;
export const MAX_WALK_ENTRIES = 50_000_000;
export const MAX_SYMLINK_FOLLOWS = 40;
export const MAX_PATH_DEPTH = 1024;
const MAX_SYMLINK_BYTES = 4096;

const SB_OFFSET = 1024;
const SB_SIZE = 1024;
const MAGIC = 0xef53;
const ROOT_INO = 2;

// Feature flags (names as in mke2fs / lib/e2p/feature.c).
const COMPAT: Array<[number, string]> = [
  [0x1, 'dir_prealloc'],
  [0x2, 'imagic_inodes'],
  [0x4, 'has_journal'],
  [0x8, 'ext_attr'],
  [0x10, 'resize_inode'],
  [0x20, 'dir_index'],
  [0x40, 'lazy_bg'],
  [0x100, 'snapshot_bitmap'],
  [0x200, 'sparse_super2'],
  [0x400, 'fast_commit'],
  [0x800, 'stable_inodes'],
  [0x1000, 'orphan_file'],
];
const INCOMPAT_SUPPORTED: Array<[number, string]> = [
  [0x2, 'filetype'],
  [0x4, 'needs_recovery'],
  [0x10, 'meta_bg'],
  [0x40, 'extent'],
  [0x80, '64bit'],
  [0x100, 'mmp'],
  [0x200, 'flex_bg'],
  [0x400, 'ea_inode'],
  [0x2000, 'metadata_csum_seed'],
  [0x4000, 'large_dir'],
  [0x8000, 'inline_data'],
  [0x20000, 'casefold'],
];
const INCOMPAT_REFUSED: Array<[number, string, string]> = [
  [0x1, 'compression', 'ext2 compression was never merged into Linux'],
  [0x8, 'journal_dev', 'this is an external journal device, not a filesystem'],
  [0x1000, 'dirdata', 'directory entries with extra data (Lustre) are not supported'],
  [0x10000, 'encrypt', 'fscrypt-encrypted files cannot be mapped without their keys'],
];
const RO_COMPAT: Array<[number, string]> = [
  [0x1, 'sparse_super'],
  [0x2, 'large_file'],
  [0x4, 'btree_dir'],
  [0x8, 'huge_file'],
  [0x10, 'uninit_bg'],
  [0x20, 'dir_nlink'],
  [0x40, 'extra_isize'],
  [0x100, 'quota'],
  [0x200, 'bigalloc'],
  [0x400, 'metadata_csum'],
  [0x800, 'replica'],
  [0x1000, 'read-only'],
  [0x2000, 'project'],
  [0x4000, 'shared_blocks'],
  [0x8000, 'verity'],
  [0x10000, 'orphan_present'],
];
const INCOMPAT_FILETYPE = 0x2;
const INCOMPAT_RECOVER = 0x4;
const INCOMPAT_META_BG = 0x10;
const INCOMPAT_64BIT = 0x80;
const INCOMPAT_LARGEDIR = 0x4000;
const RO_COMPAT_SPARSE_SUPER = 0x1;
const RO_COMPAT_BIGALLOC = 0x200;
const COMPAT_HAS_JOURNAL = 0x4;
const COMPAT_SPARSE_SUPER2 = 0x200;

// Inode flags.
const FL_ENCRYPT = 0x800;
const FL_EXTENTS = 0x80000;
const FL_INLINE_DATA = 0x10000000;

const S_IFMT = 0xf000;
const S_IFREG = 0x8000;
const S_IFDIR = 0x4000;
const S_IFLNK = 0xa000;

const EXTENT_MAGIC = 0xf30a;
const XATTR_MAGIC = 0xea020000;
const XATTR_INDEX_SYSTEM = 7;
const INLINE_BYTES = 60; // i_block

interface Superblock {
  blockSize: number;
  blocksCount: number;
  freeBlocks: number;
  inodesCount: number;
  freeInodes: number;
  firstDataBlock: number;
  blocksPerGroup: number;
  inodesPerGroup: number;
  inodeSize: number;
  descSize: number;
  groupCount: number;
  firstMetaBg: number;
  compat: number;
  incompat: number;
  roCompat: number;
  backupBgs: [number, number];
  uuid: string;
  label: string;
  lastMounted: string;
}

interface Inode {
  ino: number;
  mode: number;
  type: Ext4FileType;
  size: number;
  links: number;
  flags: number;
  /** i_block, 60 bytes. */
  block: Buffer;
  /** The whole on-disk inode (inodeSize bytes), for in-inode extended attributes. */
  raw: Buffer;
}

function fileType(mode: number): Ext4FileType {
  switch (mode & S_IFMT) {
    case S_IFREG:
      return 'file';
    case S_IFDIR:
      return 'dir';
    case S_IFLNK:
      return 'symlink';
    default:
      return 'other';
  }
}

/** u32 lo + u32 hi as a number; Infinity when beyond 2^53 (so every range check on it fails). */
function join64(lo: number, hi: number): number {
  const v = hi * 2 ** 32 + lo;
  return Number.isSafeInteger(v) ? v : Infinity;
}

function cString(b: Buffer): string {
  const nul = b.indexOf(0);
  return b.subarray(0, nul < 0 ? b.length : nul).toString('utf8');
}

function formatUuid(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}

function isPowerOf(n: number, base: number): boolean {
  if (n < 1) return false;
  while (n % base === 0) n /= base;
  return n === 1;
}

/** True when the ext magic is where a superblock would be at `fsOffset` (no other check). */
export async function probeExt(read: ReadAt, fsOffset: number, fsLength: number): Promise<boolean> {
  if (fsLength < SB_OFFSET + SB_SIZE) return false;
  const b = await read(fsOffset + SB_OFFSET + 0x38, 2);
  return b.length === 2 && b.readUInt16LE(0) === MAGIC;
}

/** A small LRU of metadata blocks (inode table, descriptors, extent nodes, indirect blocks). */
class BlockCache {
  private readonly map = new Map<number, Buffer>();
  constructor(private readonly limit: number) {}
  get(k: number): Buffer | undefined {
    const v = this.map.get(k);
    if (v !== undefined) {
      this.map.delete(k);
      this.map.set(k, v);
    }
    return v;
  }
  set(k: number, v: Buffer): void {
    this.map.set(k, v);
    if (this.map.size > this.limit) {
      const first = this.map.keys().next();
      if (!first.done) this.map.delete(first.value);
    }
  }
}

export class Ext4 {
  readonly info: Ext4Info;
  private readonly sb: Superblock;
  private readonly cache = new BlockCache(2048);

  private constructor(
    private readonly readFn: ReadAt,
    /** Byte offset of the filesystem in the volume. */
    readonly fsOffset: number,
    /** Bytes of the volume the filesystem may occupy. */
    readonly fsLength: number,
    sb: Superblock,
  ) {
    this.sb = sb;
    this.info = {
      type: fsType(sb),
      blockSize: sb.blockSize,
      blocksCount: sb.blocksCount,
      freeBlocks: sb.freeBlocks,
      inodesCount: sb.inodesCount,
      freeInodes: sb.freeInodes,
      inodeSize: sb.inodeSize,
      groupCount: sb.groupCount,
      uuid: sb.uuid,
      label: sb.label,
      lastMounted: sb.lastMounted,
      features: featureNames(sb),
      needsRecovery: (sb.incompat & INCOMPAT_RECOVER) !== 0,
    };
  }

  /**
   * Open the filesystem at byte `fsOffset` of the volume behind `read`. `fsLength` (default:
   * unbounded) is the room it has (its partition); a filesystem larger than that is refused.
   */
  static async open(read: ReadAt, fsOffset: number, fsLength = Number.MAX_SAFE_INTEGER - fsOffset): Promise<Ext4> {
    if (!Number.isSafeInteger(fsOffset) || fsOffset < 0) throw new RangeError(`invalid filesystem offset ${fsOffset}`);
    if (!Number.isSafeInteger(fsLength) || fsLength < 0) throw new RangeError(`invalid filesystem length ${fsLength}`);
    if (fsLength < SB_OFFSET + SB_SIZE) throw new Ext4Error(`a ${fsLength}-byte region is too small to hold an ext2/3/4 superblock`);
    const raw = await checkedRead(read, fsOffset + SB_OFFSET, SB_SIZE);
    const sb = parseSuperblock(raw, fsOffset);
    const bytes = sb.blocksCount * sb.blockSize;
    if (bytes > fsLength) {
      throw new Ext4Error(
        `the ext filesystem at offset ${fsOffset} says it is ${bytes} bytes (${sb.blocksCount} blocks of ${sb.blockSize}) but its partition/volume has only ${fsLength}: the image is truncated or the partition table is wrong`,
      );
    }
    return new Ext4(read, fsOffset, fsLength, sb);
  }

  /** Bytes the filesystem occupies. */
  get sizeBytes(): number {
    return this.sb.blocksCount * this.sb.blockSize;
  }

  /** Bytes in use (blocks not free, including metadata and the journal). */
  get usedBytes(): number {
    return Math.max(0, this.sb.blocksCount - this.sb.freeBlocks) * this.sb.blockSize;
  }

  // -------------------------------------------------------------------------------------------
  // Reads

  private async readBytes(fsByte: number, length: number, what: string): Promise<Buffer> {
    if (!Number.isSafeInteger(fsByte) || fsByte < 0 || length <= 0 || fsByte + length > this.sizeBytes) {
      throw new Ext4Error(`${what}: bytes ${fsByte}+${length} are outside the ${this.sizeBytes}-byte filesystem at offset ${this.fsOffset}`);
    }
    return checkedRead(this.readFn, this.fsOffset + fsByte, length);
  }

  private checkBlock(block: number, count: number, what: string): void {
    if (!Number.isSafeInteger(block) || block < 0 || count < 0 || block + count > this.sb.blocksCount) {
      throw new Ext4Error(`${what}: blocks ${block}+${count} are outside the filesystem (${this.sb.blocksCount} blocks)`);
    }
  }

  /** One metadata block, cached. */
  private async block(block: number, what: string): Promise<Buffer> {
    this.checkBlock(block, 1, what);
    const hit = this.cache.get(block);
    if (hit) return hit;
    const b = await this.readBytes(block * this.sb.blockSize, this.sb.blockSize, what);
    this.cache.set(block, b);
    return b;
  }

  // -------------------------------------------------------------------------------------------
  // Group descriptors and inodes

  private hasSuper(group: number): boolean {
    if (group === 0) return true;
    if (this.sb.compat & COMPAT_SPARSE_SUPER2) return group === this.sb.backupBgs[0] || group === this.sb.backupBgs[1];
    if (group <= 1 || !(this.sb.roCompat & RO_COMPAT_SPARSE_SUPER)) return true;
    if (group % 2 === 0) return false;
    return isPowerOf(group, 3) || isPowerOf(group, 5) || isPowerOf(group, 7);
  }

  /** Block holding descriptor block number `i` (the i-th block of the descriptor table). */
  private descriptorBlock(i: number): number {
    const sb = this.sb;
    if (!(sb.incompat & INCOMPAT_META_BG) || i < sb.firstMetaBg) return sb.firstDataBlock + 1 + i;
    const perBlock = sb.blockSize / sb.descSize;
    const group = i * perBlock;
    return sb.firstDataBlock + group * sb.blocksPerGroup + (this.hasSuper(group) ? 1 : 0);
  }

  private async inodeTable(group: number): Promise<number> {
    const sb = this.sb;
    const perBlock = sb.blockSize / sb.descSize;
    const blk = await this.block(this.descriptorBlock(Math.floor(group / perBlock)), `group descriptor of group ${group}`);
    const d = (group % perBlock) * sb.descSize;
    const lo = blk.readUInt32LE(d + 0x8);
    const hi = sb.descSize >= 64 ? blk.readUInt32LE(d + 0x28) : 0;
    return join64(lo, hi);
  }

  async inode(ino: number): Promise<Inode> {
    const sb = this.sb;
    if (!Number.isSafeInteger(ino) || ino < 1 || ino > sb.inodesCount) throw new Ext4Error(`inode ${ino} is outside 1..${sb.inodesCount}`);
    const group = Math.floor((ino - 1) / sb.inodesPerGroup);
    const index = (ino - 1) % sb.inodesPerGroup;
    const table = await this.inodeTable(group);
    const byte = index * sb.inodeSize;
    const blockNo = table + Math.floor(byte / sb.blockSize);
    this.checkBlock(table, Math.ceil((sb.inodesPerGroup * sb.inodeSize) / sb.blockSize), `inode table of group ${group}`);
    const blk = await this.block(blockNo, `inode ${ino}`);
    const within = byte % sb.blockSize;
    const raw = blk.subarray(within, within + sb.inodeSize);
    const mode = raw.readUInt16LE(0);
    const type = fileType(mode);
    let size = raw.readUInt32LE(0x4);
    // As the kernel's ext4_isize(): i_size_high counts for regular files, and for directories with large_dir.
    if (type === 'file' || (type === 'dir' && sb.incompat & INCOMPAT_LARGEDIR)) size = join64(size, raw.readUInt32LE(0x6c));
    if (!Number.isSafeInteger(size)) throw new Ext4Error(`inode ${ino}: size is beyond 2^53 bytes`);
    return { ino, mode, type, size, links: raw.readUInt16LE(0x1a), flags: raw.readUInt32LE(0x20), block: raw.subarray(0x28, 0x28 + INLINE_BYTES), raw };
  }

  // -------------------------------------------------------------------------------------------
  // Data mapping

  /** The extents of an inode's data, in the filesystem's blocks (logical block, physical block, count). */
  private async mapBlocks(ino: Inode): Promise<Array<{ lblk: number; pblk: number; count: number; unwritten: boolean }>> {
    if (ino.flags & FL_INLINE_DATA) return [];
    if (ino.flags & FL_ENCRYPT) throw new Ext4Error(`inode ${ino.ino} is encrypted`);
    if (ino.type === 'other') return [];
    if (ino.type === 'symlink' && this.isFastSymlink(ino)) return [];
    const out: Array<{ lblk: number; pblk: number; count: number; unwritten: boolean }> = [];
    if (ino.flags & FL_EXTENTS) await this.walkExtents(ino, ino.block, MAX_EXTENT_DEPTH + 1, out, { nodes: 0, nextLblk: 0 });
    else await this.walkBlockMap(ino, out);
    return out;
  }

  private isFastSymlink(ino: Inode): boolean {
    return ino.type === 'symlink' && !(ino.flags & (FL_EXTENTS | FL_INLINE_DATA)) && ino.size < INLINE_BYTES;
  }

  private async walkExtents(
    ino: Inode,
    node: Buffer,
    expectDepthBelow: number,
    out: Array<{ lblk: number; pblk: number; count: number; unwritten: boolean }>,
    st: { nodes: number; nextLblk: number },
  ): Promise<void> {
    const what = `inode ${ino.ino} extent tree`;
    if (++st.nodes > MAX_EXTENTS_PER_FILE) throw new Ext4Error(`${what}: more than ${MAX_EXTENTS_PER_FILE} nodes`);
    if (node.readUInt16LE(0) !== EXTENT_MAGIC) throw new Ext4Error(`${what}: bad node magic 0x${node.readUInt16LE(0).toString(16)}`);
    const entries = node.readUInt16LE(2);
    const max = node.readUInt16LE(4);
    const depth = node.readUInt16LE(6);
    const capacity = Math.floor((node.length - 12) / 12);
    if (max > capacity || entries > max) throw new Ext4Error(`${what}: node claims ${entries} of ${max} entries, room for ${capacity}`);
    if (depth >= expectDepthBelow) throw new Ext4Error(`${what}: depth ${depth} ${expectDepthBelow > MAX_EXTENT_DEPTH ? `exceeds ${MAX_EXTENT_DEPTH}` : `under a node of depth ${expectDepthBelow}`}`);
    if (expectDepthBelow <= MAX_EXTENT_DEPTH && depth !== expectDepthBelow - 1) throw new Ext4Error(`${what}: node of depth ${depth} under a node of depth ${expectDepthBelow}`);
    for (let i = 0; i < entries; i++) {
      const e = 12 + i * 12;
      const lblk = node.readUInt32LE(e);
      if (depth === 0) {
        let len = node.readUInt16LE(e + 4);
        const unwritten = len > 32768;
        if (unwritten) len -= 32768;
        const pblk = join64(node.readUInt32LE(e + 8), node.readUInt16LE(e + 6));
        if (len === 0) continue; // tolerated by the kernel as an empty slot
        if (lblk < st.nextLblk) throw new Ext4Error(`${what}: extent at logical block ${lblk} overlaps or precedes the previous one (next expected ≥ ${st.nextLblk})`);
        if (lblk + len > 2 ** 32) throw new Ext4Error(`${what}: extent at logical block ${lblk} runs past 2^32 blocks`);
        this.checkBlock(pblk, len, `${what}: extent at logical block ${lblk}`);
        if (out.length >= MAX_EXTENTS_PER_FILE) throw new Ext4Error(`${what}: more than ${MAX_EXTENTS_PER_FILE} extents`);
        st.nextLblk = lblk + len;
        const prev = out[out.length - 1];
        if (prev && prev.unwritten === unwritten && prev.lblk + prev.count === lblk && prev.pblk + prev.count === pblk) prev.count += len;
        else out.push({ lblk, pblk, count: len, unwritten });
      } else {
        if (lblk < st.nextLblk) throw new Ext4Error(`${what}: index at logical block ${lblk} precedes data already mapped (next expected ≥ ${st.nextLblk})`);
        const child = join64(node.readUInt32LE(e + 4), node.readUInt16LE(e + 8));
        const blk = await this.block(child, `${what}: index node`);
        await this.walkExtents(ino, blk, depth, out, st);
      }
    }
  }

  private async walkBlockMap(ino: Inode, out: Array<{ lblk: number; pblk: number; count: number; unwritten: boolean }>): Promise<void> {
    const bs = this.sb.blockSize;
    const per = bs / 4;
    const nblocks = Math.ceil(ino.size / bs);
    const what = `inode ${ino.ino} block map`;
    if (nblocks > 12 + per + per * per + per * per * per) throw new Ext4Error(`${what}: size ${ino.size} is beyond what a block map can address`);
    let budget = this.sb.blocksCount; // a file cannot map more blocks than the filesystem has
    const add = (lblk: number, pblk: number): void => {
      if (pblk === 0 || lblk >= nblocks) return;
      this.checkBlock(pblk, 1, `${what}: logical block ${lblk}`);
      if (--budget < 0) throw new Ext4Error(`${what}: maps more blocks than the filesystem has`);
      const prev = out[out.length - 1];
      if (prev && prev.lblk + prev.count === lblk && prev.pblk + prev.count === pblk) prev.count++;
      else {
        if (out.length >= MAX_EXTENTS_PER_FILE) throw new Ext4Error(`${what}: more than ${MAX_EXTENTS_PER_FILE} extents`);
        out.push({ lblk, pblk, count: 1, unwritten: false });
      }
    };
    /** Map the subtree of `level` indirection rooted at block `pblk`, covering logical blocks from `base`. */
    const indirect = async (pblk: number, level: number, base: number): Promise<void> => {
      if (pblk === 0 || base >= nblocks) return;
      if (--budget < 0) throw new Ext4Error(`${what}: maps more blocks than the filesystem has`);
      const blk = await this.block(pblk, `${what}: indirect block`);
      const span = per ** (level - 1);
      for (let i = 0; i < per; i++) {
        const child = blk.readUInt32LE(i * 4);
        const lb = base + i * span;
        if (lb >= nblocks) break;
        if (level === 1) add(lb, child);
        else await indirect(child, level - 1, lb);
      }
    };
    for (let i = 0; i < 12; i++) add(i, ino.block.readUInt32LE(i * 4));
    await indirect(ino.block.readUInt32LE(48), 1, 12);
    await indirect(ino.block.readUInt32LE(52), 2, 12 + per);
    await indirect(ino.block.readUInt32LE(56), 3, 12 + per + per * per);
  }

  /** The extents of an inode's data in volume bytes. */
  async extentsOf(ino: Inode): Promise<FileExtent[]> {
    const bs = this.sb.blockSize;
    return (await this.mapBlocks(ino)).map((e) => {
      const x: FileExtent = { logical: e.lblk * bs, offset: this.fsOffset + e.pblk * bs, length: e.count * bs };
      if (e.unwritten) x.unwritten = true;
      return x;
    });
  }

  /** The value of the in-inode extended attribute system.data (inline data past i_block), or an empty buffer. */
  private inlineXattr(ino: Inode): Buffer {
    const raw = ino.raw;
    if (raw.length <= 128) return Buffer.alloc(0);
    const extra = raw.readUInt16LE(0x80);
    const start = 128 + extra;
    if (extra % 4 !== 0 || start + 4 > raw.length) throw new Ext4Error(`inode ${ino.ino}: i_extra_isize ${extra} does not fit a ${raw.length}-byte inode`);
    if (raw.readUInt32LE(start) !== XATTR_MAGIC) return Buffer.alloc(0);
    const area = raw.subarray(start + 4);
    for (let p = 0; p + 16 <= area.length; ) {
      if (area.readUInt32LE(p) === 0) break;
      const nameLen = area[p]!;
      const index = area[p + 1]!;
      const valueOffs = area.readUInt16LE(p + 2);
      const valueSize = area.readUInt32LE(p + 8);
      if (p + 16 + nameLen > area.length) throw new Ext4Error(`inode ${ino.ino}: extended attribute name runs past the inode`);
      const name = area.subarray(p + 16, p + 16 + nameLen).toString('latin1');
      if (index === XATTR_INDEX_SYSTEM && name === 'data') {
        if (area.readUInt32LE(p + 4) !== 0) throw new Ext4Error(`inode ${ino.ino}: inline data stored in an EA inode is not supported`);
        if (valueOffs + valueSize > area.length) throw new Ext4Error(`inode ${ino.ino}: system.data value runs past the inode`);
        return area.subarray(valueOffs, valueOffs + valueSize);
      }
      p += (16 + nameLen + 3) & ~3;
    }
    return Buffer.alloc(0);
  }

  /** Inline data bytes in file order: i_block, then system.data. */
  private inlineAreas(ino: Inode): Buffer[] {
    return [ino.block, this.inlineXattr(ino)];
  }

  // -------------------------------------------------------------------------------------------
  // Contents

  /** Read up to `max` bytes of an inode's data from the start (holes and unwritten extents read as zeros). */
  private async readData(ino: Inode, max: number): Promise<Buffer> {
    const n = Math.min(ino.size, max);
    if (ino.flags & FL_INLINE_DATA) return Buffer.concat(this.inlineAreas(ino)).subarray(0, n);
    if (this.isFastSymlink(ino)) return Buffer.from(ino.block.subarray(0, n));
    const out = Buffer.alloc(n);
    for (const e of await this.extentsOf(ino)) {
      if (e.logical >= n) break;
      if (e.unwritten) continue;
      const len = Math.min(e.length, n - e.logical);
      const b = await this.readBytes(e.offset - this.fsOffset, len, `inode ${ino.ino} data`);
      b.copy(out, e.logical);
    }
    return out;
  }

  private async dirEntries(ino: Inode): Promise<Array<{ name: string; ino: number }>> {
    const what = `directory inode ${ino.ino}`;
    if (ino.size > MAX_DIR_BYTES) throw new Ext4Error(`${what}: ${ino.size} bytes, more than the ${MAX_DIR_BYTES} accepted`);
    const out: Array<{ name: string; ino: number }> = [];
    if (ino.flags & FL_INLINE_DATA) {
      const [iblock, xattr] = this.inlineAreas(ino) as [Buffer, Buffer];
      const parent = iblock.readUInt32LE(0);
      if (parent !== 0) out.push({ name: '..', ino: parent });
      this.parseDirents(iblock.subarray(4), what, out);
      if (xattr.length > 0) this.parseDirents(xattr, what, out);
      return out;
    }
    const bs = this.sb.blockSize;
    for (const e of await this.extentsOf(ino)) {
      if (e.unwritten) continue;
      for (let off = 0; off < e.length && e.logical + off < ino.size; off += bs) {
        const blk = await this.readBytes(e.offset - this.fsOffset + off, bs, what);
        this.parseDirents(blk, what, out);
      }
    }
    return out;
  }

  private parseDirents(area: Buffer, what: string, out: Array<{ name: string; ino: number }>): void {
    const filetype = (this.sb.incompat & INCOMPAT_FILETYPE) !== 0;
    for (let p = 0; p < area.length; ) {
      if (p + 8 > area.length) throw new Ext4Error(`${what}: directory entry at byte ${p} runs past its block`);
      const inode = area.readUInt32LE(p);
      let recLen = area.readUInt16LE(p + 4);
      if (this.sb.blockSize === 65536 && (recLen === 0 || recLen === 65535)) recLen = 65536;
      const nameLen = filetype ? area[p + 6]! : area.readUInt16LE(p + 6);
      if (recLen < 8 || recLen % 4 !== 0 || p + recLen > area.length) throw new Ext4Error(`${what}: directory entry at byte ${p} has record length ${recLen}`);
      if (inode !== 0) {
        if (nameLen === 0 || 8 + nameLen > recLen) throw new Ext4Error(`${what}: directory entry at byte ${p} has name length ${nameLen} in a ${recLen}-byte record`);
        out.push({ name: area.subarray(p + 8, p + 8 + nameLen).toString('utf8'), ino: inode });
      }
      p += recLen;
    }
  }

  // -------------------------------------------------------------------------------------------
  // Paths

  /**
   * Resolve `path` (absolute; relative paths are taken from the root) to an inode. Symlinks in the
   * middle of the path are followed; the last component is followed when `follow` is true.
   * Returns null when a component does not exist or is not a directory.
   */
  async lookup(path: string, follow = true): Promise<Inode | null> {
    const split = (p: string): string[] => p.split('/').filter((c) => c !== '' && c !== '.');
    const root = await this.inode(ROOT_INO);
    let chain: Inode[] = [root]; // the directories from the root to the current one
    let parts = split(path);
    let follows = 0;
    while (parts.length > 0) {
      const part = parts.shift()!;
      const cur = chain[chain.length - 1]!;
      if (cur.type !== 'dir') return null;
      if (part === '..') {
        if (chain.length > 1) chain.pop();
        continue;
      }
      const hit = (await this.dirEntries(cur)).find((e) => e.name === part);
      if (!hit) return null;
      const next = await this.inode(hit.ino);
      if (next.type === 'symlink' && (parts.length > 0 || follow)) {
        if (++follows > MAX_SYMLINK_FOLLOWS) throw new Ext4Error(`more than ${MAX_SYMLINK_FOLLOWS} symlinks followed resolving ${path}`);
        const target = (await this.readData(next, MAX_SYMLINK_BYTES)).toString('utf8');
        if (target.startsWith('/')) chain = [root]; // absolute: from this filesystem's root
        parts = [...split(target), ...parts]; // relative: from the directory holding the link
        continue;
      }
      chain.push(next);
      if (chain.length > MAX_PATH_DEPTH) throw new Ext4Error(`path ${path} is deeper than ${MAX_PATH_DEPTH} directories`);
    }
    return chain[chain.length - 1]!;
  }

  /** The entries of the directory at `path` (following symlinks), without '.' and '..'; null when not a directory. */
  async list(path: string): Promise<Array<{ name: string; inode: number; type: Ext4FileType }> | null> {
    const dir = await this.lookup(path, true);
    if (!dir || dir.type !== 'dir') return null;
    const out: Array<{ name: string; inode: number; type: Ext4FileType }> = [];
    for (const e of await this.dirEntries(dir)) {
      if (e.name === '.' || e.name === '..') continue;
      out.push({ name: e.name, inode: e.ino, type: (await this.inode(e.ino)).type });
    }
    return out;
  }

  /** Describe the file at `path` without following a final symlink; null when it does not exist. */
  async stat(path: string, follow = false): Promise<Ext4Entry | null> {
    const ino = await this.lookup(path, follow);
    if (!ino) return null;
    return { path, inode: ino.ino, type: ino.type, size: ino.size, links: ino.links, extents: await this.extentsOf(ino), ...(ino.flags & FL_INLINE_DATA ? { inline: true } : {}) };
  }

  /**
   * The first `maxBytes` bytes of the regular file at `path`, following symlinks (absolute ones
   * from this filesystem's root); null when there is no such regular file.
   */
  async readFile(path: string, maxBytes: number): Promise<Buffer | null> {
    const ino = await this.lookup(path, true);
    if (!ino || ino.type !== 'file') return null;
    return this.readData(ino, Math.max(0, maxBytes));
  }

  /** The target of the symlink at `path`; null when it is not a symlink. */
  async readLink(path: string): Promise<string | null> {
    const ino = await this.lookup(path, false);
    if (!ino || ino.type !== 'symlink') return null;
    return (await this.readData(ino, MAX_SYMLINK_BYTES)).toString('utf8');
  }

  /**
   * Every entry reachable from the root, depth first, directories before their contents, the
   * root first. Each directory inode is entered once.
   */
  async *walk(opts: WalkOptions = {}): AsyncGenerator<Ext4Entry> {
    const maxFiles = opts.maxFiles ?? Infinity;
    const maxEntries = opts.maxEntries ?? MAX_WALK_ENTRIES;
    const firstPath = new Map<number, string>();
    const entered = new Set<number>();
    let yielded = 0;
    let seen = 0;
    const root = await this.inode(ROOT_INO);
    if (root.type !== 'dir') throw new Ext4Error(`the root inode is not a directory (mode 0${root.mode.toString(8)})`);
    const entry = async (path: string, ino: Inode): Promise<Ext4Entry> => {
      const e: Ext4Entry = { path, inode: ino.ino, type: ino.type, size: ino.size, links: ino.links, extents: await this.extentsOf(ino) };
      if (ino.flags & FL_INLINE_DATA) e.inline = true;
      const first = firstPath.get(ino.ino);
      if (first !== undefined) e.hardLinkOf = first;
      else if (ino.links > 1 && ino.type !== 'dir') firstPath.set(ino.ino, path);
      return e;
    };
    const stack: Array<{ path: string; ino: Inode }> = [{ path: '/', ino: root }];
    entered.add(ROOT_INO);
    yield await entry('/', root);
    if (++yielded >= maxFiles) return;
    while (stack.length > 0) {
      const { path, ino: dir } = stack.pop()!;
      const subdirs: Array<{ path: string; ino: Inode }> = [];
      for (const d of await this.dirEntries(dir)) {
        if (d.name === '.' || d.name === '..') continue;
        if (++seen > maxEntries) throw new Ext4Error(`more than ${maxEntries} directory entries: refusing to walk further`);
        if (d.name.includes('/')) throw new Ext4Error(`directory inode ${dir.ino} holds a name with a '/'`);
        const child = await this.inode(d.ino);
        const childPath = path === '/' ? `/${d.name}` : `${path}/${d.name}`;
        if (child.type === 'dir') {
          if (entered.has(child.ino)) continue; // a directory seen before: a cycle or a corrupt hard link
          entered.add(child.ino);
          subdirs.push({ path: childPath, ino: child });
        }
        yield await entry(childPath, child);
        if (++yielded >= maxFiles) return;
      }
      for (let i = subdirs.length - 1; i >= 0; i--) stack.push(subdirs[i]!);
    }
  }
}

async function checkedRead(read: ReadAt, offset: number, length: number): Promise<Buffer> {
  const b: unknown = await read(offset, length);
  if (!(b instanceof Uint8Array) || b.length !== length) {
    const got = b instanceof Uint8Array ? `${b.length} bytes` : typeof b;
    throw new Ext4Error(`read of ${length} bytes at ${offset} returned ${got}`);
  }
  return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}

function parseSuperblock(s: Buffer, fsOffset: number): Superblock {
  const where = `ext superblock at offset ${fsOffset}`;
  const magic = s.readUInt16LE(0x38);
  if (magic !== MAGIC) throw new Ext4Error(`no ext2/3/4 filesystem at offset ${fsOffset} (magic 0x${magic.toString(16)}, expected 0xef53)`);
  const logBlock = s.readUInt32LE(0x18);
  if (logBlock > 6) throw new Ext4Error(`${where}: block size 2^(10+${logBlock}) is above 64 KiB`);
  const blockSize = 1024 << logBlock;
  const rev = s.readUInt32LE(0x4c);
  const compat = rev >= 1 ? s.readUInt32LE(0x5c) : 0;
  const incompat = rev >= 1 ? s.readUInt32LE(0x60) : 0;
  const roCompat = rev >= 1 ? s.readUInt32LE(0x64) : 0;
  for (const [bit, name, why] of INCOMPAT_REFUSED) {
    if (incompat & bit) throw new Ext4Error(`${where}: feature "${name}" is not supported: ${why}`);
  }
  let known = 0;
  for (const [bit] of INCOMPAT_SUPPORTED) known |= bit;
  const unknown = (incompat & ~known) >>> 0;
  if (unknown) throw new Ext4Error(`${where}: unknown incompatible feature bits 0x${unknown.toString(16)}; this reader cannot interpret the filesystem safely (newer e2fsprogs?)`);
  if (roCompat & RO_COMPAT_BIGALLOC) throw new Ext4Error(`${where}: feature "bigalloc" (allocation in clusters) is not supported`);
  const is64 = (incompat & INCOMPAT_64BIT) !== 0;
  const blocksCount = join64(s.readUInt32LE(0x4), is64 ? s.readUInt32LE(0x150) : 0);
  const freeBlocks = join64(s.readUInt32LE(0xc), is64 ? s.readUInt32LE(0x158) : 0);
  const inodesCount = s.readUInt32LE(0x0);
  const freeInodes = s.readUInt32LE(0x10);
  const firstDataBlock = s.readUInt32LE(0x14);
  const blocksPerGroup = s.readUInt32LE(0x20);
  const inodesPerGroup = s.readUInt32LE(0x28);
  const inodeSize = rev >= 1 ? s.readUInt16LE(0x58) : 128;
  const descSize = is64 ? s.readUInt16LE(0xfe) : 32;
  if (firstDataBlock !== (blockSize === 1024 ? 1 : 0) && firstDataBlock !== 0) throw new Ext4Error(`${where}: first data block ${firstDataBlock} with ${blockSize}-byte blocks`);
  if (!Number.isSafeInteger(blocksCount) || blocksCount <= firstDataBlock || blocksCount * blockSize > Number.MAX_SAFE_INTEGER) throw new Ext4Error(`${where}: block count ${blocksCount} is invalid`);
  if (blocksPerGroup < 8 || blocksPerGroup > 8 * blockSize || blocksPerGroup % 8 !== 0) throw new Ext4Error(`${where}: ${blocksPerGroup} blocks per group (must be a multiple of 8 up to ${8 * blockSize})`);
  if (inodesPerGroup < 1 || inodesPerGroup > 8 * blockSize) throw new Ext4Error(`${where}: ${inodesPerGroup} inodes per group (must be 1..${8 * blockSize})`);
  if (inodeSize < 128 || inodeSize > blockSize || (inodeSize & (inodeSize - 1)) !== 0) throw new Ext4Error(`${where}: inode size ${inodeSize} (must be a power of two from 128 to the block size)`);
  if (descSize < 32 || descSize > blockSize || (descSize & (descSize - 1)) !== 0 || (is64 && descSize < 64)) throw new Ext4Error(`${where}: group descriptor size ${descSize}`);
  const groupCount = Math.ceil((blocksCount - firstDataBlock) / blocksPerGroup);
  if (inodesCount < 11 || inodesCount > groupCount * inodesPerGroup) throw new Ext4Error(`${where}: ${inodesCount} inodes in ${groupCount} groups of ${inodesPerGroup}`);
  const descBlocks = Math.ceil((groupCount * descSize) / blockSize);
  const firstMetaBg = s.readUInt32LE(0x104);
  if (!(incompat & INCOMPAT_META_BG) && firstDataBlock + 1 + descBlocks > blocksCount) throw new Ext4Error(`${where}: the group descriptor table (${descBlocks} blocks) does not fit`);
  return {
    blockSize,
    blocksCount,
    freeBlocks: Math.min(freeBlocks, blocksCount),
    inodesCount,
    freeInodes: Math.min(freeInodes, inodesCount),
    firstDataBlock,
    blocksPerGroup,
    inodesPerGroup,
    inodeSize,
    descSize,
    groupCount,
    firstMetaBg,
    compat,
    incompat,
    roCompat,
    backupBgs: [s.readUInt32LE(0x24c), s.readUInt32LE(0x250)],
    uuid: formatUuid(s.subarray(0x68, 0x78)),
    label: cString(s.subarray(0x78, 0x88)),
    lastMounted: cString(s.subarray(0x88, 0xc8)),
  };
}

function featureNames(sb: Superblock): string[] {
  const out: string[] = [];
  for (const [bit, name] of COMPAT) if (sb.compat & bit) out.push(name);
  for (const [bit, name] of INCOMPAT_SUPPORTED) if (sb.incompat & bit) out.push(name);
  for (const [bit, name] of RO_COMPAT) if (sb.roCompat & bit) out.push(name);
  return out;
}

/** ext4 when it uses anything ext3 does not have (as blkid decides), ext3 with a journal, else ext2. */
function fsType(sb: Superblock): 'ext4' | 'ext3' | 'ext2' {
  const ext3Incompat = 0x2 | 0x4 | 0x10; // filetype, recover, meta_bg
  const ext3RoCompat = 0x1 | 0x2 | 0x4; // sparse_super, large_file, btree_dir
  if (sb.incompat & ~ext3Incompat || sb.roCompat & ~ext3RoCompat) return 'ext4';
  return sb.compat & COMPAT_HAS_JOURNAL ? 'ext3' : 'ext2';
}
