// How the management commands print: tables, sizes, and a workflow being watched (progress
// bars redrawn in place on a terminal, one plain line per event otherwise, JSON lines with
// --json).

import type { StepRecord, Workflow, WorkflowEvent } from '../../control/types.js';

export function table(headers: string[], rows: Array<Array<string | number | null | undefined>>): string {
  const cells = rows.map((r) => r.map((c) => (c === null || c === undefined || c === '' ? '-' : String(c))));
  const widths = headers.map((h, i) => Math.max(h.length, ...cells.map((r) => r[i]!.length)));
  const line = (r: string[]) =>
    r
      .map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  return [line(headers), ...cells.map(line)].join('\n') + '\n';
}

export function bytes(n: number | undefined): string {
  if (n === undefined) return '-';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(v >= 100 ? 0 : 1)} ${units[u]}`;
}

export function seconds(ms: number): string {
  const s = Math.max(0, ms) / 1000;
  if (s < 60) return `${s.toFixed(1)}s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m}m${String(Math.floor(s % 60)).padStart(2, '0')}s` : `${Math.floor(m / 60)}h${String(m % 60).padStart(2, '0')}m`;
}

const STEP_STATES = new Set(['running', 'done', 'failed', 'undoing', 'undone', 'skipped']);

interface StepView {
  name: string;
  state: string;
  fraction?: number;
  message: string;
  started?: number;
  ended?: number;
}

/** A step event's step state: data.state, else its message's first word when that is one. */
function stepState(e: WorkflowEvent): string | undefined {
  const d = e.data?.state;
  if (typeof d === 'string' && STEP_STATES.has(d)) return d;
  const w = /^\s*([a-z-]+)/i.exec(e.message)?.[1]?.toLowerCase();
  if (w && STEP_STATES.has(w)) return w;
  if (w === 'started' || w === 'starting' || w === 'resuming') return 'running';
  if (w === 'finished' || w === 'succeeded' || w === 'completed') return 'done';
  return undefined;
}

export interface Watcher {
  event(e: WorkflowEvent): void;
  /** the final record; prints the outcome */
  finish(wf: Workflow & { steps?: StepRecord[] }): void;
  /** stop redrawing (Ctrl-C) */
  stop(): void;
}

/** Print a watched workflow's events: `json` as JSON lines; on a TTY as redrawn bars; else lines. */
export function watcher(wf: Workflow & { steps?: StepRecord[] }, o: { json?: boolean; tty: boolean; out?: NodeJS.WriteStream; err?: NodeJS.WritableStream }): Watcher {
  const out = o.out ?? process.stdout;
  const err = o.err ?? process.stderr;
  if (o.json) {
    return {
      event: (e) => out.write(JSON.stringify(e) + '\n'),
      finish: (w) => {
        if (w.state !== 'succeeded') err.write(`workflow ${w.id} ${w.state}${w.error ? `: ${w.error}` : ''}\n`);
      },
      stop: () => undefined,
    };
  }
  const t0 = Date.parse(wf.createdAt) || Date.now();
  let state: string = wf.state;
  const steps = new Map<string, StepView>();
  for (const s of wf.steps ?? []) steps.set(s.name, { name: s.name, state: s.state, message: s.error ?? '', started: Date.parse(s.startedAt), ended: s.endedAt ? Date.parse(s.endedAt) : undefined, fraction: s.state === 'done' ? 1 : undefined });
  const stepOf = (name: string, at: number): StepView => {
    let s = steps.get(name);
    if (!s) {
      s = { name, state: 'running', message: '', started: at };
      steps.set(name, s);
    }
    return s;
  };
  const apply = (e: WorkflowEvent) => {
    const at = Date.parse(e.at) || Date.now();
    if (e.type === 'state') {
      state = e.data && typeof e.data.state === 'string' ? e.data.state : (/^\s*([a-z-]+)/i.exec(e.message)?.[1] ?? state);
    } else if (e.step && (e.type === 'step' || e.type === 'progress')) {
      const s = stepOf(e.step, at);
      if (e.type === 'step') {
        const st = stepState(e);
        if (st) {
          if (st === 'running' && s.state !== 'running') {
            s.started = at;
            s.ended = undefined;
            s.fraction = undefined;
          }
          s.state = st;
          if (st === 'done' || st === 'skipped' || st === 'failed' || st === 'undone') s.ended = at;
          if (st === 'done') s.fraction = 1;
        }
      } else if (e.fraction !== undefined) s.fraction = e.fraction;
      s.message = e.message.startsWith(`${e.step}: `) ? e.message.slice(e.step.length + 2) : e.message;
    }
  };
  const plain = (e: WorkflowEvent): string => {
    const rel = `+${seconds((Date.parse(e.at) || Date.now()) - t0)}`.padStart(8);
    if (e.type === 'state') return `${rel}  workflow ${e.message}`;
    if (e.type === 'step') return `${rel}  step ${e.step && !e.message.startsWith(`${e.step}:`) ? `${e.step}: ` : ''}${e.message}`;
    if (e.type === 'progress') return `${rel}    ${e.step ?? ''}${e.fraction !== undefined ? ` ${Math.round(e.fraction * 100)}%` : ''} ${e.message}`;
    return `${rel}    ${e.step ? `${e.step}: ` : ''}${e.message}`;
  };
  const outcome = (w: Workflow) =>
    w.state === 'succeeded'
      ? `workflow ${w.id} (${w.kind} ${w.target}) succeeded in ${seconds(Date.parse(w.updatedAt) - Date.parse(w.createdAt))}\n`
      : `workflow ${w.id} (${w.kind} ${w.target}) ${w.state}${w.error ? `: ${w.error}` : ''}\n`;

  if (!o.tty) {
    return {
      event: (e) => {
        apply(e);
        out.write(plain(e) + '\n');
      },
      finish: (w) => (w.state === 'succeeded' ? out : err).write(outcome(w)),
      stop: () => undefined,
    };
  }

  // TTY: a block of lines (header + one per step) redrawn in place; log lines go above it.
  let drawn = 0;
  let dirty = true;
  let stopped = false;
  const width = () => Math.max(40, (out.columns || 100) - 1);
  const icon = (s: string) => ({ done: '✔', failed: '✘', running: '▶', undoing: '↺', undone: '↶', skipped: '·' })[s] ?? ' ';
  const bar = (f: number | undefined, n = 20) => {
    if (f === undefined) return ' '.repeat(n);
    const full = Math.round(Math.min(1, Math.max(0, f)) * n);
    return '█'.repeat(full) + '░'.repeat(n - full);
  };
  const nameWidth = () => Math.min(24, Math.max(8, ...[...steps.keys()].map((n) => n.length)));
  const block = (): string[] => {
    const now = Date.now();
    const lines = [`workflow ${wf.id} (${wf.kind} ${wf.target}): ${state}  ${seconds(now - t0)}`];
    for (const s of steps.values()) {
      const pct = s.fraction === undefined ? '    ' : `${String(Math.round(s.fraction * 100)).padStart(3)}%`;
      const el = s.started ? seconds((s.ended ?? now) - s.started) : '';
      lines.push(`  ${icon(s.state)} ${s.name.padEnd(nameWidth())} [${bar(s.fraction)}] ${pct} ${el.padStart(6)}  ${s.message}`);
    }
    return lines.map((l) => (l.length > width() ? l.slice(0, width() - 1) + '…' : l));
  };
  const clear = () => {
    if (drawn) out.write(`\x1b[${drawn}A\r\x1b[J`);
    drawn = 0;
  };
  const draw = () => {
    if (stopped) return;
    clear();
    const lines = block();
    out.write(lines.join('\n') + '\n');
    drawn = lines.length;
    dirty = false;
  };
  const timer = setInterval(() => {
    if (dirty || steps.size) draw();
  }, 250);
  timer.unref();
  draw();
  return {
    event: (e) => {
      apply(e);
      if (e.type === 'log') {
        clear();
        out.write(plain(e) + '\n');
        draw();
      } else dirty = true;
    },
    finish: (w) => {
      state = w.state;
      for (const s of w.steps ?? []) {
        const v = stepOf(s.name, Date.parse(s.startedAt));
        v.state = s.state;
        if (s.endedAt) v.ended = Date.parse(s.endedAt);
        if (s.state === 'done') v.fraction = 1;
        if (s.error) v.message = s.error;
      }
      clearInterval(timer);
      draw();
      stopped = true;
      (w.state === 'succeeded' ? out : err).write(outcome(w));
    },
    stop: () => {
      clearInterval(timer);
      if (!stopped) draw();
      stopped = true;
    },
  };
}
