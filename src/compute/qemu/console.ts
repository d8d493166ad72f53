// The guest's serial console, as QEMU exposes it with
//   -chardev socket,id=ser0,path=SOCK,server=on,wait=off,logfile=LOG,logappend=on -serial chardev:ser0
// Input is typed into the socket; everything the guest prints is read back from LOG, which QEMU
// writes synchronously whether or not a client is connected, so a reader that crashed and came
// back misses nothing. The socket is drained and its copy of the output ignored (an unread socket
// would stall the guest's UART).
//
// exec() needs a POSIX shell with `base64` on the console (busybox is enough). The command is
// typed base64-encoded, so any bytes and newlines pass, between a begin and an end marker that
// carry a unique id. The markers are printed with printf formats, so the terminal's echo of the
// typed line never contains them. Lines are kept short (busybox's line editor truncates input at
// 1024 characters; the kernel's at 4095): a long command is first written to a file in /tmp in
// pieces. The command runs in a subshell with stdin from /dev/null (it cannot swallow later
// input) and stderr merged into stdout.

import { randomBytes } from 'node:crypto';
import { open, stat, type FileHandle } from 'node:fs/promises';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

import { ComputeError } from './errors.js';

export interface ConsoleExecOptions {
  /** Give up (and type Ctrl-C) after this long (default 30 s). */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Refuse more output than this (default 4 MiB); the command is interrupted. */
  maxOutputBytes?: number;
}

export interface ConsoleExecResult {
  /** stdout and stderr of the command, as the console showed them (no \r, no escape sequences). */
  output: string;
  exitCode: number;
  durationMs: number;
}

export interface ConsoleWaitOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Byte offset in the log to search from (default 0: the whole log, from the VM's start). */
  fromOffset?: number;
}

export interface ConsoleMatch {
  match: RegExpExecArray;
  /** The whole (normalized) line the pattern matched in. */
  line: string;
  /** Log offset just past that line: pass it as fromOffset to wait for what comes next. */
  offset: number;
}

/** Longest command exec() types (it goes through the guest's /tmp in pieces when long). */
export const CONSOLE_MAX_COMMAND_BYTES = 256 * 1024;
/** Typed lines stay below busybox's 1024-character line editor limit. */
const MAX_TYPED_LINE = 900;
const POLL_MS = 25;

const ESC = String.fromCharCode(27);
// CSI sequences (ESC [ ... final), two-character escapes (ESC c), and the bell.
const TERMINAL_ESCAPES = new RegExp(`${ESC}(?:\\[[0-?]*[ -/]*[@-~]|[@-~])|\\x07`, 'g');

/** Console text as plain lines: no \r, no terminal escape sequences. */
export function stripTerminal(raw: string): string {
  return raw.replace(/\r/g, '').replace(TERMINAL_ESCAPES, '');
}

/**
 * What to type to run `command` with marker id `id` (exported for tests): `pieces` are typed one
 * at a time, each acknowledged by a line `SPWC-<id>-<n>` before the next (the terminal's input
 * buffer is only 4 KiB while a command runs), then `run`.
 */
export function execLines(command: string, id: string): { pieces: string[]; run: string } {
  const b64 = Buffer.from(command, 'utf8').toString('base64');
  const begin = `printf '%s-%s\\n' SPWB ${id}`;
  const end = `printf '\\n%s-%s %s\\n' SPWE ${id} "$spw_rc"`;
  const single = `${begin}; (eval "$(echo ${b64} | base64 -d)") </dev/null 2>&1; spw_rc=$?; ${end}`;
  if (single.length <= MAX_TYPED_LINE) return { pieces: [], run: single };
  const file = `/tmp/.spw-exec-${id}`;
  const pieces: string[] = [];
  const size = MAX_TYPED_LINE - 80 - file.length;
  for (let i = 0, n = 0; i < b64.length; i += size, n++) {
    pieces.push(`printf %s ${b64.slice(i, i + size)} ${i === 0 ? '>' : '>>'} ${file}; printf '%s-%s-%s\\n' SPWC ${id} ${n}`);
  }
  return { pieces, run: `${begin}; (eval "$(base64 -d ${file})") </dev/null 2>&1; spw_rc=$?; rm -f ${file}; ${end}` };
}

/** Find the markers of `id` in normalized console text. */
export function parseExecOutput(text: string, id: string): { begun: boolean; done?: { output: string; exitCode: number } } {
  const beginMarker = `SPWB-${id}\n`;
  const b = text.indexOf(beginMarker);
  if (b === -1) return { begun: false };
  const from = b + beginMarker.length;
  const endRe = new RegExp(`\\nSPWE-${id} (\\d+)\\n`);
  const m = endRe.exec(text.slice(from - 1));
  if (!m) return { begun: true };
  // The end marker's printf starts with a newline of its own: it is not part of the output.
  const outputEnd = from - 1 + m.index;
  return { begun: true, done: { output: from <= outputEnd ? text.slice(from, outputEnd) : '', exitCode: Number(m[1]) } };
}

/** Reads a growing file from an offset (the console log); tolerates the file not existing yet. */
class LogReader {
  private fh: FileHandle | undefined;

  constructor(readonly path: string) {}

  async read(offset: number, max: number): Promise<Buffer> {
    if (!this.fh) {
      try {
        this.fh = await open(this.path, 'r');
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') return Buffer.alloc(0);
        throw e;
      }
    }
    const buf = Buffer.allocUnsafe(max);
    const { bytesRead } = await this.fh.read(buf, 0, max, offset);
    return buf.subarray(0, bytesRead);
  }

  async close(): Promise<void> {
    const fh = this.fh;
    this.fh = undefined;
    await fh?.close();
  }
}

async function fileSize(p: string): Promise<number> {
  try {
    return (await stat(p)).size;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return 0;
    throw e;
  }
}

function abortError(what: string): ComputeError {
  return new ComputeError('SPW_ERR_CONSOLE_TIMEOUT', `console: ${what}: aborted`);
}

/**
 * One VM's serial console. The socket is connected lazily, on the first exec() or type(); QEMU
 * serves one client per socket at a time, so use one SerialConsole per VM (QemuVm.console).
 */
export class SerialConsole {
  private socket: net.Socket | undefined;
  private connecting: Promise<net.Socket> | undefined;
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;

  constructor(
    readonly socketPath: string,
    readonly logPath: string,
  ) {}

  /** Current size of the console log: where new output will start. */
  logSize(): Promise<number> {
    return fileSize(this.logPath);
  }

  /** The console log from `offset`, normalized (stripTerminal). */
  async readLog(offset = 0, maxBytes = 4 * 1024 * 1024): Promise<string> {
    const r = new LogReader(this.logPath);
    try {
      return stripTerminal((await r.read(offset, maxBytes)).toString('utf8'));
    } finally {
      await r.close();
    }
  }

  /** Type raw text on the console (nothing added: include the "\n"). */
  async type(text: string): Promise<void> {
    const s = await this.connect();
    await new Promise<void>((resolve, reject) => {
      s.write(text, (e) => (e ? reject(new ComputeError('SPW_ERR_CONSOLE', `console ${this.socketPath}: write failed: ${e.message}`, { cause: e })) : resolve()));
    });
  }

  /**
   * Run `command` in the guest's console shell and return its output and exit status. Calls are
   * serialized. On timeout, abort or too much output, Ctrl-C is typed and the call rejects.
   */
  exec(command: string, opts: ConsoleExecOptions = {}): Promise<ConsoleExecResult> {
    const run = this.queue.then(() => this.execNow(command, opts));
    this.queue = run.catch(() => undefined);
    return run;
  }

  /**
   * Resolve when a line of the console log (searched from `fromOffset`, default the start)
   * matches `re`. Lines are normalized (no \r or escape sequences); an incomplete last line is
   * tested too, so prompts can be matched.
   */
  async waitFor(re: RegExp, opts: ConsoleWaitOptions = {}): Promise<ConsoleMatch> {
    const timeoutMs = opts.timeoutMs ?? 60_000;
    const deadline = Date.now() + timeoutMs;
    const reader = new LogReader(this.logPath);
    let offset = opts.fromOffset ?? 0;
    let partial = Buffer.alloc(0);
    const test = (lineBytes: Buffer, end: number): ConsoleMatch | undefined => {
      const line = stripTerminal(lineBytes.toString('utf8'));
      re.lastIndex = 0;
      const m = re.exec(line);
      return m ? { match: m, line, offset: end } : undefined;
    };
    try {
      for (;;) {
        if (opts.signal?.aborted) throw abortError(`waiting for ${re}`);
        const chunk = await reader.read(offset, 1024 * 1024);
        if (chunk.length > 0) {
          let buf = partial.length > 0 ? Buffer.concat([partial, chunk]) : chunk;
          const base = offset - partial.length;
          offset += chunk.length;
          let start = 0;
          for (;;) {
            const nl = buf.indexOf(0x0a, start);
            if (nl === -1) break;
            const hit = test(buf.subarray(start, nl), base + nl + 1);
            if (hit) return hit;
            start = nl + 1;
          }
          buf = buf.subarray(start);
          // A line without an end this long is tested and dropped (bounded memory).
          if (buf.length > 1024 * 1024) {
            const hit = test(buf, offset);
            if (hit) return hit;
            buf = Buffer.alloc(0);
          }
          partial = Buffer.from(buf);
          continue;
        }
        if (partial.length > 0) {
          const hit = test(partial, offset);
          if (hit) return hit;
        }
        if (Date.now() > deadline) {
          const tail = (await this.readLog(Math.max(0, offset - 4000))).split('\n').slice(-20).join('\n');
          throw new ComputeError('SPW_ERR_CONSOLE_TIMEOUT', `console: no line matching ${re} within ${timeoutMs} ms in ${this.logPath}; its tail:\n${tail}`);
        }
        await sleep(POLL_MS * 4);
      }
    } finally {
      await reader.close();
    }
  }

  /** Disconnect from the console socket (the guest keeps running). */
  async close(): Promise<void> {
    this.closed = true;
    const s = this.socket ?? (await this.connecting?.catch(() => undefined));
    this.socket = undefined;
    this.connecting = undefined;
    if (s && !s.destroyed) {
      await new Promise<void>((resolve) => {
        s.once('close', () => resolve());
        s.destroy();
      });
    }
  }

  private connect(): Promise<net.Socket> {
    if (this.closed) return Promise.reject(new ComputeError('SPW_ERR_CONSOLE', `console ${this.socketPath}: closed`));
    if (this.socket && !this.socket.destroyed) return Promise.resolve(this.socket);
    this.connecting ??= new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect(this.socketPath);
      s.once('connect', () => {
        s.off('error', onError);
        // Drain the socket's copy of the output (the log has it); an unread socket would
        // eventually stall the guest's serial port.
        s.on('data', () => undefined);
        s.on('error', () => undefined);
        s.on('close', () => {
          if (this.socket === s) this.socket = undefined;
        });
        this.socket = s;
        this.connecting = undefined;
        resolve(s);
      });
      const onError = (e: Error) => {
        this.connecting = undefined;
        reject(new ComputeError('SPW_ERR_CONSOLE', `console ${this.socketPath}: cannot connect (${e.message}); is the VM running?`, { cause: e }));
      };
      s.once('error', onError);
    });
    return this.connecting;
  }

  private async execNow(command: string, opts: ConsoleExecOptions): Promise<ConsoleExecResult> {
    const bytes = Buffer.byteLength(command, 'utf8');
    if (bytes > CONSOLE_MAX_COMMAND_BYTES) {
      throw new ComputeError('SPW_ERR_CONSOLE', `console: a command of ${bytes} bytes is longer than ${CONSOLE_MAX_COMMAND_BYTES}; copy large data through a disk instead`);
    }
    const timeoutMs = opts.timeoutMs ?? 30_000;
    const maxOutput = opts.maxOutputBytes ?? 4 * 1024 * 1024;
    const id = randomBytes(6).toString('hex');
    const started = Date.now();
    const lines = execLines(command, id);
    for (const [n, piece] of lines.pieces.entries()) {
      const from = await this.logSize();
      await this.type(piece + '\n');
      const left = timeoutMs - (Date.now() - started);
      try {
        await this.waitFor(new RegExp(`^SPWC-${id}-${n}$`), { fromOffset: from, timeoutMs: Math.max(left, 1), ...(opts.signal ? { signal: opts.signal } : {}) });
      } catch (e) {
        await this.interrupt();
        throw e;
      }
    }
    const offset = await this.logSize();
    await this.type(lines.run + '\n');
    const reader = new LogReader(this.logPath);
    const chunks: Buffer[] = [];
    let length = 0;
    let seen = 0;
    try {
      for (;;) {
        const chunk = await reader.read(offset + length, 1024 * 1024);
        if (chunk.length > 0) {
          chunks.push(Buffer.from(chunk));
          length += chunk.length;
          const r = parseExecOutput(stripTerminal(Buffer.concat(chunks).toString('utf8')), id);
          if (r.done) return { ...r.done, durationMs: Date.now() - started };
          if (r.begun) seen = seen || length;
          // Typed text and echo are a few KiB at most; the rest is output.
          if (length - seen > maxOutput) {
            await this.interrupt();
            throw new ComputeError('SPW_ERR_CONSOLE_OUTPUT', `console: ${JSON.stringify(command.slice(0, 80))} printed more than ${maxOutput} bytes; interrupted (raise maxOutputBytes, or redirect to a file)`);
          }
          continue;
        }
        if (opts.signal?.aborted) {
          await this.interrupt();
          throw abortError(JSON.stringify(command.slice(0, 80)));
        }
        if (Date.now() - started > timeoutMs) {
          await this.interrupt();
          const tail = stripTerminal(Buffer.concat(chunks).toString('utf8')).split('\n').slice(-10).join('\n');
          throw new ComputeError(
            'SPW_ERR_CONSOLE_TIMEOUT',
            `console: ${JSON.stringify(command.slice(0, 80))} did not finish within ${timeoutMs} ms (interrupted with Ctrl-C; is a shell running on the console, and the VM not paused?); console since:\n${tail}`,
          );
        }
        await sleep(POLL_MS);
      }
    } finally {
      await reader.close();
    }
  }

  private async interrupt(): Promise<void> {
    await this.type('\x03').catch(() => undefined);
  }
}
