// /v1/workflows: list, start, show (with steps), cancel, retry, and the events (SSE or JSON).

import type http from 'node:http';

import type { Logger } from '../../../log/logger.js';
import type { JsonObject, Store, WorkflowEngine, WorkflowKind } from '../../types.js';
import { ApiError } from '../errors.js';
import { route, STREAMED, type Route } from '../router.js';
import * as S from '../schemas.js';
import { streamEvents } from '../sse.js';

const idParam = { id: S.Id };

export interface WorkflowRouteOptions {
  store: Store;
  engine: WorkflowEngine;
  log: Logger;
  heartbeatMs: number;
  openStreams: Set<http.ServerResponse>;
}

export function workflowRoutes(o: WorkflowRouteOptions): Route[] {
  const { store, engine } = o;
  const load = async (id: string) => {
    const wf = await store.getWorkflow(id);
    if (!wf) throw new ApiError(404, 'SPW_ERR_NOT_FOUND', `no workflow with id "${id}" (list them with GET /v1/workflows)`);
    return wf;
  };
  return [
    route({
      method: 'GET',
      path: '/v1/workflows',
      tag: 'Workflows',
      summary: 'List workflows, newest first',
      auth: 'viewer',
      query: S.WorkflowQuery,
      responses: { 200: { description: 'the workflows', schema: S.WorkflowList } },
      handler: async ({ query }) => ({ status: 200, body: { items: await store.listWorkflows({ ...query, limit: query.limit ?? 100 }) } }),
    }),
    route({
      method: 'POST',
      path: '/v1/workflows',
      tag: 'Workflows',
      summary: 'Start a workflow',
      description:
        'Checks the input, creates the workflow and starts it in the background: 202 with the workflow in state pending or running. Follow it with GET /v1/workflows/{id}/events. 409 while another unfinished workflow acts on the same target.',
      auth: 'operator',
      body: S.WorkflowStart,
      audit: 'workflow.start',
      engineAudits: true,
      responses: { 202: { description: 'started', schema: S.WorkflowRecord }, 409: { description: 'another workflow acts on the target', schema: S.ErrorBody } },
      handler: async ({ body, actor, audit }) => {
        const kinds = engine.kinds();
        audit.detail = { kind: body.kind, input: body.input as JsonObject };
        if (!kinds.includes(body.kind as WorkflowKind)) {
          throw new ApiError(400, 'SPW_ERR_INVALID', `this service runs no "${body.kind}" workflows; it knows ${kinds.length ? kinds.join(', ') : 'none'}`, { kinds });
        }
        const wf = await engine.start(body.kind as WorkflowKind, body.input, actor);
        audit.target = wf.target;
        audit.detail.workflow = wf.id;
        return { status: 202, body: wf, headers: { location: `/v1/workflows/${encodeURIComponent(wf.id)}` } };
      },
    }),
    route({
      method: 'GET',
      path: '/v1/workflows/{id}',
      tag: 'Workflows',
      summary: 'Show a workflow and its steps',
      auth: 'viewer',
      params: idParam,
      responses: { 200: { description: 'the workflow, with the records of its steps', schema: S.WorkflowDetail } },
      handler: async ({ params }) => {
        const wf = await load(params.id!);
        return { status: 200, body: { ...wf, steps: await store.listSteps(wf.id) } };
      },
    }),
    route({
      method: 'POST',
      path: '/v1/workflows/{id}/cancel',
      tag: 'Workflows',
      summary: 'Cancel a workflow',
      description: 'The running step is aborted, then the steps done are undone in reverse order. 202 with the workflow (cancelling or rolling-back); follow the events to see it end.',
      auth: 'operator',
      params: idParam,
      audit: 'workflow.cancel',
      engineAudits: true,
      responses: { 202: { description: 'cancellation under way', schema: S.WorkflowRecord }, 409: { description: 'the workflow is finished', schema: S.ErrorBody } },
      handler: async ({ params, actor, audit }) => {
        const wf0 = await load(params.id!);
        audit.target = wf0.target;
        audit.detail = { workflow: wf0.id, kind: wf0.kind };
        return { status: 202, body: await engine.cancel(wf0.id, actor) };
      },
    }),
    route({
      method: 'POST',
      path: '/v1/workflows/{id}/retry',
      tag: 'Workflows',
      summary: 'Retry a failed workflow',
      description: 'Resumes a failed workflow from its failed step. 409 unless it failed.',
      auth: 'operator',
      params: idParam,
      audit: 'workflow.retry',
      engineAudits: true,
      responses: { 202: { description: 'resumed', schema: S.WorkflowRecord }, 409: { description: 'the workflow has not failed', schema: S.ErrorBody } },
      handler: async ({ params, actor, audit }) => {
        const wf0 = await load(params.id!);
        audit.target = wf0.target;
        audit.detail = { workflow: wf0.id, kind: wf0.kind };
        return { status: 202, body: await engine.retry(wf0.id, actor) };
      },
    }),
    route({
      method: 'GET',
      path: '/v1/workflows/{id}/events',
      tag: 'Workflows',
      summary: "Follow a workflow's events (Server-Sent Events)",
      description:
        'text/event-stream: the stored events after the cursor (the Last-Event-ID header, else ?after=, else from the start), then live ones; each has `id:` = seq, `event:` = type (state, step, progress, log) and `data:` = the event as JSON. A `: heartbeat` comment comes every 15 s. The stream ends after the state event that leaves the workflow succeeded, failed or cancelled; asked again with nothing newer it answers 204 (EventSource then stops reconnecting). With ?format=json: the stored events as one JSON list instead.',
      auth: 'viewer',
      params: idParam,
      query: S.EventsQuery,
      headerParams: [{ name: 'Last-Event-ID', description: 'resume after this seq (sent by EventSource when it reconnects); wins over ?after=' }],
      responses: {
        200: { description: 'the event stream (text/event-stream), or with format=json the list (application/json)', schema: S.EventList, also: [{ contentType: 'text/event-stream' }] },
        204: { description: 'the workflow is finished and there is nothing after the cursor' },
      },
      handler: async ({ params, query, req, res }) => {
        const wf = await load(params.id!);
        const header = req.headers['last-event-id'];
        let after = query.after ?? 0;
        if (typeof header === 'string' && header.trim() !== '') {
          if (!/^\d+$/.test(header.trim())) throw new ApiError(400, 'SPW_ERR_INVALID', `Last-Event-ID must be an event seq (a whole number), not "${header}"`);
          after = Number(header.trim());
        }
        if (query.format === 'json') return { status: 200, body: { items: await store.listEvents(wf.id, after, query.limit ?? 10000) } };
        await streamEvents({ store, engine, log: o.log, id: wf.id, after, req, res, heartbeatMs: o.heartbeatMs, open: o.openStreams });
        return STREAMED;
      },
    }),
  ];
}
