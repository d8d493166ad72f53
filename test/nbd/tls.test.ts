// `spillway serve --tls-cert --tls-key --tls-ca` (FORCEDTLS with client certificates) against
// libnbd (gnutls) and QEMU: a client with a certificate from our CA works; one without a
// certificate, one with a certificate from another CA, and one that does not start TLS at all
// are refused, the last with NBD_REP_ERR_TLS_REQD and no export data (proto.md "FORCEDTLS mode").

import assert from 'node:assert/strict';
import { copyFile, mkdir, readFile } from 'node:fs/promises';
import type net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';

import { encodeGoInfo, encodeOption } from '../../src/nbd/codec.js';
import { FLAG_FIXED_NEWSTYLE, INFO, OPT, REP, REP_ERR_ } from '../../src/nbd/protocol.js';
import { closed, connectTcp, inTempDir, makeFilledImage, makeImage, patternBytes, RawNbdClient, requireCommands } from '../helpers/nbd-tools.js';
import { makeTestPki, type TestPki } from '../helpers/pki.js';
import { run, startServe, tempDir, type Served } from '../helpers/proc.js';

const MiB = 1024 * 1024;

let pki: TestPki;
/** Client credential directories in the layout gnutls (libnbd) and QEMU read. */
let goodDir: string;
let noCertDir: string;
let rogueDir: string;
let cleanupPki: () => Promise<void>;

/** ca-cert.pem (to verify the server), and optionally client-cert.pem + client-key.pem. */
async function clientDir(name: string, cert?: { cert: string; key: string }): Promise<string> {
  const dir = path.join(pki.dir, name);
  await mkdir(dir);
  await copyFile(pki.caCert, path.join(dir, 'ca-cert.pem'));
  if (cert) {
    await copyFile(cert.cert, path.join(dir, 'client-cert.pem'));
    await copyFile(cert.key, path.join(dir, 'client-key.pem'));
  }
  return dir;
}

before(async () => {
  await requireCommands('openssl', 'nbdinfo', 'nbdcopy', 'qemu-img', 'cmp');
  const t = await tempDir('spw-tls-pki-');
  cleanupPki = t.cleanup;
  pki = await makeTestPki(t.dir);
  goodDir = await clientDir('good', { cert: pki.clientCert, key: pki.clientKey });
  noCertDir = await clientDir('nocert');
  rogueDir = await clientDir('rogue', { cert: pki.rogueCert, key: pki.rogueKey });
});

after(async () => {
  await cleanupPki();
});

/** A TLS-only server on a fresh image for one test. */
async function withTlsServer(fn: (s: Served, img: string, dir: string) => Promise<void>): Promise<void> {
  await inTempDir(async (dir) => {
    const img = path.join(dir, 'disk.img');
    await makeFilledImage(img, 8 * MiB, 0x71);
    const s = await startServe(img, ['--tls-cert', pki.serverCert, '--tls-key', pki.serverKey, '--tls-ca', pki.caCert]);
    try {
      await fn(s, img, dir);
    } finally {
      await s.stop();
    }
  });
}

/** Wait (bounded) for something a process reports asynchronously, such as a log line. */
async function waitFor(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 200 && !cond(); i++) await new Promise((r) => setTimeout(r, 50));
  assert.ok(cond(), `timed out waiting for ${what}`);
}

function tlsUri(s: Served, certDir: string): string {
  return `nbds://127.0.0.1:${s.port}/?tls-certificates=${certDir}`;
}

/** nbdinfo with `certDir` must fail, and must not have learnt the export's size. */
async function assertRefused(s: Served, certDir: string): Promise<void> {
  const r = await run('nbdinfo', ['--json', tlsUri(s, certDir)], { allowFail: true });
  assert.notEqual(r.code, 0, `nbdinfo with ${path.basename(certDir)} credentials was let in:\n${r.stdout}`);
  assert.doesNotMatch(r.stdout, /export-size/);
  // ... and the server is still there for a client with the right certificate.
  const ok = JSON.parse((await run('nbdinfo', ['--json', tlsUri(s, goodDir)])).stdout) as { TLS: boolean };
  assert.equal(ok.TLS, true);
}

void describe('TLS (FORCEDTLS, client certificates)', () => {
  void it('nbdinfo with a certificate from our CA negotiates TLS and sees the export', () =>
    withTlsServer(async (s) => {
      const info = JSON.parse((await run('nbdinfo', ['--json', tlsUri(s, goodDir)])).stdout) as { TLS: boolean; exports: Array<{ 'export-size': number }> };
      assert.equal(info.TLS, true);
      assert.equal(info.exports[0]!['export-size'], 8 * MiB);
    }));

  void it('nbdcopy over TLS, both directions: byte-identical', () =>
    withTlsServer(async (s, img, dir) => {
      const src = path.join(dir, 'src.img');
      const out = path.join(dir, 'out.img');
      await makeImage(src, 8 * MiB, [
        { offset: 12345, data: patternBytes(1 * MiB, 1) },
        { offset: 6 * MiB, data: patternBytes(2 * MiB, 2) },
      ]);
      await run('nbdcopy', [src, tlsUri(s, goodDir)]);
      await run('nbdcopy', [tlsUri(s, goodDir), out]);
      await run('cmp', [src, img]);
      await run('cmp', [src, out]);
    }));

  void it('qemu-img with tls-creds-x509 reads the export over TLS', () =>
    withTlsServer(async (s, img, dir) => {
      const out = path.join(dir, 'out.img');
      const creds = ['--object', `tls-creds-x509,id=tls0,dir=${goodDir},endpoint=client`];
      const nbd = `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${s.port},tls-creds=tls0`;
      await run('qemu-img', ['convert', ...creds, '--image-opts', nbd, '-O', 'raw', out]);
      await run('cmp', [img, out]);
    }));

  void it('a client without a certificate is refused', () => withTlsServer((s) => assertRefused(s, noCertDir)));

  void it('a client with a certificate from another CA is refused', () => withTlsServer((s) => assertRefused(s, rogueDir)));

  // gnutls (libnbd, QEMU) does not even send a certificate the server's CA list does not name,
  // so the case above is refused as "no certificate". A client that sends it anyway completes
  // the TLS 1.3 handshake and must then be cut off before any option is answered.
  void it('a client that presents a certificate from another CA anyway is cut off after the handshake', () =>
    withTlsServer(async (s) => {
      const c = new RawNbdClient(await connectTcp(s.port!));
      try {
        await c.handshake();
        assert.equal((await c.option(OPT.STARTTLS)).at(-1)!.type, REP.ACK);
        const { stream, buffered } = await c.takeStream();
        assert.equal(buffered.length, 0);
        const secure = tls.connect({
          socket: stream as net.Socket,
          ca: await readFile(pki.caCert),
          cert: await readFile(pki.rogueCert),
          key: await readFile(pki.rogueKey),
          servername: 'localhost',
        });
        const t = new RawNbdClient(secure);
        t.sendOption(OPT.GO, encodeGoInfo({ name: '', infos: [] }));
        await assert.rejects(t.readOptionReply(), /closed|connection/);
        await closed(secure);
        await waitFor(() => /client certificate refused/.test(s.stderr()), 'the server to log why it refused the client');
      } finally {
        c.destroy();
      }
    }));

  // proto.md "FORCEDTLS mode": the server "MUST reply to any option apart from NBD_OPT_STARTTLS
  // or NBD_OPT_ABORT with NBD_REP_ERR_TLS_REQD", and NBD_OPT_EXPORT_NAME (which cannot return an
  // error) ends the session.
  void it('a plain client gets NBD_REP_ERR_TLS_REQD for every option and no export data', () =>
    withTlsServer(async (s) => {
      const c = new RawNbdClient(await connectTcp(s.port!));
      try {
        assert.equal((await c.handshake()) & FLAG_FIXED_NEWSTYLE, FLAG_FIXED_NEWSTYLE);
        for (const [option, data] of [
          [OPT.GO, encodeGoInfo({ name: '', infos: [INFO.BLOCK_SIZE] })],
          [OPT.INFO, encodeGoInfo({ name: '', infos: [] })],
          [OPT.LIST, Buffer.alloc(0)],
          [OPT.STRUCTURED_REPLY, Buffer.alloc(0)],
        ] as const) {
          const replies = await c.option(option, data);
          assert.deepEqual(
            replies.map((r) => r.type),
            [REP_ERR_.TLS_REQD],
            `option ${option}`,
          );
        }
        const abort = await c.option(OPT.ABORT);
        assert.deepEqual(
          abort.map((r) => r.type),
          [REP.ACK],
        );
      } finally {
        c.destroy();
      }
      // libnbd without TLS is refused the same way.
      const r = await run('nbdinfo', [s.uri], { allowFail: true });
      assert.notEqual(r.code, 0);
      assert.doesNotMatch(r.stdout, /export-size/);
    }));

  // proto.md "FORCEDTLS mode": after the ACK to NBD_OPT_STARTTLS "all further data MUST be sent
  // and received over TLS". Plaintext a client (or a man in the middle) queued behind STARTTLS
  // must never be taken as the first encrypted option (cf. nbdkit CVE-2021-3716).
  void it('plaintext sent right behind STARTTLS is never answered, not even over the TLS session that follows', () =>
    withTlsServer(async (s) => {
      const c = new RawNbdClient(await connectTcp(s.port!));
      try {
        await c.handshake();
        c.stream.write(Buffer.concat([encodeOption(OPT.STARTTLS), encodeOption(OPT.GO, encodeGoInfo({ name: '', infos: [] }))]));
        const ack = await c.readOptionReply();
        assert.deepEqual([ack.option, ack.type], [OPT.STARTTLS, REP.ACK]);
        // Go on with a good client certificate (only the injected plaintext is wrong here), as
        // long as the server has not hung up already, which is the right answer.
        const { stream, buffered } = await c.takeStream();
        assert.equal(buffered.length, 0, 'the server sent plaintext after its ACK to STARTTLS');
        const raw = stream as net.Socket;
        const hungUp = closed(raw).then(() => false);
        const answered = (async () => {
          if (raw.destroyed) return false;
          const secure = tls.connect({ socket: raw, ca: await readFile(pki.caCert), cert: await readFile(pki.clientCert), key: await readFile(pki.clientKey), servername: 'localhost' });
          return new RawNbdClient(secure).readOptionReply().then(
            () => true,
            () => false,
          );
        })();
        assert.equal(await Promise.race([answered, hungUp]), false, 'the server answered the GO sent in plaintext behind STARTTLS');
      } finally {
        c.destroy();
      }
    }));

  void it('NBD_OPT_EXPORT_NAME before STARTTLS ends the session without export data', () =>
    withTlsServer(async (s) => {
      const c = new RawNbdClient(await connectTcp(s.port!));
      try {
        await c.handshake();
        c.sendOption(OPT.EXPORT_NAME, Buffer.alloc(0));
        assert.equal((await c.restUntilClosed()).length, 0, 'the server sent something after EXPORT_NAME without TLS');
      } finally {
        c.destroy();
      }
    }));
});
