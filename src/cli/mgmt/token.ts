// `spillway token create|list|delete`: API tokens of the management service (operator only).

import { Command, InvalidArgumentError } from 'commander';

import type { TokenRecord } from '../../control/types.js';
import { ApiClient, withApi, type ApiOptions } from './client.js';
import { table } from './render.js';

function role(v: string): string {
  if (v !== 'viewer' && v !== 'operator') throw new InvalidArgumentError('the role is viewer (read only) or operator (everything)');
  return v;
}

export function registerToken(program: Command): void {
  const tok = program
    .command('token')
    .summary('create, list and delete API tokens of the management service')
    .description('API tokens authenticate the CLI and other clients to the management service (Authorization: Bearer). viewer tokens may read; operator tokens may do everything. Managing tokens needs an operator token.')
    .addHelpText('after', '\nExamples:\n  spillway token create grafana --role viewer\n  spillway token list\n  spillway token delete tok_3f9a01c2b7de');

  withApi(
    tok
      .command('create')
      .argument('<name>', 'who or what uses it (the audit log names it)')
      .requiredOption('--role <role>', 'viewer or operator', role)
      .description('Create a token and print its secret. The secret is shown this once: the service keeps only its hash.')
      .addHelpText('after', '\nExamples:\n  spillway token create grafana --role viewer\n  spillway token create alice --role operator --json > alice.json\n  SPILLWAY_TOKEN=$(spillway token create ci --role operator --json | jq -r .secret)'),
  ).action(async (name: string, o: ApiOptions & { role: string }) => {
    const t = await ApiClient.from(o).request<TokenRecord & { secret: string }>('POST', '/v1/tokens', { name, role: o.role });
    if (o.json) return void process.stdout.write(JSON.stringify(t, null, 2) + '\n');
    process.stdout.write(`${t.secret}\n`);
    process.stderr.write(`token ${t.id} "${t.name}" (${t.role}) created; the secret above is shown only now. Use it with --token, SPILLWAY_TOKEN or SPILLWAY_TOKEN_FILE.\n`);
  });

  withApi(tok.command('list').description('List tokens (names, roles and ids; never secrets).').addHelpText('after', '\nExample:\n  spillway token list --json')).action(async (o: ApiOptions) => {
    const r = await ApiClient.from(o).request<{ items: TokenRecord[] }>('GET', '/v1/tokens');
    if (o.json) return void process.stdout.write(JSON.stringify(r.items, null, 2) + '\n');
    process.stdout.write(table(['ID', 'NAME', 'ROLE', 'CREATED'], r.items.map((t) => [t.id, t.name, t.role, t.createdAt])));
  });

  withApi(tok.command('delete').argument('<id>', 'the token id (see `spillway token list`)').description('Delete a token: it stops working at once. The last operator token cannot be deleted.').addHelpText('after', '\nExample:\n  spillway token delete tok_3f9a01c2b7de')).action(async (id: string, o: ApiOptions) => {
    await ApiClient.from(o).request('DELETE', `/v1/tokens/${encodeURIComponent(id)}`);
    process.stdout.write(o.json ? JSON.stringify({ deleted: id }) + '\n' : `token ${id} deleted\n`);
  });
}
