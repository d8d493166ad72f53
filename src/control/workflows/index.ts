// Every workflow the management service runs (docs/control.md describes each one's steps).

import type { WorkflowDef } from '../types.js';
import { cloneWorkflow } from './clone.js';
import type { ControlContext } from './context.js';
import { detachWorkflow } from './detach.js';
import { startWorkflow, stopWorkflow } from './lifecycle.js';
import { liveMigrateWorkflow } from './live.js';
import { resizeEdgeWorkflow } from './resize.js';
import { reverseWorkflow } from './reverse.js';
import { migrateWorkflow, transferWorkflow } from './transfer.js';

export type { ControlContext } from './context.js';

export function allWorkflows(c: ControlContext): WorkflowDef[] {
  return [transferWorkflow(c), cloneWorkflow(c), reverseWorkflow(c), migrateWorkflow(c), detachWorkflow(c), resizeEdgeWorkflow(c), liveMigrateWorkflow(c), startWorkflow(c), stopWorkflow(c)];
}
