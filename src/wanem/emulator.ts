// The WAN emulator: a TCP relay that puts an emulated link between its clients and one target.
// This file is the runner: sockets and timers. The link itself (pacing, propagation, jitter,
// stalls) is the deterministic LinkModel, one per direction, shared by every connection going
// that way.
//
// Per connection and direction, bytes are read from the source socket into the model, and taken
// out of it when they have arrived and the destination socket accepts writes. A source is paused
// once its bytes in the relay reach the queue limit and resumed at three quarters of it; a
// destination whose write() returned false gets nothing more until 'drain'. The end of a stream
// travels the link behind its bytes; an error or reset on one side resets the other.

import net, { type Socket } from 'node:net';

import { createLogger, type Logger } from '../log/logger.js';
import { systemClock, type Clock, type TimerHandle } from './clock.js';
import { WanemError } from './errors.js';
import { Flow, LinkModel } from './link-model.js';
import { formatHostPort, type HostPort } from './address.js';
import { queueLimitBytes, queueResumeBytes, READ_OVERSHOOT_BYTES, resolveParams, type WanParams } from './params.js';
import type { DirectionCounts, WanStats } from './stats.js';

export interface WanEmulatorOptions extends Partial<WanParams> {
  /** Where to listen; port 0 picks a free port (see address() after start()). */
  listen: HostPort;
  /** Where every accepted connection is relayed to. */
  target: HostPort;
  /** Time source for pacing, delays and schedules (default: performance.now and setTimeout). */
  clock?: Clock;
  /** Random numbers in [0, 1) for jitter (default Math.random). */
  random?: () => number;
  log?: Logger;
}

type Direction = keyof DirectionCounts;

/** Each socket's Node-side write buffer: write() returns false past this. */
const SOCKET_HIGH_WATER_MARK = 64 * 1024;

/** One connection in one direction. */
class Pipe {
  /** We paused the source because its queue is full. */
  paused = false;
  /** The destination's write() returned false; waiting for 'drain'. */
  blocked = false;
  /** The end of the stream has been delivered (dest.end() called). */
  done = false;

  constructor(
    readonly dir: Direction,
    readonly link: LinkModel,
    readonly flow: Flow,
    readonly source: Socket,
    readonly dest: Socket,
    /** The destination is connected. */
    public ready: boolean,
  ) {}
}

/** One relayed connection: the client's socket, ours to the target, and a pipe each way. */
class Relay {
  closed = false;
  openSockets = 2;
  targetConnected = false;
  readonly up: Pipe;
  readonly down: Pipe;

  constructor(
    readonly id: number,
    readonly client: Socket,
    readonly target: Socket,
    links: Record<Direction, LinkModel>,
  ) {
    this.up = new Pipe('clientToTarget', links.clientToTarget, new Flow(id), client, target, false);
    this.down = new Pipe('targetToClient', links.targetToClient, new Flow(id), target, client, true);
  }
}

export class WanEmulator {
  private readonly clock: Clock;
  private readonly log: Logger;
  private readonly target: HostPort;
  private readonly listenAt: HostPort;
  private paramsNow: WanParams;
  private limit: number;
  private resumeAt: number;
  private readonly links: Record<Direction, LinkModel>;
  private readonly relays = new Set<Relay>();
  private server: net.Server | null = null;
  private bound: HostPort | null = null;
  private startedAt = 0;
  private nextId = 0;
  private stopping = false;

  private wake: { at: number; timer: TimerHandle } | null = null;
  private pumping = false;
  private pumpAgain = false;
  private stallTimer: TimerHandle | null = null;
  private resetTimer: TimerHandle | null = null;

  private readonly delivered: DirectionCounts = { clientToTarget: 0, targetToClient: 0 };
  private readonly received: DirectionCounts = { clientToTarget: 0, targetToClient: 0 };
  private accepted = 0;
  private failed = 0;
  private connectionsReset = 0;
  private stalls = 0;
  private resets = 0;

  constructor(opts: WanEmulatorOptions) {
    const { listen, target, clock, random, log, ...params } = opts;
    this.paramsNow = resolveParams(params);
    this.listenAt = { ...listen };
    this.target = { ...target };
    this.clock = clock ?? systemClock;
    this.log = log ?? createLogger('wanem');
    this.limit = queueLimitBytes(this.paramsNow);
    this.resumeAt = queueResumeBytes(this.paramsNow);
    this.links = {
      clientToTarget: new LinkModel(this.paramsNow, random),
      targetToClient: new LinkModel(this.paramsNow, random),
    };
  }

  get params(): Readonly<WanParams> {
    return { ...this.paramsNow };
  }

  /** Pause threshold of one connection in one direction, in bytes. */
  get queueLimitBytes(): number {
    return this.limit;
  }

  /** The address actually listened on (after start()). */
  address(): HostPort {
    if (!this.bound) throw new WanemError('SPW_ERR_WANEM_STATE', 'the emulator is not listening: call start() first');
    return { ...this.bound };
  }

  async start(): Promise<HostPort> {
    if (this.server) throw new WanemError('SPW_ERR_WANEM_STATE', 'the emulator is already started');
    const server = net.createServer({ allowHalfOpen: true, noDelay: true, highWaterMark: SOCKET_HIGH_WATER_MARK }, (s) => this.accept(s));
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.listenAt.port, this.listenAt.host, () => {
        server.off('error', reject);
        resolve();
      });
    }).catch((err: unknown) => {
      this.server = null;
      throw err;
    });
    server.on('error', (err) => this.log('error', 'listener failed', { error: err.message }));
    const addr = server.address();
    this.bound = typeof addr === 'object' && addr ? { host: addr.address, port: addr.port } : { ...this.listenAt };
    this.startedAt = this.clock.now();
    this.scheduleStall(this.paramsNow.stallEverySec * 1000);
    this.scheduleResets();
    this.log('info', 'relaying', { listen: formatHostPort(this.bound), target: formatHostPort(this.target), ...this.paramsNow, queueLimitBytes: this.limit });
    return this.address();
  }

  /** Stop listening, destroy every relayed connection and cancel every timer. Idempotent. */
  async stop(): Promise<void> {
    if (this.stopping || !this.server) return;
    this.stopping = true;
    const server = this.server;
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    for (const r of [...this.relays]) this.abort(r, false);
    this.endStall();
    this.stallTimer?.cancel();
    this.resetTimer?.cancel();
    this.wake?.timer.cancel();
    this.stallTimer = this.resetTimer = null;
    this.wake = null;
    await closed;
    this.log('info', 'stopped', { ...this.counters() });
  }

  /**
   * Change parameters while running. Rate, delay and jitter apply to bytes serialized from now
   * on; a new queue limit applies at once; new stall or reset periods restart their schedule now.
   */
  setParams(partial: Partial<WanParams>): void {
    const old = this.paramsNow;
    const next = resolveParams(partial, old);
    this.paramsNow = next;
    this.limit = queueLimitBytes(next);
    this.resumeAt = queueResumeBytes(next);
    for (const link of Object.values(this.links)) link.setParams(next);
    if (this.server && !this.stopping) {
      if (next.stallEverySec !== old.stallEverySec || next.stallForSec !== old.stallForSec) {
        this.stallTimer?.cancel();
        this.endStall();
        this.scheduleStall(this.paramsNow.stallEverySec * 1000);
      }
      if (next.resetEverySec !== old.resetEverySec) {
        this.resetTimer?.cancel();
        this.scheduleResets();
      }
    }
    this.log('info', 'parameters changed', { ...next, queueLimitBytes: this.limit });
    this.pump();
  }

  stats(): WanStats {
    const queued = { clientToTarget: this.links.clientToTarget.queuedBytes, targetToClient: this.links.targetToClient.queuedBytes };
    return {
      listen: formatHostPort(this.bound ?? this.listenAt),
      target: formatHostPort(this.target),
      params: { ...this.paramsNow },
      uptimeMs: this.server ? Math.round(this.clock.now() - this.startedAt) : 0,
      bytes: { ...this.delivered },
      bytesReceived: { ...this.received },
      queuedBytes: queued,
      queue: {
        limitBytes: this.limit,
        boundBytes: this.limit + READ_OVERSHOOT_BYTES,
        peakBytes: Math.max(this.links.clientToTarget.peakFlowQueuedBytes, this.links.targetToClient.peakFlowQueuedBytes),
      },
      connections: { accepted: this.accepted, active: this.relays.size, failed: this.failed, reset: this.connectionsReset },
      stalls: this.stalls,
      stalled: this.links.clientToTarget.stalled,
      resets: this.resets,
    };
  }

  private counters(): Record<string, unknown> {
    const s = this.stats();
    return { bytes: s.bytes, connections: s.connections, stalls: s.stalls, resets: s.resets };
  }

  /** Reset every relayed connection now (what --reset-every does on its schedule). */
  resetConnections(): number {
    const n = this.relays.size;
    this.resets++;
    this.connectionsReset += n;
    for (const r of [...this.relays]) this.abort(r, true);
    this.log('info', 'reset every connection', { connections: n, resets: this.resets });
    return n;
  }

  // ---- connections ----

  private accept(client: Socket): void {
    if (this.stopping) {
      client.destroy();
      return;
    }
    const id = ++this.nextId;
    this.accepted++;
    // Duplex options reach the socket at run time; @types/node only lists the socket ones.
    const target = new net.Socket({ allowHalfOpen: true, writableHighWaterMark: SOCKET_HIGH_WATER_MARK } as net.SocketConstructorOpts);
    target.connect({ host: this.target.host, port: this.target.port, noDelay: true });
    const relay = new Relay(id, client, target, this.links);
    this.relays.add(relay);
    this.log('debug', 'connection', { id, from: `${client.remoteAddress}:${client.remotePort}` });

    target.once('connect', () => {
      relay.targetConnected = true;
      relay.up.ready = true;
      this.pump();
    });
    this.wire(relay, relay.up);
    this.wire(relay, relay.down);
    for (const [side, socket] of [['client', client], ['target', target]] as const) {
      socket.on('error', (err: NodeJS.ErrnoException) => this.onError(relay, side, err));
      socket.on('close', (hadError) => this.onClose(relay, side, hadError));
    }
  }

  private wire(relay: Relay, pipe: Pipe): void {
    pipe.source.on('data', (chunk: Buffer) => {
      if (relay.closed) return;
      this.received[pipe.dir] += chunk.length;
      pipe.link.send(pipe.flow, chunk, this.clock.now());
      this.pump();
      if (!pipe.paused && pipe.flow.queuedBytes >= this.limit) {
        pipe.paused = true;
        pipe.source.pause();
      }
    });
    pipe.source.on('end', () => {
      if (relay.closed) return;
      pipe.link.sendEnd(pipe.flow, this.clock.now());
      this.pump();
    });
    pipe.dest.on('drain', () => {
      pipe.blocked = false;
      this.pump();
    });
  }

  private onError(relay: Relay, side: 'client' | 'target', err: NodeJS.ErrnoException): void {
    if (relay.closed) return;
    if (side === 'target' && !relay.targetConnected) {
      this.failed++;
      this.log('warn', 'cannot reach the target; resetting the client', { id: relay.id, target: formatHostPort(this.target), error: err.code ?? err.message });
    } else {
      this.log('debug', 'socket error; resetting the other side', { id: relay.id, side, error: err.code ?? err.message });
    }
    this.abort(relay, true);
  }

  private onClose(relay: Relay, side: 'client' | 'target', hadError: boolean): void {
    relay.openSockets--;
    if (relay.closed) return;
    // A socket closes cleanly once we have read its end and delivered the end to it. Then the
    // other direction carries on; anything else means the connection is broken.
    const from = side === 'client' ? relay.up : relay.down;
    const into = side === 'client' ? relay.down : relay.up;
    if (hadError || !from.flow.ended || !into.done) {
      this.abort(relay, hadError);
      return;
    }
    if (relay.openSockets === 0) this.finish(relay);
  }

  private finish(relay: Relay): void {
    relay.closed = true;
    this.relays.delete(relay);
    relay.up.link.close(relay.up.flow);
    relay.down.link.close(relay.down.flow);
    this.log('debug', 'connection closed', { id: relay.id });
  }

  /** Close both sides now; with `reset`, as a TCP reset (RST) where the socket is connected. */
  private abort(relay: Relay, reset: boolean): void {
    if (relay.closed) return;
    this.finish(relay);
    for (const s of [relay.client, relay.target]) {
      if (s.destroyed) continue;
      if (reset && !s.connecting) s.resetAndDestroy();
      else s.destroy();
    }
  }

  // ---- the pump: move bytes through the links, then sleep until the next event ----

  /** `woken`: called by the wake-up timer rather than by socket events. */
  private pump(woken = false): void {
    if (this.pumping) {
      this.pumpAgain = true;
      return;
    }
    this.pumping = true;
    try {
      let first = true;
      do {
        this.pumpAgain = false;
        this.pumpOnce(woken && first);
        first = false;
      } while (this.pumpAgain);
    } finally {
      this.pumping = false;
    }
  }

  private pumpOnce(woken: boolean): void {
    const now = this.clock.now();
    const before = this.links.clientToTarget.moves + this.links.targetToClient.moves;
    this.links.clientToTarget.advance(now);
    this.links.targetToClient.advance(now);
    let next = Infinity;
    for (const relay of this.relays) {
      for (const pipe of [relay.up, relay.down]) {
        this.deliver(pipe, now);
        if (pipe.paused && pipe.flow.queuedBytes <= this.resumeAt) {
          pipe.paused = false;
          pipe.source.resume();
        }
        if (pipe.ready && !pipe.blocked && !pipe.link.stalled) {
          const at = pipe.flow.nextArrival();
          if (at !== undefined && at < next) next = at;
        }
      }
    }
    for (const link of Object.values(this.links)) {
      const at = link.nextSerializationAt();
      if (at !== undefined && at < next) next = at;
    }
    const progressed = this.links.clientToTarget.moves + this.links.targetToClient.moves !== before;
    this.sleepUntil(next, now, woken && !progressed);
  }

  private deliver(pipe: Pipe, now: number): void {
    if (!pipe.ready || pipe.blocked || pipe.done) return;
    let corked = false;
    for (;;) {
      const piece = pipe.link.take(pipe.flow, now);
      if (!piece) break;
      if (piece.data === null) {
        pipe.done = true;
        pipe.dest.end();
        break;
      }
      if (!corked) {
        pipe.dest.cork();
        corked = true;
      }
      this.delivered[pipe.dir] += piece.data.length;
      if (!pipe.dest.write(piece.data)) {
        pipe.blocked = true;
        break;
      }
    }
    if (corked) pipe.dest.uncork();
  }

  /**
   * Sleep until `at`. Timers have 1 ms granularity and can fire early; when one woke us too
   * soon for less than a millisecond, poll on the next loop turns instead of sleeping a whole
   * further millisecond (so a small message's delay stays close to the configured one).
   */
  private sleepUntil(at: number, now: number, polled: boolean): void {
    if (this.wake && this.wake.at <= at) return;
    this.wake?.timer.cancel();
    this.wake = null;
    if (at === Infinity || this.stopping) return;
    const wait = at - now;
    const timer = this.clock.setTimer(
      () => {
        this.wake = null;
        this.pump(true);
      },
      polled && wait < 1 ? 0 : wait,
    );
    this.wake = { at, timer };
  }

  // ---- schedules ----

  /** The next stall begins `inMs` from now; after it, one every stallEverySec. */
  private scheduleStall(inMs: number): void {
    this.stallTimer = null;
    const { stallEverySec, stallForSec } = this.paramsNow;
    if (stallEverySec <= 0) return;
    this.stallTimer = this.clock.setTimer(() => {
      this.stalls++;
      for (const link of Object.values(this.links)) link.stall();
      this.log('debug', 'stall', { forSec: stallForSec, stalls: this.stalls });
      this.stallTimer = this.clock.setTimer(() => {
        this.endStall();
        this.scheduleStall((stallEverySec - stallForSec) * 1000);
      }, stallForSec * 1000);
    }, inMs);
  }

  private endStall(): void {
    if (!this.links.clientToTarget.stalled) return;
    const now = this.clock.now();
    for (const link of Object.values(this.links)) link.resume(now);
    this.log('debug', 'stall over');
    this.pump();
  }

  private scheduleResets(): void {
    this.resetTimer = null;
    const every = this.paramsNow.resetEverySec;
    if (every <= 0) return;
    this.resetTimer = this.clock.setTimer(() => {
      this.resetConnections();
      this.scheduleResets();
    }, every * 1000);
  }
}
