// A volume registered at the edge that owns it (local role). Raw files and block devices are
// opened directly, with an exclusive OFD lock that QEMU honours (a VM cannot open the disk
// underneath us); qcow2 and every other format QEMU understands go through `qemu-nbd` (which
// takes QEMU's own image locks) and the project's NBD client. The volume knows its zero
// chunks from the allocation map, and its family's data key, kept in the edge's state dir.

import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';

import { blockStatusOf, FilterDevice, type BlockDevice, type IoOptions } from '../../block/device.js';
import { FileDevice } from '../../block/file.js';
import { ReadOnlyDevice } from '../../block/readonly.js';
import { NbdBlockDevice } from '../../nbd/client.js';
import type { Logger } from '../../log/logger.js';

export interface LocalVolumeConfig {
  name: string;
  /** path of a raw image, block device, or any image qemu-nbd can open. */
  source: string;
  /** 'raw' (default: opened directly) or a qemu format name ('qcow2', 'vmdk', ...). */
  format?: string;
  chunkSize: number;
  /** volumes of one family (a base and its clones) share a data key and cached content. */
  family?: string;
  /**
   * A running VM on this site writes the source directly (QEMU live migration: the source VM
   * keeps running on its own disk file while a remote edge already serves the volume). Then
   * the volume keeps no zero map (every chunk is read from the file when asked for) and takes
   * no lock (the VM holds the image). raw only: qemu-nbd would cache a format's metadata.
   */
  liveWriter?: boolean;
}

export class VolumeError extends Error {
  readonly code: 'SPW_ERR_VOLUME_OPEN' | 'SPW_ERR_VOLUME_CONFIG';
  constructor(code: 'SPW_ERR_VOLUME_OPEN' | 'SPW_ERR_VOLUME_CONFIG', message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'VolumeError';
    this.code = code;
  }
}

const FAMILY_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

/** The family's 32-byte data key, created on first use (mode 0600) and reused after. */
export async function familyKey(stateDir: string, family: string): Promise<Buffer> {
  if (!FAMILY_RE.test(family)) throw new VolumeError('SPW_ERR_VOLUME_CONFIG', `family "${family}" must be letters, digits, '.', '_' or '-'`);
  const dir = path.join(stateDir, 'keys');
  const file = path.join(dir, `${family}.key`);
  if (existsSync(file)) {
    const key = await readFile(file);
    if (key.length !== 32) throw new VolumeError('SPW_ERR_VOLUME_CONFIG', `${file} is not a 32-byte key; restore it from backup (cached data of this family is unreadable without it)`);
    return key;
  }
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const key = randomBytes(32);
  await writeFile(file, key, { mode: 0o600, flag: 'wx' });
  return key;
}

export class LocalVolume {
  private constructor(
    readonly name: string,
    readonly family: string,
    readonly chunkSize: number,
    readonly dataKey: Buffer,
    /** read-only view of the source, for serving chunks. */
    readonly device: BlockDevice,
    /** the same source, writable, for applying epochs shipped back by a remote edge. */
    private readonly rw: BlockDevice,
    private readonly zeroMap: Uint8Array,
    private readonly helper: ChildProcess | null,
    private readonly cleanup: string | null,
    /** written by a VM while open: nothing about its contents is remembered (no zero map). */
    readonly liveWriter: boolean,
  ) {}

  get size(): number {
    return this.device.size;
  }

  get chunkCount(): number {
    return Math.ceil(this.device.size / this.chunkSize);
  }

  /** The chunk is known to read as zeroes without reading it (a hole or zero extent). */
  isZeroChunk(index: number): boolean {
    if (this.liveWriter) return false;
    return (this.zeroMap[index >> 3]! & (1 << (index & 7))) !== 0;
  }

  /**
   * The writable source, for the applier. Writes through it clear the zero map of the chunks
   * they touch, so a chunk that was a hole is never answered as zeroes after data landed in it.
   */
  get writable(): BlockDevice {
    return new ZeroMapTracking(this.rw, (offset, length) => this.markWritten(offset, length));
  }

  /** Data may land in [offset, offset + length): those chunks are no longer known zero. */
  markWritten(offset: number, length: number): void {
    if (length === 0 || this.liveWriter) return;
    const first = Math.floor(offset / this.chunkSize);
    const last = Math.floor((offset + length - 1) / this.chunkSize);
    for (let c = first; c <= last; c++) this.zeroMap[c >> 3] = this.zeroMap[c >> 3]! & ~(1 << (c & 7));
  }

  get zeroChunks(): number {
    let n = 0;
    for (let i = 0; i < this.chunkCount; i++) if (this.isZeroChunk(i)) n++;
    return n;
  }

  chunkLength(index: number): number {
    return Math.min(this.chunkSize, this.size - index * this.chunkSize);
  }

  async readChunk(index: number, signal?: AbortSignal): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(this.chunkLength(index));
    await this.device.read(index * this.chunkSize, buf, { signal });
    return buf;
  }

  static async open(cfg: LocalVolumeConfig, ctx: { stateDir: string; log: Logger }): Promise<LocalVolume> {
    if (!Number.isInteger(cfg.chunkSize) || cfg.chunkSize < 4096 || (cfg.chunkSize & (cfg.chunkSize - 1)) !== 0) {
      throw new VolumeError('SPW_ERR_VOLUME_CONFIG', `volume ${cfg.name}: chunk size ${cfg.chunkSize} must be a power of two of at least 4096`);
    }
    const family = cfg.family ?? cfg.name;
    const dataKey = await familyKey(ctx.stateDir, family);
    const format = cfg.format ?? 'raw';
    const liveWriter = cfg.liveWriter ?? false;
    if (liveWriter && format !== 'raw') throw new VolumeError('SPW_ERR_VOLUME_CONFIG', `volume ${cfg.name}: liveWriter needs a raw source (qemu-nbd would cache the ${format} image's metadata while the VM changes it)`);
    let device: BlockDevice;
    let rw: BlockDevice;
    let helper: ChildProcess | null = null;
    let cleanup: string | null = null;
    if (format === 'raw') {
      try {
        // Read-write fd so the lock can be exclusive (F_WRLCK): QEMU's read locks on the
        // image's permission bytes then fail, so no VM opens the disk while we own it. A live
        // writer's VM holds the image already: no lock, which is the point of the option.
        rw = await FileDevice.open(cfg.source, { readonly: false, lock: !liveWriter });
        device = new ReadOnlyDevice(rw);
      } catch (err) {
        throw new VolumeError('SPW_ERR_VOLUME_OPEN', `volume ${cfg.name}: cannot open ${cfg.source}: ${(err as Error).message}`, { cause: err });
      }
    } else {
      const sockDir = path.join(ctx.stateDir, 'run');
      await mkdir(sockDir, { recursive: true, mode: 0o700 });
      const sock = path.join(sockDir, `${cfg.name}.qemu-nbd.sock`);
      await rm(sock, { force: true });
      helper = spawn('qemu-nbd', ['--format', format, '--socket', sock, '--persistent', '--shared', '16', '--export-name', '', cfg.source], { stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      helper.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
      const exited = new Promise<number | null>((r) => helper!.once('exit', (code) => r(code)));
      helper.once('error', () => {
        /* reported below */
      });
      for (let i = 0; ; i++) {
        if (existsSync(sock)) break;
        const done = await Promise.race([exited, new Promise<'wait'>((r) => setTimeout(() => r('wait'), 50))]);
        if (done !== 'wait' || i > 300) {
          helper.kill('SIGKILL');
          throw new VolumeError('SPW_ERR_VOLUME_OPEN', `volume ${cfg.name}: qemu-nbd could not open ${cfg.source} as ${format}: ${stderr.trim() || 'no output (is qemu-utils installed?)'}`);
        }
      }
      try {
        rw = await NbdBlockDevice.open({ socket: sock, exportName: '' });
        device = new ReadOnlyDevice(rw);
      } catch (err) {
        // qemu-nbd may create its socket before it opens the image: if it exits now, its own
        // message says what is wrong with the image.
        const gone = await Promise.race([exited.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 1000))]);
        helper.kill('SIGKILL');
        if (gone) throw new VolumeError('SPW_ERR_VOLUME_OPEN', `volume ${cfg.name}: qemu-nbd could not open ${cfg.source} as ${format}: ${stderr.trim() || 'no output'}`, { cause: err });
        throw new VolumeError('SPW_ERR_VOLUME_OPEN', `volume ${cfg.name}: cannot read qemu-nbd's export of ${cfg.source}: ${(err as Error).message}`, { cause: err });
      }
      cleanup = sock;
    }
    // A live writer's holes fill while we serve: a map made now would answer stale zeroes.
    const zeroMap = liveWriter ? new Uint8Array(0) : await buildZeroMap(device, cfg.chunkSize);
    const vol = new LocalVolume(cfg.name, family, cfg.chunkSize, dataKey, device, rw, zeroMap, helper, cleanup, liveWriter);
    ctx.log('info', 'volume registered', { volume: cfg.name, source: cfg.source, format, size: vol.size, chunks: vol.chunkCount, zeroChunks: vol.zeroChunks, family, liveWriter });
    return vol;
  }

  async close(): Promise<void> {
    await this.device.close();
    if (this.helper && this.helper.exitCode === null) {
      const gone = new Promise((r) => this.helper!.once('exit', r));
      this.helper.kill('SIGTERM');
      await gone;
    }
    if (this.cleanup) await rm(this.cleanup, { force: true });
  }
}

/** Passes writes through, telling the volume first where data lands. */
class ZeroMapTracking extends FilterDevice {
  constructor(
    inner: BlockDevice,
    private readonly onWrite: (offset: number, length: number) => void,
  ) {
    super(inner);
  }
  get description(): string {
    return `zero-map-tracking(${this.inner.description})`;
  }
  override async write(offset: number, data: Buffer, opts?: IoOptions): Promise<void> {
    this.onWrite(offset, data.length);
    await this.inner.write(offset, data, opts);
  }
}

/** One bit per chunk: set when the whole chunk is a hole or reads as zeroes. */
async function buildZeroMap(dev: BlockDevice, chunkSize: number): Promise<Uint8Array> {
  const chunks = Math.ceil(dev.size / chunkSize);
  const map = new Uint8Array(Math.ceil(chunks / 8));
  if (!dev.capabilities.extents) return map;
  let pos = 0;
  while (pos < dev.size) {
    const extents = await blockStatusOf(dev, pos, Math.min(dev.size - pos, 1 << 30));
    if (extents.length === 0) break;
    for (const e of extents) {
      if (e.zero) {
        const first = Math.ceil(e.offset / chunkSize);
        const endByte = e.offset + e.length;
        const last = endByte >= dev.size ? chunks : Math.floor(endByte / chunkSize);
        for (let c = first; c < last; c++) map[c >> 3] = (map[c >> 3] ?? 0) | (1 << (c & 7));
      }
      pos = e.offset + e.length;
    }
  }
  return map;
}
