// Disk images for streaming benches: an ext4 file system built with `mkfs.ext4 -d` from a tree
// that looks like a VM's disk (system files copied from this machine's /usr, zero-filled
// preallocated files, incompressible random files, free space), and a census of what the image
// holds chunk by chunk (holes, all-zero chunks, how much LZ4 shrinks the rest).

import { createCipheriv, randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { copyFile, lstat, mkdir, open, readdir, rm, stat, truncate } from 'node:fs/promises';
import path from 'node:path';
import { compressChunk, CODEC_ZERO } from '../../src/link/compress.js';
import { runCommand } from './process.js';

/** Where the "system files" come from, and which share of their budget each source gets. */
export const SYSTEM_SOURCES: readonly { dir: string; share: number; what: string }[] = [
  { dir: '/usr/lib/x86_64-linux-gnu', share: 0.35, what: 'shared libraries' },
  { dir: '/usr/lib/gcc', share: 0.1, what: 'compiler binaries' },
  { dir: '/usr/lib/python3.11', share: 0.12, what: 'Python sources and bytecode' },
  { dir: '/usr/include', share: 0.1, what: 'C headers' },
  { dir: '/usr/share/locale', share: 0.1, what: 'message catalogues' },
  { dir: '/usr/share/doc', share: 0.08, what: 'documentation (much of it gzipped)' },
  { dir: '/usr/share/man', share: 0.05, what: 'manual pages (gzipped)' },
  { dir: '/usr/share/perl', share: 0.05, what: 'Perl modules' },
  { dir: '/usr/share/i18n', share: 0.05, what: 'locale sources' },
];

/** Shares of the image size; what is left is free space (less the file system's metadata). */
export interface FsImageMix {
  /** files copied from SYSTEM_SOURCES (text, binaries, libraries). */
  system: number;
  /** incompressible files (AES-CTR keystream: stands for media, archives, encrypted data). */
  random: number;
  /** zero-filled files (preallocated databases, swap files). mke2fs -d stores them sparse. */
  zero: number;
}

export const DEFAULT_FS_MIX: FsImageMix = { system: 0.35, random: 0.15, zero: 0.08 };

export interface FsImageReport {
  file: string;
  sizeBytes: number;
  mix: FsImageMix;
  /** bytes of files put in the tree, by kind. */
  tree: { systemBytes: number; systemFiles: number; randomBytes: number; randomFiles: number; zeroBytes: number; zeroFiles: number; bySource: Record<string, number> };
  /** `mkfs.ext4 …` as run. */
  mkfs: string;
  /** free space the file system reports (df-like, from dumpe2fs), bytes. */
  fsFreeBytes: number | null;
}

/** Regular files under `dir`, depth first in sorted order (deterministic), with their sizes. */
async function* walkFiles(dir: string): AsyncGenerator<{ file: string; size: number }> {
  let names: string[];
  try {
    names = (await readdir(dir)).sort();
  } catch {
    return; // unreadable directory: skip it
  }
  for (const name of names) {
    const p = path.join(dir, name);
    let st;
    try {
      st = await lstat(p);
    } catch {
      continue;
    }
    if (st.isDirectory()) yield* walkFiles(p);
    else if (st.isFile() && st.size > 0) yield { file: p, size: st.size };
  }
}

async function writeKeystreamFile(file: string, size: number): Promise<void> {
  const cipher = createCipheriv('aes-256-ctr', randomBytes(32), randomBytes(16));
  const block = Buffer.alloc(4 * 2 ** 20);
  const fh = await open(file, 'w');
  try {
    for (let done = 0; done < size; ) {
      const n = Math.min(block.length, size - done);
      const data = cipher.update(block.subarray(0, n));
      await fh.write(data, 0, data.length);
      done += n;
    }
  } finally {
    await fh.close();
  }
}

async function writeZeroFile(file: string, size: number): Promise<void> {
  // Written, not truncated: a preallocated file whose blocks hold zeroes. mke2fs -d skips
  // all-zero blocks when it copies, so the file system stores it sparse either way.
  const block = Buffer.alloc(4 * 2 ** 20);
  const fh = await open(file, 'w');
  try {
    for (let done = 0; done < size; ) {
      const n = Math.min(block.length, size - done);
      await fh.write(block, 0, n);
      done += n;
    }
  } finally {
    await fh.close();
  }
}

/** Split `total` bytes into files of 1..maxFile bytes (a few large, several small). */
function fileSizes(total: number, maxFile: number): number[] {
  const out: number[] = [];
  let left = total;
  let next = maxFile;
  while (left > 0) {
    const n = Math.min(left, next);
    out.push(n);
    left -= n;
    next = Math.max(256 * 1024, Math.floor(next / 2));
  }
  return out;
}

/**
 * Build an ext4 image of `sizeBytes` at `file` from a tree made in `workDir` (removed after).
 * Fails with a clear message when mkfs.ext4 is missing or the tree does not fit.
 */
export async function buildFsImage(file: string, workDir: string, sizeBytes: number, mix: FsImageMix = DEFAULT_FS_MIX): Promise<FsImageReport> {
  const tree = path.join(workDir, 'tree');
  await rm(tree, { recursive: true, force: true });
  const report: FsImageReport['tree'] = { systemBytes: 0, systemFiles: 0, randomBytes: 0, randomFiles: 0, zeroBytes: 0, zeroFiles: 0, bySource: {} };
  try {
    // System files: each source fills its share of the budget with whole files.
    const systemBudget = Math.floor(sizeBytes * mix.system);
    let n = 0;
    for (const src of SYSTEM_SOURCES) {
      const budget = Math.floor(systemBudget * src.share);
      let used = 0;
      for await (const f of walkFiles(src.dir)) {
        if (f.size > budget - used) {
          if (budget - used < 64 * 1024) break;
          continue;
        }
        const dst = path.join(tree, 'usr', path.relative('/usr', f.file));
        await mkdir(path.dirname(dst), { recursive: true });
        try {
          await copyFile(f.file, dst, fsConstants.COPYFILE_FICLONE);
        } catch {
          continue; // unreadable (permissions): skip
        }
        used += f.size;
        n++;
      }
      report.bySource[src.dir] = used;
      report.systemBytes += used;
    }
    report.systemFiles = n;

    const dataDir = path.join(tree, 'srv', 'data');
    await mkdir(dataDir, { recursive: true });
    for (const [i, size] of fileSizes(Math.floor(sizeBytes * mix.random), 64 * 2 ** 20).entries()) {
      await writeKeystreamFile(path.join(dataDir, `blob-${i}.bin`), size);
      report.randomBytes += size;
      report.randomFiles++;
    }
    const varDir = path.join(tree, 'var', 'lib', 'prealloc');
    await mkdir(varDir, { recursive: true });
    for (const [i, size] of fileSizes(Math.floor(sizeBytes * mix.zero), 64 * 2 ** 20).entries()) {
      await writeZeroFile(path.join(varDir, `zero-${i}.dat`), size);
      report.zeroBytes += size;
      report.zeroFiles++;
    }

    await rm(file, { force: true });
    await truncate(await touch(file), sizeBytes);
    const args = ['-q', '-F', '-t', 'ext4', '-b', '4096', '-L', 'spw-bench', '-d', tree, file];
    const r = await runCommand('mkfs.ext4', args, { allowFail: true, timeoutMs: 600_000 });
    if (r.code !== 0) throw new Error(`mkfs.ext4 ${args.join(' ')} failed (${r.code ?? r.signal}): ${r.stderr.trim()} — is the image too small for the tree? (apt-get install e2fsprogs if missing)`);
    return { file, sizeBytes, mix, tree: report, mkfs: `mkfs.ext4 ${args.join(' ').replace(tree, 'TREE').replace(file, 'IMAGE')}`, fsFreeBytes: await ext4FreeBytes(file) };
  } finally {
    await rm(tree, { recursive: true, force: true });
  }
}

async function touch(file: string): Promise<string> {
  const fh = await open(file, 'w');
  await fh.close();
  return file;
}

/** Free blocks × block size, from `dumpe2fs -h`; null when it cannot be read. */
async function ext4FreeBytes(file: string): Promise<number | null> {
  const r = await runCommand('dumpe2fs', ['-h', file], { allowFail: true, timeoutMs: 60_000 }).catch(() => null);
  if (!r || r.code !== 0) return null;
  const free = /^Free blocks:\s+(\d+)/m.exec(r.stdout);
  const bs = /^Block size:\s+(\d+)/m.exec(r.stdout);
  return free && bs ? Number(free[1]) * Number(bs[1]) : null;
}

/** What an image holds, chunk by chunk, as the link would see it. */
export interface ImageCensus {
  sizeBytes: number;
  chunkSize: number;
  chunks: number;
  /** bytes the file occupies on disk (st_blocks × 512): the rest are holes. */
  allocatedBytes: number;
  /** chunks that read as all zeroes (holes included). */
  zeroChunks: number;
  /** chunks LZ4 shrinks to at most 7/8 (sent compressed) and their raw/compressed bytes. */
  lz4Chunks: number;
  lz4RawBytes: number;
  lz4Bytes: number;
  /** chunks sent raw (LZ4 does not pay) and their bytes. */
  rawChunks: number;
  rawBytes: number;
  /** payload bytes the link would carry for one full read (no frame, TLS or TCP overhead). */
  linkPayloadBytes: number;
}

/** Read the image once and classify each chunk with the link's own compressor. */
export async function imageCensus(file: string, chunkSize = 64 * 1024): Promise<ImageCensus> {
  const st = await stat(file);
  const c: ImageCensus = { sizeBytes: st.size, chunkSize, chunks: 0, allocatedBytes: st.blocks * 512, zeroChunks: 0, lz4Chunks: 0, lz4RawBytes: 0, lz4Bytes: 0, rawChunks: 0, rawBytes: 0, linkPayloadBytes: 0 };
  const fh = await open(file, 'r');
  const buf = Buffer.alloc(chunkSize);
  try {
    for (let off = 0; off < st.size; off += chunkSize) {
      const n = Math.min(chunkSize, st.size - off);
      const { bytesRead } = await fh.read(buf, 0, n, off);
      const chunk = buf.subarray(0, bytesRead);
      const enc = compressChunk(chunk);
      c.chunks++;
      if (enc.codec === CODEC_ZERO) c.zeroChunks++;
      else if (enc.payload.length < chunk.length) {
        c.lz4Chunks++;
        c.lz4RawBytes += chunk.length;
        c.lz4Bytes += enc.payload.length;
      } else {
        c.rawChunks++;
        c.rawBytes += chunk.length;
      }
    }
  } finally {
    await fh.close();
  }
  c.linkPayloadBytes = c.lz4Bytes + c.rawBytes;
  return c;
}
