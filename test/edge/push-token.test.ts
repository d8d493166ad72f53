// I5 for pushed chunks. The owner pushes chunks nobody asked for (group push) after a demand
// FETCH; the FETCH carries the requester's fill token and the pushes carry it back. A pushed
// chunk is cached, or handed to a reader, only when the chunk was not invalidated since that
// token: a write shipped after the request is always newer than what the owner read for it.
// Real SecureCache and RemoteVolume; the peer is an in-process stand-in that records what the
// volume sends (no link is needed to exercise this decision).

import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';

import { SecureCache } from '../../src/cache/cache.js';
import { deriveKeys } from '../../src/cache/keys.js';
import type { LinkMessage } from '../../src/link/codec.js';
import { CODEC, PRIORITY } from '../../src/link/protocol.js';
import { ChunkSigner } from '../../src/link/signature.js';
import type { PeerClient } from '../../src/edge/remote/peer-client.js';
import { RemoteVolume } from '../../src/edge/remote/remote-volume.js';
import type { Logger } from '../../src/log/logger.js';
import { tempDir } from '../helpers/proc.js';

const CHUNK = 4096;
const quiet: Logger = Object.assign(() => undefined, { child: () => quiet });

class FakePeer extends EventEmitter {
  readonly sent: LinkMessage[] = [];
  readonly opts = { name: 'onprem' };
  connected = true;
  send(m: LinkMessage): boolean {
    this.sent.push(m);
    return true;
  }
}

describe('pushed chunks and fill tokens (I5)', () => {
  it('caches a push only if its chunk was not invalidated since the request that caused it', async () => {
    const tmp = await tempDir('spw-push-');
    const cache = await SecureCache.open({ dir: tmp.dir, maxBytes: 64 * 1024 * 1024 });
    try {
      const key = randomBytes(32);
      const signer = new ChunkSigner(deriveKeys(key).signKey);
      const peer = new FakePeer();
      const v = new RemoteVolume('disk', peer as unknown as PeerClient, cache, { ioTimeoutMs: 10_000, log: quiet });
      v.openOffline({ name: 'disk', handle: 1, size: 64 * CHUNK, chunkSize: CHUNK, family: 'disk' }, key);
      const data = (i: number, gen: number) => Buffer.alloc(CHUNK, i * 16 + gen);
      const chunk = (i: number, gen: number, pushed: boolean, token: number): LinkMessage => {
        const d = data(i, gen);
        return { type: 'chunk', handle: 1, index: i, priority: pushed ? PRIORITY.GROUP : PRIORITY.DEMAND, pushed, token, codec: CODEC.RAW, rawLength: CHUNK, signature: signer.sign(d), payload: d };
      };

      // A demand read of chunk 5: its FETCH carries the token of "now".
      const read5 = v.fetch(5);
      const fetch5 = peer.sent.find((m) => m.type === 'fetch');
      assert.ok(fetch5 && fetch5.type === 'fetch');
      const token = fetch5.token;

      // A write to chunk 7 is shipped and applied after that request (guard, then release).
      await v.guard([7]);
      // While its batch is in flight, a push of 7 is never cached.
      await v.onMessage(chunk(7, 0, true, token));
      assert.equal(cache.lookup('disk', 7), null, 'no push is cached while a batch for the chunk is in flight');
      await v.release([7]);

      // The owner answers 5 and pushes 6 and 7, all read before the write reached it.
      await v.onMessage(chunk(5, 0, false, 0));
      assert.deepEqual(await read5, data(5, 0));
      await v.onMessage(chunk(6, 0, true, token));
      await v.onMessage(chunk(7, 0, true, token));
      assert.deepEqual(await cache.get('disk', 6), data(6, 0), 'a push of an untouched chunk is cached');
      assert.equal(cache.lookup('disk', 7), null, 'a push read before a write shipped after its request is dropped');

      // A reader of 7 asks now (a newer token); a stale push arriving meanwhile is not handed
      // to it; the answer to its own request is.
      const read7 = v.fetch(7);
      let settled = false;
      void read7.then(() => (settled = true));
      await v.onMessage(chunk(7, 0, true, token));
      await new Promise((r) => setImmediate(r));
      assert.equal(settled, false, 'a stale push does not answer a waiting reader');
      await v.onMessage(chunk(7, 1, false, 0));
      assert.deepEqual(await read7, data(7, 1));
      assert.deepEqual(await cache.get('disk', 7), data(7, 1));

      // A late duplicate answer nobody waits for is not cached over what is there.
      await v.onMessage(chunk(9, 0, false, 0));
      assert.equal(cache.lookup('disk', 9), null, 'an answer nobody asked for is not cached');
      v.close();
    } finally {
      await cache.close();
      await tmp.cleanup();
    }
  });
});
