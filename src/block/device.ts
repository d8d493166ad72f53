// The one interface of the data path. Every layer (file, memory, overlay, cache, journal,
// stats, read-only, remote) is a BlockDevice, and most wrap another one, like nbdkit filters.
// The NBD server only ever sees a BlockDevice.
//
// Contract (validated once at the protocol edge, asserted inside):
// - offsets and lengths are non-negative integers and offset + length <= size;
// - a device may assume callers respect capabilities (no write on a read-only device, etc.);
// - errors are BlockError with an errno-like code, mapped to wire codes in one place per protocol.

/** errno-like vocabulary of the data path. Each protocol maps it once (see nbd/errors.ts). */
export type BlockErrno =
  | 'EPERM'
  | 'EIO'
  | 'ENOMEM'
  | 'EINVAL'
  | 'ENOSPC'
  | 'EOVERFLOW'
  | 'ENOTSUP'
  | 'ESHUTDOWN';

export class BlockError extends Error {
  readonly errno: BlockErrno;
  constructor(errno: BlockErrno, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BlockError';
    this.errno = errno;
  }
}

/** Map any thrown value from a layer to a BlockError (Node fs errors keep their errno). */
export function toBlockError(err: unknown): BlockError {
  if (err instanceof BlockError) return err;
  const code = (err as { code?: unknown } | null)?.code;
  const msg = err instanceof Error ? err.message : String(err);
  switch (code) {
    case 'EPERM':
    case 'EACCES':
    case 'EROFS':
      return new BlockError('EPERM', msg, { cause: err });
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return new BlockError('ENOSPC', msg, { cause: err });
    case 'ENOMEM':
      return new BlockError('ENOMEM', msg, { cause: err });
    case 'EINVAL':
      return new BlockError('EINVAL', msg, { cause: err });
    case 'EOPNOTSUPP':
    case 'ENOTSUP':
      return new BlockError('ENOTSUP', msg, { cause: err });
    case 'ABORT_ERR':
      return new BlockError('ESHUTDOWN', msg, { cause: err });
    default:
      return new BlockError('EIO', msg, { cause: err });
  }
}

export interface BlockSizeConstraints {
  /** smallest addressable unit; requests must be aligned to it (1 = byte granular). */
  readonly minimum: number;
  /** preferred I/O size; smaller or unaligned I/O may need read-modify-write. */
  readonly preferred: number;
  /** largest payload of one read or write. */
  readonly maximum: number;
}

/** Decided once when a layer is built; the server advertises exactly these. */
export interface BlockCapabilities {
  readonly writable: boolean;
  /** flush() does something (there is a volatile cache below). */
  readonly flush: boolean;
  /** fua writes are honoured natively (otherwise emulated as write + flush by the caller). */
  readonly fua: boolean;
  readonly trim: boolean;
  /** writeZeroes is efficient (no data transfer); otherwise it is emulated by writing zeroes. */
  readonly zero: boolean;
  /** writeZeroes({ fastOnly: true }) fails fast with ENOTSUP instead of being slow. */
  readonly fastZero: boolean;
  /** blockStatus() is implemented and meaningful. */
  readonly extents: boolean;
  /** cache() (prefetch hint) does something useful. */
  readonly cache: boolean;
  /** a flush on one connection makes writes of all connections durable (NBD multi-conn). */
  readonly multiConn: boolean;
  readonly blockSize: BlockSizeConstraints;
}

export interface IoOptions {
  /** force unit access: durable before the promise resolves. */
  readonly fua?: boolean;
  readonly signal?: AbortSignal;
}

export interface ZeroOptions extends IoOptions {
  /** the range may be deallocated (NBD: absence of NO_HOLE). */
  readonly mayTrim?: boolean;
  /** fail with ENOTSUP rather than fall back to slow writes (NBD_CMD_FLAG_FAST_ZERO). */
  readonly fastOnly?: boolean;
}

/** One run of a block-status answer. Flags follow NBD base:allocation. */
export interface Extent {
  readonly offset: number;
  readonly length: number;
  /** not allocated (reads as zero unless `zero` is false for a backing layer). */
  readonly hole: boolean;
  /** reads as zeroes. */
  readonly zero: boolean;
}

export interface BlockDevice {
  /** size in bytes; constant for the life of the device. */
  readonly size: number;
  readonly capabilities: BlockCapabilities;
  /** human readable description of the stack, e.g. "stats(overlay(file:/x.img))". */
  readonly description: string;

  /** Fill `buf` with `buf.length` bytes from `offset`. */
  read(offset: number, buf: Buffer, opts?: IoOptions): Promise<void>;
  write(offset: number, data: Buffer, opts?: IoOptions): Promise<void>;
  /** Make every completed write durable. */
  flush(opts?: IoOptions): Promise<void>;
  /** Advisory deallocation: contents afterwards are unspecified but stable (we return zeroes). */
  trim(offset: number, length: number, opts?: IoOptions): Promise<void>;
  writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void>;
  /** Allocation map of [offset, offset + length). Extents are contiguous, in order, and
   *  cover at least one byte from `offset`; they may stop before the end. */
  blockStatus?(offset: number, length: number, opts?: IoOptions): Promise<Extent[]>;
  /** Prefetch hint (NBD_CMD_CACHE). */
  cache?(offset: number, length: number, opts?: IoOptions): Promise<void>;
  /** Release resources. Idempotent. */
  close(): Promise<void>;
}

/**
 * A layer with nothing to do passes through. Subclasses override what they change, like an
 * nbdkit filter. `capabilities` default to the inner device's.
 */
export abstract class FilterDevice implements BlockDevice {
  constructor(protected readonly inner: BlockDevice) {}

  get size(): number {
    return this.inner.size;
  }
  get capabilities(): BlockCapabilities {
    return this.inner.capabilities;
  }
  abstract get description(): string;

  read(offset: number, buf: Buffer, opts?: IoOptions): Promise<void> {
    return this.inner.read(offset, buf, opts);
  }
  write(offset: number, data: Buffer, opts?: IoOptions): Promise<void> {
    return this.inner.write(offset, data, opts);
  }
  flush(opts?: IoOptions): Promise<void> {
    return this.inner.flush(opts);
  }
  trim(offset: number, length: number, opts?: IoOptions): Promise<void> {
    return this.inner.trim(offset, length, opts);
  }
  writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.inner.writeZeroes(offset, length, opts);
  }
  blockStatus(offset: number, length: number, opts?: IoOptions): Promise<Extent[]> {
    return blockStatusOf(this.inner, offset, length, opts);
  }
  cache(offset: number, length: number, opts?: IoOptions): Promise<void> {
    return this.inner.cache ? this.inner.cache(offset, length, opts) : Promise.resolve();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

/** blockStatus of any device: devices without it report one allocated data extent. */
export function blockStatusOf(
  dev: BlockDevice,
  offset: number,
  length: number,
  opts?: IoOptions,
): Promise<Extent[]> {
  if (dev.blockStatus) return dev.blockStatus(offset, length, opts);
  return Promise.resolve([{ offset, length, hole: false, zero: false }]);
}

export function assertRange(dev: { size: number }, offset: number, length: number): void {
  if (!(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0 && offset + length <= dev.size)) {
    throw new BlockError('EINVAL', `range ${offset}+${length} outside device of ${dev.size} bytes`);
  }
}
