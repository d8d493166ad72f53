// Test PKI made with the openssl CLI: a CA, and certificates signed by it (server and client),
// plus a rogue CA whose certificates must be refused.

import path from 'node:path';
import { run } from './proc.js';

export interface TestPki {
  dir: string;
  caCert: string;
  caKey: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  rogueCert: string;
  rogueKey: string;
}

async function issue(dir: string, name: string, caCert: string, caKey: string, cn: string, ext: string): Promise<void> {
  const key = path.join(dir, `${name}-key.pem`);
  const csr = path.join(dir, `${name}.csr`);
  const extFile = path.join(dir, `${name}.ext`);
  await run('sh', ['-c', `printf '%s\n' "${ext}" > ${extFile}`]);
  await run('openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${cn}`]);
  await run('openssl', ['x509', '-req', '-in', csr, '-CA', caCert, '-CAkey', caKey, '-CAcreateserial', '-days', '2', '-out', path.join(dir, `${name}-cert.pem`), '-extfile', extFile]);
}

async function makeCa(dir: string, name: string): Promise<{ cert: string; key: string }> {
  const key = path.join(dir, `${name}-key.pem`);
  const cert = path.join(dir, `${name}-cert.pem`);
  await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', `/CN=${name}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  return { cert, key };
}

export async function makeTestPki(dir: string): Promise<TestPki> {
  const ca = await makeCa(dir, 'ca');
  const rogue = await makeCa(dir, 'rogue-ca');
  const serverExt = 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth';
  const clientExt = 'extendedKeyUsage=clientAuth,serverAuth';
  await issue(dir, 'server', ca.cert, ca.key, 'localhost', serverExt);
  await issue(dir, 'client', ca.cert, ca.key, 'client', clientExt);
  await issue(dir, 'rogue', rogue.cert, rogue.key, 'client', clientExt);
  const p = (n: string) => path.join(dir, n);
  return {
    dir,
    caCert: ca.cert,
    caKey: ca.key,
    serverCert: p('server-cert.pem'),
    serverKey: p('server-key.pem'),
    clientCert: p('client-cert.pem'),
    clientKey: p('client-key.pem'),
    rogueCert: p('rogue-cert.pem'),
    rogueKey: p('rogue-key.pem'),
  };
}
