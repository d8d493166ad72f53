// The edge proxy daemon (`spillway edge --config FILE`): plays the local role for the volumes
// it owns (link listener → chunk server) and the remote role for volumes it serves from a
// peer (peer client → remote volume → streamed device → overlay → stats → NBD export).

import { mkdir } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import type tls from 'node:tls';

import type { BlockDevice } from '../block/device.js';
import { OverlayDevice } from '../block/overlay.js';
import { StatsDevice } from '../block/stats.js';
import { SecureCache } from '../cache/cache.js';
import { LinkConnection } from '../link/connection.js';
import type { LinkMessage } from '../link/codec.js';
import { createLinkServer, loadTls, type LinkTlsMaterial } from '../link/tls.js';
import type { Logger } from '../log/logger.js';
import { startMetricsServer, type MetricsServer } from '../metrics/http.js';
import { NbdServer } from '../nbd/server.js';
import { isRemoteVolume, parseAddress, type EdgeConfig, type RemoteVolumeEntry } from './config.js';
import { ChunkServer } from './local/chunk-server.js';
import { LocalVolume } from './local/volume.js';
import { PeerClient } from './remote/peer-client.js';
import { RemoteVolume } from './remote/remote-volume.js';
import { StreamedDevice } from './remote/streamed-device.js';

export interface EdgeStatus {
  site: string;
  name: string;
  local: Array<{ volume: string; size: number; chunks: number; zeroChunks: number }>;
  remote: Array<{ volume: string; peer: string; ready: boolean; size?: number; error?: string }>;
  peers: Array<{ name: string; connected: boolean; connections: number; reconnects: number; lastError: string }>;
}

export class Edge {
  readonly name: string;
  private readonly localVolumes = new Map<string, LocalVolume>();
  private readonly remoteVolumes = new Map<string, { entry: RemoteVolumeEntry; volume: RemoteVolume; device?: BlockDevice; error?: string }>();
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
  }

  /** Resolves when every remote volume is exported (or failed), or after `timeoutMs`. */
  async ready(timeoutMs = 60000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while ([...this.remoteVolumes.values()].some((r) => !r.device && !r.error)) {
      if (Date.now() > deadline) throw new Error('remote volumes did not open in time');
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  private async exportWhenOpen(name: string, r: { entry: RemoteVolumeEntry; volume: RemoteVolume; device?: BlockDevice; error?: string }): Promise<void> {
    for (;;) {
      try {
        await r.volume.open();
        break;
      } catch (err) {
        r.error = (err as Error).message;
        this.log('warn', 'remote volume not open yet; retrying', { volume: name, err: r.error });
        await new Promise((res) => setTimeout(res, 2000));
        if (!this.nbd) return;
      }
    }
    r.error = undefined;
    let dev: BlockDevice = new StreamedDevice(r.volume, this.cache!, { readAheadMax: r.entry.readAhead });
    if (r.entry.overlay) {
      const dir = path.join(this.config.state, 'overlays');
      await mkdir(dir, { recursive: true, mode: 0o700 });
      dev = await OverlayDevice.open(dev, { path: path.join(dir, `${name}.overlay`) });
    }
    dev = new StatsDevice(dev, { exportName: name });
    r.device = dev;
    this.nbd?.addExport({ name, device: dev, description: `${r.entry.volume ?? name} from ${r.entry.peer}` });
    this.log('info', 'volume exported', { volume: name, size: dev.size, stack: dev.description });
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
          onMessage: (msg, c) => this.chunkServer!.handle(msg, c, c.peer!.edgeId),
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
        conn.once('close', () => this.linkConns.delete(conn));
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
      remote: [...this.remoteVolumes.entries()].map(([name, r]) => ({ volume: name, peer: r.entry.peer, ready: !!r.device, size: r.device?.size, error: r.error })),
      peers: [...this.peers.values()].map((p) => ({ name: p.opts.name, connected: p.connected, connections: p.connectionCount, reconnects: p.reconnects, lastError: p.lastErrorMessage })),
    };
  }

  async stop(): Promise<void> {
    const nbd = this.nbd;
    this.nbd = null;
    await nbd?.close();
    for (const r of this.remoteVolumes.values()) await r.device?.close().catch(() => undefined);
    for (const p of this.peers.values()) await p.stop();
    for (const c of this.linkConns) c.close();
    await new Promise<void>((r) => (this.linkServer ? this.linkServer.close(() => r()) : r()));
    for (const v of this.localVolumes.values()) await v.close().catch(() => undefined);
    await this.cache?.close();
    await this.metrics?.close();
  }
}
