// Small durability helpers shared by every on-disk format (bitmaps, the cache index, the
// write-back journal, the applier's logs): making a directory entry durable, and replacing a
// small file atomically.

import { constants, open, rename, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';

/** Write every byte of `bufs` at `position` (one writev; short writes are continued). */
export async function writeFully(fh: FileHandle, bufs: readonly Buffer[], position: number): Promise<void> {
  let pos = position;
  let rest = [...bufs];
  while (rest.length > 0) {
    const total = rest.reduce((n, b) => n + b.length, 0);
    if (total === 0) return;
    const { bytesWritten } = await fh.writev(rest, pos);
    if (bytesWritten === total) return;
    if (bytesWritten === 0) throw new Error('a write made no progress');
    // short write: skip what went out and continue with the rest
    pos += bytesWritten;
    let skip = bytesWritten;
    const next: Buffer[] = [];
    for (const b of rest) {
      if (skip >= b.length) {
        skip -= b.length;
        continue;
      }
      next.push(skip > 0 ? b.subarray(skip) : b);
      skip = 0;
    }
    rest = next;
  }
}

/** fsync a directory, so that entries created, renamed or removed in it survive a crash. */
export async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, constants.O_RDONLY | constants.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Replace `file` with `data` atomically: a temporary file, fsync, rename, directory fsync.
 *  After a crash the file holds the old contents or the new ones, never a mix. */
export async function replaceFileDurably(file: string, data: Buffer, mode = 0o600): Promise<void> {
  const tmp = `${file}.tmp`;
  const fh = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC, mode);
  try {
    await writeFully(fh, [data], 0);
    await fh.sync();
  } catch (err) {
    await fh.close();
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
  await fh.close();
  await rename(tmp, file);
  await fsyncDir(path.dirname(file));
}
