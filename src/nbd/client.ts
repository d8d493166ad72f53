// NBD client: the runner around codec.ts on the client side.
//
//   NbdHandshake.start(opts)   connect (TCP, UNIX socket or a given Duplex), fixed newstyle
//                              greeting with NO_ZEROES, STARTTLS when asked, STRUCTURED_REPLY
//     .list() .info(name)      NBD_OPT_LIST / NBD_OPT_INFO, any number of times
//     .go(name) → NbdClient    SET_META_CONTEXT base:allocation, then NBD_OPT_GO (INFO_BLOCK_SIZE
//                              requested); falls back to NBD_OPT_EXPORT_NAME when GO is unsupported
//     .abort()                 NBD_OPT_ABORT (soft disconnect)
//   NbdClient.connect(opts)    all of the above in one call
//   NbdBlockDevice             the BlockDevice on top of a connected client
//
// Transmission: requests are pipelined with unique 64-bit handles inside a bounded in-flight
// window; callers beyond it wait in a bounded queue (and are refused beyond that). Replies are
// matched by handle, in any order, by an incremental parser that checks every length before it
// buffers anything and copies read payloads straight into the caller's buffer. Reads and writes
// larger than the server's maximum block size are split. When the connection dies, every
// request in flight or queued rejects with an NbdRequestError (a BlockError) at once.
//
// Quirk: nbd-server (3.24 at least) answers NBD_OPT_INFO with an export size of 0; info()
// reports a size of 0 from OPT_INFO as `undefined` ("unknown"). NBD_OPT_GO gives the real size.

import { readFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import tls from 'node:tls';

import {
  assertRange,
  BlockError,
  type BlockCapabilities,
  type BlockDevice,
  type BlockErrno,
  type BlockSizeConstraints,
  type Extent,
  type IoOptions,
  type ZeroOptions,
} from '../block/device.js';
import {
  decodeExportNameReply,
  decodeOffsetDataHeader,
  decodeOptionReply,
  decodeReplyHeader,
  decodeServerGreeting,
  encodeClientFlags,
  encodeGoInfo,
  encodeMetaContext,
  encodeOption,
  encodeRequest,
  NEED_MORE,
  NbdProtocolError,
  OFFSET_DATA_HEADER_SIZE,
  parseBlockStatusPayload,
  parseErrorPayload,
  parseInfoReply,
  parseMetaContextReply,
  parseOffsetHolePayload,
  parseServerEntry,
  type Decoded,
  type NbdProtocolErrorCode,
  type OptionReply,
  type ReplyHeader,
} from './codec.js';
import { errnoOfNbd } from './errors.js';
import {
  CLIENT_FLAG_FIXED_NEWSTYLE,
  CLIENT_FLAG_NO_ZEROES,
  CMD,
  CMD_FLAG,
  DEFAULT_PORT,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  INFO,
  isReplyError,
  isReplyTypeError,
  MAX_OPTION_LENGTH,
  MAX_PAYLOAD,
  MAX_STRING,
  META_CONTEXT_BASE_ALLOCATION,
  OPT,
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

// ---------------------------------------------------------------------------------------------
// Errors

/** Errors of connecting and negotiating (before any data-path request exists). */
export type NbdClientErrorCode =
  | NbdProtocolErrorCode
  | 'SPW_ERR_NBD_BAD_URI'
  | 'SPW_ERR_NBD_BAD_OPTIONS'
  | 'SPW_ERR_NBD_CONNECT'
  | 'SPW_ERR_NBD_CONNECTION_LOST'
  | 'SPW_ERR_NBD_TLS'
  | 'SPW_ERR_NBD_TLS_REFUSED'
  | 'SPW_ERR_NBD_TLS_REQUIRED'
  | 'SPW_ERR_NBD_EXPORT_UNKNOWN'
  | 'SPW_ERR_NBD_UNSUPPORTED'
  | 'SPW_ERR_NBD_OPTION_REFUSED'
  | 'SPW_ERR_NBD_SHUTDOWN'
  | 'SPW_ERR_NBD_ABORTED'
  | 'SPW_ERR_NBD_CLOSED';

export class NbdClientError extends Error {
  readonly code: NbdClientErrorCode;
  constructor(code: NbdClientErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'NbdClientError';
    this.code = code;
  }
}

/** Errors of data-path requests. They are BlockErrors, so layers above see an errno. */
export type NbdRequestErrorCode =
  /** the server answered with an error; `errno` is the mapped wire error. */
  | 'SPW_ERR_NBD_SERVER_ERROR'
  /** the connection died (reset, EOF, killed server) with the request unanswered. */
  | 'SPW_ERR_NBD_CONNECTION_LOST'
  /** the server broke the protocol; the connection was dropped. */
  | 'SPW_ERR_NBD_PROTOCOL'
  /** close() was called, or the client was already closed. */
  | 'SPW_ERR_NBD_CLOSED'
  /** the caller's AbortSignal fired. */
  | 'SPW_ERR_NBD_ABORTED'
  /** more requests are waiting than `maxQueued`. */
  | 'SPW_ERR_NBD_QUEUE_FULL'
  /** the request needs something that was not negotiated (e.g. block status). */
  | 'SPW_ERR_NBD_UNSUPPORTED';

export class NbdRequestError extends BlockError {
  readonly code: NbdRequestErrorCode;
  /** wire error number, for SPW_ERR_NBD_SERVER_ERROR. */
  readonly nbdError: number | undefined;
  constructor(errno: BlockErrno, code: NbdRequestErrorCode, message: string, options?: { cause?: unknown; nbdError?: number }) {
    super(errno, message, options);
    this.name = 'NbdRequestError';
    this.code = code;
    this.nbdError = options?.nbdError;
  }
}

function malformed(message: string): NbdProtocolError {
  return new NbdProtocolError('SPW_ERR_NBD_MALFORMED', message);
}

// ---------------------------------------------------------------------------------------------
// URIs (NBD URI spec: nbd://host:port/export, nbds://…, nbd+unix:///export?socket=/path, nbds+unix)

export interface NbdUri {
  tls: boolean;
  exportName: string;
  /** TCP target. */
  host?: string;
  port?: number;
  /** UNIX socket target. */
  socket?: string;
  /** `?tls-certificates=DIR` (ca-cert.pem, client-cert.pem, client-key.pem), as libnbd. */
  tlsCertificates?: string;
}

export function parseNbdUri(uri: string): NbdUri {
  let u: URL;
  try {
    u = new URL(uri);
  } catch (err) {
    throw new NbdClientError('SPW_ERR_NBD_BAD_URI', `"${uri}" is not a URI; expected nbd://host[:port]/export or nbd+unix:///export?socket=/path`, { cause: err });
  }
  const scheme = u.protocol.slice(0, -1);
  const known = ['nbd', 'nbds', 'nbd+unix', 'nbds+unix', 'nbd+tcp', 'nbds+tcp'];
  if (!known.includes(scheme)) {
    throw new NbdClientError('SPW_ERR_NBD_BAD_URI', `unsupported scheme "${scheme}:" in ${uri}; use nbd://, nbds://, nbd+unix:// or nbds+unix://`);
  }
  const isTls = scheme.startsWith('nbds');
  let exportName: string;
  try {
    exportName = decodeURIComponent(u.pathname.startsWith('/') ? u.pathname.slice(1) : u.pathname);
  } catch (err) {
    throw new NbdClientError('SPW_ERR_NBD_BAD_URI', `bad percent-encoding in the export name of ${uri}`, { cause: err });
  }
  if (Buffer.byteLength(exportName) > MAX_STRING) throw new NbdClientError('SPW_ERR_NBD_BAD_URI', `export name in ${uri} is longer than ${MAX_STRING} bytes`);
  const out: NbdUri = { tls: isTls, exportName };
  const certs = u.searchParams.get('tls-certificates');
  if (certs !== null) out.tlsCertificates = certs;
  if (scheme.endsWith('+unix')) {
    const socket = u.searchParams.get('socket');
    if (!socket) throw new NbdClientError('SPW_ERR_NBD_BAD_URI', `${uri} needs ?socket=/path/to/socket`);
    if (u.host !== '') throw new NbdClientError('SPW_ERR_NBD_BAD_URI', `${uri}: a UNIX socket URI has no host (nbd+unix:///export?socket=…)`);
    out.socket = socket;
    return out;
  }
  let host = u.hostname;
  if (host.startsWith('[') && host.endsWith(']')) host = host.slice(1, -1);
  out.host = host === '' ? 'localhost' : host;
  out.port = u.port === '' ? DEFAULT_PORT : Number(u.port);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Options

export interface NbdClientTlsOptions {
  /** CA certificate(s) that signed the server's certificate (default: the system store). */
  ca?: string | Buffer | Array<string | Buffer>;
  /** client certificate and key, for servers that verify clients (mutual TLS). */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** directory with ca-cert.pem, client-cert.pem, client-key.pem (like nbdkit/qemu/libnbd). */
  certificatesDir?: string;
  /** name checked against the server's certificate and sent as SNI; default: the host. */
  servername?: string;
  /** default true. Turning it off makes TLS useless against an active attacker. */
  rejectUnauthorized?: boolean;
  /** default TLSv1.2 (the spec's floor); TLSv1.3 is negotiated whenever the server has it. */
  minVersion?: tls.SecureVersion;
}

export interface NbdConnectOptions {
  /** nbd://, nbds://, nbd+unix:// or nbds+unix:// — explicit options below override it. */
  uri?: string;
  host?: string;
  port?: number;
  /** path of a UNIX socket. */
  socket?: string;
  /** an already-connected byte stream (socketpair, in-memory pair, SSH channel…). */
  stream?: Duplex;
  /** default: the URI's export name, else "" (the default export). */
  exportName?: string;
  /** true: TLS with the system CAs; an object: TLS with these credentials. nbds:// sets true. */
  tls?: boolean | NbdClientTlsOptions;
  /** negotiate structured replies (default true). */
  structuredReplies?: boolean;
  /** negotiate base:allocation for block status (default true; needs structured replies). */
  blockStatus?: boolean;
  /** requests on the wire at once (default 64). */
  maxInFlight?: number;
  /** requests waiting for the window (default 4096); beyond it requests are refused. */
  maxQueued?: number;
  /** cancels connecting and negotiating. */
  signal?: AbortSignal;
  /** connecting and negotiating give up after this long (default 30000 ms; 0 = never). */
  handshakeTimeoutMs?: number;
}

export interface NbdBlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface NbdExportInfo {
  name: string;
  /** undefined when the server did not say (nbd-server answers OPT_INFO with 0: see above). */
  size: number | undefined;
  /** transmission flags (TFLAG.*). */
  flags: number;
  blockSize?: NbdBlockSize;
  description?: string;
  /** the name the server gave back in NBD_INFO_NAME, if any. */
  canonicalName?: string;
}

export interface NbdExportEntry {
  name: string;
  description: string;
}

const DEFAULT_MAX_IN_FLIGHT = 64;
const DEFAULT_MAX_QUEUED = 4096;
const DEFAULT_HANDSHAKE_TIMEOUT_MS = 30_000;
/** How long close()/abort() wait for the server to hang up before dropping the connection. */
const DISCONNECT_GRACE_MS = 2000;
/** Handshake input buffered before we stop reading (decoders refuse bigger messages anyway). */
const HANDSHAKE_HIGH_WATER = 2 * MAX_OPTION_LENGTH;
/** Replies to one option (NBD_OPT_LIST can have many); beyond this the server is hostile. */
const MAX_OPTION_REPLIES = 65_536;
const MAX_OPTION_REPLY_BYTES = 16 * 1024 * 1024;
/** Length cap for requests without payload (trim, zero, block status); a power of two. */
const MAX_NO_PAYLOAD_LENGTH = 2 ** 31;
/** Largest error chunk: error + message length + message + offset. */
const MAX_ERROR_CHUNK = 6 + MAX_STRING + 8;

const CMD_NAMES: Record<number, string> = {
  [CMD.READ]: 'READ',
  [CMD.WRITE]: 'WRITE',
  [CMD.DISC]: 'DISC',
  [CMD.FLUSH]: 'FLUSH',
  [CMD.TRIM]: 'TRIM',
  [CMD.CACHE]: 'CACHE',
  [CMD.WRITE_ZEROES]: 'WRITE_ZEROES',
  [CMD.BLOCK_STATUS]: 'BLOCK_STATUS',
};
const OPT_NAMES: Record<number, string> = Object.fromEntries(Object.entries(OPT).map(([k, v]) => [v, `NBD_OPT_${k}`]));

function repErrName(type: number): string {
  const e = Object.entries(REP_ERR_).find(([, v]) => v === type);
  return e ? `NBD_REP_ERR_${e[0]}` : `reply type 0x${type.toString(16)}`;
}

// ---------------------------------------------------------------------------------------------
// Handshake reading: pull one decoded message at a time, with bounded buffering.

class HandshakeReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private failure: Error | null = null;
  private wake: (() => void) | null = null;

  constructor(private stream: Duplex) {
    this.attach(stream);
  }

  attach(stream: Duplex): void {
    this.stream = stream;
    stream.on('data', this.onData);
    stream.on('end', this.onEnd);
    stream.on('close', this.onEnd);
    stream.on('error', this.onError);
    stream.resume();
  }

  /** Stop reading; returns whatever was received but not consumed. */
  detach(): Buffer {
    const s = this.stream;
    s.off('data', this.onData);
    s.off('end', this.onEnd);
    s.off('close', this.onEnd);
    s.off('error', this.onError);
    const rest = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    this.chunks = [];
    this.buffered = 0;
    return rest;
  }

  /** Make the pending and every later next() reject with `err` (first failure wins). */
  fail(err: Error): void {
    if (!this.failure) this.failure = err;
    this.wake?.();
  }

  async next<T>(decode: (buf: Buffer, off: number) => Decoded<T>): Promise<T> {
    for (;;) {
      if (this.chunks.length > 1) this.chunks = [Buffer.concat(this.chunks)];
      const buf = this.chunks[0] ?? Buffer.alloc(0);
      const r = decode(buf, 0); // throws NbdProtocolError on malformed or oversized input
      if (r !== NEED_MORE) {
        this.chunks = r.bytesRead === buf.length ? [] : [buf.subarray(r.bytesRead)];
        this.buffered -= r.bytesRead;
        return r.msg;
      }
      if (this.failure) throw this.failure;
      // The decoders refuse oversize messages from their headers, so needing more than this
      // means the peer is not speaking NBD.
      if (this.buffered > HANDSHAKE_HIGH_WATER) throw malformed(`handshake message larger than ${HANDSHAKE_HIGH_WATER} bytes`);
      await new Promise<void>((resolve) => {
        this.wake = resolve;
        this.stream.resume();
      });
      this.wake = null;
    }
  }

  private readonly onData = (chunk: Buffer): void => {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    if (this.buffered > HANDSHAKE_HIGH_WATER) this.stream.pause();
    this.wake?.();
  };
  private readonly onEnd = (): void => {
    this.fail(new NbdClientError('SPW_ERR_NBD_CONNECTION_LOST', 'the server closed the connection during negotiation'));
  };
  private readonly onError = (err: Error): void => {
    const code = (err as { code?: unknown }).code;
    if (typeof code === 'string' && code.startsWith('ERR_SSL')) {
      this.fail(new NbdClientError('SPW_ERR_NBD_TLS', `TLS failed during negotiation (${err.message}); check that the server accepts this client certificate and CA`, { cause: err }));
    } else {
      this.fail(new NbdClientError('SPW_ERR_NBD_CONNECTION_LOST', `connection failed during negotiation: ${err.message}`, { cause: err }));
    }
  };
}

// ---------------------------------------------------------------------------------------------
// Transport

interface Target {
  /** for messages: "127.0.0.1:10809", "unix:/run/x.sock", "stream". */
  label: string;
  host?: string;
  port?: number;
  socket?: string;
  stream?: Duplex;
  exportName: string;
  tls: NbdClientTlsOptions | null;
}

function resolveTarget(opts: NbdConnectOptions): Target {
  const uri = opts.uri !== undefined ? parseNbdUri(opts.uri) : undefined;
  const exportName = opts.exportName ?? uri?.exportName ?? '';
  if (Buffer.byteLength(exportName) > MAX_STRING) throw new NbdClientError('SPW_ERR_NBD_BAD_OPTIONS', `export name is longer than ${MAX_STRING} bytes`);
  let tlsOpts: NbdClientTlsOptions | null = null;
  if (opts.tls === true || (opts.tls === undefined && uri?.tls)) tlsOpts = {};
  else if (typeof opts.tls === 'object') tlsOpts = { ...opts.tls };
  if (tlsOpts && uri?.tlsCertificates && tlsOpts.certificatesDir === undefined) tlsOpts.certificatesDir = uri.tlsCertificates;
  if (opts.stream) return { label: 'stream', stream: opts.stream, exportName, tls: tlsOpts };
  const socket = opts.socket ?? (opts.host === undefined && opts.port === undefined ? uri?.socket : undefined);
  if (socket !== undefined) return { label: `unix:${socket}`, socket, exportName, tls: tlsOpts };
  const host = opts.host ?? uri?.host;
  const port = opts.port ?? uri?.port ?? DEFAULT_PORT;
  if (host === undefined) throw new NbdClientError('SPW_ERR_NBD_BAD_OPTIONS', 'say where the server is: uri, host/port, socket or stream');
  if (!Number.isInteger(port) || port <= 0 || port > 65535) throw new NbdClientError('SPW_ERR_NBD_BAD_OPTIONS', `bad port ${port}`);
  return { label: `${net.isIPv6(host) ? `[${host}]` : host}:${port}`, host, port, exportName, tls: tlsOpts };
}

/** `started` receives the socket at once, so that an abort can destroy a pending connect. */
function openSocket(t: Target, started: (s: Duplex) => void): Promise<Duplex> {
  if (t.stream) return Promise.resolve(t.stream);
  return new Promise((resolve, reject) => {
    const s = t.socket !== undefined ? net.connect({ path: t.socket }) : net.connect({ host: t.host!, port: t.port! });
    started(s);
    const onError = (err: Error): void => {
      s.off('close', onClose);
      reject(new NbdClientError('SPW_ERR_NBD_CONNECT', `cannot connect to NBD server at ${t.label}: ${err.message}`, { cause: err }));
    };
    const onClose = (): void => {
      s.off('error', onError);
      reject(new NbdClientError('SPW_ERR_NBD_CONNECT', `connecting to NBD server at ${t.label} was cancelled`));
    };
    s.once('error', onError);
    s.once('close', onClose);
    s.once('connect', () => {
      s.off('error', onError);
      s.off('close', onClose);
      if (t.socket === undefined) s.setNoDelay(true);
      resolve(s);
    });
  });
}

async function loadTlsFiles(o: NbdClientTlsOptions): Promise<{ ca?: NbdClientTlsOptions['ca']; cert?: string | Buffer; key?: string | Buffer }> {
  let { ca, cert, key } = o;
  if (o.certificatesDir !== undefined) {
    const dir = o.certificatesDir;
    const f = async (n: string): Promise<Buffer | undefined> => {
      try {
        return await readFile(path.join(dir, n));
      } catch (err) {
        if ((err as { code?: unknown }).code === 'ENOENT') return undefined;
        throw new NbdClientError('SPW_ERR_NBD_TLS', `cannot read ${path.join(dir, n)}: ${(err as Error).message}`, { cause: err });
      }
    };
    ca ??= await f('ca-cert.pem');
    cert ??= await f('client-cert.pem');
    key ??= await f('client-key.pem');
  }
  return { ca, cert, key };
}

// ---------------------------------------------------------------------------------------------
// Handshake

function optionFailure(opt: number, rep: OptionReply, what: string, target: string): NbdClientError {
  const text = rep.data.length > 0 ? rep.data.toString('utf8', 0, Math.min(rep.data.length, MAX_STRING)) : '';
  const detail = `${what}: server at ${target} answered ${OPT_NAMES[opt] ?? `option ${opt}`} with ${repErrName(rep.type)}${text ? ` (${text})` : ''}`;
  switch (rep.type) {
    case REP_ERR_.TLS_REQD:
      return new NbdClientError('SPW_ERR_NBD_TLS_REQUIRED', `${detail}; the server requires TLS: pass tls: { ca, cert, key } (or a certificates directory, or an nbds:// URI)`);
    case REP_ERR_.UNKNOWN:
      return new NbdClientError('SPW_ERR_NBD_EXPORT_UNKNOWN', `${detail}; the export does not exist: list the server's exports and check the name`);
    case REP_ERR_.UNSUP:
      return new NbdClientError('SPW_ERR_NBD_UNSUPPORTED', `${detail}; the server does not implement it`);
    case REP_ERR_.SHUTDOWN:
      return new NbdClientError('SPW_ERR_NBD_SHUTDOWN', `${detail}; the server is shutting down, retry later`);
    default:
      return new NbdClientError('SPW_ERR_NBD_OPTION_REFUSED', detail);
  }
}

function validBlockSize(b: NbdBlockSize): boolean {
  const pow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
  return pow2(b.minimum) && b.minimum <= 65536 && pow2(b.preferred) && b.preferred >= b.minimum && b.maximum >= b.minimum;
}

function toClientError(err: unknown, label: string): NbdClientError {
  if (err instanceof NbdClientError) return err;
  if (err instanceof NbdProtocolError) {
    return new NbdClientError(err.code, `server at ${label} broke the NBD protocol during negotiation: ${err.message}`, { cause: err });
  }
  const msg = err instanceof Error ? err.message : String(err);
  return new NbdClientError('SPW_ERR_NBD_CONNECTION_LOST', `negotiation with ${label} failed: ${msg}`, { cause: err });
}

/** Refused options: the negotiation is still in step and can go on, or end with NBD_OPT_ABORT. */
const SOFT_FAILURES: ReadonlySet<string> = new Set([
  'SPW_ERR_NBD_TLS_REFUSED',
  'SPW_ERR_NBD_TLS_REQUIRED',
  'SPW_ERR_NBD_EXPORT_UNKNOWN',
  'SPW_ERR_NBD_UNSUPPORTED',
  'SPW_ERR_NBD_OPTION_REFUSED',
  'SPW_ERR_NBD_SHUTDOWN',
]);

/**
 * The negotiation phase of one connection. Obtain with NbdHandshake.start(); then list(), info()
 * as often as wanted, and finish with go() (→ NbdClient) or abort().
 */
export class NbdHandshake {
  /** server offered fixed newstyle (needed for every option but EXPORT_NAME). */
  readonly fixedNewstyle: boolean;
  readonly noZeroes: boolean;
  private tlsSocket: tls.TLSSocket | null = null;
  private structured = false;
  private finished = false;
  private busy = false;

  private constructor(
    private stream: Duplex,
    private readonly reader: HandshakeReader,
    private readonly target: Target,
    handshakeFlags: number,
    private readonly opts: NbdConnectOptions,
    private readonly deadline: { cancel: () => void },
  ) {
    this.fixedNewstyle = (handshakeFlags & FLAG_FIXED_NEWSTYLE) !== 0;
    this.noZeroes = this.fixedNewstyle && (handshakeFlags & FLAG_NO_ZEROES) !== 0;
  }

  get structuredReplies(): boolean {
    return this.structured;
  }
  /** negotiated TLS version ("TLSv1.3"), or null without TLS. */
  get tlsProtocol(): string | null {
    return this.tlsSocket?.getProtocol() ?? null;
  }

  /** Connect, greet, upgrade to TLS when configured, negotiate structured replies. */
  static async start(opts: NbdConnectOptions): Promise<NbdHandshake> {
    const target = resolveTarget(opts);
    const timeoutMs = opts.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
    let stream: Duplex | null = null;
    let reader: HandshakeReader | null = null;
    let stopReason: NbdClientError | null = null;
    const stop = (err: NbdClientError): void => {
      stopReason ??= err;
      reader?.fail(err);
      stream?.destroy();
    };
    const onAbort = (): void => stop(new NbdClientError('SPW_ERR_NBD_ABORTED', `negotiation with ${target.label} was aborted`, { cause: opts.signal?.reason }));
    const timer =
      timeoutMs > 0
        ? setTimeout(() => stop(new NbdClientError('SPW_ERR_NBD_CONNECTION_LOST', `no complete NBD negotiation with ${target.label} within ${timeoutMs} ms`)), timeoutMs)
        : null;
    timer?.unref();
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    const deadline = {
      cancel: () => {
        if (timer) clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
      },
    };
    try {
      if (opts.signal?.aborted) throw new NbdClientError('SPW_ERR_NBD_ABORTED', `negotiation with ${target.label} was aborted`, { cause: opts.signal.reason });
      stream = await openSocket(target, (s) => (stream = s));
      if (stopReason) throw stopReason;
      reader = new HandshakeReader(stream);
      const greeting = await reader.next(decodeServerGreeting);
      const hs = new NbdHandshake(stream, reader, target, greeting.handshakeFlags, opts, deadline);
      try {
        await hs.init();
      } catch (err) {
        const e = stopReason ?? toClientError(err, target.label);
        if (SOFT_FAILURES.has(e.code)) await hs.abort().catch(() => hs.destroy());
        throw e;
      }
      return hs;
    } catch (err) {
      deadline.cancel();
      stream?.destroy();
      throw stopReason ?? toClientError(err, target.label);
    }
  }

  private async init(): Promise<void> {
    let flags = 0;
    if (this.fixedNewstyle) flags |= CLIENT_FLAG_FIXED_NEWSTYLE;
    if (this.noZeroes) flags |= CLIENT_FLAG_NO_ZEROES;
    this.stream.write(encodeClientFlags(flags));
    if (this.target.tls) await this.startTls(this.target.tls);
    if (this.fixedNewstyle && this.opts.structuredReplies !== false) {
      const { final } = await this.exchange(OPT.STRUCTURED_REPLY, Buffer.alloc(0), 'negotiating structured replies');
      if (final.type === REP.ACK) this.structured = true;
      else if (final.type === REP_ERR_.TLS_REQD) throw optionFailure(OPT.STRUCTURED_REPLY, final, 'negotiating structured replies', this.target.label);
      else if (final.type === REP_ERR_.SHUTDOWN) throw optionFailure(OPT.STRUCTURED_REPLY, final, 'negotiating structured replies', this.target.label);
      // NBD_REP_ERR_UNSUP and friends: simple replies only (nbd-server).
    }
  }

  private async startTls(o: NbdClientTlsOptions): Promise<void> {
    if (!this.fixedNewstyle) {
      throw new NbdClientError('SPW_ERR_NBD_TLS_REFUSED', `TLS was requested but the server at ${this.target.label} does not speak fixed newstyle negotiation, so it cannot do STARTTLS`);
    }
    const { final } = await this.exchange(OPT.STARTTLS, Buffer.alloc(0), 'starting TLS');
    if (final.type !== REP.ACK) {
      if (final.type === REP_ERR_.SHUTDOWN) throw optionFailure(OPT.STARTTLS, final, 'starting TLS', this.target.label);
      const text = final.data.length > 0 ? ` (${final.data.toString('utf8', 0, Math.min(final.data.length, MAX_STRING))})` : '';
      throw new NbdClientError('SPW_ERR_NBD_TLS_REFUSED', `TLS was requested but the server at ${this.target.label} refused STARTTLS with ${repErrName(final.type)}${text}; configure TLS on the server or connect without TLS`);
    }
    const raw = this.stream;
    // Anything received after the ACK and before the TLS handshake was injected in plaintext.
    const injected = this.reader.detach();
    if (injected.length > 0) throw malformed(`server sent ${injected.length} plaintext bytes after accepting STARTTLS`);
    const { ca, cert, key } = await loadTlsFiles(o);
    const host = this.target.host ?? 'localhost';
    const servername = o.servername ?? (net.isIP(host) ? undefined : host);
    const sock = tls.connect({
      socket: raw,
      host: o.servername ?? host, // identity check against the certificate
      ...(servername !== undefined ? { servername } : {}),
      ...(ca !== undefined ? { ca } : {}),
      ...(cert !== undefined ? { cert } : {}),
      ...(key !== undefined ? { key } : {}),
      rejectUnauthorized: o.rejectUnauthorized ?? true,
      minVersion: o.minVersion ?? 'TLSv1.2',
    });
    // The TLS socket reports errors of the raw one; keep the raw one from crashing the process.
    raw.on('error', () => {});
    this.stream = sock;
    this.reader.attach(sock);
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error): void => {
        sock.off('secureConnect', onSecure);
        reject(new NbdClientError('SPW_ERR_NBD_TLS', `TLS handshake with ${this.target.label} failed: ${err.message}; check the CA (ca), the server name (servername) and the client certificate (cert, key)`, { cause: err }));
      };
      const onSecure = (): void => {
        sock.off('error', onError);
        resolve();
      };
      sock.once('error', onError);
      sock.once('secureConnect', onSecure);
    });
    this.tlsSocket = sock;
  }

  /** Send one option and read its replies up to the final one (ACK or an error). */
  private async exchange(opt: number, data: Buffer, what: string): Promise<{ replies: OptionReply[]; final: OptionReply }> {
    this.stream.write(encodeOption(opt, data));
    const replies: OptionReply[] = [];
    let bytes = 0;
    for (;;) {
      const rep = await this.reader.next(decodeOptionReply);
      if (rep.option !== opt) throw malformed(`reply to option ${rep.option} while ${what} (${OPT_NAMES[opt] ?? opt})`);
      if (rep.type === REP.ACK || isReplyError(rep.type)) return { replies, final: rep };
      bytes += rep.data.length;
      if (replies.length >= MAX_OPTION_REPLIES || bytes > MAX_OPTION_REPLY_BYTES) throw new NbdProtocolError('SPW_ERR_NBD_TOO_BIG', `too many replies while ${what}`);
      // decodeOptionReply hands out a view of the read buffer: keep a copy.
      replies.push({ ...rep, data: Buffer.from(rep.data) });
    }
  }

  /**
   * Runs one public negotiation step. A refused option leaves the negotiation usable (try
   * another export, or abort()); anything else (protocol violation, lost connection) ends it.
   */
  private async step<T>(what: string, fn: () => Promise<T>): Promise<T> {
    if (this.finished) throw new NbdClientError('SPW_ERR_NBD_CLOSED', `cannot ${what}: negotiation with ${this.target.label} is over`);
    if (this.busy) throw new NbdClientError('SPW_ERR_NBD_BAD_OPTIONS', `cannot ${what}: another option is in progress (one at a time)`);
    this.busy = true;
    try {
      return await fn();
    } catch (err) {
      const e = toClientError(err, this.target.label);
      if (!SOFT_FAILURES.has(e.code)) this.destroy();
      throw e;
    } finally {
      this.busy = false;
    }
  }

  private needFixed(what: string): void {
    if (!this.fixedNewstyle) throw new NbdClientError('SPW_ERR_NBD_UNSUPPORTED', `cannot ${what}: the server at ${this.target.label} does not speak fixed newstyle negotiation`);
  }

  /** NBD_OPT_LIST. */
  list(): Promise<NbdExportEntry[]> {
    return this.step('list exports', async () => {
      this.needFixed('list exports');
      const { replies, final } = await this.exchange(OPT.LIST, Buffer.alloc(0), 'listing exports');
      if (final.type !== REP.ACK) throw optionFailure(OPT.LIST, final, 'listing exports', this.target.label);
      return replies.map((r) => {
        if (r.type !== REP.SERVER) throw malformed(`unexpected reply type ${r.type} to NBD_OPT_LIST`);
        return parseServerEntry(r.data);
      });
    });
  }

  /** NBD_OPT_INFO. A size of 0 is reported as undefined (nbd-server quirk; GO has the size). */
  info(name: string = this.target.exportName): Promise<NbdExportInfo> {
    return this.step('query an export', async () => {
      this.needFixed('query an export');
      const { info, final } = await this.infoOrGo(OPT.INFO, name, [INFO.BLOCK_SIZE, INFO.NAME, INFO.DESCRIPTION]);
      if (final.type !== REP.ACK) throw optionFailure(OPT.INFO, final, `querying export "${name}"`, this.target.label);
      if (info.size === 0) info.size = undefined;
      return info;
    });
  }

  private async infoOrGo(opt: number, name: string, infos: number[]): Promise<{ info: NbdExportInfo; final: OptionReply }> {
    const what = `${opt === OPT.GO ? 'opening' : 'querying'} export "${name}"`;
    const { replies, final } = await this.exchange(opt, encodeGoInfo({ name, infos }), what);
    const info: NbdExportInfo = { name, size: undefined, flags: 0 };
    let sawExport = false;
    for (const r of replies) {
      if (r.type !== REP.INFO) continue; // unknown reply types are informational
      const i = parseInfoReply(r.data);
      switch (i.type) {
        case INFO.EXPORT:
          if (!Number.isSafeInteger(i.size)) throw malformed(`export size ${i.size} is not a safe integer`);
          info.size = i.size;
          info.flags = i.flags;
          sawExport = true;
          break;
        case INFO.BLOCK_SIZE: {
          const b = { minimum: i.minimum, preferred: i.preferred, maximum: i.maximum };
          if (!validBlockSize(b)) throw malformed(`invalid block size constraints ${JSON.stringify(b)}`);
          info.blockSize = b;
          break;
        }
        case INFO.NAME:
          info.canonicalName = i.name;
          break;
        case INFO.DESCRIPTION:
          info.description = i.description;
          break;
        default:
          break; // unknown NBD_INFO_*: ignore, as the spec asks
      }
    }
    if (final.type === REP.ACK && !sawExport) throw malformed(`server acknowledged ${OPT_NAMES[opt]} without NBD_INFO_EXPORT`);
    return { info, final };
  }

  /** Select the export and enter transmission. Falls back to EXPORT_NAME when GO is unknown. */
  go(name: string = this.target.exportName): Promise<NbdClient> {
    return this.step(`open export "${name}"`, async () => {
      let contextId: number | undefined;
      let info: NbdExportInfo | undefined;
      if (this.fixedNewstyle) {
        if (this.structured && this.opts.blockStatus !== false) contextId = await this.setMetaContext(name);
        const r = await this.infoOrGo(OPT.GO, name, [INFO.BLOCK_SIZE]);
        if (r.final.type === REP.ACK) info = r.info;
        else if (r.final.type !== REP_ERR_.UNSUP) throw optionFailure(OPT.GO, r.final, `opening export "${name}"`, this.target.label);
      }
      if (!info) {
        // Old server: NBD_OPT_EXPORT_NAME. It cannot fail politely: unknown exports hang up.
        this.stream.write(encodeOption(OPT.EXPORT_NAME, Buffer.from(name, 'utf8')));
        let r: { size: number; flags: number };
        try {
          r = await this.reader.next((b, o) => decodeExportNameReply(b, o, this.noZeroes));
        } catch (err) {
          if (err instanceof NbdClientError && err.code === 'SPW_ERR_NBD_CONNECTION_LOST') {
            throw new NbdClientError('SPW_ERR_NBD_CONNECTION_LOST', `the server at ${this.target.label} hung up after NBD_OPT_EXPORT_NAME: export "${name}" probably does not exist (or needs TLS)`, { cause: err });
          }
          throw err;
        }
        if (!Number.isSafeInteger(r.size)) throw malformed(`export size ${r.size} is not a safe integer`);
        info = { name, size: r.size, flags: r.flags };
        contextId = undefined; // meta contexts are only bound by GO
      }
      this.finished = true;
      this.deadline.cancel();
      const leftover = this.reader.detach();
      return new NbdClient({
        stream: this.stream,
        leftover,
        exportName: name,
        label: this.target.label,
        size: info.size!,
        flags: info.flags,
        blockSize: info.blockSize,
        structured: this.structured,
        baseAllocationId: contextId,
        tlsProtocol: this.tlsProtocol,
        maxInFlight: this.opts.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT,
        maxQueued: this.opts.maxQueued ?? DEFAULT_MAX_QUEUED,
      });
    });
  }

  private async setMetaContext(name: string): Promise<number | undefined> {
    const what = `selecting ${META_CONTEXT_BASE_ALLOCATION} on export "${name}"`;
    const { replies, final } = await this.exchange(OPT.SET_META_CONTEXT, encodeMetaContext({ name, queries: [META_CONTEXT_BASE_ALLOCATION] }), what);
    if (final.type === REP_ERR_.TLS_REQD || final.type === REP_ERR_.UNKNOWN || final.type === REP_ERR_.SHUTDOWN) {
      throw optionFailure(OPT.SET_META_CONTEXT, final, what, this.target.label);
    }
    if (final.type !== REP.ACK) return undefined; // no block status then
    let id: number | undefined;
    for (const r of replies) {
      if (r.type !== REP.META_CONTEXT) continue;
      const m = parseMetaContextReply(r.data);
      if (m.name === META_CONTEXT_BASE_ALLOCATION) id = m.id;
    }
    return id;
  }

  /** NBD_OPT_ABORT: soft disconnect. Waits briefly for the ACK or hang-up, then closes. */
  async abort(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    this.deadline.cancel();
    if (this.fixedNewstyle && !this.stream.destroyed) {
      this.stream.write(encodeOption(OPT.ABORT));
      const grace = setTimeout(() => this.reader.fail(new NbdClientError('SPW_ERR_NBD_CLOSED', 'gave up waiting for NBD_OPT_ABORT')), DISCONNECT_GRACE_MS);
      grace.unref();
      try {
        await this.reader.next(decodeOptionReply);
      } catch {
        // hang-up without ACK is allowed
      } finally {
        clearTimeout(grace);
      }
    }
    this.reader.detach();
    await endStream(this.stream);
  }

  /** Hard disconnect without ceremony. */
  destroy(): void {
    this.finished = true;
    this.deadline.cancel();
    this.reader.fail(new NbdClientError('SPW_ERR_NBD_CLOSED', 'negotiation was abandoned'));
    this.stream.destroy();
  }

}

/** end() the stream and wait for it to close; destroy it after a grace period. */
function endStream(stream: Duplex): Promise<void> {
  if (stream.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => stream.destroy(), DISCONNECT_GRACE_MS);
    timer.unref();
    const done = (): void => {
      clearTimeout(timer);
      resolve();
    };
    stream.once('close', done);
    stream.on('error', () => {});
    stream.end();
    // A Duplex that never emits 'close' (autoDestroy off) still finishes when both sides end.
    stream.resume();
  });
}

// ---------------------------------------------------------------------------------------------
// Transmission

interface Op {
  cmd: number;
  flags: number;
  offset: number;
  length: number;
  /** read destination / write source. */
  buf: Buffer | undefined;
  /** largest part. */
  partMax: number;
  /** bytes of [offset, offset+length) already handed to parts. */
  issued: number;
  /** parts sent and not answered yet. */
  outstanding: number;
  settled: boolean;
  queued: boolean;
  extents: Extent[] | undefined;
  resolve: (v: Extent[] | undefined) => void;
  reject: (e: Error) => void;
  cleanup: (() => void) | undefined;
}

interface Part {
  op: Op;
  handle: bigint;
  offset: number;
  length: number;
  /** a structured chunk for this part was seen (a simple reply after one is a violation). */
  structured: boolean;
  /** read bytes covered by data and hole chunks. */
  seen: number;
  error: NbdRequestError | undefined;
}

interface ReplyStructuredHeader {
  flags: number;
  type: number;
  handle: bigint;
  length: number;
}

type ParserState =
  | { s: 'header' }
  | { s: 'simple-data'; part: Part; pos: number }
  | { s: 'payload'; part: Part; hdr: ReplyStructuredHeader; pieces: Buffer[]; have: number; need: number }
  | { s: 'data'; part: Part; hdr: ReplyStructuredHeader; dst: number; left: number; discard: boolean };

/** What the reply parser needs from the connection. */
interface ReplySink {
  readonly structured: boolean;
  readonly maxChunk: number;
  readonly baseAllocationId: number | undefined;
  part(handle: bigint): Part | undefined;
  finish(part: Part): void;
  serverError(part: Part, error: number, message: string): NbdRequestError;
}

const EMPTY = Buffer.alloc(0);

/**
 * Incremental parser of the server's reply stream. Framing violations throw NbdProtocolError
 * (the connection cannot continue); semantic violations inside a well-framed reply fail only
 * that request (error code SPW_ERR_NBD_PROTOCOL) and the stream goes on.
 */
class ReplyParser {
  private readonly hdr = Buffer.alloc(STRUCTURED_REPLY_HEADER_SIZE);
  private hdrLen = 0;
  private state: ParserState = { s: 'header' };

  constructor(private readonly sink: ReplySink) {}

  feed(chunk: Buffer): void {
    let pos = 0;
    while (pos < chunk.length) {
      const st = this.state;
      switch (st.s) {
        case 'header': {
          // Simple replies are 16 bytes and structured headers 20: take 16, then 4 more if needed.
          const target = this.hdrLen < SIMPLE_REPLY_SIZE ? SIMPLE_REPLY_SIZE : STRUCTURED_REPLY_HEADER_SIZE;
          const n = Math.min(target - this.hdrLen, chunk.length - pos);
          chunk.copy(this.hdr, this.hdrLen, pos, pos + n);
          this.hdrLen += n;
          pos += n;
          if (this.hdrLen < 4) break;
          const r = decodeReplyHeader(this.hdr.subarray(0, this.hdrLen), 0, this.sink.maxChunk);
          if (r === NEED_MORE) break;
          this.hdrLen = 0;
          this.onHeader(r.msg);
          break;
        }
        case 'simple-data': {
          const part = st.part;
          const n = Math.min(part.length - st.pos, chunk.length - pos);
          if (!part.op.settled) chunk.copy(part.op.buf!, part.offset - part.op.offset + st.pos, pos, pos + n);
          st.pos += n;
          pos += n;
          if (st.pos === part.length) {
            this.state = { s: 'header' };
            this.sink.finish(part);
          }
          break;
        }
        case 'payload': {
          const n = Math.min(st.need - st.have, chunk.length - pos);
          st.pieces.push(chunk.subarray(pos, pos + n));
          st.have += n;
          pos += n;
          if (st.have === st.need) {
            const payload = st.pieces.length === 1 ? st.pieces[0]! : Buffer.concat(st.pieces);
            this.state = { s: 'header' };
            this.onPayload(st.part, st.hdr, payload);
          }
          break;
        }
        case 'data': {
          const n = Math.min(st.left, chunk.length - pos);
          const part = st.part;
          if (!st.discard && !part.op.settled) chunk.copy(part.op.buf!, st.dst, pos, pos + n);
          st.dst += n;
          st.left -= n;
          pos += n;
          if (st.left === 0) {
            this.state = { s: 'header' };
            if (st.hdr.flags & REPLY_FLAG_DONE) this.sink.finish(part);
          }
          break;
        }
      }
    }
  }

  /** Bytes of a reply are pending (the stream must not end here). */
  get midReply(): boolean {
    return this.state.s !== 'header' || this.hdrLen > 0;
  }

  private lookup(handle: bigint): Part {
    const part = this.sink.part(handle);
    if (!part) throw malformed(`reply for handle 0x${handle.toString(16)}, which is not in flight`);
    return part;
  }

  private onHeader(h: ReplyHeader): void {
    if (h.kind === 'simple') {
      const part = this.lookup(h.handle);
      if (part.structured) throw malformed('simple reply to a request that already had structured chunks');
      const cmd = part.op.cmd;
      if (h.error !== 0) {
        part.error = this.sink.serverError(part, h.error, '');
        this.sink.finish(part);
      } else if (cmd === CMD.READ) {
        // With structured replies negotiated a read must be answered with chunks: the length
        // of a simple reply's payload is not on the wire, so the stream cannot be trusted.
        if (this.sink.structured) throw malformed('simple reply with data to NBD_CMD_READ after structured replies were negotiated');
        this.state = { s: 'simple-data', part, pos: 0 };
      } else {
        this.sink.finish(part);
      }
      return;
    }
    if (!this.sink.structured) throw malformed('structured reply although structured replies were not negotiated');
    const part = this.lookup(h.handle);
    part.structured = true;
    const cmd = part.op.cmd;
    const { type, length } = h;
    let need: number;
    switch (type) {
      case REPLY_TYPE.NONE:
        if (length !== 0) throw malformed(`NBD_REPLY_TYPE_NONE with ${length} bytes of payload`);
        if (!(h.flags & REPLY_FLAG_DONE)) throw malformed('NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE');
        need = 0;
        break;
      case REPLY_TYPE.OFFSET_DATA:
        if (cmd !== CMD.READ) throw malformed(`data chunk in the reply to ${CMD_NAMES[cmd]}`);
        if (length <= OFFSET_DATA_HEADER_SIZE || length - OFFSET_DATA_HEADER_SIZE > part.length) {
          throw malformed(`data chunk of ${length} bytes for a read of ${part.length}`);
        }
        need = OFFSET_DATA_HEADER_SIZE; // then stream the data itself
        break;
      case REPLY_TYPE.OFFSET_HOLE:
        if (cmd !== CMD.READ) throw malformed(`hole chunk in the reply to ${CMD_NAMES[cmd]}`);
        if (length !== 12) throw malformed(`hole chunk of ${length} bytes is not 12`);
        need = 12;
        break;
      case REPLY_TYPE.BLOCK_STATUS:
        if (cmd !== CMD.BLOCK_STATUS) throw malformed(`block status chunk in the reply to ${CMD_NAMES[cmd]}`);
        if (length < 12 || (length - 4) % 8 !== 0) throw malformed(`block status chunk of ${length} bytes is not 4 + 8n (n >= 1)`);
        need = length;
        break;
      default:
        if (!isReplyTypeError(type)) throw malformed(`unknown structured reply type ${type}`);
        if (length < 6 || length > MAX_ERROR_CHUNK) throw malformed(`error chunk of ${length} bytes`);
        need = length;
    }
    if (need === 0) {
      this.onPayload(part, h, EMPTY);
      return;
    }
    this.state = { s: 'payload', part, hdr: h, pieces: [], have: 0, need };
  }

  private violation(part: Part, message: string): void {
    part.error ??= new NbdRequestError('EIO', 'SPW_ERR_NBD_PROTOCOL', `server broke the NBD protocol answering ${describePart(part)}: ${message}`);
  }

  private onPayload(part: Part, h: ReplyStructuredHeader, payload: Buffer): void {
    const end = part.offset + part.length;
    switch (h.type) {
      case REPLY_TYPE.NONE:
        break;
      case REPLY_TYPE.OFFSET_DATA: {
        const d = decodeOffsetDataHeader(payload, 0);
        const offset = d === NEED_MORE ? -1 : d.msg;
        const len = h.length - OFFSET_DATA_HEADER_SIZE;
        let discard = false;
        if (!(offset >= part.offset && offset + len <= end)) {
          this.violation(part, `data chunk at ${offset}+${len} outside the request`);
          discard = true;
        } else if (part.seen + len > part.length) {
          this.violation(part, 'overlapping data chunks');
          discard = true;
        }
        part.seen += len;
        this.state = { s: 'data', part, hdr: h, dst: offset - part.op.offset, left: len, discard };
        return; // finish() happens when the data has been copied
      }
      case REPLY_TYPE.OFFSET_HOLE: {
        const hole = parseOffsetHolePayload(payload);
        if (!(hole.length > 0 && hole.offset >= part.offset && hole.offset + hole.length <= end)) {
          this.violation(part, `hole chunk at ${hole.offset}+${hole.length} outside the request`);
        } else if (part.seen + hole.length > part.length) {
          this.violation(part, 'overlapping hole chunks');
        } else if (!part.op.settled) {
          const at = hole.offset - part.op.offset;
          part.op.buf!.fill(0, at, at + hole.length);
        }
        part.seen += hole.length;
        break;
      }
      case REPLY_TYPE.BLOCK_STATUS: {
        const bs = parseBlockStatusPayload(payload);
        if (bs.contextId !== this.sink.baseAllocationId) {
          this.violation(part, `block status for meta context ${bs.contextId}, which was not selected`);
        } else if (part.op.extents) {
          this.violation(part, 'two block status chunks for one context');
        } else {
          part.op.extents = toExtents(part.offset, part.length, bs.descriptors);
          if (part.op.extents.length === 0) this.violation(part, 'block status without a non-empty extent');
        }
        break;
      }
      default: {
        // Error chunks (including error types we do not know, which share the layout).
        const e = parseErrorPayload(payload, h.type === REPLY_TYPE.ERROR_OFFSET);
        if (e.error === 0) this.violation(part, 'error chunk with error 0');
        else if (h.type === REPLY_TYPE.ERROR_OFFSET && !(part.op.cmd === CMD.READ && e.offset! >= part.offset && e.offset! < end)) {
          this.violation(part, `error offset ${e.offset} outside the request`);
        } else part.error ??= this.sink.serverError(part, e.error, e.message);
      }
    }
    if (h.flags & REPLY_FLAG_DONE) this.sink.finish(part);
  }
}

function toExtents(offset: number, length: number, descriptors: ReadonlyArray<{ length: number; flags: number }>): Extent[] {
  const end = offset + length;
  const out: Extent[] = [];
  let at = offset;
  for (const d of descriptors) {
    if (at >= end) break; // the final extent may run past the request: clip it
    if (d.length === 0) continue;
    const len = Math.min(d.length, end - at);
    out.push({ offset: at, length: len, hole: (d.flags & STATE_HOLE) !== 0, zero: (d.flags & STATE_ZERO) !== 0 });
    at += len;
  }
  return out;
}

function describePart(part: Part): string {
  return `${CMD_NAMES[part.op.cmd] ?? part.op.cmd} ${part.offset}+${part.length}`;
}

interface ClientInit {
  stream: Duplex;
  leftover: Buffer;
  exportName: string;
  label: string;
  size: number;
  flags: number;
  blockSize: NbdBlockSize | undefined;
  structured: boolean;
  baseAllocationId: number | undefined;
  tlsProtocol: string | null;
  maxInFlight: number;
  maxQueued: number;
}

export interface NbdClientStats {
  requests: number;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
}

export interface NbdReadOptions {
  signal?: AbortSignal;
}
export interface NbdWriteOptions {
  fua?: boolean;
  signal?: AbortSignal;
}
export interface NbdZeroOptions extends NbdWriteOptions {
  /** NBD_CMD_FLAG_NO_HOLE: the range must stay allocated. */
  noHole?: boolean;
  /** NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than be slow. */
  fastZero?: boolean;
}

/**
 * A connected NBD client in the transmission phase. It sends what it is asked to (the server is
 * the judge of ranges and permissions, and its errors come back as NbdRequestError); it only
 * refuses what it cannot put on the wire (block status without a meta context).
 */
export class NbdClient {
  readonly exportName: string;
  /** export size in bytes. */
  readonly size: number;
  /** transmission flags (TFLAG.*). */
  readonly flags: number;
  /** block size constraints the server sent (NBD_INFO_BLOCK_SIZE), if any. */
  readonly blockSize: NbdBlockSize | undefined;
  readonly structuredReplies: boolean;
  /** base:allocation was negotiated: blockStatus() works. */
  readonly canBlockStatus: boolean;
  /** "TLSv1.3", or null without TLS. */
  readonly tlsProtocol: string | null;
  /** largest READ/WRITE payload sent in one request; larger ones are split. */
  readonly maxPayload: number;
  readonly label: string;
  readonly stats: NbdClientStats = { requests: 0, errors: 0, bytesRead: 0, bytesWritten: 0 };

  private readonly stream: Duplex;
  private readonly parser: ReplyParser;
  private readonly inflight = new Map<bigint, Part>();
  /** ops waiting for the window; slots before queueHead are spent. */
  private queue: Array<Op | undefined> = [];
  private queueHead = 0;
  private nextHandle = 1n;
  private writeBlocked = false;
  private dead: NbdRequestError | null = null;
  private closing = false;
  private closePromise: Promise<void> | null = null;
  private idleWaiters: Array<() => void> = [];
  private readonly maxInFlight: number;
  private readonly maxQueued: number;
  private readonly minBlock: number;

  /** @internal use NbdClient.connect() or NbdHandshake.go(). */
  constructor(init: ClientInit) {
    this.stream = init.stream;
    this.exportName = init.exportName;
    this.label = init.label;
    this.size = init.size;
    this.flags = init.flags;
    this.blockSize = init.blockSize;
    this.structuredReplies = init.structured;
    this.canBlockStatus = init.structured && init.baseAllocationId !== undefined;
    this.tlsProtocol = init.tlsProtocol;
    this.maxInFlight = Math.max(1, Math.floor(init.maxInFlight));
    this.maxQueued = Math.max(0, Math.floor(init.maxQueued));
    this.minBlock = init.blockSize?.minimum ?? 1;
    const max = Math.min(init.blockSize?.maximum ?? MAX_PAYLOAD, MAX_PAYLOAD);
    this.maxPayload = Math.max(this.minBlock, Math.floor(max / this.minBlock) * this.minBlock);
    this.parser = new ReplyParser({
      structured: init.structured,
      maxChunk: Math.max(this.maxPayload + OFFSET_DATA_HEADER_SIZE, 1 << 20),
      baseAllocationId: init.baseAllocationId,
      part: (handle) => this.inflight.get(handle),
      finish: (part) => this.finishPart(part),
      serverError: (part, error, message) => this.serverError(part, error, message),
    });
    this.stream.on('data', this.onData);
    this.stream.on('end', this.onEnd);
    this.stream.on('close', this.onEnd);
    this.stream.on('error', this.onError);
    if (init.leftover.length > 0) this.onData(init.leftover);
    this.stream.resume();
  }

  /** Connect and negotiate (see NbdHandshake for the steps). */
  static async connect(opts: NbdConnectOptions): Promise<NbdClient> {
    const hs = await NbdHandshake.start(opts);
    try {
      return await hs.go(opts.exportName);
    } catch (err) {
      await hs.abort().catch(() => hs.destroy());
      throw err;
    }
  }

  /** NBD_OPT_LIST on a fresh connection, then NBD_OPT_ABORT. */
  static async list(opts: NbdConnectOptions): Promise<NbdExportEntry[]> {
    const hs = await NbdHandshake.start(opts);
    try {
      return await hs.list();
    } finally {
      await hs.abort().catch(() => hs.destroy());
    }
  }

  /** NBD_OPT_INFO on a fresh connection, then NBD_OPT_ABORT. */
  static async info(opts: NbdConnectOptions, name?: string): Promise<NbdExportInfo> {
    const hs = await NbdHandshake.start(opts);
    try {
      return await hs.info(name ?? opts.exportName);
    } finally {
      await hs.abort().catch(() => hs.destroy());
    }
  }

  /** requests on the wire. */
  get inFlight(): number {
    return this.inflight.size;
  }
  /** requests waiting for the window. */
  get queued(): number {
    return this.queue.length - this.queueHead;
  }
  get closed(): boolean {
    return this.dead !== null;
  }

  read(offset: number, buf: Buffer, opts: NbdReadOptions = {}): Promise<void> {
    return this.submit(CMD.READ, 0, offset, buf.length, buf, this.maxPayload, opts.signal).then(() => undefined);
  }

  write(offset: number, data: Buffer, opts: NbdWriteOptions = {}): Promise<void> {
    return this.submit(CMD.WRITE, opts.fua ? CMD_FLAG.FUA : 0, offset, data.length, data, this.maxPayload, opts.signal).then(() => undefined);
  }

  flush(opts: NbdReadOptions = {}): Promise<void> {
    return this.submit(CMD.FLUSH, 0, 0, 0, undefined, 0, opts.signal).then(() => undefined);
  }

  trim(offset: number, length: number, opts: NbdWriteOptions = {}): Promise<void> {
    return this.submit(CMD.TRIM, opts.fua ? CMD_FLAG.FUA : 0, offset, length, undefined, this.noPayloadMax(), opts.signal).then(() => undefined);
  }

  writeZeroes(offset: number, length: number, opts: NbdZeroOptions = {}): Promise<void> {
    const flags = (opts.fua ? CMD_FLAG.FUA : 0) | (opts.noHole ? CMD_FLAG.NO_HOLE : 0) | (opts.fastZero ? CMD_FLAG.FAST_ZERO : 0);
    return this.submit(CMD.WRITE_ZEROES, flags, offset, length, undefined, this.noPayloadMax(), opts.signal).then(() => undefined);
  }

  cache(offset: number, length: number, opts: NbdReadOptions = {}): Promise<void> {
    return this.submit(CMD.CACHE, 0, offset, length, undefined, this.maxPayload, opts.signal).then(() => undefined);
  }

  /**
   * base:allocation extents from `offset`, contiguous, clipped to the request; they may stop
   * before `offset + length` (one request covers at most 2 GiB).
   */
  async blockStatus(offset: number, length: number, opts: NbdReadOptions & { reqOne?: boolean } = {}): Promise<Extent[]> {
    if (!this.canBlockStatus) {
      throw new NbdRequestError('ENOTSUP', 'SPW_ERR_NBD_UNSUPPORTED', `block status is not available on ${this.label}: the server did not agree to ${META_CONTEXT_BASE_ALLOCATION}`);
    }
    if (length === 0) return [];
    const len = Math.min(length, this.noPayloadMax());
    const r = await this.submit(CMD.BLOCK_STATUS, opts.reqOne ? CMD_FLAG.REQ_ONE : 0, offset, len, undefined, len, opts.signal);
    return r ?? [];
  }

  /**
   * Graceful close: refuse new requests, let queued and in-flight ones finish, send
   * NBD_CMD_DISC, and wait for the server to hang up. Idempotent.
   */
  close(): Promise<void> {
    this.closePromise ??= this.doClose();
    return this.closePromise;
  }

  /** Drop the connection now; everything pending rejects with SPW_ERR_NBD_CLOSED. */
  destroy(): void {
    this.closing = true;
    this.fail(new NbdRequestError('ESHUTDOWN', 'SPW_ERR_NBD_CLOSED', `connection to ${this.label} was closed by the client`));
  }

  private async doClose(): Promise<void> {
    this.closing = true;
    await new Promise<void>((resolve) => this.whenIdle(resolve));
    if (this.dead) return;
    const req = Buffer.alloc(REQUEST_SIZE);
    encodeRequest(req, 0, { flags: 0, type: CMD.DISC, handle: this.nextHandle++, offset: 0, length: 0 });
    this.stream.write(req);
    await endStream(this.stream);
    this.fail(new NbdRequestError('ESHUTDOWN', 'SPW_ERR_NBD_CLOSED', `connection to ${this.label} was closed by the client`));
  }

  private noPayloadMax(): number {
    return Math.floor(MAX_NO_PAYLOAD_LENGTH / this.minBlock) * this.minBlock;
  }

  private whenIdle(cb: () => void): void {
    if (this.dead || (this.inflight.size === 0 && this.queued === 0)) cb();
    else this.idleWaiters.push(cb);
  }

  private checkIdle(): void {
    if (this.idleWaiters.length > 0 && (this.dead || (this.inflight.size === 0 && this.queued === 0))) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const cb of w) cb();
    }
  }

  private submit(cmd: number, flags: number, offset: number, length: number, buf: Buffer | undefined, partMax: number, signal: AbortSignal | undefined): Promise<Extent[] | undefined> {
    if (this.dead) return Promise.reject(this.deadError());
    if (this.closing) return Promise.reject(new NbdRequestError('ESHUTDOWN', 'SPW_ERR_NBD_CLOSED', `connection to ${this.label} is closing`));
    if (signal?.aborted) return Promise.reject(abortedError(cmd, offset, length, signal));
    if (!(Number.isSafeInteger(offset) && offset >= 0 && Number.isSafeInteger(length) && length >= 0)) {
      return Promise.reject(new NbdRequestError('EINVAL', 'SPW_ERR_NBD_UNSUPPORTED', `bad range ${offset}+${length}`));
    }
    // Zero-length ranges are no-ops (and some servers reject them).
    if (length === 0 && cmd !== CMD.FLUSH) return Promise.resolve(undefined);
    if (this.queued >= this.maxQueued && (this.queued > 0 || this.inflight.size >= this.maxInFlight)) {
      return Promise.reject(new NbdRequestError('EIO', 'SPW_ERR_NBD_QUEUE_FULL', `${this.queued} requests already wait for ${this.label}; slow down or raise maxQueued`));
    }
    return new Promise((resolve, reject) => {
      const op: Op = {
        cmd,
        flags,
        offset,
        length,
        buf,
        partMax: Math.max(1, partMax),
        issued: 0,
        outstanding: 0,
        settled: false,
        queued: true,
        extents: undefined,
        resolve,
        reject,
        cleanup: undefined,
      };
      if (signal) {
        const onAbort = (): void => this.abortOp(op, signal);
        signal.addEventListener('abort', onAbort, { once: true });
        op.cleanup = () => signal.removeEventListener('abort', onAbort);
      }
      this.queue.push(op);
      this.pump();
    });
  }

  private abortOp(op: Op, signal: AbortSignal): void {
    if (op.settled) return;
    if (op.queued && op.issued === 0) {
      // Never reached the wire: forget it.
      const i = this.queue.indexOf(op, this.queueHead);
      if (i >= 0) this.queue.splice(i, 1);
      op.queued = false;
    }
    // Parts on the wire stay in the handle map; their data is discarded when it arrives.
    this.settle(op, abortedError(op.cmd, op.offset, op.length, signal));
    this.checkIdle();
  }

  private settle(op: Op, err: Error | null): void {
    if (op.settled) return;
    op.settled = true;
    op.cleanup?.();
    if (err) {
      this.stats.errors++;
      op.reject(err);
    } else {
      if (op.cmd === CMD.READ) this.stats.bytesRead += op.length;
      else if (op.cmd === CMD.WRITE) this.stats.bytesWritten += op.length;
      op.resolve(op.extents);
    }
  }

  /** Move requests from the queue onto the wire while the window and the socket allow. */
  private pump(): void {
    while (!this.dead && !this.writeBlocked && this.inflight.size < this.maxInFlight && this.queueHead < this.queue.length) {
      const op = this.queue[this.queueHead]!;
      if (op.settled) {
        this.dequeue(op);
        continue;
      }
      const rel = op.issued;
      const len = Math.min(op.partMax, op.length - rel);
      op.issued += len;
      if (op.issued >= op.length) this.dequeue(op);
      const part: Part = { op, handle: this.nextHandle++, offset: op.offset + rel, length: len, structured: false, seen: 0, error: undefined };
      op.outstanding++;
      this.inflight.set(part.handle, part);
      this.stats.requests++;
      const h = Buffer.allocUnsafe(REQUEST_SIZE);
      encodeRequest(h, 0, { flags: op.flags, type: op.cmd, handle: part.handle, offset: part.offset, length: len });
      let ok: boolean;
      if (op.cmd === CMD.WRITE) {
        this.stream.cork();
        this.stream.write(h);
        ok = this.stream.write(op.buf!.subarray(rel, rel + len));
        this.stream.uncork();
      } else {
        ok = this.stream.write(h);
      }
      if (!ok) {
        this.writeBlocked = true;
        this.stream.once('drain', () => {
          this.writeBlocked = false;
          this.pump();
        });
      }
    }
    if (this.queueHead > 1024 && this.queueHead * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.queueHead);
      this.queueHead = 0;
    }
  }

  private dequeue(op: Op): void {
    // Only ever the head of the queue.
    this.queue[this.queueHead] = undefined;
    this.queueHead++;
    op.queued = false;
    if (this.queueHead === this.queue.length) {
      this.queue = [];
      this.queueHead = 0;
    }
  }

  private finishPart(part: Part): void {
    this.inflight.delete(part.handle);
    const op = part.op;
    op.outstanding--;
    if (!op.settled) {
      let err = part.error;
      if (!err && op.cmd === CMD.READ && this.structuredReplies && part.seen !== part.length) {
        err = new NbdRequestError('EIO', 'SPW_ERR_NBD_PROTOCOL', `server broke the NBD protocol answering ${describePart(part)}: it sent ${part.seen} of ${part.length} bytes`);
      }
      if (!err && op.cmd === CMD.BLOCK_STATUS && !op.extents) {
        err = new NbdRequestError('EIO', 'SPW_ERR_NBD_PROTOCOL', `server broke the NBD protocol answering ${describePart(part)}: no extents`);
      }
      if (err) this.settle(op, err);
      else if (op.outstanding === 0 && op.issued >= op.length && !op.queued) this.settle(op, null);
      if (err?.errno === 'ESHUTDOWN' && err.code === 'SPW_ERR_NBD_SERVER_ERROR') {
        // proto.md: a client receiving ESHUTDOWN MUST initiate a soft disconnect.
        void this.close();
      }
    }
    this.pump();
    this.checkIdle();
  }

  private serverError(part: Part, error: number, message: string): NbdRequestError {
    const errno = errnoOfNbd(error);
    const text = message ? `: ${message}` : '';
    return new NbdRequestError(errno, 'SPW_ERR_NBD_SERVER_ERROR', `${this.label} failed ${describePart(part)} with ${errno} (${error})${text}`, { nbdError: error });
  }

  private deadError(): NbdRequestError {
    const d = this.dead!;
    return new NbdRequestError(d.errno, d.code, d.message, { cause: d.cause });
  }

  /** The connection is over: reject everything pending, drop the socket. */
  private fail(err: NbdRequestError): void {
    if (this.dead) return;
    this.dead = err;
    const ops = new Set<Op>();
    for (const part of this.inflight.values()) ops.add(part.op);
    for (let i = this.queueHead; i < this.queue.length; i++) {
      const op = this.queue[i];
      if (op) ops.add(op);
    }
    this.inflight.clear();
    this.queue = [];
    this.queueHead = 0;
    for (const op of ops) {
      op.queued = false;
      this.settle(op, new NbdRequestError(err.errno, err.code, `${err.message} (${CMD_NAMES[op.cmd]} ${op.offset}+${op.length} not answered)`, { cause: err.cause }));
    }
    this.stream.off('data', this.onData);
    this.stream.on('error', () => {});
    this.stream.destroy();
    this.checkIdle();
  }

  private readonly onData = (chunk: Buffer): void => {
    if (this.dead) return;
    try {
      this.parser.feed(chunk);
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      this.fail(new NbdRequestError('EIO', 'SPW_ERR_NBD_PROTOCOL', `server at ${this.label} broke the NBD protocol (${msg}); connection dropped`, { cause: e }));
    }
  };

  private readonly onEnd = (): void => {
    if (this.dead) return;
    if (this.closing && this.inflight.size === 0 && this.queued === 0) {
      this.fail(new NbdRequestError('ESHUTDOWN', 'SPW_ERR_NBD_CLOSED', `connection to ${this.label} was closed`));
      return;
    }
    const mid = this.parser.midReply ? ' in the middle of a reply' : '';
    this.fail(new NbdRequestError('EIO', 'SPW_ERR_NBD_CONNECTION_LOST', `connection to NBD server ${this.label} was lost${mid}`));
  };

  private readonly onError = (err: Error): void => {
    this.fail(new NbdRequestError('EIO', 'SPW_ERR_NBD_CONNECTION_LOST', `connection to NBD server ${this.label} failed: ${err.message}`, { cause: err }));
  };
}

function abortedError(cmd: number, offset: number, length: number, signal: AbortSignal): NbdRequestError {
  return new NbdRequestError('ESHUTDOWN', 'SPW_ERR_NBD_ABORTED', `${CMD_NAMES[cmd]} ${offset}+${length} was aborted`, { cause: signal.reason });
}

// ---------------------------------------------------------------------------------------------
// BlockDevice

/**
 * The BlockDevice on top of a connected NbdClient. Capabilities are decided once from the
 * transmission flags and block size constraints. Like every layer it asserts ranges (EINVAL)
 * and writability (EPERM) itself; what the server lacks is emulated where the contract allows
 * (FUA as write + flush, zeroes as writes) and skipped where it is advisory (cache, flush
 * without a volatile cache).
 *
 * trim() is sent as NBD_CMD_WRITE_ZEROES without NO_HOLE: the server may deallocate, and the
 * range reads as zeroes afterwards, as the BlockDevice contract says. NBD_CMD_TRIM promises no
 * contents, so a server with TRIM but without WRITE_ZEROES gets `trim: false`.
 */
export class NbdBlockDevice implements BlockDevice {
  readonly size: number;
  readonly capabilities: BlockCapabilities;
  readonly description: string;

  constructor(readonly client: NbdClient) {
    const f = client.flags;
    const has = (flag: number): boolean => (f & flag) !== 0;
    const writable = !has(TFLAG.READ_ONLY);
    const zero = writable && has(TFLAG.SEND_WRITE_ZEROES);
    const blockSize: BlockSizeConstraints = {
      minimum: client.blockSize?.minimum ?? 1,
      preferred: Math.min(client.blockSize?.preferred ?? 4096, client.maxPayload),
      maximum: client.maxPayload,
    };
    this.size = client.size;
    this.capabilities = {
      writable,
      flush: has(TFLAG.SEND_FLUSH),
      fua: writable && has(TFLAG.SEND_FUA),
      trim: zero,
      zero,
      fastZero: zero && has(TFLAG.SEND_FAST_ZERO),
      extents: client.canBlockStatus,
      cache: has(TFLAG.SEND_CACHE),
      multiConn: has(TFLAG.CAN_MULTI_CONN),
      blockSize,
    };
    const name = client.exportName ? `/${client.exportName}` : '';
    this.description = `nbd(${client.label}${name})`;
  }

  static async open(opts: NbdConnectOptions): Promise<NbdBlockDevice> {
    return new NbdBlockDevice(await NbdClient.connect(opts));
  }

  private writableRange(offset: number, length: number): void {
    assertRange(this, offset, length);
    if (!this.capabilities.writable) throw new BlockError('EPERM', `${this.description} is read-only`);
  }

  async read(offset: number, buf: Buffer, opts?: IoOptions): Promise<void> {
    assertRange(this, offset, buf.length);
    await this.client.read(offset, buf, { signal: opts?.signal });
  }

  async write(offset: number, data: Buffer, opts?: IoOptions): Promise<void> {
    this.writableRange(offset, data.length);
    const nativeFua = !!opts?.fua && this.capabilities.fua;
    await this.client.write(offset, data, { fua: nativeFua, signal: opts?.signal });
    if (opts?.fua && !nativeFua) await this.flush(opts);
  }

  async flush(opts?: IoOptions): Promise<void> {
    if (this.capabilities.flush) await this.client.flush({ signal: opts?.signal });
  }

  async trim(offset: number, length: number, opts?: IoOptions): Promise<void> {
    this.writableRange(offset, length);
    if (!this.capabilities.trim || length === 0) return; // advisory
    const nativeFua = !!opts?.fua && this.capabilities.fua;
    await this.client.writeZeroes(offset, length, { fua: nativeFua, noHole: false, signal: opts?.signal });
    if (opts?.fua && !nativeFua) await this.flush(opts);
  }

  async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    this.writableRange(offset, length);
    const caps = this.capabilities;
    if (opts?.fastOnly && !caps.fastZero) {
      throw new NbdRequestError('ENOTSUP', 'SPW_ERR_NBD_UNSUPPORTED', `${this.description} cannot zero fast`);
    }
    if (length === 0) return;
    const nativeFua = !!opts?.fua && caps.fua && caps.zero;
    if (caps.zero) {
      await this.client.writeZeroes(offset, length, { fua: nativeFua, noHole: !opts?.mayTrim, fastZero: !!opts?.fastOnly, signal: opts?.signal });
    } else {
      const zeroes = Buffer.alloc(Math.min(length, caps.blockSize.maximum, 1 << 20));
      for (let at = 0; at < length; at += zeroes.length) {
        const n = Math.min(zeroes.length, length - at);
        await this.client.write(offset + at, zeroes.subarray(0, n), { signal: opts?.signal });
      }
    }
    if (opts?.fua && !nativeFua) await this.flush(opts);
  }

  async blockStatus(offset: number, length: number, opts?: IoOptions): Promise<Extent[]> {
    assertRange(this, offset, length);
    if (length === 0) return [];
    if (!this.capabilities.extents) return [{ offset, length, hole: false, zero: false }];
    return this.client.blockStatus(offset, length, { signal: opts?.signal });
  }

  async cache(offset: number, length: number, opts?: IoOptions): Promise<void> {
    assertRange(this, offset, length);
    if (this.capabilities.cache) await this.client.cache(offset, length, { signal: opts?.signal });
  }

  close(): Promise<void> {
    return this.client.close();
  }
}
