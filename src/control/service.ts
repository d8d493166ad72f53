// The management service's composition root: the store (SQLite or PostgreSQL), the inventory
// from the configuration, the workflow engine with every workflow, compute through the local
// provider, and the REST API. Workflows left unfinished by a crash resume at start.

import { existsSync } from 'node:fs';
import { hostname } from 'node:os';
import { mkdir, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';

import type { Logger } from '../log/logger.js';
import { bootstrapToken, startApi, type ApiServer } from './api/index.js';
import type { ControlConfig } from './config.js';
import { LocalCompute } from './compute-local.js';
import { openStore } from './db/index.js';
import { EdgeGateway } from './edges.js';
import { statsRoute } from './stats-route.js';
import { Engine } from './engine/index.js';
import type { Store } from './types.js';
import { allWorkflows } from './workflows/index.js';
import { VERSION } from '../version.js';

export interface ControlService {
  url: string;
  store: Store;
  engine: Engine;
  /** set when this start minted the first operator token (written to STATE/operator.token). */
  tokenFile?: string;
  stop(): Promise<void>;
}

async function seedInventory(store: Store, c: ControlConfig): Promise<void> {
  const inv = c.inventory;
  for (const s of inv.sites) await store.putSite(s);
  // The cache size the service last set (resize-edge) outlives a restart unless the file sets one.
  for (const e of inv.edges) await store.putEdge({ ...e, cacheBytes: e.cacheBytes ?? (await store.getEdge(e.name))?.cacheBytes });
  for (const h of inv.hosts) await store.putHost(h);
  for (const i of inv.instances) {
    if (await store.getInstance(i.name)) continue;
    await store.putInstance({ name: i.name, kind: 'vm', origin: i.origin, host: i.host ?? null, state: 'stopped', placement: 'origin', spec: i.spec, needs: i.needs, identity: i.identity });
    for (const v of i.volumes) {
      const st = await stat(v.path).catch(() => null);
      await store.putVolume({ name: v.name, instance: i.name, path: v.path, sizeBytes: st?.size ?? 0, family: v.family ?? v.name, policy: v.policy });
    }
  }
}

export async function startControlService(c: ControlConfig, log: Logger): Promise<ControlService> {
  await mkdir(c.state, { recursive: true, mode: 0o700 });
  const store = await openStore(c.database!);
  let engine: Engine | null = null;
  let api: ApiServer | null = null;
  try {
    await seedInventory(store, c);
    let tokenFile: string | undefined;
    if ((await store.listTokens()).length === 0) {
      tokenFile = path.join(c.state, 'operator.token');
      const { secret } = await bootstrapToken(store, 'operator', 'operator');
      await writeFile(tokenFile, `${secret}\n`, { mode: 0o600 });
      log('info', 'first start: an operator token was written (shown once; mint more with `spillway token create`)', { file: tokenFile });
    }
    const edges = new EdgeGateway(store);
    const compute = new LocalCompute(path.join(c.state, 'vms'), log.child('compute'));
    // A stable owner (one per machine and API address): after a crash this service resumes its
    // own workflows at once instead of waiting for their leases to expire.
    engine = new Engine({ store, log: log.child('engine'), owner: `${hostname()}:${c.listen}` });
    for (const def of allWorkflows({ store, edges, compute, dir: c.state, log: log.child('workflow'), bootTimeoutMs: c.bootTimeout })) engine.register(def);
    api = await startApi({ listen: c.listen, store, engine, version: VERSION, log: log.child('api'), extraRoutes: [statsRoute(store, compute)] });
    await engine.resumeAll();
    log('info', 'management service listening', { url: api.url, database: c.database!.startsWith('sqlite:') ? c.database : 'postgres', state: c.state });
    const e = engine;
    const a = api;
    return {
      url: a.url,
      store,
      engine: e,
      tokenFile: tokenFile && existsSync(tokenFile) ? tokenFile : undefined,
      stop: async () => {
        await a.close();
        await e.stop();
        await store.close();
      },
    };
  } catch (err) {
    await api?.close().catch(() => undefined);
    await engine?.stop().catch(() => undefined);
    await store.close().catch(() => undefined);
    throw err;
  }
}
