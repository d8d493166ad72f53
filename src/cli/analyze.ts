// `spillway analyze`: what is on a disk image or NBD export — partitions, filesystems, OS,
// mounts, network configuration, swap, largest files (src/prefetch/analyze.ts, docs/analyze.md).

import { open, readFile, stat } from 'node:fs/promises';
import { Command, InvalidArgumentError } from 'commander';

import { NbdClient } from '../nbd/client.js';
import { analyzeVolume, type FilesystemAnalysis, type VolumeAnalysis } from '../prefetch/analyze.js';
import type { Ext4Entry, ReadAt } from '../prefetch/ext4.js';

interface AnalyzeCliOptions {
  json?: boolean;
  top: number;
  files?: boolean;
}

function parseCount(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError('expected a non-negative integer');
  return n;
}

export class AnalyzeInputError extends Error {
  readonly code = 'SPW_ERR_ANALYZE_INPUT';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'AnalyzeInputError';
  }
}

export function registerAnalyze(program: Command): void {
  program
    .command('analyze')
    .summary('describe what is on a disk image: partitions, filesystems, OS, mounts, swap, largest files')
    .description(
      'Read a raw disk image, block device or NBD export (read-only) and describe it: the partition table (MBR or GPT, or none for a bare filesystem), ' +
        'each filesystem (ext2/ext3/ext4 in detail; Linux swap areas recognised) with its size and usage, the OS from /etc/os-release, the mounts in /etc/fstab, ' +
        'the files that configure networking, the swap areas (partitions, fstab entries, swap files) and the largest files.\n\n' +
        'Images other than raw (qcow2, VMDK, VHDX, VDI) are not read directly: serve them with qemu-nbd (qemu-nbd -r -f qcow2 -t -p 10810 disk.qcow2) and pass nbd://127.0.0.1:10810/.',
    )
    .argument('<image>', 'raw image file, block device, or nbd://host[:port]/export (also nbds://, nbd+unix:///export?socket=PATH)')
    .option('--json', 'print the analysis as JSON (schema in docs/analyze.md)')
    .option('--top <n>', 'largest files to list per filesystem', parseCount, 20)
    .option('--files', 'also list every file, directory and symlink with its extents (volume byte ranges); with --json as a "files" array')
    .addHelpText(
      'after',
      `
Examples:
  spillway analyze root.img
  spillway analyze --json --top 5 disk.img | jq .filesystems
  spillway analyze --files nbd://127.0.0.1:10809/root

Exit status: 0 when the image was read (a filesystem that cannot be interpreted is reported
with an "error" field, not a failure), 1 when the image cannot be opened or its partition table
is malformed.`,
    )
    .action(async (image: string, opts: AnalyzeCliOptions) => {
      await analyzeCommand(image, opts);
    });
}

interface Source {
  read: ReadAt;
  size: number;
  close: () => Promise<void>;
}

async function openSource(image: string): Promise<Source> {
  if (/^nbds?(\+unix|\+tcp)?:\/\//.test(image)) {
    const client = await NbdClient.connect({ uri: image });
    return {
      size: client.size,
      read: async (offset, length) => {
        const b = Buffer.alloc(length);
        await client.read(offset, b);
        return b;
      },
      close: () => client.close(),
    };
  }
  let st;
  try {
    st = await stat(image);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new AnalyzeInputError(`${image}: no such file (pass a raw image, a block device or nbd://host:port/export)`, { cause: err });
    throw new AnalyzeInputError(`${image}: ${(err as Error).message}`, { cause: err });
  }
  if (st.isDirectory()) throw new AnalyzeInputError(`${image} is a directory; pass a disk image file`);
  let size = st.size;
  if (st.isBlockDevice()) size = await blockDeviceSize(image, st.rdev);
  const fh = await open(image, 'r');
  const read: ReadAt = async (offset, length) => {
    const b = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await fh.read(b, done, length - done, offset + done);
      if (bytesRead === 0) break; // past the end: zeros (cannot happen for reads inside size)
      done += bytesRead;
    }
    return b;
  };
  const src = { read, size, close: () => fh.close() };
  const format = await imageFormat(read, size);
  if (format) {
    await src.close();
    throw new AnalyzeInputError(
      `${image} is a ${format} image, not a raw disk: serve it with qemu-nbd and analyze the export, e.g.\n` +
        `  qemu-nbd --read-only --persistent --port 10810 --format ${format.toLowerCase()} ${image} &\n` +
        `  spillway analyze nbd://127.0.0.1:10810/`,
    );
  }
  return src;
}

/** Size of a block device from sysfs (fstat reports 0 for them). */
async function blockDeviceSize(path: string, rdev: number): Promise<number> {
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | ((Math.floor(rdev / 4096) & ~0xff) >>> 0);
  try {
    const sectors = Number((await readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8')).trim());
    return sectors * 512;
  } catch (err) {
    throw new AnalyzeInputError(`${path}: cannot tell the size of this block device from /sys/dev/block/${major}:${minor}/size`, { cause: err });
  }
}

/** The name of a non-raw image format whose magic `read` shows, or null. */
async function imageFormat(read: ReadAt, size: number): Promise<string | null> {
  if (size < 512) return null;
  const h = await read(0, 512);
  if (h.subarray(0, 4).equals(Buffer.from([0x51, 0x46, 0x49, 0xfb]))) return 'qcow2';
  if (h.subarray(0, 4).toString('latin1') === 'KDMV') return 'VMDK';
  if (h.subarray(0, 8).toString('latin1') === 'vhdxfile') return 'VHDX';
  if (h.readUInt32LE(0x40) === 0xbeda107f) return 'VDI';
  return null;
}

async function analyzeCommand(image: string, opts: AnalyzeCliOptions): Promise<void> {
  const src = await openSource(image);
  const files: Array<Ext4Entry & { filesystem: number }> = [];
  let analysis: VolumeAnalysis;
  try {
    analysis = await analyzeVolume(src.read, src.size, {
      top: opts.top,
      ...(opts.files ? { onEntry: (fa: FilesystemAnalysis, e: Ext4Entry) => void files.push({ ...e, filesystem: fa.offset }) } : {}),
    });
  } finally {
    await src.close();
  }
  if (opts.json) {
    const out = opts.files ? { ...analysis, files: files.map(({ filesystem, ...e }) => ({ fsOffset: filesystem, ...e })) } : analysis;
    process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
    return;
  }
  process.stdout.write(formatHuman(image, analysis));
  if (opts.files) {
    process.stdout.write('\nFiles (volume byte ranges, "u" = allocated but unwritten):\n');
    for (const f of files) {
      const ext = f.extents.map((e) => `${e.logical}:${e.offset}+${e.length}${e.unwritten ? 'u' : ''}`).join(' ');
      const extra = f.hardLinkOf ? ` (hard link of ${f.hardLinkOf})` : f.inline ? ' (inline)' : '';
      process.stdout.write(`  ${f.type.padEnd(7)} ${String(f.size).padStart(12)}  ${f.path}${extra}${ext ? `  ${ext}` : ''}\n`);
    }
  }
}

export function humanBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${n} B` : `${v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ${units[u]}`;
}

function formatHuman(image: string, a: VolumeAnalysis): string {
  const lines: string[] = [];
  lines.push(`${image}: ${humanBytes(a.size)} (${a.size} bytes), partition table: ${a.partitionTable}`);
  if (a.partitions.length > 0) {
    lines.push('', 'Partitions:');
    for (const p of a.partitions) {
      lines.push(`  ${String(p.index).padStart(3)}  start ${String(p.start).padStart(14)}  ${humanBytes(p.length).padStart(10)}  type ${p.type}${p.name ? `  "${p.name}"` : ''}${p.swap ? '  [swap]' : ''}`);
    }
  }
  lines.push('', 'Filesystems:');
  if (a.filesystems.length === 0) lines.push('  (none)');
  for (const f of a.filesystems) {
    const where = f.partition === null ? 'whole disk' : `partition ${f.partition}`;
    const used = f.type.startsWith('ext') && !f.error ? `, ${humanBytes(f.usedBytes)} used of ${humanBytes(f.sizeBytes)} (${((100 * f.usedBytes) / Math.max(1, f.sizeBytes)).toFixed(0)}%)` : `, ${humanBytes(f.sizeBytes)}`;
    const id = [f.label ? `label "${f.label}"` : '', f.uuid ? `uuid ${f.uuid}` : ''].filter(Boolean).join(', ');
    lines.push(`  ${where}: ${f.type}${used}${id ? `, ${id}` : ''}`);
    if (f.error) lines.push(`    cannot read it: ${f.error}`);
    if (f.type === 'unknown') lines.push(`    ${f.detected ? `this looks like ${f.detected}; ` : 'no known signature; '}only ext2/ext3/ext4 filesystems and Linux swap are analyzed`);
    if (f.os) lines.push(`    OS: ${f.os.prettyName} (${f.os.id}${f.os.versionId ? ` ${f.os.versionId}` : ''})`);
    if (f.fileCount !== undefined) lines.push(`    ${f.fileCount} files, ${f.dirCount} directories, ${f.symlinkCount} symlinks${f.lastMounted ? `, last mounted on ${f.lastMounted}` : ''}`);
    if (f.fstab && f.fstab.length > 0) {
      lines.push('    Mounts (/etc/fstab):');
      for (const m of f.fstab) lines.push(`      ${m.spec}  ${m.mountPoint}  ${m.type}  ${m.options}`);
    }
    if (f.network && f.network.length > 0) {
      lines.push('    Network configuration:');
      for (const n of f.network) lines.push(`      ${n.path}  (${n.kind})`);
    }
    if (f.largestFiles && f.largestFiles.length > 0) {
      lines.push('    Largest files (allocated, size):');
      for (const l of f.largestFiles) lines.push(`      ${humanBytes(l.allocatedBytes).padStart(10)}  ${humanBytes(l.size).padStart(10)}  ${l.path}`);
    }
  }
  lines.push('', 'Swap:');
  if (a.swap.length === 0) lines.push('  (none)');
  for (const s of a.swap) lines.push(`  ${s.source}${s.path ? ` ${s.path}` : ''}: offset ${s.offset}, ${humanBytes(s.length)}`);
  return `${lines.join('\n')}\n`;
}
