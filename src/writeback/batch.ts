// What the shipper (remote edge) and the applier (origin edge) agree on about one batch of
// epochs: its extents, in order, and the digest that EPOCH_END carries. The digest covers every
// extent's position, length, kind and raw (uncompressed) bytes, so a batch that lost, gained,
// reordered or altered an extent on the way is refused before anything touches the origin.

import { createHash, type Hash } from 'node:crypto';

/** One coalesced extent of a batch: data to write, or a range that must read as zeroes
 *  (write-zeroes and trim both ship as zero extents). */
export type Extent = { offset: number; data: Buffer; zero?: false } | { offset: number; length: number; zero: true };

export function extentLength(e: Extent): number {
  return e.zero ? e.length : e.data.length;
}

/** SHA-256 over u64 offset | u32 length | u8 zero | raw bytes, for each extent in order. */
export class BatchDigest {
  private readonly h: Hash = createHash('sha256');
  private readonly head = Buffer.alloc(13);
  extents = 0;
  bytes = 0;

  update(offset: number, length: number, zero: boolean, data?: Buffer): void {
    this.head.writeBigUInt64BE(BigInt(offset), 0);
    this.head.writeUInt32BE(length, 8);
    this.head.writeUInt8(zero ? 1 : 0, 12);
    this.h.update(this.head);
    if (!zero && data) this.h.update(data);
    this.extents++;
    this.bytes += length;
  }

  digest(): Buffer {
    return this.h.digest();
  }
}
