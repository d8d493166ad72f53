// A remote edge normally holds a volume family's data key in memory only: the origin hands it
// over with OPEN, so a restarted edge cannot read its cache or journal until the origin is
// reachable again. A hydrated volume (migration mode) must be servable with the origin gone,
// so for those volumes the edge keeps the volume's geometry and data key on disk, sealed with
// AES-256-GCM under a key derived (HKDF-SHA-256) from the edge's own TLS private key: the file
// is worth nothing without the key file the edge already guards as its identity.

import { createCipheriv, createDecipheriv, hkdfSync, randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import path from 'node:path';

import { DATA_KEY_SIZE } from '../../link/protocol.js';
import { replaceFileDurably } from '../../util/durable.js';
import type { RemoteVolumeInfo } from './remote-volume.js';

export class KeyStoreError extends Error {
  readonly code = 'SPW_ERR_KEY_STORE';
  constructor(message: string) {
    super(message);
    this.name = 'KeyStoreError';
  }
}

interface Sealed {
  version: 1;
  info: RemoteVolumeInfo;
  iv: string;
  tag: string;
  key: string;
}

export class KeyStore {
  private readonly kek: Buffer;

  /** `identityKey`: the edge's TLS private key (PEM bytes); `edge`: the edge's name. */
  constructor(
    private readonly dir: string,
    identityKey: Buffer,
    edge: string,
  ) {
    this.kek = Buffer.from(hkdfSync('sha256', identityKey, Buffer.from('spillway key store v1'), Buffer.from(edge), 32));
  }

  private file(volume: string): string {
    return path.join(this.dir, `${volume}.sealed.json`);
  }

  async save(volume: string, info: RemoteVolumeInfo, dataKey: Buffer): Promise<void> {
    if (dataKey.length !== DATA_KEY_SIZE) throw new KeyStoreError(`a data key is ${DATA_KEY_SIZE} bytes, got ${dataKey.length}`);
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    const iv = randomBytes(12);
    const c = createCipheriv('aes-256-gcm', this.kek, iv);
    c.setAAD(aad(volume, info));
    const key = Buffer.concat([c.update(dataKey), c.final()]);
    const sealed: Sealed = { version: 1, info, iv: iv.toString('base64'), tag: c.getAuthTag().toString('base64'), key: key.toString('base64') };
    await replaceFileDurably(this.file(volume), Buffer.from(JSON.stringify(sealed) + '\n'), 0o600);
  }

  /** Forget the key of a volume that is removed from this edge. */
  async delete(volume: string): Promise<void> {
    await rm(this.file(volume), { force: true });
    await rm(`${this.file(volume)}.tmp`, { force: true });
  }

  /** The stored geometry and key of `volume`, or null when none is stored. */
  load(volume: string): { info: RemoteVolumeInfo; dataKey: Buffer } | null {
    const f = this.file(volume);
    if (!existsSync(f)) return null;
    let s: Sealed;
    try {
      s = JSON.parse(readFileSync(f, 'utf8')) as Sealed;
      if (s.version !== 1 || typeof s.info?.size !== 'number' || typeof s.info.chunkSize !== 'number' || typeof s.info.family !== 'string') throw new Error('unexpected fields');
    } catch (err) {
      throw new KeyStoreError(`${f} is not a sealed volume key (${(err as Error).message}); delete it and let the edge reach the origin once`);
    }
    try {
      const d = createDecipheriv('aes-256-gcm', this.kek, Buffer.from(s.iv, 'base64'));
      d.setAAD(aad(volume, s.info));
      d.setAuthTag(Buffer.from(s.tag, 'base64'));
      const dataKey = Buffer.concat([d.update(Buffer.from(s.key, 'base64')), d.final()]);
      return { info: s.info, dataKey };
    } catch {
      throw new KeyStoreError(`${f} does not open with this edge's TLS key (was the key replaced, or the file copied from another edge?); delete it and let the edge reach the origin once`);
    }
  }
}

function aad(volume: string, info: RemoteVolumeInfo): Buffer {
  return Buffer.from(JSON.stringify([volume, info.name, info.size, info.chunkSize, info.family]));
}
