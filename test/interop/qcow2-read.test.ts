/**
 * qcow2 interop: images made by the real qemu-img / qemu-io, read by rblock.
 * For every image rblock must give the same guest bytes as `qemu-img convert
 * -O raw`, the same `map --output json` as `qemu-img map --output=json`
 * (entry for entry) and the same `info` facts as `qemu-img info` (see
 * checkAgainstQemu in qemu.ts).
 *
 * Images are small (a few MiB) so the whole file runs in seconds.
 */
import { after, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { needTools, rblock, scratchDir } from '../helpers/tools.js';
import { checkAgainstQemu, createQcow2, mixedRaw, QEMU_TOOLS, qemuImg, qemuIo, randomFile, type MapEntry } from './qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const scratch = scratchDir('rblock-qcow2-interop-');
after(() => scratch[Symbol.dispose]());
const ROOT = scratch.dir;
const OUT = join(ROOT, 'out');
mkdirSync(OUT, { recursive: true });

/** A pseudo-random pattern file in ROOT, for `write -s NAME off len`; returns its absolute path. */
function rnd(seed: number, length = 512 * KiB): string {
  return randomFile(join(ROOT, `random-${seed}-${length}.bin`), length, seed);
}

/** Guard against a vacuous test: the image really has the structure it is meant to exercise. */
function assertHas(map: MapEntry[], what: string, pred: (e: MapEntry) => boolean): void {
  assert.ok(map.some(pred), `the image was meant to contain ${what}, but qemu-img map shows none`);
}

const zeroAlloc = (e: MapEntry): boolean => e.present && e.zero && !e.data && e.offset !== undefined;
const zeroPlain = (e: MapEntry): boolean => e.present && e.zero && !e.data && e.offset === undefined;
const unallocatedAlloc = (e: MapEntry): boolean => !e.present && e.offset !== undefined;

function ready(t: TestContext): boolean {
  return needTools(t, ...QEMU_TOOLS);
}

/**
 * A write script for an image with this cluster size and virtual size:
 * patterns at offsets that straddle cluster boundaries and (when the image
 * is large enough) L2-table boundaries, pseudo-random data, zero writes
 * (keeping and dropping the allocation), a discard and a write at the very end.
 */
function standardWrites(cs: number, size: number, seed: number, l2EntrySize = 8): string[] {
  const l2Span = cs * (cs / l2EntrySize);
  // The step between the regions below: a cluster, or less when clusters are big compared to the disk.
  const u = Math.min(cs, Math.floor(size / 16 / 512) * 512);
  const cmds = [
    `write -P 0x11 0 ${Math.min(u, 4096)}`,
    `write -P 0x12 ${u - 100} 300`, // straddles clusters 0 and 1
    `write -P 0x13 ${3 * u - 1000} ${2 * u + 2000}`, // unaligned, over several clusters
    `write -s ${rnd(seed)} ${5 * u + 123} ${Math.min(300 * KiB, 3 * u)}`, // pseudo-random
  ];
  for (let b = l2Span; b < size - 2048 && cmds.length < 20; b += l2Span) {
    cmds.push(`write -P 0x${(0x20 + ((b / l2Span) % 0x40)).toString(16)} ${b - 700} 1500`); // straddles an L2 table boundary
  }
  cmds.push(
    `write -z ${3 * u} ${u}`, // zero a whole allocated cluster (keeps its allocation)
    `write -z -u ${4 * u} ${u}`, // zero with unmap allowed
    `write -z ${3 * u - 600} 200`, // zero a few bytes inside data
    `discard ${5 * u} ${u}`,
    `write -P 0x7e ${size - 1536} 1536`, // the last bytes of the disk
  );
  return cmds;
}

/** Create an image in ROOT, run the standard writes, compare with qemu. */
async function standardImage(name: string, size: number, cs: number, o: string, seed: number, extra: string[] = []): Promise<MapEntry[]> {
  createQcow2(ROOT, name, size, { o });
  qemuIo(ROOT, name, ...standardWrites(cs, size, seed), ...extra);
  // --backing-chain of a single image: a one-element array (checked on the small images only).
  const chainLength = size <= 1 * MiB ? 1 : undefined;
  const { map } = await checkAgainstQemu({ image: name, rblockCwd: ROOT, outDir: OUT, chainLength });
  assertHas(map, 'data', (e) => e.data && e.offset !== undefined);
  return map;
}

// Cluster sizes ------------------------------------------------------------

test('cluster_size=512: writes across cluster and L2-table (32 KiB) boundaries', async (t) => {
  if (!ready(t)) return;
  const map = await standardImage('c512.qcow2', 1 * MiB, 512, 'cluster_size=512', 1);
  assertHas(map, 'a preallocated zero cluster', zeroAlloc);
});

test('cluster_size=4K: writes across the 2 MiB L2-table boundaries', async (t) => {
  if (!ready(t)) return;
  await standardImage('c4k.qcow2', 5 * MiB, 4096, 'cluster_size=4096', 2);
});

test('cluster_size=64K (default)', async (t) => {
  if (!ready(t)) return;
  await standardImage('c64k.qcow2', 3 * MiB, 65536, 'cluster_size=65536', 3);
});

test('cluster_size=2M, virtual size not a multiple of it', async (t) => {
  if (!ready(t)) return;
  await standardImage('c2m.qcow2', 7 * MiB, 2 * MiB, 'cluster_size=2M', 4, [
    'write -P 0x15 2M 4M',
    'write -z 2M 2M', // a whole zero cluster, allocation kept
    'write -z -u 4M 2M',
    'write -P 0x16 6M 4K',
    'discard 6M 1M', // the partial last cluster
  ]);
});

// Refcount widths and compat levels ----------------------------------------

test('refcount_bits=1', async (t) => {
  if (!ready(t)) return;
  await standardImage('rc1.qcow2', 2 * MiB, 65536, 'refcount_bits=1', 5);
});

test('refcount_bits=16 with 4K clusters', async (t) => {
  if (!ready(t)) return;
  await standardImage('rc16.qcow2', 2 * MiB, 4096, 'refcount_bits=16,cluster_size=4096', 6);
});

test('refcount_bits=64 with lazy refcounts', async (t) => {
  if (!ready(t)) return;
  await standardImage('rc64.qcow2', 2 * MiB, 65536, 'refcount_bits=64,lazy_refcounts=on', 7);
});

test('compat=0.10 (qcow2 version 2)', async (t) => {
  if (!ready(t)) return;
  const map = await standardImage('v2.qcow2', 2 * MiB, 65536, 'compat=0.10', 8);
  // Version 2 has no zero flag: the discarded cluster (5 * 64K) becomes unallocated.
  assertHas(map, 'a discarded cluster, unallocated', (e) => !e.present && e.start <= 5 * 65536 && e.start + e.length >= 6 * 65536);
  assert.ok(!map.some((e) => e.present && e.zero), 'a version 2 image cannot have zero clusters');
});

test('compat=0.10 with 512-byte clusters', async (t) => {
  if (!ready(t)) return;
  await standardImage('v2-c512.qcow2', 512 * KiB, 512, 'compat=0.10,cluster_size=512', 9);
});

test('compat=1.1 (qcow2 version 3)', async (t) => {
  if (!ready(t)) return;
  await standardImage('v3.qcow2', 2 * MiB, 65536, 'compat=1.1', 10);
});

// Extended L2 entries (subclusters) -----------------------------------------

test('extended_l2=on, 64K clusters: writes and zero-writes of single 2K subclusters', async (t) => {
  if (!ready(t)) return;
  const name = 'extl2-64k.qcow2';
  createQcow2(ROOT, name, 2 * MiB, { o: 'extended_l2=on,cluster_size=64K' });
  qemuIo(
    ROOT,
    name,
    'write -P 0x41 0 2K', // subcluster 0 of cluster 0; the rest stays unallocated
    'write -P 0x42 66K 1K', // inside subcluster 1 of cluster 1
    'write -z 70K 2K', // one zero subcluster in an allocated cluster
    'write -z 200K 2K', // one zero subcluster in an unallocated cluster
    'write -P 0x43 128K 64K', // a whole cluster
    'write -z 130K 2K', // zero one subcluster of it
    'discard 140K 2K',
    `write -s ${rnd(11)} ${256 * KiB - 3000} 9000`, // pseudo-random, straddling a cluster boundary
    'write -P 0x44 1023K 3K', // straddles subclusters and clusters
    ...standardWrites(65536, 2 * MiB, 12, 16),
  );
  const { map } = await checkAgainstQemu({ image: name, rblockCwd: ROOT, outDir: OUT });
  assertHas(map, 'an unallocated subcluster of an allocated cluster', unallocatedAlloc);
  assertHas(map, 'a zero subcluster of an allocated cluster', zeroAlloc);
  assertHas(map, 'a 2K data run', (e) => e.data && e.length === 2048);
});

test('extended_l2=on, 16K clusters (512-byte subclusters)', async (t) => {
  if (!ready(t)) return;
  const name = 'extl2-16k.qcow2';
  createQcow2(ROOT, name, 1 * MiB, { o: 'extended_l2=on,cluster_size=16K' });
  qemuIo(ROOT, name, 'write -P 0x51 512 512', 'write -z 1536 512', 'write -P 0x52 16383 2', ...standardWrites(16384, 1 * MiB, 13, 16));
  await checkAgainstQemu({ image: name, rblockCwd: ROOT, outDir: OUT });
});

// Compression --------------------------------------------------------------

async function compressedImage(name: string, o: string, extra: string[], size = 3 * MiB, zeroRange?: [number, number]): Promise<void> {
  const raw = join(ROOT, `${name}.src.raw`);
  const content = mixedRaw(size, name.length);
  if (zeroRange !== undefined) content.fill(0, zeroRange[0], zeroRange[0] + zeroRange[1]);
  writeFileSync(raw, content);
  qemuImg(ROOT, 'convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', o, raw, name);
  if (extra.length > 0) qemuIo(ROOT, name, ...extra);
  const check = JSON.parse(qemuImg(ROOT, 'check', '--output=json', name).stdout) as { 'compressed-clusters'?: number };
  assert.ok((check['compressed-clusters'] ?? 0) > 0, `${name}: qemu-img made no compressed clusters`);
  const { map } = await checkAgainstQemu({ image: name, rblockCwd: ROOT, outDir: OUT });
  assertHas(map, 'a compressed run', (e) => e.data && e.offset === undefined);
  assertHas(map, 'an uncompressed data run', (e) => e.data && e.offset !== undefined);
  assertHas(map, 'an unallocated run', (e) => !e.present);
  const info = JSON.parse(rblock(['info', '--output', 'json', name], { cwd: ROOT }).stdout) as {
    'format-specific': { data: Record<string, unknown> };
  };
  assert.equal(info['format-specific'].data['compression-type'], /zstd/.test(o) ? 'zstd' : 'zlib');
}

test('compressed clusters (zlib), from text, random data and zeros', async (t) => {
  if (!ready(t)) return;
  await compressedImage('zlib.qcow2', 'compression_type=zlib', [
    'write -P 0x61 70000 1000', // rewrite part of a compressed cluster: it becomes a normal one
    'write -c -P 0x62 192K 64K', // a compressed write (qemu-io -c) into an unallocated cluster
    'write -z 1216K 64K',
  ]);
});

test('compressed clusters (zstd)', async (t) => {
  if (!ready(t)) return;
  await compressedImage('zstd.qcow2', 'compression_type=zstd', ['write -P 0x63 131000 2000', 'write -c -P 0x64 896K 64K']);
});

test('compressed clusters (zlib) with 4K clusters', async (t) => {
  if (!ready(t)) return;
  await compressedImage('zlib-4k.qcow2', 'compression_type=zlib,cluster_size=4096', []);
});

test('compressed clusters (zstd) with 2M clusters', async (t) => {
  if (!ready(t)) return;
  await compressedImage('zstd-2m.qcow2', 'compression_type=zstd,cluster_size=2M', ['write -P 0x65 4M 4K'], 6 * MiB, [2 * MiB, 2 * MiB]);
});

// Zero and discarded clusters ------------------------------------------------

test('zero clusters and discarded clusters', async (t) => {
  if (!ready(t)) return;
  const name = 'zero-discard.qcow2';
  createQcow2(ROOT, name, 2 * MiB, { o: 'cluster_size=4096' });
  qemuIo(
    ROOT,
    name,
    'write -P 0x55 0 1M',
    'write -z 8K 8K', // zero flag, allocation kept
    'write -z -u 64K 64K', // zero flag, allocation may be dropped
    'write -z 1000 3000', // partial: zeros written as data
    'discard 200K 40K',
    'discard 300K 2K', // less than a cluster: ignored
    'write -z 1536K 100K', // zeros over unallocated space
    'write -P 0x56 1540K 4K', // data inside that zero range
    'discard 1540K 4K',
  );
  const { map } = await checkAgainstQemu({ image: name, rblockCwd: ROOT, outDir: OUT });
  assertHas(map, 'a preallocated zero cluster', zeroAlloc);
  assertHas(map, 'a plain zero cluster', zeroPlain);
  // qcow2 v3 without a backing file turns discarded clusters into plain zero clusters.
  assertHas(map, 'the discarded clusters, as plain zeros', (e) => zeroPlain(e) && e.start === 200 * KiB && e.length === 40 * KiB);
});

// Backing chains ------------------------------------------------------------

test('backing chain of depth 3 with relative names, read from another directory', async (t) => {
  if (!ready(t)) return;
  const chain = join(ROOT, 'chain');
  mkdirSync(join(chain, 'base'), { recursive: true });
  mkdirSync(join(chain, 'top'), { recursive: true });
  mkdirSync(join(ROOT, 'elsewhere'), { recursive: true });
  // base: 2 MiB, 64K clusters
  createQcow2(chain, 'base/base.qcow2', 2 * MiB);
  qemuIo(chain, 'base/base.qcow2', 'write -P 0xa1 0 1536K', `write -s ${rnd(21)} 100K 200K`, 'write -P 0xa2 2040K 8K');
  // mid: 3 MiB (bigger than base), 512-byte clusters, backing name relative to chain/
  createQcow2(chain, 'mid.qcow2', 3 * MiB, { backing: 'base/base.qcow2', o: 'cluster_size=512' });
  qemuIo(
    chain,
    'mid.qcow2',
    'write -P 0xb1 32000 1500', // straddles an L2 boundary of mid
    'write -z 64K 64K', // zeros hiding base data
    'discard 512K 64K', // discarded over base data
    'write -P 0xb2 2046K 6K', // straddles base's end
    'write -P 0xb3 2560K 4K', // beyond base's end
  );
  // top: 4 MiB (bigger than mid), 4K clusters, backing name relative to chain/top/
  createQcow2(join(chain, 'top'), 'top.qcow2', 4 * MiB, { backing: '../mid.qcow2', o: 'cluster_size=4096' });
  qemuIo(
    join(chain, 'top'),
    'top.qcow2',
    'write -P 0xc1 4000 200',
    'write -z 96K 8K',
    `write -s ${rnd(22)} 1M 100K`,
    'write -P 0xc2 3070K 4K', // straddles mid's end
    'write -P 0xc3 4092K 4K',
  );
  // qemu from the scratch root, rblock from a sibling directory: the names can only resolve relative to each image.
  const { map } = await checkAgainstQemu({
    image: '../chain/top/top.qcow2',
    rblockCwd: join(ROOT, 'elsewhere'),
    qemuImage: 'chain/top/top.qcow2',
    qemuCwd: ROOT,
    outDir: OUT,
    chainLength: 3,
  });
  for (const depth of [0, 1, 2]) assertHas(map, `data at depth ${depth}`, (e) => e.data && e.depth === depth);
  assertHas(map, 'zeros of the middle image', (e) => e.zero && e.present && e.depth === 1);
  assertHas(map, 'a range past the end of the base image, unallocated', (e) => !e.present && e.depth === 1 && e.start >= 2 * MiB);
  assertHas(map, 'a range past the end of the middle image, unallocated', (e) => !e.present && e.depth === 0 && e.start >= 3 * MiB);
  await checkAgainstQemu({ image: 'chain/mid.qcow2', rblockCwd: ROOT, outDir: OUT, chainLength: 2 });
});

test('overlay with extended L2 over a smaller backing file', async (t) => {
  if (!ready(t)) return;
  const dir = join(ROOT, 'extl2-chain');
  mkdirSync(dir, { recursive: true });
  createQcow2(dir, 'base.qcow2', 1 * MiB, { o: 'cluster_size=4096' });
  qemuIo(dir, 'base.qcow2', 'write -P 0xd1 0 1M');
  createQcow2(dir, 'over.qcow2', 2 * MiB, { backing: 'base.qcow2', o: 'extended_l2=on,cluster_size=32K' });
  // Single subclusters over the backing data, and past its end (the rest of those clusters stays unallocated).
  qemuIo(
    dir,
    'over.qcow2',
    'write -P 0xd2 1K 1K',
    'write -z 3K 1K',
    'write -P 0xd3 1040K 1K',
    'write -z 1100K 1K',
    'write -P 0xd4 1008K 32K',
  );
  const { map } = await checkAgainstQemu({ image: 'extl2-chain/over.qcow2', rblockCwd: ROOT, outDir: OUT, chainLength: 2 });
  assertHas(map, 'backing data showing through an allocated cluster', (e) => e.data && e.depth === 1);
  assertHas(map, 'an unallocated subcluster past the end of the backing file', (e) => unallocatedAlloc(e) && e.depth === 0);
});

// External data files -------------------------------------------------------

// qemu 7.2 resolves a relative data file name against its working directory,
// so qemu runs inside the image's directory; rblock resolves it against the
// image's directory, so it runs from elsewhere and must find the same file.
test('external data file, named relatively', async (t) => {
  if (!ready(t)) return;
  const dir = join(ROOT, 'datafile');
  mkdirSync(dir, { recursive: true });
  createQcow2(dir, 'df.qcow2', 2 * MiB, { o: 'data_file=df.data,cluster_size=4096' });
  // Zeroing guest offset 0 leaves an L2 entry with offset 0: a plain zero cluster, not one "at host offset 0".
  qemuIo(dir, 'df.qcow2', ...standardWrites(4096, 2 * MiB, 31), 'write -z 0 4K', 'write -z 1M 8K');
  await checkAgainstQemu({ image: 'datafile/df.qcow2', rblockCwd: ROOT, qemuImage: 'df.qcow2', qemuCwd: dir, outDir: OUT });
});

test('external data file with data_file_raw=on', async (t) => {
  if (!ready(t)) return;
  const dir = join(ROOT, 'datafile-raw');
  mkdirSync(dir, { recursive: true });
  createQcow2(dir, 'dfr.qcow2', 2 * MiB, { o: 'data_file=dfr.data,data_file_raw=on' });
  qemuIo(dir, 'dfr.qcow2', ...standardWrites(65536, 2 * MiB, 32), 'write -z 0 64K', 'write -z 1M 64K');
  await checkAgainstQemu({ image: 'datafile-raw/dfr.qcow2', rblockCwd: ROOT, qemuImage: 'dfr.qcow2', qemuCwd: dir, outDir: OUT });
});

// Snapshots and bitmaps -----------------------------------------------------

test('internal snapshots, with data changed after them', async (t) => {
  if (!ready(t)) return;
  const name = 'snap.qcow2';
  createQcow2(ROOT, name, 1 * MiB);
  qemuIo(ROOT, name, 'write -P 0x31 0 256K');
  qemuImg(ROOT, 'snapshot', '-c', 'first', name);
  qemuIo(ROOT, name, 'write -P 0x32 64K 64K', 'write -z 128K 4K', 'write -P 0x33 250K 10K');
  qemuImg(ROOT, 'snapshot', '-c', 'second snapshot', name);
  qemuIo(ROOT, name, `write -s ${rnd(41)} 300K 50K`, 'discard 0 64K', 'write -P 0x34 1020K 4K');
  await checkAgainstQemu({ image: name, rblockCwd: ROOT, outDir: OUT });
  const info = JSON.parse(rblock(['info', '--output', 'json', name], { cwd: ROOT }).stdout) as {
    snapshots: Array<{ id: string; name: string }>;
  };
  assert.deepEqual(
    info.snapshots.map((s) => [s.id, s.name]),
    [
      ['1', 'first'],
      ['2', 'second snapshot'],
    ],
  );
});

test('persistent dirty bitmaps', async (t) => {
  if (!ready(t)) return;
  const name = 'bitmaps.qcow2';
  createQcow2(ROOT, name, 2 * MiB);
  qemuIo(ROOT, name, 'write -P 0x71 0 100K');
  qemuImg(ROOT, 'bitmap', '--add', name, 'b0');
  qemuImg(ROOT, 'bitmap', '--add', '-g', '128K', name, 'b1-wide');
  qemuImg(ROOT, 'bitmap', '--add', '--disable', name, 'b2-disabled');
  qemuIo(ROOT, name, 'write -P 0x72 1M 100K');
  await checkAgainstQemu({ image: name, rblockCwd: ROOT, outDir: OUT });
  const info = JSON.parse(rblock(['info', '--output', 'json', name], { cwd: ROOT }).stdout) as {
    'format-specific': { data: { bitmaps?: Array<{ name: string }> } };
  };
  assert.deepEqual(
    info['format-specific'].data.bitmaps?.map((b) => b.name),
    ['b0', 'b1-wide', 'b2-disabled'],
  );
});

// Virtual sizes that are not a multiple of the cluster size -----------------

test('virtual size 1000000 bytes (64K clusters)', async (t) => {
  if (!ready(t)) return;
  const name = 'odd-1000000.qcow2';
  createQcow2(ROOT, name, 1000000);
  qemuIo(ROOT, name, 'write -P 0x81 983000 17448', 'write -P 0x82 65000 1000');
  await checkAgainstQemu({ image: name, rblockCwd: ROOT, outDir: OUT });
});

test('virtual size 64K+512 (64K clusters)', async (t) => {
  if (!ready(t)) return;
  const name = 'odd-64k512.qcow2';
  createQcow2(ROOT, name, 64 * KiB + 512);
  qemuIo(ROOT, name, 'write -P 0x91 65000 1048');
  await checkAgainstQemu({ image: name, rblockCwd: ROOT, outDir: OUT });
});

test('virtual size 64K+512 with 4K clusters and an untouched tail', async (t) => {
  if (!ready(t)) return;
  const name = 'odd-64k512-c4k.qcow2';
  createQcow2(ROOT, name, 64 * KiB + 512, { o: 'cluster_size=4096' });
  qemuIo(ROOT, name, 'write -P 0x92 1000 5000', 'write -z 8K 4K');
  await checkAgainstQemu({ image: name, rblockCwd: ROOT, outDir: OUT });
});
