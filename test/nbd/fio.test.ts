// fio's built-in NBD engine (libnbd) against `spillway serve`: random writes with crc32c verify
// headers, read back and checked in the same job, then checked again by a verify-only run on
// new connections; and several jobs at once, each on its own connection and region.
// fio exits non-zero when a block fails its checksum (verify_fatal); the JSON report shows the
// work was really done.

import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { before, describe, it } from 'node:test';

import { inTempDir, makeImage, requireCommands, withServer } from '../helpers/nbd-tools.js';
import { run } from '../helpers/proc.js';

const MiB = 1024 * 1024;

before(async () => {
  await requireCommands('fio');
});

interface FioJob {
  jobname: string;
  error: number;
  write: { io_bytes: number };
  read: { io_bytes: number };
}

/** Run fio in `dir` (it leaves verify state files in its working directory). */
async function fio(dir: string, uri: string, args: string[]): Promise<FioJob[]> {
  const out = path.join(dir, `fio-${Date.now()}-${Math.random().toString(16).slice(2)}.json`);
  await run('fio', ['--ioengine=nbd', `--uri=${uri}`, '--output-format=json', `--output=${out}`, ...args], { cwd: dir });
  return (JSON.parse(await readFile(out, 'utf8')) as { jobs: FioJob[] }).jobs;
}

void describe('fio ioengine=nbd', () => {
  void it('randwrite with verify=crc32c reads back every block, on the same and on new connections', () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      await makeImage(img, 32 * MiB);
      const job = ['--name=randwrite', '--rw=randwrite', '--bs=4k', '--iodepth=16', '--size=16M', '--verify=crc32c', '--verify_fatal=1', '--randseed=1234'];
      await withServer(img, {}, async (s) => {
        const [written] = await fio(dir, s.uri, [...job, '--do_verify=1']);
        assert.deepEqual([written!.error, written!.write.io_bytes, written!.read.io_bytes], [0, 16 * MiB, 16 * MiB]);
        const [verified] = await fio(dir, s.uri, [...job, '--verify_only']);
        assert.deepEqual([verified!.error, verified!.read.io_bytes], [0, 16 * MiB]);
      });
    }));

  void it('four jobs at once (one connection each, mixed block sizes) verify their own regions', () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      await makeImage(img, 32 * MiB);
      await withServer(img, {}, async (s) => {
        const jobs = await fio(dir, s.uri, [
          '--name=multi',
          '--numjobs=4',
          '--rw=randwrite',
          '--bsrange=512-64k',
          '--bs_unaligned=0',
          '--iodepth=8',
          '--size=4M',
          '--offset_increment=4M',
          '--verify=crc32c',
          '--do_verify=1',
          '--verify_fatal=1',
        ]);
        assert.equal(jobs.length, 4);
        for (const j of jobs) {
          assert.equal(j.error, 0);
          assert.ok(j.write.io_bytes >= 4 * MiB && j.read.io_bytes >= 4 * MiB, `${j.jobname}: wrote ${j.write.io_bytes}, verified ${j.read.io_bytes}`);
        }
      });
    }));
});
