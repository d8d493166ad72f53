// The remote role's connections to one peer edge (the one that owns the volumes): several
// mutual-TLS link connections, each redialled with exponential backoff and jitter when it
// drops. Requests go out on any ready connection; when none is ready, callers wait (guest I/O
// stalls instead of failing) until their own deadline.

import { EventEmitter } from 'node:events';

import { LinkConnection } from '../../link/connection.js';
import type { LinkMessage } from '../../link/codec.js';
import { dialLink, LinkAuthError, type LinkTlsMaterial } from '../../link/tls.js';
import type { Logger } from '../../log/logger.js';

export interface PeerClientOptions {
  /** the peer's edge name: its certificate must carry it. */
  name: string;
  host: string;
  port: number;
  tls: LinkTlsMaterial;
  site: string;
  edgeId: string;
  connections: number;
  /** bytes of chunk frames the peer may have in flight towards us, per connection. */
  window: number;
  onMessage: (msg: LinkMessage, conn: LinkConnection) => void | Promise<void>;
  log: Logger;
  backoffInitialMs?: number;
  backoffMaxMs?: number;
}

export class PeerUnavailableError extends Error {
  readonly code = 'SPW_ERR_LINK_UNAVAILABLE';
  constructor(message: string) {
    super(message);
    this.name = 'PeerUnavailableError';
  }
}

export class PeerClient extends EventEmitter {
  private readonly ready = new Set<LinkConnection>();
  private readonly dialing = new Set<number>();
  private stopped = false;
  /** dialers sleeping through their backoff; kick() wakes them. */
  private readonly sleepers = new Set<() => void>();
  private lastKick = 0;
  private rr = 0;
  private lastError = '';
  reconnects = 0;

  constructor(readonly opts: PeerClientOptions) {
    super();
    this.setMaxListeners(0);
  }

  get connected(): boolean {
    return this.ready.size > 0;
  }

  get connectionCount(): number {
    return this.ready.size;
  }

  get lastErrorMessage(): string {
    return this.lastError;
  }

  start(): void {
    for (let slot = 0; slot < this.opts.connections; slot++) void this.keepDialing(slot);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const c of this.ready) c.close();
    this.ready.clear();
  }

  /** Send on a ready connection (round robin). False when none is ready; then the dialers
   *  are told to retry now rather than at the end of a long backoff, since someone waits. */
  send(msg: LinkMessage): boolean {
    const conns = [...this.ready];
    if (conns.length === 0) {
      this.kick();
      return false;
    }
    const c = conns[this.rr++ % conns.length]!;
    return c.send(msg);
  }

  /** A ready connection (round robin), for a sender that pins a sequence of frames to one. */
  pick(): LinkConnection | undefined {
    const conns = [...this.ready];
    if (conns.length === 0) {
      this.kick();
      return undefined;
    }
    return conns[this.rr++ % conns.length];
  }

  /** Cut the dialers' backoff short (at most twice a second): work is waiting for the link. */
  kick(): void {
    const now = Date.now();
    if (now - this.lastKick < 500) return;
    this.lastKick = now;
    for (const wake of this.sleepers) wake();
    this.sleepers.clear();
  }

  /** Resolves when at least one connection is ready; rejects on abort. */
  whenConnected(signal?: AbortSignal): Promise<void> {
    if (this.connected) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const onUp = () => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      };
      const onAbort = () => {
        this.off('up', onUp);
        reject(new PeerUnavailableError(`peer ${this.opts.name} (${this.opts.host}:${this.opts.port}) is unreachable${this.lastError ? `: ${this.lastError}` : ''}`));
      };
      this.once('up', onUp);
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  private async keepDialing(slot: number): Promise<void> {
    const initial = this.opts.backoffInitialMs ?? 200;
    const max = this.opts.backoffMaxMs ?? 10000;
    let delay = initial;
    while (!this.stopped) {
      this.dialing.add(slot);
      const started = Date.now();
      try {
        const sock = await dialLink(this.opts.tls, { host: this.opts.host, port: this.opts.port }, this.opts.name);
        if (this.stopped) {
          sock.destroy();
          return;
        }
        const conn = new LinkConnection(sock, { site: this.opts.site, edgeId: this.opts.edgeId, window: this.opts.window, onMessage: this.opts.onMessage });
        conn.once('ready', () => {
          const wasUp = this.connected;
          this.ready.add(conn);
          this.opts.log('info', 'link connected', { peer: this.opts.name, slot, connections: this.ready.size });
          if (!wasUp) this.emit('up');
          this.emit('connection', conn);
        });
        conn.on('protocol-error', (err: Error) => this.opts.log('warn', 'link protocol error', { peer: this.opts.name, err: err.message }));
        await conn.run();
        const had = this.ready.delete(conn);
        if (!conn.peer) {
          // TLS 1.3 finishes the client's handshake before the server has checked our
          // certificate: a refusal shows up as a close before the peer's HELLO.
          throw new Error('the peer closed the link before its HELLO: it probably refused our certificate (is it signed by the CA the peer trusts?)');
        }
        if (had) {
          this.reconnects++;
          this.opts.log('warn', 'link connection lost', { peer: this.opts.name, slot, connections: this.ready.size });
          if (!this.connected) this.emit('down');
        }
        if (Date.now() - started > 5000) delay = initial;
      } catch (err) {
        this.lastError = (err as Error).message;
        this.opts.log(err instanceof LinkAuthError ? 'error' : 'warn', 'link dial failed', { peer: this.opts.name, slot, err: this.lastError, retryInMs: delay });
      } finally {
        this.dialing.delete(slot);
      }
      if (this.stopped) return;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(wake, delay * (0.75 + Math.random() / 2));
        timer.unref();
        function wake(): void {
          clearTimeout(timer);
          resolve();
        }
        this.sleepers.add(wake);
      });
      delay = Math.min(max, delay * 2);
    }
  }
}
