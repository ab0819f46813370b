/**
 * compareImages gives the same answer whatever its window size and
 * read-ahead (the CLI uses 4 MiB windows without read-ahead for local
 * images, the library default is 1 MiB with four windows ahead): seeded
 * random pairs with changes on and across window boundaries.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { memoryDevice } from '../../src/block/memory.js';
import { compareImages, SECTOR } from '../../src/copy/compare.js';
import { openImage } from '../../src/formats/registry.js';
import { rng } from '../helpers/rng.js';
import { scratchDir } from '../helpers/tools.js';

test('compareImages: same ranges for every window size and read-ahead', async () => {
  for (const seed of [1, 2, 3]) {
    const rnd = rng(seed);
    const size = 9 * 1024 * 1024 + 3 * SECTOR; // not a whole number of windows
    const a = Buffer.alloc(size);
    for (let i = 0; i < size; i += 4096) if (rnd() < 0.5) a.fill(Math.floor(rnd() * 256), i, Math.min(size, i + 4096));
    const b = Buffer.from(a);
    const want = new Set<number>();
    // Changes at window and block boundaries (64 KiB, 1 MiB, 4 MiB) and at random.
    const spots = [0, 65535, 65536, (1 << 20) - 1, 1 << 20, (4 << 20) - 1, 4 << 20, size - 1];
    for (let i = 0; i < 40; i++) spots.push(Math.floor(rnd() * size));
    for (const p of spots) {
      b[p] = (b[p] as number) ^ 0x5a;
      want.add(Math.floor(p / SECTOR));
    }
    for (const o of [{}, { readAhead: 0, window: 4 << 20 }, { readAhead: 0, window: 64 << 10 }, { readAhead: 2, window: 128 << 10 }]) {
      const r = await compareImages(memoryDevice(a), memoryDevice(b), o);
      const sectors = r.ranges.flatMap((x) => Array.from({ length: Math.ceil(x.length / SECTOR) }, (_, k) => x.start / SECTOR + k));
      assert.deepEqual(
        sectors,
        [...want].sort((x, y) => x - y),
        `seed ${seed}, options ${JSON.stringify(o)}`,
      );
      assert.equal(r.firstMismatch, 0);
    }
    // And stopping at the first difference still finds the first one.
    const first = await compareImages(memoryDevice(a), memoryDevice(b), { readAhead: 0, window: 4 << 20, stopAtFirst: true });
    assert.equal(first.firstMismatch, 0);
    assert.equal(first.identical, false);
  }
});

/** A sparse raw file of `data`: only its non-zero 4 KiB blocks are written, the rest stay holes. */
function sparseFile(path: string, data: Buffer): void {
  const fd = openSync(path, 'w');
  try {
    for (let i = 0; i < data.length; i += 4096) {
      const block = data.subarray(i, Math.min(data.length, i + 4096));
      if (block.some((x) => x !== 0)) writeSync(fd, block, 0, block.length, i);
    }
    writeSync(fd, Buffer.alloc(1), 0, 1, data.length - 1);
  } finally {
    closeSync(fd);
  }
}

test('compareImages: holes on one side, data (and stale window buffers) on the other', async () => {
  using s = scratchDir();
  const rnd = rng(9);
  const size = 3 * 1024 * 1024;
  // A: data in the even 64 KiB blocks, holes in the odd ones; B: data in the odd ones, except
  // block 5 (a hole in A, zeros in B: equal) and block 8 (A's data with one byte changed).
  const a = Buffer.alloc(size);
  const b = Buffer.alloc(size);
  for (let blk = 0; blk < size / 65536; blk++) {
    const target = blk % 2 === 0 ? a : b;
    for (let i = blk * 65536; i < (blk + 1) * 65536; i++) target[i] = 1 + Math.floor(rnd() * 255);
  }
  b.fill(0, 5 * 65536, 6 * 65536);
  b.set(a.subarray(8 * 65536, 9 * 65536), 8 * 65536);
  b[8 * 65536 + 700] = (b[8 * 65536 + 700] as number) ^ 1;
  sparseFile(join(s.dir, 'a.raw'), a);
  // B written whole: its zeros are data (allocated), so A's holes face data in every window.
  writeFileSync(join(s.dir, 'b.raw'), b);
  const want: number[] = [];
  for (let sec = 0; sec < size / SECTOR; sec++) {
    if (a.compare(b, sec * SECTOR, (sec + 1) * SECTOR, sec * SECTOR, (sec + 1) * SECTOR) !== 0) want.push(sec);
  }
  assert.ok(want.length > 1000 && want.includes((8 * 65536 + 700) >> 9));
  for (const o of [
    {},
    { readAhead: 0, window: 64 << 10 },
    { readAhead: 0, window: 4 << 20 },
    { readAhead: 0, window: 192 << 10 },
    { readAhead: 2, window: 192 << 10 },
  ]) {
    await using da = await openImage(join(s.dir, 'a.raw'), { format: 'raw' });
    await using db = await openImage(join(s.dir, 'b.raw'), { format: 'raw' });
    const r = await compareImages(da, db, o);
    const sectors = r.ranges.flatMap((x) => Array.from({ length: Math.ceil(x.length / SECTOR) }, (_, k) => x.start / SECTOR + k));
    assert.deepEqual(sectors, want, `options ${JSON.stringify(o)}`);
    assert.ok(r.bytesRead < 2 * size, `holes are not read (${r.bytesRead} bytes read)`);
  }
});
