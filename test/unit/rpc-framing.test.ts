/**
 * JSON-RPC without sockets: the stream splitter (values cut at every byte,
 * strings with escapes and brackets, multi-byte UTF-8, scalars, depth and
 * size limits, EOF), param checking by the method table, the error-code
 * table, the dispatcher on an in-memory device, and docs/json-rpc.md being
 * in step with the table.
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { BlockError, ERROR_KINDS } from '../../src/block/errors.js';
import { memoryDevice } from '../../src/block/memory.js';
import { checkParams, dispatch } from '../../src/rpc/dispatcher.js';
import { KIND_CODES, RpcError, toErrorObject } from '../../src/rpc/errors.js';
import { DEFAULT_RPC_LIMITS, METHOD_TABLE, methodsMarkdown } from '../../src/rpc/schema.js';
import { JsonSplitter, parseValue, type SplitEvent } from '../../src/rpc/transport.js';
import { ROOT } from '../helpers/tools.js';

const T = { timeout: 10000 };

function values(evs: SplitEvent[]): string[] {
  return evs.map((e) => (e.kind === 'value' ? e.bytes.toString('utf8') : `<${e.kind}>`));
}

test('splitter: values end where they end, in any chunking', T, () => {
  const stream = '{"a":"}{\\"[","b":[1,{"c":"\\\\"}]} [1,2]\n"str\\"ing" 12 true{"é€𝄞":"ü"}null ';
  const want = ['{"a":"}{\\"[","b":[1,{"c":"\\\\"}]}', '[1,2]', '"str\\"ing"', '12', 'true', '{"é€𝄞":"ü"}', 'null'];
  const bytes = Buffer.from(stream);
  for (let cut = 0; cut <= bytes.length; cut++) {
    const s = new JsonSplitter(1 << 20, 64);
    const got = [...values(s.push(bytes.subarray(0, cut))), ...values(s.push(bytes.subarray(cut))), ...values(s.end())];
    assert.deepEqual(got, want, `cut at ${cut}`);
  }
  // One byte at a time.
  const s = new JsonSplitter(1 << 20, 64);
  const got: string[] = [];
  for (const b of bytes) got.push(...values(s.push(Buffer.from([b]))));
  got.push(...values(s.end()));
  assert.deepEqual(got, want);
});

test('splitter: a value completes without a newline; a scalar at EOF; a cut value at EOF', T, () => {
  const s = new JsonSplitter(1024, 8);
  assert.deepEqual(values(s.push(Buffer.from('{"x":1}'))), ['{"x":1}']);
  assert.equal(s.partial, false);
  assert.deepEqual(values(s.push(Buffer.from('42'))), []);
  assert.equal(s.partial, true);
  assert.deepEqual(values(s.end()), ['42']);
  assert.deepEqual(values(s.push(Buffer.from('{"x":'))), []);
  assert.deepEqual(values(s.end()), ['{"x":']);
});

test('splitter: nesting past the limit is skipped as one value; size past the limit is refused early', T, () => {
  const s = new JsonSplitter(1 << 20, 8);
  const deep = '['.repeat(1000) + ']'.repeat(1000);
  assert.deepEqual(values(s.push(Buffer.from(deep + '[1]'))), ['<too-deep>', '[1]']);
  const small = new JsonSplitter(100, 8);
  const evs = small.push(Buffer.from('{"a":"' + 'x'.repeat(200)));
  assert.deepEqual(values(evs), ['<too-large>']);
  // Refused before the end arrived: nothing of it is buffered.
  assert.equal(small.partial, false);
});

test('parseValue: invalid UTF-8 and bad JSON are SyntaxErrors', T, () => {
  assert.throws(() => parseValue(Buffer.from([0x7b, 0x22, 0xff, 0x22, 0x7d])), /not valid UTF-8/);
  assert.throws(() => parseValue(Buffer.from('{"a":}')), SyntaxError);
  assert.deepEqual(parseValue(Buffer.from('{"é":1}')), { é: 1 });
});

test('error codes: one per kind from -32000 down; data carries kind and context', T, () => {
  assert.deepEqual(
    ERROR_KINDS.map((k) => KIND_CODES[k]),
    ERROR_KINDS.map((_k, i) => -32000 - i),
  );
  const e = toErrorObject(new BlockError('read-only', 'x: read-only', { path: 'x', op: 'write' }));
  assert.deepEqual(e, { code: -32003, message: 'x: read-only', data: { kind: 'read-only', context: { path: 'x', op: 'write' } } });
  assert.equal(toErrorObject(new Error('boom')).code, -32603);
  assert.equal(toErrorObject(new RpcError(-32601, 'm')).code, -32601);
});

test('checkParams: by name, typed, defaults, and the message names the param', T, () => {
  const read = METHOD_TABLE.get('read')!;
  assert.deepEqual(checkParams(read, { offset: 0, length: 4 }), { offset: 0, length: 4, encoding: 'base64', export: '' });
  const bad = (p: unknown, re: RegExp): void => {
    assert.throws(
      () => checkParams(read, p),
      (e: unknown) => e instanceof RpcError && e.code === -32602 && re.test(e.message),
    );
  };
  bad({ length: 4 }, /'offset' is required/);
  bad({ offset: -1, length: 4 }, /'offset' must be at least 0/);
  bad({ offset: 1.5, length: 4 }, /'offset' must be a whole number/);
  bad({ offset: 0, length: 0 }, /'length' must be at least 1/);
  bad({ offset: 0, length: 4, encoding: 'b32' }, /'encoding' must be one of base64, hex/);
  bad({ offset: 0, length: 4, bogus: 1 }, /no param 'bogus'/);
  bad([0, 4], /by name/);
});

test('dispatch on a memory device: requests, notifications, batches, errors', T, async () => {
  const device = memoryDevice(1 << 20);
  const env = { exports: [{ name: '', device, readOnly: false }], limits: DEFAULT_RPC_LIMITS };
  const w = await dispatch({ jsonrpc: '2.0', method: 'write', params: { offset: 10, data: 'aGk=' }, id: 1 }, env);
  assert.deepEqual(w, { jsonrpc: '2.0', id: 1, result: { offset: 10, length: 2 } });
  const r = await dispatch({ jsonrpc: '2.0', method: 'read', params: { offset: 9, length: 4, encoding: 'hex' }, id: 'r' }, env);
  assert.deepEqual(r, { jsonrpc: '2.0', id: 'r', result: { offset: 9, length: 4, encoding: 'hex', data: '00686900' } });
  assert.equal(await dispatch({ jsonrpc: '2.0', method: 'flush' }, env), null);
  assert.equal(
    await dispatch(
      [
        { jsonrpc: '2.0', method: 'flush' },
        { jsonrpc: '2.0', method: 'nope' },
      ],
      env,
    ),
    null,
  );
  const batch = (await dispatch(
    [{ jsonrpc: '2.0', method: 'get_version', id: 1 }, 5, { jsonrpc: '2.0', method: 'flush' }, { jsonrpc: '1.0', method: 'x', id: 2 }],
    env,
  )) as { id: unknown; error?: { code: number } }[];
  assert.deepEqual(
    batch.map((b) => [b.id, b.error?.code ?? 'ok']),
    [
      [1, 'ok'],
      [null, -32600],
      [2, -32600],
    ],
  );
  const empty = (await dispatch([], env)) as { error: { code: number } };
  assert.equal(empty.error.code, -32600);
  const oob = (await dispatch({ jsonrpc: '2.0', method: 'read', params: { offset: 1 << 20, length: 1 }, id: 3 }, env)) as {
    error: { code: number; data: { kind: string } };
  };
  assert.equal(oob.error.code, -32002);
  assert.equal(oob.error.data.kind, 'out-of-bounds');
  const ro = { exports: [{ name: 'ro', device, readOnly: true }], limits: DEFAULT_RPC_LIMITS };
  const refused = (await dispatch(
    { jsonrpc: '2.0', method: 'write_zeroes', params: { export: 'ro', offset: 0, length: 1 }, id: 4 },
    ro,
  )) as {
    error: { code: number };
  };
  assert.equal(refused.error.code, -32003);
  const noExport = (await dispatch({ jsonrpc: '2.0', method: 'info', params: { export: 'zz' }, id: 5 }, ro)) as { error: { code: number } };
  assert.equal(noExport.error.code, -32602);
});

test('docs/json-rpc.md holds the methods section generated from the table', T, () => {
  const doc = readFileSync(join(ROOT, 'docs', 'json-rpc.md'), 'utf8');
  assert.ok(doc.includes(methodsMarkdown()), 'docs/json-rpc.md is out of step with src/rpc/schema.ts: regenerate its Methods section');
  for (const name of METHOD_TABLE.keys()) assert.ok(doc.includes(`### \`${name}\``));
});
