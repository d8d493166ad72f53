// Errors of the WAN emulator, with stable codes callers can match on.

export type WanemErrorCode =
  /** A parameter is out of range or inconsistent with another one. */
  | 'SPW_ERR_WANEM_PARAM'
  /** An address is not HOST:PORT. */
  | 'SPW_ERR_WANEM_ADDRESS'
  /** start() on a running emulator, or stats of one never started. */
  | 'SPW_ERR_WANEM_STATE';

export class WanemError extends Error {
  constructor(
    readonly code: WanemErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'WanemError';
  }
}
