/**
 * The qcow2 writer against the real qemu-img: seeded random workloads checked
 * against an in-memory reference, then `qemu-img check` (no errors, no leaks)
 * and `qemu-img compare` with the reference; create and convert outputs
 * checked the same way; a writer killed with SIGKILL many times never leaves
 * corruption and never loses flushed data.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import test from 'node:test';
import { openImage, isBlockError } from '../../src/index.js';
import { pattern, rng } from '../helpers/rng.js';
import { needTools, rblock, run, scratchDir, ROOT } from '../helpers/tools.js';

const MiB = 1 << 20;

function qemuCheck(img: string): { status: number; out: string } {
  // qemu 7.2 resolves a relative data_file against its working directory: run it beside the image.
  const r = run('qemu-img', ['check', img], { check: false, cwd: dirname(img) });
  return { status: r.status, out: r.stdout + r.stderr };
}

function assertClean(img: string): void {
  const c = qemuCheck(img);
  assert.equal(c.status, 0, `qemu-img check ${img}:\n${c.out}`);
  assert.match(c.out, /No errors were found on the image/);
}

function assertSameAs(img: string, rawRef: string): void {
  const r = run('qemu-img', ['compare', '-F', 'raw', img, rawRef], { check: false, cwd: dirname(img) });
  assert.equal(r.status, 0, `qemu-img compare ${img} ${rawRef}: ${r.stdout}${r.stderr}`);
}

interface Layout {
  name: string;
  create: string[];
  size: number;
  /** Prepare content with qemu before rblock writes (qemu-io commands or a convert). */
  prepare?: (dir: string, img: string) => void;
  /** prepare makes the image itself (instead of modifying a created one). */
  prepareCreates?: boolean;
  backing?: boolean;
  discardZeroes: boolean;
}

const LAYOUTS: Layout[] = [
  { name: 'default 64K v3', create: ['-f', 'qcow2'], size: 8 * MiB, discardZeroes: true },
  { name: '512-byte clusters', create: ['-f', 'qcow2', '-o', 'cluster_size=512'], size: 2 * MiB, discardZeroes: true },
  {
    name: '2M clusters, 64-bit refcounts',
    create: ['-f', 'qcow2', '-o', 'cluster_size=2M,refcount_bits=64'],
    size: 12 * MiB + 4096,
    discardZeroes: true,
  },
  {
    name: '1-bit refcounts, 4K clusters',
    create: ['-f', 'qcow2', '-o', 'refcount_bits=1,cluster_size=4096'],
    size: 6 * MiB,
    discardZeroes: true,
  },
  { name: 'compat 0.10', create: ['-f', 'qcow2', '-o', 'compat=0.10'], size: 8 * MiB, discardZeroes: true },
  {
    name: 'over qemu-io data and zero clusters',
    create: ['-f', 'qcow2'],
    size: 8 * MiB,
    discardZeroes: true,
    prepare: (_dir, img) => run('qemu-io', ['-c', 'write -P 0x61 0 3M', '-c', 'write -z 1M 512k', '-c', 'write -P 0x62 5M 100k', img]),
  },
  {
    name: 'over compressed clusters',
    create: ['-f', 'qcow2'],
    size: 8 * MiB,
    discardZeroes: true,
    prepareCreates: true,
    prepare: (dir, img) => {
      const raw = join(dir, 'c.raw');
      const b = Buffer.alloc(8 * MiB);
      for (let i = 0; i < b.length; i++) b[i] = (i >> 9) % 3 === 0 ? 0 : 65 + ((i * 7) % 26);
      writeFileSync(raw, b);
      run('qemu-img', ['convert', '-c', '-O', 'qcow2', raw, img]);
    },
  },
  { name: 'with a backing chain', create: ['-f', 'qcow2'], size: 8 * MiB, backing: true, discardZeroes: true },
  { name: 'v2 with a backing chain', create: ['-f', 'qcow2', '-o', 'compat=0.10'], size: 8 * MiB, backing: true, discardZeroes: false },
  { name: 'extended L2 (subclusters)', create: ['-f', 'qcow2', '-o', 'extended_l2=on'], size: 8 * MiB, discardZeroes: true },
  {
    name: 'extended L2, 2M clusters, over qemu-io subcluster writes',
    create: ['-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=2M'],
    size: 10 * MiB,
    discardZeroes: true,
    prepare: (_dir, img) => run('qemu-io', ['-c', 'write -P 0x41 64k 200k', '-c', 'write -z 1M 128k', '-c', 'write -P 0x42 3M 70k', img]),
  },
  {
    name: 'extended L2 with a backing chain',
    create: ['-f', 'qcow2', '-o', 'extended_l2=on'],
    size: 8 * MiB,
    backing: true,
    discardZeroes: true,
  },
  { name: 'external data file', create: ['-f', 'qcow2', '-o', 'data_file=img.data'], size: 8 * MiB, discardZeroes: true },
];

for (const [li, layout] of LAYOUTS.entries()) {
  test(`writer model: ${layout.name}`, { timeout: 120_000 }, async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    using s = scratchDir();
    const img = join(s.dir, 'img.qcow2');
    if (layout.backing) {
      const base = join(s.dir, 'base.qcow2');
      run('qemu-img', ['create', '-q', ...layout.create, base, String(layout.size)]);
      run('qemu-io', ['-c', 'write -P 0x33 0 5M', '-c', 'write -z 6M 64k', base]);
      run('qemu-img', ['create', '-q', ...layout.create, '-b', 'base.qcow2', '-F', 'qcow2', img]);
    } else if (layout.prepareCreates && layout.prepare !== undefined) {
      layout.prepare(s.dir, img);
    } else {
      // From the image's directory: qemu 7.2 resolves a relative data_file against the working directory.
      run('qemu-img', ['create', '-q', ...layout.create, img, String(layout.size)], { cwd: s.dir });
      layout.prepare?.(s.dir, img);
    }
    const ref = new Uint8Array(layout.size);
    {
      await using d = await openImage(img);
      assert.equal(d.size, layout.size);
      await d.pread(ref, 0);
    }
    const r = rng(1000 + li);
    let dev = await openImage(img, { readOnly: false });
    const cs = Number(/cluster_size=(\d+[KM]?)/.exec(layout.create.join(' '))?.[1]?.replace('K', '000').replace('2M', '2097152') ?? 65536);
    try {
      for (let batch = 0; batch < 12; batch++) {
        for (let i = 0; i < 120; i++) {
          const off = Math.floor(r() * layout.size);
          const len = Math.max(1, Math.min(layout.size - off, Math.floor(r() * (r() < 0.7 ? 9000 : 400_000))));
          const op = r();
          if (op < 0.62) {
            const b = pattern(len, batch * 1000 + i);
            await dev.pwrite(b, off);
            ref.set(b, off);
          } else if (op < 0.82) {
            await dev.writeZeroes(off, len, { mayTrim: r() < 0.5 });
            ref.fill(0, off, off + len);
          } else if (op < 0.9 && layout.discardZeroes) {
            // Discard frees whole clusters only; they then read as zeros (v3, or v2 without backing).
            const start = Math.ceil(off / cs) * cs;
            const end = Math.min(layout.size, Math.floor((off + len) / cs) * cs);
            await dev.discard(off, len);
            if (end > start) ref.fill(0, start, end);
          } else if (op < 0.96) {
            await dev.flush();
          } else {
            await dev.close();
            dev = await openImage(img, { readOnly: false });
          }
        }
        const got = new Uint8Array(layout.size);
        await dev.pread(got, 0);
        assert.ok(Buffer.from(got).equals(Buffer.from(ref)), `content differs from the reference after batch ${batch}`);
      }
    } finally {
      await dev.close();
    }
    const refPath = join(s.dir, 'ref.raw');
    writeFileSync(refPath, ref);
    assertClean(img);
    assertSameAs(img, refPath);
  });
}

test('writer refuses images it cannot write safely, with a clear error', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  using s = scratchDir();
  const cases: [string, string[], (img: string) => void][] = [
    ['internal snapshots', [], (img) => run('qemu-img', ['snapshot', '-c', 'snap', img])],
    ['bitmaps', [], (img) => run('qemu-img', ['bitmap', '--add', img, 'bm0'])],
  ];
  for (const [name, opts, after] of cases) {
    const img = join(s.dir, `${name.replace(/ /g, '_')}.qcow2`);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', ...opts, img, '4M']);
    after(img);
    await assert.rejects(openImage(img, { readOnly: false }), (e: unknown) => {
      assert.ok(isBlockError(e, 'not-supported'), `${name}: ${String(e)}`);
      assert.match((e as Error).message, /cannot open for writing/);
      assert.ok((e as Error).message.includes(img));
      return true;
    });
    assertClean(img);
  }
});

test('create: byte-identical to qemu-img create, and clean for every option', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  using s = scratchDir();
  const same: string[][] = [['1G'], ['-o', 'compat=0.10', '1G'], ['-o', 'cluster_size=4096', '64M'], ['-o', 'refcount_bits=64', '10G']];
  for (const args of same) {
    const a = join(s.dir, 'a.qcow2');
    const b = join(s.dir, 'b.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', ...args.slice(0, -1), a, args[args.length - 1] as string]);
    const r = rblock(['create', '-q', '-f', 'qcow2', ...args.slice(0, -1), b, args[args.length - 1] as string]);
    assert.equal(r.status, 0, r.stderr);
    assert.ok(readFileSync(a).equals(readFileSync(b)), `create ${args.join(' ')} differs from qemu-img`);
  }
  const opts = [
    'cluster_size=512',
    'cluster_size=2M,refcount_bits=1',
    'extended_l2=on',
    'compression_type=zstd,lazy_refcounts=on',
    'preallocation=metadata',
    'preallocation=full',
    'data_file=x.data,data_file_raw=on',
  ];
  for (const o of opts) {
    const img = join(s.dir, 'o.qcow2');
    const r = rblock(['create', '-q', '-f', 'qcow2', '-o', o, img, '20M']);
    assert.equal(r.status, 0, r.stderr);
    assertClean(img);
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', img], { cwd: s.dir }).stdout) as { 'virtual-size': number };
    assert.equal(info['virtual-size'], 20 * MiB);
  }
  // The size defaults to the backing file's; the name is kept relative.
  const base = join(s.dir, 'base.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '48M']);
  const ov = join(s.dir, 'ov.qcow2');
  assert.equal(rblock(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', ov]).status, 0);
  const info = JSON.parse(run('qemu-img', ['info', '--output=json', ov]).stdout) as Record<string, unknown>;
  assert.equal(info['virtual-size'], 48 * MiB);
  assert.equal(info['backing-filename'], 'base.qcow2');
  const bad = rblock(['create', '-f', 'qcow2', '-o', 'cluster_size=512', join(s.dir, 'huge.qcow2'), '1T']);
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /L1 table larger than 32 MiB/);
});

test('convert: raw, qcow2, compressed zlib and zstd, chains flattened; sparse and clean', { timeout: 120_000 }, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  using s = scratchDir();
  const src = join(s.dir, 'src.raw');
  const r = rng(7);
  const b = Buffer.alloc(24 * MiB);
  // 4 MiB random, 6 MiB zeros, text, a 1 MiB repeated pattern, zeros, a non-cluster-multiple tail.
  for (let i = 0; i < 4 * MiB; i++) b[i] = Math.floor(r() * 256);
  for (let i = 12 * MiB; i < 15 * MiB; i++) b[i] = 97 + (i % 13);
  b.fill(0xee, 18 * MiB, 19 * MiB);
  writeFileSync(src, b.subarray(0, 24 * MiB - 1000));
  const nonZeroClusters = (cs: number): number => {
    let n = 0;
    for (let c = 0; c * cs < 24 * MiB - 1000; c++)
      if (b.subarray(c * cs, Math.min((c + 1) * cs, 24 * MiB - 1000)).some((x) => x !== 0)) n++;
    return n;
  };
  for (const args of [
    ['-O', 'qcow2'],
    ['-c', '-O', 'qcow2'],
    ['-c', '-O', 'qcow2', '-o', 'compression_type=zstd'],
    ['-O', 'qcow2', '-o', 'cluster_size=4096'],
  ]) {
    const out = join(s.dir, 'out.qcow2');
    const res = rblock(['convert', ...args, src, out]);
    assert.equal(res.status, 0, res.stderr);
    assertClean(out);
    assertSameAs(out, src);
    const map = JSON.parse(run('qemu-img', ['map', '--output=json', out]).stdout) as { length: number; data: boolean; start: number }[];
    const cs = args.includes('cluster_size=4096') ? 4096 : 65536;
    const allocated = map.filter((m) => m.data).reduce((n, m) => n + Math.ceil(m.length / cs), 0);
    assert.equal(allocated, nonZeroClusters(cs), `${args.join(' ')}: zero clusters must not be allocated`);
    if (args.includes('-c')) {
      const chk = qemuCheck(out).out;
      assert.match(chk, /[1-9][0-9.]*% compressed clusters/, chk);
    }
    // And back to raw: identical, sparse.
    const back = join(s.dir, 'back.raw');
    assert.equal(rblock(['convert', '-O', 'raw', out, back]).status, 0);
    // Like qemu-img, a new image is rounded up to whole 512-byte sectors (zeros at the end).
    const srcBytes = readFileSync(src);
    const want = Buffer.concat([srcBytes, Buffer.alloc(Math.ceil(srcBytes.length / 512) * 512 - srcBytes.length)]);
    assert.ok(readFileSync(back).equals(want));
  }
  // A chain flattened into one image.
  const base = join(s.dir, 'base.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '16M']);
  run('qemu-io', ['-c', 'write -P 0x11 0 8M', base]);
  const top = join(s.dir, 'top.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
  run('qemu-io', ['-c', 'write -P 0x22 1M 2M', '-c', 'write -z 5M 1M', top]);
  const flat = join(s.dir, 'flat.qcow2');
  assert.equal(rblock(['convert', '-O', 'qcow2', top, flat]).status, 0);
  assertClean(flat);
  assert.equal(run('qemu-img', ['compare', top, flat], { check: false }).status, 0);
  const info = JSON.parse(run('qemu-img', ['info', '--output=json', flat]).stdout) as Record<string, unknown>;
  assert.equal(info['backing-filename'], undefined);
});

test('crash safety: SIGKILL at random moments leaves no corruption and keeps flushed data', { timeout: 240_000 }, async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  using s = scratchDir();
  const r = rng(99);
  const child = join(ROOT, 'dist', 'test', 'helpers', 'crash-writer.js');
  const configs = [
    { opts: 'cluster_size=65536', slots: 96, block: 24 * 1024 },
    { opts: 'cluster_size=4096,refcount_bits=1', slots: 200, block: 6000 },
  ];
  let kills = 0;
  for (let round = 0; round < 56; round++) {
    const cfg = configs[round % configs.length]!;
    const img = join(s.dir, `crash${round}.qcow2`);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', cfg.opts, img, String(cfg.slots * cfg.block)]);
    const p = spawn(process.execPath, [child, img, String(cfg.slots), String(cfg.block)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let lastFlushed = -1;
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => {
      for (const m of d.toString().matchAll(/flushed (\d+)/g)) lastFlushed = Number(m[1]);
    });
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const delay = 150 + Math.floor(r() * 600);
    await new Promise((res) => setTimeout(res, delay));
    p.kill('SIGKILL');
    await new Promise((res) => p.on('close', res));
    assert.equal(stderr, '', `writer failed: ${stderr}`);
    kills++;
    const chk = qemuCheck(img);
    // 0 = clean, 3 = leaked clusters only; 2 would be corruption.
    assert.ok(chk.status === 0 || chk.status === 3, `round ${round} (killed after ${delay} ms): qemu-img check:\n${chk.out}`);
    // Every slot whose last write came at or before the last flush must read back exactly.
    if (lastFlushed < 0) continue;
    const lastWriteOf = new Map<number, number>();
    for (let i = 0; i <= lastFlushed; i++) lastWriteOf.set((i * 7919) % cfg.slots, i);
    const writtenLater = new Set<number>();
    for (let i = lastFlushed + 1; i < lastFlushed + 10_000; i++) writtenLater.add((i * 7919) % cfg.slots);
    await using d = await openImage(img);
    const buf = new Uint8Array(cfg.block);
    for (const [slot, i] of lastWriteOf) {
      if (writtenLater.has(slot)) continue;
      await d.pread(buf, slot * cfg.block);
      const want = i % 11 === 5 ? new Uint8Array(cfg.block) : pattern(cfg.block, i);
      assert.ok(Buffer.from(buf).equals(Buffer.from(want)), `round ${round}: slot ${slot} (write ${i}, flushed by ${lastFlushed}) lost`);
    }
  }
  assert.ok(kills >= 50);
});
