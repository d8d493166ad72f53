// Two sites on one machine, for end-to-end tests and benches: a PKI, an on-prem edge owning a
// disk image (local role), a `spillway wanem` relay in between, and a cloud edge serving the
// disk over NBD (remote role). Every process is a real `node dist/cli.js` process, stopped by
// the caller through `stop()` (or individually, to crash or restart one).

import { writeFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';

import { CLI, freePort, run, startProc, waitForProc, type Proc } from './proc.js';

export interface WanOptions {
  delayMs?: number;
  rateMbit?: number;
  extra?: string[];
}

export interface TwoSites {
  dir: string;
  image: string;
  nbdPort: number;
  uri: (volume?: string) => string;
  /** the edges' configuration files (for `spillway volume … --config`). */
  onpremYaml: string;
  cloudYaml: string;
  /** the edges' state directories (control.sock, volumes.d, overlays …). */
  onpremState: string;
  cloudState: string;
  metricsUrl: string;
  onprem: Proc;
  cloud: Proc;
  wanem: Proc;
  /** bytes the relay carried from the on-prem edge to the cloud edge (waits for the relay's
   *  stats file, rewritten every 500 ms, to include everything sent so far). */
  linkBytes: () => Promise<number>;
  startCloud: () => Promise<Proc>;
  startOnprem: () => Promise<Proc>;
  startWanem: (o?: WanOptions) => Promise<Proc>;
  stop: () => Promise<void>;
}

export async function makePki(dir: string, names: string[], cli: string = CLI): Promise<string> {
  const pki = path.join(dir, 'pki');
  await run(process.execPath, [cli, 'pki', 'init', '--dir', pki]);
  for (const n of names) await run(process.execPath, [cli, 'pki', 'issue', '--dir', pki, n]);
  return pki;
}

/** Options of startTwoSites; every one is optional and defaults to the edge's own default. */
export interface TwoSitesOptions {
  wan?: WanOptions;
  volume?: string;
  cacheSize?: string;
  ioTimeout?: string;
  /** cloud edge: peers[].connections (default 2). */
  connections?: number;
  /** cloud edge: link.window, as the config file spells it ("8MiB"); default: the edge's. */
  window?: string;
  /** cloud edge: volumes[].readAhead in chunks; default: the edge's. */
  readAhead?: number;
  /** keys added to the cloud edge's volume entry, in flow style ("writes: origin, rpo: 1s"). */
  cloudVolume?: string;
  /** YAML appended to the cloud edge's file (top-level keys it does not set yet). */
  cloudExtra?: string;
  /** the cloud edge starts without a volume (volumes are added through its control socket);
   *  then startTwoSites does not wait for an export. */
  cloudNoVolume?: boolean;
  /** keys added to the on-prem edge's volume entry, in flow style ("groupPush: 0"). */
  onpremVolume?: string;
  /** YAML appended to the on-prem edge's file (e.g. "metrics: { listen: … }"). */
  onpremExtra?: string;
  /** environment of the edge processes; default: this process's. */
  env?: { onprem?: NodeJS.ProcessEnv; cloud?: NodeJS.ProcessEnv };
  /**
   * node options before the script, per edge (e.g. ['--cpu-prof', '--cpu-prof-dir=DIR']: Node 20
   * refuses --cpu-prof in NODE_OPTIONS).
   */
  nodeArgs?: { onprem?: string[]; cloud?: string[] };
  /** cli.js to run for the PKI, the edges and the relay (default dist/cli.js), e.g. a copy of a build. */
  cli?: string;
}

/** Set up and start both edges and the relay. `image` must exist. */
export async function startTwoSites(dir: string, image: string, o: TwoSitesOptions = {}): Promise<TwoSites> {
  const cli = o.cli ?? CLI;
  const pki = await makePki(dir, ['onprem', 'cloud'], cli);
  const volume = o.volume ?? 'disk';
  const [linkPort, wanPort, nbdPort, metricsPort] = [await freePort(), await freePort(), await freePort(), await freePort()];
  const onpremYaml = path.join(dir, 'onprem.yaml');
  const cloudYaml = path.join(dir, 'cloud.yaml');
  await writeFile(
    onpremYaml,
    `site: onprem
state: ${dir}/state-onprem
tls: { ca: ${pki}/ca.pem, cert: ${pki}/onprem.pem, key: ${pki}/onprem.key }
link: { listen: "127.0.0.1:${linkPort}" }
volumes:
  - { name: ${volume}, source: ${image}${o.onpremVolume ? `, ${o.onpremVolume}` : ''} }
${o.onpremExtra ?? ''}`,
  );
  await writeFile(
    cloudYaml,
    `site: cloud
state: ${dir}/state-cloud
tls: { ca: ${pki}/ca.pem, cert: ${pki}/cloud.pem, key: ${pki}/cloud.key }
nbd: { listen: "127.0.0.1:${nbdPort}" }
metrics: { listen: "127.0.0.1:${metricsPort}" }
${o.window === undefined ? '' : `link: { window: ${o.window} }\n`}cache: { dir: ${dir}/cache, size: ${o.cacheSize ?? '2GiB'} }
peers: [ { name: onprem, address: "127.0.0.1:${wanPort}", connections: ${o.connections ?? 2} } ]
${
  o.cloudNoVolume
    ? 'volumes: []'
    : `volumes:
  - { name: ${volume}, peer: onprem, ioTimeout: ${o.ioTimeout ?? '120s'}${o.readAhead === undefined ? '' : `, readAhead: ${o.readAhead}`}${o.cloudVolume ? `, ${o.cloudVolume}` : ''} }`
}
${o.cloudExtra ?? ''}`,
  );
  const statsFile = path.join(dir, 'wanem.json');
  const sites: Partial<TwoSites> & { dir: string } = { dir, image, nbdPort, onpremYaml, cloudYaml, onpremState: `${dir}/state-onprem`, cloudState: `${dir}/state-cloud` };
  const wanOpts = o.wan ?? {};
  sites.startWanem = async (w: WanOptions = wanOpts) => {
    const p = startProc(process.execPath, [cli, 'wanem', '--listen', `127.0.0.1:${wanPort}`, '--target', `127.0.0.1:${linkPort}`, '--delay-ms', String(w.delayMs ?? 0), '--rate-mbit', String(w.rateMbit ?? 0), '--stats-file', statsFile, ...(w.extra ?? [])]);
    await waitForProc(p, { port: wanPort });
    sites.wanem = p;
    return p;
  };
  sites.startOnprem = async () => {
    const p = startProc(process.execPath, [...(o.nodeArgs?.onprem ?? []), cli, 'edge', '--config', onpremYaml], o.env?.onprem ? { env: o.env.onprem } : {});
    await waitForProc(p, { port: linkPort });
    sites.onprem = p;
    return p;
  };
  sites.startCloud = async () => {
    const p = startProc(process.execPath, [...(o.nodeArgs?.cloud ?? []), cli, 'edge', '--config', cloudYaml], o.env?.cloud ? { env: o.env.cloud } : {});
    await waitForProc(p, { port: nbdPort });
    sites.cloud = p;
    return p;
  };
  let wanBase = 0;
  const readStats = (): number => {
    try {
      const s = JSON.parse(readFileSync(statsFile, 'utf8')) as { bytes: { targetToClient: number } };
      return wanBase + s.bytes.targetToClient;
    } catch {
      return wanBase;
    }
  };
  sites.linkBytes = async () => {
    await new Promise((r) => setTimeout(r, 1200));
    return readStats();
  };
  const origStartWanem = sites.startWanem;
  sites.startWanem = async (w?: WanOptions) => {
    wanBase = readStats(); // a restarted relay counts from zero; it wrote its final stats at exit
    return origStartWanem(w);
  };
  sites.uri = (v = volume) => `nbd://127.0.0.1:${nbdPort}/${v}`;
  sites.metricsUrl = `http://127.0.0.1:${metricsPort}/metrics`;
  sites.stop = async () => {
    await Promise.all([sites.cloud?.stop(), sites.onprem?.stop(), sites.wanem?.stop()]);
  };
  try {
    await sites.startOnprem();
    await sites.startWanem();
    await sites.startCloud();
    if (!o.cloudNoVolume) await waitForExport(sites.uri());
  } catch (e) {
    await sites.stop();
    throw e;
  }
  return sites as TwoSites;
}

/** The cloud edge exports a volume once it has opened it over the link. */
export async function waitForExport(uri: string, timeoutMs = 60000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await run('nbdinfo', ['--size', uri], { allowFail: true });
    if (r.code === 0) return;
    if (Date.now() > deadline) throw new Error(`${uri} was not exported within ${timeoutMs} ms: ${r.stderr}`);
    await new Promise((res) => setTimeout(res, 200));
  }
}

/** Read one Prometheus series (summed over matching label sets) from a /metrics URL. */
export async function metric(url: string, name: string, labels: Record<string, string> = {}): Promise<number> {
  const text = await (await fetch(url)).text();
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const m = /^([a-z_]+)(\{[^}]*\})?\s+(\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const ls = m[2] ?? '';
    if (Object.entries(labels).every(([k, v]) => ls.includes(`${k}="${v}"`))) sum += Number(m[3]);
  }
  return sum;
}

/** Call an edge's control socket (STATE/control.sock) and parse its JSON answer. */
export function controlCall<T = unknown>(stateDir: string, method: string, url: string, body?: unknown): Promise<{ status: number; body: T }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath: path.join(stateDir, 'control.sock'), method, path: url, headers: { 'content-type': 'application/json' } }, (res) => {
      let t = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (t += d));
      res.on('end', () => {
        try {
          resolve({ status: res.statusCode ?? 0, body: JSON.parse(t) as T });
        } catch (err) {
          reject(err instanceof Error ? err : new Error(String(err)));
        }
      });
    });
    req.on('error', reject);
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
}

/**
 * Poll `fn` every 250 ms until it gives a truthy value; fail after `timeoutMs`. A throw counts
 * as "not yet" (an edge's control socket appears a moment after its ports do); the last one is
 * in the timeout's message.
 */
export async function until<T>(what: string, fn: () => Promise<T | undefined | false | null>, timeoutMs = 120_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? ` (last error: ${(last as Error).message})` : ''}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}
