// `spillway edge --config FILE`: run the edge proxy daemon of a site.

import { writeFileSync, rmSync } from 'node:fs';
import { Command } from 'commander';


export function registerEdge(program: Command): void {
  program
    .command('edge')
    .summary('run the edge proxy of a site (local and remote roles, link, cache, storage target)')
    .description(
      'Run the edge proxy described by a YAML configuration file (see docs/edge.md). For volumes it owns, the edge plays the local role: it locks their sources and streams their chunks to peers over mutually authenticated TLS. For volumes it serves from a peer, it plays the remote role: it exports them over NBD and answers reads from its encrypted cache, then over the link.',
    )
    .requiredOption('-c, --config <file>', 'YAML configuration file')
    .option('--check', 'validate the configuration and exit')
    .option('--pid-file <file>', 'write the process id here once running; removed at exit')
    .addHelpText(
      'after',
      `
Example (cloud side):
  site: cloud
  state: /var/lib/spillway
  tls: { ca: pki/ca.pem, cert: pki/cloud.pem, key: pki/cloud.key }
  nbd: { listen: 127.0.0.1:10809 }
  metrics: { listen: 127.0.0.1:9400 }
  cache: { dir: /var/cache/spillway, size: 20GiB }
  peers: [ { name: onprem, address: 192.0.2.10:7400, connections: 4 } ]
  volumes: [ { name: web, peer: onprem } ]

Signals: SIGTERM/SIGINT stop; SIGUSR1 prints the status as JSON on stderr;
SIGHUP re-reads the file and applies cache.size while running.`,
    )
    .action(async (o: { config: string; check?: boolean; pidFile?: string }) => {
      // Loaded here so `spillway --help` and other commands start fast.
      const [{ loadEdgeConfig }, { Edge }, { createLogger }] = await Promise.all([import('../edge/config.js'), import('../edge/edge.js'), import('../log/logger.js')]);
      const config = loadEdgeConfig(o.config);
      if (o.check) {
        process.stdout.write(`${o.config}: valid (site ${config.site}, ${config.volumes.length} volume(s), ${config.peers.length} peer(s))\n`);
        return;
      }
      const log = createLogger('edge');
      const edge = await Edge.start(config, log);
      if (o.pidFile) writeFileSync(o.pidFile, `${process.pid}\n`);
      let stopping = false;
      const stop = (why: string) => {
        if (stopping) return;
        stopping = true;
        log('info', 'stopping', { why });
        void edge.stop().finally(() => {
          if (o.pidFile) rmSync(o.pidFile, { force: true });
          process.exit(0);
        });
      };
      process.once('SIGTERM', () => stop('SIGTERM'));
      process.once('SIGINT', () => stop('SIGINT'));
      process.on('SIGUSR1', () => process.stderr.write(JSON.stringify(edge.status()) + '\n'));
      // SIGHUP: re-read the file and apply what can change while running (the cache size).
      process.on('SIGHUP', () => {
        try {
          const next = loadEdgeConfig(o.config);
          if (next.cache && config.cache && next.cache.size !== config.cache.size) {
            const size = next.cache.size;
            edge.resizeCache(size).then(
              () => (config.cache!.size = size),
              (err: unknown) => log('error', 'cache resize failed', { err: (err as Error).message }),
            );
          } else log('info', 'configuration reloaded: nothing to apply while running (restart for other changes)');
        } catch (err) {
          log('error', 'configuration reload refused; keeping the running one', { err: (err as Error).message });
        }
      });
    });
}
