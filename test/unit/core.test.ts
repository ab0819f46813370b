/**
 * The block-device core: ranges, alignment, zero detection, the generic
 * device wrapper (validation, emulation, splitting, block status), memory
 * devices, filters, the LRU cache, size parsing and zstd frame walking.
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { init as zstdInit, compress as zstdCompress } from '@bokuweb/zstd-wasm';
import type { Extent, IoOpts } from '../../src/block/device.js';
import { BlockError, isBlockError, type ErrorKind } from '../../src/block/errors.js';
import { canMerge, GenericDevice, normalizeExtents, type Driver } from '../../src/block/generic.js';
import { alignDown, alignUp, isPowerOfTwo, splitAligned } from '../../src/block/align.js';
import { checkRange, intersect, overlaps, RangeSet, rangeEnd } from '../../src/block/ranges.js';
import { isZero, zeroBuffer } from '../../src/block/zero.js';
import { memoryDevice } from '../../src/block/memory.js';
import { offsetFilter } from '../../src/filters/offset.js';
import { readOnlyFilter } from '../../src/filters/readonly.js';
import { LruCache } from '../../src/util/lru.js';
import { zstdFrameLength } from '../../src/formats/qcow2/compress.js';
import { humanSize, parseSize } from '../../src/util/size.js';

/** Run op and demand a BlockError of this kind; returns it. */
async function rejectsKind(op: () => unknown, kind: ErrorKind): Promise<BlockError> {
  try {
    await op();
  } catch (e) {
    assert.ok(isBlockError(e), `expected a BlockError, got ${String(e)}`);
    assert.equal(e.kind, kind, e.message);
    return e;
  }
  assert.fail(`expected a ${kind} error`);
}

function pattern(length: number, seed = 1): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; i++) b[i] = (i * 13 + seed) & 0xff;
  return b;
}

// ---------------------------------------------------------------- ranges

test('intersect / overlaps / rangeEnd', () => {
  assert.deepEqual(intersect({ offset: 0, length: 10 }, { offset: 5, length: 10 }), { offset: 5, length: 5 });
  assert.deepEqual(intersect({ offset: 5, length: 10 }, { offset: 0, length: 100 }), { offset: 5, length: 10 });
  assert.equal(intersect({ offset: 0, length: 10 }, { offset: 10, length: 5 }), null, 'touching is not overlapping');
  assert.equal(intersect({ offset: 0, length: 0 }, { offset: 0, length: 5 }), null, 'empty range');
  assert.equal(overlaps({ offset: 3, length: 1 }, { offset: 3, length: 1 }), true);
  assert.equal(overlaps({ offset: 3, length: 1 }, { offset: 4, length: 1 }), false);
  assert.equal(rangeEnd({ offset: 7, length: 3 }), 10);
});

test('checkRange: in bounds, out-of-bounds, invalid arguments', async () => {
  checkRange(0, 100, 100);
  checkRange(100, 0, 100);
  checkRange(50, 50, 100);
  const e = await rejectsKind(() => checkRange(90, 11, 100, { path: '/x.img', op: 'read' }), 'out-of-bounds');
  assert.match(e.message, /^\/x\.img: read at offset 90 length 11 is beyond the end of the device \(100 bytes\)$/);
  assert.equal(e.context.offset, 90);
  assert.equal(e.context.path, '/x.img');
  await rejectsKind(() => checkRange(101, 0, 100), 'out-of-bounds');
  await rejectsKind(() => checkRange(2 ** 53, 1, 100), 'invalid-argument');
  await rejectsKind(() => checkRange(-1, 1, 100), 'invalid-argument');
  await rejectsKind(() => checkRange(0, -1, 100), 'invalid-argument');
  await rejectsKind(() => checkRange(0.5, 1, 100), 'invalid-argument');
  await rejectsKind(() => checkRange(NaN, 1, 100), 'invalid-argument');
});

test('RangeSet: add merges overlapping and touching ranges, keeps others apart', () => {
  const s = new RangeSet();
  s.add(10, 10); // [10,20)
  s.add(30, 10); // [30,40)
  s.add(0, 0); // empty: ignored
  assert.equal(s.count, 2);
  s.add(20, 5); // touches [10,20): [10,25)
  assert.deepEqual(
    [...s],
    [
      { offset: 10, length: 15 },
      { offset: 30, length: 10 },
    ],
  );
  s.add(50, 5);
  s.add(5, 50); // swallows everything: [5,55)
  assert.deepEqual([...s], [{ offset: 5, length: 50 }]);
  s.add(100, 1);
  s.add(60, 1);
  s.add(80, 1);
  assert.deepEqual(
    [...s].map((r) => r.offset),
    [5, 60, 80, 100],
    'sorted',
  );
  s.add(59, 1); // touches [60,61) only
  assert.deepEqual([...s][1], { offset: 59, length: 2 });
});

test('RangeSet: findOverlap and has', () => {
  const s = new RangeSet();
  s.add(100, 50);
  s.add(200, 50);
  assert.equal(s.findOverlap(0, 100), null, 'ends right at the start');
  assert.deepEqual(s.findOverlap(0, 101), { offset: 100, length: 50 });
  assert.deepEqual(s.findOverlap(149, 100), { offset: 100, length: 50 }, 'the first overlap');
  assert.equal(s.findOverlap(150, 50), null, 'the gap');
  assert.deepEqual(s.findOverlap(240, 1000), { offset: 200, length: 50 });
  assert.equal(s.findOverlap(250, 10), null);
  assert.equal(s.has(100), true);
  assert.equal(s.has(100, 50), true);
  assert.equal(s.has(100, 51), false);
  assert.equal(s.has(99), false);
  assert.equal(s.has(149), true);
  assert.equal(s.has(150), false);
  assert.equal(new RangeSet().findOverlap(0, 10), null);
});

test('RangeSet: many random adds agree with a bitmap', () => {
  const s = new RangeSet();
  const bits = new Uint8Array(2000);
  let x = 12345;
  const rnd = (n: number): number => {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    return x % n;
  };
  for (let i = 0; i < 300; i++) {
    const off = rnd(1900);
    const len = rnd(40);
    s.add(off, len);
    bits.fill(1, off, off + len);
  }
  const fromSet = new Uint8Array(2000);
  let prevEnd = -1;
  for (const r of s) {
    assert.ok(r.offset > prevEnd, 'disjoint, not touching, sorted');
    fromSet.fill(1, r.offset, r.offset + r.length);
    prevEnd = r.offset + r.length;
  }
  assert.deepEqual(fromSet, bits);
  for (let i = 0; i < 2000; i++) assert.equal(s.has(i), bits[i] === 1, `has(${i})`);
});

// ---------------------------------------------------------------- alignment

test('isPowerOfTwo', () => {
  for (const n of [1, 2, 512, 4096, 2 ** 31, 2 ** 32, 2 ** 40, 2 ** 52]) assert.equal(isPowerOfTwo(n), true, String(n));
  for (const n of [0, -2, 3, 6, 513, 2 ** 31 - 1, 0.5, NaN, Infinity, 2 ** 53 + 2]) assert.equal(isPowerOfTwo(n), false, String(n));
});

test('alignUp / alignDown', () => {
  assert.equal(alignDown(0, 512), 0);
  assert.equal(alignDown(511, 512), 0);
  assert.equal(alignDown(512, 512), 512);
  assert.equal(alignDown(1025, 512), 1024);
  assert.equal(alignUp(0, 512), 0);
  assert.equal(alignUp(1, 512), 512);
  assert.equal(alignUp(512, 512), 512);
  assert.equal(alignUp(513, 512), 1024);
  // Beyond 32 bits (no bitwise tricks).
  assert.equal(alignUp(2 ** 40 + 1, 65536), 2 ** 40 + 65536);
  assert.equal(alignDown(2 ** 40 + 65535, 65536), 2 ** 40);
  // Non-power-of-two alignment works too.
  assert.equal(alignUp(10, 3), 12);
  assert.equal(alignDown(10, 3), 9);
});

test('splitAligned: head, body, tail', () => {
  assert.deepEqual(splitAligned(0, 4096, 512), { head: 0, body: 4096, tail: 0 });
  assert.deepEqual(splitAligned(100, 1000, 512), { head: 412, body: 512, tail: 76 });
  assert.deepEqual(splitAligned(100, 200, 512), { head: 200, body: 0, tail: 0 }, 'inside one block');
  assert.deepEqual(splitAligned(100, 412, 512), { head: 412, body: 0, tail: 0 }, 'ends on the boundary');
  assert.deepEqual(splitAligned(512, 100, 512), { head: 0, body: 0, tail: 100 }, 'starts aligned, short');
  assert.deepEqual(splitAligned(512, 0, 512), { head: 0, body: 0, tail: 0 });
  assert.deepEqual(splitAligned(2 ** 40 - 1, 2 + 65536, 65536), { head: 1, body: 65536, tail: 1 });
  for (const [o, l] of [
    [0, 1],
    [7, 10000],
    [511, 513],
    [1023, 1],
  ] as const) {
    const s = splitAligned(o, l, 512);
    assert.equal(s.head + s.body + s.tail, l, `sums for ${o},${l}`);
    assert.equal(s.body % 512, 0);
    if (s.body > 0 || s.tail > 0) assert.equal((o + s.head) % 512, 0);
  }
});

// ---------------------------------------------------------------- zeros

test('isZero and zeroBuffer', () => {
  assert.equal(isZero(new Uint8Array(0)), true);
  assert.equal(isZero(new Uint8Array(4096)), true);
  const big = new Uint8Array((3 << 20) + 7); // bigger than the shared zero buffer
  assert.equal(isZero(big), true);
  big[big.length - 1] = 1;
  assert.equal(isZero(big), false, 'last byte of a multi-chunk buffer');
  big[big.length - 1] = 0;
  big[1 << 20] = 0x80;
  assert.equal(isZero(big), false, 'first byte of the second chunk');
  assert.equal(isZero(new Uint8Array([0, 0, 0, 1])), false);
  assert.equal(isZero(new Uint8Array(100).subarray(10, 20)), true, 'views');
  const z = zeroBuffer(4 << 20);
  assert.ok(z.length >= 4 << 20);
  assert.equal(isZero(z), true);
  assert.ok(zeroBuffer().length >= 1 << 20);
});

// ---------------------------------------------------------------- GenericDevice

interface Call {
  op: string;
  offset: number;
  length: number;
  opts?: IoOpts;
}

/** The smallest driver there is: a byte array with pread and pwrite (and optionally flush). */
class TestDriver implements Driver {
  readonly format = 'test';
  readonly path = '/dev/test';
  readonly calls: Call[] = [];
  flushes = 0;
  closes = 0;
  readonly data: Uint8Array;
  readonly maxRequest?: number;
  flush?: () => Promise<void>;

  constructor(
    size: number,
    readonly readOnly = false,
    opts: { maxRequest?: number; withFlush?: boolean } = {},
  ) {
    this.data = new Uint8Array(size);
    if (opts.maxRequest !== undefined) this.maxRequest = opts.maxRequest;
    if (opts.withFlush) {
      this.flush = async () => {
        this.flushes++;
      };
    }
  }

  get size(): number {
    return this.data.length;
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    this.calls.push({ op: 'pread', offset, length: buf.length });
    assert.ok(offset + buf.length <= this.data.length, 'the wrapper never passes an out-of-range read');
    buf.set(this.data.subarray(offset, offset + buf.length));
  }

  async pwrite(buf: Uint8Array, offset: number, opts: IoOpts): Promise<void> {
    this.calls.push({ op: 'pwrite', offset, length: buf.length, opts });
    assert.ok(offset + buf.length <= this.data.length, 'the wrapper never passes an out-of-range write');
    this.data.set(buf, offset);
  }

  async close(): Promise<void> {
    this.closes++;
  }
}

test('GenericDevice: capabilities follow the methods the driver has', () => {
  const dev = new GenericDevice(new TestDriver(4096));
  assert.deepEqual({ ...dev.caps }, { readOnly: false, flush: false, fua: false, zero: false, discard: false, blockStatus: false });
  assert.ok(Object.isFrozen(dev.caps));
  assert.equal(dev.size, 4096);
  assert.equal(dev.format, 'test');
  assert.equal(dev.path, '/dev/test');
  const f = new GenericDevice(new TestDriver(4096, true, { withFlush: true }));
  assert.equal(f.caps.flush, true);
  assert.equal(f.caps.readOnly, true);
});

test('GenericDevice: reads and writes reach the driver', async () => {
  const d = new TestDriver(8192);
  const dev = new GenericDevice(d);
  const p = pattern(3000);
  await dev.pwrite(p, 1000);
  const back = new Uint8Array(3000);
  await dev.pread(back, 1000);
  assert.deepEqual(back, p);
  assert.deepEqual(d.data.subarray(1000, 4000), p);
  // Zero-length requests are fine at the very end.
  await dev.pread(new Uint8Array(0), 8192);
  await dev.pwrite(new Uint8Array(0), 8192);
});

test('GenericDevice: writeZeroes is emulated by writing zeros', async () => {
  const size = 3 << 20;
  const d = new TestDriver(size);
  d.data.fill(0xee);
  const dev = new GenericDevice(d);
  // More than the 1 MiB zero buffer, unaligned at both ends.
  const off = 12345;
  const len = (2 << 20) + 777;
  await dev.writeZeroes(off, len);
  assert.ok(
    d.data.subarray(0, off).every((x) => x === 0xee),
    'before untouched',
  );
  assert.equal(isZero(d.data.subarray(off, off + len)), true, 'range is zero');
  assert.ok(
    d.data.subarray(off + len).every((x) => x === 0xee),
    'after untouched',
  );
  const writes = d.calls.filter((c) => c.op === 'pwrite');
  assert.equal(writes.length, Math.ceil(len / zeroBuffer().length), 'written in chunks of the shared zero buffer');
  assert.equal(
    writes.reduce((n, c) => n + c.length, 0),
    len,
  );
  assert.ok(writes.every((c) => c.length <= zeroBuffer().length));
  // Zero length: nothing at all.
  d.calls.length = 0;
  await dev.writeZeroes(0, 0);
  assert.equal(d.calls.length, 0);
});

test('GenericDevice: FUA is emulated by flush', async () => {
  const d = new TestDriver(1 << 20, false, { withFlush: true });
  const dev = new GenericDevice(d);
  await dev.pwrite(pattern(512), 0);
  assert.equal(d.flushes, 0, 'no FUA, no flush');
  await dev.pwrite(pattern(512), 0, { fua: true });
  assert.equal(d.flushes, 1);
  const last = d.calls[d.calls.length - 1] as Call;
  assert.equal(last.opts?.fua, undefined, 'the driver is not handed a FUA it cannot honour');
  await dev.writeZeroes(0, 4096, { fua: true });
  assert.equal(d.flushes, 2, 'emulated writeZeroes + FUA: one flush at the end');
  await dev.discard(0, 512, { fua: true });
  assert.equal(d.flushes, 3);
  await dev.flush();
  assert.equal(d.flushes, 4);
  // A driver without flush: FUA and flush are no-ops, not errors.
  const nf = new GenericDevice(new TestDriver(4096));
  await nf.pwrite(pattern(512), 0, { fua: true });
  await nf.flush();
});

test('GenericDevice: native FUA is passed through, not emulated', async () => {
  class FuaDriver extends TestDriver {
    readonly caps = { fua: true };
  }
  const d = new FuaDriver(4096, false, { withFlush: true });
  const dev = new GenericDevice(d);
  assert.equal(dev.caps.fua, true);
  await dev.pwrite(pattern(512), 0, { fua: true });
  assert.equal(d.flushes, 0);
  assert.equal(d.calls[0]?.opts?.fua, true);
});

test('GenericDevice: out-of-bounds requests never reach the driver', async () => {
  const d = new TestDriver(4096);
  const dev = new GenericDevice(d);
  const e = await rejectsKind(() => dev.pread(new Uint8Array(512), 4000), 'out-of-bounds');
  assert.equal(e.context.path, '/dev/test');
  assert.equal(e.context.op, 'read');
  assert.match(e.message, /\/dev\/test/);
  await rejectsKind(() => dev.pread(new Uint8Array(1), 4096), 'out-of-bounds');
  await rejectsKind(() => dev.pwrite(new Uint8Array(4097), 0), 'out-of-bounds');
  await rejectsKind(() => dev.writeZeroes(4000, 100), 'out-of-bounds');
  await rejectsKind(() => dev.discard(4096, 1), 'out-of-bounds');
  await rejectsKind(() => dev.blockStatus(0, 4097), 'out-of-bounds');
  await rejectsKind(() => dev.pread(new Uint8Array(1), -1), 'invalid-argument');
  assert.equal(d.calls.length, 0);
});

test('GenericDevice: writes on a read-only driver fail with read-only', async () => {
  const d = new TestDriver(4096, true);
  const dev = new GenericDevice(d);
  const e = await rejectsKind(() => dev.pwrite(pattern(10), 0), 'read-only');
  assert.match(e.message, /\/dev\/test/);
  await rejectsKind(() => dev.writeZeroes(0, 10), 'read-only');
  await rejectsKind(() => dev.discard(0, 10), 'read-only');
  await dev.pread(new Uint8Array(10), 0);
  assert.deepEqual(
    d.calls.map((c) => c.op),
    ['pread'],
  );
});

test('GenericDevice: a driver without pwrite refuses writes with not-supported', async () => {
  const drv: Driver = {
    size: 1024,
    format: 'ro-only',
    readOnly: false,
    async pread(buf) {
      buf.fill(1);
    },
    async close() {},
  };
  const dev = new GenericDevice(drv);
  await rejectsKind(() => dev.pwrite(new Uint8Array(4), 0), 'not-supported');
});

test('GenericDevice: requests are split at maxRequest', async () => {
  const d = new TestDriver(65536, false, { maxRequest: 4096 });
  const dev = new GenericDevice(d);
  const p = pattern(10000, 9);
  await dev.pwrite(p, 100);
  assert.deepEqual(
    d.calls.map((c) => [c.op, c.offset, c.length]),
    [
      ['pwrite', 100, 4096],
      ['pwrite', 4196, 4096],
      ['pwrite', 8292, 1808],
    ],
  );
  d.calls.length = 0;
  const back = new Uint8Array(10000);
  await dev.pread(back, 100);
  assert.deepEqual(back, p);
  assert.deepEqual(
    d.calls.map((c) => c.length),
    [4096, 4096, 1808],
  );
  // Emulated zeroes go through the same splitting.
  d.calls.length = 0;
  await dev.writeZeroes(0, 10000);
  assert.ok(d.calls.every((c) => c.length <= 4096));
  assert.equal(isZero(d.data.subarray(0, 10000)), true);
});

test('GenericDevice: default block status is one data extent', async () => {
  const dev = new GenericDevice(new TestDriver(1 << 20));
  assert.deepEqual(await dev.blockStatus(4096, 8192), [
    { offset: 4096, length: 8192, zero: false, hole: false, allocated: true, depth: 0 },
  ]);
  assert.deepEqual(await dev.blockStatus(0, 0), []);
});

test('GenericDevice: driver block status is clipped and merged', async () => {
  class StatusDriver extends TestDriver {
    async blockStatus(offset: number, length: number): Promise<Extent[]> {
      // Extents on a 4 KiB grid, wider than asked: data, data (host-contiguous), zero, zero, data.
      const grid = 4096;
      const start = offset - (offset % grid);
      const out: Extent[] = [];
      for (let o = start, i = start / grid; o < offset + length + grid; o += grid, i++) {
        const zero = i % 5 === 2 || i % 5 === 3;
        const e: Extent = { offset: o, length: grid, zero, hole: zero };
        if (!zero) e.hostOffset = 1_000_000 + o;
        out.push(e);
      }
      return out;
    }
  }
  const dev = new GenericDevice(new StatusDriver(1 << 20));
  assert.equal(dev.caps.blockStatus, true);
  const ext = await dev.blockStatus(1000, 5 * 4096);
  assert.deepEqual(ext, [
    { offset: 1000, length: 2 * 4096 - 1000, zero: false, hole: false, hostOffset: 1_001_000 },
    { offset: 8192, length: 8192, zero: true, hole: true },
    { offset: 16384, length: 1000 + 5 * 4096 - 16384, zero: false, hole: false, hostOffset: 1_016_384 },
  ]);
});

test('normalizeExtents: clipping, merging, gaps', async () => {
  const d = (offset: number, length: number, more: Partial<Extent> = {}): Extent => ({ offset, length, zero: false, hole: false, ...more });
  // Clip both ends; hostOffset follows the clip.
  assert.deepEqual(normalizeExtents([d(0, 100, { hostOffset: 5000 })], 10, 50, 'w'), [d(10, 50, { hostOffset: 5010 })]);
  // Merge identical neighbours; skip empty and already-passed extents.
  assert.deepEqual(normalizeExtents([d(0, 10), d(10, 0), d(5, 5), d(10, 10), d(20, 10, { zero: true, hole: true })], 0, 30, 'w'), [
    d(0, 20),
    d(20, 10, { zero: true, hole: true }),
  ]);
  // Host-discontiguous data does not merge; contiguous does.
  assert.equal(normalizeExtents([d(0, 10, { hostOffset: 100 }), d(10, 10, { hostOffset: 500 })], 0, 20, 'w').length, 2);
  assert.equal(normalizeExtents([d(0, 10, { hostOffset: 100 }), d(10, 10, { hostOffset: 110 })], 0, 20, 'w').length, 1);
  // Different depth, file or compression do not merge.
  assert.equal(normalizeExtents([d(0, 10, { depth: 0 }), d(10, 10, { depth: 1 })], 0, 20, 'w').length, 2);
  assert.equal(normalizeExtents([d(0, 10, { compressed: true }), d(10, 10)], 0, 20, 'w').length, 2);
  // A prefix is fine: extents may stop early.
  assert.deepEqual(normalizeExtents([d(0, 10)], 0, 100, 'w'), [d(0, 10)]);
  // Extents past the end are dropped.
  assert.deepEqual(normalizeExtents([d(0, 10), d(10, 10, { zero: true })], 0, 10, 'w'), [d(0, 10)]);
  // A gap or nothing at all is the driver's bug: io.
  const gap = await rejectsKind(() => normalizeExtents([d(0, 10), d(20, 10)], 0, 30, 'who'), 'io');
  assert.match(gap.message, /^who: block status left a gap at 10/);
  await rejectsKind(() => normalizeExtents([d(5, 10)], 0, 30, 'w'), 'io');
  await rejectsKind(() => normalizeExtents([], 0, 30, 'w'), 'io');
  await rejectsKind(() => normalizeExtents([d(0, 10)], 10, 30, 'w'), 'io');
});

test('canMerge compares every flag', () => {
  const a: Extent = { offset: 0, length: 10, zero: false, hole: false };
  assert.equal(canMerge(a, { ...a, offset: 10 }), true);
  assert.equal(canMerge(a, { ...a, offset: 10, zero: true }), false);
  assert.equal(canMerge(a, { ...a, offset: 10, allocated: false }), false);
  assert.equal(canMerge(a, { ...a, offset: 10, allocated: true }), true, 'allocated defaults to !hole');
  assert.equal(canMerge(a, { ...a, offset: 10, file: 'x' }), false);
  assert.equal(canMerge(a, { ...a, offset: 10, hostOffset: 0 }), false, 'one with a host offset, one without');
});

test('GenericDevice: closed devices refuse I/O; close is idempotent; async dispose closes', async () => {
  const d = new TestDriver(4096);
  const dev = new GenericDevice(d);
  await dev.close();
  await dev.close();
  assert.equal(d.closes, 1);
  await rejectsKind(() => dev.pread(new Uint8Array(1), 0), 'invalid-argument');
  await rejectsKind(() => dev.pwrite(new Uint8Array(1), 0), 'invalid-argument');
  const d2 = new TestDriver(4096);
  {
    await using dev2 = new GenericDevice(d2);
    await dev2.pread(new Uint8Array(1), 0);
  }
  assert.equal(d2.closes, 1);
  assert.equal(new GenericDevice(d2).inner, d2);
});

// ---------------------------------------------------------------- memory device and filters

test('memoryDevice: zero-filled or over given bytes', async () => {
  const dev = memoryDevice(65536);
  assert.equal(dev.size, 65536);
  assert.equal(dev.format, 'memory');
  assert.equal(dev.caps.readOnly, false);
  assert.equal(dev.caps.zero, true);
  assert.equal(dev.caps.discard, true);
  assert.equal(dev.caps.fua, true);
  const buf = new Uint8Array(100).fill(1);
  await dev.pread(buf, 65436);
  assert.equal(isZero(buf), true);
  await dev.pwrite(pattern(1000), 5000);
  await dev.writeZeroes(5100, 100);
  await dev.discard(5800, 100);
  const back = new Uint8Array(1000);
  await dev.pread(back, 5000);
  const want = pattern(1000);
  want.fill(0, 100, 200);
  want.fill(0, 800, 900);
  assert.deepEqual(back, want);
  await rejectsKind(() => dev.pwrite(new Uint8Array(2), 65535), 'out-of-bounds');
  assert.deepEqual(await dev.blockStatus(0, 100), [{ offset: 0, length: 100, zero: false, hole: false, allocated: true, depth: 0 }]);

  const bytes = pattern(4096);
  const over = memoryDevice(bytes);
  await over.pwrite(new Uint8Array([0xaa]), 7);
  assert.equal(bytes[7], 0xaa, 'not copied');
  await over.close();
  await rejectsKind(() => over.pread(new Uint8Array(1), 0), 'invalid-argument');
});

test('offsetFilter: a window of another device', async () => {
  const base = memoryDevice(pattern(8192));
  const win = offsetFilter(base, 1000, 2000);
  assert.equal(win.size, 2000);
  const buf = new Uint8Array(2000);
  await win.pread(buf, 0);
  assert.deepEqual(buf, pattern(8192).subarray(1000, 3000));
  await win.pwrite(new Uint8Array([1, 2, 3]), 10);
  const b2 = new Uint8Array(3);
  await base.pread(b2, 1010);
  assert.deepEqual(b2, new Uint8Array([1, 2, 3]));
  await win.writeZeroes(100, 10);
  const b3 = new Uint8Array(10);
  await base.pread(b3, 1100);
  assert.equal(isZero(b3), true);
  await rejectsKind(() => win.pread(new Uint8Array(1), 2000), 'out-of-bounds');
  await rejectsKind(() => win.pwrite(new Uint8Array(2), 1999), 'out-of-bounds');
  const ext = await win.blockStatus(500, 1000);
  assert.equal(ext[0]?.offset, 500, 'extents in window coordinates');
  assert.equal(ext[ext.length - 1]!.offset + ext[ext.length - 1]!.length, 1500);
  // Default length: to the end of the device.
  assert.equal(offsetFilter(base, 8000).size, 192);
  assert.equal(offsetFilter(base, 8192).size, 0);
  await rejectsKind(() => offsetFilter(base, 8000, 193), 'out-of-bounds');
  await rejectsKind(() => offsetFilter(base, 8193), 'out-of-bounds');
  await rejectsKind(() => offsetFilter(base, -1, 10), 'out-of-bounds');
  await rejectsKind(() => offsetFilter(base, 0.5, 10), 'out-of-bounds');
});

test('readOnlyFilter: reads pass, every write is refused', async () => {
  const base = memoryDevice(pattern(4096));
  const ro = readOnlyFilter(base);
  assert.equal(ro.caps.readOnly, true);
  assert.equal(base.caps.readOnly, false);
  assert.equal(ro.size, 4096);
  assert.equal(ro.format, 'memory');
  const buf = new Uint8Array(16);
  await ro.pread(buf, 0);
  assert.deepEqual(buf, pattern(4096).subarray(0, 16));
  await rejectsKind(() => ro.pwrite(new Uint8Array(1), 0), 'read-only');
  await rejectsKind(() => ro.writeZeroes(0, 1), 'read-only');
  await rejectsKind(() => ro.discard(0, 1), 'read-only');
  const check = new Uint8Array(4096);
  await base.pread(check, 0);
  assert.deepEqual(check, pattern(4096), 'nothing changed underneath');
  // Stacked: a window of a read-only device is read-only too.
  await rejectsKind(() => offsetFilter(ro, 10, 10).pwrite(new Uint8Array(1), 0), 'read-only');
});

// ---------------------------------------------------------------- LruCache

test('LruCache: evicts the least recently used entry', async () => {
  const c = new LruCache<number, string>(3);
  let loads = 0;
  const load = (k: number) => () => {
    loads++;
    return Promise.resolve(`v${k}`);
  };
  assert.equal(await c.get(1, load(1)), 'v1');
  assert.equal(await c.get(2, load(2)), 'v2');
  assert.equal(await c.get(3, load(3)), 'v3');
  assert.equal(loads, 3);
  assert.equal(await c.get(1, load(1)), 'v1', 'hit: 1 becomes most recent');
  assert.equal(loads, 3);
  await c.get(4, load(4)); // evicts 2, the least recently used
  assert.equal(c.size, 3);
  assert.equal(loads, 4);
  await c.get(1, load(1));
  await c.get(3, load(3));
  await c.get(4, load(4));
  assert.equal(loads, 4, '1, 3, 4 still cached');
  await c.get(2, load(2));
  assert.equal(loads, 5, '2 was evicted');
  c.delete(2);
  assert.equal(c.size, 2);
  c.clear();
  assert.equal(c.size, 0);
});

test('LruCache: concurrent gets share one in-flight load; failed loads are not cached', async () => {
  const c = new LruCache<string, number>(4);
  let loads = 0;
  let release: (v: number) => void = () => {};
  const slow = (): Promise<number> => {
    loads++;
    return new Promise((res) => {
      release = res;
    });
  };
  const a = c.get('k', slow);
  const b = c.get('k', slow);
  assert.equal(a, b, 'the same promise');
  assert.equal(loads, 1);
  release(42);
  assert.deepEqual(await Promise.all([a, b]), [42, 42]);

  let fails = 0;
  const bad = (): Promise<number> => {
    fails++;
    return Promise.reject(new Error('boom'));
  };
  const p1 = c.get('x', bad);
  const p2 = c.get('x', bad);
  await assert.rejects(p1, /boom/);
  await assert.rejects(p2, /boom/);
  assert.equal(fails, 1, 'shared while in flight');
  assert.equal(await c.get('x', () => Promise.resolve(7)), 7, 'retried after the failure');
});

// ---------------------------------------------------------------- sizes

test('parseSize: numbers with suffixes', () => {
  assert.equal(parseSize('512'), 512);
  assert.equal(parseSize('0'), 0);
  assert.equal(parseSize('64K'), 65536);
  assert.equal(parseSize('64k'), 65536);
  assert.equal(parseSize('64KiB'), 65536);
  assert.equal(parseSize('64KB'), 65536);
  assert.equal(parseSize('1M'), 1 << 20);
  assert.equal(parseSize('1.5G'), 1.5 * 2 ** 30);
  assert.equal(parseSize('2T'), 2 * 2 ** 40);
  assert.equal(parseSize('1P'), 2 ** 50);
  assert.equal(parseSize('512B'), 512);
  assert.equal(parseSize(' 4 M '), 4 << 20);
  assert.equal(parseSize('0.5K'), 512);
});

test('parseSize: bad strings are invalid-argument naming what was parsed', async () => {
  for (const bad of ['', ' ', 'abc', '-1', '1X', 'K', '1.5', '0.3K', '1e3', '0x10', '1 2', '1KK', '9E', '100000P']) {
    const e = await rejectsKind(() => parseSize(bad, 'offset'), 'invalid-argument');
    assert.ok(e.message.includes(`'${bad}'`), e.message);
    assert.match(e.message, /^invalid offset /);
  }
});

test('humanSize: qemu-img style', () => {
  assert.equal(humanSize(0), '0 B');
  assert.equal(humanSize(1), '1 B');
  assert.equal(humanSize(999), '999 B');
  // From 1000 of a unit qemu switches to the next one (its %0.3g would print 1e+03 otherwise).
  assert.equal(humanSize(1000), '0.977 KiB');
  assert.equal(humanSize(1023), '0.999 KiB');
  assert.equal(humanSize(1000 * 1024), '0.977 MiB');
  assert.equal(humanSize(1023 * 1024), '0.999 MiB');
  assert.equal(humanSize(10239 * 1024), '10 MiB');
  assert.equal(humanSize(102300 * 1024), '99.9 MiB');
  assert.equal(humanSize(120 * 1024), '120 KiB', 'zeros of the integer part stay');
  assert.equal(humanSize(200 * 2 ** 20), '200 MiB');
  assert.equal(humanSize(1024), '1 KiB');
  assert.equal(humanSize(1536), '1.5 KiB');
  assert.equal(humanSize(324 * 1024), '324 KiB');
  assert.equal(humanSize(196624), '192 KiB');
  assert.equal(humanSize(1 << 20), '1 MiB');
  assert.equal(humanSize(10.5 * 2 ** 20), '10.5 MiB');
  assert.equal(humanSize(1.5 * 2 ** 30), '1.5 GiB');
  assert.equal(humanSize(1.25 * 2 ** 30), '1.25 GiB');
  assert.equal(humanSize(100 * 2 ** 30), '100 GiB');
  assert.equal(humanSize(2 ** 40), '1 TiB');
  assert.equal(humanSize(2 ** 60), '1 EiB');
});

// ---------------------------------------------------------------- zstd frames

test('zstdFrameLength: a real frame followed by trailing garbage', async () => {
  await zstdInit();
  const data = pattern(65536, 3);
  data.fill(0, 1000, 30000);
  const frame = zstdCompress(data, 3);
  const tail = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4, 5, 6, 7, 8, 9]); // looks like another frame
  const withTail = new Uint8Array(frame.length + tail.length + 500);
  withTail.set(frame);
  withTail.set(tail, frame.length);
  withTail.fill(0xab, frame.length + tail.length);
  assert.equal(zstdFrameLength(withTail, 65536), frame.length);
  assert.equal(zstdFrameLength(frame, 65536), frame.length, 'exactly one frame');
  // Too small a limit for the content size the frame declares.
  assert.match(String(zstdFrameLength(frame, 65535)), /content size 65536 is larger than a cluster/);
  // Cut anywhere inside: a reason, not a length.
  for (const cut of [3, 5, 7, frame.length - 1, frame.length - 10]) {
    assert.equal(typeof zstdFrameLength(frame.subarray(0, cut), 65536), 'string', `cut at ${cut}`);
  }
  assert.equal(zstdFrameLength(new Uint8Array(64), 65536), 'no zstd frame magic');
  // Reserved frame header bit.
  const reserved = frame.slice();
  reserved[4] = (reserved[4] as number) | 0x08;
  assert.equal(zstdFrameLength(reserved, 65536), 'reserved bit set in frame header');
});

test('zstdFrameLength: declared sizes are checked before anything is allocated', () => {
  // 8-byte content size of 4 GiB.
  const huge = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0xe0, 0, 0, 0, 0, 1, 0, 0, 0, 0x01, 0, 0]);
  assert.match(String(zstdFrameLength(huge, 2 << 20)), /content size 4294967296/);
  // A raw block of 0 bytes and an RLE block: lengths walk correctly.
  // FHD 0x20: single segment, 1-byte FCS = 5; block 1: raw, 0 bytes, not last; block 2: RLE of 5, last, byte 'a'.
  const raw = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x05, 0, 0, 0, 0x2b, 0, 0, 0x61, 0xff]);
  assert.equal(zstdFrameLength(raw, 65536), 13);
  // Reserved block type 3.
  const bad = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x05, 0x07, 0, 0]);
  assert.equal(zstdFrameLength(bad, 65536), 'reserved block type');
  // A window descriptor beyond what the decoder accepts.
  const win = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xf8, 0x01, 0, 0]);
  assert.equal(zstdFrameLength(win, 65536), 'window size too large');
});
