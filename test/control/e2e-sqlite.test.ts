// The management service end to end on SQLite (the default store). See e2e-scenario.ts.
import { test } from 'node:test';

import { runScenario } from './e2e-scenario.js';

test('management service end to end on SQLite: every workflow survives a kill -9', { timeout: 1_500_000 }, async (t) => {
  await runScenario(t, undefined);
});
