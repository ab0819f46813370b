/**
 * Holes of sparse raw files (SEEK_DATA/SEEK_HOLE through the native helper
 * native/seek.c): `rblock map` must equal `qemu-img map` byte for byte on a
 * sparse raw file and on a qcow2 whose backing file is that raw file; the
 * NBD server must report the holes in base:allocation like qemu-nbd (nbdinfo
 * --map); without the helper (RBLOCK_NO_NATIVE=1) a raw file is one data
 * extent, as before. Under RBLOCK_REQUIRE_TOOLS=1 (CI) the helper must have
 * been built: a missing compiler or missing node headers fail here.
 */
import test, { type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { hostSeek } from '../../src/block/seek.js';
import { needTools, RBLOCK, rblock, REQUIRE_TOOLS, run, scratchDir, waitForSocket } from '../helpers/tools.js';
import { pseudoRandom } from '../helpers/rng.js';

const MiB = 1 << 20;

function needSeek(t: TestContext): boolean {
  if (hostSeek !== null) return true;
  const msg = 'native SEEK_DATA helper not built (dist/native/rblock-seek.node): see scripts/build-native.mjs';
  if (REQUIRE_TOOLS) throw new Error(`${msg} (RBLOCK_REQUIRE_TOOLS=1 forbids skipping)`);
  t.skip(msg);
  return false;
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
