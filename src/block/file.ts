// FileDevice: a raw image file or a block device as the bottom layer of a BlockDevice stack.
// Positional I/O through one shared fs.promises FileHandle; flush = fdatasync; trim = punch
// hole; writeZeroes = punch hole / zero range with a bounded fallback; blockStatus from
// SEEK_DATA/SEEK_HOLE; an optional OFD lock on the whole file keeps other users (a second
// spillway, QEMU) out while we hold it.

import { open, readdir, readFile, type FileHandle } from 'node:fs/promises';
import type { BigIntStats } from 'node:fs';
import {
  BlockError,
  assertRange,
  type BlockCapabilities,
  type BlockDevice,
  type Extent,
  type IoOptions,
  type ZeroOptions,
} from './device.js';
import { GroupCommit } from './group-commit.js';
import { OpGate } from './op-gate.js';
import { native, type NativeAddon, type OfdLockInfo } from './native.js';

export interface FileDeviceOptions {
  /** open O_RDONLY; write paths fail with EPERM. */
  readonly readonly?: boolean;
  /** take an OFD lock on the whole file (write lock read-write, read lock read-only). Default true. */
  readonly lock?: boolean;
}

/** Largest buffer used when writeZeroes has to write real zeroes. */
const ZERO_CHUNK = 1024 * 1024;
/** blockStatus answers stop after this many extents (the interface allows stopping early). */
const MAX_EXTENTS = 2048;
/** Alignment of fallocate on block devices (covers 512- and 4096-byte logical sectors). */
const BLOCK_ALIGN = 4096;

let zeroChunk: Buffer | undefined;
function zeroes(length: number): Buffer {
  zeroChunk ??= Buffer.alloc(ZERO_CHUNK);
  return length >= ZERO_CHUNK ? zeroChunk : zeroChunk.subarray(0, length);
}

/** Another process (or open file description) holds a conflicting lock on the image. */
export class FileLockedError extends BlockError {
  readonly code = 'SPW_ERR_FILE_LOCKED';
  constructor(
    message: string,
    readonly holders: readonly LockHolder[],
    options?: { cause?: unknown },
  ) {
    super('EPERM', message, options);
    this.name = 'FileLockedError';
  }
}

export interface LockHolder {
  readonly pid: number;
  readonly command: string;
  /** the /proc/locks style line, e.g. "OFDLCK ADVISORY WRITE -1 fe:00:1234 0 EOF". */
  readonly lock: string;
}

function errCode(err: unknown): unknown {
  return (err as { code?: unknown } | null)?.code;
}

export class FileDevice implements BlockDevice {
  readonly capabilities: BlockCapabilities;
  readonly description: string;
  private readonly gate = new OpGate(() => this.description);
  /** concurrent flushes (and FUA) share one fdatasync that started after they were asked. */
  private readonly syncer = new GroupCommit(() => this.handle.datasync());
  private closing: Promise<void> | undefined;
  /** cleared after the file system says EOPNOTSUPP once, to skip the syscall next time. */
  private canPunch = true;
  private canZeroRange = true;

  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    readonly size: number,
    readonly readonly: boolean,
    readonly isBlockDevice: boolean,
    private readonly nat: NativeAddon,
  ) {
    this.description = `file:${path}`;
    const w = !readonly;
    this.capabilities = {
      writable: w,
      flush: w,
      fua: w,
      trim: w,
      zero: w,
      fastZero: w,
      extents: true,
      cache: false,
      multiConn: true,
      blockSize: { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 },
    };
  }

  /** Open a raw image or block device. Fails with FileLockedError if the lock is taken. */
  static async open(path: string, opts: FileDeviceOptions = {}): Promise<FileDevice> {
    const nat = native();
    const readonly = opts.readonly ?? false;
    const handle = await open(path, readonly ? 'r' : 'r+');
    try {
      const st = await handle.stat({ bigint: true });
      let size: number;
      if (st.isBlockDevice()) size = await nat.seekEnd(handle.fd);
      else if (st.isFile()) size = Number(st.size);
      else throw new BlockError('EINVAL', `${path} is neither a regular file nor a block device`);
      if (opts.lock ?? true) await lockWholeFile(nat, handle, path, st, readonly);
      return new FileDevice(path, handle, size, readonly, st.isBlockDevice(), nat);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** The file descriptor, for callers that need it (e.g. FICLONE). Valid until close(). */
  get fd(): number {
    return this.handle.fd;
  }

  read(offset: number, buf: Buffer, opts?: IoOptions): Promise<void> {
    return this.run(opts, async () => {
      assertRange(this, offset, buf.length);
      let done = 0;
      while (done < buf.length) {
        const { bytesRead } = await this.handle.read(buf, done, buf.length - done, offset + done);
        if (bytesRead === 0) {
          throw new BlockError('EIO', `unexpected end of file at ${offset + done} in ${this.path} (was it truncated?)`);
        }
        done += bytesRead;
      }
    });
  }

  write(offset: number, data: Buffer, opts?: IoOptions): Promise<void> {
    return this.run(opts, async () => {
      this.assertWritable('write');
      assertRange(this, offset, data.length);
      await this.writeAll(offset, data);
      if (opts?.fua) await this.syncer.flush();
    });
  }

  flush(opts?: IoOptions): Promise<void> {
    return this.run(opts, () => this.syncer.flush());
  }

  trim(offset: number, length: number, opts?: IoOptions): Promise<void> {
    return this.run(opts, async () => {
      this.assertWritable('trim');
      assertRange(this, offset, length);
      if (length === 0) return;
      await this.zero(offset, length, true, false);
      if (opts?.fua) await this.syncer.flush();
    });
  }

  writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.run(opts, async () => {
      this.assertWritable('writeZeroes');
      assertRange(this, offset, length);
      if (length === 0) return;
      await this.zero(offset, length, opts?.mayTrim ?? false, opts?.fastOnly ?? false);
      if (opts?.fua) await this.syncer.flush();
    });
  }

  blockStatus(offset: number, length: number, opts?: IoOptions): Promise<Extent[]> {
    return this.run(opts, async () => {
      assertRange(this, offset, length);
      // block devices refuse SEEK_DATA (EINVAL): everything is allocated
      if (this.isBlockDevice) return [{ offset, length, hole: false, zero: false }];
      const fd = this.handle.fd;
      const end = offset + length;
      const out: Extent[] = [];
      let pos = offset;
      while (pos < end && out.length < MAX_EXTENTS) {
        const data = await this.nat.seekData(fd, pos);
        if (data < 0 || data >= end) {
          out.push({ offset: pos, length: end - pos, hole: true, zero: true });
          break;
        }
        if (data > pos) out.push({ offset: pos, length: data - pos, hole: true, zero: true });
        const hole = await this.nat.seekHole(fd, data);
        const stop = hole < 0 || hole > end ? end : hole;
        if (stop <= data) break; // the file changed under us; report what we have
        out.push({ offset: data, length: stop - data, hole: false, zero: false });
        pos = stop;
      }
      if (out.length === 0) out.push({ offset, length, hole: false, zero: false });
      return out;
    });
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.gate.close();
      await this.handle.close(); // also releases the OFD lock
    })();
    return this.closing;
  }

  private run<T>(opts: IoOptions | undefined, fn: () => Promise<T>): Promise<T> {
    return this.gate.run(opts, fn);
  }

  private assertWritable(op: string): void {
    if (this.readonly) throw new BlockError('EPERM', `${op} refused: ${this.path} is open read-only`);
  }

  private async writeAll(offset: number, data: Buffer): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.handle.write(data, done, data.length - done, offset + done);
      if (bytesWritten === 0) throw new BlockError('EIO', `write made no progress at ${offset + done} in ${this.path}`);
      done += bytesWritten;
    }
  }

  /** Punch (when allowed), else zero-range, else write zeroes in bounded chunks (not fastOnly).
   *  Block devices only fallocate whole sectors: the unaligned head and tail (< 4 KiB each) are
   *  written as zeroes and the aligned middle is fallocated. */
  private async zero(offset: number, length: number, mayTrim: boolean, fastOnly: boolean): Promise<void> {
    if (this.isBlockDevice) {
      const end = offset + length;
      const a = Math.ceil(offset / BLOCK_ALIGN) * BLOCK_ALIGN;
      const b = Math.floor(end / BLOCK_ALIGN) * BLOCK_ALIGN;
      if (a < b) {
        if (a > offset) await this.writeAll(offset, zeroes(a - offset));
        if (end > b) await this.writeAll(b, zeroes(end - b));
        offset = a;
        length = b - a;
      }
    }
    const fd = this.handle.fd;
    if (mayTrim && this.canPunch) {
      try {
        await this.nat.punchHole(fd, offset, length);
        return;
      } catch (err) {
        if (!this.unsupported(err)) throw err;
        if (errCode(err) !== 'EINVAL') this.canPunch = false;
      }
    }
    if (this.canZeroRange) {
      try {
        await this.nat.zeroRange(fd, offset, length);
        return;
      } catch (err) {
        if (!this.unsupported(err)) throw err;
        if (errCode(err) !== 'EINVAL') this.canZeroRange = false;
      }
    }
    if (fastOnly) throw new BlockError('ENOTSUP', `${this.path}: no fast way to write zeroes here`);
    for (let pos = offset, end = offset + length; pos < end; pos += ZERO_CHUNK) {
      await this.writeAll(pos, zeroes(Math.min(ZERO_CHUNK, end - pos)));
    }
  }

  /** fallocate mode not available; on block devices EINVAL means "not for this alignment". */
  private unsupported(err: unknown): boolean {
    const code = errCode(err);
    return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS' || (this.isBlockDevice && code === 'EINVAL');
  }
}

async function lockWholeFile(
  nat: NativeAddon,
  handle: FileHandle,
  path: string,
  st: BigIntStats,
  readonly: boolean,
): Promise<void> {
  const type = readonly ? 'read' : 'write';
  try {
    nat.ofdLock(handle.fd, { type, start: 0, len: 0, wait: false });
  } catch (err) {
    const code = errCode(err);
    if (code !== 'EAGAIN' && code !== 'EACCES') throw err;
    let conflict: OfdLockInfo | null = null;
    try {
      conflict = nat.ofdGetLock(handle.fd, { type, start: 0, len: 0 });
    } catch {
      // best effort: the message below still says the file is locked
    }
    const holders = await findLockHolders(st, conflict);
    const what = conflict
      ? `a ${conflict.type} lock on bytes ${conflict.start}..${conflict.len === 0 ? 'EOF' : conflict.start + conflict.len - 1}`
      : 'a conflicting lock';
    const who =
      holders.length > 0
        ? `held by ${holders.map((h) => `pid ${h.pid} (${h.command})${h.pid === process.pid ? ' [this process]' : ''}`).join(', ')}`
        : 'held by a process this user cannot see';
    throw new FileLockedError(
      `cannot take a ${type} lock on ${path}: ${what} is ${who}. ` +
        `Stop the other user of the image, or open it ${readonly ? 'without locking' : 'read-only or without locking'} if sharing is safe.`,
      holders,
      { cause: err },
    );
  }
}

/** Who holds locks on the file: a POSIX lock names its pid; OFD locks show -1 everywhere, so
 *  look for the inode in /proc/<pid>/fdinfo/<fd> "lock:" lines (only on the failure path). */
async function findLockHolders(st: BigIntStats, conflict: OfdLockInfo | null): Promise<LockHolder[]> {
  const dev = st.dev;
  const major = Number(((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn));
  const minor = Number((dev & 0xffn) | ((dev >> 12n) & ~0xffn));
  const key = ` ${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${st.ino} `;
  const holders: LockHolder[] = [];
  const seen = new Set<number>();
  const add = async (pid: number, lock: string): Promise<void> => {
    if (seen.has(pid)) return;
    seen.add(pid);
    let command = '?';
    try {
      command = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').filter(Boolean).join(' ') || command;
    } catch {
      // process gone or not visible
    }
    holders.push({ pid, command, lock });
  };
  if (conflict && conflict.pid > 0) await add(conflict.pid, `POSIX ${conflict.type.toUpperCase()}`);
  let pids: string[] = [];
  try {
    pids = (await readdir('/proc')).filter((n) => /^\d+$/.test(n));
  } catch {
    return holders;
  }
  for (const pid of pids) {
    let fds: string[];
    try {
      fds = await readdir(`/proc/${pid}/fdinfo`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      let info: string;
      try {
        info = await readFile(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
      } catch {
        continue;
      }
      for (const line of info.split('\n')) {
        if (line.startsWith('lock:') && line.includes(key)) {
          await add(Number(pid), line.replace(/^lock:\s*\d+:\s*/, '').replace(/\s+/g, ' '));
        }
      }
    }
  }
  return holders;
}
