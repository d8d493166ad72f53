// /v1/tokens (operator): list, create (the secret is in the answer, once), delete; /v1/audit.

import type { Store } from '../../types.js';
import { createToken } from '../auth.js';
import { ApiError } from '../errors.js';
import { route, type Route } from '../router.js';
import * as S from '../schemas.js';

export function adminRoutes(store: Store): Route[] {
  return [
    route({
      method: 'GET',
      path: '/v1/tokens',
      tag: 'Tokens',
      summary: 'List API tokens (never their secrets)',
      auth: 'operator',
      responses: { 200: { description: 'the tokens', schema: S.TokenList } },
      handler: async () => ({ status: 200, body: { items: await store.listTokens() } }),
    }),
    route({
      method: 'POST',
      path: '/v1/tokens',
      tag: 'Tokens',
      summary: 'Create an API token',
      description: 'The answer carries the secret; it is shown this once (the service keeps only its SHA-256). Use it as "Authorization: Bearer SECRET".',
      auth: 'operator',
      body: S.TokenCreate,
      audit: 'token.create',
      responses: { 201: { description: 'created; `secret` is the bearer token', schema: S.TokenCreated } },
      handler: async ({ body, audit }) => {
        const t = await createToken(store, body.name, body.role);
        audit.target = t.id;
        audit.detail = { name: t.name, role: t.role };
        return { status: 201, body: t, headers: { 'cache-control': 'no-store' } };
      },
    }),
    route({
      method: 'DELETE',
      path: '/v1/tokens/{id}',
      tag: 'Tokens',
      summary: 'Delete (revoke) an API token',
      description: 'Refused (409) for the last operator token: nobody could create another.',
      auth: 'operator',
      params: { id: S.Id },
      audit: 'token.delete',
      responses: { 204: { description: 'deleted; the token no longer authenticates' }, 409: { description: 'the last operator token', schema: S.ErrorBody } },
      handler: async ({ params, audit }) => {
        const id = params.id!;
        audit.target = id;
        const all = await store.listTokens();
        const t = all.find((x) => x.id === id);
        if (!t) throw new ApiError(404, 'SPW_ERR_NOT_FOUND', `no token with id "${id}" (list them with GET /v1/tokens)`);
        audit.detail = { name: t.name, role: t.role };
        if (t.role === 'operator' && all.filter((x) => x.role === 'operator').length === 1) {
          throw new ApiError(409, 'SPW_ERR_CONFLICT', `token "${t.name}" is the last operator token; create another operator token before deleting it`);
        }
        if (!(await store.deleteToken(id))) throw new ApiError(404, 'SPW_ERR_NOT_FOUND', `no token with id "${id}"`);
        return { status: 204 };
      },
    }),
    route({
      method: 'GET',
      path: '/v1/audit',
      tag: 'Audit',
      summary: 'The audit log, newest first',
      description: 'Every mutating API request (actor = the token name) and every effect a workflow step makes.',
      auth: 'operator',
      query: S.AuditQuery,
      responses: { 200: { description: 'audit entries', schema: S.AuditList } },
      handler: async ({ query }) => ({ status: 200, body: { items: await store.listAudit({ ...query, limit: query.limit ?? 100 }) } }),
    }),
  ];
}
