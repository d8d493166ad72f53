// `spillway service run|check|token`: the management service (inventory, durable workflows,
// REST API). Clients are the `spillway` commands in src/cli/mgmt/ and any HTTP client.

import { rmSync, writeFileSync } from 'node:fs';
import { Command } from 'commander';

export function registerService(program: Command): void {
  const svc = program
    .command('service')
    .summary('run the management service (inventory, durable workflows, REST API)')
    .description('The management service knows the sites, edges, hosts, instances and volumes, and moves instances with durable workflows (burst, clone, bring back, migrate, detach, live migration, edge resize) that survive a crash of the service. See docs/control.md.');

  svc
    .command('run')
    .description('Run the service described by a YAML file. Unfinished workflows resume at start. On the first start (no token yet) an operator token is written to STATE/operator.token.')
    .requiredOption('-c, --config <file>', 'YAML configuration file (docs/control.md)')
    .option('--pid-file <file>', 'write the process id here once listening; removed at exit')
    .addHelpText(
      'after',
      `
Example:
  listen: 127.0.0.1:7080
  state: /var/lib/spillway-control        # database (SQLite), VMs, config drives, snapshots
  # database: postgres://spillway@db.example/spillway   # a shared control plane
  inventory:
    sites: [ { name: dc, kind: onprem }, { name: cloud, kind: cloud, tags: [eu] } ]
    edges: [ { name: dc-edge, site: dc, control: /var/lib/spillway-dc/control.sock, link: 10.0.0.1:7400 },
             { name: cloud-edge, site: cloud, control: /var/lib/spillway-cloud/control.sock, nbd: 127.0.0.1:10809 } ]
    hosts: [ { name: c1, site: cloud, vcpus: 8, ramMiB: 16384, edge: cloud-edge, pricePerHour: 0.4 } ]

Then: SPILLWAY_TOKEN_FILE=/var/lib/spillway-control/operator.token spillway burst web`,
    )
    .action(async (o: { config: string; pidFile?: string }) => {
      const [{ loadControlConfig }, { startControlService }, { createLogger }] = await Promise.all([import('../control/config.js'), import('../control/service.js'), import('../log/logger.js')]);
      const log = createLogger('control');
      const service = await startControlService(loadControlConfig(o.config), log);
      if (o.pidFile) writeFileSync(o.pidFile, `${process.pid}\n`);
      process.stderr.write(`spillway service: API at ${service.url}${service.tokenFile ? ` (operator token in ${service.tokenFile})` : ''}\n`);
      let stopping = false;
      const stop = (why: string) => {
        if (stopping) return;
        stopping = true;
        log('info', 'stopping (running workflows resume at the next start)', { why });
        void service.stop().finally(() => {
          if (o.pidFile) rmSync(o.pidFile, { force: true });
          process.exit(0);
        });
      };
      process.once('SIGTERM', () => stop('SIGTERM'));
      process.once('SIGINT', () => stop('SIGINT'));
    });

  svc
    .command('check')
    .description('Validate the configuration file and exit.')
    .requiredOption('-c, --config <file>', 'YAML configuration file')
    .action(async (o: { config: string }) => {
      const { loadControlConfig } = await import('../control/config.js');
      const c = loadControlConfig(o.config);
      process.stdout.write(`${o.config}: valid (${c.inventory.sites.length} site(s), ${c.inventory.edges.length} edge(s), ${c.inventory.hosts.length} host(s), ${c.inventory.instances.length} instance(s))\n`);
    });

  svc
    .command('token')
    .description('Mint an API token directly in the database (for bootstrap, or when no operator token is left). Prints the secret once.')
    .requiredOption('-c, --config <file>', 'YAML configuration file')
    .requiredOption('-n, --name <name>', 'who or what the token is for (shown in the audit log)')
    .option('-r, --role <role>', 'viewer (read only) or operator', 'operator')
    .action(async (o: { config: string; name: string; role: string }) => {
      if (o.role !== 'viewer' && o.role !== 'operator') throw new Error(`--role must be viewer or operator (got ${o.role})`);
      const [{ loadControlConfig }, { bootstrapToken }, { openStore }] = await Promise.all([import('../control/config.js'), import('../control/api/index.js'), import('../control/db/index.js')]);
      const c = loadControlConfig(o.config);
      const store = await openStore(c.database!);
      try {
        process.stdout.write(`${(await bootstrapToken(store, o.name, o.role)).secret}\n`);
      } finally {
        await store.close();
      }
    });
}
