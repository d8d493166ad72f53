// The client side of an edge's control socket (src/edge/control.ts): HTTP with JSON bodies on
// the UNIX socket STATE/control.sock. Shared by `spillway volume` and `spillway profile`.

import path from 'node:path';
import type { Command } from 'commander';

/** The options every control command takes: which edge, and how to print. */
export interface Target {
  config?: string;
  socket?: string;
  json?: boolean;
}

/** Add -c/--config, --socket and --json to a command. */
export function withTarget(c: Command): Command {
  return c.option('-c, --config <file>', "the edge's configuration file (finds STATE/control.sock)").option('--socket <path>', 'the control socket itself').option('--json', 'print JSON');
}

/** A function from an edge config file to its state directory (loads the config module lazily). */
export async function stateLoader(): Promise<(file: string) => string> {
  const { loadEdgeConfig } = await import('../edge/config.js');
  return (file: string) => loadEdgeConfig(file).state;
}

export function socketOf(o: Target, loadState: (file: string) => string): string {
  if (o.socket) return o.socket;
  if (o.config) return path.join(loadState(o.config), 'control.sock');
  throw new Error('say which edge: --config EDGE.yaml (its state directory holds control.sock) or --socket PATH');
}

export { call, expectOk } from '../edge/control-client.js';
