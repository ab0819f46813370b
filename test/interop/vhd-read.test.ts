/**
 * VHD (vpc) interop: images made by the real qemu-img / qemu-io, read by
 * rblock. For every image rblock must give the same guest bytes as
 * `qemu-img convert -O raw`, the same allocation map as `qemu-img map` (with
 * the two documented, principled differences below) and the same format and
 * virtual size in `info`. Differencing disks (qemu-img cannot make them, and
 * its vpc driver ignores their parent) are built by test/fixtures/vhd-craft.ts
 * on top of a parent made by qemu-img. The corpus samples made by Virtual PC,
 * Hyper-V and Disk2vhd come from ../shared/corpus/qemu-samples.
 *
 * Differences from qemu-img map, asserted as such:
 * - An unallocated block of a dynamic disk: qemu says present: true (its vpc
 *   driver has no backing support, so the block layer counts the zeros it
 *   reports as this layer's); rblock says present: false, like an unallocated
 *   qcow2 cluster, because for a differencing disk the same BAT entry means
 *   "read the parent". start/length/depth/zero/data agree.
 * - A fixed disk: qemu looks for holes in the file (SEEK_HOLE) and reports
 *   them as zero: true; rblock (like its raw driver: node has no SEEK_HOLE)
 *   reports one data extent. Both say data: true with offset == start.
 */
import { after, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { main } from '../../src/cli/main.js';
import { VhdCraft, uuidOf } from '../fixtures/vhd-craft.js';
import { needShared, needTools, rblock, run, scratchDir, sha256File } from '../helpers/tools.js';
import { pseudoRandom } from '../helpers/rng.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const scratch = scratchDir('rblock-vhd-interop-');
after(() => scratch[Symbol.dispose]());
const ROOT = scratch.dir;

interface MapJson {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

function ready(t: TestContext): boolean {
  return needTools(t, 'qemu-img', 'qemu-io');
}

function qemuImg(...args: string[]): string {
  return run('qemu-img', args, { cwd: ROOT }).stdout;
}

function qemuIo(image: string, ...cmds: string[]): void {
  run('qemu-io', ['-f', 'vpc', ...cmds.flatMap((c) => ['-c', c]), image], { cwd: ROOT });
}

/**
 * The rblock CLI, in process (main() with captured output: the same code as
 * bin/rblock.cjs without a node start-up per call); image names are in ROOT.
 * A few checks below still spawn bin/rblock.cjs (other working directory, stderr).
 */
async function rb(...args: string[]): Promise<string> {
  let out = '';
  let err = '';
  const abs = args.map((a) => (/\.(vhd|img|raw)$/.test(a) && !a.startsWith('/') ? join(ROOT, a) : a));
  const code = await main(abs, {
    out: async (x) => {
      out += typeof x === 'string' ? x : Buffer.from(x).toString('latin1');
    },
    err: (x) => {
      err += x;
    },
  });
  assert.equal(code, 0, `rblock ${args.join(' ')}: ${err}`);
  return out;
}

function randomFile(name: string, length: number, seed: number): string {
  const p = join(ROOT, name);
  writeFileSync(p, pseudoRandom(length, seed));
  return p;
}

/**
 * Guest bytes, map and info of `image` (in ROOT), rblock against qemu. qemu
 * is always told `-f vpc` (it probes a fixed VHD as raw); rblock probes.
 */
async function checkAgainstQemu(image: string, fixed: boolean): Promise<void> {
  // Bytes.
  const q = join(ROOT, `${image}.qemu.raw`);
  const r = join(ROOT, `${image}.rblock.raw`);
  qemuImg('convert', '-f', 'vpc', '-O', 'raw', image, q);
  await rb('read', image, '--output', r);
  assert.equal(await sha256File(r), await sha256File(q), `${image}: guest bytes`);

  // Info.
  const qi = JSON.parse(qemuImg('info', '-f', 'vpc', '--output=json', image)) as Record<string, unknown>;
  const ri = JSON.parse(await rb('info', '--output', 'json', image)) as Record<string, unknown>;
  for (const k of ['format', 'virtual-size', 'cluster-size', 'dirty-flag']) assert.deepEqual(ri[k], qi[k], `${image}: info ${k}`);
  const spec = ri['format-specific'] as { type: string; data: Record<string, unknown> };
  assert.equal(spec.type, 'vpc');
  assert.equal(spec.data['disk-type'], fixed ? 'fixed' : 'dynamic');

  // Map.
  const qm = JSON.parse(qemuImg('map', '-f', 'vpc', '--output=json', image)) as MapJson[];
  const rm = JSON.parse(await rb('map', '--output', 'json', image)) as MapJson[];
  const size = qi['virtual-size'] as number;
  if (fixed) {
    assert.deepEqual(rm, [{ start: 0, length: size, depth: 0, present: true, zero: false, data: true, offset: 0 }], `${image}: map`);
    let pos = 0;
    for (const e of qm) {
      assert.equal(e.start, pos);
      assert.ok(e.data && e.present && e.offset === e.start, `${image}: qemu map entry ${JSON.stringify(e)}`);
      pos += e.length;
    }
    assert.equal(pos, size);
    return;
  }
  assert.equal(rm.length, qm.length, `${image}: map entries\nrblock ${JSON.stringify(rm)}\nqemu   ${JSON.stringify(qm)}`);
  rm.forEach((e, i) => {
    const w = qm[i] as MapJson;
    const { present: qp, ...qrest } = w;
    const { present: rp, ...rrest } = e;
    assert.deepEqual(rrest, qrest, `${image}: map entry ${i}`);
    if (e.data) assert.ok(rp && qp);
    else assert.ok(qp && !rp, `${image}: unallocated entry ${i}: qemu present ${qp}, rblock ${rp}`);
  });
}

/** Writes that straddle 2 MiB block boundaries, pseudo-random data, zero runs and the very end. */
function standardWrites(size: number, seed: number): string[] {
  const B = 2 * MiB;
  const cmds = [`write -P 0x11 0 4k`];
  if (size > B + 1000) cmds.push(`write -P 0x12 ${B - 700} 1500`);
  if (size > 4 * MiB) cmds.push(`write -s ${randomFile(`rnd-${seed}`, 300 * KiB, seed)} ${B + 123} ${300 * KiB}`);
  if (size > 8 * MiB) cmds.push(`write -P 0x13 ${3 * B - 100} ${B + 200}`, `write -z ${4 * B + 4096} ${64 * KiB}`);
  cmds.push(`write -P 0x00 ${Math.floor(size / 2 / 512) * 512} 8k`, `write -P 0x7e ${size - 1536} 1536`);
  return cmds;
}

function virtualSize(image: string): number {
  return (JSON.parse(qemuImg('info', '-f', 'vpc', '--output=json', image)) as { 'virtual-size': number })['virtual-size'];
}

// ------------------------------------------------------------ dynamic, made by qemu-img

for (const [name, size, o] of [
  ['dyn-10m.vhd', '10M', ''], // CHS rounds 10 MiB up to 10514432
  ['dyn-1000000.vhd', '1000000', ''], // not a sector multiple: qemu rounds up, then to CHS
  ['dyn-33m.vhd', String(33 * MiB + 5 * 512), ''],
  ['dyn-fs-7340544.vhd', '7340544', 'force_size=on'], // exact size, creator 'qem2', CHS 65535/16/255
  ['dyn-fs-13m.vhd', String(13 * MiB + 512), 'force_size=on'],
] as const) {
  test(`dynamic ${name} (qemu-img create -f vpc ${o} ${size}): bytes, map and info as qemu`, async (t) => {
    if (!ready(t)) return;
    qemuImg('create', '-q', '-f', 'vpc', ...(o ? ['-o', o] : []), name, size);
    const vs = virtualSize(name);
    if (o === '') assert.notEqual(vs % (2 * MiB), 0, 'a CHS size, not a block multiple');
    else assert.equal(vs, Number(size));
    qemuIo(name, ...standardWrites(vs, vs % 1000));
    await checkAgainstQemu(name, false);
  });
}

// ------------------------------------------------------------ fixed, made by qemu-img

for (const [name, size, o] of [
  ['fixed-3m.vhd', '3M', 'subformat=fixed'],
  ['fixed-fs-3000064.vhd', '3000064', 'subformat=fixed,force_size=on'],
  ['fixed-9m.vhd', String(9 * MiB + 3 * 512), 'subformat=fixed'],
] as const) {
  test(`fixed ${name} (qemu-img create -f vpc -o ${o} ${size}): recognised as VHD, bytes, map and info as qemu -f vpc`, async (t) => {
    if (!ready(t)) return;
    qemuImg('create', '-q', '-f', 'vpc', '-o', o, name, size);
    const vs = virtualSize(name);
    qemuIo(name, ...standardWrites(vs, 7 + (vs % 1000)));
    // qemu-img probes a fixed VHD as raw (its footer would read as guest data); rblock does not.
    assert.equal((JSON.parse(qemuImg('info', '--output=json', name)) as { format: string }).format, 'raw');
    await checkAgainstQemu(name, true);
  });
}

// ------------------------------------------------------------ qemu-img convert -O vpc

/** A raw disk of pseudo-random pieces, zero runs (whole 2 MiB blocks among them) and text. */
function mixedRaw(name: string, size: number, seed: number): string {
  const b = Buffer.alloc(size);
  const rnd = pseudoRandom(size, seed);
  const pieces: [number, number][] = [
    [0, 700_000],
    [1_500_000, 1_000_000], // straddles the block boundary at 2 MiB
    [6 * MiB + 12_345, 2 * MiB], // blocks 2 and 5 stay all zero
    [size - 300_000, 300_000],
  ];
  for (const [off, len] of pieces) rnd.copy(b, off, off, Math.min(off + len, size));
  const p = join(ROOT, name);
  writeFileSync(p, b);
  return p;
}

for (const [name, o] of [
  ['conv-dyn.vhd', ''],
  ['conv-dyn-fs.vhd', 'force_size=on'],
  ['conv-fixed.vhd', 'subformat=fixed'],
] as const) {
  test(`qemu-img convert -O vpc ${o}: ${name} reads back as the raw source`, async (t) => {
    if (!ready(t)) return;
    const src = mixedRaw(`${name}.src.raw`, 12 * MiB + 4321 * 512, 99);
    qemuImg('convert', '-f', 'raw', '-O', 'vpc', ...(o ? ['-o', o] : []), src, name);
    await checkAgainstQemu(name, o.includes('fixed'));
    // The source bytes are a prefix of the guest (CHS may round the size up, never down).
    const guest = readFileSync(join(ROOT, `${name}.rblock.raw`));
    const raw = readFileSync(src);
    assert.ok(guest.length >= raw.length);
    assert.ok(guest.subarray(0, raw.length).equals(raw), 'source bytes');
    assert.ok(
      guest.subarray(raw.length).every((x) => x === 0),
      'zeros after the source',
    );
    if (!o.includes('fixed')) {
      const rm = JSON.parse(await rb('map', '--output', 'json', name)) as MapJson[];
      assert.ok(
        rm.some((e) => !e.data && e.start <= 2 * 2 * MiB && e.start + e.length >= 3 * 2 * MiB),
        'an all-zero block left unallocated',
      );
    }
  });
}

// ------------------------------------------------------------ differencing (crafted) on a qemu-made parent

test('differencing disk on a qemu-img parent: relative W2ru locator, per-sector fall-through, map depths', async (t) => {
  if (!ready(t)) return;
  const dir = join(ROOT, 'diff');
  mkdirSync(join(dir, 'child'), { recursive: true });
  run('qemu-img', ['create', '-q', '-f', 'vpc', '-o', 'force_size=on', 'base.vhd', String(6 * MiB)], { cwd: dir });
  run('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x51 0 3M', '-c', `write -P 0x52 ${5 * MiB} 512k`, 'base.vhd'], { cwd: dir });
  const base = join(dir, 'base.vhd');
  run('qemu-img', ['convert', '-f', 'vpc', '-O', 'raw', base, join(dir, 'base.raw')]);
  const parentRaw = readFileSync(join(dir, 'base.raw'));

  const child = new VhdCraft({
    size: 6 * MiB,
    creator: 'win ',
    parent: { uuid: uuidOf(readFileSync(base)), name: 'base.vhd', locators: [{ code: 'W2ru', path: '..\\base.vhd' }] },
  })
    .write(1000, pseudoRandom(3000, 5)) // sectors 1..7 of block 0; the rest of block 0 is the parent's
    .write(2 * MiB - 512, pseudoRandom(1024, 6)) // the last sector of block 0 and the first of block 1
    .write(4 * MiB + 4096, pseudoRandom(8192, 7)); // a block the parent does not have
  const cpath = child.writeTo(join(dir, 'child', 'child.vhd'));
  const expected = child.expected(parentRaw);

  // From another working directory: the parent is found relative to the child.
  const out = join(dir, 'child.raw');
  const r = rblock(['read', cpath, '--output', out], { cwd: '/' });
  assert.equal(r.status, 0, r.stderr);
  assert.equal(await sha256File(out), createHash('sha256').update(expected).digest('hex'), 'guest bytes');

  const rm = JSON.parse(rblock(['map', '--output', 'json', cpath], { cwd: '/' }).stdout) as MapJson[];
  const qm = JSON.parse(qemuImg('map', '--output=json', base)) as MapJson[];
  for (const e of rm) {
    if (e.depth === 0) {
      assert.ok(e.data && e.present && e.offset !== undefined, JSON.stringify(e));
      continue;
    }
    assert.equal(e.depth, 1);
    // The parent answers: same data flag and host offsets as qemu's map of the parent.
    const w = qm.find((x) => x.start <= e.start && e.start < x.start + x.length) as MapJson;
    assert.equal(e.data, w.data, JSON.stringify([e, w]));
    if (w.offset !== undefined) assert.equal((e.offset as number) - e.start, w.offset - w.start);
  }
  assert.deepEqual(
    rm.filter((e) => e.depth === 0).map((e) => [e.start, e.length]),
    [
      [512, 3584],
      [2 * MiB - 512, 512], // two blocks: never one extent (the sector bitmap lies between them in the file)
      [2 * MiB, 512],
      [4 * MiB + 4096, 8192],
    ],
  );
  const info = JSON.parse(rblock(['info', '--output', 'json', '--backing-chain', cpath], { cwd: '/' }).stdout) as Record<string, unknown>[];
  assert.equal(info.length, 2);
  assert.equal(info[0]?.['backing-filename'], '../base.vhd');
  assert.equal(info[0]?.['full-backing-filename'], base);
  assert.equal(info[1]?.['virtual-size'], 6 * MiB);

  // A replaced parent (same name, new unique id): a clear one-line error.
  run('qemu-img', ['create', '-q', '-f', 'vpc', '-o', 'force_size=on', 'base.vhd', String(6 * MiB)], { cwd: dir });
  const bad = rblock(['read', cpath, '--output', out]);
  assert.equal(bad.status, 1);
  const lines = bad.stderr.trim().split('\n');
  assert.equal(lines.length, 1, bad.stderr);
  assert.match(lines[0] as string, /parent disk .*base\.vhd .* has unique id .* but this differencing disk expects .*parent_unique_id/);
});

// ------------------------------------------------------------ corpus (../shared/corpus/qemu-samples)

function sample(t: TestContext, name: string): string | null {
  if (!needTools(t, 'bzcat', 'qemu-img')) return null;
  const bz = needShared(t, `corpus/qemu-samples/${name}.bz2`);
  if (bz === null) return null;
  const p = join(ROOT, name);
  // Sparse: d2v-zerofilled.vhd expands to 264 MB, almost all zeros.
  run('sh', ['-c', `bzcat "${bz}" | cp --sparse=always /dev/stdin "${p}"`]);
  return p;
}

test('corpus d2v-zerofilled.vhd (Disk2vhd): size from current_size, 126 allocated blocks, manifest sha256', async (t) => {
  const p = sample(t, 'd2v-zerofilled.vhd');
  if (p === null) return;
  // The CHS geometry is the maximum 65535/16/255, so every force_size_calc gives current_size (as in qemu).
  const { openImage } = await import('../../src/index.js');
  for (const forceSizeCalc of ['chs', 'current_size'] as const) {
    await using dev = await openImage(p, { forceSizeCalc });
    assert.equal(dev.size, 263454720);
  }
  const info = JSON.parse(await rb('info', '--output', 'json', p)) as Record<string, unknown>;
  assert.equal(info['virtual-size'], 263454720);
  assert.equal(info['format'], 'vpc');
  const data = (info['format-specific'] as { data: Record<string, unknown> }).data;
  assert.equal(data['creator-app'], 'd2v\\0'); // not 'd2v ': qemu's table does not match it, the maximum geometry does
  assert.equal(data['allocated-blocks'], 126);
  {
    // Hash the guest through the library (no 263 MB output file to write and read back).
    await using dev = await openImage(p);
    const h = createHash('sha256');
    const buf = Buffer.alloc(8 * MiB);
    for (let pos = 0; pos < dev.size; pos += buf.length) {
      const n = Math.min(buf.length, dev.size - pos);
      await dev.pread(buf.subarray(0, n), pos);
      h.update(buf.subarray(0, n));
    }
    assert.equal(h.digest('hex'), '1ba076be94a8a64541c25aae8d5a5f8b0da758c3797af597e03acb431ff8d143');
  }
  const rm = JSON.parse(await rb('map', '--output', 'json', p)) as MapJson[];
  const qm = JSON.parse(qemuImg('map', '--output=json', p)) as MapJson[];
  assert.deepEqual(rm, qm, 'every block allocated: the maps agree exactly');
  assert.equal(rm.length, 126);
});

for (const [name, creator, auto, other] of [
  ['hyperv2012r2-dynamic.vhd', 'win ', 136365211648, 136363130880],
  ['virtualpc-dynamic.vhd', 'vpc ', 136363130880, 136365211648],
] as const) {
  test(`corpus ${name} (creator '${creator}'): the size qemu gives it, the other with forceSizeCalc, nothing allocated`, async (t) => {
    const p = sample(t, name);
    if (p === null) return;
    const { openImage } = await import('../../src/index.js');
    const size = async (force?: 'chs' | 'current_size'): Promise<number> => {
      await using dev = await openImage(p, force === undefined ? {} : { forceSizeCalc: force });
      return dev.size;
    };
    assert.equal(await size(), auto);
    assert.equal(await size(creator === 'win ' ? 'chs' : 'current_size'), other);
    assert.equal(await size(creator === 'win ' ? 'current_size' : 'chs'), auto);
    assert.equal((JSON.parse(qemuImg('info', '--output=json', p)) as { 'virtual-size': number })['virtual-size'], auto);
    // All zeros, no block allocated: hashing 136 GB would take minutes, the map says it all.
    const rm = JSON.parse(await rb('map', '--output', 'json', p)) as MapJson[];
    assert.deepEqual(rm, [{ start: 0, length: auto, depth: 0, present: false, zero: true, data: false }]);
    const info = JSON.parse(await rb('info', '--output', 'json', p)) as { 'format-specific': { data: Record<string, unknown> } };
    assert.equal(info['format-specific'].data['allocated-blocks'], 0);
    assert.equal(info['format-specific'].data['creator-app'], creator);
    const tail = await rb('read', p, '--offset', String(auto - 4096), '--length', '4096', '--hexdump');
    assert.match(tail, /^[0-9a-f]{8,} {2}00 00 00 00 00 00 00 00 {2}00 00 00 00 00 00 00 00 {2}\|\.{16}\|\n\*\n/);
  });
}

test('corpus afl5.img (2^30 + 1 BAT entries): refused with one clear line, quickly', (t) => {
  const p = sample(t, 'afl5.img');
  if (p === null) return;
  const t0 = Date.now();
  const r = rblock(['info', p]);
  assert.ok(Date.now() - t0 < 5000);
  assert.equal(r.status, 1);
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, r.stderr);
  assert.match(lines[0] as string, /^rblock: .*afl5\.img: VHD dynamic disk header field max_table_entries = 1073741825 is too large/);
});
