/**
 * BlockDevice.readNow (what the NBD server answers READs with when all it
 * needs is in memory) must give exactly what pread gives: on a qcow2 made by
 * qemu-io with a backing file, data, zero, compressed and unallocated
 * clusters, and on a sparse raw file. Compressed clusters always wait
 * (decompression): readNow must decline them.
 *
 * BlockDevice.spansNow (what a read-only NBD export splices to its clients)
 * likewise: the host file bytes of its data spans, and zeros for its zero
 * spans, are exactly what pread gives; compressed clusters and pages not in
 * the page cache are declined.
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, fdatasyncSync, openSync, readSync, writeSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import type { BlockDevice, DeviceSpan, ReadRuns } from '../../src/block/device.js';
import { openImage } from '../../src/formats/registry.js';
import { pseudoRandom } from '../helpers/rng.js';
import { needNative, needTools, run, scratchDir } from '../helpers/tools.js';

const KiB = 1024;
const MiB = 1 << 20;

function checkRuns(runs: ReadRuns, offset: number, length: number, buf: Uint8Array, label: string): void {
  let pos = offset;
  for (const r of runs) {
    assert.equal(r.offset, pos, `${label}: runs are contiguous`);
    if (r.zero)
      assert.ok(
        buf.subarray(r.offset - offset, r.offset - offset + r.length).every((b) => b === 0),
        `${label}: zero run reads as zeros`,
      );
    pos += r.length;
  }
  assert.equal(pos, offset + length, `${label}: runs cover the read`);
}

/** The bytes spansNow's answer stands for: host file bytes for data spans, zeros for zero spans. */
function spanBytes(spans: readonly DeviceSpan[], offset: number, length: number, label: string): Uint8Array {
  const out = new Uint8Array(length).fill(0xee);
  let pos = offset;
  for (const s of spans) {
    assert.equal(s.offset, pos, `${label}: spans are contiguous`);
    const dst = out.subarray(s.offset - offset, s.offset - offset + s.length);
    if (s.zero) dst.fill(0);
    else assert.equal(readSync(s.fd, dst, 0, s.length, s.hostOffset), s.length, `${label}: a data span is inside its host file`);
    pos += s.length;
  }
  assert.equal(pos, offset + length, `${label}: spans cover the read`);
  return out;
}

/** pread first (so metadata and pages are cached), then readNow and spansNow; returns how many ranges each answered. */
async function compareReads(dev: BlockDevice, ranges: ReadonlyArray<readonly [number, number]>, label: string): Promise<number> {
  let answered = 0;
  let spanned = 0;
  for (const [offset, length] of ranges) {
    const want = new Uint8Array(length);
    await dev.pread(want, offset);
    const spans = dev.spansNow?.(offset, length) ?? null;
    if (spans !== null) {
      spanned++;
      assert.deepEqual(
        spanBytes(spans, offset, length, label),
        want,
        `${label}: spansNow(${offset}, ${length}) stands for what pread gives`,
      );
    }
    const got = new Uint8Array(length).fill(0xee);
    const runs = dev.readNow?.(got, offset) ?? null;
    if (runs === null) continue;
    answered++;
    assert.deepEqual(got, want, `${label}: readNow(${offset}, ${length}) equals pread`);
    checkRuns(runs, offset, length, got, `${label} ${offset}+${length}`);
    // zeroFill false (the NBD server's hole chunks): same runs, data runs equal, zero runs left alone.
    const lazy = new Uint8Array(length).fill(0xee);
    const lazyRuns = dev.readNow?.(lazy, offset, { holes: true, zeroFill: false }) ?? null;
    assert.deepEqual(lazyRuns, runs, `${label}: same runs without zero filling`);
    for (const r of runs) {
      const span = (b: Uint8Array): Uint8Array => b.subarray(r.offset - offset, r.offset - offset + r.length);
      if (!r.zero) assert.deepEqual(span(lazy), span(want), `${label}: data run at ${r.offset} equals pread`);
      else
        assert.ok(
          span(lazy).every((x) => x === 0xee),
          `${label}: zero run at ${r.offset} not written`,
        );
    }
  }
  assert.equal(spanned, answered, `${label}: spansNow answers what readNow answers`);
  return answered;
}

test('readNow equals pread: qcow2 with a backing file, zero, compressed and unallocated clusters', async (t) => {
  if (!needNative(t, 'readNow reads the page cache through it') || !needTools(t, 'qemu-img', 'qemu-io')) return;
  using s = scratchDir();
  const base = join(s.dir, 'base.qcow2');
  const top = join(s.dir, 'top.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '8M'], { check: true });
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0x5b 5M 64k', base], { check: true });
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '8M'], { check: true });
  run(
    'qemu-io',
    [
      '-f',
      'qcow2',
      '-c',
      'write -P 0x11 1M 256k',
      '-c',
      'write -z 2M 128k',
      '-c',
      'write -c -P 0x22 3M 64k',
      '-c',
      'write -P 0x33 512k 4k',
      top,
    ],
    { check: true },
  );
  await using dev = await openImage(top, { readOnly: true });
  const ranges = [
    [0, 4 * KiB], // from the backing file
    [512 * KiB - 100, 8 * KiB], // backing, then top's own cluster, unaligned
    [MiB - 32 * KiB, 320 * KiB], // backing into top's data
    [2 * MiB - 4 * KiB, 136 * KiB], // unallocated into zero clusters
    [5 * MiB, 64 * KiB], // backing data under an unallocated top
    [6 * MiB, 2 * MiB], // nowhere: zeros
    [0, 8 * MiB], // everything but the compressed cluster ... which it includes: declined
  ] as const;
  const answered = await compareReads(dev, ranges, 'qcow2');
  assert.equal(answered, ranges.length - 1, 'readNow answers every range without a compressed cluster');
  const compressed = new Uint8Array(64 * KiB);
  await dev.pread(compressed, 3 * MiB);
  assert.equal(dev.readNow?.(new Uint8Array(64 * KiB), 3 * MiB), null, 'compressed clusters are read asynchronously');
  assert.equal(dev.readNow?.(new Uint8Array(4096), 8 * MiB), null, 'past the end: declined (pread reports it)');
  assert.equal(dev.spansNow?.(3 * MiB, 64 * KiB), null, 'a compressed cluster is not plain bytes of the file: declined');
  assert.equal(dev.spansNow?.(8 * MiB - 4096, 8192), null, 'past the end: declined');
});

/** A sparse raw file of `size` bytes with `writes` ([bytes, offset]) as its only data, opened read-only. */
async function sparseRaw(path: string, size: number, writes: ReadonlyArray<readonly [Uint8Array, number]>): Promise<BlockDevice> {
  const fd = openSync(path, 'w');
  ftruncateSync(fd, size);
  for (const [b, at] of writes) writeSync(fd, b, 0, b.length, at);
  closeSync(fd);
  return openImage(path, { format: 'raw', readOnly: true });
}

test('readNow equals pread: sparse raw file', async (t) => {
  if (!needNative(t, 'readNow reads the page cache through it')) return;
  using s = scratchDir();
  await using dev = await sparseRaw(join(s.dir, 'sparse.raw'), 16 * MiB, [
    [pseudoRandom(3 * MiB, 9), 4 * MiB],
    [Buffer.alloc(512, 0x77), 9 * MiB + 512],
  ]);
  const answered = await compareReads(
    dev,
    [
      [0, 64 * KiB],
      [4 * MiB - 4 * KiB, 12 * KiB],
      [5 * MiB, 256 * KiB],
      [9 * MiB, 4 * KiB],
      [0, 16 * MiB],
    ],
    'raw',
  );
  assert.equal(answered, 5);
});

test('readNow with holes: false reports a sparse raw file as one data run, with the same bytes', async (t) => {
  if (!needNative(t, 'readNow reads the page cache and finds holes through it')) return;
  using s = scratchDir();
  await using dev = await sparseRaw(join(s.dir, 'sparse.raw'), 4 * MiB, [[pseudoRandom(64 * KiB, 5), 1 * MiB]]);
  // A read across hole, data and hole: pread first so the pages are cached.
  const [offset, length] = [1 * MiB - 32 * KiB, 128 * KiB];
  const want = new Uint8Array(length);
  await dev.pread(want, offset);
  const withHoles = new Uint8Array(length).fill(0xee);
  assert.deepEqual(
    dev.readNow?.(withHoles, offset),
    [
      { offset, length: 32 * KiB, zero: true },
      { offset: 1 * MiB, length: 64 * KiB, zero: false },
      { offset: 1 * MiB + 64 * KiB, length: 32 * KiB, zero: true },
    ],
    'holes found by default',
  );
  assert.deepEqual(withHoles, want);
  const noHoles = new Uint8Array(length).fill(0xee);
  assert.deepEqual(dev.readNow?.(noHoles, offset, { holes: false }), [{ offset, length, zero: false }], 'one data run');
  assert.deepEqual(noHoles, want, 'the holes read as zeros all the same');
});

test('spansNow declines pages the page cache does not hold, and answers once they are read', async (t) => {
  if (!needNative(t, 'spansNow asks the page cache through it (cachestat)') || !needTools(t, 'dd', 'stat')) return;
  using s = scratchDir();
  const path = join(s.dir, 'cold.raw');
  const data = pseudoRandom(2 * MiB, 21);
  const fd = openSync(path, 'w');
  writeSync(fd, data, 0, data.length, 0);
  fdatasyncSync(fd);
  closeSync(fd);
  // Drop the file's (clean) pages. tmpfs keeps them whatever is asked: there, they count as cached.
  run('dd', [`if=${path}`, 'iflag=nocache', 'count=0', 'status=none'], { check: true });
  const tmpfs = run('stat', ['-f', '-c', '%T', s.dir], { check: true }).stdout.trim() === 'tmpfs';
  await using dev = await openImage(path, { format: 'raw', readOnly: true });
  const cold = dev.spansNow?.(MiB, 256 * KiB) ?? null;
  if (!tmpfs) assert.equal(cold, null, 'pages not in the page cache: declined');
  const want = new Uint8Array(256 * KiB);
  await dev.pread(want, MiB);
  const spans = dev.spansNow?.(MiB, 256 * KiB) ?? null;
  assert.ok(spans !== null, 'answered once the pages are cached');
  assert.deepEqual(
    spans.map((x) => ({ ...x, fd: 0 })),
    [{ offset: MiB, length: 256 * KiB, zero: false, fd: 0, hostOffset: MiB }],
  );
  assert.deepEqual(spanBytes(spans, MiB, 256 * KiB, 'raw'), want);
});
