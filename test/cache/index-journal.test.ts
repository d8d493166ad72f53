// Index journal: replay across generations, torn tails, empty logs left by a kill, snapshots.

import assert from 'node:assert/strict';
import { readdir, stat, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { IndexJournal } from '../../src/cache/index-journal.js';
import { REC, type IndexRecord } from '../../src/cache/records.js';
import { tempDir } from './helpers.js';

const zero = (index: number): IndexRecord => ({ type: REC.ZERO, vid: 1, index });
const unmap = (index: number): IndexRecord => ({ type: REC.UNMAP, vid: 1, index });

/** Replay `dir` into a set of zero chunks (ZERO adds, UNMAP removes). */
async function load(dir: string): Promise<{ journal: IndexJournal; zeros: Set<number>; torn: boolean }> {
  const zeros = new Set<number>();
  const { journal, report } = await IndexJournal.open(dir, (r) => {
    if (r.type === REC.ZERO) zeros.add(r.index);
    if (r.type === REC.UNMAP) zeros.delete(r.index);
  });
  return { journal, zeros, torn: report.tornTail };
}

const snapshotOf = (zeros: Set<number>): IndexRecord[] => [...zeros].map(zero);

void test('records survive reopen through logs and snapshots, in order', async (t) => {
  const dir = await tempDir(t);
  let { journal, zeros } = await load(dir);
  await journal.append([zero(1), zero(2), zero(3)]);
  await journal.append([unmap(2)], true);
  await journal.close(); // no snapshot: everything is in the log
  ({ journal, zeros } = await load(dir));
  assert.deepEqual([...zeros].sort(), [1, 3]);
  await journal.writeSnapshot(snapshotOf(zeros));
  await journal.append([zero(4), unmap(1)]);
  await journal.close();
  ({ journal, zeros } = await load(dir));
  assert.deepEqual([...zeros].sort(), [3, 4]);
  await journal.close();
});

void test('a log left empty by a kill is dropped without leaving a gap in the chain', async (t) => {
  const dir = await tempDir(t);
  let { journal, zeros } = await load(dir);
  await journal.append([zero(7)]);
  const gen = journal.generation;
  await journal.close();
  // killed right after creating the next log, before its header was written
  await writeFile(path.join(dir, `index.${String(gen + 1).padStart(8, '0')}.log`), '');
  ({ journal, zeros } = await load(dir));
  assert.deepEqual([...zeros], [7]);
  await journal.append([unmap(7)], true); // acknowledged: must be replayed by every later open
  await journal.close();
  for (let i = 0; i < 2; i++) {
    ({ journal, zeros } = await load(dir));
    assert.deepEqual([...zeros], [], `open ${i}: the acknowledged UNMAP was lost`);
    await journal.close();
  }
  const logs = (await readdir(dir)).filter((f) => f.endsWith('.log')).map((f) => Number(f.split('.')[1]));
  for (let i = 1; i < logs.length; i++) assert.equal(logs[i], (logs[i - 1] as number) + 1, `gap in ${logs.join(',')}`);
});

void test('a torn tail is cut at the last whole record and later appends replay', async (t) => {
  const dir = await tempDir(t);
  let { journal, zeros } = await load(dir);
  await journal.append([zero(1), zero(2), zero(3)]);
  const gen = journal.generation;
  await journal.close();
  const file = path.join(dir, `index.${String(gen).padStart(8, '0')}.log`);
  await truncate(file, (await stat(file)).size - 3); // zero(3) torn
  let torn: boolean;
  ({ journal, zeros, torn } = await load(dir));
  assert.equal(torn, true);
  assert.deepEqual([...zeros].sort(), [1, 2]);
  await journal.append([zero(9)]);
  await journal.close();
  ({ journal, zeros, torn } = await load(dir));
  assert.equal(torn, false, 'the tear was repaired');
  assert.deepEqual([...zeros].sort(), [1, 2, 9]);
  await journal.close();
});

void test('a snapshot that does not check out is not used, and nothing stale is replayed instead', async (t) => {
  const dir = await tempDir(t);
  let { journal, zeros } = await load(dir);
  await journal.append([zero(1), zero(2)]);
  await journal.writeSnapshot([zero(1), zero(2)]);
  await journal.append([unmap(1)]);
  await journal.writeSnapshot([zero(2)]);
  await journal.close();
  const snap = (await readdir(dir)).find((f) => f.endsWith('.snap')) as string;
  const p = path.join(dir, snap);
  const { readFile } = await import('node:fs/promises');
  const b = await readFile(p);
  b[20] = (b[20] as number) ^ 1; // bit rot inside a record
  await writeFile(p, b);
  ({ journal, zeros } = await load(dir));
  assert.deepEqual([...zeros], [], 'an unreadable snapshot empties the index rather than resurrecting chunk 1');
  await journal.append([zero(5)]);
  await journal.close();
  ({ journal, zeros } = await load(dir));
  assert.deepEqual([...zeros], [5]);
  await journal.close();
});
