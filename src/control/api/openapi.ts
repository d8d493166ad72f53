// The OpenAPI 3.1 document of the management API, generated from the routes and their zod
// schemas (z.toJSONSchema); nothing in it is written by hand a second time. Request bodies use
// the schemas' input side (defaults make fields optional), answers their output side.

import { z } from 'zod';

import type { Route } from './router.js';
import { requestSchemas, responseSchemas } from './schemas.js';

type JsonSchema = Record<string, unknown>;
const REF = '#/components/schemas/';

export function openApiDocument(routes: Route[], version: string): JsonSchema {
  const components: Record<string, JsonSchema> = {};

  /** Drop $schema/$id, move $defs into components (refs rewritten), keep the rest. */
  const clean = (s: JsonSchema, prefix: string): JsonSchema => {
    const { $schema: _s, $id: _i, $defs, ...rest } = s as JsonSchema & { $defs?: Record<string, JsonSchema> };
    if (!$defs) return rest;
    const rename = (n: string) => `${prefix}_${n.replace(/[^A-Za-z0-9_.-]/g, '_')}`;
    const fix = (v: unknown): unknown => {
      if (Array.isArray(v)) return v.map(fix);
      if (v && typeof v === 'object') {
        const o: JsonSchema = {};
        for (const [k, x] of Object.entries(v)) o[k] = k === '$ref' && typeof x === 'string' && x.startsWith('#/$defs/') ? REF + rename(x.slice(8)) : fix(x);
        return o;
      }
      return v;
    };
    for (const [n, d] of Object.entries($defs)) components[rename(n)] = fix(d) as JsonSchema;
    return fix(rest) as JsonSchema;
  };

  for (const [reg, io] of [
    [requestSchemas, 'input'],
    [responseSchemas, 'output'],
  ] as const) {
    const gen = z.toJSONSchema(reg, { io, uri: (id) => REF + id, unrepresentable: 'any' }) as { schemas: Record<string, JsonSchema> };
    for (const [id, s] of Object.entries(gen.schemas)) components[id] = clean(s, id);
  }

  let inlineCount = 0;
  const inline = (schema: z.ZodType, io: 'input' | 'output'): JsonSchema => clean(z.toJSONSchema(schema, { io, unrepresentable: 'any' }) as JsonSchema, `Inline${++inlineCount}`);
  const schemaOf = (schema: z.ZodType, io: 'input' | 'output'): JsonSchema => {
    const id = (io === 'input' ? requestSchemas : responseSchemas).get(schema)?.id;
    return id ? { $ref: REF + id } : inline(schema, io);
  };
  const errorRef = { $ref: REF + 'Error' };
  const err = (description: string) => ({ description, content: { 'application/json': { schema: errorRef } } });

  const paths: Record<string, Record<string, unknown>> = {};
  const operationIds = new Set<string>();
  for (const r of routes) {
    const parameters: JsonSchema[] = [];
    for (const [name, s] of Object.entries(r.params ?? {})) parameters.push({ name, in: 'path', required: true, schema: inline(s, 'input') });
    if (r.query) {
      const q = inline(r.query, 'input') as { properties?: Record<string, JsonSchema>; required?: string[] };
      for (const [name, s] of Object.entries(q.properties ?? {})) {
        const { description, ...schema } = s;
        parameters.push({ name, in: 'query', required: (q.required ?? []).includes(name), schema, ...(typeof description === 'string' ? { description } : {}) });
      }
    }
    for (const h of r.headerParams ?? []) parameters.push({ name: h.name, in: 'header', required: false, description: h.description, schema: { type: 'string' } });

    const responses: Record<string, unknown> = {};
    for (const [status, spec] of Object.entries(r.responses)) {
      const content: Record<string, unknown> = {};
      if (spec.schema) content[spec.contentType ?? 'application/json'] = { schema: schemaOf(spec.schema, 'output') };
      else if (spec.contentType) content[spec.contentType] = { schema: { type: 'string' } };
      for (const a of spec.also ?? []) content[a.contentType] = { schema: a.schema ? schemaOf(a.schema, 'output') : { type: 'string' } };
      responses[status] = { description: spec.description, ...(Object.keys(content).length ? { content } : {}) };
    }
    const add = (status: number, description: string) => {
      if (!(String(status) in responses)) responses[String(status)] = err(description);
    };
    if (r.body || r.query || r.params) add(400, 'invalid request: malformed JSON, or parameters or body not matching the schema (details.issues lists each path)');
    if (r.auth !== 'none') add(401, 'missing or invalid bearer token');
    if (r.auth === 'operator') add(403, 'the token has role viewer');
    if (r.params) add(404, 'no such record');
    if (r.body) add(413, 'request body over 1 MiB');
    if (r.body) add(415, 'request body is not application/json');
    add(500, 'internal error (the answer carries a request id; the service log has the details)');

    let operationId = r.method.toLowerCase() + r.path.split('/').filter(Boolean).map((s) => (s.startsWith('{') ? 'By' + cap(s.slice(1, -1)) : cap(s))).join('');
    while (operationIds.has(operationId)) operationId += '_';
    operationIds.add(operationId);

    const op: JsonSchema = {
      operationId,
      summary: r.summary,
      ...(r.description ? { description: r.description } : {}),
      tags: [r.tag],
      security: r.auth === 'none' ? [] : [{ bearer: [] }],
      'x-spillway-role': r.auth,
      ...(parameters.length ? { parameters } : {}),
      ...(r.body ? { requestBody: { required: true, content: { 'application/json': { schema: schemaOf(r.body, 'input') } } } } : {}),
      responses,
    };
    (paths[r.path] ??= {})[r.method.toLowerCase()] = op;
  }

  return {
    openapi: '3.1.0',
    info: {
      title: 'Spillway management API',
      version,
      description:
        'Inventory (sites, edges, hosts, instances, volumes, profiles), durable workflows that move instances, their events, the audit log and API tokens. Authenticate with "Authorization: Bearer spw_..."; viewer tokens may read, operator tokens may do everything. Errors are {"error": {"code", "message", "details"}}.',
      license: { name: 'Apache-2.0', identifier: 'Apache-2.0' },
    },
    jsonSchemaDialect: 'https://json-schema.org/draft/2020-12/schema',
    security: [{ bearer: [] }],
    tags: [...new Set(routes.map((r) => r.tag))].map((name) => ({ name })),
    paths,
    components: {
      schemas: components,
      securitySchemes: { bearer: { type: 'http', scheme: 'bearer', description: 'an API token: spw_ followed by 43 base64url characters' } },
    },
  };
}

function cap(s: string): string {
  return s
    .split(/[^A-Za-z0-9]+/)
    .filter(Boolean)
    .map((w) => w[0]!.toUpperCase() + w.slice(1))
    .join('');
}
