// Errors of the QEMU compute driver, with stable codes callers match on. Messages say what to do.

export type ComputeErrorCode =
  /** The QMP socket cannot be connected to, or QEMU sent no greeting in time. */
  | 'SPW_ERR_QMP_CONNECT'
  /** The QMP connection closed (QEMU exited, or close() was called) while a reply was awaited. */
  | 'SPW_ERR_QMP_CLOSED'
  /** No reply (or event) within the timeout. */
  | 'SPW_ERR_QMP_TIMEOUT'
  /** QEMU sent something that is not QMP: a line too long, invalid UTF-8 or JSON, an unknown shape. */
  | 'SPW_ERR_QMP_PROTOCOL'
  /** QEMU answered a command with an error (QmpError carries QMP's class and desc). */
  | 'SPW_ERR_QMP_COMMAND'
  /** A console command did not finish in time (it was interrupted with Ctrl-C). */
  | 'SPW_ERR_CONSOLE_TIMEOUT'
  /** A console command's output exceeded the limit (it was interrupted with Ctrl-C). */
  | 'SPW_ERR_CONSOLE_OUTPUT'
  /** A console command is too long to type, or the console socket cannot be used. */
  | 'SPW_ERR_CONSOLE'
  /** A VM spec is invalid (name, MAC, disks, paths too long for a UNIX socket...). */
  | 'SPW_ERR_VM_SPEC'
  /** QEMU exited while starting, or did not open its QMP socket in time. */
  | 'SPW_ERR_VM_START'
  /** The VM's QEMU process is not running (any more). */
  | 'SPW_ERR_VM_GONE'
  /** The operation does not fit the VM's state (e.g. a VM already runs in that state directory). */
  | 'SPW_ERR_VM_STATE'
  /** A disk snapshot could not be taken. */
  | 'SPW_ERR_VM_SNAPSHOT'
  /** Live migration failed (query-migrate reported failed; error-desc says why). */
  | 'SPW_ERR_MIGRATION_FAILED'
  /** Live migration was cancelled (abort signal, timeout or someone else's migrate_cancel). */
  | 'SPW_ERR_MIGRATION_CANCELLED'
  /** A program the driver runs is not installed (the message names the apt package). */
  | 'SPW_ERR_MISSING_TOOL'
  /** A config drive's input is invalid or genisoimage failed. */
  | 'SPW_ERR_CONFIG_DRIVE'
  /** A provider cannot do what was asked (unknown host, unknown VM). */
  | 'SPW_ERR_PROVIDER';

export class ComputeError extends Error {
  constructor(
    readonly code: ComputeErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'ComputeError';
  }
}

/** QEMU answered a QMP command with `{"error": {"class": ..., "desc": ...}}`. */
export class QmpError extends ComputeError {
  constructor(
    /** The command that failed. */
    readonly command: string,
    /** QMP's error class, e.g. GenericError, CommandNotFound, DeviceNotFound. */
    readonly errorClass: string,
    /** QMP's human-readable description. */
    readonly desc: string,
  ) {
    super('SPW_ERR_QMP_COMMAND', `QMP ${command} failed: ${errorClass}: ${desc}`);
    this.name = 'QmpError';
  }
}

/** The QMP byte stream broke the protocol (the connection is unusable afterwards). */
export class QmpProtocolError extends ComputeError {
  constructor(message: string) {
    super('SPW_ERR_QMP_PROTOCOL', message);
    this.name = 'QmpProtocolError';
  }
}

/** Fail with the apt package to install when a program is missing. */
export function missingTool(program: string, aptPackage: string, cause?: unknown): ComputeError {
  return new ComputeError(
    'SPW_ERR_MISSING_TOOL',
    `'${program}' not found; install it with: apt-get install -y --no-install-recommends ${aptPackage}`,
    cause === undefined ? undefined : { cause },
  );
}
