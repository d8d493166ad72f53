// `spillway volume status|drain`: ask a running edge about its volumes' writes, through the
// control socket in its state directory (STATE/control.sock).

import http from 'node:http';
import path from 'node:path';
import { Command } from 'commander';

interface Target {
  config?: string;
  socket?: string;
  json?: boolean;
}

function socketOf(o: Target, loadState: (file: string) => string): string {
  if (o.socket) return o.socket;
  if (o.config) return path.join(loadState(o.config), 'control.sock');
  throw new Error('say which edge: --config EDGE.yaml (its state directory holds control.sock) or --socket PATH');
}

function call(socket: string, method: string, url: string): Promise<{ status: number; body: unknown }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath: socket, method, path: url }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => {
        try {
          resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) as unknown });
        } catch {
          reject(new Error(`the edge answered something that is not JSON: ${text.slice(0, 200)}`));
        }
      });
    });
    req.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') reject(new Error(`no edge is listening on ${socket} (is \`spillway edge\` running with that state directory?)`));
      else reject(err);
    });
    req.end();
  });
}

interface RemoteStatus {
  volume: string;
  peer: string;
  ready: boolean;
  error?: string;
  writes?: { policy: string; ranges: Array<{ offset: number; length: number; policy: string; source: string }>; unsealedBytes: number; lastSealed: number; ackedSeq: number; unshippedBytes: number; rpoLagSeconds: number; coalescingRatio: number; batches: number; lastError: string };
}

function mib(n: number): string {
  return `${(n / 1048576).toFixed(1)} MiB`;
}

function describe(v: RemoteStatus): string {
  if (!v.ready) return `${v.volume}: not exported yet${v.error ? ` (${v.error})` : ''}`;
  const w = v.writes;
  if (!w) return `${v.volume}: read-only`;
  const lines = [`${v.volume}: writes ${w.policy}, from peer ${v.peer}`];
  for (const r of w.ranges) lines.push(`  range ${r.offset}+${r.length}: ${r.policy} (${r.source})`);
  if (w.policy !== 'remote-only' || w.ranges.some((r) => r.policy !== 'remote-only')) {
    lines.push(`  epochs sealed ${w.lastSealed}, acknowledged by the origin ${w.ackedSeq}; unshipped ${mib(w.unshippedBytes)} (${mib(w.unsealedBytes)} not flushed by the guest yet)`);
    lines.push(`  RPO lag ${w.rpoLagSeconds.toFixed(1)} s; coalescing ${w.coalescingRatio.toFixed(2)}x; ${w.batches} batches shipped${w.lastError ? `; last error: ${w.lastError}` : ''}`);
  }
  return lines.join('\n');
}

export function registerVolume(program: Command): void {
  const vol = program.command('volume').summary('inspect and drain the volumes a running edge serves').description('Talk to a running edge through the control socket in its state directory.');
  const target = (c: Command) => c.option('-c, --config <file>', "the edge's configuration file (finds STATE/control.sock)").option('--socket <path>', 'the control socket itself').option('--json', 'print JSON');
  const loadState = async () => {
    const { loadEdgeConfig } = await import('../edge/config.js');
    return (file: string) => loadEdgeConfig(file).state;
  };

  target(vol.command('status').argument('[name]', 'one volume (default: all served from peers)').description("Show each remote volume's write policy, epochs sealed and acknowledged, unshipped bytes and RPO lag.")).action(async (name: string | undefined, o: Target) => {
    const sock = socketOf(o, await loadState());
    const r = await call(sock, 'GET', '/v1/status');
    const status = r.body as { remote: RemoteStatus[] };
    const vols = status.remote.filter((v) => !name || v.volume === name);
    if (name && vols.length === 0) throw new Error(`the edge serves no volume named "${name}" from a peer`);
    process.stdout.write(o.json ? JSON.stringify(name ? vols[0] : vols, null, 2) + '\n' : vols.map(describe).join('\n') + '\n');
  });

  target(
    vol
      .command('drain')
      .argument('<name>', 'the volume (its name at this edge)')
      .option('--timeout <seconds>', 'give up after this long (the drain goes on in the edge)', '600')
      .description('Seal what the guest wrote (even unflushed), ship every epoch to the origin and wait until the origin has applied it. Prints progress; exits 0 when the origin holds every write.'),
  ).action(async (name: string, o: Target & { timeout: string }) => {
    const sock = socketOf(o, await loadState());
    const timeoutMs = Number(o.timeout) * 1000;
    if (!(timeoutMs > 0)) throw new Error('--timeout must be a positive number of seconds');
    let done = false;
    const progress = setInterval(() => {
      if (done || o.json) return;
      call(sock, 'GET', '/v1/status').then(
        (r) => {
          const v = (r.body as { remote: RemoteStatus[] }).remote.find((x) => x.volume === name);
          if (v?.writes && !done) process.stderr.write(`  ${name}: ${mib(v.writes.unshippedBytes)} to ship, epoch ${v.writes.ackedSeq}/${v.writes.lastSealed} acknowledged\n`);
        },
        () => undefined,
      );
    }, 1000);
    try {
      const started = Date.now();
      const r = await Promise.race([call(sock, 'POST', `/v1/volumes/${encodeURIComponent(name)}/drain`), new Promise<never>((_, rej) => setTimeout(() => rej(new Error(`drain of ${name} did not finish within ${o.timeout} s (it goes on in the edge; see \`spillway volume status\`)`)), timeoutMs).unref())]);
      done = true;
      if (r.status !== 200) throw new Error((r.body as { error?: string }).error ?? `the edge answered ${r.status}`);
      const w = r.body as NonNullable<RemoteStatus['writes']>;
      process.stdout.write(o.json ? JSON.stringify(w, null, 2) + '\n' : `${name}: drained in ${((Date.now() - started) / 1000).toFixed(1)} s; the origin applied every epoch up to ${w.ackedSeq}\n`);
    } finally {
      done = true;
      clearInterval(progress);
    }
  });
}
