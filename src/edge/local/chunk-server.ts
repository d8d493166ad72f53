// The local role's side of the link: answers OPEN with the volume's geometry and data key, and
// FETCH with chunks, highest priority first. Every connection from one peer edge shares one
// session (one queue), so several connections fill a long fat pipe. A chunk goes out as a
// zero marker (no payload), as a signature alone (when this peer already received that
// content in this session), or as data, compressed when that pays.

import { deriveKeys } from '../../cache/keys.js';
import { compressChunk, isAllZero } from '../../link/compress.js';
import { ChunkSigner } from '../../link/signature.js';
import type { LinkConnection } from '../../link/connection.js';
import type { LinkMessage } from '../../link/codec.js';
import { encodeMessage, creditCost } from '../../link/codec.js';
import { LINK_ERR, PRIORITY } from '../../link/protocol.js';
import { ChunkQueue, QueueFullError, TokenBucket, type ChunkJob } from '../../link/scheduler.js';
import type { Logger } from '../../log/logger.js';
import type { LocalVolume } from './volume.js';
import { localMetrics } from './metrics.js';

export interface ChunkServerOptions {
  /** volumes this edge owns at start, by name (more come with register()). */
  volumes?: Map<string, LocalVolume>;
  /** bytes/s for chunk data to all peers (0 = unlimited). */
  rateBytes?: number;
  /** chunks read and encoded ahead of the sockets. */
  prepareAhead?: number;
  /** per volume name: its chunk groups (files), for group push; absent = no group push. */
  groups?: (volume: string) => ChunkGroups | null;
  /** signatures remembered per peer for signature-only answers. */
  rememberSignatures?: number;
  log: Logger;
}

interface Prepared {
  job: ChunkJob;
  frame: Buffer;
  cost: number;
  kind: 'data' | 'sig' | 'zero';
  raw: number;
}

interface VolumeEntry {
  volume: LocalVolume;
  signer: ChunkSigner;
}

/** Chunks that belong together (a file's chunks): asked for one, the owner pushes the rest. */
export interface ChunkGroups {
  /** the other chunks of the groups `index` belongs to, most useful first, already capped. */
  groupOf(index: number): readonly number[];
}

/** All connections of one peer edge. */
class PeerSession {
  readonly conns = new Set<LinkConnection>();
  readonly queue = new ChunkQueue();
  /** chunks whose next answer must carry data (the peer said NEED_DATA). */
  readonly forceData = new Set<string>();
  /** content this peer received from us: signature hex → true, in insertion (LRU-ish) order. */
  readonly sent = new Map<string, true>();
  readonly ready: Prepared[][] = [[], [], [], []];
  preparing = 0;
  pumping = false;
  /** volume handles this peer opened in this session. */
  readonly opened = new Set<number>();
  /** per volume handle: chunks answered or pushed in this session (never group-pushed again). */
  readonly delivered = new Map<number, Uint8Array>();
  /** lower-class frames sent so far, and the count when each waiting demand job was queued. */
  backgroundSent = 0;
  readonly demandQueuedAt = new Map<string, number>();

  constructor(readonly peer: string) {}

  wasDelivered(handle: number, index: number): boolean {
    const b = this.delivered.get(handle);
    return !!b && (b[index >> 3]! & (1 << (index & 7))) !== 0;
  }

  markDelivered(handle: number, index: number, chunkCount: number): void {
    let b = this.delivered.get(handle);
    if (!b) this.delivered.set(handle, (b = new Uint8Array(Math.ceil(chunkCount / 8))));
    b[index >> 3] = b[index >> 3]! | (1 << (index & 7));
  }
}

export class ChunkServer {
  private readonly sessions = new Map<string, PeerSession>();
  private readonly byHandle = new Map<number, VolumeEntry>();
  private readonly handles = new Map<string, number>();
  /** handles are never reused in one process: a peer holding an old one gets UNKNOWN_VOLUME. */
  private nextHandle = 1;
  private readonly bucket: TokenBucket;
  private readonly prepareAhead: number;
  private readonly rememberSignatures: number;
  private readonly metrics = localMetrics();

  constructor(private readonly opts: ChunkServerOptions) {
    for (const [name, volume] of opts.volumes ?? []) this.register(name, volume);
    const rate = opts.rateBytes ?? 0;
    this.bucket = new TokenBucket(rate, Math.max(256 * 1024, rate / 20));
    this.prepareAhead = opts.prepareAhead ?? 8;
    this.rememberSignatures = opts.rememberSignatures ?? 1 << 20;
  }

  /** The handle peers use for a volume (stable while it stays registered). */
  handleOf(volume: string): number | undefined {
    return this.handles.get(volume);
  }

  /** Serve a volume to peers (at start, or added while running); returns its handle. */
  register(name: string, volume: LocalVolume): number {
    if (this.handles.has(name)) throw new Error(`volume ${name} is already registered`);
    const h = this.nextHandle++;
    this.byHandle.set(h, { volume, signer: new ChunkSigner(deriveKeys(volume.dataKey).signKey) });
    this.handles.set(name, h);
    return h;
  }

  /**
   * Stop serving a volume: its queued and prepared chunks are dropped, and later requests for
   * its handle are answered UNKNOWN_VOLUME. Chunks being read at this moment may still go out.
   */
  unregister(name: string): void {
    const h = this.handles.get(name);
    if (h === undefined) return;
    const entry = this.byHandle.get(h);
    this.handles.delete(name);
    this.byHandle.delete(h);
    for (const s of this.sessions.values()) {
      if (entry) for (const p of [0, 1, 2, 3] as const) s.queue.cancel(h, p, [{ start: 0, count: entry.volume.chunkCount }]);
      for (let p = 0; p < s.ready.length; p++) s.ready[p] = s.ready[p]!.filter((x) => x.job.handle !== h);
      s.delivered.delete(h);
      s.opened.delete(h);
      for (const k of [...s.forceData]) if (k.startsWith(`${h}:`)) s.forceData.delete(k);
      for (const k of [...s.demandQueuedAt.keys()]) if (k.startsWith(`${h}:`)) s.demandQueuedAt.delete(k);
    }
  }

  /** Peers connected now that opened the volume in their current session. */
  openedBy(name: string): string[] {
    const h = this.handles.get(name);
    if (h === undefined) return [];
    return [...this.sessions.values()].filter((s) => s.opened.has(h)).map((s) => s.peer);
  }

  setRate(bytesPerSecond: number): void {
    this.bucket.setRate(bytesPerSecond, Math.max(256 * 1024, bytesPerSecond / 20));
  }

  /** A link connection whose peer is a remote-role edge. */
  attach(conn: LinkConnection, peer: string): void {
    let s = this.sessions.get(peer);
    if (!s) {
      s = new PeerSession(peer);
      this.sessions.set(peer, s);
    }
    const session = s;
    session.conns.add(conn);
    conn.on('writable', () => this.pump(session));
    conn.once('close', () => {
      session.conns.delete(conn);
      // Requests queued for a peer with no connection left are dropped: on reconnect the
      // remote edge asks again for everything it still waits for.
      if (session.conns.size === 0) this.sessions.delete(peer);
    });
  }

  /** Link handler for frames from a remote-role peer. */
  handle(msg: LinkMessage, conn: LinkConnection, peer: string): void {
    const session = this.sessions.get(peer);
    if (!session) return;
    switch (msg.type) {
      case 'open': {
        const handle = this.handles.get(msg.volume);
        const entry = handle === undefined ? undefined : this.byHandle.get(handle);
        if (!entry || handle === undefined) {
          conn.send({ type: 'error', reqId: msg.reqId, code: LINK_ERR.UNKNOWN_VOLUME, message: `this edge owns no volume named "${msg.volume}"` });
          return;
        }
        const v = entry.volume;
        session.opened.add(handle);
        conn.send({ type: 'opened', reqId: msg.reqId, volume: v.name, handle, size: v.size, chunkSize: v.chunkSize, family: v.family, dataKey: v.dataKey });
        this.opts.log('info', 'volume opened by peer', { peer, volume: v.name });
        return;
      }
      case 'fetch':
      case 'need-data': {
        const entry = this.byHandle.get(msg.handle);
        if (!entry) {
          conn.send({ type: 'error', reqId: 0, code: LINK_ERR.UNKNOWN_VOLUME, message: `unknown volume handle ${msg.handle}` });
          return;
        }
        const ranges = msg.type === 'fetch' ? msg.ranges : [{ start: msg.index, count: 1 }];
        const n = entry.volume.chunkCount;
        const groups = msg.type === 'fetch' && msg.priority === PRIORITY.DEMAND ? this.opts.groups?.(entry.volume.name) : null;
        try {
          for (const r of ranges) {
            const end = Math.min(r.start + r.count, n);
            for (let i = r.start; i < end; i++) {
              if (msg.type === 'need-data') session.forceData.add(`${msg.handle}:${i}`);
              if (session.queue.push({ handle: msg.handle, index: i, priority: msg.priority, pushed: false }) && msg.priority === PRIORITY.DEMAND) {
                session.demandQueuedAt.set(`${msg.handle}:${i}`, session.backgroundSent);
              }
            }
          }
          // Group push: the rest of the files these chunks belong to, in the group class,
          // carrying the request's fill token back (I5). Never what this session already sent.
          if (groups && msg.type === 'fetch') {
            for (const r of ranges) {
              const end = Math.min(r.start + r.count, n);
              for (let i = r.start; i < end; i++) {
                for (const g of groups.groupOf(i)) {
                  if (g < 0 || g >= n || session.wasDelivered(msg.handle, g)) continue;
                  if (session.queue.push({ handle: msg.handle, index: g, priority: PRIORITY.GROUP, pushed: true, token: msg.token })) this.metrics.groupPushed.inc();
                }
              }
            }
          }
        } catch (err) {
          if (!(err instanceof QueueFullError)) throw err;
          conn.send({ type: 'error', reqId: 0, code: LINK_ERR.BAD_REQUEST, message: err.message });
        }
        this.pump(session);
        return;
      }
      case 'cancel':
        session.queue.cancel(msg.handle, msg.priority, msg.ranges);
        return;
      case 'ping':
        conn.send({ type: 'pong', nonce: msg.nonce });
        return;
      case 'metrics-request':
        conn.send({ type: 'metrics', reqId: msg.reqId, json: JSON.stringify(this.stats()) });
        return;
      default:
        return;
    }
  }

  stats(): Record<string, unknown> {
    return {
      peers: [...this.sessions.values()].map((s) => ({ peer: s.peer, connections: s.conns.size, queued: s.queue.size, signaturesRemembered: s.sent.size })),
    };
  }

  // ------------------------------------------------------------------------------- sending

  private pump(s: PeerSession): void {
    if (s.pumping) return;
    s.pumping = true;
    try {
      // Read and encode a few chunks ahead, in priority order.
      while (s.preparing + this.readyCount(s) < this.prepareAhead) {
        const job = s.queue.shift();
        if (!job) break;
        s.preparing++;
        this.prepare(s, job)
          .then((p) => {
            if (p) s.ready[p.job.priority]!.push(p);
          })
          .catch((err: unknown) => {
            this.opts.log('error', 'reading a chunk failed', { peer: s.peer, handle: job.handle, index: job.index, err: (err as Error).message });
            const conn = [...s.conns][0];
            conn?.send({ type: 'error', reqId: 0, code: LINK_ERR.IO, message: `chunk ${job.index}: ${(err as Error).message}` });
          })
          .finally(() => {
            s.preparing--;
            this.pump(s);
          });
      }
      // Send what is ready, highest priority first, where credit, socket and rate allow.
      for (;;) {
        const p = this.nextReady(s);
        if (!p) break;
        const conn = this.pickConnection(s, p.cost);
        if (!conn) break;
        const wait = this.bucket.delayFor(p.frame.length);
        if (wait > 0) {
          setTimeout(() => this.pump(s), Math.ceil(wait)).unref();
          break;
        }
        s.ready[p.job.priority]!.shift();
        this.bucket.take(p.frame.length);
        const key = `${p.job.handle}:${p.job.index}`;
        if (p.job.priority === PRIORITY.DEMAND) {
          const at = s.demandQueuedAt.get(key);
          if (at !== undefined) {
            s.demandQueuedAt.delete(key);
            this.metrics.overtaken.observe(s.backgroundSent - at);
          }
        } else {
          s.backgroundSent++;
        }
        const entry = this.byHandle.get(p.job.handle);
        if (entry) s.markDelivered(p.job.handle, p.job.index, entry.volume.chunkCount);
        if (p.cost > 0) conn.sendCredited(p.frame, p.cost);
        else conn.sendFrame(p.frame);
        this.metrics.chunks.inc({ kind: p.kind, class: p.job.priority });
        this.metrics.bytes.inc({ kind: p.kind }, p.frame.length);
        this.metrics.rawBytes.inc(p.raw);
      }
    } finally {
      s.pumping = false;
    }
  }

  private readyCount(s: PeerSession): number {
    return s.ready[0]!.length + s.ready[1]!.length + s.ready[2]!.length + s.ready[3]!.length;
  }

  private nextReady(s: PeerSession): Prepared | undefined {
    for (const q of s.ready) if (q.length > 0) return q[0];
    return undefined;
  }

  private pickConnection(s: PeerSession, cost: number): LinkConnection | undefined {
    let best: LinkConnection | undefined;
    for (const c of s.conns) {
      if (c.closed || c.queuedBytes > 256 * 1024 || !c.canSend(cost)) continue;
      if (!best || c.queuedBytes < best.queuedBytes) best = c;
    }
    return best;
  }

  private async prepare(s: PeerSession, job: ChunkJob): Promise<Prepared | null> {
    const entry = this.byHandle.get(job.handle);
    if (!entry) return null;
    const v = entry.volume;
    const raw = v.chunkLength(job.index);
    const base = { handle: job.handle, index: job.index, priority: job.priority, pushed: job.pushed, token: job.pushed ? (job.token ?? 0) : 0 };
    if (v.isZeroChunk(job.index)) return { job, kind: 'zero', raw, cost: 0, frame: encodeMessage({ type: 'chunk-zero', ...base }) };
    const data = await v.readChunk(job.index);
    if (isAllZero(data)) return { job, kind: 'zero', raw, cost: 0, frame: encodeMessage({ type: 'chunk-zero', ...base }) };
    const signature = entry.signer.sign(data);
    const sigKey = `${v.family}:${signature.toString('hex')}`;
    const k = `${job.handle}:${job.index}`;
    if (s.sent.has(sigKey) && !s.forceData.has(k)) {
      s.sent.delete(sigKey);
      s.sent.set(sigKey, true);
      return { job, kind: 'sig', raw, cost: 0, frame: encodeMessage({ type: 'chunk-sig', ...base, rawLength: raw, signature }) };
    }
    s.forceData.delete(k);
    const { codec, payload } = compressChunk(data);
    const msg: LinkMessage = { type: 'chunk', ...base, codec, rawLength: raw, signature, payload };
    s.sent.set(sigKey, true);
    if (s.sent.size > this.rememberSignatures) s.sent.delete(s.sent.keys().next().value!);
    return { job, kind: 'data', raw, cost: creditCost(msg), frame: encodeMessage(msg) };
  }
}
