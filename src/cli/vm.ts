// `spillway vm status|exec|console DIR`: look at and into a VM that the management service (or
// anything using src/compute/qemu) runs on this machine, through its state directory.

import { Command } from 'commander';

export function registerVm(program: Command): void {
  const vm = program
    .command('vm')
    .summary("a local VM's status, or a command on its serial console (by state directory)")
    .description("Every VM the local provider runs has a state directory (the management service's STATE/vms/INSTANCE@HOST) with its QMP socket, serial console and logs. These commands work from that directory, with or without the service.");

  vm.command('status')
    .argument('<dir>', "the VM's state directory")
    .option('--json', 'print JSON')
    .description('QEMU pid, run state and per-disk I/O counters.')
    .action(async (dir: string, o: { json?: boolean }) => {
      const { QemuVm } = await import('../compute/qemu/vm.js');
      const v = await QemuVm.attach(dir);
      try {
        const s = { ...(await v.status()), disks: (await v.blockStats()).map((d) => ({ device: d.device, rdBytes: d.rdBytes, wrBytes: d.wrBytes })) };
        process.stdout.write(o.json ? `${JSON.stringify(s)}\n` : `${s.name}: pid ${s.pid}, ${s.status}\n${s.disks.map((d) => `  ${d.device}: read ${d.rdBytes} B, written ${d.wrBytes} B`).join('\n')}\n`);
      } finally {
        await v.detach();
      }
    });

  vm.command('exec')
    .argument('<dir>', "the VM's state directory")
    .argument('<command...>', 'shell command to run in the guest (quote it, or put it after --)')
    .option('-t, --timeout <seconds>', 'give up after this long', '30')
    .description("Run a shell command on the guest's serial console; prints its output and exits with its status.")
    .addHelpText('after', '\nExample:\n  spillway vm exec .work/demo/control/vms/web@cloud-1 -- "echo hello > /data/hello.txt && sync"')
    .action(async (dir: string, cmd: string[], o: { timeout: string }) => {
      const { QemuVm } = await import('../compute/qemu/vm.js');
      const v = await QemuVm.attach(dir);
      try {
        const r = await v.exec(cmd.join(' '), { timeoutMs: Number(o.timeout) * 1000 });
        process.stdout.write(r.output.endsWith('\n') || r.output === '' ? r.output : `${r.output}\n`);
        process.exitCode = r.exitCode;
      } finally {
        await v.detach();
      }
    });
}
