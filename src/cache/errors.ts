// Errors of the secure cache: one class with a stable `code` callers match on, and messages
// that tell the operator what to do. Not-found is never an error here (methods return null).

export type CacheErrorCode =
  /** the directory is used by another live process. */
  | 'SPW_ERR_CACHE_LOCKED'
  /** the directory holds files of an unknown or newer format. */
  | 'SPW_ERR_CACHE_FORMAT'
  /** the cache was closed; the call was refused. */
  | 'SPW_ERR_CACHE_CLOSED'
  /** a key of the wrong size. */
  | 'SPW_ERR_CACHE_KEY_SIZE'
  /** setKey with a key that does not open the content already stored for the family. */
  | 'SPW_ERR_CACHE_KEY_MISMATCH'
  /** a volume used with two different families. */
  | 'SPW_ERR_CACHE_FAMILY_MISMATCH'
  /** an argument outside what the cache accepts (empty name, id length, chunk size, ...). */
  | 'SPW_ERR_CACHE_ARGUMENT'
  /** the storage below failed (disk full, I/O error); the cause says which. */
  | 'SPW_ERR_CACHE_IO';

export class CacheError extends Error {
  readonly code: CacheErrorCode;
  constructor(code: CacheErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'CacheError';
    this.code = code;
  }
}
