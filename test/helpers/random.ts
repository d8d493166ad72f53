// A small seeded PRNG (mulberry32) for tests that must replay the same random choices from a
// seed (crash tests print theirs).

import { open } from 'node:fs/promises';

export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A sparse image (64 KiB granules): random data, with a `holes` fraction left as holes; returns its bytes. */
export async function makeSparseImage(file: string, size: number, seed: number, holes = 0.4): Promise<Buffer> {
  const rnd = prng(seed);
  const buf = Buffer.alloc(size);
  const fh = await open(file, 'w');
  try {
    await fh.truncate(size);
    for (let off = 0; off < size; off += 64 * 1024) {
      if (rnd() < holes) continue; // a hole
      for (let i = off; i < off + 64 * 1024; i += 4) buf.writeUInt32LE(Math.floor(rnd() * 0xffffffff), i);
      await fh.write(buf, off, 64 * 1024, off);
    }
  } finally {
    await fh.close();
  }
  return buf;
}
