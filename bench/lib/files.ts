// Temp directories and test images for benches. Every directory is registered with cleanup.ts,
// so it is removed on a normal end, an error or Ctrl-C.

import { createCipheriv, randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import { copyFile, mkdtemp, open, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { onCleanup } from './cleanup.js';

export interface TempDir {
  dir: string;
  /** Remove the directory now (also done automatically at exit). */
  remove: () => Promise<void>;
}

/** A fresh directory under the OS temp dir, removed at exit whatever happens. */
export async function makeTempDir(prefix = 'spw-bench-'): Promise<TempDir> {
  const dir = await mkdtemp(path.join(os.tmpdir(), prefix));
  const unregister = onCleanup({
    label: `remove ${dir}`,
    async: () => rm(dir, { recursive: true, force: true }),
    sync: () => rmSync(dir, { recursive: true, force: true }),
  });
  return {
    dir,
    remove: async () => {
      unregister();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/**
 * Write `size` bytes of incompressible, non-zero data: AES-256-CTR keystream under a random key
 * (as fast as the CPU's AES, far faster than /dev/urandom). fsynced, so no writeback of it
 * overlaps the measurements that follow.
 */
export async function writeRandomFile(file: string, size: number): Promise<void> {
  const cipher = createCipheriv('aes-256-ctr', randomBytes(32), randomBytes(16));
  const chunk = Buffer.alloc(4 * 2 ** 20);
  const fh = await open(file, 'w');
  try {
    let done = 0;
    while (done < size) {
      const n = Math.min(chunk.length, size - done);
      const data = cipher.update(n === chunk.length ? chunk : chunk.subarray(0, n));
      await fh.write(data, 0, data.length);
      done += data.length;
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Copy a file and fsync the copy, so the copy's writeback is not measured later. */
export async function copyFileDurable(from: string, to: string): Promise<void> {
  await copyFile(from, to);
  const fh = await open(to, 'r+');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
