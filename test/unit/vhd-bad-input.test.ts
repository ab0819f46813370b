/**
 * VHD reading from hand-crafted images (test/fixtures/vhd-craft.ts): broken
 * and hostile images must fail with the right BlockError kind and a one-line
 * message naming the image and the structure, quickly and without a big
 * allocation; odd-but-valid ones (other block sizes, partial sector bitmaps,
 * a damaged trailing footer, a 511-byte footer) must read right.
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BlockError, openImage, type ErrorKind, type OpenOptions } from '../../src/index.js';
import { imageInfo } from '../../src/formats/info.js';
import { mapImage, type MapEntry } from '../../src/copy/map.js';
import { VhdCraft, uuidOf } from '../fixtures/vhd-craft.js';
import { rblock, scratchDir } from '../helpers/tools.js';

const T = { timeout: 10000 };
const KiB = 1024;
const MiB = 1024 * KiB;

interface Want {
  kind: ErrorKind;
  path: string;
  structure?: string;
  field?: string;
  mentions?: (string | RegExp)[];
}

async function fails(op: Promise<unknown>, want: Want): Promise<BlockError> {
  let err: unknown;
  try {
    await op;
  } catch (e) {
    err = e;
  }
  assert.ok(err !== undefined, `expected a ${want.kind} error, but the operation succeeded`);
  if (!(err instanceof BlockError)) throw new assert.AssertionError({ message: `expected a BlockError, got: ${String(err)}` });
  assert.equal(err.kind, want.kind, `kind of: ${err.message}`);
  assert.ok(!err.message.includes('\n'), `one line: ${err.message}`);
  assert.ok(err.message.includes(want.path), `names ${want.path}: ${err.message}`);
  assert.equal(err.context.path, want.path);
  if (want.structure !== undefined) {
    assert.equal(err.context.structure, want.structure, `structure of: ${err.message}`);
    assert.ok(err.message.includes(want.structure), `message names ${want.structure}: ${err.message}`);
  }
  if (want.field !== undefined) {
    assert.equal(err.context.field, want.field, `field of: ${err.message}`);
    assert.ok(err.message.includes(want.field), `message names ${want.field}: ${err.message}`);
  }
  for (const m of want.mentions ?? []) {
    if (typeof m === 'string') assert.ok(err.message.includes(m), `mentions '${m}': ${err.message}`);
    else assert.match(err.message, m);
  }
  return err;
}

async function readAll(path: string, opts: OpenOptions = {}): Promise<Uint8Array> {
  await using dev = await openImage(path, opts);
  const buf = new Uint8Array(dev.size);
  await dev.pread(buf, 0);
  return buf;
}

async function mapOf(path: string, opts: OpenOptions = {}): Promise<MapEntry[]> {
  await using dev = await openImage(path, opts);
  const out: MapEntry[] = [];
  for await (const m of mapImage(dev)) out.push(m);
  return out;
}

/** Deterministic bytes that are never all zero. */
function pattern(length: number, seed: number): Uint8Array {
  const b = new Uint8Array(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = (x & 0xff) | 1;
  }
  return b;
}

function sameBytes(a: Uint8Array, b: Uint8Array, what: string): void {
  assert.equal(a.length, b.length, `${what}: length`);
  const i = a.findIndex((v, k) => v !== b[k]);
  assert.equal(i, -1, `${what}: first difference at byte ${i}`);
}

// ------------------------------------------------------------ good images

for (const blockSize of [512, 4 * KiB, 64 * KiB, 8 * MiB]) {
  test(`block size ${blockSize}: data across block boundaries reads back`, T, async () => {
    using s = scratchDir();
    const size = Math.max(4 * blockSize, 1 * MiB) + 3 * 512;
    const c = new VhdCraft({ size, blockSize })
      .write(3 * blockSize - 700, pattern(1500, 1)) // straddles blocks 1..3 for small blocks, 2..3 for big ones
      .write(2 * blockSize + 512, pattern(512, 2))
      .write(size - 1024, pattern(1024, 3));
    const p = c.writeTo(join(s.dir, 'b.vhd'));
    sameBytes(await readAll(p), c.expected(), 'guest');
    const m = await mapOf(p);
    for (const e of m) {
      if (e.data) assert.ok(e.present && e.offset !== undefined);
      else assert.ok(e.zero && !e.present);
    }
    assert.equal(
      m.reduce((n, e) => n + e.length, 0),
      size,
    );
  });
}

test('dynamic disk: sectors whose bitmap bit is clear read as zeros, whatever the file holds there', T, async () => {
  using s = scratchDir();
  const c = new VhdCraft({ size: 4 * MiB })
    .write(0, pattern(64 * KiB, 4))
    .mark(4096, 8192, false) // stored bytes stay, bits cleared
    .mark(2 * MiB, 4096, true); // present but never written: zeros
  const p = c.writeTo(join(s.dir, 'bits.vhd'));
  const got = await readAll(p);
  sameBytes(got, c.expected(), 'guest');
  assert.ok(got.subarray(4096, 4096 + 8192).every((b) => b === 0));
  const m = await mapOf(p);
  assert.deepEqual(
    m.map((e) => [e.start, e.length, e.data, e.present]),
    [
      [0, 4096, true, true],
      [4096, 8192, false, false],
      [12288, 65536 - 12288, true, true],
      [65536, 2 * MiB - 65536, false, false],
      [2 * MiB, 4096, true, true],
      [2 * MiB + 4096, 2 * MiB - 4096, false, false],
    ],
  );
});

test('fixed disk: found by its footer at the end, read as the data before it', T, async () => {
  using s = scratchDir();
  const c = new VhdCraft({ type: 'fixed', size: 1 * MiB }).write(100, pattern(5000, 5)).write(MiB - 512, pattern(512, 6));
  const p = c.writeTo(join(s.dir, 'fixed.vhd'));
  await using dev = await openImage(p);
  assert.equal(dev.format, 'vpc');
  assert.equal(dev.size, 1 * MiB);
  const buf = new Uint8Array(dev.size);
  await dev.pread(buf, 0);
  sameBytes(buf, c.expected(), 'guest');
});

test('fixed disk whose guest data starts with a VHD footer: the trailing footer wins', T, async () => {
  using s = scratchDir();
  const inner = new VhdCraft({ size: 1 * MiB }).build(); // a whole dynamic VHD as guest data
  const c = new VhdCraft({ type: 'fixed', size: 2 * MiB }).write(0, inner);
  const p = c.writeTo(join(s.dir, 'nested.vhd'));
  sameBytes(await readAll(p), c.expected(), 'guest');
  const info = await (async () => {
    await using dev = await openImage(p);
    return imageInfo(dev);
  })();
  assert.equal(info['virtual-size'], 2 * MiB);
  assert.equal((info['format-specific']?.data as Record<string, unknown>)['disk-type'], 'fixed');
});

test("Virtual PC's old 511-byte footer on a fixed disk", T, async () => {
  using s = scratchDir();
  const c = new VhdCraft({ type: 'fixed', size: 64 * KiB }).write(0, pattern(64 * KiB, 7));
  const full = c.build();
  // Drop the footer's last (reserved, zero) byte.
  const p = join(s.dir, 'old.vhd');
  writeFileSync(p, full.subarray(0, full.length - 1));
  sameBytes(await readAll(p), c.expected(), 'guest');
});

test('dynamic disk with a damaged trailing footer: the copy at offset 0 is used, and info says so', T, async () => {
  using s = scratchDir();
  const c = new VhdCraft({ size: 2 * MiB }).write(4096, pattern(4096, 8)).breakFooterChecksum('trailing');
  const p = c.writeTo(join(s.dir, 'tail.vhd'));
  sameBytes(await readAll(p), c.expected(), 'guest');
  await using dev = await openImage(p);
  const info = await imageInfo(dev);
  const notes = (info['format-specific']?.data as Record<string, unknown>)['notes'] as string[];
  assert.match(notes.join(' '), /trailing footer .* damaged .* copy at offset 0 is used/);
});

test('forceSizeCalc picks CHS or current_size, qemu-style', T, async () => {
  using s = scratchDir();
  // 10 MiB; the CHS geometry 302/4/17 gives 10514432 bytes.
  const geometry = { cylinders: 302, heads: 4, sectorsPerTrack: 17 };
  const p = new VhdCraft({ size: 10 * MiB + 64 * KiB, creator: 'vpc ', geometry }).writeTo(join(s.dir, 'chs.vhd'));
  const sizeOf = async (o: OpenOptions) => {
    await using dev = await openImage(p, o);
    return dev.size;
  };
  assert.equal(await sizeOf({}), 10514432);
  assert.equal(await sizeOf({ forceSizeCalc: 'current_size' }), 10 * MiB + 64 * KiB);
  const q = new VhdCraft({ size: 10 * MiB + 64 * KiB, creator: 'win ', geometry }).writeTo(join(s.dir, 'win.vhd'));
  await using dev = await openImage(q, { forceSizeCalc: 'chs' });
  assert.equal(dev.size, 10514432);
  await using dev2 = await openImage(q);
  assert.equal(dev2.size, 10 * MiB + 64 * KiB);
});

// ------------------------------------------------------------ broken images

test('bad footer checksum (fixed disk): reported, not read as raw', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ type: 'fixed', size: 64 * KiB }).breakFooterChecksum().writeTo(join(s.dir, 'ck.vhd'));
  await fails(openImage(p), { kind: 'corrupt-image', path: p, structure: 'VHD footer', field: 'checksum', mentions: ['damaged'] });
});

test('bad footer checksum in both copies of a dynamic disk', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ size: 2 * MiB }).breakFooterChecksum('both').writeTo(join(s.dir, 'ck2.vhd'));
  await fails(openImage(p), { kind: 'corrupt-image', path: p, structure: 'VHD footer', field: 'checksum' });
});

test('bad dynamic header checksum', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ size: 2 * MiB }).breakHeaderChecksum().writeTo(join(s.dir, 'hck.vhd'));
  await fails(openImage(p), { kind: 'corrupt-image', path: p, structure: 'VHD dynamic disk header', field: 'checksum' });
});

test('dynamic header cookie wrong', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ size: 2 * MiB }).headerField(0, 8, 0x6378737061727365n + 1n).writeTo(join(s.dir, 'cookie.vhd'));
  await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'VHD dynamic disk header', field: 'cookie' });
});

test('footer data_offset points past the end of the file', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ size: 2 * MiB }).footerField(16, 8, 1n << 40n).writeTo(join(s.dir, 'doff.vhd'));
  await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'VHD footer', field: 'data_offset' });
});

test('BAT beyond the end of the file', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ size: 2 * MiB }).headerField(16, 8, 1n << 36n).writeTo(join(s.dir, 'bat.vhd'));
  await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'BAT', field: 'table_offset', mentions: ['beyond the end'] });
});

test('BAT entry pointing beyond the end of the file', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ size: 4 * MiB }).write(0, pattern(512, 9)).batEntry(1, 0x00100000).writeTo(join(s.dir, 'entry.vhd'));
  const e = await fails(openImage(p), {
    kind: 'corrupt-image',
    path: p,
    structure: 'BAT',
    mentions: ['BAT entry 1', 'past the end of the file'],
  });
  assert.equal(e.context.offset, 1536 + 4);
});

test('truncated dynamic disk: the last block is cut off', T, async () => {
  using s = scratchDir();
  const c = new VhdCraft({ size: 4 * MiB }).write(2 * MiB, pattern(512, 10));
  const full = c.build().length;
  const p = c.truncate(full - 512 - MiB).writeTo(join(s.dir, 'cut.vhd'));
  // No trailing footer: the copy at offset 0 is used, then the BAT check finds the block cut off.
  await fails(openImage(p), { kind: 'corrupt-image', path: p, structure: 'BAT', mentions: ['truncated'] });
});

test('absurd max_table_entries (afl5-style 2^30 + 1): refused before any allocation', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ size: 2 * MiB }).headerField(28, 4, 0x40000001).writeTo(join(s.dir, 'mte.vhd'));
  const before = process.memoryUsage();
  const t0 = performance.now();
  await fails(openImage(p), {
    kind: 'invalid-image',
    path: p,
    structure: 'VHD dynamic disk header',
    field: 'max_table_entries',
    mentions: ['1073741825'],
  });
  assert.ok(performance.now() - t0 < 2000);
  const after = process.memoryUsage();
  assert.ok(after.arrayBuffers - before.arrayBuffers + (after.heapUsed - before.heapUsed) < 64 << 20);
});

test("max_table_entries that fits qemu's limit but not the file: BAT beyond the end", T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ size: 2 * MiB }).headerField(28, 4, 100_000_000).writeTo(join(s.dir, 'mte2.vhd'));
  await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'BAT', mentions: ['beyond the end'] });
});

test('max_table_entries too small for the virtual size', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ size: 8 * MiB, maxTableEntries: 2 }).writeTo(join(s.dir, 'small.vhd'));
  await fails(openImage(p), { kind: 'corrupt-image', path: p, structure: 'VHD dynamic disk header', field: 'max_table_entries' });
});

for (const bs of [0, 1000, 256]) {
  test(`block_size ${bs} is refused`, T, async () => {
    using s = scratchDir();
    const p = new VhdCraft({ size: 2 * MiB }).headerField(32, 4, bs).writeTo(join(s.dir, `bs${bs}.vhd`));
    await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'VHD dynamic disk header', field: 'block_size' });
  });
}

test('virtual size above 2040 GiB is refused', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ type: 'fixed', size: 4096 }).footerField(48, 8, 3n << 40n).writeTo(join(s.dir, 'huge.vhd'));
  await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'VHD footer', field: 'current_size', mentions: ['2040 GiB'] });
});

test('fixed disk whose footer claims more data than the file holds', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ type: 'fixed', size: 64 * KiB }).footerField(48, 8, 1n << 20n).writeTo(join(s.dir, 'short.vhd'));
  await fails(openImage(p), { kind: 'corrupt-image', path: p, structure: 'VHD footer', field: 'current_size' });
});

test('unknown disk type', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ size: 2 * MiB }).footerField(60, 4, 5).writeTo(join(s.dir, 'type.vhd'));
  await fails(openImage(p), { kind: 'unsupported-feature', path: p, structure: 'VHD footer', field: 'disk_type' });
});

test('opened for writing: a write outside the disk is refused (VHD writing: test/interop/vhd-write.test.ts)', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ size: 2 * MiB }).writeTo(join(s.dir, 'rw.vhd'));
  await using dev = await openImage(p, { readOnly: false });
  await assert.rejects(dev.pwrite(new Uint8Array(512), 2 * MiB));
});

test('a file too small for a footer, forced as vpc', T, async () => {
  using s = scratchDir();
  const p = join(s.dir, 'tiny.vhd');
  writeFileSync(p, Buffer.from('conectix'));
  await fails(openImage(p, { format: 'vpc' }), { kind: 'invalid-image', path: p, structure: 'VHD footer' });
});

test('raw data forced as vpc: not a VHD', T, async () => {
  using s = scratchDir();
  const p = join(s.dir, 'raw.img');
  writeFileSync(p, pattern(4096, 11));
  await fails(openImage(p, { format: 'vpc' }), { kind: 'invalid-image', path: p, field: 'cookie', mentions: ['not a VHD'] });
});

// ------------------------------------------------------------ differencing

function family(dir: string): { parent: VhdCraft; parentPath: string; parentBytes: Uint8Array } {
  const parent = new VhdCraft({ size: 4 * MiB }).write(0, pattern(3 * MiB, 12));
  const parentPath = join(dir, 'base.vhd');
  const bytes = parent.build();
  writeFileSync(parentPath, bytes);
  return { parent, parentPath, parentBytes: bytes };
}

test('differencing disk: the parent through a relative W2ru locator; bitmap-clear sectors read from it', T, async () => {
  using s = scratchDir();
  const { parent, parentBytes } = family(s.dir);
  mkdirSync(join(s.dir, 'kids'));
  const child = new VhdCraft({
    size: 4 * MiB,
    parent: { uuid: uuidOf(parentBytes), name: 'base.vhd', locators: [{ code: 'W2ru', path: '..\\base.vhd' }] },
  })
    .write(1000, pattern(3000, 13)) // partial: sectors 1..7 of block 0
    .write(2 * MiB + 512 * 100, pattern(512, 14));
  const p = child.writeTo(join(s.dir, 'kids', 'child.vhd'));
  const expected = child.expected(parent.expected());
  sameBytes(await readAll(p), expected, 'guest');
  const m = await mapOf(p);
  assert.deepEqual(
    m.map((e) => [e.start, e.length, e.depth, e.data]),
    [
      [0, 512, 1, true],
      [512, 3584, 0, true],
      [4096, 2 * MiB - 4096, 1, true],
      [2 * MiB, 51200, 1, true],
      [2 * MiB + 51200, 512, 0, true],
      [2 * MiB + 51712, 3 * MiB - (2 * MiB + 51712), 1, true],
      [3 * MiB, MiB, 1, false],
    ],
  );
  await using dev = await openImage(p);
  const info = await imageInfo(dev);
  assert.equal(info['backing-filename'], '../base.vhd');
  assert.equal(info['full-backing-filename'], join(s.dir, 'base.vhd'));
});

for (const [code, path] of [
  ['W2ku', 'ABS'],
  ['MacX', 'URL'],
  ['Wi2r', 'base.vhd'],
] as const) {
  test(`differencing disk: parent through a ${code} locator`, T, async () => {
    using s = scratchDir();
    const { parent, parentPath, parentBytes } = family(s.dir);
    const loc = path === 'ABS' ? parentPath : path === 'URL' ? `file://localhost${parentPath}` : path;
    const child = new VhdCraft({ size: 4 * MiB, parent: { uuid: uuidOf(parentBytes), locators: [{ code, path: loc }] } }).write(
      0,
      pattern(512, 15),
    );
    const p = child.writeTo(join(s.dir, 'c.vhd'));
    sameBytes(await readAll(p), child.expected(parent.expected()), 'guest');
  });
}

test('differencing disk: Windows absolute locators fall back to the parent name beside the child', T, async () => {
  using s = scratchDir();
  const { parent, parentBytes } = family(s.dir);
  const child = new VhdCraft({
    size: 4 * MiB,
    parent: { uuid: uuidOf(parentBytes), name: 'C:\\VMs\\base.vhd', locators: [{ code: 'W2ku', path: 'C:\\VMs\\base.vhd' }] },
  });
  const p = child.writeTo(join(s.dir, 'c.vhd'));
  sameBytes(await readAll(p), parent.expected(), 'guest');
});

test('differencing disk: parent unique id mismatch is a clear error', T, async () => {
  using s = scratchDir();
  family(s.dir);
  const p = new VhdCraft({
    size: 4 * MiB,
    parent: { uuid: new Uint8Array(16).fill(0xab), locators: [{ code: 'W2ru', path: '.\\base.vhd' }] },
  }).writeTo(join(s.dir, 'c.vhd'));
  await fails(openImage(p), {
    kind: 'invalid-image',
    path: p,
    field: 'parent_unique_id',
    mentions: ['abababab-abab-abab-abab-abababababab', join(s.dir, 'base.vhd'), 'replaced or modified'],
  });
});

test('differencing disk: missing parent names every path it looked for', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({
    size: 4 * MiB,
    parent: { uuid: new Uint8Array(16), name: 'gone.vhd', locators: [{ code: 'W2ru', path: '.\\missing.vhd' }] },
  }).writeTo(join(s.dir, 'c.vhd'));
  await fails(openImage(p), {
    kind: 'not-found',
    path: p,
    structure: 'parent locator',
    mentions: [join(s.dir, 'missing.vhd'), join(s.dir, 'gone.vhd')],
  });
  // Opened alone (as inspect does), it reads its own sectors and zeros.
  await using dev = await openImage(p, { backing: null });
  assert.equal(dev.size, 4 * MiB);
  const r = rblock(['info', p]);
  assert.equal(r.status, 1);
  assert.equal(r.stderr.trim().split('\n').length, 1);
});

test('differencing disk naming no parent at all', T, async () => {
  using s = scratchDir();
  const p = new VhdCraft({ size: 4 * MiB, parent: { uuid: new Uint8Array(16) } }).writeTo(join(s.dir, 'c.vhd'));
  await fails(openImage(p), { kind: 'invalid-image', path: p, structure: 'parent locator', mentions: ['no usable parent'] });
});

test('differencing disk that is its own parent: a loop, refused', T, async () => {
  using s = scratchDir();
  const c = new VhdCraft({
    size: 4 * MiB,
    uuid: new Uint8Array(16).fill(7),
    parent: { uuid: new Uint8Array(16).fill(7), locators: [{ code: 'W2ru', path: 'self.vhd' }] },
  });
  const p = c.writeTo(join(s.dir, 'self.vhd'));
  await fails(openImage(p), { kind: 'invalid-image', path: p, mentions: ['loops'] });
});

test('rblock inspect on a differencing disk: locators, BAT and one block bitmap, without opening the parent', T, () => {
  using s = scratchDir();
  const c = new VhdCraft({
    size: 4 * MiB,
    parent: { uuid: new Uint8Array(16), name: 'p.vhd', locators: [{ code: 'W2ru', path: '.\\p.vhd' }] },
  }).write(512 * 64, pattern(512 * 3, 16));
  const p = c.writeTo(join(s.dir, 'c.vhd'));
  const r = rblock(['inspect', p, '--block', '0']);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /differencing disk/);
  assert.match(r.stdout, /\[0\] at 0x440: W2ru data 14 bytes at 0x800 \(space 512\) '\.\\p\.vhd'/);
  assert.match(r.stdout, /Block#0000 -> 0x00000005 : bitmap \[0xa00\.\.0xc00\), data \[0xc00\.\.0x200c00\)/);
  assert.match(r.stdout, /Block#0001 -> 0xffffffff : not allocated/);
  assert.match(r.stdout, /sectors 64\.\.66 \(3\): stored in this file/);
  assert.match(r.stdout, /\n\s+64 ###\.{61}\n/);
  const j = JSON.parse(rblock(['inspect', p, '--block', '0', '--output', 'json']).stdout) as { block: { present: number } };
  assert.equal(j.block.present, 3);
  const bad = rblock(['inspect', p, '--block', '9']);
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /block 9 is out of range \(the BAT has 2 entries\)/);
  // The raw file is what it is: the bytes at the locator offset.
  assert.equal(Buffer.from(readFileSync(p).subarray(0x800, 0x800 + 14)).toString('utf16le'), '.\\p.vhd');
});
