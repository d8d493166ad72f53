// Typed loader for the spillway_native addon (native/spillway_native.c, built by node-gyp into
// build/Release/spillway_native.node): SEEK_DATA/SEEK_HOLE, fallocate punch-hole/zero-range,
// FICLONE and OFD byte-range locks, which Node's fs module does not expose.
//
// No npm package covers this set (see the C file's header), so the addon is ours. It is loaded
// lazily on first use, so layers that never touch a file (memory, stats, ...) work without it.

import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

export type OfdLockType = 'read' | 'write';

export interface OfdLockRequest {
  readonly type: OfdLockType | 'unlock';
  readonly start: number;
  /** 0 = from start to end of file and beyond (as in struct flock). */
  readonly len: number;
  /** Only false is supported: F_OFD_SETLKW would block the event loop. */
  readonly wait?: false;
}

export interface OfdLockQuery {
  readonly type: OfdLockType;
  readonly start: number;
  readonly len: number;
}

/** A lock that conflicts with a query. `pid` is -1 for OFD locks (they have no owning process). */
export interface OfdLockInfo {
  readonly type: OfdLockType;
  readonly start: number;
  readonly len: number;
  readonly pid: number;
}

/** Errors from the addon carry `code` = errno name ('EAGAIN', 'EOPNOTSUPP', ...). */
export interface NativeAddon {
  /** Next offset >= `offset` holding data, or -1 if there is none before EOF (ENXIO). */
  seekData(fd: number, offset: number): Promise<number>;
  /** Next offset >= `offset` in a hole (EOF counts as one), or -1 if `offset` is past EOF. */
  seekHole(fd: number, offset: number): Promise<number>;
  /** lseek(fd, 0, SEEK_END): the size of a block device, where fstat reports 0. */
  seekEnd(fd: number): Promise<number>;
  /** fallocate(PUNCH_HOLE | KEEP_SIZE). `len` must be > 0. */
  punchHole(fd: number, offset: number, len: number): Promise<void>;
  /** fallocate(ZERO_RANGE); rejects with EOPNOTSUPP where the file system lacks it. */
  zeroRange(fd: number, offset: number, len: number): Promise<void>;
  /** ioctl(dstFd, FICLONE, srcFd): share all extents of src (btrfs, XFS with reflink). */
  ficlone(dstFd: number, srcFd: number): Promise<void>;
  /** fcntl(F_OFD_SETLK); rejects a conflicting request with EAGAIN (synchronous). */
  ofdLock(fd: number, lock: OfdLockRequest): void;
  /** fcntl(F_OFD_GETLK): the first lock that would conflict with `lock`, or null. */
  ofdGetLock(fd: number, lock: OfdLockQuery): OfdLockInfo | null;
}

/** The package root: this file lives in src/block/ (tsx) or dist/block/ (built). */
const PACKAGE_ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const NATIVE_ADDON_PATH = `${PACKAGE_ROOT}build/Release/spillway_native.node`;

export class NativeAddonMissingError extends Error {
  readonly code = 'SPW_ERR_NATIVE_MISSING';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'NativeAddonMissingError';
  }
}

let loaded: NativeAddon | undefined;

/** The addon, loaded once. Throws NativeAddonMissingError telling the operator how to build it. */
export function native(): NativeAddon {
  if (loaded) return loaded;
  if (process.platform !== 'linux') {
    throw new NativeAddonMissingError(`spillway's native addon is Linux-only (this is ${process.platform})`);
  }
  if (!existsSync(NATIVE_ADDON_PATH)) {
    throw new NativeAddonMissingError(
      `native addon not built: ${NATIVE_ADDON_PATH} is missing; run \`make build\` or \`npm run build:native\` in ${PACKAGE_ROOT}`,
    );
  }
  try {
    const require = createRequire(`${PACKAGE_ROOT}package.json`);
    loaded = require(NATIVE_ADDON_PATH) as NativeAddon;
  } catch (err) {
    throw new NativeAddonMissingError(
      `could not load ${NATIVE_ADDON_PATH} (${(err as Error).message}); rebuild it with \`npm run build:native\``,
      { cause: err },
    );
  }
  return loaded;
}
