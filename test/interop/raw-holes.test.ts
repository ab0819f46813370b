/**
 * Holes of sparse raw files (SEEK_DATA/SEEK_HOLE through the native helper
 * native/hostio.c): `rblock map` must equal `qemu-img map` byte for byte on a
 * sparse raw file and on a qcow2 whose backing file is that raw file; the
 * NBD server must report the holes in base:allocation like qemu-nbd (nbdinfo
 * --map); without the helper (RBLOCK_NO_NATIVE=1) a raw file is one data
 * extent, as before. Under RBLOCK_REQUIRE_TOOLS=1 (CI) the helper must have
 * been built: a missing compiler or missing node headers fail here.
 */
import test, { type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, fdatasyncSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { hostIo } from '../../src/block/hostio.js';
import { needNative, needTools, RBLOCK, rblock, run, scratchDir, waitForSocket } from '../helpers/tools.js';
import { pseudoRandom } from '../helpers/rng.js';

const MiB = 1 << 20;

function needSeek(t: TestContext): boolean {
  return needNative(t, 'no SEEK_DATA');
}

/** 64 MiB sparse raw: data at 1 MiB (4 KiB), 10-13 MiB (random), 40 MiB + 512 (one sector, unaligned), the rest holes. */
function sparseRaw(path: string): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, 64 * MiB);
    writeSync(fd, Buffer.alloc(4096, 0x61), 0, 4096, MiB);
    writeSync(fd, pseudoRandom(3 * MiB, 5), 0, 3 * MiB, 10 * MiB);
    writeSync(fd, Buffer.alloc(512, 0x62), 0, 512, 40 * MiB + 512);
  } finally {
    closeSync(fd);
  }
}

test('map of a sparse raw file, and of a qcow2 over it, equals qemu-img map', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io') || !needSeek(t)) return;
  using s = scratchDir('rblock-holes-');
  const raw = join(s.dir, 'sparse.raw');
  sparseRaw(raw);
  const ours = rblock(['map', '--output', 'json', raw]);
  assert.equal(ours.status, 0, ours.stderr);
  assert.equal(ours.stdout, run('qemu-img', ['map', '--output=json', '-f', 'raw', raw]).stdout);
  assert.ok(JSON.parse(ours.stdout).length >= 6, 'the holes are there');

  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'sparse.raw', '-F', 'raw', join(s.dir, 'over.qcow2')]);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 2M 64k', '-c', 'write -z 10M 64k', join(s.dir, 'over.qcow2')]);
  const chain = rblock(['map', '--output', 'json', join(s.dir, 'over.qcow2')], { cwd: s.dir });
  assert.equal(chain.status, 0, chain.stderr);
  assert.equal(chain.stdout, run('qemu-img', ['map', '--output=json', 'over.qcow2'], { cwd: s.dir }).stdout);

  // Without the helper: one data extent, as qemu without lseek support.
  const plain = rblock(['map', '--output', 'json', raw], { env: { ...process.env, RBLOCK_NO_NATIVE: '1' } });
  assert.deepEqual(JSON.parse(plain.stdout), [{ start: 0, length: 64 * MiB, depth: 0, present: true, zero: false, data: true, offset: 0 }]);
});

test('rblock serve reports the holes of a raw file like qemu-nbd (nbdinfo --map)', async (t) => {
  if (!needTools(t, 'qemu-nbd', 'nbdinfo') || !needSeek(t)) return;
  using s = scratchDir('rblock-holes-');
  const raw = join(s.dir, 'sparse.raw');
  sparseRaw(raw);
  const maps: string[] = [];
  for (const [cmd, args] of [
    [process.execPath, [RBLOCK, 'serve', '-t', '-r', '-f', 'raw', '--socket']],
    ['qemu-nbd', ['-t', '-r', '-f', 'raw', '-k']],
  ] as const) {
    const sock = join(s.dir, `${maps.length}.sock`);
    const proc = spawn(cmd, [...args, sock, raw], { stdio: 'ignore' });
    try {
      await waitForSocket(sock);
      maps.push(run('nbdinfo', ['--map', `nbd+unix:///?socket=${sock}`]).stdout);
    } finally {
      proc.kill('SIGTERM');
      await new Promise((r) => proc.once('exit', r));
    }
  }
  assert.equal(maps[0], maps[1]);
  assert.match(maps[0] as string, /hole,zero/);
});

/**
 * Reads served from the page cache without node's thread pool (preadv2 with
 * RWF_NOWAIT, HostFile.readCached): bytes as written, the short count at the
 * end of the file, and after `dd iflag=nocache` has dropped the file's pages
 * a read that either refuses (-1, EAGAIN) or returns them whole; HostFile's
 * asynchronous readAt gives the same bytes either way (the thread pool reads
 * what the page cache does not hold).
 */
test('page-cache reads without the thread pool: preadNowait and HostFile.readAt', async (t) => {
  if (!needSeek(t) || hostIo === null) return;
  using s = scratchDir();
  const path = join(s.dir, 'cached.raw');
  const data = new Uint8Array(pseudoRandom(4 * MiB + 1000, 11));
  const fd = openSync(path, 'w+');
  try {
    writeSync(fd, data, 0, data.length, 0);
    const buf = new Uint8Array(MiB);
    assert.equal(hostIo.preadNowait(fd, buf, 3 * MiB), MiB);
    assert.deepEqual(buf, data.subarray(3 * MiB, 4 * MiB));
    assert.equal(hostIo.preadNowait(fd, buf, 4 * MiB), 1000, 'short count at the end of the file');
    assert.deepEqual(buf.subarray(0, 1000), data.subarray(4 * MiB));
    assert.equal(hostIo.preadNowait(fd, buf, 5 * MiB), 0, 'past the end');
    assert.throws(() => hostIo!.preadNowait(fd, new Uint16Array(4) as unknown as Uint8Array, 0), TypeError);
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
  // Drop the (now clean) pages: the next reads must go to the disk.
  await run('dd', [`if=${path}`, 'iflag=nocache', 'count=0', 'status=none']);
  const { HostFile } = await import('../../src/block/file.js');
  const f = await HostFile.open(path, true);
  try {
    const fdNum = openSync(path, 'r');
    const probe = new Uint8Array(64 << 10);
    const n = hostIo.preadNowait(fdNum, probe, 2 * MiB);
    closeSync(fdNum);
    assert.ok(n === -1 || n === probe.length, `uncached read: ${n}`);
    for (const [off, len] of [
      [0, 4096],
      [MiB - 100, 300],
      [2 * MiB, 64 << 10],
      [4 * MiB - 4096, 4096 + 1000 + 5000],
    ] as const) {
      const got = new Uint8Array(len);
      await f.readAt(got, off);
      const want = new Uint8Array(len);
      want.set(data.subarray(off, Math.min(off + len, data.length)));
      assert.deepEqual(got, want, `readAt(${off}, ${len})`);
    }
  } finally {
    await f.close();
  }
});

/** dataRuns remembers the last data run it found (no syscalls inside it) and forgets it on truncate. */
test('HostFile.dataRuns: a remembered data run, forgotten when the file is truncated', async (t) => {
  if (!needSeek(t)) return;
  using s = scratchDir();
  const path = join(s.dir, 'runs.raw');
  sparseRaw(path);
  const { HostFile } = await import('../../src/block/file.js');
  const f = await HostFile.open(path, false);
  try {
    assert.deepEqual(f.dataRuns(10 * MiB - 4096, 8192), [
      { offset: 10 * MiB - 4096, length: 4096, data: false },
      { offset: 10 * MiB, length: 4096, data: true },
    ]);
    // Inside the run found above (10-13 MiB): answered from memory, the same as the file system's answer.
    assert.deepEqual(f.dataRuns(11 * MiB, MiB), [{ offset: 11 * MiB, length: MiB, data: true }]);
    await f.truncate(0);
    await f.truncate(64 * MiB);
    assert.deepEqual(f.dataRuns(11 * MiB, MiB), [{ offset: 11 * MiB, length: MiB, data: false }]);
  } finally {
    await f.close();
  }
});
