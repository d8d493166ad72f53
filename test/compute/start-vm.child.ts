// Child process for vm.test.ts: plays a management service that starts a VM through the local
// provider, prints the handle info as one JSON line, and waits to be killed (SIGKILL) by the
// test. The VM must survive it. Arguments: BASE_DIR SPEC_JSON.

import { LocalProvider, type ProviderVmSpec } from '../../src/compute/qemu/index.js';

const [baseDir, specJson] = process.argv.slice(2);
if (!baseDir || !specJson) {
  process.stderr.write('usage: start-vm.child.ts BASE_DIR SPEC_JSON\n');
  process.exit(2);
}
const provider = new LocalProvider({ baseDir });
const { info } = await provider.startVm('local', JSON.parse(specJson) as ProviderVmSpec);
process.stdout.write(JSON.stringify(info) + '\n');
// Stay alive, holding the QMP connection, until killed.
setInterval(() => undefined, 60_000);
