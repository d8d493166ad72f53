// The ways `spillway serve` can be reached besides TCP: a UNIX socket (--socket), one
// connection on stdin/stdout (--stdio, as libnbd's nbd_connect_command runs it), and systemd
// socket activation (LISTEN_FDS/LISTEN_PID) from systemd-socket-activate and from libnbd.

import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { before, describe, it } from 'node:test';

import { cliArgv, inTempDir, makeFilledImage, makeImage, nbdshJson, patternBytes, readWithNbdsh, requireCommands } from '../helpers/nbd-tools.js';
import { freePort, run, startProc, startServe, waitForProc } from '../helpers/proc.js';

const MiB = 1024 * 1024;
/** A test that hangs (a server that never exits, a connection never accepted) fails instead. */
const BOUND = { timeout: 60_000 };

before(async () => {
  await requireCommands('nbdinfo', 'nbdcopy', 'nbdsh', 'systemd-socket-activate', 'cmp');
});

void describe('transports', () => {
  void it('--socket: nbdcopy and nbdinfo over a UNIX socket', BOUND, () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      const src = path.join(dir, 'src.img');
      await makeImage(img, 8 * MiB);
      await makeImage(src, 8 * MiB, [{ offset: 3 * MiB + 7, data: patternBytes(2 * MiB, 5) }]);
      const s = await startServe(img, [], { socket: path.join(dir, 'nbd.sock') });
      try {
        assert.match(s.uri, /^nbd\+unix:/);
        const info = JSON.parse((await run('nbdinfo', ['--json', s.uri])).stdout) as { exports: Array<{ 'export-size': number }> };
        assert.equal(info.exports[0]!['export-size'], 8 * MiB);
        await run('nbdcopy', [src, s.uri]);
      } finally {
        await s.stop();
      }
      await run('cmp', [src, img]);
    }));

  // libnbd's nbd_connect_command runs the server with a socketpair as its stdin and stdout, and
  // on close waits for it to exit: the script finishing means the server exited by itself.
  void it('--stdio: nbd_connect_command writes and reads, and the server exits when the client disconnects', BOUND, () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      const data = await makeFilledImage(img, 4 * MiB, 0x5d10);
      const write = patternBytes(30_000, 6); // the script is one argv string: keep it under 128 KiB
      const offset = 1 * MiB + 3;
      const got = await nbdshJson<{ size: number; readBack: string; before: string }>(
        [
          `h.connect_command(${JSON.stringify(cliArgv(['--stdio', img]))})`,
          'before = h.pread(4096, 0).hex()',
          `h.pwrite(bytes.fromhex(${JSON.stringify(write.toString('hex'))}), ${offset})`,
          'h.flush()',
          `r = {"size": h.get_size(), "before": before, "readBack": h.pread(${write.length}, ${offset}).hex()}`,
          'h.shutdown()',
          'del h',
          'print(json.dumps(r))',
        ].join('\n'),
      );
      assert.equal(got.size, 4 * MiB);
      assert.equal(got.before, data.subarray(0, 4096).toString('hex'));
      assert.equal(got.readBack, write.toString('hex'));
      const file = await readFile(img);
      assert.deepEqual(file.subarray(offset, offset + write.length), write);
    }));

  // systemd-socket-activate listens, and on the first connection execs the server with the
  // listening socket as fd 3, LISTEN_FDS=1 and LISTEN_PID set. Were they ignored, the server would
  // listen on its default port instead and the client's connection would never be accepted.
  void it('systemd socket activation (systemd-socket-activate, TCP)', BOUND, () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      const data = await makeFilledImage(img, 4 * MiB, 0x50c);
      const port = await freePort();
      const launcher = startProc('systemd-socket-activate', ['-l', `127.0.0.1:${port}`, '--', ...cliArgv([img])]);
      try {
        await waitForProc(launcher, { port });
        const uri = `nbd://127.0.0.1:${port}/`;
        assert.deepEqual(await readWithNbdsh(uri, 2 * MiB, 65536), data.subarray(2 * MiB, 2 * MiB + 65536));
        // The same server keeps accepting connections on the inherited socket.
        assert.deepEqual(await readWithNbdsh(uri, 0, 4096), data.subarray(0, 4096));
        assert.match(launcher.stderr(), /serving on sockets from systemd/);
      } finally {
        await launcher.stop();
      }
    }));

  // libnbd's `[ CMD ]` form (nbd_connect_systemd_socket_activation) passes a UNIX socket the same
  // way, then stops the server with SIGTERM when it is done.
  void it('socket activation from libnbd (nbdinfo [ CMD ], UNIX socket)', BOUND, () =>
    inTempDir(async (dir) => {
      const img = path.join(dir, 'disk.img');
      await makeImage(img, 6 * MiB);
      const r = await run('nbdinfo', ['--json', '--', '[', ...cliArgv([img]), ']']);
      const info = JSON.parse(r.stdout) as { exports: Array<{ 'export-size': number }> };
      assert.equal(info.exports[0]!['export-size'], 6 * MiB);
      assert.match(r.stderr, /serving on sockets from systemd/);
    }));
});
