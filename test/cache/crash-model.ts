// What the crash test's child writes, derivable from (chunk index, version) alone, so the
// parent can tell right content from wrong without trusting the cache.

import { createHash } from 'node:crypto';
import { idOf, prng } from './helpers.js';

export const CHUNKS = 48;
export const CRASH_KEY = createHash('sha256').update('spillway crash test key').digest();

/** Content of version `v` of chunk `index`: a header naming both, then seeded bytes. */
export function crashContent(index: number, v: number): { data: Buffer; id: Buffer } {
  const size = index % 8 === 7 ? 3000 : 65536; // a short chunk, as at the end of a volume
  const data = prng(`crash ${index} ${v}`, size);
  data.writeUInt32BE(index, 0);
  data.writeUInt32BE(v, 4);
  return { data, id: idOf(data) };
}
