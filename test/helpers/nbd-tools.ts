// Shared helpers for the NBD interop and fuzz tests: images with known contents, the real
// client tools (nbdinfo, nbdsh, qemu-io, ...) with a loud failure when one is missing, devices
// for in-process servers, and a raw NBD client on our own codec for what no correct client
// sends (unknown commands, hostile option sequences, plaintext after STARTTLS). The project's
// NbdClient (src/nbd/client.ts) is the one to use for well-behaved traffic.

import { existsSync } from 'node:fs';
import { open } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import type { Duplex } from 'node:stream';

import { FilterDevice, type BlockCapabilities, type BlockDevice } from '../../src/block/device.js';
import { MemoryDevice } from '../../src/block/memory.js';
import { ByteReader } from '../../src/stream/byte-reader.js';
import {
  decodeOptionReply,
  decodeReplyHeader,
  decodeServerGreeting,
  encodeClientFlags,
  encodeGoInfo,
  encodeOption,
  encodeRequest,
  NEED_MORE,
  parseErrorPayload,
  parseInfoReply,
  type OptionReply,
} from '../../src/nbd/codec.js';
import {
  CLIENT_FLAG_FIXED_NEWSTYLE,
  CLIENT_FLAG_NO_ZEROES,
  CMD,
  INFO,
  MAX_OPTION_LENGTH,
  OPT,
  OPTION_REPLY_HEADER_SIZE,
  REP,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  REQUEST_SIZE,
  SIMPLE_REPLY_MAGIC,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_HEADER_SIZE,
  isReplyError,
  isReplyTypeError,
} from '../../src/nbd/protocol.js';
import { startQemuNbd } from './nbd-peers.js';
import { CLI, haveCommand, run, startServe, tempDir, type Served } from './proc.js';

// ---------------------------------------------------------------------------------------------
// Peers

/** Debian package that provides each peer, for the message when one is missing. */
const PACKAGE_OF: Record<string, string> = {
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
  nbdsh: 'libnbd-bin python3-libnbd',
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  'qemu-nbd': 'qemu-utils',
  fio: 'fio',
  'systemd-socket-activate': 'systemd',
  openssl: 'openssl',
  cmp: 'diffutils',
};

/** Fails loudly (never skips) when a peer the test needs is not installed. */
export async function requireCommands(...cmds: string[]): Promise<void> {
  const missing: string[] = [];
  for (const c of cmds) if (!(await haveCommand(c))) missing.push(c);
  if (missing.length > 0) {
    const pkgs = [...new Set(missing.map((c) => PACKAGE_OF[c] ?? c))].join(' ');
    throw new Error(`missing ${missing.join(', ')}: apt-get install -y --no-install-recommends ${pkgs}`);
  }
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run npm run build first`);
}

let nbdshEnv: Promise<NodeJS.ProcessEnv> | null = null;
/**
 * nbdsh runs `python3 -m nbd` from PATH; a python3 from pyenv or a venv may lack the libnbd
 * bindings, so put the first python3 that can import them first on PATH.
 */
function envForNbdsh(): Promise<NodeJS.ProcessEnv> {
  nbdshEnv ??= (async () => {
    for (const py of ['python3', '/usr/bin/python3']) {
      const r = await run(py, ['-c', 'import nbd'], { allowFail: true }).catch(() => ({ code: 1 }));
      if (r.code === 0) {
        const dir = py.includes('/') ? path.dirname(py) : null;
        return dir ? { ...process.env, PATH: `${dir}:${process.env.PATH ?? ''}` } : process.env;
      }
    }
    throw new Error('no python3 can import the libnbd bindings: apt-get install -y --no-install-recommends python3-libnbd');
  })();
  return nbdshEnv;
}

/**
 * Run a Python script under nbdsh (`h` is a fresh handle, `nbd` the module). The script prints
 * one JSON value on its last line, which is returned parsed.
 */
export async function nbdshJson<T>(script: string): Promise<T> {
  const prelude = ['import json', 'def errno_of(f, *a, **k):', '    try:', '        f(*a, **k)', '        return 0', '    except nbd.Error as e:', '        return e.errnum', ''].join('\n');
  const r = await run('nbdsh', ['-c', `${prelude}\n${script}`], { env: await envForNbdsh() });
  const lines = r.stdout.trim().split('\n');
  return JSON.parse(lines[lines.length - 1] ?? 'null') as T;
}

// ---------------------------------------------------------------------------------------------
// Images with known contents

/** Run `fn` in a fresh temp directory, removed afterwards whatever happens. */
export async function inTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const { dir, cleanup } = await tempDir('spw-nbd-');
  try {
    return await fn(dir);
  } finally {
    await cleanup();
  }
}

/** Deterministic pseudo-random bytes (xorshift32), so a failure can be reproduced exactly. */
export function patternBytes(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = seed >>> 0 || 0x9e3779b9;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

export interface ImageExtent {
  offset: number;
  data: Buffer;
}

/** A sparse raw image of `size` bytes (truncate), with `data` written at known offsets. */
export async function makeImage(file: string, size: number, writes: ImageExtent[] = []): Promise<void> {
  const fh = await open(file, 'w');
  try {
    await fh.truncate(size);
    for (const w of writes) await fh.write(w.data, 0, w.data.length, w.offset);
  } finally {
    await fh.close();
  }
}

/** A raw image filled with patternBytes(size, seed). */
export async function makeFilledImage(file: string, size: number, seed: number): Promise<Buffer> {
  const data = patternBytes(size, seed);
  await makeImage(file, size, [{ offset: 0, data }]);
  return data;
}

// ---------------------------------------------------------------------------------------------
// Servers

export interface ServeOpts {
  readonly?: boolean;
}

/**
 * `spillway serve IMAGE` on a free port. With SPILLWAY_NBD_REFERENCE=qemu-nbd the same test runs
 * against qemu-nbd instead, to check that a test's expectations hold for a reference server
 * (a failure there means the test asserts something the spec leaves open).
 */
export async function serveImage(image: string, opts: ServeOpts = {}): Promise<Served> {
  if (process.env.SPILLWAY_NBD_REFERENCE === 'qemu-nbd') {
    const peer = await startQemuNbd(image, { format: 'raw', exportName: '', readOnly: opts.readonly });
    return { ...peer.proc, uri: peer.uri, port: peer.port };
  }
  return startServe(image, opts.readonly ? ['--readonly'] : []);
}

/** Run `fn` with a server on `image`, and stop the server whatever happens. */
export async function withServer<T>(image: string, opts: ServeOpts, fn: (s: Served) => Promise<T>): Promise<T> {
  const s = await serveImage(image, opts);
  try {
    return await fn(s);
  } finally {
    await s.stop();
  }
}

/** Read [offset, offset+length) of an export on a new connection, with libnbd (a real peer). */
export async function readWithNbdsh(uri: string, offset: number, length: number): Promise<Buffer> {
  const hex = await nbdshJson<string>(`h.connect_uri(${JSON.stringify(uri)})\nprint(json.dumps(h.pread(${length}, ${offset}).hex()))`);
  return Buffer.from(hex, 'hex');
}

// ---------------------------------------------------------------------------------------------
// In-memory devices for in-process servers (fuzzing, constraints a file cannot have)

/** A MemoryDevice holding `data`. */
export async function memoryDeviceWith(data: Buffer): Promise<MemoryDevice> {
  const dev = new MemoryDevice(data.length);
  await dev.write(0, data);
  return dev;
}

/** Advertises a minimum block size above 1 (as a 512e/4Kn disk would), passing I/O through. */
export class MinimumBlockDevice extends FilterDevice {
  private readonly caps: BlockCapabilities;
  constructor(inner: BlockDevice, minimum: number) {
    super(inner);
    const bs = inner.capabilities.blockSize;
    this.caps = { ...inner.capabilities, blockSize: { ...bs, minimum, preferred: Math.max(bs.preferred, minimum) } };
  }
  override get capabilities(): BlockCapabilities {
    return this.caps;
  }
  get description(): string {
    return `minimum-block-${this.caps.blockSize.minimum}(${this.inner.description})`;
  }
}

// ---------------------------------------------------------------------------------------------
// A minimal raw NBD client on our codec (one request at a time)

export function connectTcp(port: number, host = '127.0.0.1'): Promise<net.Socket> {
  return connectSocket(net.connect(port, host));
}
export function connectUnix(socketPath: string): Promise<net.Socket> {
  return connectSocket(net.connect(socketPath));
}
function connectSocket(s: net.Socket): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    s.once('connect', () => {
      s.off('error', reject);
      resolve(s);
    });
    s.once('error', reject);
  });
}

export class NbdReplyError extends Error {
  constructor(
    readonly error: number,
    message: string,
  ) {
    super(message);
    this.name = 'NbdReplyError';
  }
}

export interface TransmissionInfo {
  size: number;
  flags: number;
  blockSize?: { minimum: number; preferred: number; maximum: number };
}

export interface CommandResult {
  /** NBD error number (0 = success) */
  error: number;
  /** READ data on success */
  data?: Buffer;
}

/** Raw NBD peer: every step is explicit so a test can stop or misbehave at any point. */
export class RawNbdClient {
  readonly reader: ByteReader;
  structured = false;
  private nextHandle = 1n;

  constructor(readonly stream: Duplex) {
    this.reader = new ByteReader(stream);
    stream.on('error', () => {
      /* surfaced through the reader */
    });
  }

  /** Read the greeting and answer with fixed-newstyle + no-zeroes. Returns the server's flags. */
  async handshake(): Promise<number> {
    const g = decodeServerGreeting(await this.reader.read(18), 0);
    if (g === NEED_MORE) throw new Error('unreachable');
    this.stream.write(encodeClientFlags(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES));
    return g.msg.handshakeFlags;
  }

  sendOption(option: number, data?: Buffer): void {
    this.stream.write(encodeOption(option, data));
  }

  async readOptionReply(): Promise<OptionReply> {
    const head = await this.reader.read(OPTION_REPLY_HEADER_SIZE);
    const length = head.readUInt32BE(16);
    if (length > MAX_OPTION_LENGTH) throw new Error(`option reply of ${length} bytes`);
    const whole = length > 0 ? Buffer.concat([head, await this.reader.read(length)]) : head;
    const r = decodeOptionReply(whole, 0);
    if (r === NEED_MORE) throw new Error('unreachable');
    return r.msg;
  }

  /** Send one option and collect its replies up to the final ACK or error. */
  async option(option: number, data?: Buffer): Promise<OptionReply[]> {
    this.sendOption(option, data);
    const replies: OptionReply[] = [];
    for (;;) {
      const r = await this.readOptionReply();
      if (r.option !== option) throw new Error(`reply for option ${r.option} while waiting for ${option}`);
      replies.push(r);
      if (r.type === REP.ACK || isReplyError(r.type)) return replies;
    }
  }

  async negotiateStructured(): Promise<void> {
    const r = await this.option(OPT.STRUCTURED_REPLY);
    if (r.at(-1)?.type !== REP.ACK) throw new Error('server refused structured replies');
    this.structured = true;
  }

  /** NBD_OPT_GO; resolves with the export's size and flags, rejects on an error reply. */
  async go(name = '', infos: number[] = [INFO.BLOCK_SIZE]): Promise<TransmissionInfo> {
    const replies = await this.option(OPT.GO, encodeGoInfo({ name, infos }));
    const last = replies.at(-1)!;
    if (last.type !== REP.ACK) throw new NbdReplyError(last.type, `NBD_OPT_GO refused: 0x${last.type.toString(16)} ${last.data.toString()}`);
    const info: TransmissionInfo = { size: -1, flags: 0 };
    for (const r of replies) {
      if (r.type !== REP.INFO) continue;
      const i = parseInfoReply(r.data);
      if (i.type === INFO.EXPORT) {
        info.size = i.size;
        info.flags = i.flags;
      } else if (i.type === INFO.BLOCK_SIZE) info.blockSize = { minimum: i.minimum, preferred: i.preferred, maximum: i.maximum };
    }
    return info;
  }

  /** Send one request and wait for its complete reply. */
  async command(type: number, offset: number, length: number, opts: { flags?: number; payload?: Buffer } = {}): Promise<CommandResult> {
    const handle = this.nextHandle++;
    const head = Buffer.allocUnsafe(REQUEST_SIZE);
    encodeRequest(head, 0, { type, flags: opts.flags ?? 0, handle, offset, length });
    this.stream.write(opts.payload ? Buffer.concat([head, opts.payload]) : head);
    return this.readReply(handle, type, offset, length);
  }

  private async readReply(handle: bigint, type: number, offset: number, length: number): Promise<CommandResult> {
    const first = await this.reader.read(4);
    const rest = await this.reader.read((first.readUInt32BE(0) === SIMPLE_REPLY_MAGIC ? SIMPLE_REPLY_SIZE : STRUCTURED_REPLY_HEADER_SIZE) - 4);
    const h = decodeReplyHeader(Buffer.concat([first, rest]), 0, 64 * 1024 * 1024);
    if (h === NEED_MORE) throw new Error('unreachable');
    if (h.msg.handle !== handle) throw new Error(`reply for handle ${h.msg.handle}, expected ${handle}`);
    if (h.msg.kind === 'simple') {
      if (h.msg.error !== 0 || type !== CMD.READ) return { error: h.msg.error };
      return { error: 0, data: await this.reader.read(length) };
    }
    // Structured: gather chunks up to DONE.
    const data = type === CMD.READ ? Buffer.alloc(length) : undefined;
    let error = 0;
    let chunk = h.msg;
    for (;;) {
      const body = chunk.length > 0 ? await this.reader.read(chunk.length) : Buffer.alloc(0);
      if (isReplyTypeError(chunk.type)) error = parseErrorPayload(body, chunk.type === REPLY_TYPE.ERROR_OFFSET).error;
      else if (chunk.type === REPLY_TYPE.OFFSET_DATA) body.copy(data!, Number(body.readBigUInt64BE(0)) - offset, 8);
      else if (chunk.type === REPLY_TYPE.OFFSET_HOLE) data!.fill(0, Number(body.readBigUInt64BE(0)) - offset, Number(body.readBigUInt64BE(0)) - offset + body.readUInt32BE(8));
      if ((chunk.flags & REPLY_FLAG_DONE) !== 0) break;
      const next = decodeReplyHeader(await this.reader.read(STRUCTURED_REPLY_HEADER_SIZE), 0, 64 * 1024 * 1024);
      if (next === NEED_MORE || next.msg.kind !== 'structured' || next.msg.handle !== handle) throw new Error('bad structured reply chunk');
      chunk = next.msg;
    }
    return error !== 0 ? { error } : { error: 0, data };
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const r = await this.command(CMD.READ, offset, length);
    if (r.error !== 0) throw new NbdReplyError(r.error, `read ${offset}+${length} failed with NBD error ${r.error}`);
    return r.data!;
  }

  /**
   * Stop using the reader and hand over the raw stream, with whatever the reader had already
   * buffered from it (so no byte the server sent goes unseen).
   */
  async takeStream(): Promise<{ stream: Duplex; buffered: Buffer }> {
    const n = this.reader.bufferedBytes;
    const buffered = n > 0 ? await this.reader.read(n) : Buffer.alloc(0);
    return { stream: this.reader.detach()!, buffered };
  }

  /** Everything the server sends from now on, until it closes the connection. */
  async restUntilClosed(): Promise<Buffer> {
    const { stream, buffered } = await this.takeStream();
    const got = [buffered];
    stream.on('data', (d: Buffer) => got.push(d));
    const done = closed(stream);
    stream.resume();
    await done;
    return Buffer.concat(got);
  }

  /** NBD_CMD_DISC, then wait for the server to close the connection. */
  async disconnect(): Promise<void> {
    const head = Buffer.allocUnsafe(REQUEST_SIZE);
    encodeRequest(head, 0, { type: CMD.DISC, flags: 0, handle: 0n, offset: 0, length: 0 });
    this.stream.end(head);
    await closed(this.stream);
  }

  destroy(): void {
    this.stream.destroy();
  }
}

/** Resolves once a stream is closed (at once if it already is). */
export function closed(stream: Duplex): Promise<void> {
  if (stream.destroyed && (stream as { closed?: boolean }).closed) return Promise.resolve();
  return new Promise((resolve) => stream.once('close', () => resolve()));
}

/** A connected, negotiated client for a TCP server started by startServe/serveImage. */
export async function openClient(s: Served, opts: { exportName?: string; structured?: boolean } = {}): Promise<{ c: RawNbdClient; info: TransmissionInfo }> {
  const sock = s.socket ? await connectUnix(s.socket) : await connectTcp(s.port!);
  const c = new RawNbdClient(sock);
  try {
    await c.handshake();
    if (opts.structured ?? true) await c.negotiateStructured();
    const info = await c.go(opts.exportName ?? '');
    return { c, info };
  } catch (e) {
    c.destroy();
    throw e;
  }
}

/** `node dist/cli.js serve ARGS` as an argv, for launchers (nbd_connect_command, systemd). */
export function cliArgv(args: string[]): string[] {
  return [process.execPath, CLI, 'serve', ...args];
}
