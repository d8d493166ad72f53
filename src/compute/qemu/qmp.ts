// A QMP client (QEMU Machine Protocol: JSON objects, one per line, over a UNIX socket).
//
// QEMU greets with {"QMP": {...}}; the client must send qmp_capabilities before anything else.
// Commands carry an `id` that QEMU echoes in its {"return": ...} or {"error": {...}} reply;
// asynchronous events ({"event": ..., "data": ..., "timestamp": ...}) can arrive at any time.
// QemuLineDecoder is the pure, incremental part (bytes in, messages out, a bound on line length);
// QmpClient does the socket, the ids, the timeouts and keeps the most recent events.

import { EventEmitter } from 'node:events';
import net from 'node:net';

import { ComputeError, QmpError, QmpProtocolError } from './errors.js';

/** Longest line accepted from QEMU (query-blockstats of many disks is large, but not this). */
export const QMP_MAX_LINE_BYTES = 16 * 1024 * 1024;

export interface QmpGreeting {
  kind: 'greeting';
  /** QEMU's version object, e.g. {qemu: {major: 7, minor: 2, micro: 22}, package: "..."}. */
  version: Record<string, unknown>;
  capabilities: string[];
}

export interface QmpReturn {
  kind: 'return';
  id?: unknown;
  value: unknown;
}

export interface QmpErrorReply {
  kind: 'error';
  id?: unknown;
  errorClass: string;
  desc: string;
}

export interface QmpEvent {
  kind: 'event';
  event: string;
  data: Record<string, unknown>;
  /** When QEMU emitted it (seconds since the epoch, with microseconds). */
  timestamp: { seconds: number; microseconds: number };
  /** Position in this client's event stream (1, 2, ...), for waitForEvent's `after`. */
  seq: number;
}

export type QmpMessage = QmpGreeting | QmpReturn | QmpErrorReply | Omit<QmpEvent, 'seq'>;

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function describe(line: string): string {
  return JSON.stringify(line.length > 200 ? `${line.slice(0, 200)}…` : line);
}

/** Classify one QMP line (without its line ending). Throws QmpProtocolError for anything else. */
export function parseQmpLine(line: string): QmpMessage {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch (e) {
    throw new QmpProtocolError(`QMP: a line is not JSON (${(e as Error).message}): ${describe(line)}`);
  }
  if (!isObject(v)) throw new QmpProtocolError(`QMP: a line is JSON but not an object: ${describe(line)}`);
  const id = 'id' in v ? { id: v.id } : {};
  if ('return' in v) return { kind: 'return', ...id, value: v.return };
  if ('error' in v) {
    const err = v.error;
    if (!isObject(err) || typeof err.class !== 'string' || typeof err.desc !== 'string') {
      throw new QmpProtocolError(`QMP: an error reply without class and desc strings: ${describe(line)}`);
    }
    return { kind: 'error', ...id, errorClass: err.class, desc: err.desc };
  }
  if ('event' in v) {
    const ts = v.timestamp;
    if (typeof v.event !== 'string' || !isObject(ts) || typeof ts.seconds !== 'number' || typeof ts.microseconds !== 'number') {
      throw new QmpProtocolError(`QMP: an event without a name and timestamp: ${describe(line)}`);
    }
    const data = v.data === undefined ? {} : v.data;
    if (!isObject(data)) throw new QmpProtocolError(`QMP: an event whose data is not an object: ${describe(line)}`);
    return { kind: 'event', event: v.event, data, timestamp: { seconds: ts.seconds, microseconds: ts.microseconds } };
  }
  if ('QMP' in v) {
    const g = v.QMP;
    if (!isObject(g) || !Array.isArray(g.capabilities) || !g.capabilities.every((c) => typeof c === 'string')) {
      throw new QmpProtocolError(`QMP: a greeting without capabilities: ${describe(line)}`);
    }
    return { kind: 'greeting', version: isObject(g.version) ? g.version : {}, capabilities: g.capabilities as string[] };
  }
  throw new QmpProtocolError(`QMP: an object that is neither a greeting, a reply nor an event: ${describe(line)}`);
}

const NEWLINE = 0x0a;
const utf8 = new TextDecoder('utf-8', { fatal: true });

/**
 * Incremental line decoder: push() the bytes as they come, get the complete messages back.
 * A line longer than `maxLineBytes` is refused as soon as that many bytes without a newline are
 * pending, before any more is buffered. After a QmpProtocolError the decoder refuses all input.
 */
export class QmpLineDecoder {
  private pending: Buffer[] = [];
  private pendingLength = 0;
  private broken: QmpProtocolError | undefined;

  constructor(readonly maxLineBytes: number = QMP_MAX_LINE_BYTES) {}

  /** Bytes of an incomplete line held so far. */
  get pendingBytes(): number {
    return this.pendingLength;
  }

  push(chunk: Uint8Array): QmpMessage[] {
    if (this.broken) throw this.broken;
    try {
      return this.decode(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
    } catch (e) {
      this.broken = e instanceof QmpProtocolError ? e : new QmpProtocolError(`QMP: ${(e as Error).message}`);
      this.pending = [];
      this.pendingLength = 0;
      throw this.broken;
    }
  }

  /** The stream ended: an incomplete last line is an error (QEMU ends every line). */
  end(): void {
    if (this.broken) throw this.broken;
    if (this.pendingLength > 0) {
      this.broken = new QmpProtocolError(`QMP: the stream ended inside a line (${this.pendingLength} bytes without a newline)`);
      throw this.broken;
    }
  }

  private decode(buf: Buffer): QmpMessage[] {
    const out: QmpMessage[] = [];
    let start = 0;
    while (start < buf.length) {
      const nl = buf.indexOf(NEWLINE, start);
      const end = nl === -1 ? buf.length : nl;
      const length = this.pendingLength + (end - start);
      // The line ending (\r\n or \n) does not count: a \r at the end may be its first half.
      if (length > this.maxLineBytes + 1) {
        throw new QmpProtocolError(`QMP: a line longer than ${this.maxLineBytes} bytes; refusing it (is this socket really QEMU's QMP monitor?)`);
      }
      if (nl === -1) {
        this.pending.push(buf.subarray(start));
        this.pendingLength = length;
        break;
      }
      let line = this.pendingLength > 0 ? Buffer.concat([...this.pending, buf.subarray(start, end)]) : buf.subarray(start, end);
      this.pending = [];
      this.pendingLength = 0;
      start = nl + 1;
      if (line.length > 0 && line[line.length - 1] === 0x0d) line = line.subarray(0, line.length - 1);
      if (line.length > this.maxLineBytes) {
        throw new QmpProtocolError(`QMP: a line longer than ${this.maxLineBytes} bytes; refusing it (is this socket really QEMU's QMP monitor?)`);
      }
      if (line.length === 0) continue;
      let text: string;
      try {
        text = utf8.decode(line);
      } catch {
        throw new QmpProtocolError('QMP: a line is not valid UTF-8');
      }
      out.push(parseQmpLine(text));
    }
    return out;
  }
}

export interface QmpConnectOptions {
  /** For connecting, the greeting and qmp_capabilities together (default 10 s). */
  timeoutMs?: number;
  signal?: AbortSignal;
  maxLineBytes?: number;
  /** How many recent events to keep for waitForEvent() and events (default 256). */
  eventHistory?: number;
  /** Default timeout of execute() (default 30 s). */
  commandTimeoutMs?: number;
}

export interface QmpExecuteOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
  cleanup: () => void;
}

type QmpClientEvents = {
  /** Every asynchronous event, as it arrives. */
  event: [QmpEvent];
  /** The connection is gone; the error says why (undefined after close()). */
  close: [Error | undefined];
};

/**
 * One QMP connection. QEMU serves one client per QMP socket at a time: a second client's connect
 * succeeds but gets no greeting until the first one disconnects, so connect() times out with
 * SPW_ERR_QMP_CONNECT in that case. Replies are matched by id; a reply that comes after its
 * command timed out is dropped.
 */
export class QmpClient extends EventEmitter<QmpClientEvents> {
  private readonly pending = new Map<string, Pending>();
  private readonly recent: QmpEvent[] = [];
  private nextId = 1;
  private nextSeq = 1;
  private closedWith: Error | undefined;
  private isClosed = false;

  private constructor(
    private readonly socket: net.Socket,
    private readonly decoder: QmpLineDecoder,
    readonly greeting: QmpGreeting,
    readonly socketPath: string,
    private readonly eventHistory: number,
    private readonly commandTimeoutMs: number,
  ) {
    super();
  }

  /** Connect, read the greeting and negotiate capabilities (none requested). */
  static async connect(socketPath: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const decoder = new QmpLineDecoder(opts.maxLineBytes ?? QMP_MAX_LINE_BYTES);
    opts.signal?.throwIfAborted();
    const socket = net.connect(socketPath);
    const early: QmpMessage[] = [];
    let onData: ((d: Buffer) => void) | undefined;
    const greeting = await new Promise<QmpGreeting>((resolve, reject) => {
      const fail = (why: string, cause?: unknown) => {
        cleanup();
        socket.destroy();
        reject(new ComputeError('SPW_ERR_QMP_CONNECT', `QMP ${socketPath}: ${why}`, cause === undefined ? undefined : { cause }));
      };
      const timer = setTimeout(
        () => fail(`no greeting within ${timeoutMs} ms (QEMU serves one QMP client at a time: is another one connected?)`),
        timeoutMs,
      );
      const onAbort = () => fail('aborted');
      const onError = (e: Error) => fail(`cannot connect (${e.message}); is the VM running?`, e);
      const onClose = () => fail('closed before the greeting (QEMU exited?)');
      onData = (d: Buffer) => {
        let msgs: QmpMessage[];
        try {
          msgs = decoder.push(d);
        } catch (e) {
          fail((e as Error).message, e);
          return;
        }
        for (const m of msgs) early.push(m);
        const first = early.shift();
        if (first === undefined) return;
        if (first.kind !== 'greeting') {
          fail(`expected the QMP greeting, got a ${first.kind}`);
          return;
        }
        cleanup();
        resolve(first);
      };
      const cleanup = () => {
        clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
        socket.off('error', onError);
        socket.off('close', onClose);
        if (onData) socket.off('data', onData);
      };
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      socket.on('error', onError);
      socket.on('close', onClose);
      socket.on('data', onData);
    });
    const client = new QmpClient(socket, decoder, greeting, socketPath, opts.eventHistory ?? 256, opts.commandTimeoutMs ?? 30_000);
    client.attach(early);
    try {
      await client.execute('qmp_capabilities', undefined, { timeoutMs, ...(opts.signal ? { signal: opts.signal } : {}) });
    } catch (e) {
      client.destroy(e as Error);
      throw new ComputeError('SPW_ERR_QMP_CONNECT', `QMP ${socketPath}: qmp_capabilities failed: ${(e as Error).message}`, { cause: e });
    }
    return client;
  }

  /** True once the connection is gone. */
  get closed(): boolean {
    return this.isClosed;
  }

  /** The most recent events (at most `eventHistory`), oldest first. */
  get events(): readonly QmpEvent[] {
    return this.recent;
  }

  /** Sequence number of the newest event seen so far (0 when none): pass it as waitForEvent's `after`. */
  get lastEventSeq(): number {
    return this.nextSeq - 1;
  }

  /** Run a command; resolves with its `return` value, rejects with QmpError on an error reply. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: QmpExecuteOptions = {}): Promise<T> {
    if (this.isClosed) {
      return Promise.reject(new ComputeError('SPW_ERR_QMP_CLOSED', `QMP ${this.socketPath}: connection closed; cannot run ${command}${this.closedWith ? ` (${this.closedWith.message})` : ''}`));
    }
    if (opts.signal?.aborted) return Promise.reject(new ComputeError('SPW_ERR_QMP_TIMEOUT', `QMP ${command}: aborted before it was sent`));
    const id = `spw-${this.nextId++}`;
    const timeoutMs = opts.timeoutMs ?? this.commandTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const onAbort = () => {
        p.cleanup();
        this.pending.delete(id);
        reject(new ComputeError('SPW_ERR_QMP_TIMEOUT', `QMP ${command}: aborted while waiting for the reply`));
      };
      const timer = setTimeout(() => {
        p.cleanup();
        this.pending.delete(id);
        reject(new ComputeError('SPW_ERR_QMP_TIMEOUT', `QMP ${command}: no reply within ${timeoutMs} ms (QEMU hung, or the command is slow: raise timeoutMs)`));
      }, timeoutMs);
      const p: Pending = {
        command,
        resolve: resolve as (v: unknown) => void,
        reject,
        timer,
        cleanup: () => {
          clearTimeout(timer);
          opts.signal?.removeEventListener('abort', onAbort);
        },
      };
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      this.pending.set(id, p);
      this.socket.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id }) + '\n');
    });
  }

  /**
   * Resolve with the first event named `name` (and accepted by `match`) whose seq is above
   * `after`: one already kept in the history, or the next to arrive. Default `after`: now.
   */
  waitForEvent(name: string, opts: { after?: number; match?: (e: QmpEvent) => boolean; timeoutMs?: number; signal?: AbortSignal } = {}): Promise<QmpEvent> {
    const after = opts.after ?? this.lastEventSeq;
    const ok = (e: QmpEvent) => e.seq > after && e.event === name && (opts.match?.(e) ?? true);
    const found = this.recent.find(ok);
    if (found) return Promise.resolve(found);
    if (this.isClosed) return Promise.reject(new ComputeError('SPW_ERR_QMP_CLOSED', `QMP ${this.socketPath}: connection closed while waiting for event ${name}`));
    const timeoutMs = opts.timeoutMs ?? this.commandTimeoutMs;
    return new Promise<QmpEvent>((resolve, reject) => {
      const done = (err: Error | undefined, ev?: QmpEvent) => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
        opts.signal?.removeEventListener('abort', onAbort);
        if (err) reject(err);
        else resolve(ev as QmpEvent);
      };
      const onEvent = (e: QmpEvent) => {
        if (ok(e)) done(undefined, e);
      };
      const onClose = () => done(new ComputeError('SPW_ERR_QMP_CLOSED', `QMP ${this.socketPath}: connection closed while waiting for event ${name}`));
      const onAbort = () => done(new ComputeError('SPW_ERR_QMP_TIMEOUT', `QMP: aborted while waiting for event ${name}`));
      const timer = setTimeout(() => done(new ComputeError('SPW_ERR_QMP_TIMEOUT', `QMP: no ${name} event within ${timeoutMs} ms`)), timeoutMs);
      this.on('event', onEvent);
      this.on('close', onClose);
      opts.signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  /** Close the connection (QEMU keeps running); pending commands reject with SPW_ERR_QMP_CLOSED. */
  async close(): Promise<void> {
    if (this.isClosed) return;
    const gone = new Promise<void>((resolve) => this.socket.once('close', () => resolve()));
    this.destroy(undefined);
    await gone;
  }

  private attach(early: QmpMessage[]): void {
    for (const m of early) this.dispatch(m);
    this.socket.on('data', (d: Buffer) => {
      let msgs: QmpMessage[];
      try {
        msgs = this.decoder.push(d);
      } catch (e) {
        this.destroy(e as Error);
        return;
      }
      for (const m of msgs) this.dispatch(m);
    });
    this.socket.on('error', (e) => this.destroy(new ComputeError('SPW_ERR_QMP_CLOSED', `QMP ${this.socketPath}: ${e.message}`, { cause: e })));
    this.socket.on('close', () => this.destroy(this.isClosed ? undefined : new ComputeError('SPW_ERR_QMP_CLOSED', `QMP ${this.socketPath}: QEMU closed the connection (did it exit?)`)));
  }

  private dispatch(m: QmpMessage): void {
    switch (m.kind) {
      case 'event': {
        const ev: QmpEvent = { ...m, seq: this.nextSeq++ };
        this.recent.push(ev);
        if (this.recent.length > this.eventHistory) this.recent.splice(0, this.recent.length - this.eventHistory);
        this.emit('event', ev);
        return;
      }
      case 'return':
      case 'error': {
        const id = typeof m.id === 'string' ? m.id : undefined;
        const p = id === undefined ? undefined : this.pending.get(id);
        if (!p || id === undefined) return; // late reply to a timed-out command, or not ours
        this.pending.delete(id);
        p.cleanup();
        if (m.kind === 'return') p.resolve(m.value);
        else p.reject(new QmpError(p.command, m.errorClass, m.desc));
        return;
      }
      case 'greeting':
        this.destroy(new QmpProtocolError(`QMP ${this.socketPath}: a second greeting`));
        return;
    }
  }

  private destroy(err: Error | undefined): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.closedWith = err;
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      p.cleanup();
      p.reject(
        err instanceof ComputeError && err.code !== 'SPW_ERR_QMP_CLOSED'
          ? err
          : new ComputeError('SPW_ERR_QMP_CLOSED', `QMP ${p.command}: the connection closed before the reply${err ? ` (${err.message})` : ''}`, err ? { cause: err } : undefined),
      );
    }
    this.socket.destroy();
    this.emit('close', err);
  }
}
