// The management API end to end: the real HTTP server, the real SQLite store and the real
// Engine running tiny test workflows (test/control/api-harness.ts).
//
// Covered: authentication (401 missing / wrong / malformed, WWW-Authenticate) and roles (403 for
// a viewer's writes and operator-only reads, refused writes audited); error answers (malformed
// JSON with its position, schema errors naming each path, unknown fields, bad names in the path,
// body/path name mismatch, 413, 415, 404 with nearby routes, 405 with Allow, bad query strings,
// a 500 with a request id that does not take the server down); PUT/GET/list/DELETE round trips
// of every inventory resource (answers checked against the response schemas), references and
// dependants (400 / 409), a delete refused while an unfinished workflow acts on the record;
// workflows: start (202), unknown kinds, bad input, one at a time per target (409), the SSE
// stream (ordered step/progress/state events, closes at the end, heartbeats), resuming with
// Last-Event-ID and ?after=, 204 when there is nothing newer, format=json, cancel (rollback) and
// retry (a failed step succeeds), the stream closing at failed; tokens (secret once, hashed,
// revocation, the last operator token kept); the audit log; /metrics; /openapi.json walked for
// structure and resolvable refs; fast-check bodies and names against PUT /v1/hosts/{name}.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';

import { hashToken } from '../../src/control/api/index.js';
import * as S from '../../src/control/api/schemas.js';
import type { AuditEntry, TokenRecord, Workflow, WorkflowEvent } from '../../src/control/types.js';
import { readSse, request, startHarness, until, type Answer, type Harness } from './api-harness.js';

let h: Harness;
type Err = { error: { code: string; message: string; details?: Record<string, unknown> } };

before(async () => {
  h = await startHarness({ heartbeatMs: 150 });
});
after(async () => {
  await h.close();
});

const op = () => ({ token: h.operator });
const get = <T = unknown>(p: string, token = h.operator) => request<T>(h.url, 'GET', p, { token });
const put = <T = unknown>(p: string, body: unknown, token = h.operator) => request<T>(h.url, 'PUT', p, { token, body });
const post = <T = unknown>(p: string, body?: unknown, token = h.operator) => request<T>(h.url, 'POST', p, { token, body });
const del = <T = unknown>(p: string, token = h.operator) => request<T>(h.url, 'DELETE', p, { token });

function expectError(r: Answer, status: number, code: string, pattern?: RegExp): Err['error'] {
  assert.equal(r.status, status, r.text);
  assert.match(String(r.headers['content-type']), /application\/json/);
  const e = (r.body as Err).error;
  assert.equal(e.code, code, r.text);
  assert.equal(typeof e.message, 'string');
  if (pattern) assert.match(e.message, pattern);
  return e;
}

const site = { kind: 'onprem', region: 'eu-west', tags: ['eu'] };
const cloudSite = { kind: 'cloud', region: 'eu-west' };
const edge = { site: 'cloud', control: '/run/spillway/cloud/control.sock', nbd: '127.0.0.1:10809', cacheBytes: 1 << 30 };
const host = { site: 'cloud', edge: 'e1', vcpus: 8, ramMiB: 16384, iops: 20000, pricePerHour: 0.4, tags: ['eu'] };
const spec = { kernel: '/img/vmlinuz', initrd: '/img/initrd', append: 'console=ttyS0', memoryMiB: 1024, vcpus: 2, mac: '52:54:00:12:34:56' };
const instance = { origin: 'dc', spec };
const volume = { instance: 'web', path: '/img/web.raw', sizeBytes: 10 << 20, family: 'debian12' };
const profile = { family: 'debian12', volume: 'web-root', chunks: 321 };

async function seed(): Promise<void> {
  for (const [p, b] of [
    ['/v1/sites/dc', site],
    ['/v1/sites/cloud', cloudSite],
    ['/v1/edges/e1', edge],
    ['/v1/hosts/h1', host],
    ['/v1/instances/web', instance],
    ['/v1/volumes/web-root', volume],
    ['/v1/profiles/boot', profile],
  ] as const) {
    const r = await put(p, b);
    assert.ok(r.status === 200 || r.status === 201, `${p}: ${r.text}`);
  }
}

describe('authentication and roles', () => {
  test('no token, a wrong token, a malformed header: 401 with WWW-Authenticate and a way out', async () => {
    const none = await request(h.url, 'GET', '/v1/hosts');
    const e = expectError(none, 401, 'SPW_ERR_UNAUTHORIZED', /missing token/);
    assert.match(e.message, /spillway token create/);
    assert.match(String(none.headers['www-authenticate']), /^Bearer/);

    const wrong = await request(h.url, 'GET', '/v1/hosts', { token: 'spw_' + 'A'.repeat(43) });
    expectError(wrong, 401, 'SPW_ERR_UNAUTHORIZED', /not valid/);
    assert.match(String(wrong.headers['www-authenticate']), /invalid_token/);

    const garbage = await request(h.url, 'GET', '/v1/hosts', { token: 'hunter2' });
    expectError(garbage, 401, 'SPW_ERR_UNAUTHORIZED');

    const basic = await request(h.url, 'GET', '/v1/hosts', { headers: { authorization: 'Basic dXNlcjpwYXNz' } });
    expectError(basic, 401, 'SPW_ERR_UNAUTHORIZED', /Bearer TOKEN/);

    // a missing token is refused before anything else is looked at
    expectError(await request(h.url, 'PUT', '/v1/sites/x', { raw: '{oops' }), 401, 'SPW_ERR_UNAUTHORIZED');
  });

  test('healthz, openapi.json and metrics need no token', async () => {
    const r = await request<{ status: string; version: string; store: string; kinds: string[] }>(h.url, 'GET', '/healthz');
    assert.equal(r.status, 200);
    assert.deepEqual({ ...r.body, kinds: [...r.body.kinds].sort() }, { status: 'ok', version: '0.0.0-test', store: 'sqlite', kinds: ['detach', 'resize-edge', 'reverse', 'transfer'] });
    assert.equal((await request(h.url, 'GET', '/openapi.json')).status, 200);
    assert.equal((await request(h.url, 'GET', '/metrics')).status, 200);
  });

  test('a viewer reads but may not write (403), nor read tokens or the audit log; refusals are audited', async () => {
    assert.equal((await get('/v1/sites', h.viewer)).status, 200);
    assert.equal((await get('/v1/workflows', h.viewer)).status, 200);
    expectError(await put('/v1/sites/nope', site, h.viewer), 403, 'SPW_ERR_FORBIDDEN', /viewer/);
    expectError(await del('/v1/sites/nope', h.viewer), 403, 'SPW_ERR_FORBIDDEN');
    expectError(await post('/v1/workflows', { kind: 'transfer', input: { instance: 'x' } }, h.viewer), 403, 'SPW_ERR_FORBIDDEN');
    expectError(await post('/v1/tokens', { name: 'x', role: 'operator' }, h.viewer), 403, 'SPW_ERR_FORBIDDEN');
    expectError(await get('/v1/tokens', h.viewer), 403, 'SPW_ERR_FORBIDDEN');
    expectError(await get('/v1/audit', h.viewer), 403, 'SPW_ERR_FORBIDDEN');
    const audit = (await get<{ items: AuditEntry[] }>('/v1/audit?target=nope')).body.items;
    assert.ok(audit.some((a) => a.actor === 'reader' && a.action === 'site.put' && a.detail.status === 403), JSON.stringify(audit));
  });
});

describe('error answers', () => {
  test('malformed JSON: 400 saying where', async () => {
    const r = await request(h.url, 'PUT', '/v1/sites/x', { ...op(), raw: '{"kind": "onprem",\n "region": }' });
    const e = expectError(r, 400, 'SPW_ERR_INVALID', /not valid JSON/);
    assert.match(e.message, /position 30/);
    assert.match(e.message, /line 2, column 12/);
    assert.equal(e.details?.position, 30);
    const trailing = expectError(await request(h.url, 'PUT', '/v1/sites/x', { ...op(), raw: '{"kind": "onprem"} x' }), 400, 'SPW_ERR_INVALID');
    assert.match(trailing.message, /position 19/);
    expectError(await request(h.url, 'PUT', '/v1/sites/x', { ...op(), raw: '' }), 400, 'SPW_ERR_INVALID', /empty/);
    expectError(await request(h.url, 'PUT', '/v1/sites/x', { ...op(), raw: '{"kind": "onprem"' }), 400, 'SPW_ERR_INVALID', /the end of the body/);
  });

  test('schema violations: 400 naming each path and what is expected', async () => {
    const r = await put('/v1/hosts/h9', { site: 'cloud', edge: 'e1', vcpus: 'eight', ramMiB: -1, tags: [1], bogus: true });
    const e = expectError(r, 400, 'SPW_ERR_INVALID', /request body is not valid/);
    for (const p of ['vcpus', 'ramMiB', 'tags[0]', 'bogus']) assert.match(e.message, new RegExp(p.replace(/[[\]]/g, '\\$&')), p);
    const issues = e.details?.issues as Array<{ path: string; message: string }>;
    assert.ok(issues.some((i) => i.path === 'vcpus' && /number/.test(i.message)));
    assert.ok(issues.some((i) => i.path === 'spec.mac' || i.path === 'vcpus'));
    const nested = expectError(await put('/v1/instances/i9', { origin: 'dc', spec: { ...spec, mac: 'nope' } }), 400, 'SPW_ERR_INVALID');
    assert.match(nested.message, /spec\.mac: expected a MAC address/);
    expectError(await put('/v1/sites/x', [1, 2]), 400, 'SPW_ERR_INVALID', /expected object/);
  });

  test('bad names in the path, and a body naming another record: 400', async () => {
    expectError(await put('/v1/sites/-bad', site), 400, 'SPW_ERR_INVALID', /name "-bad" in the path/);
    expectError(await put(`/v1/sites/${'x'.repeat(64)}`, site), 400, 'SPW_ERR_INVALID', /1 to 63/);
    expectError(await get('/v1/sites/a%20b'), 400, 'SPW_ERR_INVALID');
    expectError(await get('/v1/sites/%E0%A4%A'), 400, 'SPW_ERR_INVALID', /percent-encoding/);
    expectError(await put('/v1/sites/one', { ...site, name: 'two' }), 400, 'SPW_ERR_INVALID', /"two" but the path names "one"/);
  });

  test('a body over 1 MiB: 413, declared or chunked, and the server goes on', async () => {
    const big = JSON.stringify({ ...site, region: 'x'.repeat(1024 * 1024 + 10) });
    expectError(await request(h.url, 'PUT', '/v1/sites/big', { ...op(), raw: big }), 413, 'SPW_ERR_TOO_LARGE');
    expectError(await request(h.url, 'PUT', '/v1/sites/big', { ...op(), raw: Buffer.alloc(17 * 1024 * 1024, 0x20) }), 413, 'SPW_ERR_TOO_LARGE');
    // no content-length: chunked transfer encoding
    const http = await import('node:http');
    const status = await new Promise<number>((resolve, reject) => {
      const req = http.request(h.url + '/v1/sites/big', { method: 'PUT', headers: { authorization: `Bearer ${h.operator}`, 'content-type': 'application/json' }, agent: false }, (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      });
      req.on('error', reject);
      for (let i = 0; i < 20; i++) req.write(Buffer.alloc(100 * 1024, 0x20));
      req.end();
    });
    assert.equal(status, 413);
    assert.equal((await get('/v1/sites')).status, 200);
  });

  test('wrong content type: 415', async () => {
    expectError(await request(h.url, 'PUT', '/v1/sites/x', { ...op(), raw: 'kind=onprem', headers: { 'content-type': 'application/x-www-form-urlencoded' } }), 415, 'SPW_ERR_UNSUPPORTED_MEDIA');
  });

  test('unknown route: 404 listing nearby routes; wrong method: 405 with Allow', async () => {
    const e = expectError(await get('/v1/hostz'), 404, 'SPW_ERR_NOT_FOUND', /no route GET \/v1\/hostz/);
    assert.ok((e.details?.nearby as string[]).includes('GET /v1/hosts'));
    expectError(await get('/nowhere/at/all'), 404, 'SPW_ERR_NOT_FOUND', /openapi\.json/);
    const m = await post('/v1/hosts', {});
    expectError(m, 405, 'SPW_ERR_METHOD', /takes GET/);
    assert.equal(m.headers.allow, 'GET');
    const m2 = await request(h.url, 'PATCH', '/v1/hosts/h1', op());
    expectError(m2, 405, 'SPW_ERR_METHOD');
    assert.deepEqual(String(m2.headers.allow).split(', ').sort(), ['DELETE', 'GET', 'PUT']);
  });

  test('bad query strings: 400 naming the parameter', async () => {
    expectError(await get('/v1/workflows?state=sleeping'), 400, 'SPW_ERR_INVALID', /state:/);
    expectError(await get('/v1/workflows?limit=0'), 400, 'SPW_ERR_INVALID', /limit:/);
    expectError(await get('/v1/workflows?stat=running'), 400, 'SPW_ERR_INVALID', /stat/);
  });

  test('an unexpected error: 500 with a request id that is logged; the server answers the next request', async () => {
    const r = await get('/v1/test/boom');
    const e = expectError(r, 500, 'SPW_ERR_INTERNAL', /request id/);
    const id = String(r.headers['x-request-id']);
    assert.ok(e.message.includes(id));
    assert.ok(h.logs.some((l) => l.level === 'error' && l.fields?.requestId === id && /kaboom/.test(String(l.fields?.error))));
    assert.equal((await get('/v1/sites')).status, 200);
  });
});

describe('inventory', () => {
  before(seed);

  const cases = [
    { plural: 'sites', name: 'dc', body: site, schema: S.SiteRecord, list: S.SiteList, change: { region: 'eu-central' } },
    { plural: 'edges', name: 'e1', body: edge, schema: S.EdgeRecordSchema, list: S.EdgeList, change: { cacheBytes: 2 * 2 ** 30 } },
    { plural: 'hosts', name: 'h1', body: host, schema: S.HostRecord, list: S.HostList, change: { state: 'maintenance' } },
    { plural: 'instances', name: 'web', body: instance, schema: S.InstanceRecord, list: S.InstanceList, change: { state: 'running', host: 'h1' } },
    { plural: 'volumes', name: 'web-root', body: volume, schema: S.VolumeRecord, list: S.VolumeList, change: { policy: 'write-through' } },
    { plural: 'profiles', name: 'boot', body: profile, schema: S.ProfileRecordSchema, list: S.ProfileList, change: { chunks: 400 } },
  ] as const;

  for (const c of cases) {
    test(`${c.plural}: GET, list, PUT replace (createdAt kept), answers match their schemas`, async () => {
      const one = await get(`/v1/${c.plural}/${c.name}`);
      assert.equal(one.status, 200, one.text);
      const rec = c.schema.parse(one.body) as { name: string; createdAt: string };
      assert.equal(rec.name, c.name);
      const list = await get(`/v1/${c.plural}`);
      assert.ok((c.list.parse(list.body) as { items: Array<{ name: string }> }).items.some((x) => x.name === c.name));

      const again = await put(`/v1/${c.plural}/${c.name}`, { ...c.body, ...c.change, name: c.name });
      assert.equal(again.status, 200, again.text);
      const updated = c.schema.parse(again.body) as Record<string, unknown>;
      for (const [k, v] of Object.entries(c.change)) assert.deepEqual(updated[k], v, k);
      assert.equal(updated.createdAt, rec.createdAt);
      assert.deepEqual((await get(`/v1/${c.plural}/${c.name}`)).body, again.body);

      expectError(await get(`/v1/${c.plural}/missing-one`), 404, 'SPW_ERR_NOT_FOUND', /no \w+ named "missing-one"/);
      expectError(await del(`/v1/${c.plural}/missing-one`), 404, 'SPW_ERR_NOT_FOUND');
    });
  }

  test('defaults are filled in; an instance gets an identity, kept on replace', async () => {
    const h2 = (await put<Record<string, unknown>>('/v1/hosts/h2', { site: 'cloud', edge: 'e1', vcpus: 2, ramMiB: 2048 })).body;
    assert.deepEqual({ provider: h2.provider, iops: h2.iops, tags: h2.tags, licences: h2.licences, ha: h2.ha, state: h2.state, pricePerHour: h2.pricePerHour }, { provider: 'local', iops: 0, tags: [], licences: [], ha: false, state: 'up', pricePerHour: 0 });
    const i1 = (await put<{ identity: { hostname: string; machineId: string }; host: null; needs: unknown }>('/v1/instances/db', instance)).body;
    assert.equal(i1.identity.hostname, 'db');
    assert.match(i1.identity.machineId, /^[0-9a-f]{32}$/);
    assert.equal(i1.host, null);
    assert.deepEqual(i1.needs, { licences: [], tags: [], ha: false, iops: 0 });
    const i2 = (await put<{ identity: unknown }>('/v1/instances/db', { ...instance, state: 'running' })).body;
    assert.deepEqual(i2.identity, i1.identity);
  });

  test('list filters: edges and hosts by site, volumes by instance, profiles by family', async () => {
    assert.deepEqual((await get<{ items: unknown[] }>('/v1/hosts?site=dc')).body.items, []);
    assert.ok((await get<{ items: unknown[] }>('/v1/hosts?site=cloud')).body.items.length >= 1);
    assert.equal((await get<{ items: unknown[] }>('/v1/edges?site=cloud')).body.items.length, 1);
    assert.equal((await get<{ items: unknown[] }>('/v1/volumes?instance=web')).body.items.length, 1);
    assert.equal((await get<{ items: unknown[] }>('/v1/profiles?family=debian12')).body.items.length, 1);
    expectError(await get('/v1/sites?site=dc'), 400, 'SPW_ERR_INVALID', /Unrecognized key/);
  });

  test('references must exist (400); records still referred to are not deleted (409)', async () => {
    const e = expectError(await put('/v1/hosts/h3', { ...host, site: 'atlantis', edge: 'nowhere' }), 400, 'SPW_ERR_INVALID');
    assert.match(e.message, /site "atlantis" does not exist/);
    assert.match(e.message, /edge "nowhere" does not exist/);
    expectError(await put('/v1/volumes/v9', { ...volume, instance: 'ghost' }), 400, 'SPW_ERR_INVALID', /instance "ghost"/);
    expectError(await del('/v1/sites/cloud'), 409, 'SPW_ERR_CONFLICT', /edges "e1".*hosts/);
    expectError(await del('/v1/instances/web'), 409, 'SPW_ERR_CONFLICT', /volumes "web-root"/);
    expectError(await del('/v1/edges/e1'), 409, 'SPW_ERR_CONFLICT', /hosts/);
  });

  test('a delete is refused while an unfinished workflow acts on the record', async () => {
    await put('/v1/edges/e2', { ...edge, nbd: undefined });
    const wf = (await post<Workflow>('/v1/workflows', { kind: 'resize-edge', input: { edge: 'e2', sizeBytes: 1 << 30 } })).body;
    const e = expectError(await del('/v1/edges/e2'), 409, 'SPW_ERR_CONFLICT', /unfinished workflow/);
    assert.deepEqual(e.details?.workflows, [wf.id]);
    assert.equal((await post(`/v1/workflows/${wf.id}/cancel`)).status, 202);
    assert.equal((await h.engine.wait(wf.id, 10000)).state, 'cancelled');
    assert.equal((await del('/v1/edges/e2')).status, 204);
  });

  test('DELETE round trip of every kind, dependants first', async () => {
    for (const p of ['/v1/profiles/boot', '/v1/volumes/web-root', '/v1/instances/db', '/v1/hosts/h2']) assert.equal((await del(p)).status, 204, p);
    await put('/v1/instances/web', { ...instance, host: null });
    for (const p of ['/v1/instances/web', '/v1/hosts/h1', '/v1/edges/e1', '/v1/sites/cloud', '/v1/sites/dc']) {
      const r = await del(p);
      assert.equal(r.status, 204, `${p}: ${r.text}`);
      assert.equal(r.text, '');
      assert.equal((await get(p)).status, 404);
    }
    for (const k of ['sites', 'edges', 'hosts', 'instances', 'volumes', 'profiles']) assert.deepEqual((await get<{ items: unknown[] }>(`/v1/${k}`)).body.items, [], k);
    const audit = (await get<{ items: AuditEntry[] }>('/v1/audit?limit=500')).body.items;
    for (const a of ['site.create', 'site.update', 'host.create', 'host.delete', 'instance.update', 'profile.delete']) assert.ok(audit.some((x) => x.action === a && x.actor === 'root'), a);
  });
});

describe('workflows', () => {
  before(async () => {
    await put('/v1/sites/dc', site);
    await put('/v1/instances/app', instance);
  });

  test('POST starts a workflow (202); the event stream delivers step, progress and state events in order and closes at the end', async () => {
    const r = await post<Workflow>('/v1/workflows', { kind: 'transfer', input: { instance: 'app' } });
    assert.equal(r.status, 202, r.text);
    assert.equal(r.headers.location, `/v1/workflows/${r.body.id}`);
    S.WorkflowRecord.parse(r.body);
    assert.equal(r.body.actor, 'root');
    assert.equal(r.body.target, 'app');

    const s = await readSse(h.url, `/v1/workflows/${r.body.id}/events`, { token: h.viewer });
    assert.equal(s.status, 200);
    assert.match(String(s.headers['content-type']), /^text\/event-stream/);
    assert.ok(s.ended, 'the server ended the stream');
    const seqs = s.events.map((e) => e.seq);
    assert.deepEqual(seqs, seqs.map((_, i) => i + 1), 'every event once, in seq order');
    assert.deepEqual(s.ids, seqs.map(String));
    for (const e of s.events) S.WorkflowEventSchema.parse(e);
    const types = new Set(s.events.map((e) => e.type));
    for (const t of ['state', 'step', 'progress'] as const) assert.ok(types.has(t), t);
    const progress = s.events.filter((e) => e.type === 'progress').map((e) => e.fraction);
    assert.deepEqual(progress, [0.25, 0.5, 0.75, 1]);
    const last = s.events.at(-1)!;
    assert.equal(last.type, 'state');
    assert.equal(last.data?.state, 'succeeded');

    const detail = await get<Workflow & { steps: Array<{ name: string; state: string }> }>(`/v1/workflows/${r.body.id}`, h.viewer);
    S.WorkflowDetail.parse(detail.body);
    assert.equal(detail.body.state, 'succeeded');
    assert.deepEqual(
      detail.body.steps.map((x) => [x.name, x.state]),
      [
        ['prepare', 'done'],
        ['copy', 'done'],
        ['finish', 'done'],
      ],
    );
    const json = await get<{ items: WorkflowEvent[] }>(`/v1/workflows/${r.body.id}/events?format=json`);
    assert.deepEqual(json.body.items, s.events);

    // listing and filters
    const listed = (await get<{ items: Workflow[] }>('/v1/workflows?kind=transfer&state=succeeded&target=app&limit=5')).body.items;
    assert.ok(listed.some((w) => w.id === r.body.id));
    assert.deepEqual((await get<{ items: Workflow[] }>('/v1/workflows?target=nobody')).body.items, []);
  });

  test('Last-Event-ID (or ?after=) resumes: only later events, then the stream ends; nothing newer → 204', async () => {
    const wf = (await post<Workflow>('/v1/workflows', { kind: 'transfer', input: { instance: 'app' } })).body;
    // read the beginning, then drop the connection
    const first = await readSse(h.url, `/v1/workflows/${wf.id}/events`, { token: h.operator, until: (r) => r.events.length >= 4 });
    assert.equal(first.events.length, 4);
    const resumed = await readSse(h.url, `/v1/workflows/${wf.id}/events`, { token: h.operator, lastEventId: '4' });
    assert.ok(resumed.ended);
    assert.equal(resumed.events[0]!.seq, 5);
    assert.ok(resumed.events.every((e, i) => e.seq === 5 + i));
    assert.equal(resumed.events.at(-1)!.data?.state, 'succeeded');
    const total = resumed.events.at(-1)!.seq;

    const viaQuery = await readSse(h.url, `/v1/workflows/${wf.id}/events?after=${total - 2}`, { token: h.operator });
    assert.deepEqual(viaQuery.events.map((e) => e.seq), [total - 1, total]);
    // the header wins over ?after=
    const both = await readSse(h.url, `/v1/workflows/${wf.id}/events?after=0`, { token: h.operator, lastEventId: String(total - 1) });
    assert.deepEqual(both.events.map((e) => e.seq), [total]);

    const done = await request(h.url, 'GET', `/v1/workflows/${wf.id}/events`, { token: h.operator, headers: { 'last-event-id': String(total) } });
    assert.equal(done.status, 204);
    expectError(await request(h.url, 'GET', `/v1/workflows/${wf.id}/events`, { token: h.operator, headers: { 'last-event-id': 'abc' } }), 400, 'SPW_ERR_INVALID', /Last-Event-ID/);
    const json = await get<{ items: WorkflowEvent[] }>(`/v1/workflows/${wf.id}/events?format=json&after=${total - 1}`);
    assert.deepEqual(json.body.items.map((e) => e.seq), [total]);
  });

  test('a stream idle in a long step gets heartbeat comments; cancel rolls back and the stream ends at cancelled', async () => {
    await put('/v1/sites/cloud', cloudSite);
    await put('/v1/edges/e5', edge);
    const wf = (await post<Workflow>('/v1/workflows', { kind: 'resize-edge', input: { edge: 'e5', sizeBytes: 1 << 30 } })).body;
    const streaming = readSse(h.url, `/v1/workflows/${wf.id}/events`, { token: h.viewer });
    await until(async () => (await h.store.listSteps(wf.id)).some((s) => s.name === 'grow' && s.state === 'running'), 5000, 'the grow step');
    await new Promise((r) => setTimeout(r, 400));

    // one workflow at a time per target
    expectError(await post('/v1/workflows', { kind: 'resize-edge', input: { edge: 'e5', sizeBytes: 1 } }), 409, 'SPW_ERR_CONFLICT');

    const c = await post<Workflow>(`/v1/workflows/${wf.id}/cancel`);
    assert.equal(c.status, 202, c.text);
    assert.ok(['cancelling', 'rolling-back', 'cancelled'].includes(c.body.state));
    const s = await streaming;
    assert.ok(s.ended);
    assert.ok(s.comments.includes('heartbeat'), JSON.stringify(s.comments));
    const states = s.events.filter((e) => e.type === 'state').map((e) => e.data?.state);
    assert.deepEqual(states.slice(-3), ['cancelling', 'rolling-back', 'cancelled']);
    assert.ok(s.events.some((e) => e.type === 'step' && e.step === 'grow' && e.data?.state === 'undone'));
    expectError(await post(`/v1/workflows/${wf.id}/cancel`), 409, 'SPW_ERR_CONFLICT', /nothing to cancel/);
    expectError(await post(`/v1/workflows/${wf.id}/retry`), 409, 'SPW_ERR_CONFLICT', /only a failed workflow/);
    const audit = (await get<{ items: AuditEntry[] }>('/v1/audit?target=e5')).body.items;
    // the cancel audited once (by the engine); the refused second one by the API, with its status
    assert.equal(audit.filter((a) => a.action === 'workflow.cancel' && a.actor === 'root' && a.detail.status === undefined).length, 1);
    assert.equal(audit.filter((a) => a.action === 'workflow.cancel' && a.detail.status === 409).length, 1);
  });

  test('a failed workflow: the stream ends at failed; retry resumes it to success', async () => {
    const wf = (await post<Workflow>('/v1/workflows', { kind: 'detach', input: { instance: 'app' } })).body;
    const s = await readSse(h.url, `/v1/workflows/${wf.id}/events`, { token: h.operator });
    assert.ok(s.ended);
    assert.equal(s.events.at(-1)!.data?.state, 'failed');
    const failed = (await get<Workflow>(`/v1/workflows/${wf.id}`)).body;
    assert.equal(failed.state, 'failed');
    assert.match(failed.error ?? '', /first attempt/);

    const r = await post<Workflow>(`/v1/workflows/${wf.id}/retry`);
    assert.equal(r.status, 202, r.text);
    const rest = await readSse(h.url, `/v1/workflows/${wf.id}/events`, { token: h.operator, lastEventId: String(s.events.at(-1)!.seq) });
    assert.ok(rest.ended);
    assert.equal(rest.events.at(-1)!.data?.state, 'succeeded');
    // replayed from the start, the first failure does not end the stream
    const all = await readSse(h.url, `/v1/workflows/${wf.id}/events`, { token: h.operator });
    assert.ok(all.events.some((e) => e.data?.state === 'failed'));
    assert.equal(all.events.at(-1)!.data?.state, 'succeeded');
  });

  test('bad starts: unknown kind, kind not run here, bad input (400); unknown ids (404)', async () => {
    expectError(await post('/v1/workflows', { kind: 'teleport', input: {} }), 400, 'SPW_ERR_INVALID', /kind/);
    expectError(await post('/v1/workflows', { kind: 'clone', input: { instance: 'app', name: 'app2' } }), 400, 'SPW_ERR_INVALID', /runs no "clone" workflows; it knows/);
    const e = expectError(await post('/v1/workflows', { kind: 'transfer', input: { instance: 'no good' } }), 400, 'SPW_ERR_INVALID');
    assert.match(e.message, /input\.instance/);
    expectError(await post('/v1/workflows', { kind: 'transfer' }), 400, 'SPW_ERR_INVALID', /input/);
    expectError(await get('/v1/workflows/does-not-exist'), 404, 'SPW_ERR_NOT_FOUND');
    expectError(await post('/v1/workflows/does-not-exist/cancel'), 404, 'SPW_ERR_NOT_FOUND');
    expectError(await post('/v1/workflows/does-not-exist/retry'), 404, 'SPW_ERR_NOT_FOUND');
    expectError(await get('/v1/workflows/does-not-exist/events'), 404, 'SPW_ERR_NOT_FOUND');
    const audit = (await get<{ items: AuditEntry[] }>('/v1/audit?limit=50')).body.items;
    assert.ok(audit.some((a) => a.action === 'workflow.start' && a.detail.status === 400), 'refused starts are audited by the API');
  });
});

describe('tokens', () => {
  test('create shows the secret once; it works; list never shows secrets; delete revokes', async () => {
    const r = await post<TokenRecord & { secret: string }>('/v1/tokens', { name: 'ci', role: 'viewer' });
    assert.equal(r.status, 201, r.text);
    S.TokenCreated.parse(r.body);
    assert.match(r.body.secret, /^spw_[A-Za-z0-9_-]{43}$/);
    assert.equal(r.headers['cache-control'], 'no-store');
    assert.equal((await get('/v1/sites', r.body.secret)).status, 200);
    expectError(await put('/v1/sites/x', site, r.body.secret), 403, 'SPW_ERR_FORBIDDEN');
    const stored = await h.store.findToken(hashToken(r.body.secret));
    assert.equal(stored?.id, r.body.id);

    const list = await get<{ items: TokenRecord[] }>('/v1/tokens');
    S.TokenList.parse(list.body);
    assert.ok(list.body.items.some((t) => t.id === r.body.id && t.name === 'ci'));
    assert.ok(!list.text.includes(r.body.secret));
    assert.ok(!list.text.includes('secret'));

    assert.equal((await del(`/v1/tokens/${r.body.id}`)).status, 204);
    expectError(await get('/v1/sites', r.body.secret), 401, 'SPW_ERR_UNAUTHORIZED');
    expectError(await del(`/v1/tokens/${r.body.id}`), 404, 'SPW_ERR_NOT_FOUND');
    expectError(await post('/v1/tokens', { name: 'x', role: 'admin' }), 400, 'SPW_ERR_INVALID', /role/);

    const audit = (await get<{ items: AuditEntry[] }>(`/v1/audit?target=${r.body.id}`)).body.items;
    assert.deepEqual(audit.map((a) => a.action).sort(), ['token.create', 'token.delete', 'token.delete']);
    assert.ok(!JSON.stringify(audit).includes(r.body.secret));
  });

  test('the last operator token cannot be deleted', async () => {
    const ops = (await get<{ items: TokenRecord[] }>('/v1/tokens')).body.items.filter((t) => t.role === 'operator');
    assert.equal(ops.length, 1);
    expectError(await del(`/v1/tokens/${ops[0]!.id}`), 409, 'SPW_ERR_CONFLICT', /last operator token/);
  });
});

test('metrics: requests by route and status, workflows by state and kind', async () => {
  const r = await request(h.url, 'GET', '/metrics');
  assert.match(String(r.headers['content-type']), /text\/plain/);
  assert.match(r.text, /spillway_api_requests_total\{method="GET",route="\/v1\/sites",status="200"\} \d+/);
  assert.match(r.text, /spillway_api_request_duration_seconds_bucket/);
  assert.match(r.text, /spillway_workflows\{state="succeeded",kind="transfer"\} [1-9]/);
  assert.match(r.text, /spillway_workflows\{state="running",kind="detach"\} 0/);
  assert.match(r.text, /spillway_api_event_streams 0/);
});

test('/openapi.json: OpenAPI 3.1, every route documented with responses, every $ref resolves', async () => {
  const r = await request<Record<string, unknown>>(h.url, 'GET', '/openapi.json');
  assert.equal(r.status, 200);
  const doc = r.body as {
    openapi: string;
    info: { title: string; version: string };
    paths: Record<string, Record<string, { operationId: string; responses: Record<string, { description: string; content?: Record<string, { schema: unknown }> }>; parameters?: Array<{ name: string; in: string; required: boolean; schema: unknown }>; requestBody?: { content: Record<string, { schema: unknown }> } }>>;
    components: { schemas: Record<string, unknown>; securitySchemes: Record<string, unknown> };
  };
  assert.equal(doc.openapi, '3.1.0');
  assert.equal(doc.info.version, '0.0.0-test');
  assert.ok(doc.components.securitySchemes.bearer);
  const methods = new Set(['get', 'put', 'post', 'delete', 'patch', 'head', 'options', 'trace']);
  const opIds = new Set<string>();
  let operations = 0;
  for (const [p, item] of Object.entries(doc.paths)) {
    assert.match(p, /^\//);
    const ops = Object.entries(item).filter(([m]) => methods.has(m));
    assert.ok(ops.length > 0, `${p} has operations`);
    for (const [m, o] of ops) {
      operations++;
      assert.ok(o.operationId && !opIds.has(o.operationId), `${m} ${p}: unique operationId`);
      opIds.add(o.operationId);
      assert.ok(Object.keys(o.responses).length > 0, `${m} ${p}: responses`);
      for (const [status, resp] of Object.entries(o.responses)) {
        assert.match(status, /^[1-5]\d\d$/);
        assert.equal(typeof resp.description, 'string');
      }
      // every {param} of the path is a required path parameter
      for (const name of [...p.matchAll(/\{([^}]+)\}/g)].map((x) => x[1])) assert.ok(o.parameters?.some((x) => x.name === name && x.in === 'path' && x.required), `${m} ${p}: ${name}`);
      if (m === 'put' || (m === 'post' && !p.endsWith('/cancel') && !p.endsWith('/retry'))) assert.ok(o.requestBody?.content['application/json'], `${m} ${p}: body`);
    }
  }
  // every route the server has is in the document
  const res = await request<Err>(h.url, 'GET', '/nowhere');
  assert.equal(res.status, 404);
  for (const p of ['/v1/sites', '/v1/sites/{name}', '/v1/edges/{name}', '/v1/hosts/{name}', '/v1/instances/{name}', '/v1/volumes/{name}', '/v1/profiles/{name}', '/v1/workflows', '/v1/workflows/{id}', '/v1/workflows/{id}/events', '/v1/workflows/{id}/cancel', '/v1/workflows/{id}/retry', '/v1/audit', '/v1/tokens', '/v1/tokens/{id}', '/healthz', '/metrics', '/openapi.json', '/v1/test/boom']) {
    assert.ok(doc.paths[p], p);
  }
  // 3 service routes, 4 per inventory kind, 6 for workflows, 4 for tokens and audit, 1 extra
  assert.equal(operations, 3 + 6 * 4 + 6 + 4 + 1);

  // every $ref resolves inside the document
  let refs = 0;
  const resolve = (ref: string): unknown => {
    assert.match(ref, /^#\//, `local ref ${ref}`);
    let node: unknown = doc;
    for (const part of ref.slice(2).split('/').map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'))) {
      node = (node as Record<string, unknown> | undefined)?.[part];
      assert.ok(node !== undefined, `unresolved ${ref}`);
    }
    return node;
  };
  const walk = (v: unknown): void => {
    if (Array.isArray(v)) return v.forEach(walk);
    if (v && typeof v === 'object') {
      for (const [k, x] of Object.entries(v)) {
        if (k === '$ref') {
          refs++;
          resolve(String(x));
        } else walk(x);
      }
    }
  };
  walk(doc);
  assert.ok(refs > 50, `${refs} refs`);
  for (const name of ['Site', 'SitePut', 'Host', 'HostPut', 'Instance', 'Workflow', 'WorkflowStart', 'WorkflowEvent', 'Error', 'TokenCreated']) assert.ok(doc.components.schemas[name], name);
  // request bodies are the input side: defaults make fields optional
  const hostPut = doc.components.schemas.HostPut as { required: string[]; properties: Record<string, unknown> };
  assert.deepEqual([...hostPut.required].sort(), ['edge', 'ramMiB', 'site', 'vcpus']);
  // no leftover JSON Schema $defs / $id that would not resolve in OpenAPI
  assert.ok(!/"\$defs"|"\$id"|#\/\$defs/.test(r.text));
});

test('fuzz: any body and name to PUT /v1/hosts/{name} answers 2xx or 4xx, never 5xx, never hangs', async () => {
  await put('/v1/sites/fz', cloudSite);
  await put('/v1/edges/fz-e', { ...edge, site: 'fz' });
  const valid = { site: 'fz', edge: 'fz-e', vcpus: 4, ramMiB: 4096 };
  const field = fc.constantFrom('site', 'edge', 'vcpus', 'ramMiB', 'iops', 'pricePerHour', 'licences', 'tags', 'ha', 'state', 'provider', 'name', '__proto__', 'constructor');
  const mutated = fc.tuple(fc.dictionary(field, fc.jsonValue()), fc.array(field)).map(([extra, drop]) => {
    const o: Record<string, unknown> = { ...valid };
    for (const [k, v] of Object.entries(extra)) o[k] = v;
    for (const k of drop) delete o[k];
    return JSON.stringify(o);
  });
  const wellFormed = fc
    .record({ vcpus: fc.integer({ min: 1, max: 256 }), ramMiB: fc.integer({ min: 1, max: 1 << 20 }), tags: fc.array(fc.string({ minLength: 1, maxLength: 10 }), { maxLength: 3 }), ha: fc.boolean(), state: fc.constantFrom('up', 'down', 'maintenance') }, { requiredKeys: ['vcpus', 'ramMiB'] })
    .map((o) => JSON.stringify({ ...valid, ...o }));
  const body = fc.oneof(
    wellFormed,
    mutated,
    fc.jsonValue().map((v) => JSON.stringify(v)),
    fc.string({ maxLength: 200 }),
    fc.constantFrom('{', '[', '{"a":', '"\\u12', 'nul', '{"site":"fz"}}', '\u0000', '{"vcpus": 1e400}', '{"vcpus": -0}', JSON.stringify({ ...valid, vcpus: 2 ** 60 })),
  );
  const name = fc.oneof(fc.stringMatching(/^[a-z][a-z0-9-]{0,20}$/), fc.constantFrom('fz-h', 'a', 'x'.repeat(63), 'x'.repeat(64), '..', '.', '-x', 'A_b.c'), fc.string({ minLength: 1, maxLength: 70 }).map(encodeURIComponent));
  let ok = 0;
  await fc.assert(
    fc.asyncProperty(name, body, async (n, b) => {
      const r = await request(h.url, 'PUT', `/v1/hosts/${n}`, { ...op(), raw: b, timeoutMs: 5000 });
      assert.ok(r.status >= 200 && r.status < 500, `${r.status} for ${n} ${b.slice(0, 200)}: ${r.text}`);
      if (r.status < 300) ok++;
      else assert.ok((r.body as Err).error.message, 'a 4xx says why');
    }),
    { numRuns: 300 },
  );
  assert.ok(ok > 0, 'some fuzzed bodies were valid');
  assert.equal((await request(h.url, 'GET', '/healthz')).status, 200);
});
