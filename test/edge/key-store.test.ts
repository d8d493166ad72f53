// The sealed volume keys a remote edge keeps for hydrated volumes (src/edge/remote/key-store.ts):
// they open only with the same edge identity key, for the same volume name, untampered.

import assert from 'node:assert/strict';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { copyFile, readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, it } from 'node:test';

import { KeyStore, KeyStoreError } from '../../src/edge/remote/key-store.js';
import { tempDir } from '../helpers/proc.js';

const pem = () => Buffer.from(generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ type: 'pkcs8', format: 'pem' }));
const info = { name: 'web', handle: 3, size: 1 << 30, chunkSize: 65536, family: 'web' };

describe('KeyStore', () => {
  it('round-trips, and refuses another identity, another volume name or a changed file', async () => {
    const tmp = await tempDir('spw-keys-');
    try {
      const id = pem();
      const dir = path.join(tmp.dir, 'keys');
      const store = new KeyStore(dir, id, 'cloud');
      const key = randomBytes(32);
      assert.equal(store.load('web'), null, 'nothing stored yet');
      await store.save('web', info, key);
      const got = store.load('web');
      assert.ok(got);
      assert.deepEqual(got.info, info);
      assert.ok(got.dataKey.equals(key));
      assert.equal((await stat(path.join(dir, 'web.sealed.json'))).mode & 0o777, 0o600);
      const raw = await readFile(path.join(dir, 'web.sealed.json'), 'utf8');
      assert.ok(!raw.includes(key.toString('base64')) && !raw.includes(key.toString('hex')), 'the key is not stored in the clear');

      assert.throws(() => new KeyStore(dir, pem(), 'cloud').load('web'), KeyStoreError, 'another edge identity');
      assert.throws(() => new KeyStore(dir, id, 'other-edge').load('web'), KeyStoreError, 'another edge name');
      await copyFile(path.join(dir, 'web.sealed.json'), path.join(dir, 'db.sealed.json'));
      assert.throws(() => store.load('db'), KeyStoreError, 'a file copied to another volume');
      const j = JSON.parse(raw) as { info: { size: number } };
      j.info.size *= 2;
      await writeFile(path.join(dir, 'web.sealed.json'), JSON.stringify(j));
      assert.throws(() => store.load('web'), KeyStoreError, 'changed geometry');
      await writeFile(path.join(dir, 'web.sealed.json'), '{not json');
      assert.throws(() => store.load('web'), /delete it/);
      await assert.rejects(store.save('web', info, randomBytes(16)), KeyStoreError);
    } finally {
      await tmp.cleanup();
    }
  });
});
