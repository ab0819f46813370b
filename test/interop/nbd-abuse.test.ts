/**
 * `rblock serve` under abuse, and --snapshot: garbage before and after the
 * handshake, truncated requests, 4 GiB lengths, unknown commands and flags,
 * a client gone mid-write, 64 concurrent clients doing random I/O: the
 * server stays up, every client gets what it wrote, and the qcow2 is clean
 * (qemu-img check) with exactly the clients' data. --snapshot leaves the
 * image byte-identical after qemu-io writes through the export.
 */
import test, { type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { encodeInfoRequest } from '../../src/nbd/codec.js';
import { openImage } from '../../src/formats/registry.js';
import { Cmd, Errno, Opt, Rep } from '../../src/nbd/protocol.js';
import { TinyClient } from '../helpers/nbd-tiny-client.js';
import { rng as makeRng } from '../helpers/rng.js';
import { RBLOCK, needTools, run, scratchDir, sha256File } from '../helpers/tools.js';
import { createQcow2, qemuIo } from './qemu.js';

const T = { timeout: 35000 };
const MiB = 1 << 20;
const RUN = { timeout: 15000 };

interface Served {
  proc: ChildProcess;
  uri: string;
  stderr(): string;
  exited: Promise<number | string>;
}

async function serve(t: TestContext, args: string[], env?: NodeJS.ProcessEnv): Promise<Served> {
  const proc = spawn(process.execPath, [RBLOCK, 'serve', ...args], { stdio: ['ignore', 'ignore', 'pipe'], env: env ?? process.env });
  t.after(() => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
  });
  let err = '';
  proc.stderr?.setEncoding('utf8');
  proc.stderr?.on('data', (s: string) => (err += s));
  const exited = new Promise<number | string>((resolve) => proc.once('exit', (code, sig) => resolve(code ?? sig ?? -1)));
  const uri = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`rblock serve did not start: ${err}`)), 10000);
    proc.stderr?.on('data', () => {
      const m = /listening on (\S+)/.exec(err);
      if (m !== null) {
        clearTimeout(timer);
        resolve(m[1] as string);
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`rblock serve exited (${code}): ${err}`));
    });
  });
  return { proc, uri, stderr: () => err, exited };
}

async function goClient(sock: string, extended = false): Promise<TinyClient> {
  const c = await TinyClient.connect(sock);
  await c.start();
  if (extended) assert.equal((await c.negotiateExtended()).at(-1)?.type, Rep.ACK);
  assert.equal((await c.option(Opt.GO, encodeInfoRequest(''))).at(-1)?.type, Rep.ACK);
  return c;
}

function simpleError(r: Awaited<ReturnType<TinyClient['reply']>>): number {
  return r.header.kind === 'simple' ? r.header.error : -1;
}

test('--snapshot: qemu-io writes through the export are seen, the image stays byte-identical, the overlay is removed', T, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  using s = scratchDir('rblock-abuse-');
  createQcow2(s.dir, 'disk.qcow2', '8M');
  qemuIo(s.dir, 'disk.qcow2', 'write -P 0x11 0 1M');
  const img = join(s.dir, 'disk.qcow2');
  const before = await sha256File(img);
  const tmp = join(s.dir, 'tmp');
  run('mkdir', [tmp]);
  const served = await serve(t, ['-s', '-t', '-k', join(s.dir, 's.sock'), img], { ...process.env, TMPDIR: tmp });
  assert.equal(readdirSync(tmp).length, 1, 'one overlay directory while serving');
  const io = (...cmds: string[]): string => run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), served.uri], RUN).stdout;
  io('write -P 0x77 512k 1M', 'write -z 4M 64k', 'discard 0 4k');
  const back = io('read -P 0x77 512k 1M', `read -P 0x11 4k ${512 * 1024 - 4096}`);
  assert.doesNotMatch(back, /fail|error/i);
  served.proc.kill('SIGTERM');
  assert.equal(await served.exited, 0);
  assert.equal(await sha256File(img), before);
  assert.deepEqual(readdirSync(tmp), [], 'the overlay is deleted at exit');
});

test(
  'abuse: garbage, truncated requests, 4 GiB lengths, unknown commands/flags, mid-write disconnects; 64 concurrent clients',
  T,
  async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    using s = scratchDir('rblock-abuse-');
    createQcow2(s.dir, 'disk.qcow2', '16M');
    const img = join(s.dir, 'disk.qcow2');
    const sock = join(s.dir, 'a.sock');
    const served = await serve(t, ['-t', '-e', '80', '-k', sock, img]);
    const alive = await goClient(sock);

    // Garbage before the handshake (not even reading the greeting), and instead of option headers.
    for (const junk of [Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'), Buffer.alloc(4096, 0xff)]) {
      const g = await TinyClient.connect(sock);
      await g.writer.send([junk]);
      await g.closed();
    }
    const g2 = await TinyClient.connect(sock);
    await g2.start();
    await g2.writer.send([Buffer.alloc(64, 0x41)]);
    await g2.closed();
    // Garbage after the handshake.
    const g3 = await goClient(sock);
    await g3.writer.send([Buffer.from('\x00\x01garbage'.repeat(10))]);
    await g3.closed();
    // A truncated request header, then gone; and a truncated option.
    const tr = await goClient(sock);
    await tr.writer.send([Buffer.from([0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1, 0, 0])]);
    tr.destroy();
    const to = await TinyClient.connect(sock);
    await to.start();
    await to.writer.send([Buffer.from('IHAVEOPT\x00\x00')]);
    to.destroy();

    // 4 GiB lengths: a read answered EOVERFLOW (compact and extended); a 4 GiB write drops its client.
    const big = await goClient(sock);
    let cookie = await big.send({ type: Cmd.READ, offset: 0n, length: 0xffffffffn });
    assert.deepEqual((await big.reply()).header, { kind: 'simple', error: Errno.EOVERFLOW, cookie });
    cookie = await big.send({ type: Cmd.TRIM, offset: 0n, length: 0xffffffffn });
    assert.equal(simpleError(await big.reply()), Errno.EINVAL);
    // Unknown commands and flags: EINVAL, the connection goes on.
    await big.send({ type: 42, offset: 0n, length: 512n });
    assert.equal(simpleError(await big.reply()), Errno.EINVAL);
    await big.send({ type: Cmd.READ, flags: 0x8000, offset: 0n, length: 512n });
    assert.equal(simpleError(await big.reply()), Errno.EINVAL);
    await big.send({ type: Cmd.FLUSH, offset: 7n });
    assert.equal(simpleError(await big.reply()), Errno.EINVAL);
    await big.send({ type: Cmd.READ, offset: 0n, length: 512n });
    assert.equal(simpleError(await big.reply(512)), 0);
    await big.send({ type: Cmd.WRITE, offset: 0n, length: 0xffffffffn });
    await big.closed();
    const ext = await goClient(sock, true);
    await ext.send({ type: Cmd.READ, offset: 0n, length: 1n << 32n });
    const er = (await ext.chunks()).at(-1)!;
    assert.equal((er.chunk as { error?: number }).error, Errno.EOVERFLOW);
    await ext.send({ type: Cmd.WRITE, offset: 0n, length: 1n << 32n });
    await ext.closed();

    // Mid-write disconnects, several at once.
    for (let i = 0; i < 4; i++) {
      const mw = await goClient(sock);
      await mw.send({ type: Cmd.WRITE, offset: BigInt(i * MiB), length: BigInt(MiB) }, Buffer.alloc(300000, 0xee));
      mw.destroy();
    }

    // 64 clients, each in its own 256 KiB region: random writes, zeroes and reads against a model.
    const region = 256 * 1024;
    const models: Buffer[] = [];
    const deadline = Date.now() + 4000;
    await Promise.all(
      Array.from({ length: 64 }, async (_, k) => {
        const rng = makeRng(1000 + k);
        const model = Buffer.alloc(region);
        models.push(model);
        const base = k * region;
        await using dev = await openImage(`nbd+unix:///?socket=${sock}`, { readOnly: false });
        for (let n = 0; n < 40 && Date.now() < deadline; n++) {
          const len = 512 * (1 + Math.floor(rng() * 32));
          const off = 512 * Math.floor(rng() * ((region - len) / 512));
          const op = rng();
          if (op < 0.6) {
            const data = Buffer.alloc(len, (k * 7 + n) & 0xff);
            await dev.pwrite(data, base + off);
            data.copy(model, off);
          } else if (op < 0.75) {
            await dev.writeZeroes(base + off, len, { mayTrim: true });
            model.fill(0, off, off + len);
          } else {
            const b = Buffer.alloc(len);
            await dev.pread(b, base + off);
            assert.ok(b.equals(model.subarray(off, off + len)), `client ${k} read what it wrote`);
          }
        }
        await dev.flush();
        const all = Buffer.alloc(region);
        await dev.pread(all, base);
        assert.ok(all.equals(model), `client ${k}: its region`);
      }),
    );

    // Still up: the first client goes on.
    await alive.send({ type: Cmd.READ, offset: 0n, length: 4096n });
    assert.equal(simpleError(await alive.reply(4096)), 0);
    alive.destroy();
    assert.equal(served.proc.exitCode, null, 'the server is still running');
    served.proc.kill('SIGTERM');
    assert.equal(await served.exited, 0);
    // The image is consistent and holds exactly the clients' data (the half-sent writes never landed).
    assert.match(run('qemu-img', ['check', img], RUN).stdout, /No errors/);
    const raw = join(s.dir, 'out.raw');
    run('qemu-img', ['convert', '-O', 'raw', img, raw], RUN);
    const disk = readFileSync(raw);
    for (let k = 0; k < 64; k++) assert.ok(disk.subarray(k * region, (k + 1) * region).equals(models[k]!), `region ${k} on disk`);
  },
);
