// JSON-lines logs on stderr, one object per line with time, level, component and message.
// SPILLWAY_LOG_LEVEL=debug|info|warn|error (default info); SPILLWAY_LOG_FORMAT=text for humans.

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
const ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  (level: LogLevel, msg: string, fields?: Record<string, unknown>): void;
  child(component: string): Logger;
}

export function createLogger(component: string, out: NodeJS.WritableStream = process.stderr): Logger {
  const min = ORDER[(process.env.SPILLWAY_LOG_LEVEL as LogLevel) ?? 'info'] ?? ORDER.info;
  const text = process.env.SPILLWAY_LOG_FORMAT === 'text';
  const log = ((level: LogLevel, msg: string, fields?: Record<string, unknown>) => {
    if (ORDER[level] < min) return;
    if (text) {
      const extra = fields ? ' ' + Object.entries(fields).map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`).join(' ') : '';
      out.write(`${level.toUpperCase()} [${component}] ${msg}${extra}\n`);
    } else {
      out.write(JSON.stringify({ time: new Date().toISOString(), level, component, msg, ...fields }) + '\n');
    }
  }) as Logger;
  log.child = (sub: string) => createLogger(`${component}.${sub}`, out);
  return log;
}
