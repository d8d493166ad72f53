// `spillway pki init|issue`: the CA and the edge certificates of a deployment.

import { Command } from 'commander';
import { initCa, issueCert } from '../link/pki.js';

export function registerPki(program: Command): void {
  const pki = program
    .command('pki')
    .summary('create the CA and the edge certificates for mutual TLS between edges')
    .description('Edges authenticate each other with certificates signed by one CA. Create the CA once with `pki init`, then one certificate per edge with `pki issue NAME`; copy ca.pem, NAME.pem and NAME.key to that edge. Uses the openssl command.');

  pki
    .command('init')
    .description('create a CA (ca.pem, ca.key) in --dir')
    .option('-d, --dir <dir>', 'directory for the PKI files', 'pki')
    .option('--name <cn>', 'common name of the CA', 'Spillway CA')
    .option('--days <n>', 'validity in days', '3650')
    .option('--force', 'replace an existing CA (every edge certificate must then be issued again)')
    .action(async (o: { dir: string; name: string; days: string; force?: boolean }) => {
      const p = await initCa(o.dir, { name: o.name, days: Number(o.days), force: o.force });
      process.stdout.write(`created CA ${p.caCert} (key ${p.caKey}, mode 0600: keep it off the edges)\n`);
    });

  pki
    .command('issue')
    .description('issue a certificate for edge NAME, signed by the CA in --dir (NAME.pem, NAME.key)')
    .argument('<name>', 'edge name; peers expect this name in the certificate')
    .option('-d, --dir <dir>', 'directory holding the CA', 'pki')
    .option('--ip <address...>', 'IP subjectAltNames to add')
    .option('--dns <name...>', 'more DNS subjectAltNames to add')
    .option('--days <n>', 'validity in days', '825')
    .action(async (name: string, o: { dir: string; ip?: string[]; dns?: string[]; days: string }) => {
      const c = await issueCert(o.dir, name, { ips: o.ip, dns: o.dns, days: Number(o.days) });
      process.stdout.write(`issued ${c.cert} and ${c.key} for edge "${name}" (CA ${c.ca})\n`);
    });
}
