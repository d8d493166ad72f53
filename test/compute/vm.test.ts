// The QEMU driver against real QEMU (TCG) and the sample guest (scripts/vm/build-vm.sh --guest,
// docs/vm-images.md), one boot: a child process plays the management service, starts the VM
// with a NoCloud config drive through the local provider and is killed with SIGKILL; the VM
// survives, and this process attaches to it from the state directory. Then: the identity the
// guest read from the drive, console exec, pause/resume with their QMP events, block and CPU
// stats, a crash-consistent snapshot of the running VM's disk, stop, and "gone" afterwards.
// Every QEMU started here is killed by pid at the end whatever happens.

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { copyFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, it } from 'node:test';

import { ComputeError, LocalProvider, QemuVm, QmpError, buildConfigDrive, machineIdFor, type VmHandleInfo } from '../../src/compute/qemu/index.js';
import { ROOT, haveCommand, run, startProc, tempDir } from '../helpers/proc.js';
import { GUEST_APPEND, ensureGuestImages, parseGuestIdentity, type VmImages } from '../helpers/vm.js';

const BOOT_TIMEOUT_MS = 240_000;
const CHILD = path.join(ROOT, 'test', 'compute', 'start-vm.child.ts');

/** SIGKILL every pid that still runs (QEMUs this file started, by pid). */
async function killAll(pids: Iterable<number>): Promise<void> {
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      continue; // already gone
    }
    for (let i = 0; i < 100 && existsSync(`/proc/${pid}`); i++) await sleep(50);
  }
}

void describe('QemuVm with the sample guest', { timeout: 15 * 60_000 }, () => {
  let images: VmImages;
  let tmp: { dir: string; cleanup: () => Promise<void> };
  const pids = new Set<number>();

  before(async () => {
    for (const [cmd, pkg] of [
      ['qemu-system-x86_64', 'qemu-system-x86'],
      ['genisoimage', 'genisoimage'],
      ['isoinfo', 'genisoimage'],
      ['e2fsck', 'e2fsprogs'],
      ['debugfs', 'e2fsprogs'],
    ] as const) {
      assert.ok(await haveCommand(cmd), `${cmd} not found: apt-get install -y --no-install-recommends ${pkg}`);
    }
    images = await ensureGuestImages();
    tmp = await tempDir('spw-vm-');
  });

  after(async () => {
    await killAll(pids);
    await tmp?.cleanup();
  });

  void it('writes a NoCloud config drive: ISO 9660 labelled cidata with meta-data and user-data', async () => {
    const iso = path.join(tmp.dir, 'check.iso');
    await buildConfigDrive(iso, { instanceId: 'i-check', hostname: 'check-01', networkConfig: { version: 2, ethernets: { eth0: { dhcp4: true } } } });
    const pvd = await run('isoinfo', ['-d', '-i', iso]);
    assert.match(pvd.stdout, /^Volume id: cidata$/m);
    const meta = await run('isoinfo', ['-R', '-i', iso, '-x', '/meta-data']);
    assert.equal(meta.stdout, 'instance-id: i-check\nlocal-hostname: check-01\n');
    const net = await run('isoinfo', ['-R', '-i', iso, '-x', '/network-config']);
    assert.match(net.stdout, /dhcp4: true/);
    assert.equal((await run('isoinfo', ['-R', '-i', iso, '-x', '/user-data'])).stdout, '#cloud-config\n');
    await assert.rejects(buildConfigDrive(iso, { instanceId: 'bad id', hostname: 'x' }), (e: unknown) => e instanceof ComputeError && e.code === 'SPW_ERR_CONFIG_DRIVE');
    await assert.rejects(buildConfigDrive(iso, { instanceId: 'i-1', hostname: '-x' }), (e: unknown) => e instanceof ComputeError && e.code === 'SPW_ERR_CONFIG_DRIVE');
  });

  void it('survives the death of the process that started it; attach, identity, console, pause/resume, stats, snapshot, stop', async (t) => {
    const disk = path.join(tmp.dir, 'root.img');
    await copyFile(images.rootImg, disk);
    const iso = await buildConfigDrive(path.join(tmp.dir, 'cidata.iso'), {
      instanceId: 'i-0123abcd',
      hostname: 'web-01',
      userData: '#!/bin/sh\necho agent-ran > /run/agent\n',
    });
    const baseDir = path.join(tmp.dir, 'vms');
    const spec = {
      name: 'guest1',
      kernel: images.kernel,
      initrd: images.initrd,
      append: GUEST_APPEND,
      memoryMiB: 256,
      vcpus: 1,
      mac: '52:54:00:5b:11:01',
      disks: [{ file: disk, format: 'raw' as const }],
      configDrive: iso,
    };

    // 1. A "management service" starts the VM and dies by SIGKILL.
    const child = startProc(process.execPath, ['--import', 'tsx', CHILD, baseDir, JSON.stringify(spec)], { cwd: ROOT });
    let info: VmHandleInfo | undefined;
    try {
      for (let i = 0; i < 600 && !child.stdout().includes('\n'); i++) {
        if (child.child.exitCode !== null) break;
        await sleep(100);
      }
      assert.ok(child.stdout().includes('\n'), `the child did not start the VM:\n${child.stdout()}\n${child.stderr()}`);
      info = JSON.parse(child.stdout().split('\n')[0] as string) as VmHandleInfo;
      pids.add(info.pid);
    } finally {
      await child.stop('SIGKILL');
    }
    assert.equal(info.provider, 'local');
    assert.equal(info.dir, path.join(baseDir, 'guest1'));

    // 2. The VM still runs; attach from its state directory.
    const provider = new LocalProvider({ baseDir });
    const probe = await QemuVm.probe(info.dir);
    assert.equal(probe.state, 'running', JSON.stringify(probe));
    const vm = await provider.attach(info.dir);
    assert.equal(vm.pid, info.pid);
    const ready = await vm.waitForConsole(/^SPILLWAY-GUEST-READY$/, { timeoutMs: BOOT_TIMEOUT_MS, signal: t.signal });
    t.diagnostic(`guest ready; console.log offset ${ready.offset}`);

    // 3. The identity comes from the config drive.
    const idLine = await vm.waitForConsole(/^SPILLWAY-GUEST /, { timeoutMs: 1000 });
    const id = parseGuestIdentity(idLine.line);
    assert.ok(id, `not an identity line: ${idLine.line}`);
    assert.equal(id.hostname, 'web-01');
    assert.equal(id.machineId, machineIdFor('i-0123abcd'));
    assert.equal(id.mac, spec.mac);
    assert.match(id.bootId, /^[0-9a-f-]{36}$/);

    // 4. Console exec: output and exit codes, state kept on disk, long commands.
    const w = await vm.exec('echo hi > /data/x; sync; cat /data/x', { timeoutMs: 60_000 });
    assert.deepEqual([w.output, w.exitCode], ['hi\n', 0]);
    assert.deepEqual(await vm.exec('hostname; cat /etc/machine-id /run/agent').then((r) => r.output), `web-01\n${id.machineId}\nagent-ran\n`);
    assert.equal((await vm.exec('exit 3')).exitCode, 3);
    assert.deepEqual(await vm.exec('cat /nonexistent').then((r) => [r.exitCode, /No such file/.test(r.output)]), [1, true]);
    const long = await vm.exec(`echo ${'a'.repeat(3000)} | wc -c`, { timeoutMs: 60_000 });
    assert.deepEqual([long.output.trim(), long.exitCode], ['3001', 0]);

    // 5. Pause and resume, with their QMP events; a bad command is a typed QmpError.
    const qmp = await vm.qmp();
    const since = qmp.lastEventSeq;
    await vm.pause();
    assert.deepEqual(await vm.status().then((s) => [s.alive, s.running, s.status]), [true, false, 'paused']);
    await qmp.waitForEvent('STOP', { after: since, timeoutMs: 5000 });
    await vm.resume();
    await qmp.waitForEvent('RESUME', { after: since, timeoutMs: 5000 });
    assert.deepEqual(await vm.status().then((s) => [s.running, s.status]), [true, 'running']);
    await assert.rejects(vm.execute('no-such-command'), (e: unknown) => e instanceof QmpError && e.errorClass === 'CommandNotFound');

    // 6. Stats.
    const blocks = await vm.blockStats();
    const root = blocks.find((b) => b.device === 'disk0');
    const drive = blocks.find((b) => b.device === 'cidata');
    assert.ok(root && drive, JSON.stringify(blocks.map((b) => b.device)));
    assert.ok(root.rdBytes > 0 && root.wrBytes > 0 && root.rdOperations > 0, JSON.stringify(root));
    assert.ok(drive.rdBytes > 0 && drive.wrBytes === 0);
    const cpu = await vm.cpuStats();
    assert.equal(cpu.vcpus.length, 1);
    assert.ok(cpu.processCpuMs > 0 && (cpu.vcpus[0]?.cpuMs ?? 0) > 0, JSON.stringify(cpu));
    t.diagnostic(`disk0 read ${root.rdBytes} B in ${root.rdOperations} ops, wrote ${root.wrBytes} B; QEMU CPU ${cpu.processCpuMs} ms`);

    // 7. A crash-consistent snapshot of the running VM's disk holds what was written before it.
    await vm.exec('echo snap-marker > /data/before; sync');
    const snapPath = path.join(tmp.dir, 'snap.img');
    const snap = await vm.snapshotDisk({ to: snapPath });
    assert.equal(snap.bytes, (await stat(images.rootImg)).size);
    assert.equal((await vm.status()).status, 'running');
    await vm.exec('echo after > /data/after; sync');
    // A crash image: the journal may need replaying (e2fsck exit 1 = fixed), then it is clean.
    const fix = await run('e2fsck', ['-f', '-y', snapPath], { allowFail: true });
    assert.ok(fix.code === 0 || fix.code === 1, `e2fsck -fy exited ${fix.code}\n${fix.stdout}${fix.stderr}`);
    assert.equal((await run('e2fsck', ['-f', '-n', snapPath], { allowFail: true })).code, 0);
    assert.equal((await run('debugfs', ['-R', 'cat /data/before', snapPath])).stdout, 'snap-marker\n');
    assert.equal((await run('debugfs', ['-R', 'cat /data/x', snapPath])).stdout, 'hi\n');
    assert.doesNotMatch((await run('debugfs', ['-R', 'ls /data', snapPath])).stdout, /after/);
    t.diagnostic(`snapshot: ${snap.bytes} bytes, guest paused ${snap.pausedMs} ms`);

    // 8. Stop (the sample guest ignores the ACPI power button: QMP quit does it); then gone.
    const stopped = await vm.stop({ gracefulTimeoutMs: 1000 });
    assert.ok(stopped.how === 'quit' || stopped.how === 'powerdown', stopped.how);
    pids.delete(info.pid);
    assert.equal((await vm.status()).status, 'gone');
    await assert.rejects(QemuVm.attach(info.dir), (e: unknown) => e instanceof ComputeError && e.code === 'SPW_ERR_VM_GONE');
    assert.deepEqual(await provider.list().then((l) => l.map((e) => [e.name, e.state])), [['guest1', 'gone']]);
    await provider.remove('local', 'guest1');
    assert.equal(existsSync(info.dir), false);
  });
});
