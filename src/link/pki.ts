// The deployment's PKI, made with the openssl CLI (no hand-written ASN.1): one CA, and one
// certificate per edge naming it (CN and DNS SAN = edge name, optional IP SANs), usable as
// both TLS server and client, since edges dial each other.

import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

export class PkiError extends Error {
  readonly code = 'SPW_ERR_PKI';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'PkiError';
  }
}

async function openssl(args: string[]): Promise<void> {
  try {
    await run('openssl', args);
  } catch (err) {
    const e = err as { stderr?: string; message: string; code?: string };
    if (e.code === 'ENOENT') throw new PkiError('openssl is not installed (apt-get install openssl)', { cause: err });
    throw new PkiError(`openssl ${args[0]} failed: ${e.stderr?.trim() || e.message}`, { cause: err });
  }
}

export interface PkiPaths {
  caCert: string;
  caKey: string;
}

export function pkiPaths(dir: string): PkiPaths {
  return { caCert: path.join(dir, 'ca.pem'), caKey: path.join(dir, 'ca.key') };
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$/;

export async function initCa(dir: string, opts: { name?: string; days?: number; force?: boolean } = {}): Promise<PkiPaths> {
  const p = pkiPaths(dir);
  if (existsSync(p.caKey) && !opts.force) throw new PkiError(`a CA already exists in ${dir}; pass --force to replace it (every edge certificate must then be issued again)`);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', p.caKey, '-out', p.caCert, '-days', String(opts.days ?? 3650), '-subj', `/CN=${opts.name ?? 'Spillway CA'}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  await chmod(p.caKey, 0o600);
  return p;
}

export interface IssuedCert {
  cert: string;
  key: string;
  ca: string;
}

export async function issueCert(dir: string, name: string, opts: { ips?: string[]; dns?: string[]; days?: number } = {}): Promise<IssuedCert> {
  if (!NAME_RE.test(name)) throw new PkiError(`edge name "${name}" must be letters, digits, dots and dashes (at most 63)`);
  const p = pkiPaths(dir);
  if (!existsSync(p.caKey)) throw new PkiError(`no CA in ${dir}: run spillway pki init --dir ${dir} first`);
  const key = path.join(dir, `${name}.key`);
  const cert = path.join(dir, `${name}.pem`);
  const csr = path.join(dir, `${name}.csr`);
  const ext = path.join(dir, `${name}.ext`);
  const sans = [`DNS:${name}`, ...(opts.dns ?? []).map((d) => `DNS:${d}`), ...(opts.ips ?? []).map((ip) => `IP:${ip}`)];
  await writeFile(ext, `subjectAltName=${sans.join(',')}\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n`);
  try {
    await openssl(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${name}`]);
    await chmod(key, 0o600);
    await openssl(['x509', '-req', '-in', csr, '-CA', p.caCert, '-CAkey', p.caKey, '-CAcreateserial', '-days', String(opts.days ?? 825), '-out', cert, '-extfile', ext]);
  } finally {
    await rm(csr, { force: true });
    await rm(ext, { force: true });
  }
  return { cert, key, ca: p.caCert };
}
