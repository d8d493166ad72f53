// One direction of the emulated link, as a deterministic state machine over time: no sockets,
// no timers. The runner (emulator.ts) feeds it bytes with send(), moves it with advance(now),
// takes arrived bytes with take(flow, now) when the destination can accept them, and sleeps
// until nextEventAt().
//
// Model: every connection going this way is a Flow. Bytes are cut into pieces and queued in one
// FIFO shared by all flows, like the queue in front of a router's bottleneck link. The serializer
// sends one piece at a time at the link rate (virtual time, so late timers never lose rate); a
// piece that has left the serializer propagates for delayMs plus a random 0..jitterMs, clamped so
// it never arrives before the previous piece of its flow (jitter never reorders a connection).
// While stalled, nothing is serialized and nothing is delivered; bytes stay where they are.

import { Fifo } from './fifo.js';
import { bytesPerMs, pieceBytes, type WanParams } from './params.js';

/** Times this close count as equal: absorbs floating-point rounding of `now + (at - now)`. */
const TIME_EPSILON_MS = 1e-6;

export type LinkParams = Pick<WanParams, 'rateMbit' | 'delayMs' | 'jitterMs'>;

export interface Piece {
  readonly flow: Flow;
  /** Payload, or null for the end of the stream (a FIN: it travels like a zero-byte piece). */
  readonly data: Buffer | null;
  readonly enqueuedAt: number;
  /** Set when the piece leaves the serializer. */
  arrivesAt: number;
}

/** One connection in one direction. */
export class Flow {
  /** Serialized pieces, propagating; arrival times never decrease. */
  readonly inFlight = new Fifo<Piece>();
  /** Bytes of this flow in the model: queued for the serializer or propagating. */
  queuedBytes = 0;
  /** The end of the stream has been sent into the model. */
  ended = false;
  closed = false;
  lastArrival = -Infinity;

  constructor(readonly id: number) {}

  /** When the next piece arrives (it may already have), or undefined when none is propagating. */
  nextArrival(): number | undefined {
    return this.inFlight.peek()?.arrivesAt;
  }
}

export class LinkModel {
  private readonly waiting = new Fifo<Piece>();
  private busyUntil = -Infinity;
  private resumedAt = -Infinity;
  private stalledNow = false;
  private params: LinkParams;
  private maxPiece: number;
  /** Bytes in the model, all flows. */
  queuedBytes = 0;
  /** Pieces serialized plus pieces taken since creation: the runner's measure of progress. */
  moves = 0;
  /** The most any one flow has had queued. */
  peakFlowQueuedBytes = 0;

  constructor(
    params: LinkParams,
    private readonly random: () => number = Math.random,
  ) {
    this.params = { ...params };
    this.maxPiece = pieceBytes(params);
  }

  /** New parameters apply to pieces serialized from now on. */
  setParams(params: LinkParams): void {
    this.params = { ...params };
    this.maxPiece = pieceBytes(params);
  }

  get stalled(): boolean {
    return this.stalledNow;
  }

  stall(): void {
    this.stalledNow = true;
  }

  /** End a stall: the serializer starts again from `now`, arrived pieces can be taken. */
  resume(now: number): void {
    if (!this.stalledNow) return;
    this.stalledNow = false;
    this.resumedAt = now;
  }

  /** Queue `data` behind everything already on the link, cut into pieces. */
  send(flow: Flow, data: Buffer, now: number): void {
    if (flow.closed || flow.ended || data.length === 0) return;
    const size = this.maxPiece;
    if (data.length <= size) this.push(flow, data, now);
    else for (let off = 0; off < data.length; off += size) this.push(flow, data.subarray(off, Math.min(off + size, data.length)), now);
    if (flow.queuedBytes > this.peakFlowQueuedBytes) this.peakFlowQueuedBytes = flow.queuedBytes;
  }

  /** Queue the end of `flow`'s stream behind its bytes. */
  sendEnd(flow: Flow, now: number): void {
    if (flow.closed || flow.ended) return;
    this.push(flow, null, now);
    flow.ended = true;
  }

  private push(flow: Flow, data: Buffer | null, now: number): void {
    this.waiting.push({ flow, data, enqueuedAt: now, arrivesAt: Infinity });
    const n = data?.length ?? 0;
    flow.queuedBytes += n;
    this.queuedBytes += n;
  }

  /** Serialize every piece whose turn on the link starts by `now`. */
  advance(now: number): void {
    if (this.stalledNow) return;
    const rate = bytesPerMs(this.params);
    const { delayMs, jitterMs } = this.params;
    for (;;) {
      const piece = this.waiting.peek();
      if (!piece) return;
      const start = Math.max(this.busyUntil, piece.enqueuedAt, this.resumedAt);
      if (start > now + TIME_EPSILON_MS) return;
      this.waiting.shift();
      this.moves++;
      const bytes = piece.data?.length ?? 0;
      const done = rate > 0 ? start + bytes / rate : start;
      this.busyUntil = done;
      const jitter = jitterMs > 0 ? this.random() * jitterMs : 0;
      const flow = piece.flow;
      piece.arrivesAt = Math.max(done + delayMs + jitter, flow.lastArrival);
      flow.lastArrival = piece.arrivesAt;
      flow.inFlight.push(piece);
    }
  }

  /** The next piece of `flow` if it has arrived by `now` and the link is not stalled; removes it. */
  take(flow: Flow, now: number): Piece | undefined {
    if (this.stalledNow) return undefined;
    const head = flow.inFlight.peek();
    if (!head || head.arrivesAt > now + TIME_EPSILON_MS) return undefined;
    flow.inFlight.shift();
    this.moves++;
    const n = head.data?.length ?? 0;
    flow.queuedBytes -= n;
    this.queuedBytes -= n;
    return head;
  }

  /** When the serializer can next make progress (after advance(now)), or undefined. */
  nextSerializationAt(): number | undefined {
    if (this.stalledNow) return undefined;
    const piece = this.waiting.peek();
    if (!piece) return undefined;
    return Math.max(this.busyUntil, piece.enqueuedAt, this.resumedAt);
  }

  /** Forget a flow (its connection is gone): its pieces are dropped and use no more link time. */
  close(flow: Flow): void {
    if (flow.closed) return;
    flow.closed = true;
    this.waiting.removeWhere((p) => p.flow === flow);
    flow.inFlight.clear();
    this.queuedBytes -= flow.queuedBytes;
    flow.queuedBytes = 0;
  }
}
