#!/usr/bin/env node
// The `spillway` command. Each subcommand lives in src/cli/<name>.ts and registers itself here.

import { Command } from 'commander';
import { registerAnalyze } from './cli/analyze.js';
import { registerEdge } from './cli/edge.js';
import { registerMgmt } from './cli/mgmt/index.js';
import { registerPki } from './cli/pki.js';
import { registerProfile } from './cli/profile.js';
import { registerServe } from './cli/serve.js';
import { registerService } from './cli/service.js';
import { registerVm } from './cli/vm.js';
import { registerVolume } from './cli/volume.js';
import { registerWanem } from './cli/wanem.js';
import { VERSION } from './version.js';

const program = new Command();
program
  .name('spillway')
  .description('Stream VMs and containers to cloud capacity while their disks stay where they are.')
  .version(VERSION)
  .showHelpAfterError('(run with --help for usage)')
  .addHelpText(
    'after',
    `
Environment:
  SPILLWAY_LOG_LEVEL   debug | info | warn | error (default info)
  SPILLWAY_LOG_FORMAT  json (default) | text
  SPILLWAY_API         the management service (default http://127.0.0.1:7080)
  SPILLWAY_TOKEN       its API token (or SPILLWAY_TOKEN_FILE: a file holding it)

Docs: docs/ARCHITECTURE.md and docs/*.md in the source tree.`,
  );

registerServe(program);
registerWanem(program);
registerPki(program);
registerEdge(program);
registerVolume(program);
registerProfile(program);
registerAnalyze(program);
registerMgmt(program);
registerService(program);
registerVm(program);

program.parseAsync(process.argv).catch((err: unknown) => {
  process.stderr.write(`spillway: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
