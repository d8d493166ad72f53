// GET /v1/workflows/{id}/events as Server-Sent Events: the stored events after the cursor
// (Last-Event-ID, else ?after=), then live ones as the engine appends them, in seq order with
// no gap and no repeat; `id:` is the seq, `event:` the type, `data:` the event as JSON. A comment
// line every heartbeat keeps proxies from closing an idle stream. The stream ends after the
// state event that leaves the workflow resting (succeeded, failed or cancelled); a client that
// reconnects to a resting workflow with nothing newer gets 204, which tells EventSource to stop.

import type http from 'node:http';

import type { Logger } from '../../log/logger.js';
import type { Store, WorkflowEngine, WorkflowEvent, WorkflowState } from '../types.js';
import { RESTING_STATES, WORKFLOW_STATES } from './schemas.js';

const STATES: ReadonlySet<string> = new Set(WORKFLOW_STATES);

/** The state a 'state' event announces: data.state, else the first word of its message. */
export function eventState(e: WorkflowEvent): WorkflowState | undefined {
  if (e.type !== 'state') return undefined;
  const d = e.data?.state;
  if (typeof d === 'string' && STATES.has(d)) return d as WorkflowState;
  const m = /^[\s"']*([a-z-]+)/i.exec(e.message);
  const w = m?.[1]?.toLowerCase();
  return w && STATES.has(w) ? (w as WorkflowState) : undefined;
}

export function formatEvent(e: WorkflowEvent): string {
  return `id: ${e.seq}\nevent: ${e.type}\ndata: ${JSON.stringify(e)}\n\n`;
}

export interface StreamOptions {
  store: Store;
  engine: WorkflowEngine;
  log: Logger;
  id: string;
  after: number;
  req: http.IncomingMessage;
  res: http.ServerResponse;
  heartbeatMs: number;
  /** open streams, so a closing server can end them */
  open: Set<http.ServerResponse>;
}

const PAGE = 1000;
/** how long a resting workflow may lack its final state event before the stream ends anyway */
const FINAL_GRACE_MS = 2000;

export async function streamEvents(o: StreamOptions): Promise<void> {
  const { store, engine, id, res, log } = o;
  const wf0 = await store.getWorkflow(id);
  if (wf0 && RESTING_STATES.has(wf0.state) && (await store.listEvents(id, o.after, 1)).length === 0) {
    res.writeHead(204, { 'cache-control': 'no-cache' });
    res.end();
    return;
  }

  res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache, no-transform', connection: 'keep-alive', 'x-accel-buffering': 'no' });
  res.write(`retry: 2000\n: events of workflow ${id} after ${o.after}\n\n`);
  o.open.add(res);

  let last = o.after;
  let lastEvent: WorkflowEvent | undefined;
  let closed = false;
  let restingSince = 0;
  let recheck: NodeJS.Timeout | undefined;
  let unsubscribe: (() => void) | undefined;
  let chain: Promise<void> = Promise.resolve();

  const close = () => {
    if (closed) return;
    closed = true;
    clearInterval(heartbeat);
    if (recheck) clearTimeout(recheck);
    o.open.delete(res);
    try {
      unsubscribe?.();
    } catch (err) {
      log('warn', 'unsubscribe failed', { workflow: id, error: String(err) });
    }
    if (!res.writableEnded) res.end();
  };
  const send = (e: WorkflowEvent) => {
    if (closed || e.seq <= last) return;
    last = e.seq;
    lastEvent = e;
    res.write(formatEvent(e));
  };
  /** everything stored after `last`, page by page */
  const catchUp = async (below = Infinity) => {
    for (;;) {
      const evs = await store.listEvents(id, last, PAGE);
      for (const e of evs) if (e.seq < below) send(e);
      if (evs.length < PAGE || closed || (evs.length && evs[evs.length - 1]!.seq >= below)) return;
    }
  };
  /** End the stream when the workflow rests and its final state event has been sent. */
  const check = async () => {
    if (closed) return;
    const wf = await store.getWorkflow(id);
    if (!wf) return close();
    await catchUp();
    const announced = lastEvent ? eventState(lastEvent) : undefined;
    if (RESTING_STATES.has(wf.state)) {
      if (announced === wf.state) return close();
      // resting, but its state event is not stored yet (or never comes): wait a little
      if (!restingSince) restingSince = Date.now();
      if (Date.now() - restingSince > FINAL_GRACE_MS) return close();
      scheduleCheck(100);
      return;
    }
    restingSince = 0;
    // the event says it rests but the workflow record is not updated yet
    if (announced && RESTING_STATES.has(announced)) scheduleCheck(50);
  };
  const scheduleCheck = (ms: number) => {
    if (recheck || closed) return;
    recheck = setTimeout(() => {
      recheck = undefined;
      enqueue(check);
    }, ms);
  };
  const enqueue = (fn: () => Promise<void>) => {
    chain = chain.then(fn).catch((err: unknown) => {
      log('error', 'events stream failed; closing it (the client resumes with Last-Event-ID)', { workflow: id, error: err instanceof Error ? err.message : String(err) });
      close();
    });
  };

  const heartbeat = setInterval(() => {
    if (closed) return;
    res.write(': heartbeat\n\n');
    enqueue(check);
  }, o.heartbeatMs);
  o.req.on('close', close);
  res.on('close', close);

  try {
    unsubscribe = await engine.subscribe(id, o.after, (e) => {
      enqueue(async () => {
        if (closed || e.seq <= last) return;
        // fill any gap from the store, in order, then this one
        if (e.seq > last + 1) await catchUp(e.seq);
        send(e);
        await check();
      });
    });
    if (closed) unsubscribe();
  } catch (err) {
    log('error', 'could not subscribe to workflow events', { workflow: id, error: err instanceof Error ? err.message : String(err) });
    close();
    return;
  }
  enqueue(check);
}
