// `spillway serve` against real NBD clients nobody here wrote: nbdinfo, nbdcopy (also with four
// connections), qemu-img and qemu-io. Each test has its own image and server; contents are
// checked through another client and on the image file itself.
//
//   node --import tsx --test test/nbd/interop.test.ts     (after npm run build)
//   SPILLWAY_NBD_REFERENCE=qemu-nbd ...                      runs the same tests against qemu-nbd

import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { before, describe, it } from 'node:test';

import { inTempDir, makeFilledImage, makeImage, nbdshJson, patternBytes, requireCommands, withServer } from '../helpers/nbd-tools.js';
import { run, startServe } from '../helpers/proc.js';

const MiB = 1024 * 1024;
const KiB = 1024;

before(async () => {
  await requireCommands('nbdinfo', 'nbdcopy', 'nbdsh', 'qemu-img', 'qemu-io', 'cmp');
});

interface NbdinfoExport {
  'export-name': string;
  'export-size': number;
  is_read_only: boolean;
  is_rotational: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_trim: boolean;
  can_zero: boolean;
  can_fast_zero: boolean;
  can_cache: boolean;
  can_df: boolean;
  can_multi_conn: boolean;
  block_size_minimum: number;
  block_size_preferred: number;
  block_size_maximum: number;
  contexts: string[];
}
interface NbdinfoJson {
  protocol: string;
  TLS: boolean;
  structured: boolean;
  exports: NbdinfoExport[];
}

async function nbdinfoJson(uri: string, extra: string[] = []): Promise<NbdinfoJson> {
  return JSON.parse((await run('nbdinfo', ['--json', ...extra, uri])).stdout) as NbdinfoJson;
}

/** qemu-io on an NBD URI; exits non-zero (so run() rejects) when a -P pattern check fails. */
async function qemuIo(uri: string, commands: string[]): Promise<string> {
  const r = await run('qemu-io', ['-f', 'raw', uri, ...commands.flatMap((c) => ['-c', c])]);
  assert.doesNotMatch(r.stdout + r.stderr, /verification failed|error|failed/i, r.stdout + r.stderr);
  return r.stdout;
}

/** Same bytes, without dumping megabytes into the failure message. */
function assertSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  const at = actual.findIndex((b, i) => b !== expected[i]);
  assert.equal(at, -1, `${what}: first difference at byte ${at}`);
}

type Run = { kind: 'data' | 'zero'; start: number; end: number };
/** Merge adjacent runs of the same kind, so maps from different tools compare. */
function normalize(runs: Run[]): Run[] {
  const out: Run[] = [];
  for (const r of runs) {
    const last = out.at(-1);
    if (last && last.kind === r.kind && last.end === r.start) last.end = r.end;
    else out.push({ ...r });
  }
  return out;
}

// ------------------------------------------------------------------------------------ nbdinfo

void describe('nbdinfo', () => {
  void it('shows the protocol and the export size', () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      await makeImage(img, 16 * MiB);
      await withServer(img, {}, async (s) => {
        const out = (await run('nbdinfo', [s.uri])).stdout;
        assert.match(out, /protocol: newstyle-fixed without TLS, using structured packets/);
        assert.match(out, /export-size: 16777216 \(16M\)/);
      });
    }));

  void it('--json: size, capabilities and block sizes of a writable export', () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      await makeImage(img, 16 * MiB);
      await withServer(img, {}, async (s) => {
        const info = await nbdinfoJson(s.uri);
        assert.equal(info.protocol, 'newstyle-fixed');
        assert.equal(info.TLS, false);
        assert.equal(info.structured, true);
        const e = info.exports[0]!;
        assert.equal(e['export-size'], 16 * MiB);
        assert.deepEqual(e.contexts, ['base:allocation']);
        const caps = {
          is_read_only: e.is_read_only,
          can_flush: e.can_flush,
          can_fua: e.can_fua,
          can_trim: e.can_trim,
          can_zero: e.can_zero,
          can_fast_zero: e.can_fast_zero,
          can_cache: e.can_cache,
          can_df: e.can_df,
          can_multi_conn: e.can_multi_conn,
        };
        assert.deepEqual(caps, {
          is_read_only: false,
          can_flush: true,
          can_fua: true,
          can_trim: true,
          can_zero: true,
          can_fast_zero: true,
          can_cache: true,
          can_df: true,
          can_multi_conn: true,
        });
        // proto.md "Size constraints": minimum 1 for a regular file, preferred a power of two
        // >= max(512, minimum), maximum >= preferred; we advertise the spec's 32 MiB default.
        assert.deepEqual([e.block_size_minimum, e.block_size_preferred, e.block_size_maximum], [1, 4096, 32 * MiB]);
      });
    }));

  void it('--json: a --readonly export is read-only and offers no write commands', () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      await makeImage(img, 16 * MiB);
      await withServer(img, { readonly: true }, async (s) => {
        const e = (await nbdinfoJson(s.uri)).exports[0]!;
        assert.deepEqual(
          { is_read_only: e.is_read_only, can_trim: e.can_trim, can_zero: e.can_zero, can_fua: e.can_fua, can_fast_zero: e.can_fast_zero },
          { is_read_only: true, can_trim: false, can_zero: false, can_fua: false, can_fast_zero: false },
        );
      });
    }));

  void it('--map reports the holes and data of a sparse image, as qemu-img map does', () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'sparse.img');
      const size = 16 * MiB;
      const data = [
        { offset: 1 * MiB, data: patternBytes(64 * KiB, 1) },
        { offset: 8 * MiB, data: patternBytes(192 * KiB, 2) },
        { offset: size - 4 * KiB, data: patternBytes(4 * KiB, 3) },
      ];
      await makeImage(img, size, data);
      const made: Run[] = [];
      let pos = 0;
      for (const d of data) {
        if (d.offset > pos) made.push({ kind: 'zero', start: pos, end: d.offset });
        made.push({ kind: 'data', start: d.offset, end: d.offset + d.data.length });
        pos = d.offset + d.data.length;
      }
      if (pos < size) made.push({ kind: 'zero', start: pos, end: size });

      // qemu-img reads the file's own allocation (before our server locks the file).
      const qemu = JSON.parse((await run('qemu-img', ['map', '--output=json', '-f', 'raw', img])).stdout) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
      const qemuRuns = normalize(qemu.map((m) => ({ kind: m.zero ? 'zero' : 'data', start: m.start, end: m.start + m.length })));
      assert.deepEqual(qemuRuns, normalize(made), 'qemu-img map disagrees with the layout written (file system without SEEK_HOLE?)');

      await withServer(img, {}, async (s) => {
        const map = JSON.parse((await run('nbdinfo', ['--map', '--json', s.uri])).stdout) as Array<{ offset: number; length: number; type: number }>;
        // base:allocation: bit 0 = hole, bit 1 = reads as zero (proto.md "base:allocation").
        const ours = normalize(map.map((m) => ({ kind: (m.type & 2) !== 0 ? 'zero' : 'data', start: m.offset, end: m.offset + m.length })));
        assert.deepEqual(ours, normalize(made));
        assert.ok(map.filter((m) => (m.type & 2) !== 0).every((m) => (m.type & 1) !== 0), 'the zero runs of a sparse file are holes');
      });
    }));

  void it('--list shows every export of `serve a=IMG1 b=IMG2`', () =>
    inTempDir(async (dir) => {
      const a = path.join(dir, 'a.img');
      const b = path.join(dir, 'b.img');
      await makeImage(a, 4 * MiB);
      await makeImage(b, 8 * MiB);
      const s = await startServe(`a=${a}`, [`b=${b}`]);
      try {
        const info = await nbdinfoJson(s.uri, ['--list']);
        const exports = info.exports.map((e) => [e['export-name'], e['export-size']]).sort();
        assert.deepEqual(exports, [
          ['a', 4 * MiB],
          ['b', 8 * MiB],
        ]);
      } finally {
        await s.stop();
      }
    }));
});

// ------------------------------------------------------------------------------------ nbdcopy

/** A sparse source with data at a few places, and a server image full of other data. */
async function copyFixture(dir: string): Promise<{ src: string; img: string; size: number }> {
  const size = 32 * MiB;
  const src = path.join(dir, 'src.img');
  const img = path.join(dir, 'served.img');
  await makeImage(src, size, [
    { offset: 0, data: patternBytes(1 * MiB, 10) },
    { offset: 5 * MiB + 123, data: patternBytes(3 * MiB, 11) },
    { offset: size - 512 * KiB, data: patternBytes(512 * KiB, 12) },
  ]);
  await makeFilledImage(img, size, 13);
  return { src, img, size };
}

void describe('nbdcopy', () => {
  void it('copies a file to the server: the served image becomes byte-identical (holes included)', () =>
    inTempDir(async (dir) => {
      const { src, img } = await copyFixture(dir);
      await withServer(img, {}, async (s) => {
        await run('nbdcopy', [src, s.uri]);
      });
      await run('cmp', [src, img]);
    }));

  void it('copies from the server to a file: byte-identical', () =>
    inTempDir(async (dir) => {
      const { img } = await copyFixture(dir);
      const out = path.join(dir, 'out.img');
      await withServer(img, {}, async (s) => {
        await run('nbdcopy', [s.uri, out]);
      });
      await run('cmp', [img, out]);
    }));

  void it('--connections=4 (multi-conn) both ways: byte-identical', () =>
    inTempDir(async (dir) => {
      const { src, img } = await copyFixture(dir);
      const out = path.join(dir, 'out.img');
      await withServer(img, {}, async (s) => {
        await run('nbdcopy', ['--connections=4', '--requests=16', src, s.uri]);
        await run('nbdcopy', ['--connections=4', '--requests=16', s.uri, out]);
      });
      await run('cmp', [src, img]);
      await run('cmp', [src, out]);
    }));
});

// ----------------------------------------------------------------------------------- qemu-img

void describe('qemu-img', () => {
  void it('convert nbd → file, then compare', () =>
    inTempDir(async (dir) => {
      const { img } = await copyFixture(dir);
      const out = path.join(dir, 'out.img');
      await withServer(img, {}, async (s) => {
        await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', s.uri, out]);
        await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', out, s.uri]);
      });
      await run('cmp', [img, out]);
    }));

  void it('convert file → nbd, then compare', () =>
    inTempDir(async (dir) => {
      const { src, img } = await copyFixture(dir);
      await withServer(img, {}, async (s) => {
        await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, s.uri]);
        await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, s.uri]);
      });
      await run('cmp', [src, img]);
    }));
});

// ------------------------------------------------------------------------------------ qemu-io

void describe('qemu-io', () => {
  void it('write, FUA write and unaligned write read back with -P, on the same and a new connection, and land in the file', () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      await makeImage(img, 8 * MiB);
      const writes = ['write -P 0xa1 0 64k', 'write -f -P 0xb2 1M 128k', 'write -P 0xc3 4097 3000', 'write -f -P 0xd4 8388096 512'];
      const reads = ['read -P 0xa1 0 4097', 'read -P 0xa1 7097 58439', 'read -P 0xb2 1M 128k', 'read -P 0xc3 4097 3000', 'read -P 0xd4 8388096 512', 'read -P 0 64k 4k'];
      await withServer(img, {}, async (s) => {
        await qemuIo(s.uri, [...writes, ...reads]);
        await qemuIo(s.uri, reads);
      });
      const file = await readFile(img);
      assertSameBytes(file.subarray(0, 4097), Buffer.alloc(4097, 0xa1), 'file at 0');
      assertSameBytes(file.subarray(4097, 7097), Buffer.alloc(3000, 0xc3), 'file at 4097');
      assertSameBytes(file.subarray(7097, 64 * KiB), Buffer.alloc(64 * KiB - 7097, 0xa1), 'file after 7097');
      assertSameBytes(file.subarray(1 * MiB, 1 * MiB + 128 * KiB), Buffer.alloc(128 * KiB, 0xb2), 'file at 1M');
      assertSameBytes(file.subarray(8 * MiB - 512), Buffer.alloc(512, 0xd4), 'file tail');
    }));

  void it('discard and write-zeroes (with and without unmap) read back as zeroes; neighbours untouched', () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      const size = 4 * MiB;
      const before = await makeFilledImage(img, size, 21);
      const zeroed = [
        [64 * KiB, 64 * KiB],
        [256 * KiB, 64 * KiB],
        [512 * KiB + 100, 5000],
      ] as const;
      await withServer(img, {}, async (s) => {
        await qemuIo(s.uri, [`discard ${zeroed[0][0]} ${zeroed[0][1]}`, `write -z ${zeroed[1][0]} ${zeroed[1][1]}`, `write -z -u ${zeroed[2][0]} ${zeroed[2][1]}`]);
        await qemuIo(
          s.uri,
          zeroed.map(([o, l]) => `read -P 0 ${o} ${l}`),
        );
      });
      const expected = Buffer.from(before);
      for (const [o, l] of zeroed) expected.fill(0, o, o + l);
      assertSameBytes(await readFile(img), expected, 'image file');
    }));

  void it('aio_write pipelines: every in-flight write lands where it was aimed', () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      await makeImage(img, 8 * MiB);
      const n = 32;
      const at = (i: number) => i * 192 * KiB + (i % 3) * 512; // spread out, some unaligned to 4k
      const pattern = (i: number) => `0x${(0x40 + i).toString(16)}`;
      await withServer(img, {}, async (s) => {
        await qemuIo(s.uri, [...Array.from({ length: n }, (_, i) => `aio_write -P ${pattern(i)} ${at(i)} 64k`), 'aio_flush']);
        await qemuIo(
          s.uri,
          Array.from({ length: n }, (_, i) => `read -P ${pattern(i)} ${at(i)} 64k`),
        );
      });
      const file = await readFile(img);
      for (let i = 0; i < n; i++) assertSameBytes(file.subarray(at(i), at(i) + 64 * KiB), Buffer.alloc(64 * KiB, 0x40 + i), `write ${i}`);
    }));
});

// ------------------------------------------------------------------- older negotiation paths

/**
 * libnbd (nbdsh) with `setup` applied before connecting: write then read back 5000 bytes at an
 * odd offset, and report what was negotiated.
 */
async function libnbdRoundTrip(uri: string, setup: string): Promise<{ protocol: string; structured: boolean; size: number; readBack: string }> {
  return nbdshJson(
    [
      setup,
      `h.connect_uri(${JSON.stringify(uri)})`,
      'h.pwrite(b"q" * 5000, 12345)',
      'r = {"protocol": h.get_protocol(), "structured": h.get_structured_replies_negotiated(), "size": h.get_size(), "readBack": h.pread(5002, 12344).hex()}',
      'h.shutdown()',
      'print(json.dumps(r))',
    ].join('\n'),
  );
}

void describe('libnbd negotiation variants', () => {
  // proto.md "Newstyle negotiation": without NBD_FLAG_C_FIXED_NEWSTYLE the only option is
  // NBD_OPT_EXPORT_NAME, and without NBD_FLAG_C_NO_ZEROES its reply ends with 124 zero bytes.
  void it('a plain newstyle client (no fixed newstyle, no NO_ZEROES) reads and writes via NBD_OPT_EXPORT_NAME', () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      const data = await makeFilledImage(img, 2 * MiB, 31);
      await withServer(img, {}, async (s) => {
        const r = await libnbdRoundTrip(s.uri, 'h.set_handshake_flags(0)');
        assert.deepEqual([r.protocol, r.structured, r.size], ['newstyle', false, 2 * MiB]);
        assert.equal(r.readBack, Buffer.concat([data.subarray(12344, 12345), Buffer.alloc(5000, 'q'), data.subarray(17345, 17346)]).toString('hex'));
      });
    }));

  void it('a client that does not ask for structured replies gets simple replies', () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      const data = await makeFilledImage(img, 2 * MiB, 32);
      await withServer(img, {}, async (s) => {
        const r = await libnbdRoundTrip(s.uri, 'h.set_request_structured_replies(False)');
        assert.deepEqual([r.protocol, r.structured, r.size], ['newstyle-fixed', false, 2 * MiB]);
        assert.equal(r.readBack, Buffer.concat([data.subarray(12344, 12345), Buffer.alloc(5000, 'q'), data.subarray(17345, 17346)]).toString('hex'));
      });
    }));
});
