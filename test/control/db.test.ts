// The control plane's store (src/control/db/), the same tests on SQLite and on a real
// PostgreSQL: inventory upserts, workflows and the one-unfinished-workflow-per-target rule
// (also under concurrency, from two stores), steps, events (seq per workflow, a property test),
// the audit log, tokens (hash only), leases, migrations, and corrupt rows as typed errors.
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import fc from 'fast-check';

import { CorruptDataError, hashTokenSecret, isUniqueViolation, MIGRATIONS, migrate, openStore, parseStoreUrl, type SqlStore } from '../../src/control/db/index.js';
import { ConflictError, InvalidInputError, NotFoundError, type Instance } from '../../src/control/types.js';
import { DB_KINDS, testDatabases } from '../helpers/postgres.js';
import { tempDir } from '../helpers/proc.js';

const dbs = testDatabases();
after(() => dbs.close());

const instance = (name: string): Omit<Instance, 'createdAt'> => ({
  name,
  kind: 'vm',
  origin: 'onprem-1',
  host: null,
  state: 'stopped',
  placement: 'origin',
  spec: { kernel: '/k', initrd: '/i', append: 'console=ttyS0', memoryMiB: 512, vcpus: 1, mac: '52:54:00:00:00:01' },
  needs: { licences: [], tags: ['eu'], ha: false, iops: 100 },
  identity: { hostname: name, machineId: 'abc' },
});

describe('store URLs', () => {
  it('sqlite:PATH, sqlite:///PATH, a plain path, sqlite::memory: and postgres URLs', () => {
    assert.deepEqual(parseStoreUrl('sqlite:/var/lib/x.db'), { kind: 'sqlite', file: '/var/lib/x.db' });
    assert.deepEqual(parseStoreUrl('sqlite:///var/lib/x.db'), { kind: 'sqlite', file: '/var/lib/x.db' });
    assert.deepEqual(parseStoreUrl('rel/x.db'), { kind: 'sqlite', file: 'rel/x.db' });
    assert.deepEqual(parseStoreUrl('sqlite::memory:'), { kind: 'sqlite', file: ':memory:' });
    assert.deepEqual(parseStoreUrl('postgresql://u@h/db'), { kind: 'postgres', url: 'postgresql://u@h/db' });
    assert.deepEqual(parseStoreUrl('postgres://u@h:5/db'), { kind: 'postgres', url: 'postgres://u@h:5/db' });
    assert.throws(() => parseStoreUrl('sqlite:'));
  });

  it('a SQLite file is created 0600, in WAL mode with synchronous=FULL', async () => {
    const tmp = await tempDir('spw-db-mode-');
    try {
      const file = path.join(tmp.dir, 'c.db');
      const s = await openStore(file);
      try {
        assert.equal(statSync(file).mode & 0o777, 0o600);
        assert.equal((await s.sql.all('PRAGMA journal_mode'))[0]?.journal_mode, 'wal');
        assert.equal((await s.sql.all('PRAGMA synchronous'))[0]?.synchronous, 2);
        await s.putSite({ name: 's', kind: 'cloud', region: 'r', tags: [] });
        assert.equal(statSync(`${file}-wal`).mode & 0o777, 0o600);
      } finally {
        await s.close();
      }
    } finally {
      await tmp.cleanup();
    }
  });
});

for (const kind of DB_KINDS) {
  describe(`store on ${kind}`, () => {
    let url: string;
    let store: SqlStore;
    before(async () => {
      url = await dbs.fresh(kind);
      store = await openStore(url);
    });
    after(() => store?.close());

    it('migrations: recorded, idempotent at reopen, a newer database refused', async () => {
      assert.equal(store.kind, kind);
      const rows = await store.sql.all<{ version: number }>('SELECT version FROM schema_migrations ORDER BY version');
      assert.deepEqual(
        rows.map((r) => Number(r.version)),
        MIGRATIONS.map((m) => m.version),
      );
      assert.deepEqual(await migrate(store.sql), []);
      const again = await openStore(url);
      await again.close();
      const future = [...MIGRATIONS, { version: 99, name: 'future', up: () => ['CREATE TABLE future_thing (x INTEGER)'] }];
      assert.deepEqual(await migrate(store.sql, future), [99]);
      await assert.rejects(migrate(store.sql), /schema is version 99, newer than this build/);
      await store.sql.exec('DROP TABLE future_thing');
      await store.sql.exec('DELETE FROM schema_migrations WHERE version = 99');
    });

    it('sites, edges, hosts: upsert by name keeps createdAt, list, filter, delete', async () => {
      const s1 = await store.putSite({ name: 'onprem-1', kind: 'onprem', region: 'eu-west', tags: ['eu'] });
      await store.putSite({ name: 'cloud-1', kind: 'cloud', region: 'eu-west', tags: ['eu', 'pci'] });
      const s1b = await store.putSite({ name: 'onprem-1', kind: 'onprem', region: 'eu-central', tags: [] });
      assert.equal(s1b.createdAt, s1.createdAt);
      assert.equal(s1b.region, 'eu-central');
      assert.deepEqual((await store.getSite('cloud-1'))?.tags, ['eu', 'pci']);
      assert.deepEqual(
        (await store.listSites()).map((s) => s.name),
        ['cloud-1', 'onprem-1'],
      );
      assert.equal(await store.getSite('nope'), null);

      const e = await store.putEdge({ name: 'edge-a', site: 'cloud-1', control: '/run/a.sock', nbd: '127.0.0.1:10809', cacheBytes: 2 ** 40 });
      assert.equal(e.cacheBytes, 2 ** 40);
      assert.equal(e.link, undefined);
      await store.putEdge({ name: 'edge-b', site: 'onprem-1', control: '/run/b.sock', link: '10.0.0.1:7000' });
      assert.deepEqual(
        (await store.listEdges('onprem-1')).map((x) => x.name),
        ['edge-b'],
      );
      assert.equal((await store.listEdges()).length, 2);
      const e2 = await store.putEdge({ name: 'edge-a', site: 'cloud-1', control: '/run/a.sock' });
      assert.equal(e2.nbd, undefined, 'an upsert replaces the record');

      const h = await store.putHost({
        name: 'h1',
        site: 'cloud-1',
        provider: 'local',
        vcpus: 8,
        ramMiB: 16384,
        iops: 5000,
        pricePerHour: 0.125,
        licences: ['win'],
        tags: ['eu'],
        ha: true,
        edge: 'edge-a',
        state: 'up',
      });
      assert.equal(h.ha, true);
      assert.equal(h.pricePerHour, 0.125);
      assert.deepEqual(await store.getHost('h1'), h);
      assert.deepEqual(await store.listHosts('onprem-1'), []);
      assert.equal(await store.deleteHost('h1'), true);
      assert.equal(await store.deleteHost('h1'), false);
      assert.equal(await store.deleteEdge('edge-b'), true);
      assert.equal(await store.deleteSite('onprem-1'), true);
    });

    it('instances, volumes, profiles: partial updates, NotFoundError for a missing one', async () => {
      const i = await store.putInstance(instance('vm-1'));
      assert.deepEqual(i.spec.memoryMiB, 512);
      const moved = await store.updateInstance('vm-1', { host: 'h1', state: 'running', placement: 'streamed' });
      assert.equal(moved.host, 'h1');
      assert.equal(moved.createdAt, i.createdAt);
      assert.deepEqual(moved.needs, i.needs);
      const clone = await store.putInstance({ ...instance('vm-2'), cloneOf: 'vm-1' });
      assert.equal(clone.cloneOf, 'vm-1');
      assert.deepEqual(
        (await store.listInstances()).map((x) => x.name),
        ['vm-1', 'vm-2'],
      );
      await assert.rejects(store.updateInstance('ghost', { state: 'running' }), NotFoundError);

      await store.putVolume({ name: 'vol-1', instance: 'vm-1', path: '/d/1.img', sizeBytes: 3 * 2 ** 40, family: 'base', policy: 'origin' });
      const v = await store.updateVolume('vol-1', { hydratedPath: '/h/1.img' });
      assert.equal(v.hydratedPath, '/h/1.img');
      assert.equal(v.sizeBytes, 3 * 2 ** 40);
      assert.deepEqual(
        (await store.listVolumes('vm-1')).map((x) => x.name),
        ['vol-1'],
      );
      await assert.rejects(store.updateVolume('ghost', { policy: 'x' }), NotFoundError);
      assert.equal(await store.deleteVolume('vol-1'), true);
      assert.equal(await store.deleteInstance('vm-2'), true);

      await store.putProfile({ name: 'boot-a', family: 'base', volume: 'vol-1', chunks: 42 });
      await store.putProfile({ name: 'boot-b', family: 'other', volume: 'vol-9', chunks: 1 });
      assert.deepEqual(
        (await store.listProfiles('base')).map((p) => [p.name, p.chunks]),
        [['boot-a', 42]],
      );
      assert.equal(await store.deleteProfile('boot-b'), true);
    });

    it('workflows: create pending, one unfinished per target (ConflictError names it), finished frees the target', async () => {
      const w = await store.createWorkflow({ id: 'wf-1', kind: 'transfer', target: 'vm-1', input: { instance: 'vm-1', n: 1 }, actor: 'alice' });
      assert.equal(w.state, 'pending');
      assert.equal(w.step, 0);
      assert.deepEqual(w.outputs, {});
      assert.deepEqual(w.input, { instance: 'vm-1', n: 1 });
      await assert.rejects(store.createWorkflow({ id: 'wf-2', kind: 'clone', target: 'vm-1', input: {}, actor: 'bob' }), (e: unknown) => {
        assert.ok(e instanceof ConflictError);
        assert.match(e.message, /wf-1/);
        return true;
      });
      for (const state of ['running', 'failed', 'cancelling', 'rolling-back'] as const) {
        await store.updateWorkflow('wf-1', { state });
        await assert.rejects(store.createWorkflow({ id: 'wf-2', kind: 'clone', target: 'vm-1', input: {}, actor: 'bob' }), ConflictError, state);
      }
      const u = await store.updateWorkflow('wf-1', { state: 'succeeded', step: 3, outputs: { a: { x: 1 } }, error: 'e' });
      assert.deepEqual(u.outputs, { a: { x: 1 } });
      assert.equal(u.error, 'e');
      assert.equal((await store.updateWorkflow('wf-1', { error: undefined })).error, undefined, 'error: undefined clears it');
      const w2 = await store.createWorkflow({ id: 'wf-2', kind: 'clone', target: 'vm-1', input: {}, actor: 'bob' });
      assert.equal(w2.state, 'pending');
      await assert.rejects(store.createWorkflow({ id: 'wf-2', kind: 'clone', target: 'vm-9', input: {}, actor: 'bob' }), ConflictError);
      await assert.rejects(store.updateWorkflow('wf-1', { state: 'running' }), ConflictError, 'reopening a finished workflow while another is unfinished');
      await assert.rejects(store.updateWorkflow('ghost', { step: 1 }), NotFoundError);
      await store.updateWorkflow('wf-2', { state: 'cancelled' });
      await store.createWorkflow({ id: 'wf-3', kind: 'migrate', target: 'vm-3', input: {}, actor: 'bob' });

      assert.deepEqual(
        (await store.listWorkflows({ target: 'vm-1' })).map((x) => x.id),
        ['wf-2', 'wf-1'],
      );
      assert.deepEqual(
        (await store.listWorkflows({ state: 'pending' })).map((x) => x.id),
        ['wf-3'],
      );
      assert.deepEqual(
        (await store.listWorkflows({ kind: 'clone' })).map((x) => x.id),
        ['wf-2'],
      );
      assert.equal((await store.listWorkflows({ limit: 2 })).length, 2);
      assert.equal(await store.getWorkflow('ghost'), null);
    });

    it('transitionWorkflow is compare-and-set; leases exclude a second owner until they expire', async () => {
      await store.createWorkflow({ id: 'wf-t', kind: 'transfer', target: 'vm-t', input: {}, actor: 'a' });
      assert.equal(await store.transitionWorkflow('wf-t', ['running'], { state: 'failed' }), null);
      assert.equal((await store.transitionWorkflow('wf-t', ['pending', 'failed'], { state: 'running' }))?.state, 'running');
      assert.deepEqual(await store.workflowIds(['running']), ['wf-t']);
      assert.equal(await store.acquireLease('wf-t', 'svc-a', 60_000), true);
      assert.equal(await store.acquireLease('wf-t', 'svc-a', 60_000), true, 'the holder again');
      assert.equal(await store.acquireLease('wf-t', 'svc-b', 60_000), false);
      assert.equal((await store.renewLease('wf-t', 'svc-a', 60_000))?.id, 'wf-t');
      assert.equal(await store.renewLease('wf-t', 'svc-b', 60_000), null);
      const l = await store.leaseOf('wf-t');
      assert.equal(l.owner, 'svc-a');
      assert.ok(l.expiresAt !== null && Math.abs(l.expiresAt - (Date.now() + 60_000)) < 10_000, `expiry near now + 60 s: ${l.expiresAt}`);
      await store.releaseLease('wf-t', 'svc-b'); // not the holder: no effect
      assert.equal((await store.leaseOf('wf-t')).owner, 'svc-a');
      await store.releaseLease('wf-t', 'svc-a');
      assert.equal(await store.acquireLease('wf-t', 'svc-b', 1), true);
      await new Promise((r) => setTimeout(r, 20));
      assert.equal(await store.acquireLease('wf-t', 'svc-a', 60_000), true, 'an expired lease is taken over');
      assert.equal(await store.renewLease('wf-t', 'svc-b', 60_000), null, 'the old holder learns it lost it');
    });

    it('steps: upsert by (workflow, index), output JSON kept (null too)', async () => {
      await store.createWorkflow({ id: 'wf-s', kind: 'transfer', target: 'vm-s', input: {}, actor: 'a' });
      const t = new Date().toISOString();
      await store.putStep({ workflow: 'wf-s', index: 1, name: 'copy', state: 'running', attempts: 1, startedAt: t });
      await store.putStep({ workflow: 'wf-s', index: 0, name: 'plan', state: 'done', attempts: 1, output: null, startedAt: t, endedAt: t });
      await store.putStep({ workflow: 'wf-s', index: 1, name: 'copy', state: 'done', attempts: 2, output: { bytes: 5, list: [1, 'x'] }, startedAt: t, endedAt: t });
      const steps = await store.listSteps('wf-s');
      assert.deepEqual(
        steps.map((s) => [s.index, s.name, s.state, s.attempts, s.output]),
        [
          [0, 'plan', 'done', 1, null],
          [1, 'copy', 'done', 2, { bytes: 5, list: [1, 'x'] }],
        ],
      );
      assert.equal(steps[0]?.error, undefined);
      await assert.rejects(store.putStep({ workflow: 'wf-s', index: 2, name: 'x', state: 'bogus' as never, attempts: 1, startedAt: t }), InvalidInputError);
    });

    it('events: seq per workflow from 1, afterSeq and limit, NotFoundError for an unknown workflow', async () => {
      await store.createWorkflow({ id: 'wf-e1', kind: 'transfer', target: 'vm-e1', input: {}, actor: 'a' });
      await store.createWorkflow({ id: 'wf-e2', kind: 'transfer', target: 'vm-e2', input: {}, actor: 'a' });
      const a = await store.appendEvent({ workflow: 'wf-e1', type: 'state', message: 'running', data: { state: 'running' } });
      const b = await store.appendEvent({ workflow: 'wf-e2', type: 'step', step: 'copy', message: 'copy: running' });
      const c = await store.appendEvent({ workflow: 'wf-e1', type: 'progress', step: 'copy', fraction: 0.5, message: 'half' });
      assert.deepEqual([a.seq, b.seq, c.seq], [1, 1, 2]);
      assert.equal(c.fraction, 0.5);
      assert.ok(!Number.isNaN(Date.parse(c.at)));
      assert.deepEqual(
        (await store.listEvents('wf-e1')).map((e) => e.seq),
        [1, 2],
      );
      assert.deepEqual(
        (await store.listEvents('wf-e1', 1)).map((e) => e.message),
        ['half'],
      );
      assert.deepEqual(
        (await store.listEvents('wf-e1', 0, 1)).map((e) => e.seq),
        [1],
      );
      assert.deepEqual((await store.listEvents('wf-e1'))[0]?.data, { state: 'running' });
      await assert.rejects(store.appendEvent({ workflow: 'ghost', type: 'log', message: 'x' }), NotFoundError);
    });

    it('property: concurrent appends give every workflow seq 1..n, strictly increasing, in append order per caller', async () => {
      const other = await openStore(url); // a second connection pool / SQLite connection
      try {
        let run = 0;
        await fc.assert(
          fc.asyncProperty(fc.array(fc.tuple(fc.integer({ min: 0, max: 2 }), fc.boolean()), { minLength: 1, maxLength: 40 }), async (ops) => {
            const ids = [0, 1, 2].map((k) => `prop-${run}-${k}`);
            run++;
            for (const id of ids) await store.createWorkflow({ id, kind: 'transfer', target: id, input: {}, actor: 'p' });
            const got = await Promise.all(ops.map(([k, useOther], n) => (useOther ? other : store).appendEvent({ workflow: ids[k]!, type: 'log', message: `op ${n}` })));
            for (const [k, id] of ids.entries()) {
              const evs = await store.listEvents(id);
              const mine = ops.filter(([x]) => x === k).length;
              assert.deepEqual(
                evs.map((e) => e.seq),
                Array.from({ length: mine }, (_, i) => i + 1),
              );
              // what appendEvent answered is what was stored
              const answered = got.filter((e) => e.workflow === id).sort((x, y) => x.seq - y.seq);
              assert.deepEqual(
                answered.map((e) => [e.seq, e.message]),
                evs.map((e) => [e.seq, e.message]),
              );
              const after = Math.floor(mine / 2);
              assert.deepEqual(
                (await store.listEvents(id, after, 3)).map((e) => e.seq),
                evs.filter((e) => e.seq > after).slice(0, 3).map((e) => e.seq),
              );
            }
          }),
          { numRuns: kind === 'sqlite' ? 40 : 25 },
        );
      } finally {
        await other.close();
      }
    });

    it('concurrency: two stores racing createWorkflow on one target: exactly one wins, many times over', async () => {
      const other = await openStore(url);
      try {
        for (let round = 0; round < 20; round++) {
          const target = `race-${round}`;
          const r = await Promise.allSettled([
            store.createWorkflow({ id: `race-${round}-a`, kind: 'transfer', target, input: {}, actor: 'a' }),
            other.createWorkflow({ id: `race-${round}-b`, kind: 'transfer', target, input: {}, actor: 'b' }),
            store.createWorkflow({ id: `race-${round}-c`, kind: 'transfer', target, input: {}, actor: 'c' }),
            other.createWorkflow({ id: `race-${round}-d`, kind: 'transfer', target, input: {}, actor: 'd' }),
          ]);
          const won = r.filter((x) => x.status === 'fulfilled');
          assert.equal(won.length, 1, `round ${round}: ${r.map((x) => (x.status === 'fulfilled' ? 'won' : String(x.reason))).join('; ')}`);
          const winner = (won[0] as PromiseFulfilledResult<{ id: string }>).value.id;
          for (const x of r) {
            if (x.status === 'rejected') {
              assert.ok(x.reason instanceof ConflictError, String(x.reason));
              assert.match((x.reason as Error).message, new RegExp(winner));
            }
          }
          assert.equal((await store.listWorkflows({ target })).length, 1);
        }
      } finally {
        await other.close();
      }
    });

    it('the database itself refuses a second unfinished workflow on a target (partial unique index), whatever the client checks', async () => {
      await store.createWorkflow({ id: 'idx-1', kind: 'transfer', target: 'vm-idx', input: {}, actor: 'a' });
      const insert = (id: string, finished: number) =>
        store.sql.exec(
          `INSERT INTO workflows (id, kind, target, input, state, step, outputs, actor, created_at, updated_at, finished, event_seq)
           VALUES (?, 'transfer', 'vm-idx', '{}', ?, 0, '{}', 'raw', 'now', 'now', ?, 0)`,
          [id, finished ? 'succeeded' : 'running', finished],
        );
      await assert.rejects(insert('idx-2', 0), (e: unknown) => isUniqueViolation(e));
      assert.equal(await insert('idx-3', 1), 1, 'finished ones do not count');
    });

    it('audit: newest first, by target, limit', async () => {
      await store.audit({ actor: 'alice', action: 'host.create', target: 'h1', detail: { vcpus: 8 } });
      await store.audit({ actor: 'bob', action: 'workflow.start', target: 'vm-1', detail: { workflow: 'wf-1' } });
      await store.audit({ actor: 'bob', action: 'workflow.cancel', target: 'vm-1', detail: {} });
      const vm = await store.listAudit({ target: 'vm-1' });
      assert.deepEqual(
        vm.map((e) => e.action),
        ['workflow.cancel', 'workflow.start'],
      );
      assert.ok(vm[0]!.id > vm[1]!.id);
      assert.deepEqual(vm[1]?.detail, { workflow: 'wf-1' });
      assert.equal((await store.listAudit({ limit: 1 }))[0]?.action, 'workflow.cancel');
    });

    it('tokens: only the SHA-256 of the secret is stored; found by hash; bad hashes refused', async () => {
      const secret = 'spw_not-so-secret';
      const hash = hashTokenSecret(secret);
      assert.match(hash, /^[0-9a-f]{64}$/);
      const t = await store.createToken({ id: 'tok1', name: 'ci', role: 'operator', secretHash: hash });
      assert.deepEqual(Object.keys(t).sort(), ['createdAt', 'id', 'name', 'role']);
      assert.deepEqual(await store.findToken(hash), t);
      assert.equal(await store.findToken(hashTokenSecret('other')), null);
      await assert.rejects(store.createToken({ id: 'tok2', name: 'x', role: 'viewer', secretHash: secret }), InvalidInputError);
      await assert.rejects(store.createToken({ id: 'tok2', name: 'x', role: 'viewer', secretHash: hash }), ConflictError);
      const raw = JSON.stringify(await store.sql.all('SELECT * FROM tokens'));
      assert.ok(!raw.includes(secret), 'the secret is not in the table');
      assert.deepEqual(
        (await store.listTokens()).map((x) => x.id),
        ['tok1'],
      );
      assert.equal(await store.deleteToken('tok1'), true);
      assert.equal(await store.deleteToken('tok1'), false);
    });

    it('corrupt JSON in a row is a CorruptDataError naming the row and column, not a crash', async () => {
      await store.createWorkflow({ id: 'wf-bad', kind: 'transfer', target: 'vm-bad', input: {}, actor: 'a' });
      await store.sql.exec("UPDATE workflows SET outputs = '{not json' WHERE id = ?", ['wf-bad']);
      await assert.rejects(store.getWorkflow('wf-bad'), (e: unknown) => {
        assert.ok(e instanceof CorruptDataError);
        assert.equal(e.code, 'SPW_ERR_CORRUPT');
        assert.match(e.message, /workflow wf-bad: column outputs holds invalid JSON/);
        return true;
      });
      await assert.rejects(store.listWorkflows(), CorruptDataError);
      assert.ok((await store.workflowIds(['pending'])).includes('wf-bad'), 'ids are still listed');
      await store.sql.exec("UPDATE workflows SET outputs = '[1]' WHERE id = ?", ['wf-bad']);
      await assert.rejects(store.getWorkflow('wf-bad'), /does not hold a JSON object/);
      await store.sql.exec("UPDATE workflows SET outputs = '{}', state = 'cancelled', finished = 1 WHERE id = ?", ['wf-bad']);
      await store.putSite({ name: 'bad-site', kind: 'cloud', region: 'r', tags: [] });
      await store.sql.exec("UPDATE sites SET tags = '[1, 2]' WHERE name = ?", ['bad-site']);
      await assert.rejects(store.getSite('bad-site'), /site bad-site: column tags does not hold a JSON array of strings/);
      await store.deleteSite('bad-site');
    });
  });
}
