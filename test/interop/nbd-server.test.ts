/**
 * `rblock serve` against the real NBD peers: nbdinfo (--json, --list,
 * --map, --map=qemu:allocation-depth) compared line for line with what
 * qemu-nbd serves for the same qcow2 chain; nbdcopy and qemu-img compare
 * against `qemu-img convert`; qemu-io and fio writing to a raw export;
 * EPERM on a read-only export; garbage, oversized and half-sent requests
 * that must not disturb another client; process lifetime (exit after the
 * last client without -t, SIGTERM exits 0 after flushing); TCP with several
 * exports; and extended headers, which the Debian peers predate, with the
 * tiny client against the real CLI.
 */
import test, { type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { encodeInfoRequest, encodeMetaContextRequest } from '../../src/nbd/codec.js';
import { Chunk, Cmd, Errno, Opt, Rep } from '../../src/nbd/protocol.js';
import { TinyClient } from '../helpers/nbd-tiny-client.js';
import { RBLOCK, REQUIRE_TOOLS, needTools, run, scratchDir, sha256File, waitForSocket } from '../helpers/tools.js';
import { createQcow2, qemuImg, qemuIo } from './qemu.js';

const T = { timeout: 30000 };
const MiB = 1 << 20;
const RUN_TIMEOUT = { timeout: 20000 };

interface Served {
  proc: ChildProcess;
  /** nbd+unix:// or nbd:// URI of the default export. */
  uri: string;
  stderr(): string;
  /** Resolves with the exit code (or the signal name). */
  exited: Promise<number | string>;
}

function track(proc: ChildProcess): { stderr: () => string; exited: Promise<number | string> } {
  let err = '';
  proc.stderr?.setEncoding('utf8');
  proc.stderr?.on('data', (s: string) => (err += s));
  const exited = new Promise<number | string>((resolve) => proc.once('exit', (code, sig) => resolve(code ?? sig ?? -1)));
  return { stderr: () => err, exited };
}

function killOnTeardown(t: TestContext, proc: ChildProcess): void {
  t.after(() => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
  });
}

/** Start `rblock serve ARGS`; resolves once it prints its "listening on URI" line. */
async function serve(t: TestContext, args: string[]): Promise<Served> {
  const proc = spawn(process.execPath, [RBLOCK, 'serve', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  killOnTeardown(t, proc);
  const { stderr, exited } = track(proc);
  const uri = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`rblock serve did not start: ${stderr()}`)), 10000);
    const onData = (): void => {
      const m = /listening on (\S+)/.exec(stderr());
      if (m !== null) {
        clearTimeout(timer);
        proc.stderr?.off('data', onData);
        resolve(m[1] as string);
      }
    };
    proc.stderr?.on('data', onData);
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`rblock serve exited (${code}) before listening: ${stderr()}`));
    });
  });
  return { proc, uri, stderr, exited };
}

/** `qemu-nbd -r -t -A -k SOCK -f FMT IMG` (allocation depth on), the reference server. */
async function qemuNbd(t: TestContext, sock: string, image: string, format: string, cwd: string): Promise<Served> {
  // -e 2: the socket probe below takes a slot for a moment.
  const proc = spawn('qemu-nbd', ['-r', '-t', '-A', '-e', '2', '-k', sock, '-f', format, image], {
    cwd,
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  killOnTeardown(t, proc);
  const { stderr, exited } = track(proc);
  await waitForSocket(sock);
  return { proc, uri: `nbd+unix:///?socket=${sock}`, stderr, exited };
}

async function stop(s: Served, signal: NodeJS.Signals = 'SIGTERM'): Promise<number | string> {
  if (s.proc.exitCode === null && s.proc.signalCode === null) s.proc.kill(signal);
  return s.exited;
}

/** A chain with data in both layers, zero clusters in both, a compressed cluster, and a top larger than its base. */
function makeChain(dir: string): string {
  createQcow2(dir, 'base.qcow2', '8M');
  qemuIo(dir, 'base.qcow2', 'write -P 0x11 0 1M', 'write -z 2M 512k', 'write -P 0x33 5M 512k', 'write -c -P 0x44 6M 128k');
  createQcow2(dir, 'top.qcow2', '12M', { backing: 'base.qcow2' });
  qemuIo(dir, 'top.qcow2', 'write -P 0x22 512k 1M', 'write -z 3M 64k', 'write -z 5M 64k', 'write -P 0x55 9M 64k');
  return join(dir, 'top.qcow2');
}

function nbdinfo(...args: string[]): string {
  return run('nbdinfo', args, RUN_TIMEOUT).stdout;
}

/** nbdinfo output without the lines that name the socket. */
function withoutUri(s: string): string {
  return s
    .split('\n')
    .filter((l) => !/"?uri"?:/.test(l))
    .join('\n');
}

test('nbdinfo --json, --list, --map, --map=qemu:allocation-depth: same as qemu-nbd on a qcow2 chain', T, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo')) return;
  using s = scratchDir('rblock-nbd-');
  const top = makeChain(s.dir);
  const ours = await serve(t, ['-r', '-t', '-e', '2', '-f', 'qcow2', '-k', join(s.dir, 'r.sock'), top]);
  const theirs = await qemuNbd(t, join(s.dir, 'q.sock'), 'top.qcow2', 'qcow2', s.dir);

  assert.equal(withoutUri(nbdinfo('--json', ours.uri)), withoutUri(nbdinfo('--json', theirs.uri)));
  assert.equal(withoutUri(nbdinfo('--list', ours.uri)), withoutUri(nbdinfo('--list', theirs.uri)));
  const map = nbdinfo('--map', ours.uri);
  assert.equal(map, nbdinfo('--map', theirs.uri));
  assert.match(map, /hole,zero/);
  const depth = nbdinfo('--map=qemu:allocation-depth', ours.uri);
  assert.equal(depth, nbdinfo('--map=qemu:allocation-depth', theirs.uri));
  // All of qemu's depth classes show up: local, backing, absent.
  assert.match(depth, /local/);
  assert.match(depth, /backing depth 2/);
  assert.match(depth, /absent/);
  assert.equal(nbdinfo('--map', '--totals', ours.uri), nbdinfo('--map', '--totals', theirs.uri));

  assert.equal(await stop(ours), 0);
  await stop(theirs);
});

test('nbdcopy and qemu-img compare: the export is the image, byte for byte', T, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io', 'nbdcopy')) return;
  using s = scratchDir('rblock-nbd-');
  const top = makeChain(s.dir);
  const served = await serve(t, ['-r', '-t', '-k', join(s.dir, 'r.sock'), top]);
  const ref = join(s.dir, 'ref.raw');
  qemuImg(s.dir, 'convert', '-O', 'raw', 'top.qcow2', ref);
  const out = join(s.dir, 'out.raw');
  run('nbdcopy', [served.uri, out], RUN_TIMEOUT);
  assert.equal(await sha256File(out), await sha256File(ref));
  const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', served.uri, top], { ...RUN_TIMEOUT, cwd: s.dir });
  assert.match(cmp.stdout, /Images are identical/);
  assert.equal(await stop(served), 0);
});

test('qemu-io writes to a raw export, reads back; SIGTERM flushes and exits 0', T, async (t) => {
  if (!needTools(t, 'qemu-io')) return;
  using s = scratchDir('rblock-nbd-');
  const img = join(s.dir, 'disk.raw');
  writeFileSync(img, Buffer.alloc(8 * MiB));
  const served = await serve(t, ['-t', '-f', 'raw', '-k', join(s.dir, 'w.sock'), img]);
  const io = (...cmds: string[]): string =>
    run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), served.uri], RUN_TIMEOUT).stdout;
  io('write -P 0x5a 1M 64k', 'write -P 0xa5 3M 4k', 'write -z 3M 512', 'discard 6M 64k');
  const back = io('read -P 0x5a 1M 64k', 'read -P 0 3M 512', `read -P 0xa5 ${3 * MiB + 512} 3584`, 'read -P 0 0 1M');
  assert.doesNotMatch(back, /Pattern verification failed|error/i);
  assert.equal(await stop(served), 0);
  const disk = readFileSync(img);
  assert.ok(disk.subarray(MiB, MiB + 65536).every((b) => b === 0x5a));
  assert.ok(disk.subarray(3 * MiB, 3 * MiB + 512).every((b) => b === 0));
  assert.ok(disk.subarray(3 * MiB + 512, 3 * MiB + 4096).every((b) => b === 0xa5));
  assert.ok(!existsSync(join(s.dir, 'w.sock')), 'the socket file is removed on exit');
});

test('a read-only export refuses writes with EPERM; qemu-io refuses to open it read-write, as with qemu-nbd -r', T, async (t) => {
  if (!needTools(t, 'qemu-io', 'nbdinfo')) return;
  using s = scratchDir('rblock-nbd-');
  const img = join(s.dir, 'disk.raw');
  writeFileSync(img, Buffer.alloc(MiB, 7));
  const sock = join(s.dir, 'r.sock');
  const served = await serve(t, ['-r', '-t', '-e', '2', '-k', sock, img]);
  assert.match(nbdinfo('--json', served.uri), /"is_read_only": true/);
  // qemu's NBD client sees NBD_FLAG_READ_ONLY and never sends the write (qemu-nbd -r gets the same answer).
  const r = run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', served.uri], { ...RUN_TIMEOUT, check: false });
  assert.notEqual(r.status, 0);
  assert.match(r.stdout + r.stderr, /Permission denied|Operation not permitted/);
  // A client that sends writes anyway gets EPERM for each, and the connection goes on.
  const c = await TinyClient.connect(sock);
  await c.start();
  assert.equal((await c.option(Opt.GO, encodeInfoRequest(''))).at(-1)?.type, Rep.ACK);
  for (const type of [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES]) {
    const cookie = await c.send({ type, offset: 0n, length: 4096n }, type === Cmd.WRITE ? Buffer.alloc(4096, 1) : undefined);
    assert.deepEqual((await c.reply()).header, { kind: 'simple', error: Errno.EPERM, cookie });
  }
  await c.send({ type: Cmd.READ, offset: 0n, length: 512n });
  assert.ok((await c.reply(512)).data.every((b) => b === 7));
  c.destroy();
  assert.ok(readFileSync(img).every((b) => b === 7));
  assert.equal(await stop(served), 0);
});

test('fio --ioengine=nbd random read/write with verify on a raw export', T, async (t) => {
  if (!needTools(t, 'fio')) return;
  if (!/\bnbd\b/.test(run('fio', ['--enghelp'], { check: false }).stdout)) {
    if (REQUIRE_TOOLS) throw new Error('this fio has no nbd engine (RBLOCK_REQUIRE_TOOLS=1 forbids skipping)');
    t.skip('this fio has no nbd engine');
    return;
  }
  using s = scratchDir('rblock-nbd-');
  const img = join(s.dir, 'disk.raw');
  writeFileSync(img, Buffer.alloc(16 * MiB));
  const served = await serve(t, ['-t', '-k', join(s.dir, 'f.sock'), img]);
  const r = run(
    'fio',
    [
      '--name=rblock',
      '--ioengine=nbd',
      `--uri=${served.uri}`,
      '--rw=randrw',
      '--bs=4k',
      '--size=8M',
      '--iodepth=16',
      '--verify=crc32c',
      '--do_verify=1',
      '--verify_fatal=1',
      '--randseed=4242',
      '--output-format=json',
    ],
    // fio writes its verify state file into the working directory.
    { ...RUN_TIMEOUT, timeout: 25000, cwd: s.dir },
  );
  const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as {
    jobs: Array<{ error: number; read: { io_bytes: number }; write: { io_bytes: number } }>;
  };
  const job = json.jobs[0]!;
  assert.equal(job.error, 0);
  assert.ok(job.read.io_bytes > 0 && job.write.io_bytes > 0);
  assert.equal(await stop(served), 0);
});

test('garbage, an oversized write and a half-sent request drop only their own connection', T, async (t) => {
  if (!needTools(t, 'nbdinfo')) return;
  using s = scratchDir('rblock-nbd-');
  const img = join(s.dir, 'disk.raw');
  writeFileSync(img, Buffer.alloc(4 * MiB, 0x3c));
  const sock = join(s.dir, 'g.sock');
  const served = await serve(t, ['-t', '-e', '8', '-k', sock, img]);

  const good = await TinyClient.connect(sock);
  await good.start();
  assert.equal((await good.option(Opt.GO, encodeInfoRequest(''))).at(-1)?.type, Rep.ACK);

  // Garbage in transmission.
  const g1 = await TinyClient.connect(sock);
  await g1.start();
  await g1.option(Opt.GO, encodeInfoRequest(''));
  await g1.writer.send([Buffer.alloc(64, 0xff)]);
  await g1.closed();
  // Garbage instead of a handshake.
  const g2 = await TinyClient.connect(sock);
  await g2.reader.read(18);
  await g2.writer.send([Buffer.from('SSH-2.0-OpenSSH_9.2\r\n' + 'x'.repeat(100))]);
  await g2.closed();
  // A write longer than 32 MiB.
  const big = await TinyClient.connect(sock);
  await big.start();
  await big.option(Opt.GO, encodeInfoRequest(''));
  await big.send({ type: Cmd.WRITE, offset: 0n, length: BigInt(33 * MiB) });
  await big.closed();
  // Half a write payload, then gone; and a read whose reply nobody reads.
  const half = await TinyClient.connect(sock);
  await half.start();
  await half.option(Opt.GO, encodeInfoRequest(''));
  await half.send({ type: Cmd.READ, offset: 0n, length: BigInt(4 * MiB) });
  await half.send({ type: Cmd.WRITE, offset: 0n, length: 65536n }, Buffer.alloc(1000, 0xee));
  half.destroy();

  // The first client goes on, and new ones are served.
  await good.send({ type: Cmd.READ, offset: 0n, length: 4096n });
  const r = await good.reply(4096);
  assert.equal(r.header.kind === 'simple' ? r.header.error : -1, 0);
  assert.ok(
    r.data.every((b) => b === 0x3c),
    'the half-sent write must not have been applied',
  );
  assert.match(nbdinfo('--size', served.uri), /^4194304\s*$/);
  good.destroy();
  assert.equal(served.proc.exitCode, null, 'the server is still running');
  assert.match(served.stderr(), /protocol error|dropping the client/);
  assert.equal(await stop(served), 0);
});

test('without -t the server exits 0 after the last client leaves', T, async (t) => {
  if (!needTools(t, 'nbdinfo')) return;
  using s = scratchDir('rblock-nbd-');
  const img = join(s.dir, 'disk.raw');
  writeFileSync(img, Buffer.alloc(MiB));
  const served = await serve(t, ['-r', '-k', join(s.dir, 'o.sock'), img]);
  assert.match(nbdinfo('--size', served.uri), /^1048576\s*$/);
  assert.equal(await served.exited, 0);
});

test('TCP on a free port with several exports: --list names them, each is served', T, async (t) => {
  if (!needTools(t, 'nbdinfo', 'qemu-img')) return;
  using s = scratchDir('rblock-nbd-');
  const a = join(s.dir, 'a.raw');
  writeFileSync(a, Buffer.alloc(MiB));
  createQcow2(s.dir, 'b.qcow2', '3M');
  const served = await serve(t, [
    '-r',
    '-t',
    '-e',
    '4',
    '--nbd',
    '127.0.0.1:0',
    '--export',
    `a=${a}`,
    '--export',
    `b=${join(s.dir, 'b.qcow2')}`,
  ]);
  const m = /^nbd:\/\/127\.0\.0\.1:(\d+)\//.exec(served.uri);
  assert.ok(m !== null, served.uri);
  const base = `nbd://127.0.0.1:${m[1]}`;
  const list = nbdinfo('--list', base);
  assert.match(list, /export="a"/);
  assert.match(list, /export="b"/);
  assert.match(list, /can_multi_conn: true/);
  assert.match(nbdinfo('--size', `${base}/a`), /^1048576\s*$/);
  assert.match(nbdinfo('--size', `${base}/b`), /^3145728\s*$/);
  const r = run('nbdinfo', ['--size', `${base}/nosuch`], { ...RUN_TIMEOUT, check: false });
  assert.notEqual(r.status, 0);
  assert.equal(await stop(served, 'SIGINT'), 0);
});

test('a writable export served to several clients advertises multi-conn; nbdcopy over 4 connections writes it whole', T, async (t) => {
  if (!needTools(t, 'qemu-img', 'nbdcopy', 'nbdinfo')) return;
  using s = scratchDir('rblock-nbd-');
  // 8 MiB: pseudo-random 192 KiB runs every 1 MiB (so each connection writes some), zeros between.
  const src = join(s.dir, 'src.raw');
  const data = Buffer.alloc(8 * MiB);
  let x = 0x2545f491;
  for (let run = 0; run < 8; run++) {
    for (let i = run * MiB + 64 * 1024; i < run * MiB + 256 * 1024; i += 4) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      data.writeInt32LE(x | 0, i);
    }
  }
  writeFileSync(src, data);
  createQcow2(s.dir, 'dst.qcow2', '8M');
  const dst = join(s.dir, 'dst.qcow2');
  const canMulti = (uri: string): number => run('nbdinfo', ['--can', 'multi-conn', uri], { ...RUN_TIMEOUT, check: false }).status;

  // One client at a time (the default): no multi-conn.
  const single = await serve(t, ['-t', '-f', 'qcow2', '-k', join(s.dir, 'a.sock'), dst]);
  assert.notEqual(canMulti(single.uri), 0);
  assert.equal(await stop(single), 0);

  const shared = await serve(t, ['-t', '-e', '4', '-f', 'qcow2', '-k', join(s.dir, 'b.sock'), dst]);
  assert.equal(canMulti(shared.uri), 0);
  run('nbdcopy', ['-C', '4', '--flush', src, shared.uri], RUN_TIMEOUT);
  assert.equal(await stop(shared), 0);
  const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', src, dst], RUN_TIMEOUT);
  assert.match(cmp.stdout, /Images are identical/);
  run('qemu-img', ['check', '-f', 'qcow2', dst], RUN_TIMEOUT);
});

test('serving read-write an image rblock will not write fails with a hint to use -r', T, async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  using s = scratchDir('rblock-nbd-');
  // A qcow2 with an internal snapshot: the writer refuses it (shared clusters), serving read-only works.
  qemuImg(s.dir, 'create', '-q', '-f', 'qcow2', 'v.qcow2', '1M');
  qemuImg(s.dir, 'snapshot', '-c', 'snap', 'v.qcow2');
  const proc = spawn(process.execPath, [RBLOCK, 'serve', '-k', join(s.dir, 'v.sock'), join(s.dir, 'v.qcow2')], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  killOnTeardown(t, proc);
  const { stderr, exited } = track(proc);
  assert.equal(await exited, 1);
  assert.match(stderr(), /cannot open for writing: .*snapshot.*\(serve it read-only with -r\)/);
});

test('extended headers (tiny client) against the CLI: block status matches qemu-nbd allocation depth', T, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo')) return;
  using s = scratchDir('rblock-nbd-');
  const top = makeChain(s.dir);
  const sock = join(s.dir, 'x.sock');
  const served = await serve(t, ['-r', '-t', '-x', 'chain', '-k', sock, top]);
  const theirs = await qemuNbd(t, join(s.dir, 'q.sock'), 'top.qcow2', 'qcow2', s.dir);
  // qemu's depth map as nbdinfo prints it: "offset length depth description".
  const want = nbdinfo('--map=qemu:allocation-depth', theirs.uri)
    .trim()
    .split('\n')
    .map((l) => l.trim().split(/\s+/).slice(1, 3).map(Number))
    .map(([length, status]) => ({ length, status }));

  const c = await TinyClient.connect(sock);
  await c.start();
  assert.equal((await c.negotiateExtended()).at(-1)?.type, Rep.ACK);
  const set = await c.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest('chain', ['qemu:allocation-depth']));
  assert.deepEqual(
    set.map((r) => r.type),
    [Rep.META_CONTEXT, Rep.ACK],
  );
  assert.equal((await c.option(Opt.GO, encodeInfoRequest('chain'))).at(-1)?.type, Rep.ACK);
  await c.send({ type: Cmd.BLOCK_STATUS, offset: 0n, length: BigInt(12 * MiB) });
  const [bs] = await c.chunks();
  assert.equal(bs!.header.kind, 'extended');
  assert.equal(bs!.chunk!.type, Chunk.BLOCK_STATUS_EXT);
  assert.deepEqual((bs!.chunk as { descriptors: unknown }).descriptors, want);
  // A read through extended headers: zero clusters come back as holes.
  await c.send({ type: Cmd.READ, offset: BigInt(3 * MiB - 4096), length: 8192n });
  const chunks = await c.chunks();
  assert.deepEqual(
    chunks.map((x) => x.chunk!.type),
    [Chunk.OFFSET_HOLE],
  );
  await c.send({ type: Cmd.DISC });
  await c.closed();
  assert.equal(await stop(served), 0);
  await stop(theirs);
});
