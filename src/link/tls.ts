// Mutual TLS 1.3 for the link: both edges present a certificate signed by the deployment's CA,
// and each checks that the other's certificate names the edge it expects. A peer without a
// valid certificate is refused during the handshake, before any link frame flows.

import { readFileSync } from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';

export interface LinkTlsFiles {
  ca: string;
  cert: string;
  key: string;
}

export interface LinkTlsMaterial {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
}

export class LinkAuthError extends Error {
  readonly code = 'SPW_ERR_LINK_AUTH';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'LinkAuthError';
  }
}

export function loadTls(files: LinkTlsFiles): LinkTlsMaterial {
  const read = (what: string, p: string) => {
    try {
      return readFileSync(p);
    } catch (err) {
      throw new LinkAuthError(`cannot read the link ${what} ${p}: ${(err as Error).message} (create one with: spillway pki init / spillway pki issue)`, { cause: err });
    }
  };
  return { ca: read('CA certificate', files.ca), cert: read('certificate', files.cert), key: read('private key', files.key) };
}

/** Names a certificate carries: subject CN and DNS subjectAltNames. */
export function certificateNames(cert: tls.PeerCertificate): string[] {
  const names = new Set<string>();
  if (cert.subject?.CN) names.add(String(cert.subject.CN));
  for (const part of (cert.subjectaltname ?? '').split(',')) {
    const m = /^\s*DNS:(.+)$/.exec(part);
    if (m) names.add(m[1]!.trim());
  }
  return [...names];
}

export function createLinkServer(material: LinkTlsMaterial, onSecure: (sock: tls.TLSSocket, peerNames: string[]) => void, onRefused?: (err: Error, remote: string) => void): tls.Server {
  const srv = tls.createServer({
    ca: material.ca,
    cert: material.cert,
    key: material.key,
    requestCert: true,
    rejectUnauthorized: true,
    minVersion: 'TLSv1.3',
  });
  srv.on('secureConnection', (sock) => {
    sock.setNoDelay(true);
    onSecure(sock, certificateNames(sock.getPeerCertificate()));
  });
  srv.on('tlsClientError', (err, sock) => onRefused?.(new LinkAuthError(`refused a link peer: ${err.message}`, { cause: err }), `${sock.remoteAddress}:${sock.remotePort}`));
  return srv;
}

/** Dial a peer; its certificate must be signed by our CA and name `expectName`. */
export function dialLink(material: LinkTlsMaterial, address: { host: string; port: number }, expectName: string, timeoutMs = 15000): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const sock = tls.connect({
      host: address.host,
      port: address.port,
      ca: material.ca,
      cert: material.cert,
      key: material.key,
      minVersion: 'TLSv1.3',
      servername: net.isIP(expectName) ? undefined : expectName,
      checkServerIdentity: (_host, cert) => {
        const names = certificateNames(cert);
        return names.includes(expectName) ? undefined : new LinkAuthError(`peer at ${address.host}:${address.port} presented a certificate for ${names.join(', ') || 'no name'}, expected ${expectName}`);
      },
    });
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new LinkAuthError(`TLS handshake with ${address.host}:${address.port} did not finish within ${timeoutMs} ms`));
    }, timeoutMs);
    sock.once('secureConnect', () => {
      clearTimeout(timer);
      sock.setNoDelay(true);
      resolve(sock);
    });
    sock.once('error', (err) => {
      clearTimeout(timer);
      const code = (err as { code?: string }).code ?? '';
      if (code.startsWith('ERR_SSL') || code.includes('CERT') || err instanceof LinkAuthError || /certificate|alert|handshake/i.test(err.message)) {
        reject(err instanceof LinkAuthError ? err : new LinkAuthError(`TLS with ${address.host}:${address.port} failed: ${err.message}`, { cause: err }));
      } else reject(err);
    });
  });
}
