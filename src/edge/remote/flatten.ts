// Detach's flatten: copy every range a volume's overlay owns (what the guest wrote, with the
// epochs already applied to it) into the hydrated volume file, so that the file alone equals
// what the guest saw, then fdatasync it. The overlay is only read; the caller deletes it after
// this returns. Idempotent: a flatten cut short (kill -9) leaves the overlay intact, ranges it
// wrote already hold the overlay's bytes, and running it again writes the same bytes.
//
// Test hook: while the file named by SPILLWAY_TEST_FLATTEN_HOLD exists, the flatten waits after
// its first piece (logged as "flatten held"), so a test can kill the edge mid-flatten.

import { existsSync } from 'node:fs';

import { FileDevice } from '../../block/file.js';
import { OverlayDevice } from '../../block/overlay.js';
import type { Logger } from '../../log/logger.js';

/** Bytes copied per read + write. */
const PIECE = 4 * 1024 * 1024;

function isAllZero(buf: Buffer): boolean {
  let i = 0;
  for (; i + 8 <= buf.length; i += 8) if (buf.readBigUInt64LE(i) !== 0n) return false;
  for (; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

export interface FlattenResult {
  /** bytes copied from the overlay (owned ranges). */
  flattenedBytes: number;
  /** the volume file's size. */
  size: number;
}

/**
 * Write the overlay at `overlayPath` (with its bitmap next to it) into `target`. Without an
 * overlay (a read-only volume, or one nothing was ever written to) nothing is copied. Zero
 * ranges are punched, so the file stays sparse.
 */
export async function flattenOverlay(o: { overlayPath: string; target: string; log: Logger; volume: string }): Promise<FlattenResult> {
  const file = await FileDevice.open(o.target, { readonly: false, lock: true });
  try {
    if (!existsSync(o.overlayPath)) {
      await file.flush();
      return { flattenedBytes: 0, size: file.size };
    }
    // The overlay's base is only read for granules it does not own, which is never here.
    const base = await FileDevice.open(o.target, { readonly: true, lock: false });
    let overlay: OverlayDevice;
    try {
      overlay = await OverlayDevice.open(base, { path: o.overlayPath });
    } catch (err) {
      await base.close();
      throw err;
    }
    let copied = 0;
    let held = false;
    try {
      const ranges = overlay.ownedRanges();
      const total = ranges.reduce((n, r) => n + r.length, 0);
      o.log('info', 'flattening the overlay into the volume file', { volume: o.volume, target: o.target, ranges: ranges.length, bytes: total });
      const buf = Buffer.allocUnsafe(Math.min(PIECE, Math.max(1, total)));
      for (const r of ranges) {
        for (let off = r.offset; off < r.offset + r.length; ) {
          const len = Math.min(PIECE, r.offset + r.length - off);
          const piece = buf.subarray(0, len);
          await overlay.read(off, piece);
          if (isAllZero(piece)) await file.writeZeroes(off, len, { mayTrim: true });
          else await file.write(off, piece);
          copied += len;
          off += len;
          const hold = process.env.SPILLWAY_TEST_FLATTEN_HOLD;
          if (hold && !held && existsSync(hold)) {
            held = true;
            o.log('warn', 'flatten held (test hook SPILLWAY_TEST_FLATTEN_HOLD)', { volume: o.volume, copied, hold });
            while (existsSync(hold)) await new Promise((res) => setTimeout(res, 50));
          }
        }
      }
      // Durable before the caller may delete the overlay: until then the overlay holds the data.
      await file.flush();
    } finally {
      await overlay.close();
    }
    return { flattenedBytes: copied, size: file.size };
  } finally {
    await file.close();
  }
}
