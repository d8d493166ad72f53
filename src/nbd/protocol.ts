// NBD wire constants, all in one place. Source: NetworkBlockDevice/nbd doc/proto.md.

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server) and client flags.
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const CLIENT_FLAG_NO_ZEROES = 1 << 1;

// Options.
export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

// Option reply types.
export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
} as const;
const REP_ERR = 0x80000000;
export const REP_ERR_ = {
  UNSUP: REP_ERR + 1,
  POLICY: REP_ERR + 2,
  INVALID: REP_ERR + 3,
  PLATFORM: REP_ERR + 4,
  TLS_REQD: REP_ERR + 5,
  UNKNOWN: REP_ERR + 6,
  SHUTDOWN: REP_ERR + 7,
  BLOCK_SIZE_REQD: REP_ERR + 8,
  TOO_BIG: REP_ERR + 9,
} as const;
export function isReplyError(type: number): boolean {
  return type >= REP_ERR;
}

// NBD_INFO_* for OPT_INFO / OPT_GO.
export const INFO = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

// Transmission flags.
export const TFLAG = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

// Commands.
export const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;
export type CommandType = number;

// Command flags.
export const CMD_FLAG = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const;

// Structured reply.
export const REPLY_FLAG_DONE = 1 << 0;
export const REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;
export function isReplyTypeError(type: number): boolean {
  return (type & (1 << 15)) !== 0;
}

// Wire error numbers (errno values fixed by the protocol, not the host's).
export const NBD_ERR = {
  OK: 0,
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

// base:allocation block status flags.
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;
export const META_CONTEXT_BASE_ALLOCATION = 'base:allocation';

// Sizes of fixed wire structures.
export const REQUEST_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const STRUCTURED_REPLY_HEADER_SIZE = 20;
export const OPTION_HEADER_SIZE = 16; // IHAVEOPT + option + length
export const OPTION_REPLY_HEADER_SIZE = 20; // magic + option + type + length

// Limits we enforce before buffering anything.
/** Largest option payload we accept (the spec suggests servers cap this; names are <= 4096). */
export const MAX_OPTION_LENGTH = 64 * 1024;
/** Largest string (export name, query) the spec allows. */
export const MAX_STRING = 4096;
/** Largest payload of one READ/WRITE we accept (advertised as maximum block size). */
export const MAX_PAYLOAD = 32 * 1024 * 1024;
export const DEFAULT_PORT = 10809;
