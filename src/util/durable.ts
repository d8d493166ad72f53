// Small durability helpers shared by every on-disk format (bitmaps, the cache index, the
// write-back journal, the applier's logs): making a directory entry durable, and replacing a
// small file atomically.

import { constants, open, rename, unlink } from 'node:fs/promises';
import path from 'node:path';

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
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await fh.write(data, done, data.length - done, done);
      done += bytesWritten;
    }
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
