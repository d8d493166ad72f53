// Host choice: hard filters are never violated, a fitting host is always found when one exists,
// the choice is the best score, and the order of the inventory does not change the answer.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';

import { chooseHost, type HostUsage, type PlacementNeed } from '../../src/control/placement.js';
import type { Host, Site } from '../../src/control/types.js';

const sites: Site[] = [
  { name: 'dc', kind: 'onprem', region: 'eu', tags: ['eu'], createdAt: '' },
  { name: 'cloud-a', kind: 'cloud', region: 'eu', tags: ['eu', 'pci'], createdAt: '' },
  { name: 'cloud-b', kind: 'cloud', region: 'us', tags: [], createdAt: '' },
];
const word = fc.constantFrom('win', 'rhel', 'sql', 'eu', 'pci', 'hipaa');

const hostArb = fc.record({
  name: fc.stringMatching(/^[a-z][a-z0-9]{0,6}$/),
  site: fc.constantFrom('dc', 'cloud-a', 'cloud-b', 'gone'),
  provider: fc.constant('local'),
  vcpus: fc.integer({ min: 1, max: 64 }),
  ramMiB: fc.integer({ min: 256, max: 65536 }),
  iops: fc.integer({ min: 0, max: 100000 }),
  pricePerHour: fc.double({ min: 0, max: 10, noNaN: true }),
  licences: fc.uniqueArray(word, { maxLength: 3 }),
  tags: fc.uniqueArray(word, { maxLength: 3 }),
  ha: fc.boolean(),
  edge: fc.constant('e'),
  state: fc.constantFrom('up', 'up', 'up', 'down', 'maintenance'),
  createdAt: fc.constant(''),
}) as fc.Arbitrary<Host>;

const needArb: fc.Arbitrary<PlacementNeed> = fc.record({
  vcpus: fc.integer({ min: 1, max: 16 }),
  ramMiB: fc.integer({ min: 128, max: 16384 }),
  iops: fc.integer({ min: 0, max: 20000 }),
  licences: fc.uniqueArray(word, { maxLength: 2 }),
  tags: fc.uniqueArray(word, { maxLength: 2 }),
  ha: fc.boolean(),
  family: fc.constantFrom('f1', 'f2'),
});

const usageArb = (hosts: Host[]) =>
  fc.tuple(...hosts.map(() => fc.record({ vcpus: fc.integer({ min: 0, max: 32 }), ramMiB: fc.integer({ min: 0, max: 32768 }), iops: fc.integer({ min: 0, max: 50000 }), families: fc.uniqueArray(fc.constantFrom('f1', 'f2')) }))).map((us) => new Map<string, HostUsage>(hosts.map((h, i) => [h.name, us[i]!])));

const scenario = fc
  .uniqueArray(hostArb, { selector: (h) => h.name, maxLength: 8 })
  .chain((hosts) => fc.tuple(fc.constant(hosts), needArb, usageArb(hosts)));

function fits(h: Host, need: PlacementNeed, u: HostUsage | undefined): boolean {
  const site = sites.find((s) => s.name === h.site);
  const used = u ?? { vcpus: 0, ramMiB: 0, iops: 0, families: [] };
  return (
    h.state === 'up' &&
    site?.kind === 'cloud' &&
    h.vcpus - used.vcpus >= need.vcpus &&
    h.ramMiB - used.ramMiB >= need.ramMiB &&
    h.iops - used.iops >= need.iops &&
    need.licences.every((l) => h.licences.includes(l)) &&
    need.tags.every((t) => h.tags.includes(t) || site.tags.includes(t)) &&
    (!need.ha || h.ha)
  );
}

test('placement: the choice passes every hard filter, and some host is chosen whenever one fits', () => {
  fc.assert(
    fc.property(scenario, ([hosts, need, usage]) => {
      const p = chooseHost(need, hosts, sites, usage);
      const fitting = hosts.filter((h) => fits(h, need, usage.get(h.name)));
      assert.equal(p.chosen === null, fitting.length === 0, p.explanation);
      assert.deepEqual(p.candidates.map((c) => c.host).sort(), fitting.map((h) => h.name).sort());
      assert.equal(p.rejected.length + p.candidates.length, hosts.length);
      for (const r of p.rejected) assert.ok(r.reasons.length > 0);
      if (p.chosen !== null) {
        assert.ok(fits(hosts.find((h) => h.name === p.chosen)!, need, usage.get(p.chosen)));
        for (const c of p.candidates) assert.ok(c.score <= p.candidates[0]!.score);
      }
    }),
    { numRuns: 500 },
  );
});

test('placement: the order of the inventory does not change the answer', () => {
  fc.assert(
    fc.property(scenario.chain(([h, n, u]) => fc.tuple(fc.constant(h), fc.constant(n), fc.constant(u), fc.shuffledSubarray(h, { minLength: h.length }))), ([hosts, need, usage, shuffled]) => {
      assert.deepEqual(chooseHost(need, shuffled, sites, usage), chooseHost(need, hosts, sites, usage));
    }),
    { numRuns: 300 },
  );
});

test('placement: cheaper wins when all else is equal; the explanation names the winner and the filters', () => {
  const base: Host = { name: 'a', site: 'cloud-a', provider: 'local', vcpus: 8, ramMiB: 8192, iops: 1000, pricePerHour: 2, licences: [], tags: [], ha: false, edge: 'e', state: 'up', createdAt: '' };
  const hosts = [base, { ...base, name: 'b', pricePerHour: 1 }, { ...base, name: 'c', site: 'dc' }];
  const p = chooseHost({ vcpus: 1, ramMiB: 256, iops: 10, licences: [], tags: [], ha: false }, hosts, sites, new Map());
  assert.equal(p.chosen, 'b');
  assert.match(p.explanation, /^b scores/);
  assert.deepEqual(p.rejected, [{ host: 'c', reasons: ['site dc is not a cloud site'] }]);
  const none = chooseHost({ vcpus: 1, ramMiB: 256, iops: 10, licences: ['win'], tags: [], ha: true }, hosts, sites, new Map());
  assert.equal(none.chosen, null);
  assert.match(none.explanation, /no licence for win/);
});
