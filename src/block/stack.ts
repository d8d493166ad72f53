// Builds the BlockDevice stack that `spillway serve` exports for one image:
//   stats → [read-only] → [overlay (copy-on-write) → read-only file] → file
// Each optional layer is there only when the options ask for it; the NBD server sees the top.

import type { BlockDevice } from './device.js';
import { FileDevice } from './file.js';
import { OverlayDevice } from './overlay.js';
import { ReadOnlyDevice } from './readonly.js';
import { StatsDevice } from './stats.js';

export interface ImageStackOptions {
  path: string;
  /** export name, the label of its metrics. */
  name: string;
  readonly: boolean;
  /** take OFD locks on the image (and overlay), which QEMU honours. */
  lock: boolean;
  /** copy-on-write overlay file: the image is opened read-only and writes land here. */
  cow?: string;
}

export async function openImageStack(o: ImageStackOptions): Promise<BlockDevice> {
  let dev: BlockDevice = await FileDevice.open(o.path, { readonly: o.readonly || !!o.cow, lock: o.lock });
  try {
    if (o.cow) dev = await OverlayDevice.open(dev, { path: o.cow, lock: o.lock });
    if (o.readonly) dev = new ReadOnlyDevice(dev);
  } catch (err) {
    await dev.close();
    throw err;
  }
  return new StatsDevice(dev, { exportName: o.name });
}
