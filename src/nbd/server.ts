// NBD fixed-newstyle server: the runner around codec.ts. Negotiation (GO, INFO, LIST, ABORT,
// EXPORT_NAME, STRUCTURED_REPLY, LIST/SET_META_CONTEXT base:allocation, STARTTLS), then
// pipelined transmission answered out of order over BlockDevice exports. Each connection bounds
// its in-flight requests and payload bytes, and stops reading while the client is not reading
// replies. Malformed input ends only the connection that sent it.

import { EventEmitter } from 'node:events';
import net from 'node:net';
import tls from 'node:tls';
import type { Duplex } from 'node:stream';

import { BufferPool } from '../block/buffer-pool.js';
import { blockStatusOf, toBlockError, type BlockDevice } from '../block/device.js';
import { ByteReader, StreamClosedError } from '../stream/byte-reader.js';
import {
  decodeClientFlags,
  decodeOptionHeader,
  decodeRequest,
  encodeBlockStatusPayload,
  encodeErrorPayload,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContextReply,
  encodeOptionReply,
  encodeServerEntry,
  encodeServerGreeting,
  encodeSimpleReply,
  encodeStructuredHeader,
  NEED_MORE,
  NbdProtocolError,
  parseGoInfo,
  parseMetaContext,
  type RequestHeader,
} from './codec.js';
import { nbdErrorOf } from './errors.js';
import {
  CLIENT_FLAG_FIXED_NEWSTYLE,
  CLIENT_FLAG_NO_ZEROES,
  CMD,
  CMD_FLAG,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  INFO,
  MAX_OPTION_LENGTH,
  MAX_PAYLOAD,
  META_CONTEXT_BASE_ALLOCATION,
  NBD_ERR,
  OPT,
  OPTION_HEADER_SIZE,
  REP,
  REP_ERR_,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  REQUEST_SIZE,
  SIMPLE_REPLY_SIZE,
  STATE_HOLE,
  STATE_ZERO,
  STRUCTURED_REPLY_HEADER_SIZE,
  TFLAG,
} from './protocol.js';
import { HARD_PAYLOAD_LIMIT, validateRequest, type NegotiatedExport } from './validate.js';

export interface NbdExport {
  name: string;
  description?: string;
  device: BlockDevice;
}

export interface NbdTlsOptions {
  key: Buffer | string;
  cert: Buffer | string;
  /** When set, clients must present a certificate signed by this CA. */
  ca?: Buffer | string;
}

export interface NbdServerOptions {
  exports: NbdExport[];
  /** FORCEDTLS: when set, nothing but STARTTLS (and ABORT) is allowed before TLS. */
  tls?: NbdTlsOptions;
  /** Requests in flight per connection before the server stops reading (default 128). */
  maxInFlight?: number;
  /** Payload bytes of in-flight WRITEs per connection before the server stops reading. */
  maxInFlightBytes?: number;
  /** Pause reading while this many reply bytes wait to be sent to the client. */
  maxPendingReplyBytes?: number;
  /** Options accepted per connection before it is dropped (guards against option loops). */
  maxOptions?: number;
  log?: (level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;
}

const BASE_ALLOCATION_ID = 1;

class DisconnectError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DisconnectError';
  }
}

export class NbdServer extends EventEmitter {
  private readonly exportsByName = new Map<string, NbdExport>();
  private readonly connections = new Set<Connection>();
  private readonly listenSockets: net.Server[] = [];
  private readonly secureContext: tls.SecureContext | null;
  private stopping = false;
  /** READ reply buffers, shared by every connection and recycled once the socket has them. */
  readonly replyBuffers = new BufferPool();
  readonly opts: Required<Omit<NbdServerOptions, 'tls' | 'log'>> & Pick<NbdServerOptions, 'tls' | 'log'>;

  constructor(opts: NbdServerOptions) {
    super();
    for (const e of opts.exports) {
      if (this.exportsByName.has(e.name)) throw new Error(`duplicate export name "${e.name}"`);
      this.exportsByName.set(e.name, e);
    }
    this.opts = {
      maxInFlight: 128,
      maxInFlightBytes: 64 * 1024 * 1024,
      maxPendingReplyBytes: 16 * 1024 * 1024,
      maxOptions: 1024,
      ...opts,
    };
    this.secureContext = opts.tls ? tls.createSecureContext({ key: opts.tls.key, cert: opts.tls.cert, ca: opts.tls.ca, minVersion: 'TLSv1.2' }) : null;
  }

  /** Add an export while serving; it is visible to the next negotiation. */
  addExport(e: NbdExport): void {
    if (this.exportsByName.has(e.name)) throw new Error(`duplicate export name "${e.name}"`);
    this.exportsByName.set(e.name, e);
  }

  removeExport(name: string): NbdExport | undefined {
    const e = this.exportsByName.get(name);
    this.exportsByName.delete(name);
    return e;
  }

  get exports(): NbdExport[] {
    return [...this.exportsByName.values()];
  }

  /** The export a client gets for `name`; the empty name means the first (default) export. */
  findExport(name: string): NbdExport | undefined {
    return this.exportsByName.get(name) ?? (name === '' ? this.exportsByName.values().next().value : undefined);
  }

  /** Listen on TCP, a UNIX socket path, or an inherited fd (systemd socket activation). */
  listen(target: { port: number; host?: string } | { path: string } | { fd: number }): Promise<net.Server> {
    const srv = net.createServer({ noDelay: true }, (sock) => this.handle(sock));
    this.listenSockets.push(srv);
    return new Promise((resolve, reject) => {
      srv.once('error', reject);
      const done = () => {
        srv.off('error', reject);
        srv.on('error', (err) => this.log('error', 'listener error', { err: err.message }));
        resolve(srv);
      };
      if ('fd' in target) srv.listen({ fd: target.fd }, done);
      else if ('path' in target) srv.listen(target.path, done);
      else srv.listen(target.port, target.host, done);
    });
  }

  /** Serve one already-connected stream (a socket, stdin/stdout, a test pair). */
  handle(stream: Duplex): Promise<void> {
    if (this.stopping) {
      stream.destroy();
      return Promise.resolve();
    }
    const conn = new Connection(this, stream, this.secureContext);
    this.connections.add(conn);
    this.emit('connection');
    return conn.run().finally(() => {
      this.connections.delete(conn);
      this.emit('disconnect');
    });
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Connections on export `name`: negotiation chose it (GO or EXPORT_NAME). */
  connectionsTo(name: string): number {
    let n = 0;
    for (const c of this.connections) if (c.exportName === name) n++;
    return n;
  }

  /**
   * Close every connection in transmission on export `name` like close() does for all: requests
   * that arrive from now on get ESHUTDOWN, those in flight finish (bounded by `graceMs`), then
   * the connection closes. Remove the export first, or clients may connect again.
   */
  async disconnectExport(name: string, graceMs = 5000): Promise<number> {
    const conns = [...this.connections].filter((c) => c.exportName === name);
    await Promise.all(conns.map((c) => c.shutdown(graceMs)));
    return conns.length;
  }

  get isStopping(): boolean {
    return this.stopping;
  }

  /**
   * Stop: no new connections; requests that arrive from now on get ESHUTDOWN; requests in flight
   * finish (bounded by `graceMs`); then connections close and every export is flushed.
   */
  async close(graceMs = 5000): Promise<void> {
    this.stopping = true;
    await Promise.all(this.listenSockets.map((l) => new Promise<void>((r) => l.close(() => r()))));
    await Promise.all([...this.connections].map((c) => c.shutdown(graceMs)));
    for (const e of this.exportsByName.values()) {
      if (e.device.capabilities.writable) await e.device.flush().catch((err: unknown) => this.log('error', 'flush at shutdown failed', { export: e.name, err: String(err) }));
    }
  }

  log(level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void {
    this.opts.log?.(level, msg, fields);
  }
}

interface ActiveExport {
  exp: NbdExport;
  neg: NegotiatedExport;
  flags: number;
}

class Connection {
  private stream: Duplex;
  private reader: ByteReader;
  private tlsActive = false;
  private structured = false;
  private noZeroes = false;
  /** export name the last SET_META_CONTEXT referred to, and whether it selected base:allocation */
  private meta: { exportName: string; baseAllocation: boolean } | null = null;
  private inFlight = 0;
  private inFlightBytes = 0;
  private slotWaiter: (() => void) | null = null;
  private idle: Promise<void> = Promise.resolve();
  private idleResolve: (() => void) | null = null;
  private shuttingDown = false;
  /** the export this connection transmits on, once negotiation chose one (GO or EXPORT_NAME). */
  exportName: string | null = null;

  constructor(
    private readonly server: NbdServer,
    stream: Duplex,
    private readonly secureContext: tls.SecureContext | null,
  ) {
    this.stream = stream;
    this.reader = new ByteReader(stream);
    stream.on('error', () => {
      /* surfaced through the reader */
    });
  }

  async run(): Promise<void> {
    try {
      const active = await this.negotiate();
      if (active) await this.transmit(active);
    } catch (err) {
      if (!(err instanceof StreamClosedError)) {
        this.server.log(err instanceof NbdProtocolError || err instanceof DisconnectError ? 'warn' : 'error', 'connection dropped', { err: (err as Error).message });
      }
    } finally {
      await this.idle;
      this.stream.end();
      this.stream.destroy();
    }
  }

  /** Server stop: refuse new requests with ESHUTDOWN, let in-flight ones finish, then close. */
  async shutdown(graceMs: number): Promise<void> {
    this.shuttingDown = true;
    const timer = new Promise<void>((r) => setTimeout(r, graceMs).unref());
    await Promise.race([this.idle, timer]);
    this.stream.destroy();
  }

  private send(buf: Buffer, done?: () => void): void {
    // Replies that complete in one turn of the event loop leave in one writev: a socket write
    // costs about as much as handling a small request, so one per reply halves the request rate.
    if (!this.corked) {
      this.corked = true;
      this.stream.cork();
      process.nextTick(() => {
        this.corked = false;
        this.stream.uncork();
      });
    }
    this.stream.write(buf, done);
  }
  private corked = false;

  // ------------------------------------------------------------------------------ negotiation

  private async negotiate(): Promise<ActiveExport | null> {
    this.send(encodeServerGreeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    const cf = decodeClientFlags(await this.reader.read(4), 0);
    if (cf === NEED_MORE) throw new DisconnectError('unreachable');
    const clientFlags = cf.msg;
    if ((clientFlags & ~(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)) !== 0) {
      throw new DisconnectError(`client sent unknown handshake flags 0x${clientFlags.toString(16)}`);
    }
    this.noZeroes = (clientFlags & CLIENT_FLAG_NO_ZEROES) !== 0;

    for (let count = 0; ; count++) {
      if (count >= this.server.opts.maxOptions) throw new DisconnectError('too many options');
      const h = decodeOptionHeader(await this.reader.read(OPTION_HEADER_SIZE), 0);
      if (h === NEED_MORE) throw new DisconnectError('unreachable');
      const { option, length } = h.msg;
      if (length > MAX_OPTION_LENGTH) {
        if (option === OPT.EXPORT_NAME) throw new DisconnectError(`export name of ${length} bytes is too long`);
        await this.reader.skip(length);
        // FORCEDTLS: before STARTTLS, every option but STARTTLS/ABORT is answered TLS_REQD.
        if (this.secureContext && !this.tlsActive && option !== OPT.STARTTLS && option !== OPT.ABORT) this.reply(option, REP_ERR_.TLS_REQD, 'this server requires TLS: use STARTTLS');
        else this.reply(option, REP_ERR_.TOO_BIG, `option payload of ${length} bytes exceeds ${MAX_OPTION_LENGTH}`);
        continue;
      }
      const data = length > 0 ? await this.reader.read(length) : Buffer.alloc(0);

      if (this.secureContext && !this.tlsActive && option !== OPT.STARTTLS && option !== OPT.ABORT) {
        if (option === OPT.EXPORT_NAME) throw new DisconnectError('NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server');
        this.reply(option, REP_ERR_.TLS_REQD, 'this server requires TLS: use STARTTLS (e.g. an nbds:// URI with certificates)');
        continue;
      }

      switch (option) {
        case OPT.EXPORT_NAME: {
          const name = data.toString('utf8');
          const exp = this.server.findExport(name);
          if (!exp) throw new DisconnectError(`client asked for unknown export "${name}" with NBD_OPT_EXPORT_NAME`);
          const active = this.activate(exp);
          this.send(encodeExportNameReply(exp.device.size, active.flags, this.noZeroes));
          return active;
        }
        case OPT.ABORT:
          if (!this.stream.destroyed) this.reply(option, REP.ACK);
          return null;
        case OPT.LIST:
          if (length !== 0) {
            this.reply(option, REP_ERR_.INVALID, 'NBD_OPT_LIST takes no data');
            break;
          }
          for (const e of this.server.exports) this.reply(option, REP.SERVER, encodeServerEntry(e.name, e.description ?? ''));
          this.reply(option, REP.ACK);
          break;
        case OPT.STARTTLS:
          if (length !== 0) this.reply(option, REP_ERR_.INVALID, 'NBD_OPT_STARTTLS takes no data');
          else if (!this.secureContext) this.reply(option, REP_ERR_.POLICY, 'TLS is not configured on this server');
          else if (this.tlsActive) this.reply(option, REP_ERR_.INVALID, 'TLS is already active');
          else {
            this.reply(option, REP.ACK);
            await this.startTls();
          }
          break;
        case OPT.STRUCTURED_REPLY:
          if (length !== 0) this.reply(option, REP_ERR_.INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
          else if (this.structured) this.reply(option, REP_ERR_.INVALID, 'structured replies are already negotiated');
          else {
            this.structured = true;
            this.reply(option, REP.ACK);
          }
          break;
        case OPT.LIST_META_CONTEXT:
        case OPT.SET_META_CONTEXT:
          this.metaContext(option, data);
          break;
        case OPT.INFO:
        case OPT.GO: {
          const active = this.infoOrGo(option, data);
          if (active) return active;
          break;
        }
        default:
          this.reply(option, REP_ERR_.UNSUP, `option ${option} is not supported`);
      }
    }
  }

  private reply(option: number, type: number, data?: Buffer | string): void {
    this.send(encodeOptionReply(option, type, typeof data === 'string' ? Buffer.from(data, 'utf8') : data));
  }

  private async startTls(): Promise<void> {
    if (this.reader.bufferedBytes > 0) throw new DisconnectError('client sent data before the TLS handshake');
    const raw = this.reader.detach();
    if (!raw) throw new DisconnectError('no stream to upgrade');
    const t = this.server.opts.tls!;
    const requestCert = t.ca !== undefined;
    // A server-side TLSSocket made by hand never verifies the client's certificate (Node sets
    // `authorized` only on sockets a tls.Server accepts), so hand the stream to a tls.Server:
    // it refuses a missing or untrusted certificate and reports every failure as tlsClientError.
    const acceptor = tls.createServer({ key: t.key, cert: t.cert, ca: t.ca, minVersion: 'TLSv1.2', requestCert, rejectUnauthorized: requestCert });
    const sock = await new Promise<tls.TLSSocket>((resolve, reject) => {
      acceptor.once('secureConnection', resolve);
      acceptor.once('tlsClientError', (err: Error, s: tls.TLSSocket) => {
        s.destroy();
        reject(new DisconnectError(s.authorizationError ? `client certificate refused: ${String(s.authorizationError)}` : `TLS handshake failed: ${err.message}`));
      });
      acceptor.emit('connection', raw);
    });
    sock.on('error', () => {
      /* surfaced through the reader */
    });
    this.stream = sock;
    this.reader.attach(sock);
    this.tlsActive = true;
  }

  private metaContext(option: number, data: Buffer): void {
    if (!this.structured) {
      this.reply(option, REP_ERR_.INVALID, 'negotiate NBD_OPT_STRUCTURED_REPLY before meta contexts');
      return;
    }
    let req;
    try {
      req = parseMetaContext(data);
    } catch (err) {
      this.reply(option, REP_ERR_.INVALID, (err as Error).message);
      return;
    }
    if (!this.server.findExport(req.name)) {
      this.reply(option, REP_ERR_.UNKNOWN, `no export named "${req.name}"`);
      return;
    }
    const list = option === OPT.LIST_META_CONTEXT;
    // base:allocation is our only context. For LIST, no query or "base:" lists it too.
    const matches = req.queries.some((q) => q === META_CONTEXT_BASE_ALLOCATION || (list && q === 'base:')) || (list && req.queries.length === 0);
    if (matches) this.reply(option, REP.META_CONTEXT, encodeMetaContextReply(list ? 0 : BASE_ALLOCATION_ID, META_CONTEXT_BASE_ALLOCATION));
    if (!list) this.meta = { exportName: req.name, baseAllocation: matches };
    this.reply(option, REP.ACK);
  }

  private infoOrGo(option: number, data: Buffer): ActiveExport | null {
    let req;
    try {
      req = parseGoInfo(data);
    } catch (err) {
      this.reply(option, REP_ERR_.INVALID, (err as Error).message);
      return null;
    }
    const exp = this.server.findExport(req.name);
    if (!exp) {
      this.reply(option, REP_ERR_.UNKNOWN, `no export named "${req.name}"; ask with NBD_OPT_LIST (nbdinfo --list)`);
      return null;
    }
    const flags = this.transmissionFlags(exp.device);
    const bs = exp.device.capabilities.blockSize;
    this.reply(option, REP.INFO, encodeInfoExport(exp.device.size, flags));
    this.reply(option, REP.INFO, encodeInfoBlockSize(bs.minimum, Math.max(bs.preferred, 512, bs.minimum), Math.min(bs.maximum, MAX_PAYLOAD)));
    if (req.infos.includes(INFO.NAME)) this.reply(option, REP.INFO, encodeInfoString(INFO.NAME, exp.name));
    if (req.infos.includes(INFO.DESCRIPTION) && exp.description) this.reply(option, REP.INFO, encodeInfoString(INFO.DESCRIPTION, exp.description));
    this.reply(option, REP.ACK);
    return option === OPT.GO ? this.activate(exp) : null;
  }

  private transmissionFlags(dev: BlockDevice): number {
    const c = dev.capabilities;
    let f = TFLAG.HAS_FLAGS | TFLAG.SEND_FLUSH | TFLAG.SEND_CACHE;
    if (!c.writable) f |= TFLAG.READ_ONLY;
    else f |= TFLAG.SEND_FUA | TFLAG.SEND_TRIM | TFLAG.SEND_WRITE_ZEROES | TFLAG.SEND_FAST_ZERO;
    if (c.multiConn) f |= TFLAG.CAN_MULTI_CONN;
    if (this.structured) f |= TFLAG.SEND_DF;
    return f;
  }

  private activate(exp: NbdExport): ActiveExport {
    // Counted from the moment the client has the export (the reply may still be in flight).
    this.exportName = exp.name;
    const flags = this.transmissionFlags(exp.device);
    const c = exp.device.capabilities;
    const metaMatches = this.meta !== null && this.meta.baseAllocation && this.server.findExport(this.meta.exportName) === exp;
    return {
      exp,
      flags,
      neg: {
        size: exp.device.size,
        writable: c.writable,
        fua: (flags & TFLAG.SEND_FUA) !== 0,
        fastZero: (flags & TFLAG.SEND_FAST_ZERO) !== 0,
        structured: this.structured,
        metaContext: this.structured && metaMatches,
        minBlock: c.blockSize.minimum,
        maxPayload: Math.min(c.blockSize.maximum, MAX_PAYLOAD),
      },
    };
  }

  // ----------------------------------------------------------------------------- transmission

  private async transmit(active: ActiveExport): Promise<void> {
    const { opts } = this.server;
    for (;;) {
      const h = decodeRequest(await this.reader.read(REQUEST_SIZE), 0);
      if (h === NEED_MORE) throw new DisconnectError('unreachable');
      const req = h.msg;
      let payload: Buffer | null = null;
      if (req.type === CMD.WRITE) {
        if (req.length > HARD_PAYLOAD_LIMIT) throw new DisconnectError(`write payload of ${req.length} bytes is above ${HARD_PAYLOAD_LIMIT}; disconnecting`);
        payload = req.length > 0 ? await this.reader.read(req.length) : Buffer.alloc(0);
      }
      if (req.type === CMD.DISC) return; // finally{} waits for in-flight requests, then closes
      if (this.shuttingDown || this.server.isStopping) {
        this.replyError(req, NBD_ERR.ESHUTDOWN, 'server is shutting down');
        continue;
      }
      const err = validateRequest(req, active.neg);
      if (err !== 0) {
        this.replyError(req, err, describeInvalid(req, active.neg, err));
        continue;
      }
      this.begin(payload?.length ?? 0);
      void this.execute(active, req, payload).finally(() => this.end(payload?.length ?? 0));
      if (this.inFlight >= opts.maxInFlight || this.inFlightBytes >= opts.maxInFlightBytes || this.stream.writableLength >= opts.maxPendingReplyBytes) {
        await this.waitForSlot();
      }
    }
  }

  private begin(bytes: number): void {
    if (this.inFlight === 0) this.idle = new Promise((r) => (this.idleResolve = r));
    this.inFlight++;
    this.inFlightBytes += bytes;
  }

  private end(bytes: number): void {
    this.inFlight--;
    this.inFlightBytes -= bytes;
    if (this.inFlight === 0) {
      this.idleResolve?.();
      this.idleResolve = null;
    }
    this.maybeReleaseSlot();
  }

  private waitForSlot(): Promise<void> {
    return new Promise((resolve) => {
      this.slotWaiter = resolve;
      if (this.stream.writableLength >= this.server.opts.maxPendingReplyBytes) this.stream.once('drain', () => this.maybeReleaseSlot());
      this.maybeReleaseSlot();
    });
  }

  private maybeReleaseSlot(): void {
    const w = this.slotWaiter;
    if (!w) return;
    const o = this.server.opts;
    if (this.inFlight < o.maxInFlight && this.inFlightBytes < o.maxInFlightBytes && this.stream.writableLength < o.maxPendingReplyBytes) {
      this.slotWaiter = null;
      w();
    } else if (this.stream.writableLength >= o.maxPendingReplyBytes && this.stream.listenerCount('drain') === 0) {
      this.stream.once('drain', () => this.maybeReleaseSlot());
    }
  }

  private async execute(active: ActiveExport, req: RequestHeader, payload: Buffer | null): Promise<void> {
    const dev = active.exp.device;
    const fua = (req.flags & CMD_FLAG.FUA) !== 0;
    try {
      switch (req.type) {
        case CMD.READ:
          await this.doRead(dev, req);
          return;
        case CMD.WRITE:
          if (req.length > 0) await dev.write(req.offset, payload!, { fua: fua && dev.capabilities.fua });
          if (fua && !dev.capabilities.fua) await dev.flush();
          break;
        case CMD.FLUSH:
          await dev.flush();
          break;
        case CMD.TRIM:
          if (req.length > 0 && dev.capabilities.trim) await dev.trim(req.offset, req.length, { fua: fua && dev.capabilities.fua });
          if (fua && !dev.capabilities.fua) await dev.flush();
          break;
        case CMD.WRITE_ZEROES:
          if (req.length > 0) {
            await dev.writeZeroes(req.offset, req.length, {
              fua: fua && dev.capabilities.fua,
              mayTrim: (req.flags & CMD_FLAG.NO_HOLE) === 0,
              fastOnly: (req.flags & CMD_FLAG.FAST_ZERO) !== 0,
            });
          }
          if (fua && !dev.capabilities.fua) await dev.flush();
          break;
        case CMD.CACHE:
          if (req.length > 0 && dev.cache) await dev.cache(req.offset, req.length);
          break;
        case CMD.BLOCK_STATUS:
          await this.doBlockStatus(dev, req);
          return;
      }
      this.replyOk(req);
    } catch (e) {
      const be = toBlockError(e);
      if (be.errno !== 'ENOTSUP' || req.type !== CMD.WRITE_ZEROES) {
        this.server.log('warn', 'request failed', { export: active.exp.name, type: req.type, offset: req.offset, length: req.length, errno: be.errno, err: be.message });
      }
      this.replyError(req, nbdErrorOf(be.errno), be.message);
    }
  }

  private async doRead(dev: BlockDevice, req: RequestHeader): Promise<void> {
    // One buffer holds the reply header and the data, so the reply is one socket write.
    const head = this.structured ? STRUCTURED_REPLY_HEADER_SIZE + 8 : SIMPLE_REPLY_SIZE;
    const pool = this.server.replyBuffers;
    const out = pool.get(head + req.length);
    try {
      if (req.length > 0) await dev.read(req.offset, out.subarray(head));
    } catch (err) {
      pool.release(out);
      throw err;
    }
    if (this.structured) {
      if (req.length === 0) {
        // OFFSET_DATA must carry data: answer with a lone NONE chunk.
        pool.release(out);
        const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE);
        encodeStructuredHeader(b, 0, REPLY_FLAG_DONE, REPLY_TYPE.NONE, req.handle, 0);
        this.send(b);
        return;
      }
      encodeStructuredHeader(out, 0, REPLY_FLAG_DONE, REPLY_TYPE.OFFSET_DATA, req.handle, 8 + req.length);
      out.writeBigUInt64BE(BigInt(req.offset), STRUCTURED_REPLY_HEADER_SIZE);
    } else {
      encodeSimpleReply(out, 0, 0, req.handle);
    }
    this.send(out, () => pool.release(out));
  }

  private async doBlockStatus(dev: BlockDevice, req: RequestHeader): Promise<void> {
    const extents = await blockStatusOf(dev, req.offset, req.length);
    const descriptors: Array<{ length: number; flags: number }> = [];
    let pos = req.offset;
    const end = req.offset + req.length;
    for (const e of extents) {
      if (pos >= end) break;
      const eEnd = Math.min(e.offset + e.length, end);
      if (e.offset > pos || eEnd <= pos) break; // extents must be contiguous from `pos`
      const flags = (e.hole ? STATE_HOLE : 0) | (e.zero ? STATE_ZERO : 0);
      const len = eEnd - pos;
      const last = descriptors[descriptors.length - 1];
      if (last && last.flags === flags && last.length + len <= 0xffffffff) last.length += len;
      else descriptors.push({ length: len, flags });
      pos = eEnd;
      if ((req.flags & CMD_FLAG.REQ_ONE) !== 0) break;
    }
    if (descriptors.length === 0) descriptors.push({ length: req.length, flags: 0 }); // "data" is always a safe answer
    if ((req.flags & CMD_FLAG.REQ_ONE) !== 0) descriptors.length = 1;
    const payload = encodeBlockStatusPayload(BASE_ALLOCATION_ID, descriptors);
    const out = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + payload.length);
    encodeStructuredHeader(out, 0, REPLY_FLAG_DONE, REPLY_TYPE.BLOCK_STATUS, req.handle, payload.length);
    payload.copy(out, STRUCTURED_REPLY_HEADER_SIZE);
    this.send(out);
  }

  private replyOk(req: RequestHeader): void {
    const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
    encodeSimpleReply(b, 0, 0, req.handle);
    this.send(b);
  }

  /** READ and BLOCK_STATUS errors must be structured once negotiated; others may be simple. */
  private replyError(req: RequestHeader, error: number, message: string): void {
    if (this.structured && (req.type === CMD.READ || req.type === CMD.BLOCK_STATUS)) {
      const payload = encodeErrorPayload(error, message);
      const out = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + payload.length);
      encodeStructuredHeader(out, 0, REPLY_FLAG_DONE, REPLY_TYPE.ERROR, req.handle, payload.length);
      payload.copy(out, STRUCTURED_REPLY_HEADER_SIZE);
      this.send(out);
      return;
    }
    const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
    encodeSimpleReply(b, 0, error, req.handle);
    this.send(b);
  }
}

function describeInvalid(req: RequestHeader, e: NegotiatedExport, err: number): string {
  switch (err) {
    case NBD_ERR.EPERM:
      return 'export is read-only';
    case NBD_ERR.ENOSPC:
      return `write of ${req.length} bytes at ${req.offset} goes past the end of the ${e.size}-byte export`;
    default:
      return `invalid request: type ${req.type}, flags 0x${req.flags.toString(16)}, offset ${req.offset}, length ${req.length} (export size ${e.size}, minimum block ${e.minBlock}, maximum payload ${e.maxPayload})`;
  }
}
