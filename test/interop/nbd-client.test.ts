/**
 * rblock's NBD client (openImage('nbd://...'), 'nbd+unix://...') against
 * qemu-nbd (read and write), nbdkit memory and file, and our own server in
 * process (extended headers); the CLI on NBD exports: convert (compared with
 * qemu-img compare), map (holes), info, read.
 */
import test, { type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { memoryDevice } from '../../src/block/memory.js';
import type { GenericDevice } from '../../src/block/generic.js';
import { openImage } from '../../src/formats/registry.js';
import { openNbd } from '../../src/nbd/client-device.js';
import type { NbdClient } from '../../src/nbd/client.js';
import { NbdServer } from '../../src/nbd/server.js';
import { parseNbdUri } from '../../src/nbd/uri.js';
import { needTools, rblock, run, scratchDir, waitForSocket } from '../helpers/tools.js';
import { createQcow2, pseudoRandom, qemuIo } from './qemu.js';

const T = { timeout: 30000 };
const MiB = 1 << 20;

function killOnTeardown(t: TestContext, proc: ChildProcess): void {
  t.after(() => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
  });
}

/** Start a server process that listens on `sock`; killed at teardown. */
async function startPeer(t: TestContext, cmd: string, args: string[], sock: string, cwd?: string): Promise<ChildProcess> {
  const proc = spawn(cmd, args, { cwd, stdio: 'ignore' });
  killOnTeardown(t, proc);
  await waitForSocket(sock);
  return proc;
}

function clientOf(dev: unknown): NbdClient {
  return ((dev as GenericDevice).inner as unknown as { client: NbdClient }).client;
}

test('NBD URIs parse as the NBD URI standard says', () => {
  assert.deepEqual(parseNbdUri('nbd://example.com/disk').target, { host: 'example.com', port: 10809 });
  assert.equal(parseNbdUri('nbd://h:1234//a%20b').exportName, '/a b');
  assert.equal(parseNbdUri('nbd://h').exportName, '');
  assert.deepEqual(parseNbdUri('nbd://[::1]:99/x').target, { host: '::1', port: 99 });
  const u = parseNbdUri('nbds+unix://alice@/e?socket=/tmp/s.sock&tls-psk-file=/k');
  assert.deepEqual(u.target, { path: '/tmp/s.sock' });
  assert.equal(u.exportName, 'e');
  assert.equal(u.tls, true);
  assert.equal(u.tlsUsername, 'alice');
  assert.equal(u.tlsPskFile, '/k');
  assert.throws(() => parseNbdUri('nbd+unix:///x'), /socket=PATH/);
});

test('against qemu-nbd: reads equal the image, block status shows holes, writes land (raw and qcow2)', T, async (t) => {
  if (!needTools(t, 'qemu-nbd', 'qemu-img', 'qemu-io')) return;
  using s = scratchDir('rblock-nbdc-');
  createQcow2(s.dir, 'a.qcow2', '16M');
  qemuIo(s.dir, 'a.qcow2', 'write -P 0x11 1M 1M', 'write -z 4M 1M', 'write -P 0x22 9M 64k');
  const sock = join(s.dir, 'q.sock');
  const q = await startPeer(t, 'qemu-nbd', ['-t', '-f', 'qcow2', '-k', sock, 'a.qcow2'], sock, s.dir);
  const uri = `nbd+unix:///?socket=${sock}`;
  {
    await using dev = await openImage(uri, { readOnly: false });
    assert.equal(dev.size, 16 * MiB);
    assert.equal(clientOf(dev).mode, 'structured');
    const buf = Buffer.alloc(3 * MiB);
    await dev.pread(buf, 0);
    assert.ok(buf.subarray(0, MiB).every((b) => b === 0));
    assert.ok(buf.subarray(MiB, 2 * MiB).every((b) => b === 0x11));
    const ext = await dev.blockStatus(0, 16 * MiB);
    assert.ok(ext.some((e) => e.hole && e.zero));
    assert.ok(ext.some((e) => !e.hole && e.offset <= MiB && e.offset + e.length >= 2 * MiB));
    // Many requests in flight at once, each checked.
    const data = pseudoRandom(4 * MiB, 7);
    await Promise.all(Array.from({ length: 64 }, (_, i) => dev.pwrite(data.subarray(i * 65536, (i + 1) * 65536), 8 * MiB + i * 65536)));
    await dev.writeZeroes(8 * MiB, 4096);
    await dev.discard(15 * MiB, MiB);
    await dev.flush();
    const back = Buffer.alloc(4 * MiB);
    await Promise.all(Array.from({ length: 16 }, (_, i) => dev.pread(back.subarray(i * 262144, (i + 1) * 262144), 8 * MiB + i * 262144)));
    const want = Buffer.from(data);
    want.fill(0, 0, 4096);
    assert.ok(back.equals(want));
    // Past the end: refused before anything is sent.
    await assert.rejects(dev.pread(Buffer.alloc(512), 16 * MiB), /beyond the end/);
  }
  q.kill('SIGTERM');
  await new Promise((r) => q.once('exit', r));
  // What we wrote is in the qcow2, as qemu reads it.
  const io = run('qemu-io', ['-f', 'qcow2', '-c', `read -P 0 ${8 * MiB} 4096`, '-c', `read -P 0x11 ${MiB} ${MiB}`, 'a.qcow2'], {
    cwd: s.dir,
  });
  assert.doesNotMatch(io.stdout, /fail/i);
  assert.match(run('qemu-img', ['check', 'a.qcow2'], { cwd: s.dir }).stdout, /No errors/);
});

test('against nbdkit memory and nbdkit file: write, read back, sizes and flags', T, async (t) => {
  if (!needTools(t, 'nbdkit')) return;
  using s = scratchDir('rblock-nbdc-');
  const msock = join(s.dir, 'm.sock');
  await startPeer(t, 'nbdkit', ['-f', '-U', msock, 'memory', '8M'], msock);
  {
    await using dev = await openImage(`nbd+unix:///?socket=${msock}`, { readOnly: false });
    assert.equal(dev.size, 8 * MiB);
    const data = pseudoRandom(MiB, 3);
    await dev.pwrite(data, MiB);
    await dev.writeZeroes(MiB, 512);
    const back = Buffer.alloc(MiB);
    await dev.pread(back, MiB);
    assert.ok(back.subarray(0, 512).every((b) => b === 0));
    assert.ok(back.subarray(512).equals(data.subarray(512)));
    const ext = await dev.blockStatus(0, 8 * MiB);
    assert.ok(ext[0]!.hole, 'nbdkit memory reports the untouched start as a hole');
  }
  const img = join(s.dir, 'f.raw');
  writeFileSync(img, Buffer.alloc(2 * MiB, 0x5a));
  const fsock = join(s.dir, 'f.sock');
  await startPeer(t, 'nbdkit', ['-f', '-U', fsock, 'file', img], fsock);
  {
    await using dev = await openImage(`nbd+unix:///?socket=${fsock}`, { readOnly: false });
    await dev.pwrite(Buffer.alloc(4096, 0xa5), 4096, { fua: true });
    const b = Buffer.alloc(8192);
    await dev.pread(b, 0);
    assert.ok(b.subarray(0, 4096).every((x) => x === 0x5a));
    assert.ok(b.subarray(4096).every((x) => x === 0xa5));
  }
  assert.ok(
    readFileSync(img)
      .subarray(4096, 8192)
      .every((x) => x === 0xa5),
  );
});

test(
  'against our own server in process: extended and compact headers, zero/trim, block status, errors come back as BlockErrors',
  T,
  async () => {
    using s = scratchDir('rblock-nbdc-');
    const dev = memoryDevice(32 * MiB);
    const ro = memoryDevice(Buffer.alloc(MiB, 9));
    const server = new NbdServer({
      exports: [
        { name: 'rw', device: dev },
        { name: 'ro', device: ro, readOnly: true },
      ],
      maxConnections: 4,
    });
    const sock = join(s.dir, 's.sock');
    await server.listen({ path: sock });
    try {
      for (const extendedHeaders of [true, false]) {
        await using c = await openNbd(`nbd+unix:///rw?socket=${sock}`, { readOnly: false, extendedHeaders });
        assert.equal(clientOf(c).mode, extendedHeaders ? 'extended' : 'structured');
        const data = pseudoRandom(20 * MiB, extendedHeaders ? 1 : 2);
        await c.pwrite(data, MiB);
        await c.writeZeroes(2 * MiB, 3 * MiB, { mayTrim: true });
        const back = Buffer.alloc(20 * MiB);
        await c.pread(back, MiB);
        const want = Buffer.from(data);
        want.fill(0, MiB, 4 * MiB);
        assert.ok(back.equals(want));
        const ext = await c.blockStatus(0, 32 * MiB);
        assert.equal(
          ext.reduce((n, e) => n + e.length, 0),
          32 * MiB,
        );
        await c.flush();
      }
      // A read-only export: opening it for writing fails; reading works.
      await assert.rejects(openImage(`nbd+unix:///ro?socket=${sock}`, { readOnly: false }), /read-only/);
      // Over TCP too: nbd://127.0.0.1:PORT/export.
      const tcp = await server.listen({ host: '127.0.0.1', port: 0 });
      assert.ok('port' in tcp);
      await using r = await openImage(`nbd://127.0.0.1:${tcp.port}/ro`);
      const rb = Buffer.alloc(4096);
      await r.pread(rb, 0);
      assert.ok(rb.every((x) => x === 9));
      await assert.rejects(openImage(`nbd+unix:///nosuch?socket=${sock}`), (e: Error) => /no export 'nosuch'/.test(e.message));
    } finally {
      await server.close();
    }
  },
);

test('CLI on NBD exports: convert -O qcow2 equals the source (qemu-img compare), map shows holes, info, read', T, async (t) => {
  if (!needTools(t, 'qemu-nbd', 'qemu-img', 'qemu-io')) return;
  using s = scratchDir('rblock-nbdc-');
  createQcow2(s.dir, 'src.qcow2', '12M');
  qemuIo(s.dir, 'src.qcow2', 'write -P 0x33 0 1M', 'write -z 3M 1M', 'write -P 0x44 7M 256k');
  const sock = join(s.dir, 'q.sock');
  await startPeer(t, 'qemu-nbd', ['-r', '-t', '-e', '4', '-f', 'qcow2', '-k', sock, 'src.qcow2'], sock, s.dir);
  const uri = `nbd+unix:///?socket=${sock}`;
  const conv = rblock(['convert', '-O', 'qcow2', uri, join(s.dir, 'out.qcow2')], { timeout: 20000 });
  assert.equal(conv.status, 0, conv.stderr);
  assert.match(run('qemu-img', ['compare', 'src.qcow2', 'out.qcow2'], { cwd: s.dir }).stdout, /Images are identical/);
  // Sparse: the copy allocates about the data only.
  const map = JSON.parse(rblock(['map', '--output=json', uri]).stdout) as Array<{ start: number; length: number; data: boolean }>;
  assert.ok(map.some((m) => !m.data && m.start <= 2 * MiB && m.start + m.length >= 3 * MiB));
  assert.ok(map.some((m) => m.data && m.start === 0));
  assert.deepEqual(map, JSON.parse(run('qemu-img', ['map', '-f', 'raw', '--output=json', uri]).stdout));
  const info = rblock(['info', uri]);
  assert.equal(info.status, 0, info.stderr);
  assert.match(info.stdout, /virtual size: 12 MiB/);
  const rd = rblock(['read', uri, '--offset', '7M', '--length', '16', '--hexdump']);
  assert.match(rd.stdout, /44 44 44 44/);
  const cmp = rblock(['compare', uri, join(s.dir, 'src.qcow2')]);
  assert.equal(cmp.status, 0, cmp.stdout + cmp.stderr);
});
