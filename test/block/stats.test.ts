// StatsDevice: the compliance suite (it must be invisible), plus exact counts of ops, errors,
// bytes and histogram observations in a prom-client registry, per export.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Registry } from 'prom-client';
import { BlockError } from '../../src/block/device.js';
import { MemoryDevice } from '../../src/block/memory.js';
import { ReadOnlyDevice } from '../../src/block/readonly.js';
import { StatsDevice } from '../../src/block/stats.js';
import { registry as defaultRegistry } from '../../src/metrics/registry.js';
import { blockDeviceCompliance, pattern } from './compliance.js';

blockDeviceCompliance('stats(memory)', {
  writable: (size) => Promise.resolve({ device: new StatsDevice(new MemoryDevice(size), { exportName: 'c', registry: new Registry() }) }),
  readonly: async (content) => {
    const mem = new MemoryDevice(content.length);
    await mem.write(0, content);
    return { device: new StatsDevice(new ReadOnlyDevice(mem), { exportName: 'c', registry: new Registry() }) };
  },
});

/** The value of one series: counters by name, histograms by name + suffix ("_count"). */
async function value(reg: Registry, name: string, labels: Record<string, string>, suffix = ''): Promise<number> {
  const metric = reg.getSingleMetric(name);
  assert.ok(metric, `metric ${name} is registered`);
  const data = await metric.get();
  const found = data.values.find(
    (v) =>
      ((v as { metricName?: string }).metricName ?? name) === name + suffix &&
      Object.entries(labels).every(([k, l]) => v.labels[k] === l),
  );
  return found?.value ?? 0;
}

void describe('StatsDevice specifics', () => {
  void it('counts ops, errors, bytes and latency observations per op and export', async () => {
    const reg = new Registry();
    const dev = new StatsDevice(new MemoryDevice(1 << 20), { exportName: 'disk0', registry: reg });
    const other = new StatsDevice(new MemoryDevice(1 << 20), { exportName: 'disk1', registry: reg });
    assert.equal(dev.description, 'stats(memory:1048576)');
    for (let i = 0; i < 3; i++) await dev.read(i * 100, Buffer.alloc(100));
    await dev.write(0, pattern(1, 4096));
    await dev.write(8192, pattern(2, 4096), { fua: true });
    await assert.rejects(dev.write((1 << 20) - 1, Buffer.alloc(2)), (e: unknown) => e instanceof BlockError && e.errno === 'EINVAL');
    await dev.flush();
    await dev.trim(0, 1000);
    await dev.writeZeroes(5000, 2000, { mayTrim: true });
    await dev.blockStatus(0, 1 << 20);
    await dev.cache(0, 4096);
    await other.read(0, Buffer.alloc(7));

    const ops = (op: string, exp = 'disk0') => value(reg, 'spillway_block_ops_total', { export: exp, op });
    const bytes = (op: string) => value(reg, 'spillway_block_bytes_total', { export: 'disk0', op });
    const errors = (op: string) => value(reg, 'spillway_block_errors_total', { export: 'disk0', op });
    const observed = (op: string) => value(reg, 'spillway_block_op_seconds', { export: 'disk0', op }, '_count');
    assert.equal(await ops('read'), 3);
    assert.equal(await ops('write'), 3, 'failed requests count as requests');
    assert.equal(await errors('write'), 1);
    assert.equal(await errors('read'), 0);
    assert.equal(await ops('flush'), 1);
    assert.equal(await ops('trim'), 1);
    assert.equal(await ops('zero'), 1);
    assert.equal(await ops('block_status'), 1);
    assert.equal(await ops('cache'), 1);
    assert.equal(await bytes('read'), 300);
    assert.equal(await bytes('write'), 8192, 'bytes of failed writes are not counted');
    assert.equal(await bytes('trim'), 1000);
    assert.equal(await bytes('zero'), 2000);
    for (const op of ['read', 'write', 'flush', 'trim', 'zero', 'block_status', 'cache']) {
      assert.equal(await observed(op), await ops(op), `one latency observation per ${op}`);
    }
    assert.equal(await ops('read', 'disk1'), 1);
    const text = await reg.metrics();
    assert.match(text, /spillway_block_ops_total\{export="disk0",op="read"\} 3/);
    assert.match(text, /spillway_block_bytes_total\{export="disk1",op="read"\} 7/);
    await dev.close();
    await other.close();
  });

  void it('counts a layer below that throws synchronously as a failed request', async () => {
    const reg = new Registry();
    const inner = new MemoryDevice(4096);
    inner.read = () => {
      throw new BlockError('EIO', 'boom');
    };
    const dev = new StatsDevice(inner, { exportName: 'x', registry: reg });
    await assert.rejects(dev.read(0, Buffer.alloc(1)), /boom/);
    assert.equal(await value(reg, 'spillway_block_errors_total', { export: 'x', op: 'read' }), 1);
    assert.equal(await value(reg, 'spillway_block_ops_total', { export: 'x', op: 'read' }), 1);
  });

  void it('uses the process-wide registry by default', async () => {
    const dev = new StatsDevice(new MemoryDevice(4096), { exportName: 'default-registry-test' });
    await dev.write(0, Buffer.alloc(10, 1));
    assert.equal(await value(defaultRegistry, 'spillway_block_bytes_total', { export: 'default-registry-test', op: 'write' }), 10);
    await dev.close();
  });
});
