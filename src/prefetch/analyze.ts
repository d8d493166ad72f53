// Disk analysis: what is on a VM disk we reach through a read callback. The partition table
// (partitions.ts), the filesystem or swap area in each partition (or a bare filesystem on the
// whole disk), and for every ext2/3/4 filesystem its usage, OS release, fstab, network
// configuration files and largest files (ext4.ts). `spillway analyze` prints it; buildFileMap()
// gives the link's group push the file behind every chunk.
//
// A filesystem that cannot be read (corrupt, unsupported feature) does not fail the analysis: it
// is listed with `error` set to the Ext4Error message. A malformed partition table and errors of
// `read` itself do fail it.

import { Ext4, Ext4Error, probeExt, type Ext4Entry, type ReadAt } from './ext4.js';
import { FileMap, type FileEntry } from './file-map.js';
import { readPartitionTable, type Partition } from './partitions.js';

export interface VolumeAnalysis {
  size: number;
  partitionTable: 'mbr' | 'gpt' | 'none';
  partitions: Array<{ index: number; start: number; length: number; type: string; name?: string; uuid?: string; swap: boolean }>;
  filesystems: FilesystemAnalysis[];
  swap: Array<{ offset: number; length: number; source: 'partition' | 'fstab' | 'file'; path?: string }>;
}

export interface FilesystemAnalysis {
  /** Partition index, or null for a filesystem on the whole disk. */
  partition: number | null;
  offset: number;
  length: number;
  type: 'ext4' | 'ext3' | 'ext2' | 'swap' | 'unknown';
  uuid?: string;
  label?: string;
  blockSize?: number;
  /** Bytes the filesystem occupies (the region's length for swap and unknown). */
  sizeBytes: number;
  /** Bytes in use according to the superblock (0 for swap and unknown). */
  usedBytes: number;
  features?: string[];
  lastMounted?: string;
  os?: { id: string; versionId: string; prettyName: string };
  fstab?: Array<{ spec: string; mountPoint: string; type: string; options: string }>;
  network?: Array<{ path: string; kind: string }>;
  largestFiles?: Array<{ path: string; size: number; allocatedBytes: number }>;
  fileCount?: number;
  dirCount?: number;
  symlinkCount?: number;
  /** For type 'unknown': what the region's signature says it is (xfs, btrfs, vfat, ntfs, LVM2_member, crypto_LUKS), if recognised. */
  detected?: string;
  /** Why the filesystem could not be (fully) read. */
  error?: string;
}

export interface AnalyzeOptions {
  /** Largest files listed per filesystem (default 20). */
  top?: number;
  /** Called with every entry of every ext filesystem walked (for `--files`). */
  onEntry?: (fs: FilesystemAnalysis, entry: Ext4Entry) => void;
  /** Passed to Ext4.walk (default: no limit). */
  maxFiles?: number;
}

const SWAP_MAGICS = ['SWAPSPACE2', 'SWAP-SPACE'];
/** Page sizes whose swap signature (last 10 bytes of the first page) we look for. */
const SWAP_PAGE_SIZES = [4096, 8192, 16384, 65536];
const SMALL_FILE = 64 * 1024;

/** Where the network configuration of the common distributions lives. */
const NETWORK_FILES: Array<{ dir?: string; path?: string; match?: (name: string) => boolean; kind: string }> = [
  { path: '/etc/network/interfaces', kind: 'ifupdown' },
  { dir: '/etc/network/interfaces.d', kind: 'ifupdown' },
  { dir: '/etc/netplan', match: (n) => n.endsWith('.yaml') || n.endsWith('.yml'), kind: 'netplan' },
  { dir: '/etc/sysconfig/network-scripts', match: (n) => n.startsWith('ifcfg-'), kind: 'ifcfg' },
  { dir: '/etc/systemd/network', match: (n) => n.endsWith('.network') || n.endsWith('.netdev') || n.endsWith('.link'), kind: 'systemd-networkd' },
  { dir: '/etc/NetworkManager/system-connections', kind: 'networkmanager' },
  { path: '/etc/hostname', kind: 'hostname' },
  { path: '/etc/resolv.conf', kind: 'resolv.conf' },
  { path: '/etc/hosts', kind: 'hosts' },
];

/** A swap signature in [offset, offset + length): its page size, uuid and label. */
async function probeSwap(read: ReadAt, offset: number, length: number): Promise<{ uuid: string; label: string } | null> {
  for (const page of SWAP_PAGE_SIZES) {
    if (length < page) break;
    const sig = (await read(offset + page - 10, 10)).toString('latin1');
    if (!SWAP_MAGICS.includes(sig)) continue;
    const h = await read(offset + 1024, 44);
    const u = h.subarray(12, 28).toString('hex');
    const label = h.subarray(28, 44);
    const nul = label.indexOf(0);
    return { uuid: `${u.slice(0, 8)}-${u.slice(8, 12)}-${u.slice(12, 16)}-${u.slice(16, 20)}-${u.slice(20)}`, label: label.subarray(0, nul < 0 ? 16 : nul).toString('utf8') };
  }
  return null;
}

/** Signatures of the other common volume formats (as blkid knows them), so "unknown" can say more. */
const OTHER_SIGNATURES: Array<{ at: number; magic: Buffer; name: string }> = [
  { at: 0, magic: Buffer.from('XFSB', 'latin1'), name: 'xfs' },
  { at: 0x10040, magic: Buffer.from('_BHRfS_M', 'latin1'), name: 'btrfs' },
  { at: 0, magic: Buffer.from('LUKS\xba\xbe', 'latin1'), name: 'crypto_LUKS' },
  { at: 512, magic: Buffer.from('LABELONE', 'latin1'), name: 'LVM2_member' },
  { at: 3, magic: Buffer.from('NTFS    ', 'latin1'), name: 'ntfs' },
  { at: 0x52, magic: Buffer.from('FAT32   ', 'latin1'), name: 'vfat' },
  { at: 0x36, magic: Buffer.from('FAT1', 'latin1'), name: 'vfat' },
  { at: 0x8001, magic: Buffer.from('CD001', 'latin1'), name: 'iso9660' },
];

async function otherSignature(read: ReadAt, offset: number, length: number): Promise<string | null> {
  for (const s of OTHER_SIGNATURES) {
    if (s.at + s.magic.length > length) continue;
    if ((await read(offset + s.at, s.magic.length)).equals(s.magic)) return s.name;
  }
  return null;
}

/** /etc/os-release (or /usr/lib/os-release) fields, as the file format (shell-like assignments) defines them. */
export function parseOsRelease(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line);
    if (!m) continue;
    let v = m[2]!.trim();
    if ((v.startsWith('"') && v.endsWith('"') && v.length >= 2) || (v.startsWith("'") && v.endsWith("'") && v.length >= 2)) {
      v = v.slice(1, -1).replace(/\\(["'$`\\])/g, '$1');
    }
    out[m[1]!] = v;
  }
  return out;
}

export function parseFstab(text: string): Array<{ spec: string; mountPoint: string; type: string; options: string }> {
  const out: Array<{ spec: string; mountPoint: string; type: string; options: string }> = [];
  const unescape = (s: string): string => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
  for (const line of text.split('\n')) {
    const t = line.trim();
    if (t === '' || t.startsWith('#')) continue;
    const f = t.split(/\s+/);
    if (f.length < 3) continue;
    out.push({ spec: unescape(f[0]!), mountPoint: unescape(f[1]!), type: f[2]!, options: f[3] ?? 'defaults' });
  }
  return out;
}

interface ExtDetails {
  fs: Ext4;
  entries?: Ext4Entry[];
}

/** Analyze the disk of `size` bytes behind `read`. */
export async function analyzeVolume(read: ReadAt, size: number, opts: AnalyzeOptions = {}): Promise<VolumeAnalysis> {
  const top = opts.top ?? 20;
  const table = await readPartitionTable(read, size);
  const out: VolumeAnalysis = {
    size,
    partitionTable: table.scheme,
    partitions: [],
    filesystems: [],
    swap: [],
  };
  const regions: Array<{ partition: number | null; offset: number; length: number; p?: Partition }> =
    table.scheme === 'none' ? [{ partition: null, offset: 0, length: size }] : table.partitions.map((p) => ({ partition: p.index, offset: p.start, length: p.length, p }));
  const swapIds: Array<{ uuid: string; label: string; offset: number; length: number }> = [];
  const exts: Array<{ fa: FilesystemAnalysis; fs: Ext4 }> = [];

  for (const r of regions) {
    const fa: FilesystemAnalysis = { partition: r.partition, offset: r.offset, length: r.length, type: 'unknown', sizeBytes: r.length, usedBytes: 0 };
    const swap = await probeSwap(read, r.offset, r.length);
    if (swap) {
      fa.type = 'swap';
      fa.uuid = swap.uuid;
      if (swap.label) fa.label = swap.label;
      swapIds.push({ ...swap, offset: r.offset, length: r.length });
    } else if (await probeExt(read, r.offset, r.length)) {
      try {
        const fs = await Ext4.open(read, r.offset, r.length);
        Object.assign(fa, {
          type: fs.info.type,
          uuid: fs.info.uuid,
          blockSize: fs.info.blockSize,
          sizeBytes: fs.sizeBytes,
          usedBytes: fs.usedBytes,
          features: fs.info.features,
        });
        if (fs.info.label) fa.label = fs.info.label;
        if (fs.info.lastMounted) fa.lastMounted = fs.info.lastMounted;
        exts.push({ fa, fs });
      } catch (err) {
        if (!(err instanceof Ext4Error)) throw err;
        fa.type = 'ext4';
        fa.error = err.message;
      }
    }
    if (fa.type === 'unknown') {
      const sig = await otherSignature(read, r.offset, r.length);
      if (sig) fa.detected = sig;
    }
    if (r.p) {
      const part: VolumeAnalysis['partitions'][number] = { index: r.p.index, start: r.p.start, length: r.p.length, type: r.p.type, swap: r.p.kind === 'swap' || swap !== null };
      if (r.p.name) part.name = r.p.name;
      if (r.p.uuid) part.uuid = r.p.uuid;
      out.partitions.push(part);
      if (part.swap) out.swap.push({ offset: r.p.start, length: r.p.length, source: 'partition' });
    } else if (swap) {
      out.swap.push({ offset: r.offset, length: r.length, source: 'partition' });
    }
    out.filesystems.push(fa);
  }

  for (const { fa, fs } of exts) {
    try {
      await describeExt({ fs }, fa, top, opts);
    } catch (err) {
      if (!(err instanceof Ext4Error)) throw err;
      fa.error = err.message;
    }
  }

  // Swap named in an fstab: a device (matched to a partition or swap area) or a file.
  for (const { fa, fs } of exts) {
    for (const m of fa.fstab ?? []) {
      if (m.type !== 'swap') continue;
      const known = (offset: number, length: number): boolean => out.swap.some((s) => s.offset === offset && s.length === length);
      if (m.spec.startsWith('/') && !m.spec.startsWith('/dev/')) {
        try {
          const st = await fs.stat(m.spec, true);
          if (st?.type === 'file') for (const e of st.extents) out.swap.push({ offset: e.offset, length: e.length, source: 'file', path: m.spec });
        } catch (err) {
          if (!(err instanceof Ext4Error)) throw err;
        }
        continue;
      }
      const region = resolveDevice(m.spec, out, swapIds);
      if (region && !known(region.offset, region.length)) out.swap.push({ offset: region.offset, length: region.length, source: 'fstab' });
    }
  }
  out.swap.sort((a, b) => a.offset - b.offset);
  return out;
}

/** The disk region an fstab device spec names, when we can tell. */
function resolveDevice(spec: string, v: VolumeAnalysis, swaps: Array<{ uuid: string; label: string; offset: number; length: number }>): { offset: number; length: number } | null {
  const eq = /^(UUID|LABEL|PARTUUID|PARTLABEL)=(.*)$/.exec(spec);
  const byPart = (pred: (p: VolumeAnalysis['partitions'][number]) => boolean): { offset: number; length: number } | null => {
    const p = v.partitions.find(pred);
    return p ? { offset: p.start, length: p.length } : null;
  };
  if (eq) {
    const [, key, val] = eq as unknown as [string, string, string];
    const value = val.replace(/^"(.*)"$/, '$1');
    if (key === 'UUID') {
      const s = swaps.find((x) => x.uuid.toLowerCase() === value.toLowerCase());
      const f = v.filesystems.find((x) => x.uuid?.toLowerCase() === value.toLowerCase());
      return s ?? (f ? { offset: f.offset, length: f.length } : null);
    }
    if (key === 'LABEL') {
      const s = swaps.find((x) => x.label === value);
      return s ?? null;
    }
    if (key === 'PARTUUID') return byPart((p) => p.uuid?.toLowerCase() === value.toLowerCase());
    return byPart((p) => p.name === value);
  }
  const dev = /^\/dev\/(?:[shv]d[a-z]+|xvd[a-z]+|nvme\d+n\d+p|mmcblk\d+p)(\d+)$/.exec(spec);
  if (dev) return byPart((p) => p.index === Number(dev[1]));
  const byUuid = /^\/dev\/disk\/by-uuid\/(.+)$/.exec(spec);
  if (byUuid) return resolveDevice(`UUID=${byUuid[1]}`, v, swaps);
  return null;
}

async function describeExt(d: ExtDetails, fa: FilesystemAnalysis, top: number, opts: AnalyzeOptions): Promise<void> {
  const fs = d.fs;
  // OS release: /etc/os-release (usually a symlink to ../usr/lib/os-release), else /usr/lib/os-release.
  const osText = (await fs.readFile('/etc/os-release', SMALL_FILE)) ?? (await fs.readFile('/usr/lib/os-release', SMALL_FILE));
  if (osText) {
    const o = parseOsRelease(osText.toString('utf8'));
    fa.os = { id: o.ID ?? 'linux', versionId: o.VERSION_ID ?? '', prettyName: o.PRETTY_NAME ?? o.NAME ?? 'Linux' };
  }
  const fstab = await fs.readFile('/etc/fstab', SMALL_FILE);
  if (fstab) fa.fstab = parseFstab(fstab.toString('utf8'));

  const network: Array<{ path: string; kind: string }> = [];
  for (const n of NETWORK_FILES) {
    if (n.path) {
      if (await fs.stat(n.path, false)) network.push({ path: n.path, kind: n.kind });
      continue;
    }
    const list = await fs.list(n.dir!);
    for (const e of (list ?? []).sort((a, b) => (a.name < b.name ? -1 : 1))) {
      if (e.type === 'dir' || (n.match && !n.match(e.name))) continue;
      network.push({ path: `${n.dir}/${e.name}`, kind: n.kind });
    }
  }
  if (network.length > 0) fa.network = network;

  let files = 0;
  let dirs = 0;
  let symlinks = 0;
  const largest: Array<{ path: string; size: number; allocatedBytes: number }> = [];
  const walkOpts = opts.maxFiles !== undefined ? { maxFiles: opts.maxFiles } : {};
  for await (const e of fs.walk(walkOpts)) {
    opts.onEntry?.(fa, e);
    if (e.type === 'dir') dirs++;
    else if (e.type === 'symlink') symlinks++;
    if (e.type !== 'file' || e.hardLinkOf !== undefined) continue;
    files++;
    const allocatedBytes = e.extents.reduce((s, x) => s + x.length, 0);
    const item = { path: e.path, size: e.size, allocatedBytes };
    if (top <= 0) continue;
    if (largest.length < top || cmpLargest(item, largest[largest.length - 1]!) < 0) {
      largest.push(item);
      largest.sort(cmpLargest);
      if (largest.length > top) largest.pop();
    }
  }
  fa.fileCount = files;
  fa.dirCount = dirs;
  fa.symlinkCount = symlinks;
  fa.largestFiles = largest;
}

/** Largest first: by allocated bytes (what streaming costs), then size, then path. */
function cmpLargest(a: { path: string; size: number; allocatedBytes: number }, b: { path: string; size: number; allocatedBytes: number }): number {
  return b.allocatedBytes - a.allocatedBytes || b.size - a.size || (a.path < b.path ? -1 : a.path > b.path ? 1 : 0);
}

/**
 * Every regular file (each inode once) of every ext filesystem on the disk, with absolute volume
 * extents. Filesystems that cannot be read are skipped (their chunks simply belong to no file).
 */
export async function buildFileMap(read: ReadAt, size: number, opts: { maxFiles?: number } = {}): Promise<FileMap> {
  const table = await readPartitionTable(read, size);
  const regions = table.scheme === 'none' ? [{ offset: 0, length: size }] : table.partitions.map((p) => ({ offset: p.start, length: p.length }));
  const files: FileEntry[] = [];
  for (const r of regions) {
    if (!(await probeExt(read, r.offset, r.length))) continue;
    const before = files.length;
    try {
      const fs = await Ext4.open(read, r.offset, r.length);
      for await (const e of fs.walk(opts.maxFiles !== undefined ? { maxFiles: opts.maxFiles } : {})) {
        if (e.type !== 'file' || e.hardLinkOf !== undefined || e.extents.length === 0) continue;
        files.push({ path: e.path, inode: e.inode, fsOffset: r.offset, size: e.size, extents: e.extents });
      }
    } catch (err) {
      if (!(err instanceof Ext4Error)) throw err;
      files.length = before;
    }
  }
  return new FileMap(files);
}
