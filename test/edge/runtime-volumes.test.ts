// Volumes added and removed while edges run (POST /v1/volumes, DELETE /v1/volumes/NAME,
// POST /v1/cache), with real edge processes and real NBD clients: an owned volume is added on
// the on-prem edge and a remote one on a cloud edge that started with none; nbdcopy reads the
// source's bytes; adding again is idempotent and a conflicting spec is refused; a restarted
// cloud edge serves the added volume again; a volume is not removed under a connected client
// (unless forced); a drained removal puts the guest's writes at the origin; bad requests get
// 400 with a message that says what is wrong. The CLI commands drive the same routes.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import { controlCall, startTwoSites, until, waitForExport, type TwoSites } from '../helpers/edges.js';
import { requireCommands } from '../helpers/nbd-tools.js';
import { CLI, run, tempDir } from '../helpers/proc.js';
import { makeSparseImage } from '../helpers/random.js';

const MiB = 1024 * 1024;


/** A request with a raw body (malformed JSON, for instance). */
function rawCall(stateDir: string, method: string, url: string, body: string): Promise<{ status: number; body: { error?: string } }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath: path.join(stateDir, 'control.sock'), method, path: url, headers: { 'content-type': 'application/json' } }, (res) => {
      let t = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (t += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(t) as { error?: string } }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

async function nbdcopyTo(uri: string, file: string): Promise<Buffer> {
  await run('nbdcopy', [uri, file]);
  return readFile(file);
}

/** A qemu-io session holding an NBD connection open until release(). */
async function holdClient(uri: string): Promise<{ release: () => Promise<void> }> {
  const child = spawn('qemu-io', ['-f', 'raw', uri], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  child.stdin.write('read 0 512\n');
  await until('qemu-io to connect and read', async () => /read 512\/512 bytes/.test(out) || (child.exitCode !== null ? Promise.reject(new Error(`qemu-io exited: ${out}`)) : false), 30_000);
  return {
    release: async () => {
      child.stdin.end('quit\n');
      const t = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(t);
    },
  };
}

interface RemoteView {
  volume: string;
  origin: string;
  ready: boolean;
  clients: number;
  error?: string;
}

describe('volumes added and removed while the edges run', { timeout: 600_000 }, () => {
  let tmp: { dir: string; cleanup: () => Promise<void> };
  let sites: TwoSites;
  let extraImg: string;
  let extra: Buffer;

  before(async () => {
    await requireCommands('nbdinfo', 'nbdcopy', 'qemu-io');
    tmp = await tempDir('spw-runtime-');
    const disk = path.join(tmp.dir, 'disk.img');
    await makeSparseImage(disk, 1 * MiB, 1);
    extraImg = path.join(tmp.dir, 'extra.img');
    extra = await makeSparseImage(extraImg, 8 * MiB, 2);
    sites = await startTwoSites(tmp.dir, disk, { cloudNoVolume: true });
  });

  after(async () => {
    await sites?.stop();
    await tmp?.cleanup();
  });

  const cloudStatus = async () => (await controlCall<{ remote: RemoteView[]; local: Array<{ volume: string; origin: string; openedBy: string[] }> }>(sites.cloudState, 'GET', '/v1/status')).body;

  it('refuses bad requests with 400 and a message that says what is wrong', async () => {
    const bad = async (method: string, url: string, body: unknown, pattern: RegExp, status = 400) => {
      const r = typeof body === 'string' ? await rawCall(sites.cloudState, method, url, body) : await controlCall<{ error?: string }>(sites.cloudState, method, url, body);
      assert.equal(r.status, status, `${method} ${url} ${JSON.stringify(body)} → ${r.status} ${JSON.stringify(r.body)}`);
      assert.match(r.body.error ?? '', pattern, `${method} ${url}: ${r.body.error}`);
    };
    await bad('POST', '/v1/volumes', '{"name": "x", "peer": ', /not JSON/);
    await bad('POST', '/v1/volumes', { name: 'x', peer: 'onprem', surprise: 1 }, /surprise/);
    await bad('POST', '/v1/volumes', { name: '../etc', peer: 'onprem' }, /name: use letters/);
    await bad('POST', '/v1/volumes', { name: 'x', peer: 'onprem', source: '/x.img' }, /either source: .* or peer:/);
    await bad('POST', '/v1/volumes', { name: 'x' }, /either source: .* or peer:.*neither/);
    await bad('POST', '/v1/volumes', [1, 2], /one volume entry/);
    await bad('POST', '/v1/volumes', { name: 'x', peer: 'nowhere' }, /names peer "nowhere", which is not under peers/);
    await bad('POST', '/v1/volumes', { name: 'x', peer: 'onprem', writes: 'sometimes' }, /writes/);
    await bad('POST', '/v1/volumes', { name: 'x', peer: 'onprem', hydrate: { path: 'relative.img' } }, /hydrate\.path must be an absolute path/);
    await bad('POST', '/v1/volumes?force=1', { name: 'x', peer: 'onprem' }, /unknown query parameter "force"/);
    await bad('DELETE', '/v1/volumes/bad%2Fname', undefined, /not a volume name/);
    await bad('DELETE', '/v1/volumes/x?drian=1', undefined, /unknown query parameter "drian"/);
    await bad('DELETE', '/v1/volumes/x?drain=maybe', undefined, /takes 1 or 0/);
    await bad('DELETE', '/v1/volumes/absent', undefined, /no volume named "absent"/, 404);
    await bad('POST', '/v1/volumes/absent/detach', {}, /no volume named "absent"/, 404);
    await bad('POST', '/v1/volumes/absent/detach', { now: true }, /now/);
    await bad('POST', '/v1/cache', { size: 'lots' }, /not a size/);
    // the on-prem edge: local entries are checked too, and it has no cache
    const r = await controlCall<{ error?: string }>(sites.onpremState, 'POST', '/v1/volumes', { name: 'y', source: extraImg, chunkSize: 3000 });
    assert.equal(r.status, 400);
    assert.match(r.body.error ?? '', /chunkSize must be a power of two/);
    const q = await controlCall<{ error?: string }>(sites.onpremState, 'POST', '/v1/volumes', { name: 'y', source: '/no/such/file.img' });
    assert.equal(q.status, 422);
    assert.match(q.body.error ?? '', /cannot open \/no\/such\/file\.img/);
    const c = await controlCall<{ error?: string }>(sites.onpremState, 'POST', '/v1/cache', { size: 1 * MiB });
    assert.equal(c.status, 409);
    assert.match(c.body.error ?? '', /no cache/);
    assert.equal(existsSync(path.join(sites.cloudState, 'volumes.d', 'x.json')), false, 'nothing refused is kept');
  });

  it('adds an owned volume and a remote one while running: the export appears and reads the source byte for byte', async () => {
    const l = await controlCall<{ role: string; created: boolean; volume: string; origin: string; zeroChunks: number }>(sites.onpremState, 'POST', '/v1/volumes', { name: 'extra', source: extraImg });
    assert.equal(l.status, 201, JSON.stringify(l.body));
    assert.equal(l.body.role, 'local');
    assert.equal(l.body.created, true);
    assert.equal(l.body.origin, 'runtime');
    assert.ok(l.body.zeroChunks > 0, 'the zero map was built');
    const r = await controlCall<{ role: string; created: boolean; volume: string; clients: number }>(sites.cloudState, 'POST', '/v1/volumes', { name: 'extra', peer: 'onprem' });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    assert.equal(r.body.role, 'remote');
    assert.equal(r.body.clients, 0);
    await waitForExport(sites.uri('extra'));
    const got = await nbdcopyTo(sites.uri('extra'), path.join(tmp.dir, 'copy1.img'));
    assert.ok(got.equals(extra), 'nbdcopy through the cloud edge reads the source byte for byte');
    const st = (await cloudStatus()).remote.find((v) => v.volume === 'extra');
    assert.equal(st?.origin, 'runtime');
    assert.equal(st?.ready, true);
    assert.ok(existsSync(path.join(sites.cloudState, 'volumes.d', 'extra.json')), 'the added volume is kept in STATE/volumes.d');
  });

  it('accepts the same spec again (200) and refuses another spec under the name (409)', async () => {
    const again = await controlCall<{ created: boolean }>(sites.cloudState, 'POST', '/v1/volumes', { name: 'extra', peer: 'onprem', writes: 'remote-only', ioTimeout: '120s' });
    assert.equal(again.status, 200, JSON.stringify(again.body));
    assert.equal(again.body.created, false);
    const localAgain = await controlCall<{ created: boolean }>(sites.onpremState, 'POST', '/v1/volumes', { name: 'extra', source: extraImg, format: 'raw' });
    assert.equal(localAgain.status, 200);
    const other = await controlCall<{ error: string }>(sites.cloudState, 'POST', '/v1/volumes', { name: 'extra', peer: 'onprem', writes: 'origin' });
    assert.equal(other.status, 409);
    assert.match(other.body.error, /already .* with another spec \(differs in: writes\)/);
    const role = await controlCall<{ error: string }>(sites.onpremState, 'POST', '/v1/volumes', { name: 'disk', source: extraImg });
    assert.equal(role.status, 409, 'a config volume of that name');
    assert.match(role.body.error, /differs in: source\) from the configuration file/);
  });

  it('brings an added volume back after the cloud edge restarts', async () => {
    await sites.cloud.stop();
    await sites.startCloud();
    await waitForExport(sites.uri('extra'));
    const got = await nbdcopyTo(sites.uri('extra'), path.join(tmp.dir, 'copy2.img'));
    assert.ok(got.equals(extra));
    const st = (await cloudStatus()).remote.find((v) => v.volume === 'extra');
    assert.equal(st?.origin, 'runtime');
  });

  it('refuses to remove a volume while an NBD client is connected, unless forced', async () => {
    const held = await holdClient(sites.uri('extra'));
    try {
      const st = (await cloudStatus()).remote.find((v) => v.volume === 'extra');
      assert.equal(st?.clients, 1, 'status counts the connected client');
      const r = await controlCall<{ error: string }>(sites.cloudState, 'DELETE', '/v1/volumes/extra');
      assert.equal(r.status, 409);
      assert.match(r.body.error, /1 NBD client connected/);
      await waitForExport(sites.uri('extra'), 5000); // still exported
      const f = await controlCall<{ clientsDisconnected: number; files: { action: string } }>(sites.cloudState, 'DELETE', '/v1/volumes/extra?force=1');
      assert.equal(f.status, 200, JSON.stringify(f.body));
      assert.equal(f.body.clientsDisconnected, 1);
      assert.equal(f.body.files.action, 'deleted', 'remote-only and nothing written: nothing to keep');
    } finally {
      await held.release();
    }
    const gone = await run('nbdinfo', ['--size', sites.uri('extra')], { allowFail: true });
    assert.notEqual(gone.code, 0, 'the export is gone');
    assert.equal(existsSync(path.join(sites.cloudState, 'volumes.d', 'extra.json')), false, 'and forgotten');
    const again = await controlCall<{ error: string }>(sites.cloudState, 'DELETE', '/v1/volumes/extra');
    assert.equal(again.status, 404, 'removing an absent volume: 404');
  });

  it('removes with drain=1: the guest writes of an origin volume are at the origin afterwards', async () => {
    const add = await controlCall(sites.cloudState, 'POST', '/v1/volumes', { name: 'extra', peer: 'onprem', writes: 'origin', rpo: '60s' });
    assert.equal(add.status, 201, JSON.stringify(add.body));
    await waitForExport(sites.uri('extra'));
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1M 256k', '-c', 'flush', sites.uri('extra')]);
    const pattern = Buffer.alloc(256 * 1024, 0x5a);
    assert.ok(!readFileSync(extraImg).subarray(MiB, MiB + pattern.length).equals(pattern), 'not shipped yet (rpo 60s)');
    const r = await controlCall<{ drained: boolean; files: { action: string; reason: string }; writes: { ackedSeq: number; lastSealed: number; unshippedBytes: number } }>(sites.cloudState, 'DELETE', '/v1/volumes/extra?drain=1');
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.drained, true);
    assert.equal(r.body.writes.unshippedBytes, 0);
    assert.equal(r.body.writes.ackedSeq, r.body.writes.lastSealed);
    assert.equal(r.body.files.action, 'deleted', r.body.files.reason);
    assert.ok(readFileSync(extraImg).subarray(MiB, MiB + pattern.length).equals(pattern), 'the origin holds the guest writes');
    assert.equal(existsSync(path.join(sites.cloudState, 'overlays', 'extra.overlay')), false);
    assert.equal(existsSync(path.join(sites.cloudState, 'journal', 'extra')), false);
    extra = readFileSync(extraImg);
  });

  it('keeps the overlay of a remote-only volume with writes unless discard=1', async () => {
    assert.equal((await controlCall(sites.cloudState, 'POST', '/v1/volumes', { name: 'extra', peer: 'onprem' })).status, 201);
    await waitForExport(sites.uri('extra'));
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 64k', sites.uri('extra')]);
    const keep = await controlCall<{ files: { action: string; reason: string; paths: string[] } }>(sites.cloudState, 'DELETE', '/v1/volumes/extra');
    assert.equal(keep.status, 200);
    assert.equal(keep.body.files.action, 'kept');
    assert.match(keep.body.files.reason, /remote-only writes/);
    assert.ok(existsSync(path.join(sites.cloudState, 'overlays', 'extra.overlay')));
    // added again, the kept overlay is served again; then discarded
    assert.equal((await controlCall(sites.cloudState, 'POST', '/v1/volumes', { name: 'extra', peer: 'onprem' })).status, 201);
    await waitForExport(sites.uri('extra'));
    const got = await nbdcopyTo(sites.uri('extra'), path.join(tmp.dir, 'copy3.img'));
    assert.ok(got.subarray(0, 65536).equals(Buffer.alloc(65536, 0x77)), 'the kept overlay holds the write');
    const drop = await controlCall<{ files: { action: string } }>(sites.cloudState, 'DELETE', '/v1/volumes/extra?discard=1');
    assert.equal(drop.body.files.action, 'deleted');
    assert.equal(existsSync(path.join(sites.cloudState, 'overlays', 'extra.overlay')), false);
  });

  it('removes an owned volume (reporting the peers that had it open); config volumes stay', async () => {
    const cfg = await controlCall<{ error: string }>(sites.onpremState, 'DELETE', '/v1/volumes/disk');
    assert.equal(cfg.status, 409);
    assert.match(cfg.body.error, /configuration file/);
    const r = await controlCall<{ role: string; openedBy: string[] }>(sites.onpremState, 'DELETE', '/v1/volumes/extra');
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.role, 'local');
    assert.deepEqual(r.body.openedBy, ['cloud']);
    // the source is free again: another process may lock it now
    const lock = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 4k', extraImg], { allowFail: true });
    assert.equal(lock.code, 0, `the source is no longer locked: ${lock.stderr}`);
    assert.equal((await controlCall(sites.onpremState, 'DELETE', '/v1/volumes/extra')).status, 404);
  });

  it('resizes the cache while running', async () => {
    const r = await controlCall<{ cache: { maxBytes: number } }>(sites.cloudState, 'POST', '/v1/cache', { size: '1GiB' });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.cache.maxBytes, 1024 * MiB);
    const st = await controlCall<{ cache: { maxBytes: number } }>(sites.cloudState, 'GET', '/v1/status');
    assert.equal(st.body.cache.maxBytes, 1024 * MiB);
  });

  it('drives the same routes from the CLI: volume add, remove, cache', async () => {
    const dir = path.join(tmp.dir, 'cli');
    await mkdir(dir, { recursive: true });
    await makeSparseImage(path.join(dir, 'cli.img'), 2 * MiB, 3);
    const cli = (...args: string[]) => run(process.execPath, [CLI, 'volume', ...args], { cwd: dir });
    const add = JSON.parse((await cli('add', '-c', sites.onpremYaml, 'cli', '--source', 'cli.img', '--json')).stdout) as { created: boolean; volume: string };
    assert.equal(add.created, true, 'a relative --source is taken from the current directory');
    const spec = path.join(dir, 'cloud-cli.yaml');
    await writeFile(spec, 'name: cli\npeer: onprem\nwrites: read-only\n');
    const text = (await cli('add', '-c', sites.cloudYaml, '--spec', spec)).stdout;
    assert.match(text, /cli: added/);
    await waitForExport(sites.uri('cli'));
    assert.match((await cli('add', '-c', sites.cloudYaml, '--spec', spec)).stdout, /already there with this spec/);
    const conflict = await cli('add', '-c', sites.cloudYaml, '--spec', spec, '--writes', 'origin').catch((e: Error) => e);
    assert.ok(conflict instanceof Error && /another spec/.test(conflict.message), String(conflict));
    const rm = JSON.parse((await cli('remove', '-c', sites.cloudYaml, 'cli', '--json')).stdout) as { files: { action: string } };
    assert.equal(rm.files.action, 'none', 'a read-only volume has no overlay');
    assert.match((await cli('remove', '-c', sites.onpremYaml, 'cli')).stdout, /cli: removed \(local role\)/);
    const cache = JSON.parse((await cli('cache', '-c', sites.cloudYaml, '--size', '512MiB', '--json')).stdout) as { maxBytes: number };
    assert.equal(cache.maxBytes, 512 * MiB);
    assert.match((await cli('cache', '-c', sites.cloudYaml)).stdout, /512\.0 MiB max/);
    const help = (await run(process.execPath, [CLI, 'volume', 'add', '--help'])).stdout;
    assert.match(help, /--live-writer/);
  });
});
