// `spillway wanem`: the WAN emulator as a command. A TCP relay with delay, rate, jitter,
// stalls and resets, for tests and benchmarks (this kernel has no netem). The relay itself is
// WanEmulator (src/wanem/emulator.ts); this file parses options, writes the stats and pid
// files, and handles signals.

import { rmSync, writeFileSync } from 'node:fs';
import { Command, InvalidArgumentError, Option } from 'commander';

import { createLogger } from '../log/logger.js';
import { parseHostPort, type HostPort } from '../wanem/address.js';
import { WanEmulator } from '../wanem/emulator.js';
import { WanemError } from '../wanem/errors.js';
import { StatsFileWriter } from '../wanem/stats.js';

function parseAddress(allowPortZero: boolean, defaultHost?: string): (v: string) => HostPort {
  return (v) => {
    try {
      return parseHostPort(v, { allowPortZero, defaultHost });
    } catch (err) {
      throw new InvalidArgumentError(err instanceof WanemError ? err.message : String(err));
    }
  };
}
function parseNonNegative(v: string): number {
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n) || n < 0) throw new InvalidArgumentError('expected a number ≥ 0');
  return n;
}
function parsePositive(v: string): number {
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n) || n <= 0) throw new InvalidArgumentError('expected a number > 0');
  return n;
}
function parseKib(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError('expected a positive whole number of KiB');
  return n;
}

interface WanemOptions {
  listen: HostPort;
  target: HostPort;
  delayMs: number;
  rateMbit: number;
  jitterMs: number;
  stallEvery?: number;
  stallFor?: number;
  resetEvery?: number;
  queueKib?: number;
  statsFile?: string;
  pidFile?: string;
}

export function registerWanem(program: Command): void {
  program
    .command('wanem')
    .summary('emulate a WAN link: a TCP relay with delay, rate, jitter, stalls and resets')
    .description(
      [
        'Relay every TCP connection accepted on --listen to --target through an emulated WAN link. Each direction is its own link: bytes are paced at --rate-mbit (one link per direction, shared by every connection through this relay, so two transfers the same way share the rate), then delayed by --delay-ms. The round-trip time through the relay is therefore 2 × --delay-ms (plus jitter). Jitter never reorders the bytes of a connection. Setting up a connection adds no delay.',
        'Memory is bounded: per connection and direction the relay holds about one bandwidth-delay product plus a margin (see --queue-kib); when that is full it stops reading from the sender, so TCP backpressure reaches it. A receiver that does not read stalls only its own connection.',
        'A stall holds every byte in both directions (a link outage TCP survives: nothing is lost). A reset sends a TCP reset (RST) to both sides of every relayed connection; the listener keeps accepting new ones. The end of a stream (half-close) travels behind its bytes; an error or reset on one side resets the other.',
        'Counters (bytes each way, connections, stalls, resets, queue occupancy) are rewritten to --stats-file every 500 ms and at exit, and printed to stderr as one JSON line on SIGUSR1. SIGTERM or SIGINT stops the relay.',
      ].join('\n\n'),
    )
    .addOption(new Option('-l, --listen <host:port>', 'address to accept connections on (PORT alone means 127.0.0.1:PORT; port 0 picks one, logged)').argParser(parseAddress(true, '127.0.0.1')).makeOptionMandatory())
    .addOption(new Option('-t, --target <host:port>', 'address every connection is relayed to (PORT alone means 127.0.0.1:PORT)').argParser(parseAddress(false, '127.0.0.1')).makeOptionMandatory())
    .addOption(new Option('-d, --delay-ms <ms>', 'one-way propagation delay of each direction in ms; RTT = 2 × this; 0 = none').argParser(parseNonNegative).makeOptionMandatory())
    .addOption(new Option('-r, --rate-mbit <mbit>', 'rate of each direction in Mbit/s (10^6 payload bits/s), shared by all connections; 0 = unlimited').argParser(parseNonNegative).makeOptionMandatory())
    .addOption(new Option('--jitter-ms <ms>', 'add a random 0..N ms to each piece\'s delay (uniform; never reorders a connection)').default(0).argParser(parseNonNegative))
    .addOption(new Option('--stall-every <sec>', 'every SEC seconds, stall both directions (bytes held, not lost); needs --stall-for').argParser(parsePositive))
    .addOption(new Option('--stall-for <sec>', 'length of each stall in seconds; shorter than --stall-every').argParser(parsePositive))
    .addOption(new Option('--reset-every <sec>', 'every SEC seconds, reset every relayed connection (new ones are still accepted)').argParser(parsePositive))
    .addOption(
      new Option('--queue-kib <kib>', 'relay buffer per connection and direction before the sender is paused (default: rate × RTT + max(64 KiB, 20 ms), 256 KiB..64 MiB; 16 MiB when unlimited)').argParser(parseKib),
    )
    .option('--stats-file <file>', 'rewrite the counters as JSON to FILE every 500 ms and at exit (atomically)')
    .option('--pid-file <file>', 'write the process id here once listening; removed at exit')
    .addHelpText(
      'after',
      `
Examples:
  # 50 ms RTT, 100 Mbit/s each way, in front of an NBD server on 10809
  spillway wanem --listen 127.0.0.1:10810 --target 127.0.0.1:10809 --delay-ms 25 --rate-mbit 100
  nbdcopy nbd://127.0.0.1:10810/ disk.img

  # a flaky link: 80 ms RTT ± jitter, a 2 s outage every 30 s, everything reset every 5 min
  spillway wanem -l 0.0.0.0:7000 -t edge-b:7000 -d 40 -r 50 --jitter-ms 5 \\
      --stall-every 30 --stall-for 2 --reset-every 300 --stats-file wan.json --pid-file wan.pid

  kill -USR1 $(cat wan.pid)     # counters to stderr
  jq .bytes wan.json            # bytes delivered each way

Docs: docs/wanem.md`,
    )
    .action(async (opts: WanemOptions) => {
      await wanem(opts);
    });
}

async function wanem(opts: WanemOptions): Promise<void> {
  const log = createLogger('wanem');
  if ((opts.stallEvery === undefined) !== (opts.stallFor === undefined)) throw new Error('--stall-every and --stall-for go together: give both');
  if (opts.stallEvery !== undefined && opts.stallFor !== undefined && opts.stallFor >= opts.stallEvery)
    throw new Error(`--stall-for (${opts.stallFor} s) must be shorter than --stall-every (${opts.stallEvery} s)`);

  const emulator = new WanEmulator({
    listen: opts.listen,
    target: opts.target,
    delayMs: opts.delayMs,
    rateMbit: opts.rateMbit,
    jitterMs: opts.jitterMs,
    stallEverySec: opts.stallEvery ?? 0,
    stallForSec: opts.stallFor ?? 0,
    resetEverySec: opts.resetEvery ?? 0,
    queueBytes: (opts.queueKib ?? 0) * 1024,
    log,
  });
  await emulator.start();
  const statsFile = opts.statsFile
    ? new StatsFileWriter(opts.statsFile, () => emulator.stats(), { onError: (err) => log('warn', 'cannot rewrite the stats file', { file: opts.statsFile, error: err.message }) })
    : null;
  statsFile?.start();

  let stopping = false;
  const stop = async (why: string) => {
    if (stopping) return;
    stopping = true;
    log('info', 'stopping', { why });
    await emulator.stop();
    statsFile?.stop();
    if (opts.pidFile) rmSync(opts.pidFile, { force: true });
  };
  // Asked for explicitly, so printed whatever SPILLWAY_LOG_LEVEL says, as one JSON log line.
  process.on('SIGUSR1', () => {
    process.stderr.write(JSON.stringify({ time: new Date().toISOString(), level: 'info', component: 'wanem', msg: 'stats', ...emulator.stats() }) + '\n');
  });
  process.once('SIGTERM', () => void stop('SIGTERM').then(() => process.exit(0)));
  process.once('SIGINT', () => void stop('SIGINT').then(() => process.exit(0)));
  // Signal handlers are in place before the pid file says we are ready (an early SIGUSR1 would
  // otherwise start Node's inspector).
  if (opts.pidFile) writeFileSync(opts.pidFile, `${process.pid}\n`);
}
