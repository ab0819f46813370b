/**
 * Hostile and broken qcow2 images, each hand-crafted to break one thing.
 * Every case must fail with the right BlockError kind and a one-line message
 * naming the image and the structure or field, quickly (a hang or a huge
 * allocation fails the test through its timeout or the memory check).
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { init as zstdInit, compress as zstdCompress } from '@bokuweb/zstd-wasm';
import { BlockError, openImage, type ErrorKind } from '../../src/index.js';
import { imageInfo, imageInfoChain } from '../../src/formats/info.js';
import { MAX_CHAIN_DEPTH } from '../../src/formats/chain.js';
import { craft, deflateCluster, EXT, garbage, QEMU_FEATURE_TABLE, type Qcow2Craft } from '../fixtures/craft.js';
import { rblock, scratchDir } from '../helpers/tools.js';

const T = { timeout: 10000 };

// The application may initialise zstd-wasm itself (once: a second init() breaks the module);
// rblock must then use it as it is.
await zstdInit();

interface Want {
  kind: ErrorKind;
  /** The file the message and context must name (default: the image). */
  path: string;
  structure?: string | RegExp;
  field?: string;
  /** More text the message must contain. */
  mentions?: (string | RegExp)[];
}

/** Await the operation, demand a BlockError shaped as wanted, return it. */
async function fails(op: Promise<unknown> | (() => Promise<unknown>), want: Want): Promise<BlockError> {
  let err: unknown;
  try {
    await (typeof op === 'function' ? op() : op);
  } catch (e) {
    err = e;
  }
  assert.ok(err !== undefined, `expected a ${want.kind} error, but the operation succeeded`);
  if (!(err instanceof BlockError)) throw new assert.AssertionError({ message: `expected a BlockError, got: ${String(err)}` });
  const e = err;
  assert.equal(e.kind, want.kind, `kind of: ${e.message}`);
  assert.ok(!e.message.includes('\n'), `message is one line: ${JSON.stringify(e.message)}`);
  assert.ok(e.message.includes(want.path), `message names ${want.path}: ${e.message}`);
  assert.equal(e.context.path, want.path, `context.path of: ${e.message}`);
  if (want.structure !== undefined) {
    const s = e.context.structure ?? '';
    if (typeof want.structure === 'string') assert.equal(s, want.structure, `context.structure of: ${e.message}`);
    else assert.match(s, want.structure, `context.structure of: ${e.message}`);
  }
  if (want.field !== undefined) assert.equal(e.context.field, want.field, `context.field of: ${e.message}`);
  // The message says where: the structure or the field (as named in the spec, or in words).
  const where = [e.context.structure, e.context.field].filter((x): x is string => x !== undefined);
  if (want.structure !== undefined || want.field !== undefined) {
    assert.ok(
      where.some((w) => e.message.includes(w) || e.message.includes(w.replace(/_/g, ' '))),
      `message names ${where.join(' or ')}: ${e.message}`,
    );
  }
  for (const m of want.mentions ?? []) {
    if (typeof m === 'string') assert.ok(e.message.includes(m), `message mentions '${m}': ${e.message}`);
    else assert.match(e.message, m);
  }
  return e;
}

/** Open, read `length` bytes at `offset`, close. */
async function readImage(path: string, offset = 0, length = 512): Promise<Uint8Array> {
  await using dev = await openImage(path);
  const buf = new Uint8Array(length);
  await dev.pread(buf, offset);
  return buf;
}

async function infoOf(path: string): Promise<unknown> {
  await using dev = await openImage(path);
  return await imageInfo(dev);
}

/** The CLI reports the failure as exactly one stderr line, exit 1, no stack trace. */
function cliFails(args: string[], path: string, mention?: string): void {
  const r = rblock(args);
  assert.equal(r.status, 1, `exit status of rblock ${args.join(' ')}: ${r.stderr}`);
  const lines = r.stderr.split('\n').filter((l) => l !== '');
  assert.equal(lines.length, 1, `one stderr line: ${JSON.stringify(r.stderr)}`);
  const line = lines[0] as string;
  assert.match(line, /^rblock: /);
  assert.ok(line.includes(path), `stderr names ${path}: ${line}`);
  if (mention !== undefined) assert.ok(line.includes(mention), `stderr mentions ${mention}: ${line}`);
  assert.doesNotMatch(r.stderr, /^\s+at /m, 'no stack trace');
  assert.doesNotMatch(r.stderr, /Error:/, 'no raw error dump');
}

/** Run op and check it neither took long nor grew the heap / array buffers by much. */
async function cheaply(op: () => Promise<unknown>, maxMs = 2000): Promise<void> {
  const before = process.memoryUsage();
  const t0 = performance.now();
  await op();
  const ms = performance.now() - t0;
  const after = process.memoryUsage();
  assert.ok(ms < maxMs, `took ${ms.toFixed(0)} ms`);
  const grown = after.arrayBuffers - before.arrayBuffers + (after.heapUsed - before.heapUsed);
  assert.ok(grown < 64 << 20, `memory grew by ${grown} bytes`);
}

function img(dir: string, name: string, c: Qcow2Craft): string {
  return c.writeTo(join(dir, name));
}

// ---------------------------------------------------------------- truncation

test('truncated: file shorter than the header', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'short.qcow2', craft().truncate(40));
  await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'qcow2 header', mentions: ['truncated'] });
  await fails(openImage(p, { format: 'qcow2' }), { kind: 'invalid-image', path: p, structure: 'qcow2 header' });
});

test('truncated: v3 header cut between the v2 and v3 parts', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'short3.qcow2', craft({ version: 3 }).truncate(90));
  await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'qcow2 header', field: 'header_length', mentions: ['truncated'] });
});

test('truncated: header fine, L1 table cut off', T, async () => {
  using s = scratchDir();
  const c = craft({ size: 4 * 2 ** 30 }); // 8 L1 entries: 64 bytes of L1
  const p = img(s.dir, 'l1cut.qcow2', c.truncate(c.l1TableOffset + 20));
  await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'L1 table', mentions: ['truncated'] });
});

test('truncated: L2 table cut off', T, async () => {
  using s = scratchDir();
  const c = craft();
  const data = c.allocClusters(1);
  c.setL2(0, (1n << 63n) | BigInt(data)); // allocates the L2 table last
  const l2 = c.l2TableFor(0).tableOffset;
  const p = img(s.dir, 'l2cut.qcow2', c.truncate(l2 + 512));
  const e = await fails(readImage(p), { kind: 'invalid-image', path: p, structure: /L2 table/, mentions: ['truncated'] });
  assert.equal(e.context.offset, l2);
});

// ---------------------------------------------------------------- header fields

test('wrong magic: probed as raw, refused as qcow2', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'magic.qcow2', craft().field('magic', 0x514649fa));
  {
    await using dev = await openImage(p);
    assert.equal(dev.format, 'raw');
  }
  await fails(openImage(p, { format: 'qcow2' }), { kind: 'invalid-image', path: p, structure: 'qcow2 header', field: 'magic' });
});

test('version 1 (qcow) is refused, probed or forced', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'v1.qcow2', craft().field('version', 1));
  await fails(openImage(p), { kind: 'unsupported-feature', path: p, mentions: ['QCOW version 1'] });
  await fails(openImage(p, { format: 'qcow2' }), { kind: 'unsupported-feature', path: p, structure: 'qcow2 header', field: 'version' });
});

test('version 4 is refused', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'v4.qcow2', craft().field('version', 4));
  await fails(openImage(p), { kind: 'unsupported-feature', path: p, structure: 'qcow2 header', field: 'version', mentions: ['4'] });
  cliFails(['info', p], p, 'version 4');
});

for (const bits of [8, 22]) {
  test(`cluster_bits ${bits} is refused`, T, async () => {
    using s = scratchDir();
    const p = img(s.dir, `cb${bits}.qcow2`, craft().field('cluster_bits', bits));
    await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'qcow2 header', field: 'cluster_bits', mentions: [`${bits}`] });
  });
}

for (const [len, why] of [
  [96, 'below 104'],
  [108, 'not a multiple of 8'],
  [0x20000, 'past cluster 0'],
] as const) {
  test(`header_length ${len} (${why}) is refused`, T, async () => {
    using s = scratchDir();
    const p = img(s.dir, `hl${len}.qcow2`, craft().field('header_length', len));
    await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'qcow2 header', field: 'header_length', mentions: [`${len}`] });
  });
}

test('unknown incompatible feature bit, without a feature name table', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'incompat.qcow2', craft({ incompatible: 1n << 5n }));
  const e = await fails(openImage(p), {
    kind: 'unsupported-feature',
    path: p,
    structure: 'qcow2 header',
    field: 'incompatible_features',
    mentions: ['bit 5'],
  });
  assert.doesNotMatch(e.message, /bit 5 \(/);
});

test('unknown incompatible feature bit, named by the feature name table', T, async () => {
  using s = scratchDir();
  const table = [
    ...QEMU_FEATURE_TABLE,
    { type: 0 as const, bit: 5, name: 'zoned device' },
    { type: 0 as const, bit: 40, name: 'far future' },
  ];
  const p = img(s.dir, 'incompat-named.qcow2', craft({ incompatible: (1n << 5n) | (1n << 40n), featureTable: table }));
  await fails(openImage(p), {
    kind: 'unsupported-feature',
    path: p,
    field: 'incompatible_features',
    mentions: ['bit 5 (zoned device)', 'bit 40 (far future)'],
  });
});

test('l1_size absurdly large fails fast without allocating', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'l1huge.qcow2', craft().field('l1_size', 0x7fffffff));
  await cheaply(() => fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'qcow2 header', field: 'l1_size' }), 1000);
  const p2 = img(s.dir, 'l1max.qcow2', craft().field('l1_size', 0xffffffff));
  await cheaply(() => fails(openImage(p2), { kind: 'invalid-image', path: p2, field: 'l1_size' }), 1000);
});

test('l1_table_offset beyond the end of the file', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'l1off.qcow2', craft().field('l1_table_offset', 0x1_0000_0000));
  await fails(openImage(p), {
    kind: 'invalid-image',
    path: p,
    structure: 'L1 table',
    mentions: ['4294967296', 'beyond the end of the file'],
  });
});

test('l1_table_offset not aligned to a cluster', T, async () => {
  using s = scratchDir();
  const c = craft();
  const p = img(s.dir, 'l1unaligned.qcow2', c.field('l1_table_offset', c.l1TableOffset + 8));
  await fails(openImage(p), { kind: 'corrupt-image', path: p, field: 'l1_table_offset', mentions: ['aligned'] });
});

test('l1_size too small for the virtual size', T, async () => {
  using s = scratchDir();
  const c = craft({ size: 4 * 2 ** 30 }); // needs 8 entries
  const p = img(s.dir, 'l1small.qcow2', c.field('l1_size', 3));
  await fails(openImage(p), { kind: 'corrupt-image', path: p, structure: 'qcow2 header', field: 'l1_size', mentions: ['needs 8'] });
});

test('refcount_table_clusters absurdly large', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'rtc.qcow2', craft().field('refcount_table_clusters', 0xffffffff));
  await cheaply(() => fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'qcow2 header', field: 'refcount_table_clusters' }));
});

test('refcount_order 7 is refused', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'ro7.qcow2', craft().field('refcount_order', 7));
  await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'qcow2 header', field: 'refcount_order', mentions: ['7'] });
});

test('size beyond what a number can hold exactly', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'size.qcow2', craft().field('size', 1n << 62n));
  await fails(openImage(p), { kind: 'corrupt-image', path: p, structure: 'qcow2 header', field: 'size' });
});

test('nb_snapshots absurdly large', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'nbsnap.qcow2', craft().field('nb_snapshots', 0x7fffffff).field('snapshots_offset', 0x10000));
  await cheaply(() => fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'qcow2 header', field: 'nb_snapshots' }));
});

test('nb_snapshots at the limit over a table of zeros: info fails cleanly, quickly', T, async () => {
  using s = scratchDir();
  const c = craft();
  const table = c.allocClusters(1);
  const p = img(s.dir, 'snapzeros.qcow2', c.field('nb_snapshots', 65536).field('snapshots_offset', table));
  await cheaply(() => fails(infoOf(p), { kind: 'invalid-image', path: p, structure: /^snapshot table entry \d+$/ }), 5000);
});

test('snapshot table offset beyond the end of the file: info fails cleanly', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'snapoff.qcow2', craft().field('nb_snapshots', 2).field('snapshots_offset', 0x4000_0000));
  // Reading does not need the snapshot table; info does.
  await readImage(p);
  await fails(infoOf(p), { kind: 'invalid-image', path: p, structure: 'snapshot table entry 0', mentions: ['beyond the end of the file'] });
  cliFails(['info', p], p, 'snapshot table');
  cliFails(['info', '--output', 'json', p], p, 'snapshot table');
});

test('snapshot entry with absurd extra_data_size', T, async () => {
  using s = scratchDir();
  const c = craft();
  const off = c.snapshots([{ id: '1', name: 'snap' }]);
  const p = img(s.dir, 'snapextra.qcow2', c.pokeU32(off + 36, 0x7fffffff));
  await fails(infoOf(p), { kind: 'corrupt-image', path: p, structure: 'snapshot table', field: 'extra_data_size' });
});

test('bitmap directory beyond the end of the file: info fails cleanly', T, async () => {
  using s = scratchDir();
  const ext = new Uint8Array(24);
  const dv = new DataView(ext.buffer);
  dv.setUint32(0, 1);
  dv.setBigUint64(8, 64n);
  dv.setBigUint64(16, 0x4000_0000n);
  const p = img(s.dir, 'bitmaps.qcow2', craft({ autoclear: 1n }).extension(EXT.BITMAPS, ext));
  await fails(infoOf(p), { kind: 'invalid-image', path: p, structure: 'bitmap directory', mentions: ['beyond the end of the file'] });
});

test('bitmaps extension claiming a huge directory', T, async () => {
  using s = scratchDir();
  const ext = new Uint8Array(24);
  const dv = new DataView(ext.buffer);
  dv.setUint32(0, 1);
  dv.setBigUint64(8, 1n << 40n);
  dv.setBigUint64(16, 0x30000n);
  const p = img(s.dir, 'bitmaps-huge.qcow2', craft({ autoclear: 1n }).extension(EXT.BITMAPS, ext));
  await cheaply(() => fails(infoOf(p), { kind: 'corrupt-image', path: p, structure: 'bitmap directory' }));
});

test('header extension running past cluster 0', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'ext.qcow2', craft().extension(0x12345678, new Uint8Array(16), { length: 0x10000 }));
  await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'qcow2 header extension', mentions: ['0x12345678', 'cluster 0'] });
});

test('backing file name outside cluster 0', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'bfo.qcow2', craft({ backingFile: 'base.qcow2' }).field('backing_file_offset', 0x1fff8));
  await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'qcow2 header', field: 'backing_file_offset' });
});

// ---------------------------------------------------------------- L1 / L2 entries

test('L1 entry with reserved bits set', T, async () => {
  using s = scratchDir();
  const c = craft().fill(0, 0x33);
  const p = img(s.dir, 'l1res.qcow2', c.setL1(0, c.getL1(0) | (1n << 56n)));
  const e = await fails(readImage(p), { kind: 'corrupt-image', path: p, structure: 'L1 entry 0', mentions: ['reserved bits'] });
  assert.equal(e.context.offset, c.l1TableOffset);
});

test('L1 entry pointing to an L2 table beyond the end of the file', T, async () => {
  using s = scratchDir();
  const c = craft({ size: 4 * 2 ** 30 });
  const p = img(s.dir, 'l2off.qcow2', c.setL1(2, (1n << 63n) | 0x10_0000_0000n));
  const e = await fails(readImage(p, 2 * (512 << 20)), {
    kind: 'corrupt-image',
    path: p,
    structure: 'L1 entry 2',
    mentions: ['0x1000000000', 'past the end of the file'],
  });
  assert.equal(e.context.offset, c.l1TableOffset + 16);
  // The rest of the image is still readable.
  await readImage(p, 0);
});

test('L1 entry pointing to an unaligned L2 table', T, async () => {
  using s = scratchDir();
  const c = craft().fill(0, 0x33);
  const p = img(s.dir, 'l2unaligned.qcow2', c.setL1(0, c.getL1(0) + 0x200n));
  await fails(readImage(p), { kind: 'corrupt-image', path: p, structure: 'L1 entry 0', mentions: ['unaligned'] });
});

test('L2 entry pointing past the end of the file', T, async () => {
  using s = scratchDir();
  const c = craft();
  const p = img(s.dir, 'l2eof.qcow2', c.setL2(c.clusterSize, (1n << 63n) | 0x40_0000_0000n));
  const e = await fails(readImage(p, c.clusterSize + 100), {
    kind: 'corrupt-image',
    path: p,
    structure: /^L2 table at 0x[0-9a-f]+ entry 1 /,
    mentions: ['0x4000000000', 'past the end of the file'],
  });
  assert.equal(e.context.offset, c.l2TableFor(c.clusterSize).entryOffset);
  cliFails(['read', p, '--offset', '64K', '--length', '512'], p, 'past the end of the file');
  cliFails(['read', p, '--hexdump'], p, 'L2 table');
});

test('L2 entry with reserved bits set', T, async () => {
  using s = scratchDir();
  const c = craft().fill(0, 0x44);
  const { entryOffset } = c.l2TableFor(0);
  const host = c.allocClusters(1);
  const p = img(s.dir, 'l2res.qcow2', c.setL2(0, (1n << 63n) | (1n << 57n) | BigInt(host)));
  const e = await fails(readImage(p), { kind: 'corrupt-image', path: p, structure: /L2 table .* entry 0/, mentions: ['reserved bits'] });
  assert.equal(e.context.offset, entryOffset);
  // Bits 1..8 are reserved too.
  const p2 = img(s.dir, 'l2res2.qcow2', c.setL2(0, (1n << 63n) | 0x10n | BigInt(host)));
  await fails(readImage(p2), { kind: 'corrupt-image', path: p2, mentions: ['reserved bits'] });
});

test('L2 entry with an unaligned host offset', T, async () => {
  using s = scratchDir();
  const c = craft();
  const host = c.allocClusters(2);
  const p = img(s.dir, 'l2unal.qcow2', c.setL2(0, (1n << 63n) | BigInt(host + 0x200)));
  await fails(readImage(p), {
    kind: 'corrupt-image',
    path: p,
    structure: /L2 table/,
    mentions: ['unaligned', `0x${(host + 0x200).toString(16)}`],
  });
});

test('block status reports the corrupt entry too, not only reads', T, async () => {
  using s = scratchDir();
  const c = craft();
  const p = img(s.dir, 'bs.qcow2', c.setL2(0, (1n << 63n) | 0x40_0000_0000n));
  await using dev = await openImage(p);
  await fails(dev.blockStatus(0, dev.size), { kind: 'corrupt-image', path: p, structure: /L2 table/ });
  cliFails(['map', p], p, 'L2 table');
});

// ---------------------------------------------------------------- compressed clusters

test('compressed cluster that is not zlib data', T, async () => {
  using s = scratchDir();
  const c = craft();
  const host = c.compressed(0, garbage(3000));
  const p = img(s.dir, 'zlib-garbage.qcow2', c);
  const e = await fails(readImage(p), {
    kind: 'corrupt-image',
    path: p,
    structure: 'compressed cluster',
    mentions: ['does not decompress'],
  });
  assert.equal(e.context.offset, host);
});

test('compressed cluster whose zlib stream is cut short', T, async () => {
  using s = scratchDir();
  const c = craft();
  const data = new Uint8Array(c.clusterSize);
  for (let i = 0; i < data.length; i++) data[i] = (i * 31) % 251;
  const z = deflateCluster(data);
  c.compressed(0, z.subarray(0, Math.floor(z.length / 2)));
  const p = img(s.dir, 'zlib-short.qcow2', c);
  await fails(readImage(p), { kind: 'corrupt-image', path: p, structure: 'compressed cluster' });
});

test('compressed cluster that inflates to more than a cluster', T, async () => {
  using s = scratchDir();
  const c = craft({ clusterBits: 12 });
  const z = deflateCluster(new Uint8Array(1 << 20)); // 1 MiB of zeros into a 4 KiB cluster
  c.compressed(0, z);
  const p = img(s.dir, 'zlib-big.qcow2', c);
  await cheaply(() => fails(readImage(p), { kind: 'corrupt-image', path: p, structure: 'compressed cluster' }));
});

test('compressed cluster on a zstd image that is garbage', T, async () => {
  using s = scratchDir();
  const c = craft({ compressionType: 1 });
  const host = c.compressed(0, garbage(3000));
  const p = img(s.dir, 'zstd-garbage.qcow2', c);
  const e = await fails(readImage(p), {
    kind: 'corrupt-image',
    path: p,
    structure: 'compressed cluster',
    mentions: ['does not decompress'],
  });
  assert.equal(e.context.offset, host);
});

test('compressed cluster on a zstd image: a real frame header over a garbage block', T, async () => {
  using s = scratchDir();
  const c = craft({ compressionType: 1 });
  const data = new Uint8Array(c.clusterSize);
  for (let i = 0; i < data.length; i++) data[i] = (i * 31) % 251;
  // Single-segment frame of 64 KiB content, then one compressed last block of 64 bytes whose
  // literals section claims a "treeless" Huffman table that no earlier block defined.
  const bodyLen = 64;
  const bh = 1 | (2 << 1) | (bodyLen << 3);
  const body = garbage(bodyLen);
  body[0] = 0xff;
  const broken = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0x60, 0x00, 0xff, bh & 0xff, (bh >> 8) & 0xff, bh >> 16, ...body]);
  c.compressed(0, broken);
  c.compressed(c.clusterSize, zstdCompress(data, 3));
  const p = img(s.dir, 'zstd-body.qcow2', c);
  await fails(readImage(p), { kind: 'corrupt-image', path: p, structure: 'compressed cluster', mentions: ['does not decompress'] });
  // A failed decode must not poison the decoder for the next cluster.
  assert.deepEqual(await readImage(p, c.clusterSize, c.clusterSize), data);
});

test('compressed cluster on a zstd image: a valid frame of the wrong content size', T, async () => {
  using s = scratchDir();
  const c = craft({ compressionType: 1 });
  c.compressed(0, zstdCompress(new Uint8Array(1000).fill(3), 3));
  const p = img(s.dir, 'zstd-small.qcow2', c);
  await fails(readImage(p), { kind: 'corrupt-image', path: p, structure: 'compressed cluster', mentions: ['expected 65536'] });
});

test('zstd frame claiming a content size of 4 GiB is refused without allocating', T, async () => {
  using s = scratchDir();
  const c = craft({ compressionType: 1 });
  // Magic, FHD = single segment + 8-byte content size, FCS = 4 GiB, one raw last block of 4 bytes.
  const frame = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0xe0, 0, 0, 0, 0, 1, 0, 0, 0, 0x21, 0, 0, 1, 2, 3, 4]);
  c.compressed(0, frame);
  // Same with a 4-byte content size of 0xffffffff.
  const frame4 = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0xa0, 0xff, 0xff, 0xff, 0xff, 0x21, 0, 0, 1, 2, 3, 4]);
  c.compressed(c.clusterSize, frame4);
  const p = img(s.dir, 'zstd-4g.qcow2', c);
  await cheaply(async () => {
    await fails(readImage(p), { kind: 'corrupt-image', path: p, structure: 'compressed cluster', mentions: ['4294967296'] });
    await fails(readImage(p, c.clusterSize), { kind: 'corrupt-image', path: p, structure: 'compressed cluster', mentions: ['4294967295'] });
  });
});

test('zstd frame without a content size and a window too large', T, async () => {
  using s = scratchDir();
  const c = craft({ compressionType: 1 });
  // FHD 0: no content size, window descriptor present: exponent 31 => 2^41-byte window.
  const frame = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xf8, 0x21, 0, 0, 1, 2, 3, 4]);
  c.compressed(0, frame);
  const data = new Uint8Array(c.clusterSize).fill(7);
  c.compressed(c.clusterSize, zstdCompress(data, 1));
  const p = img(s.dir, 'zstd-window.qcow2', c);
  await cheaply(() => fails(readImage(p), { kind: 'corrupt-image', path: p, structure: 'compressed cluster', mentions: ['window'] }));
  assert.deepEqual(await readImage(p, c.clusterSize, c.clusterSize), data);
});

// ---------------------------------------------------------------- chains and external files

test('backing chain that loops: a -> b -> a', T, async () => {
  using s = scratchDir();
  const a = img(s.dir, 'a.qcow2', craft({ backingFile: 'b.qcow2' }));
  const b = img(s.dir, 'b.qcow2', craft({ backingFile: 'a.qcow2' }));
  await cheaply(() => fails(openImage(a), { kind: 'invalid-image', path: b, structure: 'backing chain', mentions: ['loops', 'a.qcow2'] }));
  cliFails(['info', '--backing-chain', a], b, 'loops');
});

test('backing chain that loops: a -> a (also through a symlink)', T, async () => {
  using s = scratchDir();
  const a = img(s.dir, 'self.qcow2', craft({ backingFile: 'self.qcow2' }));
  await fails(openImage(a), { kind: 'invalid-image', path: a, structure: 'backing chain', mentions: ['loops'] });
  const b = img(s.dir, 'via-link.qcow2', craft({ backingFile: 'link.qcow2' }));
  symlinkSync(b, join(s.dir, 'link.qcow2'));
  await fails(openImage(b), { kind: 'invalid-image', path: b, structure: 'backing chain', mentions: ['loops'] });
});

test(`backing chain deeper than MAX_CHAIN_DEPTH (${MAX_CHAIN_DEPTH}) is refused; exactly the limit opens`, { timeout: 30000 }, async () => {
  using s = scratchDir();
  const name = (i: number): string => `chain${i}.qcow2`;
  const make = (top: number, bottom: number): void => {
    for (let i = top; i <= bottom; i++) {
      const c = craft({ clusterBits: 9, size: 64 << 10, ...(i < bottom ? { backingFile: name(i + 1) } : {}) });
      if (i === bottom) c.fill(0, 0x77, 512);
      c.writeTo(join(s.dir, name(i)));
    }
  };
  // chain1 .. chainN: N images in all.
  make(1, MAX_CHAIN_DEPTH);
  {
    await using dev = await openImage(join(s.dir, name(1)));
    const buf = new Uint8Array(512);
    await dev.pread(buf, 0);
    assert.ok(
      buf.every((x) => x === 0x77),
      'data from the bottom of the chain',
    );
    assert.equal((await imageInfoChain(dev)).length, MAX_CHAIN_DEPTH);
  }
  const c0 = craft({ clusterBits: 9, size: 64 << 10, backingFile: name(1) });
  c0.writeTo(join(s.dir, name(0)));
  const top = join(s.dir, name(0));
  const last = join(s.dir, name(MAX_CHAIN_DEPTH - 1));
  await fails(openImage(top), {
    kind: 'invalid-image',
    path: last,
    structure: 'backing chain',
    mentions: [`deeper than ${MAX_CHAIN_DEPTH}`],
  });
});

test('missing backing file: the message names it', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'orphan.qcow2', craft({ backingFile: 'gone-base.qcow2' }));
  await fails(openImage(p), {
    kind: 'not-found',
    path: p,
    structure: 'backing file',
    mentions: ["'gone-base.qcow2'", join(s.dir, 'gone-base.qcow2')],
  });
  cliFails(['info', p], p, 'gone-base.qcow2');
  // Deeper in the chain: the image that names the missing file is blamed.
  const top = img(s.dir, 'top.qcow2', craft({ backingFile: 'orphan.qcow2' }));
  await fails(openImage(top), { kind: 'not-found', path: p, mentions: ['gone-base.qcow2'] });
  // Opened without its backing file it works.
  await using dev = await openImage(p, { backing: null });
  assert.equal(dev.size, 1 << 20);
});

test('external data file missing: the message names it', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'extdata.qcow2', craft({ dataFile: 'extdata.raw' }));
  await fails(openImage(p), { kind: 'not-found', path: p, structure: 'external data file', mentions: ["'extdata.raw'"] });
  cliFails(['read', p, '--length', '512', '--hexdump'], p, 'extdata.raw');
  // With the file present it opens and reads through it.
  writeFileSync(join(s.dir, 'extdata.raw'), new Uint8Array(1 << 20).fill(9));
  const c = craft({ dataFile: 'extdata.raw' });
  c.setL2(0, 1n << 63n); // allocated at host offset 0 (guest offset == host offset)
  c.writeTo(p);
  const buf = await readImage(p, 0, 512);
  assert.ok(buf.every((x) => x === 9));
});

test('external data file bit set but no name', T, async () => {
  using s = scratchDir();
  const p = img(s.dir, 'noname.qcow2', craft({ incompatible: 4n }));
  await fails(openImage(p), { kind: 'invalid-image', path: p, mentions: ['external data file'] });
});

// ---------------------------------------------------------------- encryption

test('encrypted image (crypt_method 1): open and info work, reading data is unsupported', T, async () => {
  using s = scratchDir();
  const c = craft({ cryptMethod: 1 }).fill(0, 0x99);
  const p = img(s.dir, 'aes.qcow2', c);
  const info = (await infoOf(p)) as Record<string, unknown>;
  assert.equal(info['encrypted'], true);
  assert.equal(rblock(['info', p]).status, 0);
  await fails(readImage(p), {
    kind: 'unsupported-feature',
    path: p,
    structure: 'qcow2 header',
    field: 'crypt_method',
    mentions: ['encrypted'],
  });
  cliFails(['read', p, '--length', '4K', '--hexdump'], p, 'encrypted');
});
