// Parameters of the emulated link and the quantities derived from them: the relay's queue
// limit per connection and direction, and the size of the pieces the serializer paces.

import { WanemError } from './errors.js';

export interface WanParams {
  /** One-way propagation delay of each direction, in ms (RTT = 2 × delayMs). 0: none. */
  delayMs: number;
  /** Rate of each direction in Mbit/s (10^6 payload bits per second), shared by every connection. 0: unlimited. */
  rateMbit: number;
  /** Each piece waits a further uniform random 0..jitterMs; never reorders a connection's bytes. 0: none. */
  jitterMs: number;
  /** Every stallEverySec seconds, hold all bytes in both directions for stallForSec. 0: never. */
  stallEverySec: number;
  stallForSec: number;
  /** Every resetEverySec seconds, reset every relayed connection. 0: never. */
  resetEverySec: number;
  /** Relay buffer per connection and direction, in bytes, before the source is paused. 0: automatic. */
  queueBytes: number;
}

export const DEFAULT_PARAMS: Readonly<WanParams> = {
  delayMs: 0,
  rateMbit: 0,
  jitterMs: 0,
  stallEverySec: 0,
  stallForSec: 0,
  resetEverySec: 0,
  queueBytes: 0,
};

/** Smallest automatic queue limit. */
export const QUEUE_FLOOR_BYTES = 256 * 1024;
/** Automatic queue limit when the rate is unlimited, and the cap of any automatic limit. */
export const QUEUE_UNLIMITED_BYTES = 16 * 1024 * 1024;
export const QUEUE_CAP_BYTES = 64 * 1024 * 1024;
/** The margin over the bandwidth-delay product: at least this, or 20 ms of link time. */
export const QUEUE_MARGIN_BYTES = 64 * 1024;
export const QUEUE_MARGIN_MS = 20;
/** Largest piece the serializer paces; smaller at low rates (one millisecond of link time). */
export const PIECE_MAX_BYTES = 16 * 1024;
export const PIECE_MIN_BYTES = 1024;
/**
 * How far a queue can overshoot its limit: the source is paused once the limit is reached, but
 * the read that reached it is already in memory (Node reads a socket at most 64 KiB at a time).
 */
export const READ_OVERSHOOT_BYTES = 64 * 1024;

/** Payload bytes per millisecond of link time; 0 when unlimited. */
export function bytesPerMs(p: Pick<WanParams, 'rateMbit'>): number {
  return p.rateMbit * 125;
}

/**
 * The pause threshold of one connection in one direction. Automatic: one bandwidth-delay
 * product (rate × RTT, jitter included) plus a margin of max(64 KiB, 20 ms at the rate),
 * at least 256 KiB and at most 64 MiB; 16 MiB when the rate is unlimited.
 */
export function queueLimitBytes(p: WanParams): number {
  if (p.queueBytes > 0) return p.queueBytes;
  const rate = bytesPerMs(p);
  if (rate === 0) return QUEUE_UNLIMITED_BYTES;
  const bdp = rate * 2 * (p.delayMs + p.jitterMs);
  const margin = Math.max(QUEUE_MARGIN_BYTES, rate * QUEUE_MARGIN_MS);
  return Math.min(QUEUE_CAP_BYTES, Math.max(QUEUE_FLOOR_BYTES, Math.ceil(bdp + margin)));
}

/** A paused source resumes once its queue is down to three quarters of the limit. */
export function queueResumeBytes(p: WanParams): number {
  return Math.floor((queueLimitBytes(p) * 3) / 4);
}

/** Largest piece to pace, or Infinity when the rate is unlimited (chunks pass as read). */
export function pieceBytes(p: Pick<WanParams, 'rateMbit'>): number {
  const rate = bytesPerMs(p);
  if (rate === 0) return Infinity;
  return Math.min(PIECE_MAX_BYTES, Math.max(PIECE_MIN_BYTES, Math.round(rate)));
}

function check(ok: boolean, message: string): void {
  if (!ok) throw new WanemError('SPW_ERR_WANEM_PARAM', message);
}

/** Complete `partial` with `base` and check the result; throws WanemError SPW_ERR_WANEM_PARAM. */
export function resolveParams(partial: Partial<WanParams>, base: Readonly<WanParams> = DEFAULT_PARAMS): WanParams {
  const p: WanParams = { ...base };
  for (const [k, v] of Object.entries(partial) as [keyof WanParams, number | undefined][]) if (v !== undefined) p[k] = v;
  for (const [k, v] of Object.entries(p)) check(typeof v === 'number' && Number.isFinite(v) && v >= 0, `${k} must be a finite number ≥ 0 (got ${String(v)})`);
  check(Number.isInteger(p.queueBytes), `queueBytes must be an integer (got ${p.queueBytes})`);
  check((p.stallEverySec > 0) === (p.stallForSec > 0), 'stall every and stall for go together: give both or neither');
  check(p.stallForSec < p.stallEverySec || p.stallEverySec === 0, `a stall (${p.stallForSec} s) must be shorter than its period (${p.stallEverySec} s)`);
  return p;
}
