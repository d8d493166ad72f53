// `spillway profile record|stop|list|show|delete`: boot/run profiles of a running remote-role
// edge (docs/profiles.md), through the control socket in its state directory. The edge does the
// recording and keeps the files; this command only asks it.

import { Command, Option } from 'commander';

import type { Profile, ProfileSummary } from '../prefetch/profile.js';
import { call, expectOk, socketOf, stateLoader, withTarget, type Target } from './control-client.js';

/** What GET /v1/status says about a volume being recorded. */
interface RecordingStatus {
  name: string;
  startedAt: string;
  chunks: number;
  uniqueBytes: number;
  reads: number;
  idleMs: number;
}

/** The part of a remote volume's status this command reads (src/cli/volume.ts reads others). */
interface RemoteStatus {
  volume: string;
  recording?: RecordingStatus;
}

/** A range of the profile mapped to a file (GET /v1/profiles/NAME?files=1). */
interface FileRange {
  t: number;
  path: string;
  offset: number;
  length: number;
}

const enc = encodeURIComponent;

function size(n: number): string {
  if (n >= 1024 ** 3) return `${(n / 1024 ** 3).toFixed(1)} GiB`;
  if (n >= 1024 ** 2) return `${(n / 1024 ** 2).toFixed(1)} MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${n} B`;
}

function secs(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`;
}

function describeSummary(p: ProfileSummary): string {
  return `profile ${p.name} (volume ${p.volume}, family ${p.family}): ${p.chunks} chunks, ${size(p.uniqueBytes)} read in ${secs(p.durationMs)}`;
}

function table(rows: string[][], rightAligned: ReadonlySet<number> = new Set()): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : rightAligned.has(i) ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join('  ').trimEnd()).join('\n');
}

function positiveDuration(what: string, v: string, parse: (v: string) => number): number {
  const ms = parse(v);
  if (!(ms > 0)) throw new Error(`${what} must be a positive duration (examples: 500ms, 15s, 2m)`);
  return ms;
}

/** Per file, in first-touch order: first touch, first offset, bytes touched, ranges. */
function mergePerFile(files: FileRange[]): Array<{ t: number; path: string; offset: number; length: number; ranges: number }> {
  const by = new Map<string, { t: number; path: string; offset: number; length: number; ranges: number }>();
  for (const f of files) {
    const m = by.get(f.path);
    if (m) {
      m.length += f.length;
      m.ranges++;
    } else by.set(f.path, { t: f.t, path: f.path, offset: f.offset, length: f.length, ranges: 1 });
  }
  return [...by.values()];
}

export function registerProfile(program: Command): void {
  const prof = program
    .command('profile')
    .summary('record, list and inspect boot/run profiles (prefetch order) of a running edge')
    .description(
      'A profile is the order in which a run of a guest first touches the chunks of a streamed volume. The remote-role edge records it and ' +
        'stores it by name; profiles of the same family (a base and its clones) are merged into hot spots and prefetched ahead of demand ' +
        '(prefetch: in the edge config). These commands talk to a running edge through the control socket in its state directory. See docs/profiles.md.',
    );
  const loadSocket = async (o: Target) => socketOf(o, await stateLoader());
  const print = (o: Target, json: unknown, text: string) => process.stdout.write(o.json ? JSON.stringify(json, null, 2) + '\n' : text + '\n');

  // --- record -------------------------------------------------------------------------------
  withTarget(
    prof
      .command('record')
      .summary('record the order a run reads VOLUME in, as profile NAME')
      .argument('<volume>', 'a remote volume of the edge (its name at this edge)')
      .argument('<name>', 'the profile name (letters, digits, ".", "_", "-"; at most 63)')
      .option('--for <duration>', 'stop after this long (e.g. 120s, 2m); default: the edge decides (idle or stop)')
      .option('--idle <duration>', 'stop once the volume has not been read for this long (e.g. 15s)')
      .option('--no-wait', 'start the recording and return at once (stop it later with `spillway profile stop VOLUME`)')
      .addOption(new Option('--poll-ms <ms>', 'how often to ask the edge for progress').default('1000').hideHelp())
      .description(
        'Start recording which chunks of VOLUME the guest reads, in order. Unless --no-wait, shows progress on stderr until the edge stops ' +
          'the recording (--for reached, or --idle without reads) or you press Ctrl-C (which stops it), then prints the saved profile. ' +
          'Start it before the guest boots to capture its boot.',
      )
      .addHelpText(
        'after',
        `
Examples:
  spillway profile record -c edge.yaml web-disk web-boot --idle 15s --for 5m
  spillway profile record --socket /var/lib/spillway/control.sock db-disk db-run --no-wait`,
      ),
  ).action(async (volume: string, name: string, o: Target & { for?: string; idle?: string; wait: boolean; pollMs: string }) => {
    const { parseDuration } = await import('../edge/config.js');
    const body: { name: string; forMs?: number; idleMs?: number } = { name };
    if (o.for !== undefined) body.forMs = positiveDuration('--for', o.for, parseDuration);
    if (o.idle !== undefined) body.idleMs = positiveDuration('--idle', o.idle, parseDuration);
    const pollMs = Number(o.pollMs);
    if (!(pollMs > 0)) throw new Error('--poll-ms must be a positive number');
    const sock = await loadSocket(o);
    const r = await call(sock, 'POST', `/v1/volumes/${enc(volume)}/profile/record`, body);
    if (r.status === 409) throw new Error(`${expectOkMessage(r)} (\`spillway profile stop ${volume}\` stops that recording)`);
    const { recording } = expectOk<{ recording: { volume: string; name: string; startedAt: string } }>(r);
    if (!o.wait) {
      print(o, recording, `recording profile ${recording.name} of ${recording.volume} since ${recording.startedAt}; \`spillway profile stop ${volume}\` stops and saves it`);
      return;
    }
    process.stderr.write(`recording profile ${name} of ${volume}${body.forMs ? ` for up to ${secs(body.forMs)}` : ''}${body.idleMs ? `, until ${secs(body.idleMs)} without reads` : ''}; Ctrl-C stops and saves it\n`);
    const summary = await followRecording(sock, volume, name, pollMs);
    print(o, summary, `saved ${describeSummary(summary)}`);
  });

  // --- stop ---------------------------------------------------------------------------------
  withTarget(
    prof
      .command('stop')
      .summary('stop the recording on VOLUME and save the profile')
      .argument('<volume>', 'the volume being recorded')
      .description('Stop the recording running on VOLUME and save the profile; prints its summary.')
      .addHelpText('after', '\nExample:\n  spillway profile stop -c edge.yaml web-disk'),
  ).action(async (volume: string, o: Target) => {
    const sock = await loadSocket(o);
    const { profile } = expectOk<{ profile: ProfileSummary }>(await call(sock, 'POST', `/v1/volumes/${enc(volume)}/profile/stop`));
    print(o, profile, `saved ${describeSummary(profile)}`);
  });

  // --- list ---------------------------------------------------------------------------------
  withTarget(
    prof
      .command('list')
      .summary('list the stored profiles')
      .description('List the profiles the edge holds: name, volume, family, when recorded, how long, chunks touched and distinct bytes read.')
      .addHelpText('after', '\nExample:\n  spillway profile list -c edge.yaml'),
  ).action(async (o: Target) => {
    const sock = await loadSocket(o);
    const { profiles } = expectOk<{ profiles: ProfileSummary[] }>(await call(sock, 'GET', '/v1/profiles'));
    if (o.json || profiles.length > 0) {
      const rows = [['NAME', 'VOLUME', 'FAMILY', 'RECORDED', 'DURATION', 'CHUNKS', 'READ'], ...profiles.map((p) => [p.name, p.volume, p.family, p.createdAt, secs(p.durationMs), String(p.chunks), size(p.uniqueBytes)])];
      print(o, profiles, table(rows, new Set([4, 5])));
    } else process.stdout.write('no profiles yet (record one with `spillway profile record VOLUME NAME`)\n');
  });

  // --- show ---------------------------------------------------------------------------------
  withTarget(
    prof
      .command('show')
      .summary("show a profile's access order (files or ranges)")
      .argument('<name>', 'the profile')
      .option('--limit <n>', 'show at most this many lines of the access order (0: all)', '50')
      .option('--ranges', 'every range in access order, instead of one line per file')
      .description(
        'Show a profile and its access order: time of first touch, file (mapped through the volume\'s ext4 analysis; "(metadata)" or ' +
          '"(unmapped)" when a range is in no file), offset and length. By default one line per file, in first-touch order (offset of the ' +
          'first range, bytes touched in that file); --ranges lists every range. --json prints the profile and the mapped ranges.',
      )
      .addHelpText('after', '\nExamples:\n  spillway profile show -c edge.yaml web-boot\n  spillway profile show -c edge.yaml web-boot --ranges --limit 0'),
  ).action(async (name: string, o: Target & { limit: string; ranges?: boolean }) => {
    const limit = Number(o.limit);
    if (!Number.isInteger(limit) || limit < 0) throw new Error('--limit must be a whole number ≥ 0 (0 shows all)');
    const sock = await loadSocket(o);
    const body = expectOk<{ profile: Profile; files?: FileRange[] }>(await call(sock, 'GET', `/v1/profiles/${enc(name)}?files=1`));
    if (o.json) {
      print(o, body, '');
      return;
    }
    const p = body.profile;
    const lines = [
      `profile ${p.name}: volume ${p.volume}, family ${p.family}, recorded ${p.createdAt} for ${secs(p.durationMs)}`,
      `  ${p.chunks} chunks of ${size(p.chunkSize)} touched, ${size(p.uniqueBytes)} distinct bytes read, ${p.reads} reads${p.truncated ? `; truncated: only the first ${p.entries.length} ranges were recorded` : ''}`,
    ];
    // without a file map (no ext4 analysis for this volume), the chunk ranges themselves
    const ranges: FileRange[] = body.files ?? p.entries.map((e) => ({ t: e.t, path: '(unmapped)', offset: e.start * p.chunkSize, length: e.count * p.chunkSize }));
    if (!body.files) lines.push('  (the edge mapped no files for this volume: chunk ranges follow)');
    const t = (ms: number) => `+${(ms / 1000).toFixed(3)}s`;
    let rows: string[][];
    let total: number;
    if (o.ranges || !body.files) {
      total = ranges.length;
      const shown = limit === 0 ? ranges : ranges.slice(0, limit);
      rows = [['TIME', 'PATH', 'OFFSET', 'LENGTH'], ...shown.map((f) => [t(f.t), f.path, String(f.offset), size(f.length)])];
    } else {
      const files = mergePerFile(ranges);
      total = files.length;
      const shown = limit === 0 ? files : files.slice(0, limit);
      rows = [['TIME', 'PATH', 'OFFSET', 'LENGTH', 'RANGES'], ...shown.map((f) => [t(f.t), f.path, String(f.offset), size(f.length), String(f.ranges)])];
    }
    lines.push('', table(rows, new Set([0, 2, 3])));
    if (total > rows.length - 1) lines.push(`… ${total - (rows.length - 1)} more (--limit 0 shows all)`);
    process.stdout.write(lines.join('\n') + '\n');
  });

  // --- delete -------------------------------------------------------------------------------
  withTarget(
    prof
      .command('delete')
      .summary('delete a stored profile')
      .argument('<name>', 'the profile')
      .description('Delete a stored profile. Volumes whose prefetch: lists it stop using it the next time they open.')
      .addHelpText('after', '\nExample:\n  spillway profile delete -c edge.yaml web-boot-old'),
  ).action(async (name: string, o: Target) => {
    const sock = await loadSocket(o);
    const { deleted } = expectOk<{ deleted: string }>(await call(sock, 'DELETE', `/v1/profiles/${enc(name)}`));
    print(o, { deleted }, `deleted profile ${deleted}`);
  });
}

function expectOkMessage(r: { status: number; body: unknown }): string {
  try {
    expectOk(r);
    return '';
  } catch (e) {
    return (e as Error).message;
  }
}

/** Poll the edge until the recording of `name` on `volume` ends (the edge stops it, or Ctrl-C
 *  makes us stop it), showing progress on stderr; resolves with the saved profile's summary. */
async function followRecording(sock: string, volume: string, name: string, pollMs: number): Promise<ProfileSummary> {
  let interrupted = false;
  let wake: () => void = () => undefined;
  const onSigint = () => {
    interrupted = true;
    wake();
  };
  process.on('SIGINT', onSigint);
  const tty = process.stderr.isTTY;
  try {
    for (;;) {
      if (!interrupted) {
        await new Promise<void>((resolve) => {
          wake = resolve;
          setTimeout(resolve, pollMs);
        });
      }
      if (interrupted) {
        if (tty) process.stderr.write('\n');
        process.stderr.write(`stopping the recording of ${name}\n`);
        const r = await call(sock, 'POST', `/v1/volumes/${enc(volume)}/profile/stop`);
        if (r.status === 200) return expectOk<{ profile: ProfileSummary }>(r).profile;
        // it ended on its own meanwhile: look it up below
      } else {
        const status = expectOk<{ remote?: RemoteStatus[] }>(await call(sock, 'GET', '/v1/status'));
        const v = status.remote?.find((x) => x.volume === volume);
        if (!v) throw new Error(`the edge no longer serves a remote volume named ${volume}`);
        const rec = v.recording;
        if (rec && rec.name === name) {
          const line = `  ${name}: ${rec.chunks} chunks, ${size(rec.uniqueBytes)} read, ${rec.reads} reads, idle ${secs(rec.idleMs)}`;
          process.stderr.write(tty ? `\r\x1b[K${line}` : `${line}\n`);
          continue;
        }
        if (tty) process.stderr.write('\n');
      }
      const { profiles } = expectOk<{ profiles: ProfileSummary[] }>(await call(sock, 'GET', '/v1/profiles'));
      const saved = profiles.find((p) => p.name === name);
      if (!saved) throw new Error(`the recording of ${name} on ${volume} ended, but the edge holds no profile by that name (see the edge's log)`);
      return saved;
    }
  } finally {
    process.off('SIGINT', onSigint);
  }
}
