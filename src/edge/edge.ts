// The edge proxy daemon (`spillway edge --config FILE`): plays the local role for the volumes
// it owns (link listener → chunk server, and an applier per volume for write-back) and the
// remote role for volumes it serves from a peer (peer client → remote volume → streamed device
// → overlay → write-back (journal, shipper) → stats → NBD export). A control socket in the
// state directory answers `spillway volume status|drain`.

import { mkdir } from 'node:fs/promises';
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
import { WriteBackDevice } from '../writeback/device.js';
import { Journal } from '../writeback/journal.js';
import { PolicyMap, type PolicyRange } from '../writeback/policy.js';
import { Shipper } from '../writeback/shipper.js';
import { isRemoteVolume, parseAddress, type EdgeConfig, type RemoteVolumeEntry } from './config.js';
import { startControlServer, type ControlServer } from './control.js';
import { Applier } from './local/applier.js';
import { ChunkServer } from './local/chunk-server.js';
import { peerShipTransport } from './remote/ship-transport.js';
import { LocalVolume } from './local/volume.js';
import { PeerClient } from './remote/peer-client.js';
import { RemoteVolume } from './remote/remote-volume.js';
import { StreamedDevice } from './remote/streamed-device.js';

export interface EdgeStatus {
  site: string;
  name: string;
  local: Array<{ volume: string; size: number; chunks: number; zeroChunks: number }>;
  remote: Array<{ volume: string; peer: string; ready: boolean; size?: number; error?: string; writes?: VolumeWriteStatus }>;
  peers: Array<{ name: string; connected: boolean; connections: number; reconnects: number; lastError: string }>;
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

/** A control request that cannot be served, with the HTTP status to answer. */
export class EdgeRequestError extends Error {
  readonly code = 'SPW_ERR_EDGE_REQUEST';
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = 'EdgeRequestError';
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

interface RemoteEntry {
  entry: RemoteVolumeEntry;
  volume: RemoteVolume;
  device?: BlockDevice;
  error?: string;
  writeback?: WriteBackDevice;
  shipper?: Shipper;
  journal?: Journal;
  policy?: PolicyMap;
}

export class Edge {
  readonly name: string;
  private readonly localVolumes = new Map<string, LocalVolume>();
  private readonly remoteVolumes = new Map<string, RemoteEntry>();
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

  private constructor(
    readonly config: EdgeConfig,
    private readonly log: Logger,
  ) {
    this.name = config.name ?? config.site;
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

    // Local role: the volumes this edge owns, served to peers over the link.
    for (const v of c.volumes) {
      if (isRemoteVolume(v)) continue;
      this.localVolumes.set(v.name, await LocalVolume.open({ name: v.name, source: v.source, format: v.format, chunkSize: v.chunkSize, family: v.family }, { stateDir: c.state, log: this.log.child('local') }));
    }
    this.chunkServer = new ChunkServer({ volumes: this.localVolumes, rateBytes: (c.link.rateMbit * 1e6) / 8, log: this.log.child('local') });
    // Write-back: each owned volume applies the epochs a remote edge ships (recovering first).
    for (const [name, v] of this.localVolumes) {
      const handle = this.chunkServer.handleOf(name)!;
      this.appliers.set(handle, await Applier.open({ volume: name, dir: path.join(c.state, 'applier', name), device: v.writable, log: this.log.child('applier') }));
    }
    if (c.link.listen) await this.listenLink(c.link.listen);

    // Remote role: volumes served from peers, through the cache.
    const remote = c.volumes.filter(isRemoteVolume);
    if (remote.length > 0) {
      this.cache = await SecureCache.open({ dir: c.cache!.dir, maxBytes: c.cache!.size });
      this.nbd = new NbdServer({
        exports: [],
        tls: c.nbd.tls ? { cert: readFileSync(c.nbd.tls.cert), key: readFileSync(c.nbd.tls.key), ca: c.nbd.tls.ca ? readFileSync(c.nbd.tls.ca) : undefined } : undefined,
        log: this.log.child('nbd'),
      });
      for (const v of remote) {
        const peer = this.peerClient(v.peer);
        const volume = new RemoteVolume(v.volume ?? v.name, peer, this.cache, { ioTimeoutMs: v.ioTimeout, log: this.log.child('remote') });
        this.remoteVolumes.set(v.name, { entry: v, volume });
      }
      for (const p of this.peers.values()) p.start();
      if (c.nbd.socket) await this.nbd.listen({ path: c.nbd.socket });
      else await this.nbd.listen(parseAddress(c.nbd.listen, '127.0.0.1'));
      this.log('info', 'storage target listening', { nbd: c.nbd.socket ?? c.nbd.listen, volumes: remote.map((v) => v.name) });
      // Exports appear as their volumes open (the peer may come up later).
      for (const [name, r] of this.remoteVolumes) void this.exportWhenOpen(name, r);
    }
    this.control = await startControlServer(path.join(c.state, 'control.sock'), this, this.log.child('control'));
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
    for (;;) {
      try {
        await r.volume.open();
        await this.buildStack(name, r);
        break;
      } catch (err) {
        r.error = (err as Error).message;
        const code = (err as { code?: string }).code;
        if (code === 'SPW_ERR_JOURNAL_CORRUPT') {
          // Not transient: retrying would not help, and serving without the journal would lose writes.
          this.log('error', 'volume not exported: its write-back journal is corrupt', { volume: name, err: r.error });
          return;
        }
        this.log('warn', 'remote volume not open yet; retrying', { volume: name, err: r.error });
        await new Promise((res) => setTimeout(res, 2000));
        if (!this.nbd) return;
      }
    }
    r.error = undefined;
    const dev = r.device!;
    this.nbd?.addExport({ name, device: dev, description: `${r.entry.volume ?? name} from ${r.entry.peer}` });
    this.log('info', 'volume exported', { volume: name, size: dev.size, stack: dev.description });
  }

  /** streamed → overlay → write-back (journal + shipper) → stats, per the volume's policy. */
  private async buildStack(name: string, r: RemoteEntry): Promise<void> {
    const e = r.entry;
    const streamed = new StreamedDevice(r.volume, this.cache!, { readAheadMax: e.readAhead });
    if (e.writes === 'read-only') {
      r.device = new StatsDevice(streamed, { exportName: name });
      return;
    }
    const dir = path.join(this.config.state, 'overlays');
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const overlayPath = path.join(dir, `${name}.overlay`);
    // 4 KiB granules: a guest's aligned write never has to fetch the rest of a chunk first.
    // An overlay made by an earlier version keeps the granularity its bitmap records.
    // The overlay gets the read path on loan: if building the rest fails, the open is retried
    // with the same RemoteVolume, so closing the overlay must not close it (stop() does).
    const overlay = await OverlayDevice.open(new Borrowed(streamed), { path: overlayPath, granularity: existsSync(overlayPath) ? undefined : 4096 });
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
        journal = await Journal.open({ dir: path.join(this.config.state, 'journal', name), dataKey: r.volume.dataKey!, onCorruption: e.onJournalCorruption });
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
  async resizeCache(maxBytes: number): Promise<void> {
    if (!this.cache) throw new Error('this edge has no cache (no volume is served from a peer)');
    await this.cache.resize(maxBytes);
    this.log('info', 'cache resized', { maxBytes });
  }

  status(): EdgeStatus {
    return {
      site: this.config.site,
      name: this.name,
      local: [...this.localVolumes.values()].map((v) => ({ volume: v.name, size: v.size, chunks: v.chunkCount, zeroChunks: v.zeroChunks })),
      remote: [...this.remoteVolumes.entries()].map(([name, r]) => ({ volume: name, peer: r.entry.peer, ready: !!r.device, size: r.device?.size, error: r.error, writes: this.writeStatus(r) })),
      peers: [...this.peers.values()].map((p) => ({ name: p.opts.name, connected: p.connected, connections: p.connectionCount, reconnects: p.reconnects, lastError: p.lastErrorMessage })),
    };
  }

  async stop(): Promise<void> {
    await this.control?.close();
    this.control = null;
    const nbd = this.nbd;
    this.nbd = null;
    await nbd?.close();
    for (const r of this.remoteVolumes.values()) {
      await r.shipper?.stop();
      await r.device?.close().catch(() => undefined); // seals what the guest wrote
      await r.journal?.close().catch(() => undefined);
      r.volume.close();
    }
    for (const p of this.peers.values()) await p.stop();
    for (const c of this.linkConns) c.close();
    await new Promise<void>((r) => (this.linkServer ? this.linkServer.close(() => r()) : r()));
    for (const a of this.appliers.values()) await a.close().catch(() => undefined);
    for (const v of this.localVolumes.values()) await v.close().catch(() => undefined);
    await this.cache?.close();
    await this.metrics?.close();
  }
}
