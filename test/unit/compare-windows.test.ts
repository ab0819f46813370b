/**
 * compareImages gives the same answer whatever its window size and
 * read-ahead (the CLI uses 4 MiB windows without read-ahead for local
 * images, the library default is 1 MiB with four windows ahead): seeded
 * random pairs with changes on and across window boundaries.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { memoryDevice } from '../../src/block/memory.js';
import { compareImages, SECTOR } from '../../src/copy/compare.js';

function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

test('compareImages: same ranges for every window size and read-ahead', async () => {
  for (const seed of [1, 2, 3]) {
    const rnd = prng(seed);
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
