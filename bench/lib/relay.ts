// Processes the streaming benches put on the path: a `spillway wanem` relay (with its byte
// counters) and a qemu-nbd origin for the copy-first baselines.

import { readFile } from 'node:fs/promises';

import { freePort, startBackground, waitForListen, type Background } from './process.js';

/** What the relay carried, from its stats file. */
export interface RelayBytes {
  /** towards the target: fetch requests, write-back batches, NBD requests, TLS. */
  clientToTarget: number;
  /** from the target: chunk answers, acknowledgements, NBD replies, TLS. */
  targetToClient: number;
}

export async function readRelayStats(file: string): Promise<RelayBytes> {
  const s = JSON.parse(await readFile(file, 'utf8')) as { bytes: RelayBytes };
  return { clientToTarget: s.bytes.clientToTarget, targetToClient: s.bytes.targetToClient };
}

/** A `spillway wanem` relay in its own process, in front of `target`. */
export async function startRelay(cli: string, target: number, statsFile: string, link: { delayMs: number; rateMbit: number }): Promise<{ port: number; proc: Background }> {
  const port = await freePort();
  const proc = startBackground('wanem', process.execPath, [cli, 'wanem', '--listen', `127.0.0.1:${port}`, '--target', `127.0.0.1:${target}`, '--delay-ms', String(link.delayMs), '--rate-mbit', String(link.rateMbit), '--stats-file', statsFile]);
  await waitForListen(port, '127.0.0.1', proc);
  return { port, proc };
}

/** qemu-nbd serving `image` read-only at the origin, as a copy-first deployment would. */
export async function startQemuNbd(image: string): Promise<{ port: number; proc: Background }> {
  const port = await freePort();
  const proc = startBackground('qemu-nbd', 'qemu-nbd', ['-r', '-f', 'raw', '-t', '-x', '', '-b', '127.0.0.1', '-p', String(port), image]);
  await waitForListen(port, '127.0.0.1', proc);
  return { port, proc };
}
