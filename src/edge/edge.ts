// The edge proxy daemon (`spillway edge --config FILE`): plays the local role for the volumes
// it owns (link listener → chunk server, and an applier per volume for write-back) and the
// remote role for volumes it serves from a peer (peer client → remote volume → streamed device
// → overlay → write-back (journal, shipper) → stats → NBD export). A control socket in the
// state directory answers `spillway volume …` and the management service; through it volumes
// are added, removed and detached while the edge runs (one code path per role with the ones
// of the configuration file; added ones are kept in STATE/volumes.d, see volume-store.ts).

import { mkdir, rm } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import type tls from 'node:tls';

import { existsSync } from 'node:fs';

import { FilterDevice, type BlockDevice } from '../block/device.js';
import { OverlayDevice } from '../block/overlay.js';
import { StatsDevice } from '../block/stats.js';
import { SecureCache } from '../cache/cache.js';
import { LinkConnection } from '../link/connection.js';
import type { LinkMessage } from '../link/codec.js';
import { LINK_ERR } from '../link/protocol.js';
import { createLinkServer, loadTls, type LinkTlsMaterial } from '../link/tls.js';
import type { Logger } from '../log/logger.js';
import { startMetricsServer, type MetricsServer } from '../metrics/http.js';
import { NbdServer } from '../nbd/server.js';
import { readPartitionTable, swapRanges } from '../prefetch/partitions.js';
import { buildFileMap } from '../prefetch/analyze.js';
import { FileGroups } from '../prefetch/groups.js';
import type { Profile, ProfileSummary } from '../prefetch/profile.js';
import { ReadTap } from '../prefetch/tap.js';
import { bitmapPathOf, HydratedDevice, readHydrationState, statePathOf, type ChunkSource } from '../hydrate/hydrated-device.js';
import { Hydrator, type HydrationStatus } from '../hydrate/hydrator.js';
import { fsyncDir } from '../util/durable.js';
import { BackgroundGate, type BackgroundGateStatus } from './remote/background.js';
import { flattenOverlay } from './remote/flatten.js';
import { KeyStore } from './remote/key-store.js';
import type { PrefetchStatus } from './remote/prefetcher.js';
import { VolumeProfiles, type RecordingStatus } from './remote/profiles.js';
import { WriteBackDevice } from '../writeback/device.js';
import { Journal } from '../writeback/journal.js';
import { PolicyMap, type PolicyRange } from '../writeback/policy.js';
import { Shipper } from '../writeback/shipper.js';
import { isRemoteVolume, isValidName, parseAddress, type EdgeConfig, type LocalVolumeEntry, type RemoteVolumeEntry } from './config.js';
import { EdgeRequestError, startControlServer, type ControlServer } from './control.js';
import { Applier } from './local/applier.js';
import { ChunkServer } from './local/chunk-server.js';
import { peerShipTransport } from './remote/ship-transport.js';
import { LocalVolume } from './local/volume.js';
import { PeerClient } from './remote/peer-client.js';
import { RemoteVolume } from './remote/remote-volume.js';
import { StreamedDevice } from './remote/streamed-device.js';
import { canonical, parseVolumeSpec, VolumeStore, type DetachResult, type ParsedVolume, type VolumeRecord, type VolumeRole } from './volume-store.js';

/** Where a volume comes from: the configuration file, or the control socket (STATE/volumes.d). */
export type VolumeOrigin = 'config' | 'runtime';

export interface LocalVolumeStatus {
  volume: string;
  /** from the configuration file, or added while running. */
  origin: VolumeOrigin;
  size: number;
  chunks: number;
  zeroChunks: number;
  liveWriter: boolean;
  /** connected peers that opened the volume in their current link session. */
  openedBy: string[];
  groupPush: { state: string; files?: number; error?: string };
}

export interface RemoteVolumeStatus {
  volume: string;
  /** from the configuration file, or added while running. */
  origin: VolumeOrigin;
  peer: string;
  ready: boolean;
  size?: number;
  error?: string;
  /** NBD clients connected to the volume's export now. */
  clients: number;
  writes?: VolumeWriteStatus;
  recording?: RecordingStatus;
  prefetch?: PrefetchStatus;
  hydration?: HydrationStatus;
}

export interface EdgeStatus {
  site: string;
  name: string;
  /** the Prometheus URL, when the edge has a metrics listener. */
  metrics?: string;
  /** the secure cache (remote role), when the edge has one. */
  cache?: CacheStatus;
  local: LocalVolumeStatus[];
  remote: RemoteVolumeStatus[];
  /** volumes added while running that did not open when the edge started (their spec is kept). */
  unavailable: Array<{ volume: string; role: VolumeRole; error: string }>;
  /** volumes detached from this edge (kept until a volume of that name is added again). */
  detached: DetachResult[];
  peers: Array<{ name: string; connected: boolean; connections: number; reconnects: number; lastError: string; background?: BackgroundGateStatus }>;
}

export interface CacheStatus {
  dir: string;
  maxBytes: number;
  /** bytes of slots holding cached chunks. */
  liveBytes: number;
  /** bytes the slab files span (bounded by maxBytes). */
  slabBytes: number;
  blobs: number;
}

/** The answer of POST /v1/volumes: the volume's status, with its role. */
export type AddVolumeResult = { created: boolean } & ({ role: 'local'; status: LocalVolumeStatus } | { role: 'remote'; status: RemoteVolumeStatus });

export interface RemoveVolumeOptions {
  /** remote role: seal and ship every epoch to the origin first. */
  drain?: boolean;
  /** remote role: cut NBD clients off instead of refusing. */
  force?: boolean;
  /** remote role: delete the overlay and journal even if they hold writes the origin lacks. */
  discard?: boolean;
  /** which volume, when the configuration has a local and a remote one of this name. */
  role?: VolumeRole;
  signal?: AbortSignal;
}

/** The answer of DELETE /v1/volumes/NAME. */
export interface RemoveVolumeResult {
  volume: string;
  role: VolumeRole;
  /** remote: every epoch was acknowledged by the origin before the volume closed. */
  drained?: boolean;
  /** remote: NBD clients cut off (force). */
  clientsDisconnected?: number;
  /** remote: the write-back state when the volume closed. */
  writes?: VolumeWriteStatus;
  /** remote: what happened to the overlay and journal. */
  files?: { action: 'deleted' | 'kept' | 'none'; paths: string[]; reason: string };
  /** remote with hydrate: the hydrated volume file, which is never deleted. */
  hydratedPath?: string;
  /** local: peers that had it open (their reads now fail). */
  openedBy?: string[];
}

/** A device lent to a layer that closes what it wraps: close() leaves it open. */
class Borrowed extends FilterDevice {
  get description(): string {
    return this.inner.description;
  }
  override close(): Promise<void> {
    return Promise.resolve();
  }
}

export interface VolumeWriteStatus {
  policy: string;
  ranges: Array<{ offset: number; length: number; policy: string; source: string }>;
  unsealedBytes: number;
  lastSealed: number;
  ackedSeq: number;
  unshippedBytes: number;
  rpoLagSeconds: number;
  coalescingRatio: number;
  batches: number;
  lastError: string;
}

interface LocalEntry {
  entry: LocalVolumeEntry;
  origin: VolumeOrigin;
  volume: LocalVolume;
  handle: number;
}

interface RemoteEntry {
  entry: RemoteVolumeEntry;
  origin: VolumeOrigin;
  volume: RemoteVolume;
  /** aborts the open and the retries of exportWhenOpen when the volume is removed. */
  abort: AbortController;
  /** the volume is being removed: exportWhenOpen stops, the remover closes what it built. */
  closing: boolean;
  /** exportWhenOpen, until it exported the volume or gave up. */
  opening?: Promise<void>;
  openingDone?: boolean;
  /** background work started and the export added (startServing). */
  serving?: boolean;
  overlay?: OverlayDevice;
  device?: BlockDevice;
  /** the base image as the guest sees it, below the overlay (streamed, or hydrated). */
  base?: BlockDevice;
  tap?: ReadTap;
  hydrated?: HydratedDevice;
  hydrator?: Hydrator;
  error?: string;
  writeback?: WriteBackDevice;
  shipper?: Shipper;
  journal?: Journal;
  policy?: PolicyMap;
}

export class Edge {
  readonly name: string;
  private readonly localVolumes = new Map<string, LocalEntry>();
  private readonly remoteVolumes = new Map<string, RemoteEntry>();
  /** volumes added while running (STATE/volumes.d). */
  private readonly store: VolumeStore;
  /** records whose volume did not open at start (kept; a new add or a DELETE settles them). */
  private readonly unavailable = new Map<string, { role: VolumeRole; error: string }>();
  /** detach results of volumes detached from this edge (tombstones in STATE/volumes.d). */
  private readonly detached = new Map<string, DetachResult>();
  /** add / remove / detach of one name run one at a time. */
  private readonly volumeLocks = new Map<string, Promise<unknown>>();
  private readonly appliers = new Map<number, Applier>();
  private control: ControlServer | null = null;
  private readonly peers = new Map<string, PeerClient>();
  private chunkServer: ChunkServer | null = null;
  private linkServer: tls.Server | null = null;
  private readonly linkConns = new Set<LinkConnection>();
  private cache: SecureCache | null = null;
  private nbd: NbdServer | null = null;
  private metrics: MetricsServer | null = null;
  private material: LinkTlsMaterial | null = null;
  /** group push: chunk groups (files) of the volumes this edge owns, once mapped. */
  private readonly groups = new Map<string, { state: string; files?: number; error?: string; groups?: FileGroups }>();
  private profiles: VolumeProfiles | null = null;
  private keyStore: KeyStore | null = null;
  /** background fetches (prefetch, hydration) per peer. */
  private readonly gates = new Map<string, BackgroundGate>();

  private constructor(
    readonly config: EdgeConfig,
    private readonly log: Logger,
  ) {
    this.name = config.name ?? config.site;
    this.store = new VolumeStore(path.join(config.state, 'volumes.d'));
  }

  static async start(config: EdgeConfig, log: Logger): Promise<Edge> {
    const edge = new Edge(config, log);
    try {
      await edge.startAll();
    } catch (err) {
      await edge.stop();
      throw err;
    }
    return edge;
  }

  private async startAll(): Promise<void> {
    const c = this.config;
    await mkdir(c.state, { recursive: true, mode: 0o700 });
    this.material = loadTls(c.tls);
    if (c.metrics) {
      this.metrics = await startMetricsServer(c.metrics.listen);
      this.log('info', 'metrics', { url: this.metrics.url });
    }
    // Volumes added while running come back; the configuration file wins a name it also has.
    const records: Array<{ name: string; record: VolumeRecord; parsed: ParsedVolume }> = [];
    for (const x of await this.store.list()) {
      if (!x.record) {
        this.log('error', 'a kept volume record is unreadable; ignored', { volume: x.name, err: x.error });
        continue;
      }
      if (x.record.detached) {
        // A detach (or its cleanup) was cut short after the flatten was durable: finish it.
        await this.deleteRemoteFiles(x.name, x.record.detached.path).catch((err: Error) => this.log('warn', 'cleanup of a detached volume failed', { volume: x.name, err: err.message }));
        this.detached.set(x.name, x.record.detached);
        continue;
      }
      if (x.record.removing) {
        await this.finishRemoval(x.name, x.record);
        continue;
      }
      if (c.volumes.some((v) => v.name === x.name)) {
        this.log('warn', 'a volume added while running has the name of one in the configuration file; the file wins', { volume: x.name, record: this.store.file(x.name) });
        continue;
      }
      try {
        records.push({ name: x.name, record: x.record, parsed: parseVolumeSpec(x.record.spec, c) });
      } catch (err) {
        this.unavailable.set(x.name, { role: x.record.role, error: (err as Error).message });
        this.log('error', 'a kept volume no longer validates; not opened', { volume: x.name, err: (err as Error).message });
      }
    }

    // Local role: the volumes this edge owns, served to peers over the link.
    this.chunkServer = new ChunkServer({ rateBytes: (c.link.rateMbit * 1e6) / 8, groups: (name) => this.groups.get(name)?.groups ?? null, log: this.log.child('local') });
    for (const v of c.volumes) if (!isRemoteVolume(v)) await this.openLocal(v, 'config');
    for (const r of records) {
      if (r.parsed.role !== 'local') continue;
      try {
        await this.openLocal(r.parsed.entry, 'runtime');
      } catch (err) {
        this.unavailable.set(r.name, { role: 'local', error: (err as Error).message });
        this.log('error', 'a volume added while running did not open; its record is kept', { volume: r.name, err: (err as Error).message });
      }
    }
    if (c.link.listen) await this.listenLink(c.link.listen);

    // Remote role: with a cache, the storage target runs even without a volume yet (volumes
    // can be added while running).
    if (c.cache) {
      await this.startRemoteRole();
      for (const v of c.volumes) if (isRemoteVolume(v)) this.openRemote(v, 'config');
      for (const r of records) if (r.parsed.role === 'remote') this.openRemote(r.parsed.entry, 'runtime');
    }
    this.control = await startControlServer(path.join(c.state, 'control.sock'), this, this.log.child('control'));
  }

  /** The cache, profiles, key store and NBD server of the remote role. */
  private async startRemoteRole(): Promise<void> {
    const c = this.config;
    this.cache = await SecureCache.open({ dir: c.cache!.dir, maxBytes: c.cache!.size });
    this.profiles = new VolumeProfiles(path.join(c.state, 'profiles'), this.cache, c.cache!.size, this.log.child('prefetch'));
    this.keyStore = new KeyStore(path.join(c.state, 'volume-keys'), this.material!.key, this.name);
    this.nbd = new NbdServer({
      exports: [],
      tls: c.nbd.tls ? { cert: readFileSync(c.nbd.tls.cert), key: readFileSync(c.nbd.tls.key), ca: c.nbd.tls.ca ? readFileSync(c.nbd.tls.ca) : undefined } : undefined,
      log: this.log.child('nbd'),
    });
    if (c.nbd.socket) await this.nbd.listen({ path: c.nbd.socket });
    else await this.nbd.listen(parseAddress(c.nbd.listen, '127.0.0.1'));
    this.log('info', 'storage target listening', { nbd: c.nbd.socket ?? c.nbd.listen });
  }

  /** Open an owned volume and serve it: chunk server handle, applier, group push map. */
  private async openLocal(v: LocalVolumeEntry, origin: VolumeOrigin): Promise<LocalEntry> {
    const c = this.config;
    const volume = await LocalVolume.open({ name: v.name, source: v.source, format: v.format, chunkSize: v.chunkSize, family: v.family, liveWriter: v.liveWriter }, { stateDir: c.state, log: this.log.child('local') });
    const cs = this.chunkServer!;
    let handle: number | undefined;
    try {
      handle = cs.register(v.name, volume);
      // Write-back: the volume applies the epochs a remote edge ships (recovering first).
      this.appliers.set(handle, await Applier.open({ volume: v.name, dir: path.join(c.state, 'applier', v.name), device: volume.writable, log: this.log.child('applier') }));
    } catch (err) {
      if (handle !== undefined) this.appliers.delete(handle);
      cs.unregister(v.name);
      await volume.close().catch(() => undefined);
      throw err;
    }
    const l: LocalEntry = { entry: v, origin, volume, handle };
    this.localVolumes.set(v.name, l);
    if (v.groupPush > 0) void this.mapFiles(l, v.groupPush);
    else this.groups.set(v.name, { state: 'off' });
    return l;
  }

  /** Stop serving an owned volume and close it (its applier state and data key stay). */
  private async closeLocal(l: LocalEntry): Promise<void> {
    const name = l.entry.name;
    this.chunkServer?.unregister(name);
    const applier = this.appliers.get(l.handle);
    this.appliers.delete(l.handle);
    await applier?.close().catch((err: Error) => this.log('warn', 'applier close failed', { volume: name, err: err.message }));
    if (this.localVolumes.get(name) === l) this.localVolumes.delete(name);
    this.groups.delete(name);
    await l.volume.close();
  }

  /** Start serving a volume from a peer: it is exported once it opens (the peer may come later). */
  private openRemote(v: RemoteVolumeEntry, origin: VolumeOrigin): RemoteEntry {
    const peer = this.peerClient(v.peer);
    const keyStore = this.keyStore!;
    const volume = new RemoteVolume(v.volume ?? v.name, peer, this.cache!, {
      ioTimeoutMs: v.ioTimeout,
      log: this.log.child('remote'),
      // A hydrated volume keeps its key (sealed) so that it can be served with the origin gone.
      onOpened: v.hydrate ? (info, key) => void keyStore.save(v.name, info, key).catch((err: Error) => this.log('error', 'cannot keep the volume key for offline serving', { volume: v.name, err: err.message })) : undefined,
    });
    const r: RemoteEntry = { entry: v, origin, volume, abort: new AbortController(), closing: false };
    this.remoteVolumes.set(v.name, r);
    r.opening = this.exportWhenOpen(v.name, r);
    return r;
  }

  /**
   * Take a remote volume out of the data path: stop opening it, stop its background work
   * (hydration, shipping, prefetch, recording), close its stack (the write-back layer seals
   * what the guest wrote and applies it to the overlay) and the volume. Its export must be
   * gone already. Files stay; the caller decides.
   */
  /** Close a remote volume's stack; resolves with the error closing the device met, if any. */
  private async closeRemoteStack(r: RemoteEntry): Promise<Error | null> {
    r.closing = true;
    r.abort.abort(new Error('the volume is being removed'));
    await r.opening?.catch(() => undefined);
    if (r.device && this.nbd?.findExport(r.entry.name)?.device === r.device) this.nbd.removeExport(r.entry.name);
    await this.profiles?.detach(r.entry.name);
    await r.hydrator?.stop().catch(() => undefined);
    await r.shipper?.stop();
    let failed: Error | null = null;
    await r.device?.close().catch((err: Error) => {
      failed = err;
      this.log('warn', 'closing the volume stack failed', { volume: r.entry.name, err: err.message });
    }); // seals what the guest wrote
    await r.journal?.close().catch(() => undefined);
    r.volume.close();
    return failed;
  }

  /**
   * The volume left this edge: forget its chunks in the cache (unless another volume here
   * streams the same origin volume, as clones of one base do). A cached mapping is trusted
   * without asking the peer, and the origin may change before the volume comes back (an
   * instance brought back runs at its origin and writes there).
   */
  private async forgetCached(r: RemoteEntry): Promise<void> {
    const origin = r.entry.volume ?? r.entry.name;
    if ([...this.remoteVolumes.values()].some((x) => x !== r && (x.entry.volume ?? x.entry.name) === origin)) return;
    const n = await this.cache?.dropVolume(origin).catch((err: Error) => {
      this.log('error', 'cannot forget the cached chunks of a removed volume', { volume: r.entry.name, err: err.message });
      return 0;
    });
    if (n) this.log('info', 'cached chunks of the removed volume forgotten', { volume: r.entry.name, origin, chunks: n });
  }

  /** Resolves when every remote volume is exported (or failed), or after `timeoutMs`. */
  async ready(timeoutMs = 60000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while ([...this.remoteVolumes.values()].some((r) => !r.device && !r.error)) {
      if (Date.now() > deadline) throw new Error('remote volumes did not open in time');
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  private async exportWhenOpen(name: string, r: RemoteEntry): Promise<void> {
    r.openingDone = false;
    try {
      for (;;) {
        if (r.closing) return;
        try {
          if (!r.volume.info && r.entry.hydrate) await this.openHydratedOffline(name, r);
          if (!r.volume.info) await r.volume.open(r.abort.signal);
          if (r.closing) return;
          if (!r.device) await this.buildStack(name, r);
          break;
        } catch (err) {
          if (r.closing) return;
          r.error = (err as Error).message;
          const code = (err as { code?: string }).code;
          if (code === 'SPW_ERR_JOURNAL_CORRUPT') {
            // Not transient: retrying would not help, and serving without the journal would lose writes.
            this.log('error', 'volume not exported: its write-back journal is corrupt', { volume: name, err: r.error });
            return;
          }
          this.log('warn', 'remote volume not open yet; retrying', { volume: name, err: r.error });
          await new Promise<void>((res) => {
            const t = setTimeout(res, 2000);
            r.abort.signal.addEventListener('abort', () => (clearTimeout(t), res()), { once: true });
          });
          if (!this.nbd) return;
        }
      }
      // Built, but a removal started meanwhile: it closes the stack (or resumes serving).
      if (r.closing || !this.nbd) return;
      this.startServing(name, r);
    } finally {
      r.openingDone = true;
    }
  }

  /** The stack is built: start background work and export it. */
  private startServing(name: string, r: RemoteEntry): void {
    r.error = undefined;
    r.serving = true;
    const dev = r.device!;
    // Background work starts with the export: recording sees the guest's first read, and the
    // plan races the guest's demand for the same chunks.
    const profiles = this.profiles!;
    profiles.attach(name, { volume: r.volume, base: r.base!, tap: r.tap!, gate: this.gateFor(r.entry.peer), has: r.hydrated ? (i) => r.hydrated!.has(i) : undefined });
    if (r.entry.record) {
      try {
        profiles.startRecording(name, { name: r.entry.record.name, idleMs: r.entry.record.idle, forMs: r.entry.record.for });
      } catch (err) {
        this.log('error', 'cannot record a profile', { volume: name, err: (err as Error).message });
      }
    }
    if (r.entry.prefetch) void profiles.prefetch(name, r.entry.prefetch).catch((err: Error) => this.log('error', 'prefetch plan not started', { volume: name, err: err.message }));
    if (r.hydrator && r.entry.hydrate?.start !== false) r.hydrator.start();
    this.exportOf(name, r);
    this.log('info', 'volume exported', { volume: name, size: dev.size, stack: dev.description });
  }

  private exportOf(name: string, r: RemoteEntry): void {
    if (this.nbd && !this.nbd.exports.some((e) => e.name === name)) this.nbd.addExport({ name, device: r.device!, description: `${r.entry.volume ?? name} from ${r.entry.peer}` });
  }

  /** A removal that was refused or failed before closing anything: serve the volume again. */
  private resumeServing(name: string, r: RemoteEntry): void {
    r.closing = false;
    if (r.serving) this.exportOf(name, r);
    else if (r.device) this.startServing(name, r);
    else if (r.openingDone) r.opening = this.exportWhenOpen(name, r);
  }

  /** A completely hydrated volume opens from its own file and the kept key, origin or not. */
  private async openHydratedOffline(name: string, r: RemoteEntry): Promise<void> {
    const st = await readHydrationState(r.entry.hydrate!.path);
    if (!st?.complete) return;
    const kept = this.keyStore!.load(name);
    if (!kept) return;
    r.volume.openOffline(kept.info, kept.dataKey);
    this.log('info', 'hydrated volume opens without the origin (its key was kept sealed at this edge)', { volume: name, completedAt: st.completedAt });
  }

  private gateFor(peer: string): BackgroundGate {
    let g = this.gates.get(peer);
    if (!g) this.gates.set(peer, (g = new BackgroundGate()));
    return g;
  }

  /** Whole chunks for the hydrator: from the cache when there, else over the link, gated. */
  private hydrationSource(r: RemoteEntry): ChunkSource {
    const v = r.volume;
    const gate = this.gateFor(r.entry.peer);
    return {
      chunkCount: v.chunkCount,
      chunkLength: (i) => v.chunkLength(i),
      fetch: async (i, priority) => {
        const hit = await this.cache!.get(v.name, i);
        if (hit !== null) return hit;
        return gate.run(priority, () => v.fetch(i, priority));
      },
    };
  }

  /** The owned volume's files, for group push (ext filesystems; others get no groups). */
  private async mapFiles(l: LocalEntry, capBytes: number): Promise<void> {
    const name = l.entry.name;
    const v = l.volume;
    this.groups.set(name, { state: 'mapping' });
    const started = Date.now();
    try {
      const map = await buildFileMap(async (off, len) => {
        const b = Buffer.alloc(len);
        await v.device.read(off, b);
        return b;
      }, v.size);
      if (this.localVolumes.get(name) !== l) return; // removed meanwhile
      this.groups.set(name, { state: 'ready', files: map.files.length, groups: new FileGroups(map, v.chunkSize, capBytes) });
      this.log('info', 'file map ready for group push', { volume: name, files: map.files.length, ms: Date.now() - started });
    } catch (err) {
      if (this.localVolumes.get(name) !== l) return;
      this.groups.set(name, { state: 'unavailable', error: (err as Error).message });
      this.log('info', 'no file map for group push (no ext filesystem found)', { volume: name, err: (err as Error).message });
    }
  }

  // ------------------------------------------------------------------ profiles and prefetch

  private remote(volume: string): RemoteEntry {
    const r = this.remoteVolumes.get(volume);
    if (!r) throw new EdgeRequestError(404, `this edge serves no volume named "${volume}" from a peer`);
    return r;
  }

  private profileService(): VolumeProfiles {
    if (!this.profiles) throw new EdgeRequestError(409, 'this edge serves no volume from a peer, so it keeps no profiles');
    return this.profiles;
  }

  startRecording(volume: string, o: { name: string; forMs?: number; idleMs?: number }): RecordingStatus {
    this.remote(volume);
    return this.profileService().startRecording(volume, o);
  }

  stopRecording(volume: string): Promise<ProfileSummary> {
    this.remote(volume);
    return this.profileService().stopRecording(volume);
  }

  listProfiles(): Promise<ProfileSummary[]> {
    return this.profileService().list();
  }

  getProfile(name: string, withFiles: boolean): Promise<{ profile: Profile; files?: Array<{ t: number; path: string; offset: number; length: number }> }> {
    return this.profileService().get(name, withFiles);
  }

  deleteProfile(name: string): Promise<void> {
    return this.profileService().delete(name);
  }

  /** Start (or restart) a prefetch plan while the volume runs (warming the cache). */
  async prefetch(volume: string, cfg: { profiles: string[]; hotspots?: boolean; budget?: number }): Promise<PrefetchStatus> {
    this.remote(volume);
    return (await this.profileService().prefetch(volume, { profiles: cfg.profiles, hotspots: cfg.hotspots ?? false, budget: cfg.budget }, true))!;
  }

  /** Pause or resume hydration, or change its rate. */
  hydrate(volume: string, o: { action?: 'pause' | 'resume'; rate?: number | string }): HydrationStatus {
    const r = this.remote(volume);
    if (!r.entry.hydrate) throw new EdgeRequestError(409, `volume ${volume} is not in migration mode (no hydrate: section in its configuration)`);
    if (!r.hydrator) throw new EdgeRequestError(409, `volume ${volume} is not open yet${r.error ? `: ${r.error}` : ''}`);
    if (o.rate !== undefined) {
      try {
        r.hydrator.setRate(o.rate);
      } catch (err) {
        throw new EdgeRequestError(400, (err as Error).message);
      }
    }
    if (o.action === 'pause') r.hydrator.pause();
    else if (o.action === 'resume') {
      if (r.hydrator.status().state === 'stopped') r.hydrator.start();
      else r.hydrator.resume();
    }
    return r.hydrator.status();
  }

  /** streamed → overlay → write-back (journal + shipper) → stats, per the volume's policy. */
  private async buildStack(name: string, r: RemoteEntry): Promise<void> {
    const e = r.entry;
    const info = r.volume.info!;
    const streamed = new StreamedDevice(r.volume, this.cache!, { readAheadMax: e.readAhead });
    // The layers below the overlay get the read path on loan: if building the rest fails, the
    // open is retried with the same RemoteVolume, so closing them must not close it (stop() does).
    let base: BlockDevice = new Borrowed(streamed);
    if (e.hydrate) {
      const hydrated = await HydratedDevice.open({ path: e.hydrate.path, inner: base, source: this.hydrationSource(r), chunkSize: info.chunkSize, family: info.family, name, log: this.log.child('hydrate') });
      r.hydrated = hydrated;
      r.hydrator = new Hydrator(hydrated, { rate: e.hydrate.rate, inFlight: e.hydrate.inFlight, log: this.log.child('hydrate') });
      base = hydrated;
    }
    r.base = base;
    const tap = new ReadTap(base);
    r.tap = tap;
    if (e.writes === 'read-only') {
      r.device = new StatsDevice(tap, { exportName: name });
      return;
    }
    const overlayPath = this.overlayPathOf(name);
    await mkdir(path.dirname(overlayPath), { recursive: true, mode: 0o700 });
    // 4 KiB granules: a guest's aligned write never has to fetch the rest of a chunk first.
    // An overlay made by an earlier version keeps the granularity its bitmap records.
    let overlay: OverlayDevice;
    try {
      overlay = await OverlayDevice.open(tap, { path: overlayPath, granularity: existsSync(overlayPath) ? undefined : 4096 });
    } catch (err) {
      await tap.close().catch(() => undefined);
      throw err;
    }
    let journal: Journal | null = null;
    try {
      const ranges: PolicyRange[] = [];
      if (e.swap === 'remote-only' && e.writes !== 'remote-only') {
        try {
          const table = await readPartitionTable(async (off, len) => {
            const b = Buffer.alloc(len);
            await streamed.read(off, b);
            return b;
          }, streamed.size);
          for (const s of swapRanges(table)) ranges.push({ ...s, policy: 'remote-only', source: 'swap partition' });
        } catch (err) {
          this.log('warn', 'cannot read the partition table; no swap partition is treated as remote-only', { volume: name, err: (err as Error).message });
        }
      }
      for (const x of e.ranges) ranges.push({ offset: x.offset, length: x.length, policy: x.writes, source: 'config' });
      const policy = new PolicyMap(streamed.size, e.writes, ranges);
      r.policy = policy;
      let shipper: Shipper | null = null;
      if (policy.shipsAnything) {
        journal = await Journal.open({ dir: this.journalDirOf(name), dataKey: r.volume.dataKey!, onCorruption: e.onJournalCorruption });
        shipper = new Shipper({
          volume: name,
          journal,
          transport: peerShipTransport(this.peerClient(e.peer), r.volume),
          chunkSize: r.volume.info!.chunkSize,
          guard: r.volume,
          rpoMs: e.rpo,
          shipAtBytes: e.shipAt,
          log: this.log.child('shipper'),
        });
      }
      const wb = await WriteBackDevice.open({ overlay, policy, journal, shipper, epochMax: e.epochMax, volume: name });
      shipper?.start();
      r.overlay = overlay;
      r.writeback = wb;
      r.shipper = shipper ?? undefined;
      r.journal = journal ?? undefined;
      r.device = new StatsDevice(wb, { exportName: name });
      if (ranges.length > 0) this.log('info', 'write policy ranges', { volume: name, default: e.writes, ranges });
    } catch (err) {
      // The open is retried: leave nothing held (the journal refuses a second open).
      await journal?.close().catch(() => undefined);
      await overlay.close().catch(() => undefined);
      throw err;
    }
  }

  // ------------------------------------------------------------------ volumes while running

  private overlayPathOf(name: string): string {
    return path.join(this.config.state, 'overlays', `${name}.overlay`);
  }

  private journalDirOf(name: string): string {
    return path.join(this.config.state, 'journal', name);
  }

  /** Run `fn` after every earlier add/remove/detach of `name` has settled. */
  private withVolumeLock<T>(name: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.volumeLocks.get(name) ?? Promise.resolve();
    const next = prev.catch(() => undefined).then(fn);
    const tail = next.catch(() => undefined);
    this.volumeLocks.set(name, tail);
    void tail.then(() => {
      if (this.volumeLocks.get(name) === tail) this.volumeLocks.delete(name);
    });
    return next;
  }

  /**
   * POST /v1/volumes: add one volume entry of the configuration schema while running. The same
   * name with the same spec is accepted again (created: false); another spec under a name in
   * use is refused (409). The entry is kept in STATE/volumes.d and opened again at restart.
   */
  async addVolume(raw: unknown): Promise<AddVolumeResult> {
    const parsed = parseVolumeSpec(raw, this.config);
    const name = parsed.entry.name;
    return this.withVolumeLock(name, async () => {
      const spec = canonical(parsed.entry);
      const local = this.localVolumes.get(name);
      const remote = this.remoteVolumes.get(name);
      const same = parsed.role === 'local' ? local : remote;
      if (same && !(same as { closing?: boolean }).closing) {
        if (canonical(same.entry) === spec) {
          return parsed.role === 'local' ? { created: false, role: 'local', status: this.localStatus(local!) } : { created: false, role: 'remote', status: this.remoteStatus(remote!) };
        }
        const differ = Object.keys({ ...same.entry, ...parsed.entry }).filter((k) => canonical((same.entry as Record<string, unknown>)[k]) !== canonical((parsed.entry as Record<string, unknown>)[k]));
        throw new EdgeRequestError(409, `volume "${name}" is already ${parsed.role === 'local' ? 'owned by' : 'served from a peer at'} this edge with another spec (differs in: ${differ.join(', ')})${same.origin === 'config' ? ' from the configuration file' : ''}; remove it first (DELETE /v1/volumes/${name}) or use another name`);
      }
      const other = parsed.role === 'local' ? remote : local;
      if (other) throw new EdgeRequestError(409, `"${name}" is already the name of a ${parsed.role === 'local' ? 'volume served from a peer' : 'volume this edge owns'} here; a volume added while running needs a name unused in both roles`);
      if (parsed.role === 'remote') {
        if (!this.nbd) throw new EdgeRequestError(409, 'this edge has no storage target (its configuration has no cache: section), so it cannot serve volumes from peers');
        const busy = parsed.entry.hydrate ? [...this.remoteVolumes.values()].find((r) => r.entry.hydrate?.path === parsed.entry.hydrate!.path) : undefined;
        if (busy) throw new EdgeRequestError(409, `hydrate.path ${parsed.entry.hydrate!.path} is already the hydrated file of volume "${busy.entry.name}"`);
      }
      const record: VolumeRecord = { format: 'spillway-volume', version: 1, role: parsed.role, spec: raw as Record<string, unknown>, addedAt: new Date().toISOString() };
      if (parsed.role === 'local') {
        let l: LocalEntry;
        try {
          l = await this.openLocal(parsed.entry, 'runtime');
        } catch (err) {
          const code = (err as { code?: string }).code;
          throw new EdgeRequestError(code === 'SPW_ERR_VOLUME_CONFIG' ? 400 : 422, (err as Error).message);
        }
        try {
          await this.store.save(name, record);
        } catch (err) {
          await this.closeLocal(l).catch(() => undefined);
          throw err;
        }
        this.unavailable.delete(name);
        this.detached.delete(name);
        this.log('info', 'volume added', { volume: name, role: 'local', source: parsed.entry.source, liveWriter: parsed.entry.liveWriter });
        return { created: true, role: 'local', status: this.localStatus(l) };
      }
      const r = this.openRemote(parsed.entry, 'runtime');
      try {
        await this.store.save(name, record);
      } catch (err) {
        await this.closeRemoteStack(r).catch(() => undefined);
        this.remoteVolumes.delete(name);
        throw err;
      }
      this.unavailable.delete(name);
      this.detached.delete(name);
      this.log('info', 'volume added', { volume: name, role: 'remote', peer: parsed.entry.peer, writes: parsed.entry.writes, hydrate: parsed.entry.hydrate?.path });
      return { created: true, role: 'remote', status: this.remoteStatus(r) };
    });
  }

  /**
   * DELETE /v1/volumes/NAME: take a volume added while running out of the edge and forget it.
   * See RemoveVolumeOptions and docs/edge.md for what is refused and what happens to files.
   */
  async removeVolume(name: string, o: RemoveVolumeOptions = {}): Promise<RemoveVolumeResult> {
    if (!isValidName(name)) throw new EdgeRequestError(400, `"${name}" is not a volume name (letters, digits, ".", "_" and "-", at most 63)`);
    return this.withVolumeLock(name, async () => {
      const local = o.role === 'remote' ? undefined : this.localVolumes.get(name);
      const remote = o.role === 'local' ? undefined : this.remoteVolumes.get(name);
      if (local && remote) throw new EdgeRequestError(409, `this edge has a local and a remote volume named "${name}"; say which with ?role=local or ?role=remote`);
      const target = local ?? remote;
      if (!target) {
        const u = this.unavailable.get(name);
        if (u && (!o.role || o.role === u.role)) {
          await this.store.remove(name);
          this.unavailable.delete(name);
          this.log('info', 'volume removed (it had not opened)', { volume: name, role: u.role });
          return { volume: name, role: u.role, files: { action: 'none', paths: [], reason: `the volume had not opened (${u.error}); its overlay and journal, if any, are left in place` } };
        }
        if (this.detached.has(name)) {
          await this.store.remove(name);
          this.detached.delete(name);
          throw new EdgeRequestError(404, `this edge has no volume named "${name}" (it was detached; its detach record is now removed)`);
        }
        throw new EdgeRequestError(404, `this edge has no ${o.role ? `${o.role} ` : ''}volume named "${name}"`);
      }
      if (target.origin === 'config') throw new EdgeRequestError(409, `volume "${name}" comes from the configuration file; remove it there and restart the edge`);
      if (target === local) return this.removeLocal(local);
      return this.removeRemote(remote!, o);
    });
  }

  private async removeLocal(l: LocalEntry): Promise<RemoveVolumeResult> {
    const name = l.entry.name;
    const openedBy = this.chunkServer?.openedBy(name) ?? [];
    await this.closeLocal(l);
    await this.store.remove(name);
    this.log('info', 'volume removed', { volume: name, role: 'local', openedBy });
    if (openedBy.length > 0) this.log('warn', 'a removed volume was open at peers: their reads of it now fail', { volume: name, peers: openedBy });
    return { volume: name, role: 'local', openedBy };
  }

  /**
   * Take the export away, refusing while NBD clients use it unless `force` (then cut them off).
   * From here on the volume is not exported again unless resumeServing() is called.
   */
  private async takeExport(r: RemoteEntry, force: boolean, forceHint = true): Promise<{ disconnected: number }> {
    const name = r.entry.name;
    const nbd = this.nbd!;
    const refuse = (n: number) => new EdgeRequestError(409, `volume "${name}" has ${n} NBD client${n === 1 ? '' : 's'} connected; disconnect ${n === 1 ? 'it' : 'them'} first${forceHint ? ' (or ?force=1 to cut them off)' : ''}`);
    const before = nbd.connectionsTo(name);
    if (before > 0 && !force) throw refuse(before);
    r.closing = true; // exportWhenOpen exports nothing from now on
    nbd.removeExport(name);
    // A client that finished negotiating meanwhile holds the export: the same rule.
    const now = nbd.connectionsTo(name);
    if (now > 0 && !force) {
      this.resumeServing(name, r);
      throw refuse(now);
    }
    const disconnected = now > 0 ? await nbd.disconnectExport(name) : 0;
    if (disconnected > 0) this.log('warn', 'NBD clients cut off (force)', { volume: name, clients: disconnected });
    return { disconnected };
  }

  private async removeRemote(r: RemoteEntry, o: RemoveVolumeOptions): Promise<RemoveVolumeResult> {
    const name = r.entry.name;
    if (o.drain && !r.device) throw new EdgeRequestError(409, `volume "${name}" is not open${r.error ? ` (${r.error})` : ' yet'}, so it cannot be drained; remove it without drain=1 to keep its overlay and journal`);
    const { disconnected } = await this.takeExport(r, !!o.force);
    let drained = false;
    if (o.drain && r.writeback) {
      try {
        await this.drain(name, o.signal);
        drained = true;
      } catch (err) {
        this.resumeServing(name, r);
        throw err;
      }
    } else if (o.drain) drained = true; // read-only: nothing to ship
    const opened = !!r.device;
    await this.closeRemoteStack(r);
    const writes = this.writeStatus(r);
    this.remoteVolumes.delete(name);
    await this.forgetCached(r);

    // The overlay and journal go only when nothing in them is missing at the origin (or the
    // caller says the instance's writes are not wanted).
    const j = r.journal;
    const unshipped = j ? j.unackedBytes : 0;
    const unacked = j ? j.lastSealed - j.ackedSeq : 0;
    let remoteOnly = 0;
    if (r.overlay && r.policy) {
      for (const x of r.overlay.ownedRanges()) for (const p of r.policy.split(x.offset, x.length)) if (p.policy === 'remote-only') remoteOnly += p.length;
    }
    const paths = [this.overlayPathOf(name), bitmapPathOf(this.overlayPathOf(name)), this.journalDirOf(name)].filter((p) => existsSync(p));
    let files: RemoveVolumeResult['files'];
    if (paths.length === 0) files = { action: 'none', paths: [], reason: r.entry.writes === 'read-only' ? 'a read-only volume has no overlay or journal' : 'the volume has no overlay or journal' };
    else if (o.discard) files = { action: 'deleted', paths, reason: `discard=1${unacked > 0 ? `: ${unacked} epoch(s), ${unshipped} bytes, never reached the origin` : ''}${remoteOnly > 0 ? `; ${remoteOnly} bytes of remote-only writes dropped` : ''}` };
    else if (!opened) files = { action: 'kept', paths, reason: 'the volume had not opened, so what its overlay and journal hold is unknown; DELETE with discard=1 to delete them' };
    else if (unacked > 0) files = { action: 'kept', paths, reason: `${unacked} sealed epoch(s) (${unshipped} bytes) are not at the origin; add the volume again to ship them, or DELETE with drain=1 (or discard=1 to drop them)` };
    else if (remoteOnly > 0) files = { action: 'kept', paths, reason: `the overlay holds ${remoteOnly} bytes of remote-only writes that exist only here; DELETE with discard=1 to delete them` };
    else files = { action: 'deleted', paths, reason: 'every write is at the origin' };

    if (files.action === 'deleted') {
      // Marked first: a crash while deleting finishes the removal at restart instead of
      // opening the volume over half-deleted files.
      const record = await this.recordOf(name, 'remote', r.entry);
      await this.store.save(name, { ...record, removing: { deleteFiles: true } });
      await this.deleteRemoteFiles(name);
    }
    await this.keyStore?.delete(name);
    await this.store.remove(name);
    this.log('info', 'volume removed', { volume: name, role: 'remote', drained, files: files.action, reason: files.reason });
    return { volume: name, role: 'remote', drained, clientsDisconnected: disconnected, writes, files, hydratedPath: r.entry.hydrate?.path };
  }

  /** The volume's record as stored, or one made from its entry. */
  private async recordOf(name: string, role: VolumeRole, entry: LocalVolumeEntry | RemoteVolumeEntry): Promise<VolumeRecord> {
    const kept = (await this.store.list()).find((x) => x.name === name)?.record;
    return kept ?? { format: 'spillway-volume', version: 1, role, spec: JSON.parse(JSON.stringify(entry)) as Record<string, unknown>, addedAt: new Date().toISOString() };
  }

  /** Delete a remote volume's overlay, journal and kept key (and, after a detach, the
   *  hydration state files next to the volume file, which is kept). Idempotent. */
  private async deleteRemoteFiles(name: string, hydratedPath?: string): Promise<void> {
    const overlay = this.overlayPathOf(name);
    for (const f of [overlay, bitmapPathOf(overlay), `${bitmapPathOf(overlay)}.tmp`]) await rm(f, { force: true });
    if (existsSync(path.dirname(overlay))) await fsyncDir(path.dirname(overlay));
    await rm(this.journalDirOf(name), { recursive: true, force: true });
    await this.keyStore?.delete(name);
    if (hydratedPath) {
      for (const f of [bitmapPathOf(hydratedPath), `${bitmapPathOf(hydratedPath)}.tmp`, statePathOf(hydratedPath), `${statePathOf(hydratedPath)}.tmp`]) await rm(f, { force: true });
      await fsyncDir(path.dirname(hydratedPath)).catch(() => undefined);
    }
  }

  /** At start: a removal cut short by a crash is finished, not opened. */
  private async finishRemoval(name: string, record: VolumeRecord): Promise<void> {
    try {
      if (record.removing?.deleteFiles && record.role === 'remote') await this.deleteRemoteFiles(name);
      await this.store.remove(name);
      this.log('info', 'finished removing a volume (the edge stopped while removing it)', { volume: name });
    } catch (err) {
      this.log('error', 'cannot finish removing a volume', { volume: name, err: (err as Error).message });
    }
  }

  /**
   * POST /v1/volumes/NAME/detach: a remote volume in migration mode whose hydration is complete
   * leaves the data path. Its overlay (what the guest wrote) is flattened into the hydrated
   * file, which is then a raw disk image equal to what the guest saw, and the volume is
   * removed. Safe to repeat: after a crash mid-flatten the volume comes back at restart with its
   * overlay intact, and a second detach flattens again; after a completed detach it answers
   * the same result.
   */
  async detachVolume(name: string, o: { drain?: boolean; signal?: AbortSignal } = {}): Promise<DetachResult> {
    if (!isValidName(name)) throw new EdgeRequestError(400, `"${name}" is not a volume name (letters, digits, ".", "_" and "-", at most 63)`);
    return this.withVolumeLock(name, async () => {
      const r = this.remoteVolumes.get(name);
      if (!r) {
        const done = this.detached.get(name);
        if (done) return done;
        throw new EdgeRequestError(404, `this edge serves no volume named "${name}" from a peer`);
      }
      if (r.origin === 'config') throw new EdgeRequestError(409, `volume "${name}" comes from the configuration file; detach works on volumes added while running`);
      const h = r.entry.hydrate;
      if (!h) throw new EdgeRequestError(409, `volume "${name}" is not in migration mode (its spec has no hydrate: section), so there is no volume file to detach`);
      if (!r.hydrated || !r.device) throw new EdgeRequestError(409, `volume "${name}" is not open${r.error ? ` (${r.error})` : ' yet'}`);
      if (!r.hydrated.complete) {
        const p = r.hydrated.progress();
        throw new EdgeRequestError(409, `hydration of "${name}" is not complete (${p.durableChunks}/${r.hydrated.chunkCount} chunks durable); detach needs every chunk in ${h.path}`);
      }
      await this.takeExport(r, false, false);
      if (o.drain && r.writeback) {
        try {
          await this.drain(name, o.signal);
        } catch (err) {
          this.resumeServing(name, r);
          throw err;
        }
      }
      const closeError = await this.closeRemoteStack(r);
      this.remoteVolumes.delete(name);
      // Every sealed epoch must be in the overlay before it is flattened: a stack that did not
      // close cleanly (or a journal with epochs not applied to the overlay) may hold guest
      // writes only in the journal, which the detach would delete. Reopen: recovery replays them.
      const j = r.journal;
      if (closeError || (j && j.checkpointSeq < j.lastSealed)) {
        this.openRemote(r.entry, r.origin);
        throw new EdgeRequestError(500, `detach of "${name}" refused: ${closeError ? `closing its stack failed (${closeError.message})` : `epochs ${j!.checkpointSeq + 1}..${j!.lastSealed} are in the journal but not in the overlay`}; the volume is served again (its journal replays at open); try again`);
      }
      await this.forgetCached(r);
      let flat: { flattenedBytes: number; size: number };
      try {
        flat = await flattenOverlay({ overlayPath: this.overlayPathOf(name), target: h.path, log: this.log.child('detach'), volume: name });
      } catch (err) {
        // Nothing is lost (the overlay is intact): serve the volume again and report.
        this.log('error', 'flatten failed; the volume is served again', { volume: name, err: (err as Error).message });
        this.openRemote(r.entry, r.origin);
        throw new EdgeRequestError(500, `detach of "${name}" failed while flattening into ${h.path}: ${(err as Error).message}; the volume is served again, its overlay intact`);
      }
      const result: DetachResult = { volume: name, path: h.path, size: flat.size, flattenedBytes: flat.flattenedBytes, at: new Date().toISOString() };
      // The flatten is durable: record it, then delete what the file no longer needs.
      const record = await this.recordOf(name, 'remote', r.entry);
      await this.store.save(name, { ...record, detached: result });
      await this.deleteRemoteFiles(name, h.path);
      this.detached.set(name, result);
      this.log('info', 'volume detached: its file is a raw image of what the guest saw', { ...result });
      return result;
    });
  }

  /** Seal what the guest wrote, ship every epoch and wait for the origin (reverse, detach, CLI). */
  async drain(volume: string, signal?: AbortSignal): Promise<VolumeWriteStatus> {
    const r = this.remoteVolumes.get(volume);
    if (!r) throw new EdgeRequestError(404, `this edge serves no volume named "${volume}" from a peer`);
    if (!r.writeback) throw new EdgeRequestError(409, r.error ? `volume ${volume} is not open: ${r.error}` : `volume ${volume} is not open yet`);
    await r.writeback.seal();
    if (r.shipper) await r.shipper.drain(signal);
    return this.writeStatus(r)!;
  }

  private writeStatus(r: RemoteEntry): VolumeWriteStatus | undefined {
    if (!r.writeback || !r.policy) return undefined;
    const s = r.shipper?.status();
    return {
      policy: r.entry.writes,
      ranges: r.policy.ranges.map((x) => ({ offset: x.offset, length: x.length, policy: x.policy, source: x.source })),
      unsealedBytes: r.writeback.stats().unsealedBytes,
      lastSealed: s?.lastSealed ?? 0,
      ackedSeq: s?.ackedSeq ?? 0,
      unshippedBytes: s?.unshippedBytes ?? 0,
      rpoLagSeconds: s?.rpoLagSeconds ?? 0,
      coalescingRatio: s?.coalescingRatio ?? 1,
      batches: s?.batches ?? 0,
      lastError: s?.lastError ?? '',
    };
  }

  private peerClient(name: string): PeerClient {
    const p = this.peers.get(name);
    if (p) return p;
    const cfg = this.config.peers.find((x) => x.name === name)!;
    const client: PeerClient = new PeerClient({
      name,
      host: cfg.address.host,
      port: cfg.address.port,
      tls: this.material!,
      site: this.config.site,
      edgeId: this.name,
      connections: cfg.connections,
      window: this.config.link.window,
      log: this.log.child('link'),
      onMessage: (msg) => this.onPeerMessage(client, msg),
    });
    this.peers.set(name, client);
    client.start();
    return client;
  }

  private onPeerMessage(peer: PeerClient, msg: LinkMessage): void | Promise<void> {
    for (const r of this.remoteVolumes.values()) {
      if (r.entry.peer !== peer.opts.name) continue;
      if (msg.type === 'epoch-state' || msg.type === 'epoch-ack') {
        if (r.volume.info?.handle === msg.handle) r.shipper?.onMessage(msg);
        continue;
      }
      if (msg.type === 'opened' || msg.type === 'error') {
        if (r.volume.onOpenReply(msg)) return;
        continue;
      }
      if ('handle' in msg && r.volume.info?.handle === msg.handle) return r.volume.onMessage(msg);
    }
    if (msg.type === 'error') this.log('warn', 'peer reported an error', { peer: peer.opts.name, code: msg.code, message: msg.message });
  }

  private async listenLink(addr: { host: string; port: number }): Promise<void> {
    const srv = createLinkServer(
      this.material!,
      (sock, names) => {
        const conn = new LinkConnection(sock, {
          site: this.config.site,
          edgeId: this.name,
          window: this.config.link.window,
          onMessage: (msg, c) => {
            if (msg.type.startsWith('epoch-') && 'handle' in msg) {
              const applier = this.appliers.get(msg.handle);
              if (applier) return applier.handle(msg, c);
              c.send({ type: 'error', reqId: 0, code: LINK_ERR.UNKNOWN_VOLUME, message: `unknown volume handle ${msg.handle}` });
              return;
            }
            return this.chunkServer!.handle(msg, c, c.peer!.edgeId);
          },
        });
        this.linkConns.add(conn);
        conn.once('ready', (peer: { edgeId: string }) => {
          if (!names.includes(peer.edgeId)) {
            this.log('warn', 'link peer claims a name its certificate does not carry; closing', { claimed: peer.edgeId, certificate: names });
            conn.close();
            return;
          }
          this.chunkServer!.attach(conn, peer.edgeId);
          this.log('info', 'link peer connected', { peer: peer.edgeId });
        });
        conn.once('close', () => {
          this.linkConns.delete(conn);
          for (const a of this.appliers.values()) a.connectionClosed(conn);
        });
        void conn.run();
      },
      (err, remote) => this.log('warn', 'link peer refused', { remote, err: err.message }),
    );
    this.linkServer = srv;
    await new Promise<void>((resolve, reject) => {
      srv.once('error', reject);
      srv.listen(addr.port, addr.host, () => {
        srv.off('error', reject);
        resolve();
      });
    });
    this.log('info', 'link listening', { address: `${addr.host}:${addr.port}`, volumes: [...this.localVolumes.keys()] });
  }

  /** Grow or shrink the cache while running (evicts at once when shrinking). */
  async resizeCache(maxBytes: number): Promise<CacheStatus> {
    if (!this.cache) throw new EdgeRequestError(409, 'this edge has no cache (its configuration has no cache: section)');
    if (!Number.isSafeInteger(maxBytes) || maxBytes <= 0) throw new EdgeRequestError(400, `a cache size must be a positive number of bytes, got ${maxBytes}`);
    await this.cache.resize(maxBytes);
    this.log('info', 'cache resized', { maxBytes });
    return this.cacheStatus()!;
  }

  private cacheStatus(): CacheStatus | undefined {
    if (!this.cache) return undefined;
    const st = this.cache.stats();
    return { dir: this.config.cache!.dir, maxBytes: st.maxBytes, liveBytes: st.liveBytes, slabBytes: st.slabBytes, blobs: st.blobs };
  }

  status(): EdgeStatus {
    return {
      site: this.config.site,
      name: this.name,
      metrics: this.metrics?.url,
      cache: this.cacheStatus(),
      local: [...this.localVolumes.values()].map((l) => this.localStatus(l)),
      remote: [...this.remoteVolumes.values()].map((r) => this.remoteStatus(r)),
      unavailable: [...this.unavailable.entries()].map(([volume, u]) => ({ volume, role: u.role, error: u.error })),
      detached: [...this.detached.values()],
      peers: [...this.peers.values()].map((p) => ({ name: p.opts.name, connected: p.connected, connections: p.connectionCount, reconnects: p.reconnects, lastError: p.lastErrorMessage, background: this.gates.get(p.opts.name)?.status() })),
    };
  }

  private localStatus(l: LocalEntry): LocalVolumeStatus {
    const v = l.volume;
    const g = this.groups.get(v.name);
    return {
      volume: v.name,
      origin: l.origin,
      size: v.size,
      chunks: v.chunkCount,
      zeroChunks: v.zeroChunks,
      liveWriter: v.liveWriter,
      openedBy: this.chunkServer?.openedBy(v.name) ?? [],
      groupPush: { state: g?.state ?? 'off', files: g?.files, error: g?.error },
    };
  }

  private remoteStatus(r: RemoteEntry): RemoteVolumeStatus {
    const name = r.entry.name;
    return {
      volume: name,
      origin: r.origin,
      peer: r.entry.peer,
      ready: !!r.device && !r.closing,
      size: r.device?.size,
      error: r.error,
      clients: this.nbd?.connectionsTo(name) ?? 0,
      writes: this.writeStatus(r),
      recording: this.profiles?.recordingStatus(name),
      prefetch: this.profiles?.prefetchStatus(name),
      hydration: r.hydrator?.status(),
    };
  }

  async stop(): Promise<void> {
    await this.control?.close();
    this.control = null;
    const nbd = this.nbd;
    this.nbd = null;
    await nbd?.close();
    for (const r of this.remoteVolumes.values()) {
      r.closing = true;
      r.abort.abort(new Error('the edge is stopping'));
    }
    await this.profiles?.close();
    for (const r of this.remoteVolumes.values()) await this.closeRemoteStack(r);
    for (const p of this.peers.values()) await p.stop();
    for (const c of this.linkConns) c.close();
    await new Promise<void>((r) => (this.linkServer ? this.linkServer.close(() => r()) : r()));
    for (const a of this.appliers.values()) await a.close().catch(() => undefined);
    for (const l of this.localVolumes.values()) await l.volume.close().catch(() => undefined);
    await this.cache?.close();
    await this.metrics?.close();
  }
}
