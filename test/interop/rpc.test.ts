/**
 * JSON-RPC against real peers: every method over TCP and a Unix socket on a
 * qcow2 chain, with results checked against `rblock inspect/info/check
 * --output json` and `qemu-img map --output=json`; the seeds' `echo -n |
 * nc` line with the real nc (netcat-openbsd); batches, notifications and the
 * error codes on the wire; read-only serving refusing writes; NBD and RPC on
 * one open image (qemu-io writes through NBD, RPC reads, and the reverse);
 * abuse (invalid UTF-8, deep nesting, an oversized message, a trickled
 * message, a half-sent one, 100 connections at once, a full server) after
 * which the server still answers.
 */
import test, { type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { memoryDevice } from '../../src/block/memory.js';
import { RpcServer } from '../../src/rpc/server.js';
import { RBLOCK, needTools, rblock, run, scratchDir } from '../helpers/tools.js';

const T = { timeout: 30000 };
const RUN = { timeout: 20000 };

type Addr = { port: number } | { path: string };

interface Served {
  proc: ChildProcess;
  tcp?: Addr;
  unix?: Addr;
  stderr(): string;
}

/** Start `rblock serve ARGS` in `cwd`; resolves once it has printed `lines` "listening on" lines. */
async function serve(t: TestContext, cwd: string, args: string[], lines: number): Promise<Served> {
  const proc = spawn(process.execPath, [RBLOCK, 'serve', ...args], { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
  t.after(() => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
  });
  let err = '';
  proc.stderr!.setEncoding('utf8');
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`rblock serve did not start: ${err}`)), 10000);
    proc.stderr!.on('data', (s: string) => {
      err += s;
      if ((err.match(/listening on/g) ?? []).length >= lines) {
        clearTimeout(timer);
        resolve();
      }
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`rblock serve exited (${code}): ${err}`));
    });
  });
  const s: Served = { proc, stderr: () => err };
  const tcp = /JSON-RPC listening on [\d.]+:(\d+)/.exec(err);
  if (tcp !== null) s.tcp = { port: Number(tcp[1]) };
  const unix = /JSON-RPC listening on unix:(\S+)/.exec(err);
  if (unix !== null) s.unix = { path: join(cwd, unix[1] as string) };
  return s;
}

function open(a: Addr): Socket {
  return 'path' in a ? connect(a.path) : connect(a.port, '127.0.0.1');
}

/**
 * Send `payload` (optionally half-closing after it) and collect reply lines until
 * `want` lines came or the server closed. `closed` says whether the server ended it.
 */
function exchange(
  a: Addr,
  payload: string | Buffer,
  want: number,
  opts: { halfClose?: boolean; timeoutMs?: number } = {},
): Promise<{ lines: unknown[]; closed: boolean }> {
  return new Promise((resolve, reject) => {
    const sock = open(a);
    let buf = '';
    let closed = false;
    const lines = (): unknown[] =>
      buf
        .split('\n')
        .filter((l) => l !== '')
        .map((l) => JSON.parse(l) as unknown);
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new Error(`no ${want} replies within ${opts.timeoutMs ?? 10000} ms; got: ${buf}`));
    }, opts.timeoutMs ?? 10000);
    const finish = (): void => {
      clearTimeout(timer);
      sock.destroy();
      resolve({ lines: lines(), closed });
    };
    sock.setEncoding('utf8');
    sock.on('error', () => undefined);
    sock.on('connect', () => {
      if (opts.halfClose === true) sock.end(payload);
      else sock.write(payload);
    });
    sock.on('data', (s: string) => {
      buf += s;
      if (buf.split('\n').length - 1 >= want && want > 0) finish();
    });
    sock.on('end', () => {
      closed = true;
      finish();
    });
    sock.on('close', () => {
      closed = true;
      finish();
    });
  });
}

interface Reply {
  id: unknown;
  result?: unknown;
  error?: { code: number; message: string; data?: { kind?: string; param?: string } };
}

async function call(a: Addr, method: string, params?: Record<string, unknown>): Promise<Reply> {
  const req: Record<string, unknown> = { jsonrpc: '2.0', method, id: 1 };
  if (params !== undefined) req['params'] = params;
  const { lines } = await exchange(a, JSON.stringify(req), 1);
  return lines[0] as Reply;
}

async function result(a: Addr, method: string, params?: Record<string, unknown>): Promise<unknown> {
  const r = await call(a, method, params);
  if (r.error !== undefined) throw new Error(`${method}: ${r.error.code} ${r.error.message}`);
  return r.result;
}

function json(cwd: string, ...args: string[]): unknown {
  const r = rblock(args, { cwd, ...RUN });
  assert.ok(r.status === 0 || args[0] === 'check', `rblock ${args.join(' ')}: ${r.stderr}`);
  return JSON.parse(r.stdout) as unknown;
}

/** base.qcow2 (8M): 0x11 over [0, 1M); top.qcow2 over it: 0x22 over [512k, 1.5M), zeros at 3M. */
function makeChain(dir: string): void {
  run('qemu-img', ['create', '-q', '-f', 'qcow2', 'base.qcow2', '8M'], { cwd: dir });
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', 'base.qcow2'], { cwd: dir });
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', '8M'], { cwd: dir });
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 512k 1M', '-c', 'write -z 3M 64k', 'top.qcow2'], { cwd: dir });
}

const fill = (n: number, b: number): string => Buffer.alloc(n, b).toString('base64');

test('every method over TCP and a Unix socket, checked against inspect, info, check and qemu-img map', T, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  using s = scratchDir('rblock-rpc-');
  makeChain(s.dir);
  const srv = await serve(t, s.dir, ['-r', 'top.qcow2', '--rpc', '127.0.0.1:0', '--rpc-socket', 'rpc.sock'], 2);
  const header = json(s.dir, 'inspect', '--output', 'json', 'top.qcow2');
  const l1 = (json(s.dir, 'inspect', '--l1', '--output', 'json', 'top.qcow2') as { l1: unknown }).l1;
  const l2 = (json(s.dir, 'inspect', '--l2', '0', '--output', 'json', 'top.qcow2') as { l2: unknown }).l2;
  const info = json(s.dir, 'info', '--output', 'json', 'top.qcow2');
  const check = json(s.dir, 'check', '--output', 'json', 'top.qcow2');
  const qmap = JSON.parse(run('qemu-img', ['map', '--output=json', 'top.qcow2'], { cwd: s.dir }).stdout) as {
    start: number;
    length: number;
    depth: number;
    offset?: number;
  }[];
  for (const a of [srv.tcp!, srv.unix!]) {
    const v = (await result(a, 'get_version')) as { rblock: string; jsonrpc: string };
    assert.equal(v.jsonrpc, '2.0');
    assert.match(v.rblock, /^\d+\.\d+\.\d+/);
    assert.deepEqual(await result(a, 'list_exports'), [{ name: '', format: 'qcow2', size: 8 << 20, readOnly: true, file: 'top.qcow2' }]);
    assert.deepEqual(await result(a, 'info'), info);
    assert.deepEqual(await result(a, 'header'), header);
    assert.deepEqual(await result(a, 'l1_table'), l1);
    assert.deepEqual(await result(a, 'l2_table', { index: 0 }), l2);
    assert.deepEqual(await result(a, 'check'), check);
    assert.deepEqual(await result(a, 'map'), qmap);
    // A sub-range: clipped at both ends.
    const part = (await result(a, 'map', { offset: 600 << 10, length: 1 << 20 })) as { start: number; length: number }[];
    assert.equal(part[0]!.start, 600 << 10);
    assert.equal(
      part.reduce((n, e) => n + e.length, 0),
      1 << 20,
    );
    const bs = (await result(a, 'block_status', { offset: 0, length: 8 << 20 })) as { offset: number; length: number }[];
    assert.equal(bs[0]!.offset, 0);

    // Bytes: the top's data, the base's data through it, the zeroed range.
    const r = (await result(a, 'read', { offset: (512 << 10) - 2, length: 4, encoding: 'hex' })) as { data: string };
    assert.equal(r.data, '11112222');
    const z = (await result(a, 'read', { offset: 3 << 20, length: 8 })) as { data: string };
    assert.equal(z.data, fill(8, 0));

    // translate: a top cluster (host offset as qemu-img map says), a base cluster (depth 1), a zero cluster.
    const at = 600 << 10;
    const e = qmap.find((m) => m.start <= at && at < m.start + m.length)!;
    const tr = (await result(a, 'translate', { offset: at })) as {
      depth: number;
      kind: string;
      hostOffset: number;
      hostFile: string;
      layers: { tables: Record<string, unknown> }[];
    };
    assert.equal(tr.depth, 0);
    assert.equal(tr.kind, 'data');
    assert.equal(tr.hostFile, 'top.qcow2');
    assert.equal(tr.hostOffset, e.offset! + (at - e.start));
    const tables = tr.layers[0]!.tables;
    assert.equal(tables['l1Index'], 0);
    assert.equal(tables['l2Index'], 9);
    assert.equal(tables['refcount'], 1);
    assert.equal(tables['hostCluster'], Math.floor(tr.hostOffset / 65536));
    assert.deepEqual(tables['flags'], { copied: true, compressed: false, zero: false });
    const l2e = (l2 as { entries: { index: number; raw: string; hostOffset: number }[] }).entries.find((x) => x.index === 9)!;
    assert.equal(tables['l2Entry'], l2e.raw);
    assert.equal(tables['l2TableOffset'], (l2 as { offset: number }).offset);
    const rc = (await result(a, 'refcount', { cluster: tables['hostCluster'] })) as { refcount: number };
    assert.equal(rc.refcount, 1);

    const deep = (await result(a, 'translate', { offset: 100 << 10 })) as { depth: number; file: string; kind: string; layers: unknown[] };
    assert.deepEqual([deep.depth, deep.file, deep.kind, deep.layers.length], [1, 'base.qcow2', 'data', 2]);
    const zero = (await result(a, 'translate', { offset: 3 << 20 })) as { kind: string; layers: { tables: { flags: unknown } }[] };
    assert.equal(zero.kind, 'zero');
    assert.deepEqual(zero.layers[0]!.tables.flags, { copied: false, compressed: false, zero: true });

    // read_guest_cluster: cluster 2 is [128k, 192k), the base's 0x11 seen through the top.
    const c = (await result(a, 'read_guest_cluster', { cluster: 2 })) as { offset: number; data: string; translation: { depth: number } };
    assert.equal(c.offset, 128 << 10);
    assert.equal(c.data, fill(65536, 0x11));
    assert.equal(c.translation.depth, 1);

    // Read-only serving refuses every write with the read-only error.
    for (const [m, p] of [
      ['write', { offset: 0, data: 'AA==' }],
      ['write_zeroes', { offset: 0, length: 512 }],
      ['discard', { offset: 0, length: 512 }],
      ['flush', {}],
    ] as const) {
      const w = await call(a, m, p);
      assert.equal(w.error?.code, -32003, m);
      assert.equal(w.error?.data?.kind, 'read-only');
    }
  }
});

test('the seeds: echo -n ... | nc localhost PORT, with the real nc', T, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io', 'nc')) return;
  using s = scratchDir('rblock-rpc-nc-');
  makeChain(s.dir);
  const srv = await serve(t, s.dir, ['-r', 'top.qcow2', '--rpc', '0'], 1);
  const port = (srv.tcp as { port: number }).port;
  const line = `echo -n '{"jsonrpc":"2.0","method":"read_guest_cluster","params":{"cluster":2},"id":1}' | nc localhost ${port}`;
  // nc keeps its side open after stdin ends: it returns when the server closes the idle connection (idle-close, 2 s).
  const t0 = Date.now();
  const out = run('sh', ['-c', line], RUN).stdout;
  assert.ok(Date.now() - t0 < 6000, 'nc returned after the idle close');
  assert.ok(out.endsWith('\n'));
  const r = JSON.parse(out) as { id: number; result: { cluster: number; data: string; translation: { depth: number; file: string } } };
  assert.equal(r.id, 1);
  assert.equal(r.result.cluster, 2);
  assert.equal(r.result.data, fill(65536, 0x11));
  assert.equal(r.result.translation.file, 'base.qcow2');
  // Two values back to back, no newline, then a half-close (nc -N): both answered, in order, at once.
  const two = `printf '%s' '{"jsonrpc":"2.0","method":"get_version","id":"a"}{"jsonrpc":"2.0","method":"nope","id":"b"}' | nc -N localhost ${port}`;
  const lines = run('sh', ['-c', two], RUN)
    .stdout.trim()
    .split('\n')
    .map((l) => JSON.parse(l) as Reply);
  assert.deepEqual(
    lines.map((l) => [l.id, l.error?.code ?? 'ok']),
    [
      ['a', 'ok'],
      ['b', -32601],
    ],
  );
});

test('the wire: batches, notifications and every error code', T, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  using s = scratchDir('rblock-rpc-err-');
  makeChain(s.dir);
  const srv = await serve(t, s.dir, ['top.qcow2', '-r', '--rpc-socket', 'rpc.sock'], 1);
  const a = srv.unix!;
  const batch = JSON.stringify([
    { jsonrpc: '2.0', method: 'read', params: { offset: 0, length: 2, encoding: 'hex' }, id: 1 },
    { jsonrpc: '2.0', method: 'get_version' },
    { jsonrpc: '2.0', method: 'translate', params: { offset: 0 }, id: 'two' },
  ]);
  const { lines } = await exchange(a, batch + '\n' + JSON.stringify({ jsonrpc: '2.0', method: 'get_version' }), 1, { halfClose: true });
  assert.equal(lines.length, 1, 'notifications get no reply');
  const replies = lines[0] as Reply[];
  assert.deepEqual(
    replies.map((r) => r.id),
    [1, 'two'],
  );
  assert.deepEqual((replies[0]!.result as { data: string }).data, '1111');
  const codes: [string, number][] = [
    ['{"jsonrpc":"2.0","method":', -32700],
    ['[]', -32600],
    ['{"jsonrpc":"2.0","method":7,"id":1}', -32600],
    ['{"jsonrpc":"2.0","method":"frobnicate","id":1}', -32601],
    ['{"jsonrpc":"2.0","method":"read","params":{"offset":"0","length":1},"id":1}', -32602],
    ['{"jsonrpc":"2.0","method":"read","params":{"offset":0,"length":1048576000},"id":1}', -32001],
    ['{"jsonrpc":"2.0","method":"read","params":{"offset":8388608,"length":1},"id":1}', -32002],
    ['{"jsonrpc":"2.0","method":"write","params":{"offset":0,"data":"AA=="},"id":1}', -32003],
    ['{"jsonrpc":"2.0","method":"l2_table","params":{"index":5},"id":1}', -32002],
  ];
  for (const [req, code] of codes) {
    const { lines: got } = await exchange(a, req, 1, { halfClose: true });
    const r = got[0] as Reply;
    assert.equal(r.error?.code, code, `${req} -> ${JSON.stringify(r)}`);
  }
  const p = (await call(a, 'read', { offset: 0 })).error!;
  assert.equal(p.code, -32602);
  assert.match(p.message, /'length' is required/);
  assert.equal(p.data?.param, 'length');
  // The CLI client.
  const cli = rblock(['rpc', '--socket', join(s.dir, 'rpc.sock'), 'read', 'offset=512K', 'length=2', 'encoding=hex'], RUN);
  assert.equal(cli.status, 0, cli.stderr);
  assert.equal((JSON.parse(cli.stdout) as { data: string }).data, '2222');
  const bad = rblock(['rpc', '--socket', join(s.dir, 'rpc.sock'), 'write', 'offset=0', 'data=AA=='], RUN);
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /read-only.*JSON-RPC error -32003/);
  const help = rblock(['rpc', '--help'], RUN);
  assert.match(help.stdout, /read_guest_cluster/);
});

test('NBD and JSON-RPC on one open image: qemu-io writes through NBD, RPC reads it, and the reverse', T, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  using s = scratchDir('rblock-rpc-nbd-');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', 'disk.qcow2', '4M'], { cwd: s.dir });
  const srv = await serve(t, s.dir, ['disk.qcow2', '-k', 'nbd.sock', '--rpc-socket', 'rpc.sock', '--rpc', '0'], 3);
  const uri = `nbd+unix:///?socket=${join(s.dir, 'nbd.sock')}`;
  const io = (cmd: string): string => {
    const r = run('qemu-io', ['-f', 'raw', '-c', cmd, uri], { ...RUN, check: false });
    assert.equal(r.status, 0, r.stderr + r.stdout);
    assert.doesNotMatch(r.stdout, /fail|error/i, r.stdout);
    return r.stdout;
  };
  io('write -P 0x5a 64k 64k');
  for (const a of [srv.unix!, srv.tcp!]) {
    const r = (await result(a, 'read', { offset: (64 << 10) - 1, length: 3, encoding: 'hex' })) as { data: string };
    assert.equal(r.data, '005a5a');
  }
  assert.deepEqual(await result(srv.unix!, 'write', { offset: 1 << 20, data: Buffer.alloc(4096, 0x77).toString('hex'), encoding: 'hex' }), {
    offset: 1 << 20,
    length: 4096,
  });
  io('read -P 0x77 1M 4k');
  assert.equal(await result(srv.tcp!, 'write_zeroes', { offset: 64 << 10, length: 4096 }), null);
  io('read -P 0 64k 4k');
  io('read -P 0x5a 68k 60k');
  assert.equal(await result(srv.tcp!, 'discard', { offset: 2 << 20, length: 65536 }), null);
  assert.equal(await result(srv.tcp!, 'flush'), null);
  const tr = (await result(srv.tcp!, 'translate', { offset: 1 << 20 })) as { kind: string; layers: { tables: { refcount: number } }[] };
  assert.equal(tr.kind, 'data');
  assert.equal(tr.layers[0]!.tables.refcount, 1);
  const chk = (await result(srv.tcp!, 'check')) as Record<string, unknown>;
  assert.equal(chk['check-errors'], 0);
  assert.equal(chk['corruptions'], undefined);
  srv.proc.kill('SIGTERM');
  await new Promise((r) => srv.proc.once('exit', r));
  // Durable and consistent once the server is gone.
  run('qemu-img', ['check', '-q', 'disk.qcow2'], { cwd: s.dir });
  run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x77 1M 4k', '-c', 'read -P 0x5a 68k 60k', 'disk.qcow2'], { cwd: s.dir });
});

test('abuse: invalid UTF-8, deep nesting, oversized, trickled and half-sent messages, 100 connections', T, async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  using s = scratchDir('rblock-rpc-abuse-');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', 'disk.qcow2', '4M'], { cwd: s.dir });
  const srv = await serve(
    t,
    s.dir,
    ['-r', 'disk.qcow2', '--rpc', '0', '--rpc-limits', 'max-message=1M,idle-timeout=1500,max-connections=150,max-depth=32'],
    1,
  );
  const a = srv.tcp!;
  const ok = '{"jsonrpc":"2.0","method":"get_version","id":"ok"}';
  const codes = (ls: unknown[]): unknown[] => ls.map((l) => (l as Reply).error?.code ?? (l as Reply).id);

  // A message trickled one byte per 100 ms (shorter than the idle timeout) runs beside the rest.
  const trickle = (async (): Promise<unknown[]> => {
    const msg = '{"jsonrpc":"2.0","id":3,"method":"info"}';
    const sock = open(a);
    let got = '';
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => (got += d));
    await new Promise((r) => sock.once('connect', r));
    for (const ch of msg) {
      sock.write(ch);
      await new Promise((r) => setTimeout(r, 100));
    }
    for (let i = 0; i < 50 && !got.includes('\n'); i++) await new Promise((r) => setTimeout(r, 100));
    sock.destroy();
    return got
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as unknown);
  })();

  // Invalid UTF-8: a parse error, and the same connection goes on.
  const utf = await exchange(
    a,
    Buffer.concat([Buffer.from('{"jsonrpc":"2.0","method":"'), Buffer.from([0xc3, 0x28]), Buffer.from('","id":1}'), Buffer.from(ok)]),
    2,
  );
  assert.deepEqual(codes(utf.lines), [-32700, 'ok']);
  // Deep nesting: refused without parsing, the connection goes on.
  const deep = await exchange(a, '['.repeat(100000) + ']'.repeat(100000) + ok, 2);
  assert.deepEqual(codes(deep.lines), [-32700, 'ok']);
  // A message past the size limit (1M here; 64M by default): -32600 and the connection closes.
  const big = await exchange(a, `{"jsonrpc":"2.0","method":"write","params":{"offset":0,"data":"${'A'.repeat(2 << 20)}"},"id":1}`, 0);
  assert.deepEqual(codes(big.lines), [-32600]);
  assert.equal(big.closed, true);
  // A half-sent message, then silence: -32700 after the idle timeout, and closed.
  const t0 = Date.now();
  const half = await exchange(a, '{"jsonrpc":"2.0","meth', 0, { timeoutMs: 8000 });
  assert.deepEqual(codes(half.lines), [-32700]);
  assert.ok(Date.now() - t0 >= 1400, 'closed by the idle timeout');
  // 100 connections at once, each answered.
  const many = await Promise.all(Array.from({ length: 100 }, () => exchange(a, ok, 1)));
  assert.deepEqual(
    many.map((m) => codes(m.lines)[0]),
    Array(100).fill('ok'),
  );
  assert.deepEqual(codes(await trickle), [3]);
  // Still serving.
  assert.equal(((await call(a, 'get_version')) as Reply).error, undefined);
});

test('a full server answers one more client "busy" and closes it, then serves again', T, async () => {
  using s = scratchDir('rblock-rpc-busy-');
  const server = new RpcServer({ exports: [{ name: '', device: memoryDevice(65536), readOnly: false }], limits: { maxConnections: 2 } });
  const addr = (await server.listen({ path: join(s.dir, 'rpc.sock') })) as { path: string };
  try {
    const held = [open(addr), open(addr)];
    await Promise.all(held.map((h) => new Promise((r) => h.once('connect', r))));
    await new Promise((r) => setTimeout(r, 50));
    const busy = await exchange(addr, '{"jsonrpc":"2.0","method":"get_version","id":1}', 1);
    assert.equal((busy.lines[0] as Reply).error?.code, -32603);
    assert.match((busy.lines[0] as Reply).error!.message, /busy/);
    for (const h of held) h.destroy();
    await new Promise((r) => setTimeout(r, 100));
    const again = await exchange(addr, '{"jsonrpc":"2.0","method":"list_exports","id":2}', 1);
    assert.deepEqual((again.lines[0] as Reply).result, [{ name: '', format: 'memory', size: 65536, readOnly: false, file: null }]);
  } finally {
    await server.close();
  }
});

test('VHD and VMDK: translate walks the BAT and bitmap, the grain directory and table; header is inspect', T, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  using s = scratchDir('rblock-rpc-vhd-');
  run('qemu-img', ['create', '-q', '-f', 'vpc', '-o', 'subformat=dynamic', 'd.vhd', '8M'], { cwd: s.dir });
  run('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x33 2M 64k', 'd.vhd'], { cwd: s.dir });
  run('qemu-img', ['create', '-q', '-f', 'vmdk', 'd.vmdk', '8M'], { cwd: s.dir });
  run('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x44 2M 64k', 'd.vmdk'], { cwd: s.dir });
  for (const [img, fmt] of [
    ['d.vhd', 'vpc'],
    ['d.vmdk', 'vmdk'],
  ] as const) {
    const srv = await serve(t, s.dir, ['-r', '-f', fmt, img, '--rpc-socket', `${fmt}.sock`], 1);
    const a = srv.unix!;
    assert.deepEqual(await result(a, 'header'), json(s.dir, 'inspect', '--output', 'json', img));
    const qmap = JSON.parse(run('qemu-img', ['map', '--output=json', '-f', fmt, img], { cwd: s.dir }).stdout) as {
      start: number;
      length: number;
      data: boolean;
      offset?: number;
    }[];
    const at = (2 << 20) + 100;
    const e = qmap.find((m) => m.start <= at && at < m.start + m.length && m.data)!;
    const tr = (await result(a, 'translate', { offset: at })) as {
      kind: string;
      hostOffset: number;
      layers: { tables: Record<string, unknown> }[];
    };
    assert.equal(tr.kind, 'data');
    assert.equal(tr.hostOffset, e.offset! + (at - e.start));
    const tb = tr.layers[0]!.tables;
    if (fmt === 'vpc') {
      assert.equal(tb['batIndex'], Math.floor(at / (tb['blockSize'] as number)));
      assert.equal(tb['present'], true);
      assert.equal(tb['sector'], Math.floor((at % (tb['blockSize'] as number)) / 512));
      assert.equal((tb['dataOffset'] as number) + (at % (tb['blockSize'] as number)), tr.hostOffset);
    } else {
      assert.equal(tb['gdIndex'], Math.floor(at / (512 * (tb['grainSize'] as number))));
      assert.equal((tb['grainOffset'] as number) + (at % (tb['grainSize'] as number)), tr.hostOffset);
    }
    const hole = (await result(a, 'translate', { offset: 6 << 20 })) as { kind: string; hostOffset: unknown };
    assert.deepEqual([hole.kind, hole.hostOffset], ['unallocated', null]);
    const byte = (await result(a, 'read', { offset: at, length: 1, encoding: 'hex' })) as { data: string };
    assert.equal(byte.data, fmt === 'vpc' ? '33' : '44');
    srv.proc.kill('SIGTERM');
  }
});

test('translate: extended L2 subclusters and compressed clusters', T, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  using s = scratchDir('rblock-rpc-sub-');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', 'x.qcow2', '4M'], { cwd: s.dir });
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x66 8k 2k', '-c', 'write -c -P 0x44 1M 64k', 'x.qcow2'], { cwd: s.dir });
  const srv = await serve(t, s.dir, ['-r', 'x.qcow2', '--rpc-socket', 'rpc.sock'], 1);
  const a = srv.unix!;
  type Tr = { kind: string; hostOffset: number | null; layers: { tables: Record<string, unknown> }[] };
  const sub = (await result(a, 'translate', { offset: (8 << 10) + 1 })) as Tr;
  assert.equal(sub.kind, 'data');
  assert.equal(sub.layers[0]!.tables['subclusterIndex'], 4);
  assert.equal(sub.layers[0]!.tables['subcluster'], 'data');
  const next = (await result(a, 'translate', { offset: 10 << 10 })) as Tr;
  assert.equal(next.kind, 'unallocated');
  assert.equal(next.layers[0]!.tables['subclusterIndex'], 5);
  assert.equal(next.layers[0]!.tables['subcluster'], 'unallocated');
  const comp = (await result(a, 'translate', { offset: 1 << 20 })) as Tr;
  const tb = comp.layers[0]!.tables;
  assert.equal(comp.kind, 'compressed');
  assert.equal(comp.hostOffset, null);
  assert.deepEqual(tb['flags'], { copied: false, compressed: true, zero: false });
  assert.equal(typeof tb['compressedOffset'], 'number');
  assert.equal(tb['refcount'], 1);
  const c = (await result(a, 'read_guest_cluster', { cluster: 16 })) as { data: string; translation: { kind: string } };
  assert.equal(c.data, fill(65536, 0x44));
  assert.equal(c.translation.kind, 'compressed');
});
