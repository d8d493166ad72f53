// HOST:PORT as the WAN emulator's options spell addresses: "127.0.0.1:9000", "[::1]:9000",
// "localhost:9000", or a bare "9000" where a default host applies.

import { WanemError } from './errors.js';

export interface HostPort {
  host: string;
  port: number;
}

/** Parse HOST:PORT (brackets around IPv6 hosts); a bare PORT takes `defaultHost` when given. */
export function parseHostPort(text: string, opts: { defaultHost?: string; allowPortZero?: boolean } = {}): HostPort {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(text) ?? (opts.defaultHost !== undefined ? /^()()(\d{1,5})$/.exec(text) : null);
  if (!m) throw new WanemError('SPW_ERR_WANEM_ADDRESS', `"${text}" is not HOST:PORT (write IPv6 hosts in brackets: [::1]:9000)`);
  const host = m[1] || m[2] || opts.defaultHost || '';
  const port = Number(m[3]);
  if (port > 65535 || (port === 0 && !opts.allowPortZero)) throw new WanemError('SPW_ERR_WANEM_ADDRESS', `port ${port} in "${text}" is out of range (1-65535)`);
  return { host, port };
}

export function formatHostPort(a: HostPort): string {
  return a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}
