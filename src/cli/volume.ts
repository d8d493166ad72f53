// `spillway volume status|drain|prefetch|hydrate|add|remove|detach|cache`: ask a running edge
// about its volumes (writes, prefetch plans, hydration), add and remove volumes while it runs,
// detach hydrated ones and resize its cache, through the control socket in its state directory
// (STATE/control.sock).

import { readFileSync } from 'node:fs';
import path from 'node:path';

import { Command } from 'commander';
import YAML from 'yaml';

import { parseSize } from '../edge/config.js';
import type { PrefetchStatus } from '../edge/remote/prefetcher.js';
import type { HydrationStatus } from '../hydrate/hydrator.js';
import { call, expectOk, socketOf, stateLoader, withTarget as target, type Target } from './control-client.js';

interface RemoteStatus {
  volume: string;
  peer: string;
  ready: boolean;
  error?: string;
  clients?: number;
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
  const clients = v.clients ? `; ${v.clients} NBD client${v.clients === 1 ? '' : 's'} connected` : '';
  const extra: string[] = [];
  if (v.recording) extra.push(`  recording profile "${v.recording.name}": ${v.recording.chunks} chunks, ${mib(v.recording.uniqueBytes)} read`);
  if (v.prefetch) extra.push(prefetchLine(v.prefetch));
  if (v.hydration) extra.push(hydrationLine(v.hydration));
  const w = v.writes;
  if (!w) return [`${v.volume}: read-only, from peer ${v.peer}${clients}`, ...extra].join('\n');
  const lines = [`${v.volume}: writes ${w.policy}, from peer ${v.peer}${clients}`, ...extra];
  for (const r of w.ranges) lines.push(`  range ${r.offset}+${r.length}: ${r.policy} (${r.source})`);
  if (w.policy !== 'remote-only' || w.ranges.some((r) => r.policy !== 'remote-only')) {
    lines.push(`  epochs sealed ${w.lastSealed}, acknowledged by the origin ${w.ackedSeq}; unshipped ${mib(w.unshippedBytes)} (${mib(w.unsealedBytes)} not flushed by the guest yet)`);
    lines.push(`  RPO lag ${w.rpoLagSeconds.toFixed(1)} s; coalescing ${w.coalescingRatio.toFixed(2)}x; ${w.batches} batches shipped${w.lastError ? `; last error: ${w.lastError}` : ''}`);
  }
  return lines.join('\n');
}

/** Flags of `volume add`: the common keys of a volume entry (docs/edge.md has them all). */
interface AddOptions extends Target {
  spec?: string;
  source?: string;
  format?: string;
  chunkSize?: string;
  family?: string;
  groupPush?: string;
  liveWriter?: boolean;
  peer?: string;
  remoteVolume?: string;
  writes?: string;
  ioTimeout?: string;
  readAhead?: string;
  rpo?: string;
  hydrate?: string;
  hydrateRate?: string;
  hydratePaused?: boolean;
}

/** The entry to send: from --spec (YAML or JSON, '-' = stdin) and/or the flags (flags win).
 *  Relative paths are made absolute here (against the spec file's directory, or the current
 *  one), since the edge refuses them. */
export function volumeEntryOf(name: string | undefined, o: AddOptions): Record<string, unknown> {
  let entry: Record<string, unknown> = {};
  let base = process.cwd();
  if (o.spec) {
    const text = o.spec === '-' ? readFileSync(0, 'utf8') : readFileSync(o.spec, 'utf8');
    if (o.spec !== '-') base = path.dirname(path.resolve(o.spec));
    const v: unknown = YAML.parse(text);
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error(`${o.spec}: a volume entry is a mapping (name:, source: or peer:, …)`);
    entry = v as Record<string, unknown>;
  }
  const set = (k: string, v: unknown) => v !== undefined && (entry[k] = v);
  set('name', name);
  set('source', o.source);
  set('format', o.format);
  set('chunkSize', o.chunkSize);
  set('family', o.family);
  set('groupPush', o.groupPush);
  set('liveWriter', o.liveWriter);
  set('peer', o.peer);
  set('volume', o.remoteVolume);
  set('writes', o.writes);
  set('ioTimeout', o.ioTimeout);
  set('rpo', o.rpo);
  if (o.readAhead !== undefined) set('readAhead', Number(o.readAhead));
  if (o.hydrate !== undefined || o.hydrateRate !== undefined || o.hydratePaused) {
    const h = (typeof entry.hydrate === 'object' && entry.hydrate !== null ? entry.hydrate : {}) as Record<string, unknown>;
    if (o.hydrate !== undefined) h.path = o.hydrate;
    if (o.hydrateRate !== undefined) h.rate = /^\d+$/.test(o.hydrateRate) ? Number(o.hydrateRate) : o.hydrateRate;
    if (o.hydratePaused) h.start = false;
    entry.hydrate = h;
  }
  if (typeof entry.source === 'string') entry.source = path.resolve(base, entry.source);
  const h = entry.hydrate as Record<string, unknown> | undefined;
  if (h && typeof h.path === 'string') h.path = path.resolve(base, h.path);
  if (entry.name === undefined) throw new Error('say the volume name: spillway volume add NAME … (or name: in --spec)');
  if (entry.source === undefined && entry.peer === undefined) throw new Error('say --source PATH (a disk this edge owns) or --peer NAME (a volume served from that peer), or give --spec FILE');
  return entry;
}

export function registerVolume(program: Command): void {
  const vol = program
    .command('volume')
    .summary('inspect, add, remove, drain and detach the volumes of a running edge')
    .description('Talk to a running edge through the control socket in its state directory.');
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

  target(
    vol
      .command('add')
      .argument('[name]', "the volume's name at this edge (or name: in --spec)")
      .option('--spec <file>', "one volume entry of the edge's configuration schema, YAML or JSON ('-' = stdin); flags override its keys")
      .option('--source <path>', 'local role: the disk this edge owns (raw image, block device, or any format qemu-nbd opens)')
      .option('--format <format>', 'local role: raw (default) or a qemu format (qcow2, vmdk, …)')
      .option('--chunk-size <size>', 'local role: power of two, 4KiB..1MiB (default 64KiB)')
      .option('--family <name>', 'local role: a base and its clones share a family (data key, cached content)')
      .option('--group-push <size>', 'local role: push the rest of a file read on demand, up to this per file (0 = off)')
      .option('--live-writer', 'local role: a VM on this site writes the source while the edge serves it (QEMU live migration): no zero map, no lock; raw only')
      .option('--peer <name>', 'remote role: serve the volume from this peer (one of peers: in the edge configuration)')
      .option('--remote-volume <name>', "remote role: the volume's name at the peer (default: name)")
      .option('--writes <policy>', 'remote role: remote-only (default) | origin | write-through | read-only')
      .option('--io-timeout <duration>', 'remote role: a read waits this long for an unreachable peer (default 120s)')
      .option('--read-ahead <chunks>', 'remote role: most chunks read ahead of a sequential reader')
      .option('--rpo <duration>', 'remote role, origin/write-through: batch epochs once the oldest is rpo/2 old')
      .option('--hydrate <path>', 'remote role: migration mode, copy every chunk into this volume file')
      .option('--hydrate-rate <rate>', 'remote role: link bandwidth hydration may use (bytes/s, 50Mbit, 10MiB/s; 0 = what is free)')
      .option('--hydrate-paused', 'remote role: do not start hydrating until `spillway volume hydrate NAME --resume`')
      .description(
        'Add a volume to a running edge without restarting it. The edge opens it as it would from its configuration file and keeps it (STATE/volumes.d) so that it comes back after a restart. Adding the same name with the same spec again succeeds and changes nothing; another spec under a name in use is refused. Relative paths are taken from the current directory (or the --spec file\'s).',
      )
      .addHelpText(
        'after',
        `
Examples:
  spillway volume add -c onprem.yaml web --source /srv/images/web.img
  spillway volume add -c cloud.yaml web --peer onprem --writes origin --hydrate /srv/hydrated/web.img
  spillway volume add -c cloud.yaml --spec web-volume.yaml`,
      ),
  ).action(async (name: string | undefined, o: AddOptions) => {
    const entry = volumeEntryOf(name, o);
    const sock = socketOf(o, await loadState());
    const r = await call(sock, 'POST', '/v1/volumes', entry);
    const v = expectOk<{ volume: string; role: string; created: boolean; ready?: boolean; error?: string }>(r);
    if (o.json) process.stdout.write(JSON.stringify(v, null, 2) + '\n');
    else {
      const what = v.role === 'local' ? 'owned by this edge' : v.ready ? 'exported' : `served from a peer; exported once it opens${v.error ? ` (${v.error})` : ''}`;
      process.stdout.write(`${v.volume}: ${v.created ? 'added' : 'already there with this spec'} (${what})\n`);
    }
  });

  target(
    vol
      .command('remove')
      .alias('rm')
      .argument('<name>', 'the volume (its name at this edge)')
      .option('--drain', 'remote role: first seal and ship every epoch to the origin and wait for it')
      .option('--force', 'remote role: cut connected NBD clients off instead of refusing')
      .option('--discard', "remote role: delete the overlay and journal even if they hold writes the origin lacks")
      .option('--role <role>', 'local or remote, when the configuration has one of each with this name')
      .description(
        "Remove a volume that was added while running. A remote volume is refused while an NBD client is connected (unless --force); its overlay and journal are deleted only when every write is at the origin (or with --discard), and kept otherwise (the answer says why). A hydrated volume file is never deleted. An owned volume stops being served (peers that still read it get errors). Removing an absent volume fails with 'no volume' (a caller can treat that as done).",
      )
      .addHelpText('after', '\nExamples:\n  spillway volume remove -c cloud.yaml web --drain\n  spillway volume remove -c onprem.yaml web'),
  ).action(async (name: string, o: Target & { drain?: boolean; force?: boolean; discard?: boolean; role?: string }) => {
    if (o.role !== undefined && o.role !== 'local' && o.role !== 'remote') throw new Error('--role is local or remote');
    const sock = socketOf(o, await loadState());
    const q = new URLSearchParams();
    if (o.drain) q.set('drain', '1');
    if (o.force) q.set('force', '1');
    if (o.discard) q.set('discard', '1');
    if (o.role) q.set('role', o.role);
    const qs = q.size > 0 ? `?${q.toString()}` : '';
    const r = expectOk<{ volume: string; role: string; drained?: boolean; files?: { action: string; paths: string[]; reason: string }; hydratedPath?: string; openedBy?: string[] }>(await call(sock, 'DELETE', `/v1/volumes/${encodeURIComponent(name)}${qs}`));
    if (o.json) {
      process.stdout.write(JSON.stringify(r, null, 2) + '\n');
      return;
    }
    const lines = [`${r.volume}: removed (${r.role} role)${r.drained ? '; every epoch is at the origin' : ''}`];
    if (r.files && r.files.action !== 'none') lines.push(`  overlay and journal ${r.files.action}: ${r.files.reason}${r.files.action === 'kept' ? `\n    ${r.files.paths.join('\n    ')}` : ''}`);
    if (r.hydratedPath) lines.push(`  the hydrated volume file stays: ${r.hydratedPath}`);
    if (r.openedBy && r.openedBy.length > 0) lines.push(`  it was open at ${r.openedBy.join(', ')}: their reads of it now fail`);
    process.stdout.write(lines.join('\n') + '\n');
  });

  target(
    vol
      .command('detach')
      .argument('<name>', 'the volume (its name at this edge)')
      .option('--drain', 'first seal and ship every epoch to the origin (else unshipped epochs are dropped with the journal)')
      .description(
        "Finish a migration: a volume in migration mode whose hydration is complete leaves the edge. What the guest wrote (its overlay) is flattened into the hydrated volume file, which is then a plain raw disk image equal to what the guest saw, and a VM can boot from it directly. Refused while an NBD client is connected or hydration is incomplete. Safe to repeat, also after the edge died mid-way.",
      )
      .addHelpText('after', '\nExample:\n  spillway volume detach -c cloud.yaml web && qemu-system-x86_64 -drive file=/srv/hydrated/web.img,format=raw …'),
  ).action(async (name: string, o: Target & { drain?: boolean }) => {
    const sock = socketOf(o, await loadState());
    const r = expectOk<{ path: string; size: number; flattenedBytes: number }>(await call(sock, 'POST', `/v1/volumes/${encodeURIComponent(name)}/detach${o.drain ? '?drain=1' : ''}`, {}));
    process.stdout.write(o.json ? JSON.stringify(r, null, 2) + '\n' : `${name}: detached; ${r.path} (${mib(r.size)}) is a raw image of what the guest saw (${mib(r.flattenedBytes)} flattened from its overlay)\n`);
  });

  target(
    vol
      .command('cache')
      .option('--size <size>', 'new cache size, e.g. 20GiB (shrinking evicts at once)')
      .description("Show the edge's cache, or resize it while running with --size. The new size lasts until the edge restarts (or SIGHUP applies a changed cache.size from its file)."),
  ).action(async (o: Target & { size?: string }) => {
    const sock = socketOf(o, await loadState());
    type Cache = { dir: string; maxBytes: number; liveBytes: number; slabBytes: number; blobs: number };
    let c: Cache | undefined;
    if (o.size !== undefined) c = expectOk<{ cache: Cache }>(await call(sock, 'POST', '/v1/cache', { size: parseSize(o.size) })).cache;
    else {
      c = expectOk<{ cache?: Cache }>(await call(sock, 'GET', '/v1/status')).cache;
      if (!c) throw new Error('this edge has no cache (its configuration has no cache: section)');
    }
    process.stdout.write(o.json ? JSON.stringify(c, null, 2) + '\n' : `cache ${c.dir}: ${mib(c.maxBytes)} max${o.size !== undefined ? ' (resized)' : ''}; ${mib(c.liveBytes)} in ${c.blobs} chunks, slab files ${mib(c.slabBytes)}\n`);
  });
}
