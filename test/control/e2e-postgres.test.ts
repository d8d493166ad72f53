// The management service end to end on PostgreSQL (a real server started for the test). See
// e2e-scenario.ts: the same scenario as on SQLite.
import { test } from 'node:test';

import { startPostgres } from '../helpers/postgres.js';
import { runScenario } from './e2e-scenario.js';

test('management service end to end on PostgreSQL: every workflow survives a kill -9', { timeout: 1_500_000 }, async (t) => {
  const pg = await startPostgres();
  try {
    await runScenario(t, await pg.createDatabase('e2e'));
  } finally {
    await pg.stop();
  }
});
