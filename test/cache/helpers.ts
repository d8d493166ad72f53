// Shared helpers of the cache tests: temp directories, deterministic chunk contents, content ids.

import { createHash } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';

const stacks = new WeakMap<TestContext, (() => unknown)[]>();

/** Run `fn` when the test ends, last registered first (node:test runs after() hooks in order). */
export function cleanup(t: TestContext, fn: () => unknown): void {
  let stack = stacks.get(t);
  if (!stack) {
    const s: (() => unknown)[] = [];
    stacks.set(t, s);
    stack = s;
    t.after(async () => {
      while (s.length > 0) await s.pop()?.();
    });
  }
  stack.push(fn);
}

export async function tempDir(t: TestContext, prefix = 'spw-cache-'): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), prefix));
  cleanup(t, () => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Deterministic pseudo-random bytes (xorshift32) from a seed string. */
export function prng(seed: string, length: number): Buffer {
  let x = createHash('sha256').update(seed).digest().readUInt32LE(0) | 1;
  const out = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** The content id the tests use: SHA-256 of the content (the cache treats ids as opaque). */
export function idOf(data: Uint8Array): Buffer {
  return createHash('sha256').update(data).digest();
}

/** Every regular file under dir with its bytes. */
export async function filesUnder(dir: string): Promise<{ file: string; bytes: Buffer }[]> {
  const out: { file: string; bytes: Buffer }[] = [];
  for (const e of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (!e.isFile()) continue;
    const file = path.join(e.parentPath ?? e.path, e.name);
    out.push({ file, bytes: await readFile(file) });
  }
  return out;
}
