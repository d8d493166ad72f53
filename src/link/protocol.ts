// Link wire constants: the framed, multiplexed protocol between two edges, inside mutual TLS.
//
// Every frame: u8 type | u8 flags | u16 reserved (0) | u32 payload length | payload.
// Messages are discriminated by type; payload layouts are in codec.ts. Chunk data frames are
// subject to credit-based flow control (the receiver grants bytes with CREDIT); control
// frames are not, and are small.

/** 2: FETCH and chunk answers carry a fill token (pushes, I5). */
export const LINK_VERSION = 2;
export const FRAME_HEADER_SIZE = 8;
/** Largest payload of one frame: one chunk of up to 1 MiB plus its header. */
export const MAX_FRAME_PAYLOAD = 1024 * 1024 + 256;
/** Largest chunk size a volume may use. */
export const MAX_CHUNK_SIZE = 1024 * 1024;
/** Chunks named in one FETCH or CANCEL. */
export const MAX_CHUNKS_PER_FETCH = 1024;
export const MAX_STRING = 1024;
export const SIGNATURE_SIZE = 32;
export const DATA_KEY_SIZE = 32;

export const MSG = {
  HELLO: 1,
  ERROR: 2,
  OPEN: 3,
  OPENED: 4,
  FETCH: 5,
  CHUNK: 6,
  CHUNK_SIG: 7,
  CHUNK_ZERO: 8,
  NEED_DATA: 9,
  CANCEL: 10,
  CREDIT: 11,
  METRICS_REQUEST: 12,
  METRICS: 13,
  PING: 14,
  PONG: 15,
  CLOSE_VOLUME: 16,
  // 32..47: write-back (epochs, acks). 48..63: control calls.
  EPOCH_QUERY: 32,
  EPOCH_STATE: 33,
  EPOCH_BEGIN: 34,
  EPOCH_DATA: 35,
  EPOCH_END: 36,
  EPOCH_ACK: 37,
} as const;

/** Size of a journal id (random, chosen when a remote edge creates a volume's journal). */
export const JOURNAL_ID_SIZE = 16;
/** Largest extent carried by one EPOCH_DATA frame (longer extents are split). */
export const MAX_EPOCH_EXTENT = 1024 * 1024;

/** Outcome of a batch of epochs, carried by EPOCH_ACK. */
export const EPOCH_STATUS = {
  /** applied now; appliedSeq = the batch's lastSeq. */
  APPLIED: 0,
  /** already applied earlier (a retry or a duplicate); nothing done. */
  DUPLICATE: 1,
  /** firstSeq is not appliedSeq + 1: resend from appliedSeq + 1. */
  GAP: 2,
  /** the batch did not match its BEGIN (count, bytes or digest): resend it. */
  CORRUPT: 3,
  /** the origin could not persist or apply it (disk error): retry later. */
  IO: 4,
  /** another journal owns the volume's write-back; see the message. */
  NOT_OWNER: 5,
} as const;

/** Readable names of EPOCH_STATUS values, for logs and metric labels. */
export const EPOCH_STATUS_NAMES: Readonly<Record<number, string>> = {
  [EPOCH_STATUS.APPLIED]: 'applied',
  [EPOCH_STATUS.DUPLICATE]: 'duplicate',
  [EPOCH_STATUS.GAP]: 'gap',
  [EPOCH_STATUS.CORRUPT]: 'corrupt',
  [EPOCH_STATUS.IO]: 'io',
  [EPOCH_STATUS.NOT_OWNER]: 'not-owner',
};

/** Priority classes, highest first. Lower classes never starve demand (see scheduler.ts). */
export const PRIORITY = {
  DEMAND: 0,
  GROUP: 1,
  PREFETCH: 2,
  HYDRATION: 3,
} as const;
export type Priority = (typeof PRIORITY)[keyof typeof PRIORITY];
export const PRIORITY_NAMES = ['demand', 'group', 'prefetch', 'hydration'] as const;

/** Per-chunk encodings on the wire. */
export const CODEC = {
  RAW: 0,
  ZSTD: 1,
  LZ4: 2,
} as const;

/** Error codes carried by ERROR frames (stable; callers match on them). */
export const LINK_ERR = {
  UNKNOWN_VOLUME: 1,
  IO: 2,
  BAD_REQUEST: 3,
  VERSION: 4,
  SHUTTING_DOWN: 5,
  NOT_OWNER: 6,
} as const;
