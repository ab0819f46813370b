/**
 * VMDK reading from hand-crafted images (test/fixtures/vmdk-craft.ts): the
 * well-formed layouts read back what was written, and each broken image
 * breaks one thing and must fail with the right BlockError kind and a
 * one-line message naming the file and the structure, quickly and without
 * allocating what a hostile header claims.
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BlockError, openImage, type ErrorKind } from '../../src/index.js';
import { layerOf } from '../../src/formats/chain.js';
import { imageInfo } from '../../src/formats/info.js';
import { probeFormat } from '../../src/formats/registry.js';
import { parseDescriptor, serializeDescriptor } from '../../src/formats/vmdk/descriptor.js';
import { VmdkLayer } from '../../src/formats/vmdk/image.js';
import { inspectVmdk } from '../../src/formats/vmdk/inspect.js';
import { descriptorFor, pattern, setField, VmdkCraft, SECTOR } from '../fixtures/vmdk-craft.js';
import { rblock, scratchDir } from '../helpers/tools.js';

const T = { timeout: 10000 };
const G = 65536;

interface Want {
  kind: ErrorKind;
  /** The file the message and context must name. */
  path: string;
  structure?: string;
  field?: string;
  mentions?: (string | RegExp)[];
}

async function fails(op: () => Promise<unknown>, want: Want): Promise<BlockError> {
  let err: unknown;
  try {
    await op();
  } catch (e) {
    err = e;
  }
  assert.ok(err !== undefined, `expected a ${want.kind} error, but the operation succeeded`);
  if (!(err instanceof BlockError)) throw new assert.AssertionError({ message: `expected a BlockError, got: ${String(err)}` });
  assert.equal(err.kind, want.kind, `kind of: ${err.message}`);
  assert.ok(!err.message.includes('\n'), `message is one line: ${JSON.stringify(err.message)}`);
  assert.ok(err.message.includes(want.path), `message names ${want.path}: ${err.message}`);
  assert.equal(err.context.path, want.path, `context.path of: ${err.message}`);
  if (want.structure !== undefined) {
    assert.equal(err.context.structure, want.structure, `context.structure of: ${err.message}`);
    assert.ok(err.message.includes(want.structure), `message names ${want.structure}: ${err.message}`);
  }
  if (want.field !== undefined) assert.equal(err.context.field, want.field, `context.field of: ${err.message}`);
  for (const m of want.mentions ?? []) {
    if (typeof m === 'string') assert.ok(err.message.includes(m), `message mentions '${m}': ${err.message}`);
    else assert.match(err.message, m);
  }
  return err;
}

async function readAll(path: string, opts: { format?: string } = {}): Promise<Buffer> {
  await using dev = await openImage(path, opts);
  const b = Buffer.alloc(dev.size);
  await dev.pread(b, 0);
  return b;
}

function save(dir: string, name: string, bytes: Uint8Array | string): string {
  const p = join(dir, name);
  writeFileSync(p, bytes);
  return p;
}

/** A 4 MiB monolithicSparse image with data in grains 0, 3 and 40 (past the first of two GTs at 64 entries). */
function sample(o: ConstructorParameters<typeof VmdkCraft>[0] = {}): VmdkCraft {
  return new VmdkCraft({ gtes: 32, ...o })
    .write(0, pattern(G, 1))
    .write(3 * G, pattern(G, 2))
    .write(40 * G, pattern(G + 100, 3));
}

// ---- well-formed crafted images read back ----

for (const layout of ['sparse', 'qemu-stream', 'vmware-stream'] as const) {
  test(`crafted ${layout} reads back what was written`, T, async () => {
    using s = scratchDir();
    const c = sample({ layout, zeroedGrain: layout === 'sparse' });
    if (layout === 'sparse') c.zeroGrain(5);
    const p = save(s.dir, 'a.vmdk', c.build().bytes);
    assert.deepEqual(await readAll(p), c.expected());
    await using dev = await openImage(p);
    const info = await imageInfo(dev);
    assert.equal(info.format, 'vmdk');
    assert.equal(info['virtual-size'], 4 << 20);
    assert.equal(info['cluster-size'], G);
    const data = info['format-specific']!.data as { 'create-type': string; cid: number };
    assert.equal(data['create-type'], layout === 'sparse' ? 'monolithicSparse' : 'streamOptimized');
    assert.equal(data.cid, 0x12345678);
    // The map: data (or compressed) where grains were written, zero for the zero grain, else unallocated.
    const ext = await dev.blockStatus(0, dev.size);
    const at = (off: number) => ext.find((e) => e.offset <= off && off < e.offset + e.length)!;
    assert.equal(at(0).hole, false);
    assert.equal(at(0).compressed ?? false, layout !== 'sparse');
    assert.equal(at(G).allocated, false);
    if (layout === 'sparse') assert.deepEqual([at(5 * G).zero, at(5 * G).hole, at(5 * G).allocated], [true, true, true]);
  });
}

test('crafted vmware-stream: the footer gives the grain directory; inspect lists the markers', T, async () => {
  using s = scratchDir();
  const c = sample({ layout: 'vmware-stream' });
  const b = c.build();
  assert.notEqual(b.footerOffset, null);
  const p = save(s.dir, 'stream.vmdk', b.bytes);
  await using dev = await openImage(p);
  const r = await inspectVmdk(layerOf(dev) as VmdkLayer, { gt: 1 });
  const sp = r.extents[0]!.sparse!;
  assert.equal(sp.footer!.offset, b.footerOffset);
  assert.equal(sp.grainDirectory.offset, b.gdOffset);
  const kinds = sp.streamMarkers!.list.map((m) => m.kind);
  assert.deepEqual(kinds, ['grain', 'grain', 'grain', 'grain', 'grain table', 'grain table', 'grain directory', 'footer', 'end of stream']);
  assert.deepEqual(
    r.grainTable!.entries.map((e) => [e.index, e.kind, e.marker?.lba]),
    [
      [8, 'compressed', 40 * 128],
      [9, 'compressed', 41 * 128],
    ],
  );
});

test('a damaged primary grain directory falls back to the redundant one', T, async () => {
  using s = scratchDir();
  const c = sample();
  const b = c.build();
  // Point the primary GD's first entry past the end of the file.
  b.bytes.writeUInt32LE(0x7fff_0000, b.gdOffset);
  const p = save(s.dir, 'rgd.vmdk', b.bytes);
  assert.deepEqual(await readAll(p), c.expected());
  await using dev = await openImage(p);
  const gd = (await inspectVmdk(layerOf(dev) as VmdkLayer)).extents[0]!.sparse!.grainDirectory;
  assert.equal(gd.using, 'redundant');
  assert.equal(gd.offset, b.rgdOffset);
  assert.match(gd.damage ?? '', /primary grain directory entry 0/);
});

test('descriptor: CRLF, comments, quoted values, access and extent types; the serializer keeps ddb keys', () => {
  const text = [
    '# Disk DescriptorFile',
    'version=1',
    'encoding="UTF-8"',
    'CID=0000abcd',
    'parentCID=ffffffff',
    'isNativeSnapshot="no"',
    'createType="twoGbMaxExtentFlat"',
    '',
    '# Extent description',
    'RW 4192256 FLAT "d-f001.vmdk" 0',
    'RDONLY 2048 FLAT "sub dir/d-f002.vmdk" 16',
    'NOACCESS 100 SPARSE "d-s003.vmdk"',
    'RW 64 ZERO',
    '',
    '# The Disk Data Base',
    '#DDB',
    '',
    'ddb.adapterType = "lsilogic"',
    'ddb.uuid = "60 00 C2 9a"',
    'ddb.longContentID = "0123456789abcdef0123456789abcdef"',
  ].join('\r\n');
  const d = parseDescriptor(text, 'd.vmdk');
  assert.equal(d.lineEnding, '\r\n');
  assert.equal(d.cid, 0xabcd);
  assert.equal(d.parentCid, 0xffffffff);
  assert.equal(d.createType, 'twoGbMaxExtentFlat');
  assert.deepEqual(
    d.extents.map((e) => [e.access, e.sectors, e.type, e.file, e.offset]),
    [
      ['RW', 4192256, 'FLAT', 'd-f001.vmdk', 0],
      ['RDONLY', 2048, 'FLAT', 'sub dir/d-f002.vmdk', 16],
      ['NOACCESS', 100, 'SPARSE', 'd-s003.vmdk', undefined],
      ['RW', 64, 'ZERO', null, undefined],
    ],
  );
  const again = parseDescriptor(serializeDescriptor(d), 'd.vmdk');
  assert.deepEqual(again.ddb, d.ddb);
  assert.deepEqual(
    again.extents.map((e) => ({ ...e, line: 0 })),
    d.extents.map((e) => ({ ...e, line: 0 })),
  );
  assert.deepEqual(
    again.header.map((h) => h.key),
    ['version', 'CID', 'parentCID', 'createType', 'encoding', 'isNativeSnapshot'],
  );
});

test('descriptor files: FLAT, ZERO and RDONLY extents laid end to end; probed as vmdk, not raw', T, async () => {
  using s = scratchDir();
  const flat = Buffer.from(pattern(3 * SECTOR, 9));
  save(s.dir, 'f1.bin', Buffer.concat([Buffer.alloc(2 * SECTOR, 0xee), flat]));
  const p = save(
    s.dir,
    'd.vmdk',
    descriptorFor({ createType: 'custom', extents: ['RW 3 FLAT "f1.bin" 2', 'RW 2 ZERO', 'RDONLY 1 FLAT "f1.bin" 2'] }),
  );
  const want = Buffer.concat([flat, Buffer.alloc(2 * SECTOR), flat.subarray(0, SECTOR)]);
  assert.deepEqual(await readAll(p), want);
  await using dev = await openImage(p);
  assert.equal(dev.format, 'vmdk');
  const head = Buffer.from(descriptorFor({ createType: 'monolithicFlat', extents: ['RW 3 FLAT "f1.bin" 0'] }));
  assert.equal(probeFormat({ head, tail: head, size: head.length, path: 'x.vmdk' }).name, 'vmdk');
});

test('NOACCESS extents: the read fails clearly; the rest reads', T, async () => {
  using s = scratchDir();
  save(s.dir, 'f.bin', Buffer.alloc(SECTOR, 7));
  const p = save(s.dir, 'n.vmdk', descriptorFor({ createType: 'custom', extents: ['RW 1 FLAT "f.bin" 0', 'NOACCESS 1 FLAT "f.bin" 0'] }));
  await using dev = await openImage(p);
  const b = new Uint8Array(SECTOR);
  await dev.pread(b, 0);
  assert.equal(b[0], 7);
  await fails(() => dev.pread(b, SECTOR), { kind: 'unsupported-feature', path: p, structure: 'VMDK extent', mentions: ['NOACCESS'] });
});

// ---- broken images ----

test('bad magic: -f vmdk on a file that is neither KDMV nor a descriptor', T, async () => {
  using s = scratchDir();
  const b = sample().build().bytes;
  b.write('KDMX', 0, 'latin1');
  const p = save(s.dir, 'magic.vmdk', b);
  await fails(() => openImage(p, { format: 'vmdk' }), { kind: 'invalid-image', path: p, mentions: ['not a VMDK image'] });
});

test('bad version', T, async () => {
  using s = scratchDir();
  const b = sample().build().bytes;
  setField(b, 'version', 4);
  const p = save(s.dir, 'v4.vmdk', b);
  await fails(() => openImage(p), {
    kind: 'unsupported-feature',
    path: p,
    structure: 'sparse header',
    field: 'version',
    mentions: ['version 4'],
  });
});

for (const [name, grain] of [
  ['not a power of two', 100n],
  ['zero', 0n],
  ['absurd (2^40 sectors)', 1n << 40n],
] as const) {
  test(`grain size ${name}`, T, async () => {
    using s = scratchDir();
    const b = sample().build().bytes;
    setField(b, 'grainSize', grain);
    const p = save(s.dir, 'grain.vmdk', b);
    await fails(() => openImage(p), {
      kind: 'corrupt-image',
      path: p,
      structure: 'sparse header',
      field: 'grainSize',
      mentions: [String(grain)],
    });
  });
}

test('numGTEsPerGT 0 or above 512', T, async () => {
  using s = scratchDir();
  for (const v of [0, 513, 0xffffffff]) {
    const b = sample().build().bytes;
    setField(b, 'numGTEsPerGT', v);
    const p = save(s.dir, `gtes${v}.vmdk`, b);
    await fails(() => openImage(p), { kind: 'corrupt-image', path: p, field: 'numGTEsPerGT' });
  }
});

test('huge capacity: the grain directory size is bounded before anything is allocated (afl9-like)', T, async () => {
  using s = scratchDir();
  const b = sample().build().bytes;
  setField(b, 'capacity', 0x1efffffc1b000001n);
  setField(b, 'numGTEsPerGT', 506);
  const p = save(s.dir, 'huge.vmdk', b);
  await fails(() => openImage(p), { kind: 'corrupt-image', path: p, field: 'capacity', mentions: ["'L1 size too big'"] });
  // Through the CLI: exit 1, one line, no stack trace.
  const r = rblock(['info', p]);
  assert.equal(r.status, 1);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, /L1 size too big/);
});

test('capacity large but within the GD bound: the GD must still lie inside the file', T, async () => {
  using s = scratchDir();
  const b = sample({ redundant: false }).build().bytes;
  setField(b, 'capacity', 1n << 40n); // 512 TiB: 2^40 / (32 * 128) = 2^28 entries: above the bound
  const p = save(s.dir, 'big.vmdk', b);
  await fails(() => openImage(p), { kind: 'corrupt-image', path: p, field: 'capacity' });
  setField(b, 'capacity', 1n << 32n); // 2 TiB: 2^20 entries (4 MiB of GD), far past this small file
  const p2 = save(s.dir, 'big2.vmdk', b);
  await fails(() => openImage(p2), {
    kind: 'corrupt-image',
    path: p2,
    structure: 'grain directory',
    mentions: ['beyond the end of the file'],
  });
});

test('GD beyond the file (no redundant copy)', T, async () => {
  using s = scratchDir();
  const b = sample({ redundant: false }).build().bytes;
  setField(b, 'gdOffset', 0xffff_0000n);
  const p = save(s.dir, 'gd.vmdk', b);
  await fails(() => openImage(p), {
    kind: 'corrupt-image',
    path: p,
    structure: 'grain directory',
    mentions: ['beyond the end of the file'],
  });
});

test('GD beyond the file and the redundant GD damaged too', T, async () => {
  using s = scratchDir();
  const built = sample().build();
  setField(built.bytes, 'gdOffset', 0xffff_0000n);
  built.bytes.writeUInt32LE(0x7fff_0000, built.rgdOffset);
  const p = save(s.dir, 'gd2.vmdk', built.bytes);
  await fails(() => openImage(p), {
    kind: 'corrupt-image',
    path: p,
    structure: 'grain directory',
    mentions: ['redundant grain directory entry 0'],
  });
});

test('GTE beyond the file', T, async () => {
  using s = scratchDir();
  const built = sample({ redundant: false }).build();
  built.bytes.writeUInt32LE(0x00ff_0000, built.gtOffsets.get(0)! + 3 * 4);
  const p = save(s.dir, 'gte.vmdk', built.bytes);
  await using dev = await openImage(p);
  await fails(() => dev.pread(new Uint8Array(G), 3 * G), {
    kind: 'corrupt-image',
    path: p,
    structure: 'grain table',
    mentions: ['past the end of the file'],
  });
  await fails(() => dev.blockStatus(0, dev.size), { kind: 'corrupt-image', path: p, structure: 'grain table' });
});

test('compressed grain that does not inflate', T, async () => {
  using s = scratchDir();
  const built = sample({ layout: 'qemu-stream' }).build();
  const at = built.grainOffsets.get(3)!;
  built.bytes.fill(0x5a, at + 12, at + 40); // garble the zlib stream behind the grain marker
  const p = save(s.dir, 'inflate.vmdk', built.bytes);
  await using dev = await openImage(p);
  const b = new Uint8Array(G);
  await dev.pread(b, 0); // grain 0 is fine
  await fails(() => dev.pread(b, 3 * G), { kind: 'corrupt-image', path: p, structure: 'compressed grain', mentions: ['does not inflate'] });
});

test('grain marker claiming more than two grains', T, async () => {
  using s = scratchDir();
  const built = sample({ layout: 'qemu-stream' }).build();
  built.bytes.writeUInt32LE(0x7fff_ffff, built.grainOffsets.get(0)! + 8);
  const p = save(s.dir, 'marker.vmdk', built.bytes);
  await using dev = await openImage(p);
  await fails(() => dev.pread(new Uint8Array(512), 0), {
    kind: 'corrupt-image',
    path: p,
    structure: 'compressed grain',
    mentions: ['compressed bytes'],
  });
});

test('GD_AT_END without a valid footer', T, async () => {
  using s = scratchDir();
  const built = sample({ layout: 'vmware-stream' }).build();
  const cut = built.bytes.subarray(0, built.bytes.length - SECTOR); // drop the end-of-stream marker
  const p = save(s.dir, 'footer.vmdk', cut);
  await fails(() => openImage(p), { kind: 'corrupt-image', path: p, structure: 'streamOptimized footer' });
});

test('descriptor naming a missing extent', T, async () => {
  using s = scratchDir();
  const p = save(s.dir, 'm.vmdk', descriptorFor({ createType: 'monolithicFlat', extents: ['RW 2048 FLAT "m-flat.vmdk" 0'] }));
  await fails(() => openImage(p), { kind: 'not-found', path: p, structure: 'extent file', mentions: ['m-flat.vmdk', 'line 8'] });
});

test('malformed descriptors: bad extent line, bad CID, no createType, too large', T, async () => {
  using s = scratchDir();
  const cases: [string, string, RegExp][] = [
    ['ext.vmdk', descriptorFor({ createType: 'monolithicFlat', extents: ['RW lots FLAT "x" 0'] }), /extent size 'lots'/],
    ['type.vmdk', descriptorFor({ createType: 'monolithicFlat', extents: ['RW 8 WEIRD "x" 0'] }), /unknown extent type 'WEIRD'/],
    ['cid.vmdk', descriptorFor({ createType: 'monolithicFlat', extents: ['RW 8 FLAT "x" 0'] }).replace(/CID=\w+/, 'CID=xyz'), /CID 'xyz'/],
    ['noct.vmdk', descriptorFor({ createType: 'monolithicFlat', extents: ['RW 8 ZERO'] }).replace(/createType=.*\n/, ''), /createType/],
    ['big.vmdk', '# Disk DescriptorFile\n' + '#'.repeat(2 << 20) + '\n', /too large/],
  ];
  for (const [name, text, re] of cases) {
    const p = save(s.dir, name, text);
    await fails(() => openImage(p), { kind: 'invalid-image', path: p, mentions: [re] });
  }
});

test('parentCID mismatch: the delta disk is refused', T, async () => {
  using s = scratchDir();
  save(s.dir, 'base.vmdk', sample({ cid: 0x11111111, fileName: 'base.vmdk' }).build().bytes);
  const child = new VmdkCraft({ gtes: 32, parentCid: 0x22222222, parentFileNameHint: 'base.vmdk', fileName: 'child.vmdk' }).write(
    G,
    pattern(G, 5),
  );
  const p = save(s.dir, 'child.vmdk', child.build().bytes);
  await fails(() => openImage(p), { kind: 'corrupt-image', path: p, field: 'parentCID', mentions: ['22222222', '11111111'] });
  // With the right parentCID the chain reads through.
  const good = new VmdkCraft({ gtes: 32, parentCid: 0x11111111, parentFileNameHint: 'base.vmdk', fileName: 'child.vmdk' }).write(
    G,
    pattern(G, 5),
  );
  const p2 = save(s.dir, 'child2.vmdk', good.build().bytes);
  const want = sample().expected();
  want.set(pattern(G, 5), G);
  assert.deepEqual(await readAll(p2), want);
});

test('ESX COWD and seSparse extents are refused as unsupported', T, async () => {
  using s = scratchDir();
  const cowd = Buffer.alloc(2048);
  cowd.write('COWD', 0, 'latin1');
  const p = save(s.dir, 'cowd.vmdk', cowd);
  await fails(() => openImage(p), { kind: 'unsupported-feature', path: p, mentions: ['COWD'] });
  const d = save(s.dir, 'se.vmdk', descriptorFor({ createType: 'seSparse', extents: ['RW 8192 SESPARSE "se-sesparse.vmdk"'] }));
  await fails(() => openImage(d), { kind: 'unsupported-feature', path: d, mentions: ['seSparse'] });
  const v = save(s.dir, 'vs.vmdk', descriptorFor({ createType: 'vmfsSparse', extents: ['RW 8192 VMFSSPARSE "vs-delta.vmdk"'] }));
  await fails(() => openImage(v), { kind: 'unsupported-feature', path: v, mentions: ['vmfsSparse'] });
});

test('read-write open: sparse disks open, a compressed stream is refused', T, async () => {
  using s = scratchDir();
  const p = save(s.dir, 'rw.vmdk', sample().build().bytes);
  const dev = await openImage(p, { readOnly: false });
  await dev.close();
  for (const layout of ['qemu-stream', 'vmware-stream'] as const) {
    const q = save(s.dir, `${layout}.vmdk`, sample({ layout }).build().bytes);
    await fails(() => openImage(q, { readOnly: false }), { kind: 'not-supported', path: q, mentions: ['streamOptimized'] });
  }
});

test('a split-disk extent opened on its own is refused with a hint', T, async () => {
  using s = scratchDir();
  const b = sample({ descriptor: '' }).build().bytes;
  const p = save(s.dir, 'x-s001.vmdk', b);
  await fails(() => openImage(p), { kind: 'invalid-image', path: p, structure: 'embedded descriptor', mentions: ['descriptor file'] });
});
