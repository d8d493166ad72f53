// The management service's REST API (docs/api.md): createApi() is a node:http request listener,
// startApi() listens; bootstrapToken() mints the first operator token without the API.

export { authenticate, bootstrapToken, createToken, hashToken, newToken, TOKEN_PREFIX } from './auth.js';
export { ApiError, locateJsonError } from './errors.js';
export { openApiDocument } from './openapi.js';
export { route, STREAMED, type Method, type Reply, type ResponseSpec, type Route, type RouteContext } from './router.js';
export * as schemas from './schemas.js';
export { eventState, formatEvent } from './sse.js';
export { createApi, MAX_BODY_BYTES, startApi, type ApiHandler, type ApiOptions, type ApiServer } from './server.js';
