/**
 * The VMDK write half (issue 7) against the real qemu-img (and libvmdk's
 * vmdkinfo): `create` makes qemu's exact layout; random workloads (unaligned
 * writes, zero writes) on every writable subformat are read identically by
 * `qemu-img compare` and pass `qemu-img check`; convert to every subformat;
 * the streamOptimized writer produces its file in one forward pass (written
 * into a pipe) that qemu-img and vmdkinfo accept.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, openSync, readFileSync, readdirSync, statSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import test from 'node:test';
import { openImage } from '../../src/index.js';
import { pattern, rng } from '../helpers/rng.js';
import { needTools, RBLOCK, rblock, run, scratchDir } from '../helpers/tools.js';
import { mixedRaw } from './qemu.js';

const KiB = 1024;
const MiB = 1 << 20;

function qemu(cwd: string, ...args: string[]): string {
  return run('qemu-img', args, { cwd }).stdout;
}

function assertSameAs(img: string, rawRef: string): void {
  const r = run('qemu-img', ['compare', '-F', 'raw', img, rawRef], { check: false, cwd: dirname(img) });
  assert.equal(r.status, 0, `qemu-img compare ${img} ${rawRef}: ${r.stdout}${r.stderr}`);
}

function assertClean(img: string): void {
  const r = run('qemu-img', ['check', img], { check: false, cwd: dirname(img) });
  assert.equal(r.status, 0, `qemu-img check ${img}: ${r.stdout}${r.stderr}`);
  assert.match(r.stdout, /No errors were found on the image/);
}

function ok(args: string[], cwd: string): string {
  const r = rblock(args, { cwd });
  assert.equal(r.status, 0, `rblock ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

/** The file with the CIDs masked (an embedded descriptor is taken out and compared as text: a CID's length varies). */
function masked(b: Buffer): Buffer {
  const mask = (t: Buffer): Buffer => Buffer.from(t.toString('latin1').replace(/CID=[0-9a-f]+/g, 'CID=X'), 'latin1');
  if (b.subarray(0, 4).toString('latin1') !== 'KDMV') return mask(b);
  const area = b.subarray(512, 512 * 21);
  const end = area.indexOf(0);
  const rest = Buffer.from(b);
  rest.fill(0, 512, 512 * 21);
  return Buffer.concat([mask(area.subarray(0, end < 0 ? area.length : end)), rest]);
}

const CREATES: Array<{ name: string; o: string; size: string; backing?: boolean }> = [
  { name: 'mono', o: 'subformat=monolithicSparse', size: '100M' },
  { name: 'zg', o: 'zeroed_grain=on,adapter_type=lsilogic,hwversion=6', size: '5G' },
  { name: 'flat', o: 'subformat=monolithicFlat,adapter_type=buslogic', size: '100M' },
  { name: 'split', o: 'subformat=twoGbMaxExtentSparse', size: '5G' },
  { name: 'splitflat', o: 'subformat=twoGbMaxExtentFlat', size: '4100M' },
  { name: 'stream', o: 'subformat=streamOptimized', size: '65M' },
  { name: 'child', o: 'subformat=monolithicSparse', size: '100M', backing: true },
];

test('create -f vmdk: every subformat in qemu-img 7.2 layout, byte for byte but the CID', (t) => {
  if (!needTools(t, 'qemu-img')) return;
  using s = scratchDir();
  for (const who of ['q', 'r']) {
    const dir = join(s.dir, who);
    run('mkdir', ['-p', dir]);
    qemu(dir, 'create', '-q', '-f', 'vmdk', 'parent.vmdk', '100M');
  }
  for (const c of CREATES) {
    const b = c.backing ? ['-b', 'parent.vmdk', '-F', 'vmdk'] : [];
    qemu(join(s.dir, 'q'), 'create', '-q', '-f', 'vmdk', '-o', c.o, ...b, `${c.name}.vmdk`, ...(c.backing ? [] : [c.size]));
    ok(['create', '-f', 'vmdk', '-o', c.o, ...b, `${c.name}.vmdk`, ...(c.backing ? [] : [c.size])], join(s.dir, 'r'));
  }
  const qFiles = readdirSync(join(s.dir, 'q')).sort();
  assert.deepEqual(readdirSync(join(s.dir, 'r')).sort(), qFiles);
  for (const f of qFiles) {
    const q = join(s.dir, 'q', f);
    const r = join(s.dir, 'r', f);
    // Text descriptors: the CID's length varies (%x), the masked text is compared below.
    if (statSync(q).size >= 4096) assert.equal(statSync(r).size, statSync(q).size, `${f}: size`);
    if (statSync(q).size > 8 * MiB) continue; // flat extents: sparse files of zeros
    const qb = readFileSync(q);
    const rb = readFileSync(r);
    if (f === 'child.vmdk') {
      // The parent differs (random CID): mask both CIDs.
      assert.ok(masked(rb).equals(masked(qb)), `${f}: differs from qemu-img's beyond the CIDs`);
    } else assert.ok(masked(rb).equals(masked(qb)), `${f}: differs from qemu-img's beyond the CID`);
  }
  // The child names its parent's CID.
  const parentCid = /CID=([0-9a-f]+)/.exec(readFileSync(join(s.dir, 'r', 'parent.vmdk'), 'latin1'))?.[1];
  assert.match(readFileSync(join(s.dir, 'r', 'child.vmdk'), 'latin1'), new RegExp(`parentCID=${parentCid}\n`));
});

interface Workload {
  name: string;
  o: string;
  size: number;
  /** A parent made by qemu with data in it. */
  parent?: boolean;
  zeroedGrain?: boolean;
}

const WORKLOADS: Workload[] = [
  { name: 'monolithicSparse', o: 'subformat=monolithicSparse', size: 80 * MiB },
  { name: 'zeroed', o: 'subformat=monolithicSparse,zeroed_grain=on', size: 80 * MiB, zeroedGrain: true },
  { name: 'monolithicFlat', o: 'subformat=monolithicFlat', size: 80 * MiB },
  { name: 'twoGbSparse', o: 'subformat=twoGbMaxExtentSparse', size: 2048 * MiB + 40 * MiB },
  { name: 'twoGbFlat', o: 'subformat=twoGbMaxExtentFlat', size: 2048 * MiB + 40 * MiB },
  { name: 'delta', o: 'subformat=monolithicSparse', size: 80 * MiB, parent: true },
  { name: 'deltaZeroed', o: 'zeroed_grain=on', size: 80 * MiB, parent: true, zeroedGrain: true },
];

/** Seeded writes and zero writes; the same applied to a raw reference file. */
async function workload(dir: string, w: Workload, seed: number): Promise<void> {
  const img = join(dir, `${w.name}.vmdk`);
  const ref = join(dir, `${w.name}.ref.raw`);
  if (w.parent) {
    qemu(dir, 'create', '-q', '-f', 'vmdk', `${w.name}-parent.vmdk`, String(w.size));
    const src = join(dir, `${w.name}-parent.raw`);
    const fd = openSync(src, 'w');
    writeSync(fd, mixedRaw(6 * MiB, seed), 0, 6 * MiB, 30 * MiB);
    closeSync(fd);
    run('truncate', ['-s', String(w.size), src]);
    qemu(dir, 'convert', '-n', '-f', 'raw', '-O', 'vmdk', src, `${w.name}-parent.vmdk`);
    qemu(dir, 'convert', '-O', 'raw', `${w.name}-parent.vmdk`, ref);
    ok(['create', '-f', 'vmdk', '-o', w.o, '-b', `${w.name}-parent.vmdk`, `${w.name}.vmdk`], dir);
  } else {
    ok(['create', '-f', 'vmdk', '-o', w.o, `${w.name}.vmdk`, String(w.size)], dir);
    run('truncate', ['-s', String(w.size), ref]);
  }
  const r = rng(seed);
  const fd = openSync(ref, 'r+');
  {
    await using dev = await openImage(img, { readOnly: false });
    assert.equal(dev.size, w.size);
    const grain = 64 * KiB;
    // Hot spots: the start, a grain table boundary (32 MiB), the parent's data, the 2 GiB extent boundary, the end.
    const spots = [0, 32 * MiB, 31 * MiB, w.size - 3 * MiB, w.size > 2048 * MiB ? 2048 * MiB - 2 * MiB : 10 * MiB];
    for (let i = 0; i < 60; i++) {
      const base = spots[Math.floor(r() * spots.length)] as number;
      const kind = r();
      let off: number;
      let len: number;
      if (kind < 0.25) {
        off = base + Math.floor(r() * 16) * grain; // aligned whole grains
        len = (1 + Math.floor(r() * 4)) * grain;
      } else {
        off = base + Math.floor(r() * 2 * MiB);
        len = 1 + Math.floor(r() * 200 * KiB);
      }
      len = Math.min(len, w.size - off);
      if (len <= 0) continue;
      if (r() < 0.3) {
        await dev.writeZeroes(off, len, { mayTrim: r() < 0.5 });
        writeSync(fd, new Uint8Array(len), 0, len, off);
      } else {
        const data = pattern(len, seed * 1000 + i);
        await dev.pwrite(data, off);
        writeSync(fd, data, 0, len, off);
      }
    }
    // Read back through rblock too.
    const probe = new Uint8Array(3 * MiB);
    await dev.pread(probe, w.size - 3 * MiB);
    const want = new Uint8Array(3 * MiB);
    const rfd = openSync(ref, 'r');
    const { readSync } = await import('node:fs');
    readSync(rfd, want, 0, want.length, w.size - 3 * MiB);
    closeSync(rfd);
    assert.ok(Buffer.from(probe).equals(Buffer.from(want)), `${w.name}: rblock reads back what it wrote`);
  }
  closeSync(fd);
  assertSameAs(img, ref);
  if (!w.o.includes('Flat')) assertClean(img);
}

for (const [i, w] of WORKLOADS.entries()) {
  test(`random writes on ${w.name}: qemu-img compare identical, check clean`, async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    using s = scratchDir();
    await workload(s.dir, w, 11 + i);
  });
}

test('writes change the CID once, keep every ddb key and comment; zero grains with zeroed_grain', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  using s = scratchDir();
  ok(['create', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', 'f.vmdk', '1M'], s.dir);
  const before = readFileSync(join(s.dir, 'f.vmdk'), 'utf8') + 'ddb.uuid = "60 00 C2 9a"\n# a comment\n';
  const { writeFileSync } = await import('node:fs');
  writeFileSync(join(s.dir, 'f.vmdk'), before);
  {
    await using dev = await openImage(join(s.dir, 'f.vmdk'), { readOnly: false });
    await dev.pwrite(new Uint8Array(512).fill(7), 0);
    await dev.pwrite(new Uint8Array(512).fill(8), 512);
  }
  const after = readFileSync(join(s.dir, 'f.vmdk'), 'utf8');
  assert.notEqual(after, before);
  assert.equal(after.replace(/^CID=\w+/m, ''), before.replace(/^CID=\w+/m, ''));

  ok(['create', '-f', 'vmdk', '-o', 'zeroed_grain=on', 'z.vmdk', '4M'], s.dir);
  {
    await using dev = await openImage(join(s.dir, 'z.vmdk'), { readOnly: false });
    await dev.pwrite(new Uint8Array(256 * KiB).fill(1), 0);
    await dev.writeZeroes(64 * KiB, 128 * KiB, { mayTrim: false });
  }
  const map = JSON.parse(qemu(s.dir, 'map', '--output=json', 'z.vmdk')) as Array<{ start: number; zero: boolean; data: boolean }>;
  assert.ok(
    map.some((m) => m.start === 64 * KiB && m.zero && !m.data),
    JSON.stringify(map),
  );
  assertClean(join(s.dir, 'z.vmdk'));
});

/** What vmdkinfo says: disk type, media size, and every extent (file, type, size). */
function vmdkinfo(img: string): { type: string; size: number; extents: Array<{ file: string; type: string; size: number }> } {
  const out = run('vmdkinfo', [img], { cwd: dirname(img) }).stdout;
  const bytes = (l: string): number => Number(/\((\d+) bytes\)/.exec(l)?.[1]);
  const type = /Disk type:\s*(.+)/.exec(out)?.[1]?.trim() ?? '';
  const size = bytes(/Media size:.*/.exec(out)?.[0] ?? '');
  const extents: Array<{ file: string; type: string; size: number }> = [];
  for (const part of out.split(/\nExtent: \d+\n/).slice(1)) {
    extents.push({
      file: /Filename:\s*(.+)/.exec(part)?.[1]?.trim() ?? '',
      type: /Type:\s*(.+)/.exec(part)?.[1]?.trim() ?? '',
      size: bytes(/\tSize:.*/.exec(part)?.[0] ?? ''),
    });
  }
  return { type, size, extents };
}

const CONVERTS: Array<{ sub: string; vmdkinfoType: string; extentType: string }> = [
  { sub: 'monolithicSparse', vmdkinfoType: 'Monolithic sparse', extentType: 'Sparse' },
  { sub: 'monolithicFlat', vmdkinfoType: 'Monolithic flat', extentType: 'Flat' },
  { sub: 'twoGbMaxExtentSparse', vmdkinfoType: '2GB extent sparse', extentType: 'Sparse' },
  { sub: 'twoGbMaxExtentFlat', vmdkinfoType: '2GB extent flat', extentType: 'Flat' },
  { sub: 'streamOptimized', vmdkinfoType: 'Stream optimized', extentType: 'Sparse' },
];

test('convert raw and qcow2 to every subformat: qemu-img compare identical, check clean, vmdkinfo agrees', (t) => {
  if (!needTools(t, 'qemu-img', 'vmdkinfo')) return;
  using s = scratchDir();
  // A small raw source, and a qcow2 one past 2 GiB (two extents for the split subformats; a raw
  // source that large would be read whole, as Node cannot find its holes).
  const data = mixedRaw(3 * MiB, 5);
  const sources: Array<{ file: string; raw: string; size: number }> = [];
  for (const [name, size, offs] of [
    ['small', 40 * MiB + 512, [0, 33 * MiB - 1000, 40 * MiB + 512 - data.length]],
    ['big', 2048 * MiB + 8 * MiB, [0, 33 * MiB - 1000, 2048 * MiB - MiB - 7]],
  ] as const) {
    const raw = join(s.dir, `${name}.raw`);
    const fd = openSync(raw, 'w');
    for (const off of offs) writeSync(fd, data, 0, data.length, off);
    closeSync(fd);
    run('truncate', ['-s', String(size), raw]);
    if (name === 'big') qemu(s.dir, 'convert', '-f', 'raw', '-O', 'qcow2', `${name}.raw`, `${name}.qcow2`);
    sources.push({ file: name === 'big' ? `${name}.qcow2` : `${name}.raw`, raw, size });
  }
  for (const c of CONVERTS) {
    for (const src of sources) {
      const out = `${c.sub}-${src.file.replace('.', '-')}.vmdk`;
      ok(['convert', '-O', 'vmdk', '-o', `subformat=${c.sub}`, src.file, out], s.dir);
      assertSameAs(join(s.dir, out), src.raw);
      if (!c.sub.endsWith('Flat')) assertClean(join(s.dir, out));
      const info = vmdkinfo(join(s.dir, out));
      assert.equal(info.type, c.vmdkinfoType, `${out}: vmdkinfo disk type`);
      assert.equal(info.size, src.size, `${out}: vmdkinfo media size`);
      const split = c.sub.startsWith('twoGb') && src.size > 2048 * MiB;
      assert.deepEqual(
        info.extents.map((e) => [e.type, e.size]),
        split
          ? [
              [c.extentType, 2048 * MiB],
              [c.extentType, src.size - 2048 * MiB],
            ]
          : [[c.extentType, src.size]],
        `${out}: vmdkinfo extents`,
      );
    }
  }
});

test('streamOptimized is written in one forward pass: into a pipe and a FIFO; qemu-img convert and vmdkinfo accept it', async (t) => {
  if (!needTools(t, 'qemu-img', 'vmdkinfo', 'mkfifo')) return;
  using s = scratchDir();
  const size = 70 * MiB + 512 * 3; // not a whole grain: a partial last grain
  const raw = join(s.dir, 'src.raw');
  const fd = openSync(raw, 'w');
  const data = mixedRaw(2 * MiB, 9);
  for (const off of [0, 32 * MiB - 4096, size - data.length]) writeSync(fd, data, 0, data.length, off);
  closeSync(fd);
  run('truncate', ['-s', String(size), raw]);

  // 1. stdout piped into a file: a pipe cannot seek.
  const piped = await new Promise<Buffer>((res, rej) => {
    const child = spawn(process.execPath, [RBLOCK, 'convert', '-O', 'vmdk', '--preset', 'esxi', 'src.raw', '/dev/stdout'], {
      cwd: s.dir,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const chunks: Buffer[] = [];
    let err = '';
    child.stdout.on('data', (d: Buffer) => chunks.push(d));
    child.stderr.on('data', (d: Buffer) => (err += String(d)));
    child.on('error', rej);
    child.on('close', (code) => (code === 0 ? res(Buffer.concat(chunks)) : rej(new Error(`convert to a pipe exited ${code}: ${err}`))));
  });
  const { writeFileSync } = await import('node:fs');
  writeFileSync(join(s.dir, 'piped.vmdk'), piped);
  // 2. a FIFO read by cat.
  run('mkfifo', [join(s.dir, 'fifo')]);
  const cat = spawn('sh', ['-c', 'cat fifo > fifo.vmdk'], { cwd: s.dir });
  const catDone = new Promise<number>((res) => cat.on('close', (c) => res(c ?? -1)));
  ok(['convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', 'src.raw', 'fifo'], s.dir);
  assert.equal(await catDone, 0);

  for (const f of ['piped.vmdk', 'fifo.vmdk']) {
    const img = join(s.dir, f);
    const head = readFileSync(img).subarray(0, 512);
    assert.equal(head.readUInt32LE(4), 3, `${f}: version 3 header`);
    assert.equal(head.readBigUInt64LE(56), 0xffff_ffff_ffff_ffffn, `${f}: GD_AT_END`);
    assertSameAs(img, raw);
    assertClean(img);
    qemu(s.dir, 'convert', '-O', 'raw', f, `${f}.raw`);
    assert.ok(readFileSync(join(s.dir, `${f}.raw`)).equals(readFileSync(raw)), `${f}: qemu-img convert gives the source back`);
    const info = vmdkinfo(img);
    assert.equal(info.type, 'Stream optimized');
    assert.equal(info.size, size);
    assert.equal(info.extents.length, 1);
  }
  // The esxi preset: a SCSI adapter in the descriptor.
  assert.match(piped.subarray(512, 2048).toString('latin1'), /ddb\.adapterType = "lsilogic"/);
  // rblock reads its own stream back.
  ok(['read', 'piped.vmdk', '--output', 'back.raw'], s.dir);
  assert.ok(readFileSync(join(s.dir, 'back.raw')).equals(readFileSync(raw)));
});

test('crash safety: SIGKILL at random moments leaves a disk qemu-img checks clean, with flushed data kept', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  using s = scratchDir();
  const r = rng(7);
  const child = join(dirname(RBLOCK), '..', 'dist', 'test', 'helpers', 'crash-writer.js');
  const slots = 96;
  const block = 40 * KiB; // not a grain: writes straddle grains, some partial
  for (let round = 0; round < 6; round++) {
    const img = join(s.dir, `crash${round}.vmdk`);
    ok(
      ['create', '-f', 'vmdk', '-o', round % 2 === 0 ? 'zeroed_grain=on' : 'subformat=twoGbMaxExtentSparse', img, String(slots * block)],
      s.dir,
    );
    const p = spawn(process.execPath, [child, img, String(slots), String(block)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let lastFlushed = -1;
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => {
      for (const m of d.toString().matchAll(/flushed (\d+)/g)) lastFlushed = Number(m[1]);
    });
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const delay = 250 + Math.floor(r() * 500);
    await new Promise((res) => setTimeout(res, delay));
    p.kill('SIGKILL');
    await new Promise((res) => p.on('close', res));
    assert.equal(stderr, '', `writer failed: ${stderr}`);
    assertClean(img);
    if (lastFlushed < 0) continue;
    const lastWriteOf = new Map<number, number>();
    for (let i = 0; i <= lastFlushed; i++) lastWriteOf.set((i * 7919) % slots, i);
    const writtenLater = new Set<number>();
    for (let i = lastFlushed + 1; i < lastFlushed + 10_000; i++) writtenLater.add((i * 7919) % slots);
    await using d = await openImage(img);
    const buf = new Uint8Array(block);
    for (const [slot, i] of lastWriteOf) {
      if (writtenLater.has(slot)) continue;
      await d.pread(buf, slot * block);
      const want = i % 11 === 5 ? new Uint8Array(block) : pattern(block, i);
      assert.ok(Buffer.from(buf).equals(Buffer.from(want)), `round ${round}: slot ${slot} (write ${i}, flushed by ${lastFlushed}) lost`);
    }
  }
});

test('check: leaked grains, a redundant table out of step, a grain past EOF, a broken CID chain; -r repairs the safe ones', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  using s = scratchDir();
  const check = (...args: string[]): { status: number; out: string; err: string } => {
    const r = rblock(['check', ...args], { cwd: s.dir });
    return { status: r.status, out: r.stdout, err: r.stderr };
  };
  // 4 MiB: redundant GT at sector 22, primary GT at sector 27, grains from 0x10000.
  ok(['create', '-f', 'vmdk', 'd.vmdk', '4M'], s.dir);
  {
    await using dev = await openImage(join(s.dir, 'd.vmdk'), { readOnly: false });
    await dev.pwrite(pattern(200 * KiB, 3), 100 * KiB);
  }
  assert.equal(check('d.vmdk').status, 0);
  const img = join(s.dir, 'd.vmdk');
  // 1. A grain written but never entered (a kill between the data and the table): a leak.
  const fd = openSync(img, 'r+');
  writeSync(fd, new Uint8Array(64 * KiB).fill(9), 0, 64 * KiB, statSync(img).size);
  let r = check('d.vmdk');
  assert.equal(r.status, 3, r.out + r.err);
  assert.match(r.out, /1 leaked clusters were found/);
  r = check('-r', 'leaks', 'd.vmdk');
  assert.equal(r.status, 0, r.out + r.err);
  assert.match(r.out, /1 leaked clusters/);
  assertClean(img);
  // 2. The redundant table one step behind.
  writeSync(fd, new Uint8Array(4), 0, 4, 22 * 512 + 2 * 4);
  r = check('d.vmdk');
  assert.equal(r.status, 2, r.out + r.err);
  assert.match(r.err, /differs from the one in use in 1 entries/);
  assert.equal(check('-r', 'all', 'd.vmdk').status, 0);
  assert.equal(check('d.vmdk').status, 0);
  // 3. A grain past the end of the file: QEMU's finding and message.
  const far = Buffer.alloc(4);
  far.writeUInt32LE(0x100000);
  writeSync(fd, far, 0, 4, 27 * 512 + 7 * 4);
  closeSync(fd);
  r = check('d.vmdk');
  assert.equal(r.status, 2, r.out + r.err);
  assert.match(r.err, /cluster offset for sector 896 points after EOF/);
  // qemu-img 7.2 finds it too (and then gives up: "Check failed").
  assert.match(run('qemu-img', ['check', img], { check: false }).stderr, /cluster offset for sector 896 points after EOF/);
  // 4. A delta disk whose parent changed after it was made.
  ok(['create', '-f', 'vmdk', 'p.vmdk', '4M'], s.dir);
  ok(['create', '-f', 'vmdk', '-b', 'p.vmdk', 'c.vmdk'], s.dir);
  assert.equal(check('c.vmdk').status, 0);
  {
    await using dev = await openImage(join(s.dir, 'p.vmdk'), { readOnly: false });
    await dev.pwrite(new Uint8Array(512).fill(1), 0);
  }
  r = check('c.vmdk');
  assert.equal(r.status, 2, r.out + r.err);
  assert.match(r.err, /CID chain is broken/);
});
