// Transmission-phase request validation, done once at the protocol edge (inner layers only
// assert). Pure: (request, what was negotiated) → NBD error number, or 0 when valid.

import { CMD, CMD_FLAG, MAX_PAYLOAD, NBD_ERR } from './protocol.js';
import type { RequestHeader } from './codec.js';

export interface NegotiatedExport {
  size: number;
  writable: boolean;
  /** NBD_FLAG_SEND_FUA was advertised. */
  fua: boolean;
  /** NBD_FLAG_SEND_FAST_ZERO was advertised. */
  fastZero: boolean;
  structured: boolean;
  /** a meta context (base:allocation) is selected for this export. */
  metaContext: boolean;
  minBlock: number;
  maxPayload: number;
}

const KNOWN_FLAGS = CMD_FLAG.FUA | CMD_FLAG.NO_HOLE | CMD_FLAG.DF | CMD_FLAG.REQ_ONE | CMD_FLAG.FAST_ZERO;

function allowedFlags(type: number, e: NegotiatedExport): number {
  // FUA is valid on every command once advertised (proto.md: "MUST accept ... even by ignoring").
  let f = e.fua ? CMD_FLAG.FUA : 0;
  switch (type) {
    case CMD.READ:
      if (e.structured) f |= CMD_FLAG.DF;
      break;
    case CMD.WRITE_ZEROES:
      f |= CMD_FLAG.NO_HOLE;
      if (e.fastZero) f |= CMD_FLAG.FAST_ZERO;
      break;
    case CMD.BLOCK_STATUS:
      f |= CMD_FLAG.REQ_ONE;
      break;
  }
  return f;
}

/** Whether the request carries a payload the server must consume even when it is refused. */
export function hasPayload(req: RequestHeader): boolean {
  return req.type === CMD.WRITE;
}

/**
 * Spec rules (proto.md "Error values" and "Block size constraints"):
 * unknown command or flag → EINVAL; write/trim/zero on a read-only export → EPERM;
 * misaligned → EINVAL; past the end → ENOSPC for writes and write-zeroes, EINVAL otherwise;
 * payload above the advertised maximum → EINVAL. Zero-length I/O is a valid no-op, except
 * BLOCK_STATUS, which must describe at least one byte and so gets EINVAL.
 */
export function validateRequest(req: RequestHeader, e: NegotiatedExport): number {
  const t = req.type;
  if (t !== CMD.READ && t !== CMD.WRITE && t !== CMD.DISC && t !== CMD.FLUSH && t !== CMD.TRIM && t !== CMD.CACHE && t !== CMD.WRITE_ZEROES && t !== CMD.BLOCK_STATUS) {
    return NBD_ERR.EINVAL;
  }
  if ((req.flags & ~KNOWN_FLAGS) !== 0 || (req.flags & ~allowedFlags(t, e)) !== 0) return NBD_ERR.EINVAL;
  if (t === CMD.DISC) return 0;
  if (t === CMD.FLUSH) return req.offset === 0 && req.length === 0 ? 0 : NBD_ERR.EINVAL;
  const writes = t === CMD.WRITE || t === CMD.TRIM || t === CMD.WRITE_ZEROES;
  if (writes && !e.writable) return NBD_ERR.EPERM;
  if (t === CMD.BLOCK_STATUS && (!e.metaContext || req.length === 0)) return NBD_ERR.EINVAL;
  if (e.minBlock > 1 && (req.offset % e.minBlock !== 0 || req.length % e.minBlock !== 0)) return NBD_ERR.EINVAL;
  if (!Number.isSafeInteger(req.offset) || req.offset + req.length > e.size) {
    return t === CMD.WRITE || t === CMD.WRITE_ZEROES ? NBD_ERR.ENOSPC : NBD_ERR.EINVAL;
  }
  if ((t === CMD.READ || t === CMD.WRITE) && req.length > e.maxPayload) return NBD_ERR.EINVAL;
  return 0;
}

/** A WRITE payload above this cannot be buffered safely: the connection is dropped instead. */
export const HARD_PAYLOAD_LIMIT = MAX_PAYLOAD;
