// NBD peers for tests: real servers (qemu-nbd, nbdkit, nbd-server) started on free ports, an
// in-memory Duplex pair, and a scripted server for what no real server does on demand (a server
// without NBD_OPT_GO, or one that sends arbitrary bytes).

import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Duplex } from 'node:stream';

import {
  decodeClientFlags,
  decodeOption,
  decodeRequest,
  encodeExportNameReply,
  encodeInfoExport,
  encodeMetaContextReply,
  encodeOptionReply,
  encodeServerGreeting,
  encodeSimpleReply,
  NEED_MORE,
  parseGoInfo,
  type Decoded,
  type RequestHeader,
} from '../../src/nbd/codec.js';
import { CMD, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, OPT, REP, REP_ERR_, SIMPLE_REPLY_SIZE, TFLAG } from '../../src/nbd/protocol.js';
import { freePort, startProc, waitForListen, type Proc } from './proc.js';

export interface Peer {
  proc: Proc;
  uri: string;
  port?: number;
  socket?: string;
  stop: () => Promise<void>;
}

async function started(proc: Proc, target: { port: number } | { path: string }, uri: string): Promise<Peer> {
  const early = proc.exited.then((r) => {
    throw new Error(`server exited early (${JSON.stringify(r)}):\n${proc.stderr()}`);
  });
  early.catch(() => {});
  try {
    await Promise.race([waitForListen(target), early]);
  } catch (e) {
    await proc.stop('SIGKILL');
    throw new Error(`${(e as Error).message}\n${proc.stderr()}`);
  }
  const base = 'port' in target ? { port: target.port } : { socket: target.path };
  return { proc, uri, ...base, stop: async () => void (await proc.stop()) };
}

export interface QemuNbdOptions {
  format: 'raw' | 'qcow2';
  exportName?: string;
  readOnly?: boolean;
  /** directory with ca-cert.pem, server-cert.pem, server-key.pem; clients must present a cert. */
  tlsDir?: string;
  socket?: string;
}

export async function startQemuNbd(image: string, o: QemuNbdOptions): Promise<Peer> {
  const name = o.exportName ?? 'disk';
  const args = ['-f', o.format, '--persistent', '--shared=16', '-x', name, '--discard=unmap', '--cache=writeback'];
  if (o.readOnly) args.push('--read-only');
  if (o.tlsDir) {
    args.push('--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${o.tlsDir},verify-peer=on`, '--tls-creds', 'tls0');
  }
  if (o.socket) {
    const proc = startProc('qemu-nbd', [...args, '--socket', o.socket, image]);
    return started(proc, { path: o.socket }, `nbd+unix:///${name}?socket=${o.socket}`);
  }
  const port = await freePort();
  const proc = startProc('qemu-nbd', [...args, '--bind', '127.0.0.1', '--port', String(port), image]);
  return started(proc, { port }, `nbd://127.0.0.1:${port}/${name}`);
}

export interface NbdkitOptions {
  /** --tls=require --tls-certificates=DIR --tls-verify-peer */
  tlsDir?: string;
  socket?: string;
  /** extra nbdkit options before the plugin (filters, --mask-handshake, …). */
  before?: string[];
}

/** nbdkit in the foreground; `plugin` is the plugin name followed by its parameters. */
export async function startNbdkit(plugin: string[], o: NbdkitOptions = {}): Promise<Peer> {
  const args = ['--foreground', '--exit-with-parent', ...(o.before ?? [])];
  if (o.tlsDir) args.push('--tls=require', `--tls-certificates=${o.tlsDir}`, '--tls-verify-peer');
  if (o.socket) {
    const proc = startProc('nbdkit', [...args, '--unix', o.socket, ...plugin]);
    return started(proc, { path: o.socket }, `nbd+unix:///?socket=${o.socket}`);
  }
  const port = await freePort();
  const proc = startProc('nbdkit', [...args, '--ipaddr', '127.0.0.1', '--port', String(port), ...plugin]);
  return started(proc, { port }, `nbd://127.0.0.1:${port}/`);
}

/**
 * Waits until something LISTENs on 127.0.0.1:port without connecting to it. nbd-server run
 * with -d serves in its main process and exits when a session ends badly, so a probe
 * connection (as waitForListen makes) would stop it.
 */
async function waitForListenPassive(port: number, proc: Proc): Promise<void> {
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0');
  for (let i = 0; i < 300; i++) {
    const table = await readFile('/proc/net/tcp', 'utf8');
    // local_address is "0100007F:PORT" (127.0.0.1) or "00000000:PORT"; state 0A = LISTEN.
    if (table.split('\n').some((l) => new RegExp(`^\\s*\\d+: [0-9A-F]{8}:${hexPort} [0-9A-F]{8}:[0-9A-F]{4} 0A `).test(l))) return;
    if (proc.child.exitCode !== null || proc.child.signalCode !== null) throw new Error(`nbd-server exited:\n${proc.stderr()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`nbd-server is not listening on ${port}:\n${proc.stderr()}`);
}

export interface NbdServerExport {
  name: string;
  file: string;
  readOnly?: boolean;
}

/** nbd-server in the foreground (-d) with a config file in `dir`. One session per process. */
export async function startNbdServer(dir: string, exports: NbdServerExport[]): Promise<Peer> {
  const port = await freePort();
  const lines = ['[generic]', '    allowlist = true', '    listenaddr = 127.0.0.1', `    port = ${port}`];
  for (const e of exports) {
    lines.push(`[${e.name}]`, `    exportname = ${e.file}`, `    readonly = ${e.readOnly ? 'true' : 'false'}`, '    flush = true', '    fua = true', '    trim = true');
  }
  const cfg = path.join(dir, 'nbd-server.conf');
  await writeFile(cfg, lines.join('\n') + '\n');
  const proc = startProc('nbd-server', ['-C', cfg, '-d']);
  try {
    await waitForListenPassive(port, proc);
  } catch (e) {
    await proc.stop('SIGKILL');
    throw e;
  }
  return { proc, port, uri: `nbd://127.0.0.1:${port}/`, stop: async () => void (await proc.stop()) };
}

// ---------------------------------------------------------------------------------------------
// In-memory peers

/** Two connected in-memory Duplex ends (node 20 has no stream.duplexPair). */
export function duplexPair(): [Duplex, Duplex] {
  const ends: Duplex[] = [];
  const ended = [false, false];
  const make = (me: number): Duplex => {
    const other = 1 - me;
    const push = (chunk: Buffer | null): void => {
      const o = ends[other]!;
      if (ended[other] || o.destroyed) return;
      if (chunk === null) ended[other] = true;
      o.push(chunk);
    };
    return new Duplex({
      read() {},
      write(chunk: Buffer, _enc, cb) {
        push(Buffer.from(chunk));
        cb();
      },
      final(cb) {
        push(null);
        cb();
      },
      destroy(err, cb) {
        push(null);
        cb(err);
      },
    });
  };
  ends.push(make(0), make(1));
  return [ends[0]!, ends[1]!];
}

/** Pull-style reader over the server end of a pair. */
class Pull {
  private buf = Buffer.alloc(0);
  private ended = false;
  private wake: (() => void) | null = null;
  constructor(s: Duplex) {
    s.on('data', (c: Buffer) => {
      this.buf = Buffer.concat([this.buf, c]);
      this.wake?.();
    });
    s.on('end', () => {
      this.ended = true;
      this.wake?.();
    });
    s.on('close', () => {
      this.ended = true;
      this.wake?.();
    });
  }
  /** resolves null when the client hung up first. */
  async next<T>(decode: (b: Buffer, o: number) => Decoded<T>): Promise<T | null> {
    for (;;) {
      const r = decode(this.buf, 0);
      if (r !== NEED_MORE) {
        this.buf = this.buf.subarray(r.bytesRead);
        return r.msg;
      }
      if (this.ended) return null;
      await new Promise<void>((res) => (this.wake = res));
      this.wake = null;
    }
  }
}

export interface ScriptedServerOptions {
  size: number;
  flags?: number;
  structured?: boolean;
  /** answer NBD_OPT_GO with NBD_REP_ERR_UNSUP (an old server). */
  noGo?: boolean;
  /** accept STARTTLS, then send these bytes in plaintext before any TLS (an injection). */
  starttlsInject?: Buffer;
  /** context id for base:allocation; undefined = do not offer it. */
  baseAllocationId?: number;
  /**
   * Transmission phase. Default: a simple-reply server over `size` bytes of a pattern; writes
   * are checked against nothing and acknowledged.
   */
  transmission?: (server: Duplex, requests: AsyncIterable<{ req: RequestHeader; payload: Buffer }>) => Promise<void>;
}

/** Byte `i` of the scripted server's export. */
export function patternByte(i: number): number {
  return (i * 7 + (i >> 9)) & 0xff;
}

/** A fixed-newstyle server written against the codec; runs until the client hangs up. */
export async function scriptedServer(server: Duplex, o: ScriptedServerOptions): Promise<void> {
  const pull = new Pull(server);
  const flags = (o.flags ?? TFLAG.HAS_FLAGS | TFLAG.SEND_FLUSH) | TFLAG.HAS_FLAGS;
  server.write(encodeServerGreeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
  const cflags = await pull.next(decodeClientFlags);
  if (cflags === null) return;
  const noZeroes = (cflags & FLAG_NO_ZEROES) !== 0;
  for (;;) {
    const opt = await pull.next(decodeOption);
    if (opt === null) return;
    if (opt.option === OPT.EXPORT_NAME) {
      server.write(encodeExportNameReply(o.size, flags, noZeroes));
      break;
    }
    if (opt.option === OPT.ABORT) {
      server.write(encodeOptionReply(OPT.ABORT, REP.ACK));
      server.end();
      return;
    }
    if (opt.option === OPT.STARTTLS && o.starttlsInject) {
      server.write(Buffer.concat([encodeOptionReply(opt.option, REP.ACK), o.starttlsInject]));
    } else if (opt.option === OPT.STRUCTURED_REPLY && o.structured) {
      server.write(encodeOptionReply(opt.option, REP.ACK));
    } else if (opt.option === OPT.SET_META_CONTEXT && o.structured && !o.noGo) {
      if (o.baseAllocationId !== undefined) server.write(encodeOptionReply(opt.option, REP.META_CONTEXT, encodeMetaContextReply(o.baseAllocationId, 'base:allocation')));
      server.write(encodeOptionReply(opt.option, REP.ACK));
    } else if ((opt.option === OPT.GO || opt.option === OPT.INFO) && !o.noGo) {
      parseGoInfo(opt.data);
      server.write(encodeOptionReply(opt.option, REP.INFO, encodeInfoExport(o.size, flags)));
      server.write(encodeOptionReply(opt.option, REP.ACK));
      if (opt.option === OPT.GO) break;
    } else {
      server.write(encodeOptionReply(opt.option, REP_ERR_.UNSUP));
    }
  }
  const requests = (async function* () {
    for (;;) {
      const req = await pull.next(decodeRequest);
      if (req === null) return;
      let payload = Buffer.alloc(0);
      if (req.type === CMD.WRITE) {
        const p = await pull.next((b, off) => (b.length - off >= req.length ? { msg: b.subarray(off, off + req.length), bytesRead: req.length } : NEED_MORE));
        if (p === null) return;
        payload = Buffer.from(p);
      }
      yield { req, payload };
    }
  })();
  if (o.transmission) {
    await o.transmission(server, requests);
    return;
  }
  for await (const { req } of requests) {
    if (req.type === CMD.DISC) {
      server.end();
      return;
    }
    const reply = Buffer.alloc(SIMPLE_REPLY_SIZE);
    encodeSimpleReply(reply, 0, 0, req.handle);
    server.write(reply);
    if (req.type === CMD.READ) {
      const data = Buffer.alloc(req.length);
      for (let i = 0; i < req.length; i++) data[i] = patternByte(req.offset + i);
      server.write(data);
    }
  }
}
