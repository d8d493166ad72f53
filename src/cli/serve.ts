// `spillway serve`: the storage target on its own. Serves raw images or block devices over NBD,
// each as a stack of BlockDevice layers (file → [overlay] → [read-only] → stats).

import { readFileSync, writeFileSync, rmSync } from 'node:fs';
import { Duplex } from 'node:stream';
import { Command, InvalidArgumentError, Option } from 'commander';

import type { BlockDevice } from '../block/device.js';
import type { NbdExport } from '../nbd/server.js';
import { DEFAULT_PORT } from '../nbd/protocol.js';

function parsePort(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new InvalidArgumentError('expected a TCP port number (0-65535)');
  return n;
}
function parsePositive(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError('expected a positive integer');
  return n;
}

interface ServeOptions {
  port: number;
  bind: string;
  socket?: string;
  stdio?: boolean;
  export: string;
  description?: string;
  readonly?: boolean;
  lock: boolean;
  cow?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  maxInFlight: number;
  metrics?: string;
  pidFile?: string;
}

export function registerServe(program: Command): void {
  program
    .command('serve')
    .summary('serve disk images over NBD (the storage target)')
    .description(
      'Serve one or more raw disk images or block devices over NBD (fixed newstyle, structured replies, base:allocation, multi-connection, STARTTLS). Each IMAGE is PATH or NAME=PATH; the first image is also the default export ("").\n\n' +
        'Listens on TCP by default. With --socket it listens on a UNIX socket, with --stdio it serves one connection on stdin/stdout (for nbd_connect_command and fuzzers), and under systemd socket activation (LISTEN_FDS/LISTEN_PID set) it serves the inherited sockets.',
    )
    .argument('<image...>', 'PATH or NAME=PATH of a raw image or block device')
    .addOption(new Option('-p, --port <port>', 'TCP port').default(DEFAULT_PORT).argParser(parsePort))
    .option('-b, --bind <address>', 'address to listen on (use 0.0.0.0 or :: for every interface)', '127.0.0.1')
    .option('-s, --socket <path>', 'listen on this UNIX socket instead of TCP')
    .option('--stdio', 'serve a single connection on stdin/stdout, then exit')
    .option('-e, --export <name>', 'export name of the first image', '')
    .option('--description <text>', 'export description shown by NBD_INFO_DESCRIPTION (nbdinfo)')
    .option('-r, --readonly', 'refuse writes (EPERM); clients see a read-only export')
    .option('--no-lock', 'do not take an OFD lock on the images (QEMU honours these locks)')
    .option('--cow <overlay>', 'copy-on-write: keep the image untouched and write to OVERLAY (+ OVERLAY.bitmap); single image only')
    .option('--tls-cert <file>', 'server certificate (PEM); enables TLS and makes it mandatory (FORCEDTLS)')
    .option('--tls-key <file>', 'private key of --tls-cert (PEM)')
    .option('--tls-ca <file>', 'CA certificate (PEM): clients must present a certificate signed by it')
    .addOption(new Option('--max-in-flight <n>', 'requests in flight per connection before reading pauses').default(128).argParser(parsePositive))
    .option('--metrics <address:port>', 'serve Prometheus metrics at http://ADDRESS:PORT/metrics')
    .option('--pid-file <file>', 'write the process id here once listening; removed at exit')
    .addHelpText(
      'after',
      `
Examples:
  spillway serve disk.img                                  # nbd://127.0.0.1/
  spillway serve --bind 0.0.0.0 root=root.img data=data.img
  spillway serve --socket /run/spw.sock --readonly disk.img
  spillway serve --tls-cert srv.pem --tls-key srv.key --tls-ca ca.pem disk.img
  nbdinfo --list nbd://127.0.0.1/ ; qemu-img info nbd://127.0.0.1:10809/`,
    )
    .action(async (images: string[], opts: ServeOptions) => {
      await serve(images, opts);
    });
}

function parseImageArg(arg: string, index: number, firstName: string): { name: string; path: string } {
  const eq = arg.indexOf('=');
  // A path may contain '='; only treat NAME=PATH as such when NAME has no '/'.
  if (eq > 0 && !arg.slice(0, eq).includes('/')) return { name: arg.slice(0, eq), path: arg.slice(eq + 1) };
  return { name: index === 0 ? firstName : `disk${index}`, path: arg };
}

async function serve(images: string[], opts: ServeOptions): Promise<void> {
  // Loaded here, not at the top, so `spillway --help` and other commands start fast.
  const [{ openImageStack }, { createLogger }, { NbdServer }, { startMetricsServer }] = await Promise.all([
    import('../block/stack.js'),
    import('../log/logger.js'),
    import('../nbd/server.js'),
    import('../metrics/http.js'),
  ]);
  const log = createLogger('serve');
  if ((opts.tlsCert === undefined) !== (opts.tlsKey === undefined)) throw new Error('--tls-cert and --tls-key go together');
  if (opts.tlsCa && !opts.tlsCert) throw new Error('--tls-ca needs --tls-cert and --tls-key');
  if (opts.cow && images.length !== 1) throw new Error('--cow works with a single image');
  if (opts.socket && opts.stdio) throw new Error('choose one of --socket and --stdio');

  const exports: NbdExport[] = [];
  const devices: BlockDevice[] = [];
  try {
    for (const [i, arg] of images.entries()) {
      const { name, path } = parseImageArg(arg, i, opts.export);
      const device = await openImageStack({ path, name, readonly: !!opts.readonly, lock: opts.lock, cow: opts.cow });
      devices.push(device);
      exports.push({ name, device, description: opts.description ?? path });
    }
  } catch (err) {
    await Promise.all(devices.map((d) => d.close()));
    throw err;
  }

  const server = new NbdServer({
    exports,
    maxInFlight: opts.maxInFlight,
    tls: opts.tlsCert ? { cert: readFileSync(opts.tlsCert), key: readFileSync(opts.tlsKey!), ca: opts.tlsCa ? readFileSync(opts.tlsCa) : undefined } : undefined,
    log,
  });

  const metrics = opts.metrics ? await startMetricsServer(opts.metrics) : null;
  let stopping = false;
  const stop = async (why: string) => {
    if (stopping) return;
    stopping = true;
    log('info', 'stopping', { why });
    await server.close();
    await Promise.all(devices.map((d) => d.close()));
    await metrics?.close();
    if (opts.pidFile) rmSync(opts.pidFile, { force: true });
  };
  process.once('SIGTERM', () => void stop('SIGTERM').then(() => process.exit(0)));
  process.once('SIGINT', () => void stop('SIGINT').then(() => process.exit(0)));

  const described = exports.map((e) => ({ name: e.name, size: e.device.size, stack: e.device.description }));
  if (opts.stdio) {
    await server.handle(Duplex.from({ readable: process.stdin, writable: process.stdout }));
    await stop('client disconnected');
    return;
  }
  const listenFds = Number(process.env.LISTEN_FDS ?? 0);
  if (listenFds > 0 && Number(process.env.LISTEN_PID) === process.pid) {
    for (let fd = 3; fd < 3 + listenFds; fd++) await server.listen({ fd });
    log('info', 'serving on sockets from systemd', { fds: listenFds, exports: described });
  } else if (opts.socket) {
    rmSync(opts.socket, { force: true });
    await server.listen({ path: opts.socket });
    log('info', 'listening', { socket: opts.socket, exports: described });
  } else {
    await server.listen({ port: opts.port, host: opts.bind });
    log('info', 'listening', { address: opts.bind, port: opts.port, tls: !!opts.tlsCert, exports: described });
  }
  if (opts.pidFile) writeFileSync(opts.pidFile, `${process.pid}\n`);
}
