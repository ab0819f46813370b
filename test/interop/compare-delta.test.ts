/**
 * `rblock compare` and `rblock delta` against the real qemu-img.
 *
 * compare: pairs of disks (raw and qcow2) that differ by a known, seeded set
 * of writes (unaligned, straddling clusters, zero writes, a size difference);
 * the test computes the exact set of changed 512-byte sectors from the bytes
 * and rblock must list exactly that set, agree with `qemu-img compare` on
 * identical/different, on the first differing offset and on the exit code
 * (identical, different, missing file), and in strict mode (-s) on an
 * allocation-only difference and a size difference.
 *
 * delta: the delta reads as TARGET (`qemu-img compare`), is clean (`qemu-img
 * check`), names BASE as its backing file (`qemu-img info`), and allocates
 * exactly the clusters that contain a change (`qemu-img map`, depth 0).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, copyFileSync, mkdirSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { join, resolve } from 'node:path';
import test from 'node:test';
import { pattern, rng } from '../helpers/rng.js';
import { needTools, RBLOCK, rblock, run, scratchDir, type RunResult } from '../helpers/tools.js';
import { mixedRaw } from './qemu.js';

const MiB = 1 << 20;
const SECTOR = 512;

interface CompareJson {
  identical: boolean;
  firstMismatch: number | null;
  reason: string | null;
  unit: 'bytes' | 'sectors';
  ranges: { start: number; length: number }[];
  changedSectors: number;
  changedBytes: number;
  sizeA: number;
  sizeB: number;
  sizeMismatch: boolean;
  strict: boolean;
}

interface DeltaJson {
  delta: string;
  size: number;
  clusterSize: number;
  clusters: number;
  bytes: number;
  backingFile: string;
  backingFormat: string;
}

/** Apply a seeded set of writes to a copy of `base`, grown or shrunk to `size`. */
function mutate(base: Buffer, size: number, seed: number, writes: number): Buffer {
  const out = Buffer.alloc(size);
  base.copy(out, 0, 0, Math.min(base.length, size));
  const r = rng(seed);
  const put = (off: number, data: Uint8Array): void => {
    const n = Math.max(0, Math.min(data.length, size - off));
    out.set(data.subarray(0, n), off);
  };
  // Fixed shapes first: straddling a 64 KiB cluster boundary, one byte, a whole aligned cluster,
  // a zero write over data, and a rewrite of bytes already there (no change).
  put(5 * 65536 - 100, pattern(300, seed + 1));
  put(777_777, Uint8Array.of(0xee));
  put(9 * 65536, pattern(65536, seed + 2));
  out.fill(0, 100, 100 + 70_000);
  put(2 * MiB + 3, base.subarray(2 * MiB + 3, 2 * MiB + 5000));
  for (let k = 0; k < writes; k++) {
    const off = Math.floor(r() * size);
    const len = 1 + Math.floor(r() * (r() < 0.4 ? 700 : 150_000));
    const kind = r();
    if (kind < 0.25) out.fill(0, off, Math.min(size, off + len));
    else put(off, pattern(len, seed * 1000 + k));
  }
  return out;
}

/** The sectors whose bytes differ (the shorter buffer reads as zeros past its end). */
function changedSectors(a: Buffer, b: Buffer): number[] {
  const size = Math.max(a.length, b.length);
  const z = Buffer.alloc(SECTOR);
  const sector = (x: Buffer, s: number, e: number): Buffer => {
    if (s >= x.length) return z.subarray(0, e - s);
    if (e <= x.length) return x.subarray(s, e);
    return Buffer.concat([x.subarray(s), z.subarray(0, e - x.length)]);
  };
  const out: number[] = [];
  for (let s = 0; s < size; s += SECTOR) {
    const e = Math.min(size, s + SECTOR);
    if (!sector(a, s, e).equals(sector(b, s, e))) out.push(s / SECTOR);
  }
  return out;
}

/** Clusters of `target` whose bytes differ from `base` (zeros past base's end). */
function changedClusters(base: Buffer, target: Buffer, cs: number): number {
  let n = 0;
  const z = Buffer.alloc(cs);
  for (let c = 0; c < target.length; c += cs) {
    const e = Math.min(target.length, c + cs);
    const t = target.subarray(c, e);
    const b = c >= base.length ? z.subarray(0, e - c) : Buffer.concat([base.subarray(c, Math.min(e, base.length)), z]).subarray(0, e - c);
    if (!t.equals(b)) n++;
  }
  return n;
}

function expandSectors(ranges: { start: number; length: number }[]): number[] {
  const out: number[] = [];
  for (const r of ranges) for (let s = r.start; s < r.start + r.length; s++) out.push(s);
  return out;
}

/** Merged byte ranges of a sorted sector list, clipped to `size`. */
function byteRanges(sectors: number[], size: number): { start: number; length: number }[] {
  const out: { start: number; length: number }[] = [];
  for (const s of sectors) {
    const start = s * SECTOR;
    const end = Math.min(size, start + SECTOR);
    const last = out[out.length - 1];
    if (last !== undefined && last.start + last.length === start) last.length = end - last.start;
    else out.push({ start, length: end - start });
  }
  return out;
}

function qemuCompare(cwd: string, ...args: string[]): RunResult {
  return run('qemu-img', ['compare', ...args], { cwd, check: false });
}

function rblockJson<T>(cwd: string, args: string[], want: number): T {
  return parseJson<T>(rblock(args, { cwd }), args, want);
}

function parseJson<T>(r: RunResult, args: string[], want: number): T {
  assert.equal(r.status, want, `rblock ${args.join(' ')} exited ${r.status} (want ${want}): ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

/** The rblock CLI without blocking, so the commands of one check run side by side. */
function rblockAsync(args: string[], cwd: string): Promise<RunResult> {
  return new Promise((res, rej) => {
    const child = spawn(process.execPath, [RBLOCK, ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    child.on('error', rej);
    child.on('close', (code) =>
      res({ status: code ?? -1, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') }),
    );
  });
}

/** The offset in qemu-img compare's "Content mismatch at offset N!" line, or null. */
function qemuMismatch(out: string): number | null {
  const m = /Content mismatch at offset (\d+)!/.exec(out);
  return m === null ? null : Number(m[1]);
}

/**
 * The whole contract for one pair: exit code and first lines as qemu-img
 * compare, the exact sector set, byte ranges, and the same answer reversed.
 */
async function checkPair(cwd: string, a: string, b: string, fa: string, fb: string, want: number[], size: number): Promise<void> {
  const label = `${a} vs ${b}`;
  const argsS = ['compare', '-f', fa, '-F', fb, '--output', 'json', '--sectors', a, b];
  const argsB = ['compare', '-f', fa, '-F', fb, '--output', 'json', a, b];
  const argsH = ['compare', '-f', fa, '-F', fb, a, b];
  const argsW = ['compare', '-f', fb, '-F', fa, '--output', 'json', '--sectors', b, a];
  const pending = Promise.all([argsS, argsB, argsH, argsW].map((x) => rblockAsync(x, cwd)));
  const q = qemuCompare(cwd, '-f', fa, '-F', fb, a, b);
  const [outS, outB, h, outW] = await pending;
  assert.ok(q.status === 0 || q.status === 1, `${label}: qemu-img compare failed: ${q.stderr}`);
  const rs = parseJson<CompareJson>(outS!, argsS, q.status);
  assert.equal(rs.identical, q.status === 0, `${label}: identical`);
  assert.equal(rs.unit, 'sectors');
  assert.deepEqual(expandSectors(rs.ranges), want, `${label}: changed sectors differ from the computed set`);
  assert.equal(rs.changedSectors, want.length, `${label}: changedSectors`);
  assert.equal(rs.firstMismatch, qemuMismatch(q.stdout), `${label}: first mismatch differs from qemu-img (${q.stdout.trim()})`);
  assert.equal(rs.firstMismatch, want.length === 0 ? null : want[0]! * SECTOR, `${label}: first mismatch`);

  const rb = parseJson<CompareJson>(outB!, argsB, q.status);
  assert.equal(rb.unit, 'bytes');
  assert.deepEqual(rb.ranges, byteRanges(want, size), `${label}: byte ranges`);
  assert.equal(
    rb.changedBytes,
    rb.ranges.reduce((n, r) => n + r.length, 0),
  );

  // Human output: qemu-img compare's lines first, then the ranges.
  assert.equal(h!.status, q.status, `${label}: human exit code`);
  const qLines = q.stdout.trimEnd().split('\n');
  assert.deepEqual(h!.stdout.split('\n').slice(0, qLines.length), qLines, `${label}: first lines differ from qemu-img compare`);

  // Swapped arguments: the same ranges.
  const sw = parseJson<CompareJson>(outW!, argsW, q.status);
  assert.deepEqual(sw.ranges, rs.ranges, `${label}: swapped arguments give other ranges`);
}

test('compare and delta against qemu-img', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  using scratch = scratchDir('rblock-cmp-');
  const dir = scratch.dir;
  const size = 12 * MiB;
  const A = mixedRaw(size, 11);
  const B = mutate(A, size, 42, 60);
  const bigSize = size + MiB + 3 * SECTOR;
  const Bbig = mutate(A, bigSize, 43, 60);
  // Grown with zeros only: equal to A unless strict.
  const Azero = Buffer.concat([A, Buffer.alloc(MiB + SECTOR)]);
  writeFileSync(join(dir, 'a.raw'), A);
  writeFileSync(join(dir, 'b.raw'), B);
  writeFileSync(join(dir, 'big.raw'), Bbig);
  writeFileSync(join(dir, 'azero.raw'), Azero);
  copyFileSync(join(dir, 'a.raw'), join(dir, 'a-copy.raw'));
  for (const n of ['a', 'b', 'big']) run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', `${n}.raw`, `${n}.qcow2`], { cwd: dir });
  assert.ok(
    Bbig.subarray(size).some((x) => x !== 0),
    'the grown part of big.raw has data',
  );

  await t.test('raw vs raw: exact sectors, first offset and exit code as qemu-img', async () => {
    await checkPair(dir, 'a.raw', 'b.raw', 'raw', 'raw', changedSectors(A, B), size);
  });

  await t.test('different sizes, data in the extra part', async () => {
    await checkPair(dir, 'a.raw', 'big.raw', 'raw', 'raw', changedSectors(A, Bbig), bigSize);
    await checkPair(dir, 'a.qcow2', 'big.qcow2', 'qcow2', 'qcow2', changedSectors(A, Bbig), bigSize);
  });

  await t.test('qcow2 vs qcow2 and qcow2 vs raw', async () => {
    const want = changedSectors(A, B);
    await checkPair(dir, 'a.qcow2', 'b.qcow2', 'qcow2', 'qcow2', want, size);
    await checkPair(dir, 'a.qcow2', 'b.raw', 'qcow2', 'raw', want, size);
  });

  await t.test('identical images, and a larger image whose extra part is zeros', async () => {
    await checkPair(dir, 'a.raw', 'a-copy.raw', 'raw', 'raw', [], size);
    await checkPair(dir, 'a.raw', 'a.qcow2', 'raw', 'qcow2', [], size);
    await checkPair(dir, 'a.raw', 'azero.raw', 'raw', 'raw', [], Azero.length);
    // Strict: a size difference is a difference, whatever the content.
    const q = qemuCompare(dir, '-s', '-f', 'raw', '-F', 'raw', 'a.raw', 'azero.raw');
    assert.equal(q.status, 1);
    const r = rblock(['compare', '-s', 'a.raw', 'azero.raw'], { cwd: dir });
    assert.equal(r.status, 1, r.stderr);
    assert.equal(r.stdout.split('\n')[0], q.stdout.trim().split('\n')[0]);
    const j = rblockJson<CompareJson>(dir, ['compare', '-s', '--output', 'json', 'a.raw', 'azero.raw'], 1);
    assert.equal(j.sizeMismatch, true);
    assert.equal(j.reason, 'size');
    assert.deepEqual(j.ranges, [{ start: size, length: Azero.length - size }], 'strict: the extra part differs whole');
  });

  await t.test('sizes that are not whole sectors, as qemu-img (which counts whole sectors)', async () => {
    const odd = A.subarray(0, 3 * MiB + 1000);
    writeFileSync(join(dir, 'odd.raw'), odd);
    writeFileSync(join(dir, 'odd-z.raw'), Buffer.concat([odd, Buffer.of(0)]));
    writeFileSync(join(dir, 'odd-q.raw'), Buffer.concat([odd, Buffer.of(0x51)]));
    const cases: [string, number[]][] = [
      ['odd-z.raw', []],
      ['odd-q.raw', [Math.floor(odd.length / SECTOR)]],
    ];
    for (const [other, want] of cases) {
      for (const s of [[], ['-s']]) {
        const q = qemuCompare(dir, ...s, '-f', 'raw', '-F', 'raw', 'odd.raw', other);
        const [h, j] = await Promise.all([
          rblockAsync(['compare', ...s, 'odd.raw', other], dir),
          rblockAsync(['compare', ...s, '--output', 'json', '--sectors', 'odd.raw', other], dir),
        ]);
        const label = `odd.raw vs ${other} ${s.join('')}`;
        assert.equal(h.status, q.status, `${label}: exit code (qemu: ${q.stdout})`);
        assert.deepEqual(h.stdout.split('\n').slice(0, 1), q.stdout.split('\n').slice(0, 1), `${label}: first line`);
        if (s.length === 0) assert.deepEqual(expandSectors(parseJson<CompareJson>(j, [label], q.status).ranges), want, label);
      }
    }
    // A delta to an odd-sized target reads as it (qemu completes the last sector with zeros).
    const d = rblockJson<DeltaJson>(dir, ['delta', '--base', 'odd.raw', '--target', 'odd-q.raw', '-o', 'odd.qcow2', '--report', 'json'], 0);
    assert.equal(d.size, Math.ceil((odd.length + 1) / SECTOR) * SECTOR);
    assert.equal(d.clusters, 1);
    assert.equal(qemuCompare(dir, '-F', 'raw', 'odd.qcow2', 'odd-q.raw').status, 0);
    assert.equal(run('qemu-img', ['check', 'odd.qcow2'], { cwd: dir, check: false }).status, 0);
  });

  await t.test('exit code 2 for a missing file, as qemu-img', () => {
    const q = qemuCompare(dir, 'a.raw', 'missing.raw');
    assert.equal(q.status, 2);
    for (const args of [
      ['compare', 'a.raw', 'missing.raw'],
      ['compare', 'missing.raw', 'a.raw'],
      ['compare', '--output', 'json', 'a.raw', 'missing.raw'],
    ]) {
      const r = rblock(args, { cwd: dir });
      assert.equal(r.status, q.status, `rblock ${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, /missing\.raw/);
      assert.equal(r.stdout, '');
    }
  });

  await t.test('strict mode on an allocation-only difference', () => {
    // Cluster-aligned writes only (qemu folds host-file holes into the status of partly written
    // clusters), and the same last extent in both images (qemu's status word also carries an
    // end-of-image flag, so differently split trailing runs differ for it).
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'x.qcow2', '8M'], { cwd: dir });
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 3M 128k', '-c', 'write -P 0x33 7M 1M', 'x.qcow2'], {
      cwd: dir,
    });
    copyFileSync(join(dir, 'x.qcow2'), join(dir, 'y.qcow2'));
    // Zeros written as data where x has nothing allocated: same content, other allocation.
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0 5M 64k', 'y.qcow2'], { cwd: dir });
    for (const strict of [false, true]) {
      const s = strict ? ['-s'] : [];
      const q = qemuCompare(dir, ...s, 'x.qcow2', 'y.qcow2');
      assert.equal(q.status, strict ? 1 : 0, q.stdout + q.stderr);
      const r = rblock(['compare', ...s, 'x.qcow2', 'y.qcow2'], { cwd: dir });
      assert.equal(r.status, q.status, `rblock compare ${s.join('')}: ${r.stderr}`);
      assert.equal(r.stdout.split('\n')[0], q.stdout.trim().split('\n')[0]);
      const j = rblockJson<CompareJson>(dir, ['compare', ...s, '--output', 'json', 'x.qcow2', 'y.qcow2'], q.status);
      if (strict) {
        assert.equal(j.reason, 'status');
        assert.equal(j.firstMismatch, 5 * MiB);
        assert.deepEqual(j.ranges, [{ start: 5 * MiB, length: 65536 }]);
      } else assert.deepEqual(j.ranges, []);
    }
  });

  await t.test('delta: reads as TARGET, clean, backed by BASE, exactly the changed clusters', () => {
    interface Case {
      name: string;
      base: string;
      target: string;
      baseBuf: Buffer;
      targetBuf: Buffer;
      targetFormat: string;
      out: string;
      extra?: string[];
      cs: number;
      backingName: string;
    }
    mkdirSync(join(dir, 'sub'));
    const cases: Case[] = [
      {
        name: 'raw, grown',
        base: 'a.raw',
        target: 'big.raw',
        baseBuf: A,
        targetBuf: Bbig,
        targetFormat: 'raw',
        out: 'd1.qcow2',
        cs: 65536,
        backingName: 'a.raw',
      },
      {
        name: 'raw, same size',
        base: 'a.raw',
        target: 'b.raw',
        baseBuf: A,
        targetBuf: B,
        targetFormat: 'raw',
        out: 'sub/d2.qcow2',
        cs: 65536,
        backingName: '../a.raw',
      },
      {
        name: 'qcow2, 4K clusters, absolute backing name',
        base: 'a.qcow2',
        target: 'b.qcow2',
        baseBuf: A,
        targetBuf: B,
        targetFormat: 'qcow2',
        out: 'd3.qcow2',
        extra: ['-O', 'cluster_size=4096', '--backing-path', resolve(dir, 'a.qcow2')],
        cs: 4096,
        backingName: resolve(dir, 'a.qcow2'),
      },
      {
        name: 'shrunk target',
        base: 'big.qcow2',
        target: 'a.raw',
        baseBuf: Bbig,
        targetBuf: A,
        targetFormat: 'raw',
        out: 'd4.qcow2',
        cs: 65536,
        backingName: 'big.qcow2',
      },
      {
        name: 'identical',
        base: 'a.raw',
        target: 'a.qcow2',
        baseBuf: A,
        targetBuf: A,
        targetFormat: 'qcow2',
        out: 'd5.qcow2',
        cs: 65536,
        backingName: 'a.raw',
      },
    ];
    for (const c of cases) {
      const want = changedClusters(c.baseBuf, c.targetBuf, c.cs);
      if (c.name === 'identical') assert.equal(want, 0);
      else assert.ok(want > 0, `${c.name}: the workload changes something`);
      const j = rblockJson<DeltaJson>(
        dir,
        ['delta', '--base', c.base, '--target', c.target, '-o', c.out, '--report', 'json', ...(c.extra ?? [])],
        0,
      );
      assert.equal(j.clusters, want, `${c.name}: reported clusters`);
      assert.equal(j.clusterSize, c.cs);
      assert.equal(j.size, c.targetBuf.length);
      assert.equal(j.backingFile, c.backingName);

      // Reads as TARGET.
      const q = qemuCompare(dir, '-f', 'qcow2', '-F', c.targetFormat, c.out, c.target);
      assert.equal(q.status, 0, `${c.name}: qemu-img compare DELTA TARGET: ${q.stdout}${q.stderr}`);
      assert.match(q.stdout, /^Images are identical\.$/m);
      // Clean.
      const chk = run('qemu-img', ['check', c.out], { cwd: dir, check: false });
      assert.equal(chk.status, 0, `${c.name}: qemu-img check:\n${chk.stdout}${chk.stderr}`);
      assert.match(chk.stdout, /No errors were found on the image/);
      // Backed by BASE.
      const info = JSON.parse(run('qemu-img', ['info', '--output=json', c.out], { cwd: dir }).stdout) as Record<string, unknown>;
      assert.equal(info['backing-filename'], c.backingName);
      assert.equal(resolve(dir, info['full-backing-filename'] as string), resolve(dir, c.base));
      assert.equal(info['backing-filename-format'], c.base.endsWith('.raw') ? 'raw' : 'qcow2');
      assert.equal(info['virtual-size'], c.targetBuf.length);
      assert.equal(info['cluster-size'], c.cs);
      // Exactly the changed clusters are allocated.
      const map = JSON.parse(run('qemu-img', ['map', '--output=json', c.out], { cwd: dir }).stdout) as {
        start: number;
        length: number;
        depth: number;
        data: boolean;
      }[];
      let allocated = 0;
      for (const m of map) if (m.depth === 0 && m.data) allocated += Math.ceil(m.length / c.cs);
      assert.equal(allocated, want, `${c.name}: allocated clusters in the delta`);
      // rblock agrees that the delta reads as TARGET.
      const rc = rblock(['compare', c.out, c.target], { cwd: dir });
      assert.equal(rc.status, 0, `${c.name}: rblock compare DELTA TARGET: ${rc.stdout}${rc.stderr}`);
    }
    // The human report names the counts.
    const h = rblock(['delta', '--base', 'a.raw', '--target', 'b.raw', '-o', 'd6.qcow2'], { cwd: dir });
    assert.equal(h.status, 0, h.stderr);
    assert.match(h.stdout, new RegExp(`^d6\\.qcow2: ${changedClusters(A, B, 65536)} clusters of 65536 bytes`));
    // Never over an input.
    const over = rblock(['delta', '--base', 'a.raw', '--target', 'b.raw', '-o', 'b.raw'], { cwd: dir });
    assert.equal(over.status, 1);
    assert.match(over.stderr, /overwrite TARGET/);
    assert.deepEqual(readFileSync(join(dir, 'b.raw')), B);
  });
});

test('compare writes its list as it goes: 262,144 ranges in a 16 MiB heap', async () => {
  // Every other sector of 256 MiB differs from zeros: one range per changed sector. Holding the
  // list before printing it needed more than a 48 MiB heap (node aborted); it must now fit in 16.
  using s = scratchDir();
  const zeros = join(s.dir, 'zeros.raw');
  const alt = join(s.dir, 'alt.raw');
  writeFileSync(zeros, '');
  run('truncate', ['-s', '256M', zeros]);
  const chunk = Buffer.alloc(MiB);
  for (let i = 0; i < MiB; i += 2 * SECTOR) chunk.fill(1, i, i + SECTOR);
  const fd = openSync(alt, 'w');
  try {
    for (let i = 0; i < 256; i++) writeSync(fd, chunk);
  } finally {
    closeSync(fd);
  }
  const r = run(
    process.execPath,
    ['--max-old-space-size=16', RBLOCK, 'compare', '--output', 'json', '-f', 'raw', '-F', 'raw', zeros, alt],
    {
      check: false,
    },
  );
  assert.equal(r.status, 1, r.stderr);
  const j = JSON.parse(r.stdout) as CompareJson;
  assert.equal(j.firstMismatch, 0);
  assert.equal(j.changedSectors, 262_144);
  assert.equal(j.ranges.length, 262_144);
  assert.deepEqual(j.ranges[1], { start: 2 * SECTOR, length: SECTOR });
  assert.deepEqual(j.ranges[262_143], { start: 256 * MiB - 2 * SECTOR, length: SECTOR });
});
