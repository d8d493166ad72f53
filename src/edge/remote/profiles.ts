// The remote role's profiles and prefetch plans, per exported volume: recording the order in
// which the guest reads the base image (through the volume's ReadTap), the profile store
// (STATE/profiles), mapping a profile to files, and streaming a plan made from profiles into
// the cache. The edge owns the volumes; this owns what is recorded and planned about them.

import type { BlockDevice } from '../../block/device.js';
import type { SecureCache } from '../../cache/cache.js';
import type { Logger } from '../../log/logger.js';
import { buildFileMap } from '../../prefetch/analyze.js';
import type { FileMap } from '../../prefetch/file-map.js';
import { planPrefetch } from '../../prefetch/planner.js';
import { checkName, ProfileError, ProfileRecorder, ProfileStore, summarize, type Profile, type ProfileSummary } from '../../prefetch/profile.js';
import type { ReadTap } from '../../prefetch/tap.js';
import { EdgeRequestError } from '../control.js';
import type { BackgroundGate } from './background.js';
import { Prefetcher, type PrefetchStatus } from './prefetcher.js';
import type { RemoteVolume } from './remote-volume.js';

export interface RecordingStatus {
  name: string;
  startedAt: string;
  chunks: number;
  uniqueBytes: number;
  reads: number;
  /** ms since the last new chunk was read (null before the first). */
  idleMs: number | null;
}

export interface PrefetchConfig {
  profiles: string[];
  /** also merge every profile of the volume's family (other instances of the same base). */
  hotspots: boolean;
  /** cache bytes the plan may fill (default: half the cache). */
  budget?: number;
}

/** What this needs to know about an exported volume. */
export interface ProfiledVolume {
  volume: RemoteVolume;
  /** the base image below the overlay (reads here are not recorded). */
  base: BlockDevice;
  tap: ReadTap;
  /** the gate of the volume's peer (background fetches). */
  gate: BackgroundGate;
  /** chunks already in a hydrated copy (left out of plans). */
  has?: (index: number) => boolean;
}

interface Recording {
  recorder: ProfileRecorder;
  startedAt: Date;
  unlisten: () => void;
  timer: NodeJS.Timeout;
}

interface State {
  v: ProfiledVolume;
  recording?: Recording;
  prefetcher?: Prefetcher;
  prefetchUnlisten?: () => void;
  fileMap?: Promise<FileMap>;
}

/** The recorder's clock: monotonic, in epoch milliseconds (like ProfileRecorder's default). */
const clock = (): number => performance.timeOrigin + performance.now();

export class VolumeProfiles {
  readonly store: ProfileStore;
  private readonly volumes = new Map<string, State>();

  constructor(
    dir: string,
    private readonly cache: SecureCache,
    private readonly cacheSize: number,
    private readonly log: Logger,
  ) {
    this.store = new ProfileStore(dir);
  }

  /** A volume is exported: recording and plans may start. */
  attach(exportName: string, v: ProfiledVolume): void {
    this.volumes.set(exportName, { v });
  }

  private state(exportName: string): State {
    const s = this.volumes.get(exportName);
    if (!s) throw new EdgeRequestError(409, `volume ${exportName} is not open yet`);
    return s;
  }

  /** Record the order in which the guest reads the base image of the volume. */
  startRecording(exportName: string, o: { name: string; forMs?: number; idleMs?: number }): RecordingStatus {
    const s = this.state(exportName);
    if (s.recording) throw new EdgeRequestError(409, `volume ${exportName} is already recording profile "${s.recording.recorder.name}"; stop it first (spillway profile stop ${exportName})`);
    try {
      checkName('profile name', o.name);
    } catch (err) {
      throw new EdgeRequestError(400, (err as Error).message);
    }
    const info = s.v.volume.info!;
    const recorder = new ProfileRecorder({ name: o.name, volume: info.name, family: info.family, chunkSize: info.chunkSize, size: info.size });
    const unlisten = s.v.tap.listen((off, len) => recorder.touch(off, len));
    const idleMs = o.idleMs ?? 15_000;
    const started = clock();
    const timer = setInterval(
      () => {
        const now = clock();
        const idle = recorder.lastTouchAt !== undefined && now - recorder.lastTouchAt > idleMs;
        if ((o.forMs !== undefined && now - started > o.forMs) || idle) {
          this.stopRecording(exportName).catch((err: Error) => this.log('error', 'saving the profile failed', { volume: exportName, err: err.message }));
        }
      },
      Math.min(500, Math.max(50, idleMs / 4)),
    );
    timer.unref();
    s.recording = { recorder, startedAt: new Date(), unlisten, timer };
    this.log('info', 'recording a profile', { volume: exportName, profile: o.name, idleMs, forMs: o.forMs });
    return this.recordingStatus(exportName)!;
  }

  /** Stop recording and save the profile. */
  async stopRecording(exportName: string): Promise<ProfileSummary> {
    const s = this.state(exportName);
    const rec = s.recording;
    if (!rec) throw new EdgeRequestError(409, `volume ${exportName} is not recording a profile`);
    s.recording = undefined;
    clearInterval(rec.timer);
    rec.unlisten();
    const profile = rec.recorder.toProfile();
    await this.store.save(profile);
    const summary = summarize(profile);
    this.log('info', 'profile saved', { ...summary, export: exportName });
    return summary;
  }

  recordingStatus(exportName: string): RecordingStatus | undefined {
    const rec = this.volumes.get(exportName)?.recording;
    if (!rec) return undefined;
    const r = rec.recorder;
    return { name: r.name, startedAt: rec.startedAt.toISOString(), chunks: r.chunks, uniqueBytes: r.uniqueBytes, reads: r.reads, idleMs: r.lastTouchAt === undefined ? null : Math.round(clock() - r.lastTouchAt) };
  }

  prefetchStatus(exportName: string): PrefetchStatus | undefined {
    return this.volumes.get(exportName)?.prefetcher?.status();
  }

  async list(): Promise<ProfileSummary[]> {
    return this.store.list((name, err) => this.log('warn', 'unreadable profile skipped', { profile: name, err: err.message }));
  }

  /** A profile; with `withFiles`, its ranges mapped to the files of an open volume it was recorded on. */
  async get(name: string, withFiles: boolean): Promise<{ profile: Profile; files?: Array<{ t: number; path: string; offset: number; length: number }> }> {
    const profile = await this.load(name);
    if (!withFiles) return { profile };
    const s = [...this.volumes.values()].find((x) => x.v.volume.info?.name === profile.volume);
    if (!s) throw new EdgeRequestError(409, `no open volume here is "${profile.volume}", so its files cannot be mapped; open it, or use --ranges`);
    const base = s.v.base;
    s.fileMap ??= buildFileMap(async (off, len) => {
      const b = Buffer.alloc(len);
      await base.read(off, b);
      return b;
    }, base.size);
    let map: FileMap;
    try {
      map = await s.fileMap;
    } catch (err) {
      s.fileMap = undefined;
      throw new EdgeRequestError(422, `cannot map the files of ${profile.volume}: ${(err as Error).message}`);
    }
    const files: Array<{ t: number; path: string; offset: number; length: number }> = [];
    for (const e of profile.entries) {
      const offset = e.start * profile.chunkSize;
      const length = Math.min(e.count * profile.chunkSize, profile.size - offset);
      const hits = map.filesIn(offset, length);
      if (hits.length === 0) files.push({ t: e.t, path: '(metadata)', offset, length });
      for (const f of hits) {
        for (const x of f.extents) {
          const from = Math.max(offset, x.offset);
          const to = Math.min(offset + length, x.offset + x.length);
          if (from < to) files.push({ t: e.t, path: f.path, offset: from, length: to - from });
        }
      }
    }
    return { profile, files };
  }

  async delete(name: string): Promise<void> {
    await this.load(name);
    await this.store.delete(name);
  }

  async load(name: string): Promise<Profile> {
    try {
      return await this.store.load(name);
    } catch (err) {
      if (err instanceof ProfileError) throw new EdgeRequestError(/no profile named/.test(err.message) ? 404 : 422, err.message);
      throw err;
    }
  }

  /** Start (or restart) a plan from profiles (and hot spots) and stream it into the cache. */
  async prefetch(exportName: string, cfg: PrefetchConfig, requested = false): Promise<PrefetchStatus | undefined> {
    const s = this.state(exportName);
    const info = s.v.volume.info!;
    const profiles: Profile[] = [];
    for (const p of cfg.profiles) {
      if (requested) {
        profiles.push(await this.load(p)); // asked for by name: a missing one is the caller's error
        continue;
      }
      try {
        profiles.push(await this.store.load(p));
      } catch (err) {
        this.log('warn', 'profile not used for prefetch', { volume: exportName, profile: p, err: (err as Error).message });
      }
    }
    if (cfg.hotspots) {
      const have = new Set(profiles.map((p) => p.name));
      for (const p of await this.store.forFamily(info.family)) if (!have.has(p.name)) profiles.push(p);
    }
    const usable = profiles.filter((p) => p.chunkSize === info.chunkSize);
    if (usable.length < profiles.length) this.log('warn', 'profiles with another chunk size left out of the plan', { volume: exportName, left: profiles.length - usable.length });
    if (usable.length === 0) {
      if (requested) throw new EdgeRequestError(422, "no usable profile (their chunk size differs from the volume's)");
      this.log('warn', 'no profile to prefetch from', { volume: exportName, profiles: cfg.profiles, hotspots: cfg.hotspots });
      return undefined;
    }
    const budget = cfg.budget ?? Math.floor(this.cacheSize / 2);
    const v = s.v.volume;
    const plan = planPrefetch({
      chunkSize: info.chunkSize,
      chunkCount: v.chunkCount,
      profiles: usable,
      budgetBytes: budget,
      chunkBytes: (i) => v.chunkLength(i),
      skip: (i) => this.cache.lookup(v.name, i) !== null || (s.v.has?.(i) ?? false),
    });
    s.prefetcher?.stop();
    s.prefetchUnlisten?.();
    const prefetcher = new Prefetcher({ volume: v, exportName, cache: this.cache, gate: s.v.gate, plan: plan.chunks, sources: usable.map((p) => p.name), log: this.log });
    s.prefetcher = prefetcher;
    s.prefetchUnlisten = s.v.tap.listen((off, len) => prefetcher.noteRead(off, len));
    prefetcher.start();
    this.log('info', 'prefetch plan started', { volume: exportName, profiles: usable.map((p) => p.name), chunks: plan.chunks.length, bytes: plan.bytes, truncatedByBudget: plan.truncated, budget });
    return prefetcher.status();
  }

  /** The volume leaves the edge: stop its plan, save what it was recording, forget it. */
  async detach(exportName: string): Promise<void> {
    const s = this.volumes.get(exportName);
    if (!s) return;
    s.prefetcher?.stop();
    s.prefetchUnlisten?.();
    if (s.recording) await this.stopRecording(exportName).catch((err: Error) => this.log('warn', 'profile not saved when the volume was removed', { volume: exportName, err: err.message }));
    this.volumes.delete(exportName);
  }

  /** Stop plans; save what is being recorded. */
  async close(): Promise<void> {
    for (const [name, s] of this.volumes) {
      s.prefetcher?.stop();
      if (s.recording) await this.stopRecording(name).catch((err: Error) => this.log('warn', 'profile not saved at shutdown', { volume: name, err: err.message }));
    }
  }
}
