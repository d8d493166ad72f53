// Invalid requests on purpose, from libnbd (nbdsh with strict mode off, so the client sends what
// it would normally refuse to) and, for what libnbd cannot send at all, from our raw client.
// Each test checks the NBD error the spec asks for (proto.md "Error values", quoted at each
// test), that nothing was written, and that the server still answers a normal read correctly
// on the same connection and on a new one.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import path from 'node:path';
import { before, describe, it } from 'node:test';

import { CMD, NBD_ERR } from '../../src/nbd/protocol.js';
import { NbdServer } from '../../src/nbd/server.js';
import {
  inTempDir,
  makeFilledImage,
  memoryDeviceWith,
  MinimumBlockDevice,
  nbdshJson,
  openClient,
  patternBytes,
  readWithNbdsh,
  requireCommands,
  withServer,
  type ServeOpts,
} from '../helpers/nbd-tools.js';

const SIZE = 1024 * 1024;
/** The range every test reads back at the end, on the same handle and on a new connection. */
const CHECK_OFFSET = 8192;
const CHECK_LENGTH = 4096;

before(async () => {
  await requireCommands('nbdsh');
});

interface ScriptResult {
  /** errno per probe (0 = success), as libnbd reports the server's NBD error */
  errors: Record<string, number>;
  /** CHECK range read on the same handle after the probes */
  after: string;
  /** sha256 of the whole export read after the probes */
  sha256: string;
}

/**
 * Run `probes` (Python lines that fill the dict `e` with errno_of(...) results) on one libnbd
 * handle in non-strict mode, then read the check range and hash the whole export.
 */
function probe(uri: string, probes: string[], opts: { meta?: boolean } = {}): Promise<ScriptResult> {
  const script = [
    'import hashlib',
    opts.meta ? 'h.add_meta_context("base:allocation")' : '',
    `h.connect_uri(${JSON.stringify(uri)})`,
    'h.set_strict_mode(0)',
    'e = {}',
    ...probes,
    `after = h.pread(${CHECK_LENGTH}, ${CHECK_OFFSET}).hex()`,
    'size = h.get_size()',
    'sha = hashlib.sha256(b"".join(h.pread(min(1 << 20, size - o), o) for o in range(0, size, 1 << 20))).hexdigest()',
    'h.shutdown()',
    'print(json.dumps({"errors": e, "after": after, "sha256": sha}))',
  ];
  return nbdshJson<ScriptResult>(script.join('\n'));
}

function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

/** The probes changed nothing, and the server still reads right on the same and a new connection. */
async function assertIntactAndServing(uri: string, r: ScriptResult, data: Buffer): Promise<void> {
  const expected = data.subarray(CHECK_OFFSET, CHECK_OFFSET + CHECK_LENGTH);
  assert.equal(r.after, expected.toString('hex'), 'read on the same connection after the errors');
  assert.equal(r.sha256, sha256(data), 'the export changed');
  assert.deepEqual(await readWithNbdsh(uri, CHECK_OFFSET, CHECK_LENGTH), expected, 'read on a new connection');
}

/** A fresh image filled with known data, served by `spillway serve`, for one test. */
function withImage(opts: ServeOpts, fn: (uri: string, data: Buffer) => Promise<void>): Promise<void> {
  return inTempDir(async (dir) => {
    const img = path.join(dir, 'disk.img');
    const data = await makeFilledImage(img, SIZE, 0xe77);
    await withServer(img, opts, (s) => fn(s.uri, data));
  });
}

const { EINVAL, ENOSPC, EPERM } = NBD_ERR;
const flagBit = (n: number) => `1 << ${n}`;

void describe('error replies (nbdsh, strict mode off)', () => {
  // proto.md "Error values": "It SHOULD return NBD_EINVAL if it receives a read or trim request
  // including one or more sectors beyond the size of the device".
  void it('read past the end → EINVAL', () =>
    withImage({}, async (uri, data) => {
      const r = await probe(uri, [
        `e["straddling"] = errno_of(h.pread, 512, ${SIZE - 256})`,
        `e["at_end"] = errno_of(h.pread, 1, ${SIZE})`,
        `e["far"] = errno_of(h.pread, 512, 1 << 62)`,
      ]);
      assert.deepEqual(r.errors, { straddling: EINVAL, at_end: EINVAL, far: EINVAL });
      await assertIntactAndServing(uri, r, data);
    }));

  // proto.md "Error values": "The server SHOULD return NBD_ENOSPC if it receives a write request
  // including one or more sectors beyond the size of the device." Nothing may be written, not
  // even the part that would have fit.
  void it('write past the end → ENOSPC, and nothing is written', () =>
    withImage({}, async (uri, data) => {
      const r = await probe(uri, [`e["straddling"] = errno_of(h.pwrite, b"x" * 512, ${SIZE - 256})`, `e["far"] = errno_of(h.pwrite, b"x" * 512, 1 << 62)`]);
      assert.deepEqual(r.errors, { straddling: ENOSPC, far: ENOSPC });
      await assertIntactAndServing(uri, r, data);
    }));

  // Trim: EINVAL ("Error values", as for reads). Write zeroes: ENOSPC (proto.md
  // "NBD_CMD_WRITE_ZEROES": "SHOULD return NBD_ENOSPC if it receives a write zeroes request
  // including one or more sectors beyond the size of the device").
  void it('trim past the end → EINVAL, write-zeroes past the end → ENOSPC, and nothing is zeroed', () =>
    withImage({}, async (uri, data) => {
      const r = await probe(uri, [`e["trim"] = errno_of(h.trim, 512, ${SIZE - 256})`, `e["zero"] = errno_of(h.zero, 512, ${SIZE - 256})`, `e["cache"] = errno_of(h.cache, 512, ${SIZE - 256})`]);
      assert.deepEqual(r.errors, { trim: EINVAL, zero: ENOSPC, cache: EINVAL });
      await assertIntactAndServing(uri, r, data);
    }));

  // proto.md "Size constraints": "The server SHOULD report an NBD_EINVAL error if the client's
  // request is not aligned to advertised minimum block size boundaries". A file image is byte
  // granular (minimum 1) and `spillway serve` has no option to raise it, so this one runs our
  // NbdServer in-process over an export that advertises 512, served on a UNIX socket.
  void it('misaligned requests on an export with a 512-byte minimum block → EINVAL', () =>
    inTempDir(async (dir) => {
      const data = patternBytes(SIZE, 0xa11);
      const server = new NbdServer({ exports: [{ name: '', device: new MinimumBlockDevice(await memoryDeviceWith(data), 512) }] });
      const sock = path.join(dir, 'nbd.sock');
      await server.listen({ path: sock });
      const uri = `nbd+unix:///?socket=${sock}`;
      try {
        const info = await nbdshJson<number>(`h.connect_uri(${JSON.stringify(uri)})\nprint(h.get_block_size(nbd.SIZE_MINIMUM))`);
        assert.equal(info, 512, 'the export must advertise a 512-byte minimum');
        const r = await probe(uri, [
          'e["read_offset"] = errno_of(h.pread, 512, 100)',
          'e["read_length"] = errno_of(h.pread, 100, 0)',
          'e["write_offset"] = errno_of(h.pwrite, b"x" * 512, 1)',
          'e["write_length"] = errno_of(h.pwrite, b"x" * 100, 512)',
          'e["trim"] = errno_of(h.trim, 512, 256)',
          'e["zero"] = errno_of(h.zero, 256, 512)',
          'e["aligned_read"] = errno_of(h.pread, 1024, 512)',
        ]);
        assert.deepEqual(r.errors, { read_offset: EINVAL, read_length: EINVAL, write_offset: EINVAL, write_length: EINVAL, trim: EINVAL, zero: EINVAL, aligned_read: 0 });
        await assertIntactAndServing(uri, r, data);
      } finally {
        await server.close(1000);
      }
    }));

  // The spec does not define zero-length requests except that a server "SHOULD NOT disconnect"
  // on a zero-length NBD_CMD_BLOCK_STATUS (proto.md "NBD_CMD_BLOCK_STATUS"). Ours: zero-length
  // READ/WRITE/TRIM/WRITE_ZEROES/CACHE are successful no-ops; BLOCK_STATUS must describe at
  // least one byte ("the server MUST return at least one status descriptor"), so it is EINVAL.
  void it('zero-length read, write, trim, write-zeroes and cache succeed without effect; zero-length block status → EINVAL', () =>
    withImage({}, async (uri, data) => {
      const r = await probe(
        uri,
        [
          'e["read"] = errno_of(h.pread, 0, 4096)',
          'e["write"] = errno_of(h.pwrite, b"", 4096)',
          'e["trim"] = errno_of(h.trim, 0, 4096)',
          'e["zero"] = errno_of(h.zero, 0, 4096)',
          'e["cache"] = errno_of(h.cache, 0, 4096)',
          'e["block_status"] = errno_of(h.block_status, 0, 4096, lambda *a: 0)',
        ],
        { meta: true },
      );
      assert.deepEqual(r.errors, { read: 0, write: 0, trim: 0, zero: 0, cache: 0, block_status: EINVAL });
      await assertIntactAndServing(uri, r, data);
    }));

  // proto.md "Error values": "The server SHOULD return NBD_EINVAL if it receives an unknown
  // command flag. It also SHOULD return NBD_EINVAL if it receives a request with a flag not
  // explicitly documented as applicable to the given request."
  void it('unknown command flags, and flags that do not apply to the command → EINVAL', () =>
    withImage({}, async (uri, data) => {
      const r = await probe(
        uri,
        [
          `e["read_unknown"] = errno_of(h.pread, 512, 0, flags=${flagBit(7)})`,
          `e["read_top_bit"] = errno_of(h.pread, 512, 0, flags=${flagBit(15)})`,
          'e["read_req_one"] = errno_of(h.pread, 512, 0, flags=nbd.CMD_FLAG_REQ_ONE)',
          `e["write_unknown"] = errno_of(h.pwrite, b"x" * 512, ${CHECK_OFFSET}, flags=${flagBit(9)})`,
          `e["write_no_hole"] = errno_of(h.pwrite, b"x" * 512, ${CHECK_OFFSET}, flags=nbd.CMD_FLAG_NO_HOLE)`,
          `e["trim_fast_zero"] = errno_of(h.trim, 512, ${CHECK_OFFSET}, flags=nbd.CMD_FLAG_FAST_ZERO)`,
          `e["flush_df"] = errno_of(h.flush, flags=nbd.CMD_FLAG_DF)`,
          `e["block_status_no_hole"] = errno_of(h.block_status, 512, 0, lambda *a: 0, flags=nbd.CMD_FLAG_NO_HOLE)`,
        ],
        { meta: true },
      );
      assert.deepEqual(r.errors, {
        read_unknown: EINVAL,
        read_top_bit: EINVAL,
        read_req_one: EINVAL,
        write_unknown: EINVAL,
        write_no_hole: EINVAL,
        trim_fast_zero: EINVAL,
        flush_df: EINVAL,
        block_status_no_hole: EINVAL,
      });
      await assertIntactAndServing(uri, r, data);
    }));

  // proto.md "Error values": "SHOULD return NBD_EPERM if it receives a write or trim request on
  // a read-only export"; "NBD_CMD_WRITE_ZEROES": "SHOULD return NBD_EPERM if it receives a
  // write zeroes request on a read-only export".
  void it('write, trim and write-zeroes on a --readonly export → EPERM', () =>
    withImage({ readonly: true }, async (uri, data) => {
      const r = await probe(uri, [
        `e["write"] = errno_of(h.pwrite, b"x" * 512, ${CHECK_OFFSET})`,
        `e["trim"] = errno_of(h.trim, 512, ${CHECK_OFFSET})`,
        `e["zero"] = errno_of(h.zero, 512, ${CHECK_OFFSET})`,
        'e["flush"] = errno_of(h.flush)',
      ]);
      assert.deepEqual(r.errors, { write: EPERM, trim: EPERM, zero: EPERM, flush: 0 });
      await assertIntactAndServing(uri, r, data);
    }));
});

void describe('error replies (raw client: what libnbd cannot send)', () => {
  // proto.md "Error values": "The server SHOULD return NBD_EINVAL if it receives an unknown
  // command." NBD_CMD_RESIZE (8) was never negotiated, so it is unknown here too.
  void it('unknown command types → EINVAL, and the connection keeps working', () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      const data = await makeFilledImage(img, SIZE, 0xc0de);
      await withServer(img, {}, async (s) => {
        for (const structured of [false, true]) {
          const { c } = await openClient(s, { structured });
          try {
            const errors = [];
            for (const type of [CMD.BLOCK_STATUS + 1, 42, 0xffff]) errors.push((await c.command(type, 0, 512)).error);
            assert.deepEqual(errors, [EINVAL, EINVAL, EINVAL], `structured=${structured}`);
            assert.deepEqual(await c.read(CHECK_OFFSET, CHECK_LENGTH), data.subarray(CHECK_OFFSET, CHECK_OFFSET + CHECK_LENGTH));
            await c.disconnect();
          } finally {
            c.destroy();
          }
        }
        assert.deepEqual(await readWithNbdsh(s.uri, CHECK_OFFSET, CHECK_LENGTH), data.subarray(CHECK_OFFSET, CHECK_OFFSET + CHECK_LENGTH));
      });
    }));
});
