// The store's own typed error, beside NotFoundError / ConflictError / InvalidInputError of
// ../types.ts: a row the store cannot read back (invalid JSON, a value of the wrong shape).
// It is thrown to the caller of the method that read the row; it never takes the process down.

export class CorruptDataError extends Error {
  readonly code = 'SPW_ERR_CORRUPT';
  constructor(message: string) {
    super(message);
    this.name = 'CorruptDataError';
  }
}
