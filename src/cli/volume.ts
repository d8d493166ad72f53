// `spillway volume status|drain|prefetch|hydrate`: ask a running edge about its volumes
// (writes, prefetch plans, hydration) through the control socket in its state directory
// (STATE/control.sock).

import { Command } from 'commander';

import { parseSize } from '../edge/config.js';
import type { PrefetchStatus } from '../edge/remote/prefetcher.js';
import type { HydrationStatus } from '../hydrate/hydrator.js';
import { call, expectOk, socketOf, stateLoader, withTarget as target, type Target } from './control-client.js';

interface RemoteStatus {
  volume: string;
  peer: string;
  ready: boolean;
  error?: string;
  writes?: { policy: string; ranges: Array<{ offset: number; length: number; policy: string; source: string }>; unsealedBytes: number; lastSealed: number; ackedSeq: number; unshippedBytes: number; rpoLagSeconds: number; coalescingRatio: number; batches: number; lastError: string };
  recording?: { name: string; chunks: number; uniqueBytes: number; idleMs: number | null };
  prefetch?: PrefetchView;
  hydration?: HydrationView;
}

type PrefetchView = PrefetchStatus;
type HydrationView = HydrationStatus;

function prefetchLine(p: PrefetchView): string {
  return `  prefetch (${p.sources.join(', ')}): ${p.state}; ${p.fetched + p.alreadyCached}/${p.planned} chunks in the cache (${mib(p.fetchedBytes)} fetched); used ${p.used} (${p.late} late), unused ${p.unused}, wasted ${p.wasted}${p.hitRate === null ? '' : `; hit rate ${(p.hitRate * 100).toFixed(0)}%`}`;
}

function hydrationLine(h: HydrationView): string {
  const pct = h.totalChunks > 0 ? ((100 * h.doneChunks) / h.totalChunks).toFixed(1) : '100';
  const eta = h.etaSeconds === null ? 'ETA unknown' : `ETA ${Math.round(h.etaSeconds)} s`;
  return `  hydration: ${h.state}; ${pct}% (${h.doneChunks}/${h.totalChunks} chunks, ${mib(h.doneBytes)}), ${mib(h.ratePerSecond)}/s, ${eta}; ${h.demandLanded} landed by demand${h.rateLimit > 0 ? `; limit ${mib(h.rateLimit)}/s` : ''}${h.lastError ? `; last error: ${h.lastError}` : ''}`;
}

function mib(n: number): string {
  return `${(n / 1048576).toFixed(1)} MiB`;
}

function describe(v: RemoteStatus): string {
  if (!v.ready) return `${v.volume}: not exported yet${v.error ? ` (${v.error})` : ''}`;
  const extra: string[] = [];
  if (v.recording) extra.push(`  recording profile "${v.recording.name}": ${v.recording.chunks} chunks, ${mib(v.recording.uniqueBytes)} read`);
  if (v.prefetch) extra.push(prefetchLine(v.prefetch));
  if (v.hydration) extra.push(hydrationLine(v.hydration));
  const w = v.writes;
  if (!w) return [`${v.volume}: read-only, from peer ${v.peer}`, ...extra].join('\n');
  const lines = [`${v.volume}: writes ${w.policy}, from peer ${v.peer}`, ...extra];
  for (const r of w.ranges) lines.push(`  range ${r.offset}+${r.length}: ${r.policy} (${r.source})`);
  if (w.policy !== 'remote-only' || w.ranges.some((r) => r.policy !== 'remote-only')) {
    lines.push(`  epochs sealed ${w.lastSealed}, acknowledged by the origin ${w.ackedSeq}; unshipped ${mib(w.unshippedBytes)} (${mib(w.unsealedBytes)} not flushed by the guest yet)`);
    lines.push(`  RPO lag ${w.rpoLagSeconds.toFixed(1)} s; coalescing ${w.coalescingRatio.toFixed(2)}x; ${w.batches} batches shipped${w.lastError ? `; last error: ${w.lastError}` : ''}`);
  }
  return lines.join('\n');
}

export function registerVolume(program: Command): void {
  const vol = program.command('volume').summary('inspect and drain the volumes a running edge serves').description('Talk to a running edge through the control socket in its state directory.');
  const loadState = stateLoader;

  target(vol.command('status').argument('[name]', 'one volume (default: all served from peers)').description("Show each remote volume's write policy, epochs sealed and acknowledged, unshipped bytes and RPO lag, its prefetch plan's score and its hydration progress.")).action(async (name: string | undefined, o: Target) => {
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

  target(
    vol
      .command('prefetch')
      .argument('<name>', 'the volume (its name at this edge)')
      .requiredOption('-p, --profile <name...>', 'profiles to plan from (see `spillway profile list`)')
      .option('--hotspots', "also merge every profile of the volume's family (other instances of the same base)")
      .option('--budget <size>', 'cache bytes the plan may fill (default: half the cache), e.g. 2GiB')
      .description('Warm the cache now: plan from recorded profiles and stream the plan in the prefetch class (a plan already running is replaced). Example: spillway volume prefetch web -p boot -c cloud.yaml'),
  ).action(async (name: string, o: Target & { profile: string[]; hotspots?: boolean; budget?: string }) => {
    const sock = socketOf(o, await loadState());
    const body: Record<string, unknown> = { profiles: o.profile, hotspots: !!o.hotspots };
    if (o.budget !== undefined) body.budget = parseSize(o.budget);
    const p = expectOk<{ prefetch: PrefetchView }>(await call(sock, 'POST', `/v1/volumes/${encodeURIComponent(name)}/prefetch`, body)).prefetch;
    process.stdout.write(o.json ? JSON.stringify(p, null, 2) + '\n' : `${name}: plan of ${p.planned} chunks (${mib(p.plannedBytes)}) started\n`);
  });

  target(
    vol
      .command('hydrate')
      .argument('<name>', 'the volume (its name at this edge)')
      .option('--pause', 'pause hydration (it keeps what it copied)')
      .option('--resume', 'resume (or start) hydration')
      .option('--rate <rate>', 'link bandwidth hydration may use: bytes/s, or 50Mbit, 10MiB/s; 0 = what is free')
      .description('Show or steer the hydration of a volume in migration mode (a `hydrate:` section in the edge configuration). Example: spillway volume hydrate web --rate 100Mbit -c cloud.yaml'),
  ).action(async (name: string, o: Target & { pause?: boolean; resume?: boolean; rate?: string }) => {
    if (o.pause && o.resume) throw new Error('say --pause or --resume, not both');
    const sock = socketOf(o, await loadState());
    const body: Record<string, unknown> = {};
    if (o.pause) body.action = 'pause';
    if (o.resume) body.action = 'resume';
    if (o.rate !== undefined) body.rate = /^\d+$/.test(o.rate) ? Number(o.rate) : o.rate;
    const h = expectOk<{ hydration: HydrationView }>(await call(sock, 'POST', `/v1/volumes/${encodeURIComponent(name)}/hydrate`, body)).hydration;
    process.stdout.write(o.json ? JSON.stringify(h, null, 2) + '\n' : `${name}:\n${hydrationLine(h)}\n`);
  });
}
