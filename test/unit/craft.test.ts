/**
 * The crafted-image builder itself: well-formed images from it must open and
 * read back what was written (and pass `qemu-img check` when qemu-img is
 * here), so that the bad-input tests break exactly one thing at a time.
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { init as zstdInit, compress as zstdCompress } from '@bokuweb/zstd-wasm';
import { openImage } from '../../src/index.js';
import { imageInfo } from '../../src/formats/info.js';
import { craft, deflateCluster } from '../fixtures/craft.js';
import { needTools, run, scratchDir } from '../helpers/tools.js';

const T = { timeout: 10000 };

function pattern(length: number, seed: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; i++) b[i] = (i * 7 + seed + (i >> 9)) & 0xff;
  return b;
}

async function readAll(path: string): Promise<Uint8Array> {
  await using dev = await openImage(path);
  const buf = new Uint8Array(dev.size);
  await dev.pread(buf, 0);
  return buf;
}

const variants = [
  { name: 'v3 64 KiB clusters', opts: { version: 3 as const, clusterBits: 16 } },
  { name: 'v2 512 B clusters', opts: { version: 2 as const, clusterBits: 9 } },
  { name: 'v3 extended L2', opts: { version: 3 as const, clusterBits: 16, extendedL2: true } },
  { name: 'v3 refcount_order 0', opts: { version: 3 as const, clusterBits: 12, refcountOrder: 0 } },
  { name: 'v3 refcount_order 6 + feature table', opts: { version: 3 as const, clusterBits: 12, refcountOrder: 6, featureTable: true } },
];

for (const v of variants) {
  test(`craft: ${v.name} reads back what was written`, T, async (t) => {
    using s = scratchDir();
    const size = 4 << 20;
    const c = craft({ ...v.opts, size });
    const expect = new Uint8Array(size);
    const a = pattern(3 * c.clusterSize + 100, 1);
    c.write(c.clusterSize + 17, a);
    expect.set(a, c.clusterSize + 17);
    const b = pattern(1000, 2);
    c.write(size - 1000, b);
    expect.set(b, size - 1000);
    const p = c.writeTo(join(s.dir, 'img.qcow2'));
    assert.deepEqual(await readAll(p), expect);
    if (needTools(t, 'qemu-img')) {
      const r = run('qemu-img', ['check', p], { check: false });
      assert.equal(r.status, 0, r.stdout + r.stderr);
    }
  });
}

test('craft: compressed clusters (zlib and zstd) read back', T, async (t) => {
  using s = scratchDir();
  await zstdInit();
  for (const type of [0, 1] as const) {
    const c = craft({ clusterBits: 16, compressionType: type });
    const data = pattern(c.clusterSize, 5 + type);
    data.fill(0x41, 0, 20000);
    const payload = type === 0 ? deflateCluster(data) : zstdCompress(data, 3);
    c.compressed(0, payload, { skew: 77 });
    c.fill(c.clusterSize, 0x5a);
    const p = c.writeTo(join(s.dir, `z${type}.qcow2`));
    const all = await readAll(p);
    assert.deepEqual(all.subarray(0, c.clusterSize), data);
    assert.ok(all.subarray(c.clusterSize, 2 * c.clusterSize).every((x) => x === 0x5a));
    if (needTools(t, 'qemu-img')) {
      // Compressed clusters refcount their host clusters once each: the crafted refcounts agree.
      const r = run('qemu-img', ['check', p], { check: false });
      assert.equal(r.status, 0, r.stdout + r.stderr);
    }
  }
});

test('craft: backing file, backing format and snapshots are seen by info', T, async () => {
  using s = scratchDir();
  const base = craft({ size: 1 << 20 })
    .fill(0, 0x11)
    .writeTo(join(s.dir, 'base.qcow2'));
  const c = craft({ size: 1 << 20, backingFile: 'base.qcow2', backingFormat: 'qcow2' });
  c.fill(c.clusterSize, 0x22);
  c.snapshots([{ id: '1', name: 'first' }]);
  const top = c.writeTo(join(s.dir, 'top.qcow2'));
  await using dev = await openImage(top);
  const info = await imageInfo(dev);
  assert.equal(info['backing-filename'], 'base.qcow2');
  assert.equal(info['full-backing-filename'], base);
  assert.equal(info['backing-filename-format'], 'qcow2');
  assert.equal(info.snapshots?.[0]?.name, 'first');
  const buf = new Uint8Array(2 * c.clusterSize);
  await dev.pread(buf, 0);
  assert.ok(buf.subarray(0, c.clusterSize).every((x) => x === 0x11));
  assert.ok(buf.subarray(c.clusterSize).every((x) => x === 0x22));
});
