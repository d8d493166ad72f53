// Edge configuration: sizes, durations, addresses, and validation that says where and what.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { ConfigError, parseAddress, parseDuration, parseEdgeConfig, parseSize } from '../../src/edge/config.js';

test('sizes, durations and addresses parse in their documented forms', () => {
  assert.equal(parseSize('64KiB'), 65536);
  assert.equal(parseSize('10GiB'), 10 * 1024 ** 3);
  assert.equal(parseSize('1.5G'), 1.5 * 1024 ** 3);
  assert.equal(parseSize(4096), 4096);
  assert.throws(() => parseSize('lots'), /not a size/);
  assert.equal(parseDuration('120s'), 120000);
  assert.equal(parseDuration('500ms'), 500);
  assert.equal(parseDuration('2m'), 120000);
  assert.throws(() => parseDuration('soon'), /not a duration/);
  assert.deepEqual(parseAddress('127.0.0.1:7400'), { host: '127.0.0.1', port: 7400 });
  assert.deepEqual(parseAddress('[::1]:7400'), { host: '::1', port: 7400 });
  assert.deepEqual(parseAddress(':7400'), { host: '0.0.0.0', port: 7400 });
  assert.throws(() => parseAddress('host:99999'), /above 65535/);
});

const base = `
site: cloud
state: state
tls: { ca: pki/ca.pem, cert: pki/cloud.pem, key: pki/cloud.key }
cache: { dir: cache, size: 1GiB }
peers: [ { name: onprem, address: "127.0.0.1:7400" } ]
volumes:
  - { name: web, peer: onprem, ioTimeout: 30s }
  - { name: disk, source: disk.img, chunkSize: 128KiB }
`;

test('a valid configuration gets defaults and absolute paths', () => {
  const c = parseEdgeConfig(base, '/etc/spillway');
  assert.equal(c.state, '/etc/spillway/state');
  assert.equal(c.tls.cert, '/etc/spillway/pki/cloud.pem');
  assert.equal(c.cache?.size, 1024 ** 3);
  assert.equal(c.peers[0]?.connections, 2);
  assert.equal(c.link.window, 8 * 1024 * 1024);
  const [remote, local] = c.volumes;
  assert.ok(remote && 'peer' in remote && remote.ioTimeout === 30000 && remote.readAhead === 64 && remote.writes === 'remote-only' && remote.rpo === 30000);
  assert.ok(local && 'source' in local && local.source === '/etc/spillway/disk.img' && local.chunkSize === 131072 && local.format === 'raw');
});

test('mistakes are reported with their path in the file', () => {
  assert.throws(() => parseEdgeConfig(base.replace('size: 1GiB', 'size: huge'), '/x', 'edge.yaml'), (e: unknown) => e instanceof ConfigError && /cache\.size: "huge" is not a size/.test(e.message) && /edge\.yaml/.test(e.message));
  assert.throws(() => parseEdgeConfig(base.replace('site: cloud', 'site: cloud\nsurprise: 1'), '/x'), /surprise/);
  assert.throws(() => parseEdgeConfig(base.replace('peer: onprem', 'peer: nowhere'), '/x'), /names peer "nowhere"/);
  assert.throws(() => parseEdgeConfig(base.replace('chunkSize: 128KiB', 'chunkSize: 3000'), '/x'), /power of two/);
  assert.throws(() => parseEdgeConfig(base.replace('cache: { dir: cache, size: 1GiB }\n', ''), '/x'), /needs a cache/);
  assert.throws(() => parseEdgeConfig('site: [', '/x'), /not valid YAML/);
});
