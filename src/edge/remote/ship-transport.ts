// The shipper's transport over a peer's link connections: a batch is pinned to one connection
// (the origin assembles a batch per connection), EPOCH_DATA frames spend the connection's
// credit and wait for it, and nothing is queued on a socket past a bound.

import { creditCost, encodeMessage, type LinkMessage } from '../../link/codec.js';
import type { LinkConnection } from '../../link/connection.js';
import type { ShipChannel, ShipTransport } from '../../writeback/shipper.js';
import type { PeerClient } from './peer-client.js';
import type { RemoteVolume } from './remote-volume.js';

/** Socket bytes queued before a sender waits for 'drain'. */
const MAX_QUEUED = 1024 * 1024;

export function peerShipTransport(peer: PeerClient, volume: RemoteVolume): ShipTransport {
  return {
    async channel(signal: AbortSignal) {
      for (;;) {
        signal.throwIfAborted();
        if (!peer.connected) peer.kick(); // epochs wait: don't sit out a long redial backoff
        await peer.whenConnected(signal);
        const conn = peer.pick();
        const handle = volume.info?.handle;
        if (conn && handle !== undefined) return { channel: connectionChannel(conn), handle };
        await new Promise((r) => setTimeout(r, 100));
      }
    },
  };
}

function connectionChannel(conn: LinkConnection): ShipChannel {
  return {
    get closed() {
      return conn.closed;
    },
    onClose(cb) {
      if (conn.closed) queueMicrotask(cb);
      else conn.once('close', cb);
    },
    async send(msg: LinkMessage) {
      const cost = creditCost(msg);
      while (!conn.closed && (conn.queuedBytes > MAX_QUEUED || (cost > 0 && !conn.canSend(cost)))) await writable(conn);
      if (conn.closed) throw new Error('the link connection closed');
      if (cost > 0) conn.sendCredited(encodeMessage(msg), cost);
      else conn.send(msg);
    },
  };
}

function writable(conn: LinkConnection): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      conn.off('writable', done);
      conn.off('close', done);
      clearTimeout(t);
      resolve();
    };
    conn.on('writable', done);
    conn.on('close', done);
    // credit returns come as frames; re-check now and then in case an event was missed
    const t = setTimeout(done, 1000);
  });
}
