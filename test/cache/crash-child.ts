// Child process of crash.test.ts: opens the cache and changes it in a loop until killed.
// Before each operation it prints `S vol index kind version [contentVersion]`, after it
// `A ...` (acknowledged) or `N ...` (the cache declined; nothing changed). stdout is a pipe,
// which Node writes synchronously on Linux, so every line printed reached the parent.
//
//   node --import tsx test/cache/crash-child.ts DIR ROUND

import { createHash } from 'node:crypto';
import { SecureCache } from '../../src/cache/cache.js';
import { CHUNKS, crashContent, CRASH_KEY } from './crash-model.js';

const [dir, roundText] = process.argv.slice(2);
if (!dir || !roundText) throw new Error('usage: crash-child.ts DIR ROUND');
const round = Number(roundText);

const cache = await SecureCache.open({ dir, maxBytes: 1 << 30, snapshotMinLogBytes: 16 * 1024 });
cache.setKey('fam', CRASH_KEY);
cache.attachVolume('clone', 'fam');
process.stdout.write('open\n');

let x = createHash('sha256').update(`round ${round}`).digest().readUInt32LE(0) | 1;
const rand = (n: number): number => {
  x ^= x << 13;
  x ^= x >>> 17;
  x ^= x << 5;
  return (x >>> 0) % n;
};
let version = round * 1_000_000;
const busy = new Set<string>();
/** last acknowledged content version of each base chunk, for map(). */
const lastPut = new Map<number, number>();

async function one(): Promise<void> {
  let index = rand(CHUNKS);
  const r = rand(100);
  const vol = r >= 90 ? 'clone' : 'base';
  while (busy.has(`${vol}:${index}`)) index = (index + 1) % CHUNKS;
  const key = `${vol}:${index}`;
  busy.add(key);
  const v = ++version;
  try {
    if (vol === 'clone') {
      const cv = lastPut.get(index);
      if (cv === undefined) return;
      process.stdout.write(`S clone ${index} map ${v} ${cv}\n`);
      const ok = await cache.map('clone', index, crashContent(index, cv).id);
      process.stdout.write(`${ok ? 'A' : 'N'} clone ${index} map ${v} ${cv}\n`);
    } else if (r < 70) {
      const { data, id } = crashContent(index, v);
      process.stdout.write(`S base ${index} put ${v} ${v}\n`);
      const ok = await cache.put('base', 'fam', index, id, data);
      if (ok) lastPut.set(index, v);
      process.stdout.write(`${ok ? 'A' : 'N'} base ${index} put ${v} ${v}\n`);
    } else if (r < 80) {
      process.stdout.write(`S base ${index} zero ${v}\n`);
      await cache.putZero('base', index);
      process.stdout.write(`A base ${index} zero ${v}\n`);
    } else {
      process.stdout.write(`S base ${index} inval ${v}\n`);
      await cache.invalidate('base', index);
      process.stdout.write(`A base ${index} inval ${v}\n`);
    }
  } finally {
    busy.delete(key);
  }
}

async function worker(): Promise<void> {
  for (;;) await one();
}

await Promise.all([worker(), worker(), worker(), worker()]);
