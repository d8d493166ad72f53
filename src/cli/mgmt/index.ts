// The management commands: clients of the management service's REST API (docs/api.md).
//   spillway inventory <kind> [list|show|put|delete]
//   spillway workflow list|show|watch|events|start|cancel|retry
//   spillway burst|clone|bring-back|migrate|detach|move-live|resize-edge|start|stop, spillway stats
//   spillway token create|list|delete

import type { Command } from 'commander';

import { registerActions, registerStats } from './actions.js';
import { registerInventory } from './inventory.js';
import { registerToken } from './token.js';
import { registerWorkflow } from './workflow.js';

export function registerMgmt(program: Command): void {
  registerInventory(program);
  registerWorkflow(program);
  registerActions(program);
  registerStats(program);
  registerToken(program);
}
