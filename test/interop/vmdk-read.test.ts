/**
 * VMDK reading against qemu-img 7.2: every subformat qemu-img makes
 * (monolithicSparse, monolithicFlat, twoGbMaxExtentSparse,
 * twoGbMaxExtentFlat, streamOptimized), with and without zeroed grains, and a
 * delta chain made with -b. Data is written with qemu-io across grain (64 KiB)
 * and grain-table (32 MiB) boundaries, and across the 2 GiB extent boundary
 * of the split subformats. For each image:
 *   (a) `rblock read --output` gives qemu-img convert's bytes (sha256 for
 *       small images; `qemu-img compare` of the two sparse raw files for the
 *       2 GiB ones, which skips holes on both sides);
 *   (b) `rblock map --output json` equals `qemu-img map --output=json`;
 *   (c) `rblock info --output json` agrees on format, sizes, the backing file
 *       and the format-specific data (CIDs, create type, every extent).
 *
 * One principled difference: for FLAT extents qemu asks the host file system
 * (SEEK_HOLE) which ranges are holes and reports them `zero: true`. Node has
 * no SEEK_HOLE/SEEK_DATA, so rblock reports flat extents as plain data (as its
 * raw driver does). The test merges qemu's flat entries with the zero flag
 * dropped and asserts rblock says data, not zero, at the same host offsets.
 *
 * The corpus: iotest-version3.vmdk (VMware, GD_AT_END) reads with the
 * manifest's sha256, and afl9.vmdk is refused in one line.
 */
import { describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { Worker } from 'node:worker_threads';
import { needShared, needTools, RBLOCK, scratchDir, sha256File } from '../helpers/tools.js';
import { pseudoRandom } from '../helpers/rng.js';

const T = { timeout: 120_000 };
const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
/** Images larger than this are compared with qemu-img compare instead of hashing. */
const HASH_LIMIT = 256 * MiB;

interface Proc {
  status: number;
  stdout: Buffer;
  stderr: string;
}

/** Run a command without blocking the event loop (subtests run concurrently). */
function exec(cmd: string, args: string[], cwd: string): Promise<Proc> {
  return new Promise((res) => {
    execFile(cmd, args, { cwd, encoding: 'buffer', maxBuffer: 512 * MiB }, (err, stdout, stderr) => {
      const code =
        err === null
          ? 0
          : typeof (err as NodeJS.ErrnoException).code === 'number'
            ? ((err as unknown as { code: number }).code as number)
            : -1;
      res({ status: code, stdout, stderr: stderr.toString('utf8') });
    });
  });
}

async function must(cmd: string, args: string[], cwd: string): Promise<string> {
  const r = await exec(cmd, args, cwd);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${r.stderr.trim()}`);
  return r.stdout.toString('utf8');
}

const qemuImg = (cwd: string, ...args: string[]): Promise<string> => must('qemu-img', args, cwd);
const qemuIo = (cwd: string, image: string, ...cmds: string[]): Promise<string> =>
  must('qemu-io', ['-f', 'vmdk', ...cmds.flatMap((c) => ['-c', c]), image], cwd);
const rblock = (cwd: string, ...args: string[]): Promise<Proc> => exec(process.execPath, [RBLOCK, ...args], cwd);

async function rblockJson(cwd: string, ...args: string[]): Promise<unknown> {
  const r = await rblock(cwd, ...args);
  assert.equal(r.status, 0, `rblock ${args.join(' ')} failed: ${r.stderr}`);
  assert.equal(r.stderr, '', `rblock ${args.join(' ')} wrote to stderr`);
  return JSON.parse(r.stdout.toString('utf8')) as unknown;
}

async function create(cwd: string, image: string, size: number | string, o?: string, backing?: string): Promise<void> {
  const args = ['create', '-q', '-f', 'vmdk'];
  if (o !== undefined) args.push('-o', o);
  if (backing !== undefined) args.push('-b', backing, '-F', 'vmdk');
  await qemuImg(cwd, ...args, image, String(size));
}

function text(length: number, seed: number): Buffer {
  let s = '';
  for (let n = 0; s.length < length; n++)
    s += `${seed}:${n} The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n`;
  return Buffer.from(s.slice(0, length));
}

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

function mapEntries(parsed: unknown): MapEntry[] {
  assert.ok(Array.isArray(parsed), 'map output is an array');
  return (parsed as Record<string, unknown>[]).map((e) => {
    const m: MapEntry = {
      start: e['start'] as number,
      length: e['length'] as number,
      depth: e['depth'] as number,
      present: e['present'] as boolean,
      zero: e['zero'] as boolean,
      data: e['data'] as boolean,
    };
    if (e['offset'] !== undefined) m.offset = e['offset'] as number;
    return m;
  });
}

/**
 * qemu's map of flat extents with the file system's hole information taken
 * out: data entries say zero: false, and neighbours that then agree (and
 * whose host offsets continue) merge, as qemu-img map merges them.
 */
function withoutHoleInfo(entries: MapEntry[]): MapEntry[] {
  const out: MapEntry[] = [];
  for (const e0 of entries) {
    const e = { ...e0, zero: e0.data ? false : e0.zero };
    const p = out[out.length - 1];
    const contiguous = p !== undefined && (p.offset === undefined ? e.offset === undefined : e.offset === p.offset + p.length);
    if (p !== undefined && contiguous && p.depth === e.depth && p.present === e.present && p.zero === e.zero && p.data === e.data) {
      p.length += e.length;
    } else out.push(e);
  }
  return out;
}

type Info = Record<string, unknown>;
const INFO_FIELDS = [
  'format',
  'virtual-size',
  'actual-size',
  'cluster-size',
  'backing-filename',
  'backing-filename-format',
  'dirty-flag',
  'format-specific',
];

function compareInfo(r: Info, q: Info, cwd: string, label: string): void {
  for (const k of INFO_FIELDS) assert.deepEqual(r[k], q[k], `${label}: info field '${k}' differs from qemu-img`);
  const qf = q['full-backing-filename'];
  const rf = r['full-backing-filename'];
  assert.equal(rf === undefined, qf === undefined, `${label}: full-backing-filename present in one output only`);
  if (typeof qf === 'string' && typeof rf === 'string') assert.equal(resolve(cwd, rf), resolve(cwd, qf), `${label}: full-backing-filename`);
  assert.equal(resolve(cwd, r['filename'] as string), resolve(cwd, q['filename'] as string), `${label}: filename`);
}

interface Check {
  /** Working directory of both tools; the image path is relative to it. */
  cwd: string;
  image: string;
  /** The image has FLAT extents: compare maps without qemu's hole information. */
  flat?: boolean;
  /** Also check the backing chain (`info --backing-chain`) has this length. */
  chainLength?: number;
  /** Also read to stdout (small images). */
  stdout?: boolean;
}

/** The interop contract for one image: content, map and info, rblock against qemu. Returns the guest sha256 (small images). */
async function checkAgainstQemu(c: Check): Promise<string | null> {
  const label = c.image;
  const tag = c.image.replace(/[^A-Za-z0-9]+/g, '_');
  const ref = `${tag}.ref.raw`;
  const out = `${tag}.out.raw`;
  const qinfo = JSON.parse(await qemuImg(c.cwd, 'info', '--output=json', c.image)) as Info;
  const size = qinfo['virtual-size'] as number;

  // (a) guest content
  await qemuImg(c.cwd, 'convert', '-O', 'raw', c.image, ref);
  const rr = await rblock(c.cwd, 'read', c.image, '--output', out);
  assert.equal(rr.status, 0, `${label}: rblock read --output failed: ${rr.stderr}`);
  let want: string | null = null;
  if (size <= HASH_LIMIT) {
    want = await sha256File(join(c.cwd, ref));
    assert.equal(await sha256File(join(c.cwd, out)), want, `${label}: rblock read --output differs from qemu-img convert -O raw`);
    if (c.stdout) {
      const s = await rblock(c.cwd, 'read', c.image);
      assert.equal(s.status, 0, `${label}: rblock read to stdout failed: ${s.stderr}`);
      assert.equal(createHash('sha256').update(s.stdout).digest('hex'), want, `${label}: rblock read to stdout differs from qemu`);
    }
  } else {
    const cmp = await exec('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', ref, out], c.cwd);
    assert.equal(
      cmp.status,
      0,
      `${label}: rblock read --output differs from qemu-img convert -O raw: ${cmp.stdout.toString()}${cmp.stderr}`,
    );
  }

  // (b) allocation map
  let qmap = mapEntries(JSON.parse(await qemuImg(c.cwd, 'map', '--output=json', c.image)));
  const rmap = mapEntries(await rblockJson(c.cwd, 'map', '--output', 'json', c.image));
  if (c.flat) qmap = withoutHoleInfo(qmap);
  assert.deepEqual(rmap, qmap, `${label}: rblock map differs from qemu-img map`);

  // (c) info, and the backing chain. Asked again now: a freshly written file's allocation
  // (actual-size) can still change for a moment while the file system settles it.
  const rinfo = (await rblockJson(c.cwd, 'info', '--output', 'json', c.image)) as Info;
  compareInfo(rinfo, JSON.parse(await qemuImg(c.cwd, 'info', '--output=json', c.image)) as Info, c.cwd, label);
  if (c.chainLength !== undefined) {
    const qc = JSON.parse(await qemuImg(c.cwd, 'info', '--output=json', '--backing-chain', c.image)) as Info[];
    const rc = (await rblockJson(c.cwd, 'info', '--output', 'json', '--backing-chain', c.image)) as Info[];
    assert.equal(rc.length, qc.length, `${label}: backing chain length differs from qemu-img`);
    assert.equal(qc.length, c.chainLength, `${label}: qemu-img sees an unexpected chain`);
    rc.forEach((r, i) => compareInfo(r, qc[i]!, c.cwd, `${label} (chain element ${i})`));
  }
  return want;
}

/** Writes across grain and grain-table boundaries, with a partial last grain (the size is 72 MiB + 2 KiB). */
const SPARSE_SIZE = 72 * MiB + 2 * KiB;
const SPARSE_WRITES = [
  'write -P 0x11 0 64k', // exactly grain 0
  'write -P 0x22 96k 64k', // straddles grains 1 and 2
  `write -P 0x33 ${32 * MiB - 64 * KiB} 128k`, // across the first grain table boundary
  `write -P 0x44 ${40 * MiB + 512} 3k`, // part of a grain in the second table
  `write -s rnd.bin ${50 * MiB} 300k`, // random, several grains, unaligned end
  `write -P 0x55 ${SPARSE_SIZE - 2560} 2560`, // into the partial last grain
];

function randomInput(dir: string): void {
  writeFileSync(join(dir, 'rnd.bin'), pseudoRandom(300 * KiB, 7));
}

const STRESS = { concurrency: 3 };

// One suite, tests running concurrently: the 16 GiB corpus hash (in a worker) starts first and
// overlaps with the rest.
describe('vmdk read vs qemu-img', STRESS, () => {
  test('iotest-version3.vmdk (VMware streamOptimized, GD_AT_END) reads with the manifest sha256', T, async (t) => {
    using s = scratchDir('rblock-vmdk-');
    const img = await bunzip(t, 'iotest-version3.vmdk', s.dir);
    if (img === null) return;
    const manifest = readFileSync(needShared(t, 'corpus/qemu-samples/MANIFEST.md')!, 'utf8');
    const want = manifestSha256(manifest, 'iotest-version3.vmdk');
    const rr = await rblock(s.dir, 'read', img, '--output', 'out.raw');
    assert.equal(rr.status, 0, rr.stderr);
    const map = mapEntries(await rblockJson(s.dir, 'map', '--output', 'json', img));
    assert.equal(
      map.reduce((n, e) => n + e.length, 0),
      16 * GiB,
    );
    if (needTools(t, 'qemu-img')) {
      const q = mapEntries(JSON.parse(await qemuImg(s.dir, 'map', '--output=json', img)));
      assert.deepEqual(map, q, 'rblock map differs from qemu-img map');
    }
    // The output file is sparse: its data ranges are read, the zero ranges hashed as zeros.
    assert.equal(await hashWithHoles(join(s.dir, 'out.raw'), map), want);
  });

  test('afl9.vmdk (huge capacity) is refused with one clear line', T, async (t) => {
    using s = scratchDir('rblock-vmdk-');
    const img = await bunzip(t, 'afl9.vmdk', s.dir);
    if (img === null) return;
    for (const cmd of [['info'], ['map', '--output', 'json'], ['read', '--output', 'x.raw'], ['inspect']]) {
      const r = await rblock(s.dir, cmd[0]!, img, ...cmd.slice(1));
      assert.equal(r.status, 1, `${cmd[0]} exits 1`);
      assert.equal(r.stdout.length, 0);
      const lines = r.stderr.trimEnd().split('\n');
      assert.equal(lines.length, 1, `one line: ${r.stderr}`);
      assert.match(lines[0]!, /afl9\.vmdk: .*grain directory.*L1 size too big/);
    }
  });

  for (const zeroed of [false, true]) {
    test(`monolithicSparse${zeroed ? ' with zeroed_grain=on' : ''}`, T, async (t) => {
      if (!needTools(t, 'qemu-img', 'qemu-io')) return;
      using s = scratchDir('rblock-vmdk-');
      randomInput(s.dir);
      await create(s.dir, 'ms.vmdk', SPARSE_SIZE, `subformat=monolithicSparse${zeroed ? ',zeroed_grain=on' : ''}`);
      const writes = [...SPARSE_WRITES];
      // Aligned whole-grain write-zeroes become zero grains (GTE 1); an unaligned one writes zeros.
      if (zeroed) writes.push('write -z 128k 128k', `write -z ${40 * MiB + 1024} 1k`, `write -z ${60 * MiB} 64k`);
      await qemuIo(s.dir, 'ms.vmdk', ...writes);
      await checkAgainstQemu({ cwd: s.dir, image: 'ms.vmdk', stdout: !zeroed });
      // inspect decodes the same grain table entries that qemu-img map reports.
      const r = (await rblockJson(s.dir, 'inspect', '--output', 'json', '--gt', '0', 'ms.vmdk')) as {
        createType: string;
        grainTable: { entries: { index: number; kind: string; hostOffset: number }[] };
      };
      assert.equal(r.createType, 'monolithicSparse');
      const q = mapEntries(JSON.parse(await qemuImg(s.dir, 'map', '--output=json', 'ms.vmdk')));
      assert.equal(r.grainTable.entries.find((e) => e.index === 0)?.hostOffset, q[0]!.offset);
      if (zeroed) assert.equal(r.grainTable.entries.find((e) => e.index === 2)?.kind, 'zero');
    });
  }

  test('delta chain made with -b: monolithicSparse parents, zero grains hiding parent data', T, async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    using s = scratchDir('rblock-vmdk-');
    const sub = join(s.dir, 'sub');
    mkdirSync(sub);
    randomInput(sub);
    await create(sub, 'base.vmdk', SPARSE_SIZE, 'zeroed_grain=on');
    await qemuIo(sub, 'base.vmdk', ...SPARSE_WRITES, 'write -z 128k 64k');
    await create(sub, 'child.vmdk', SPARSE_SIZE, undefined, 'base.vmdk');
    await qemuIo(sub, 'child.vmdk', 'write -P 0x66 64k 64k', `write -P 0x67 ${33 * MiB} 1k`);
    await create(sub, 'child2.vmdk', SPARSE_SIZE, 'zeroed_grain=on', 'child.vmdk');
    // A zero grain over parent data, and a partial write that copies the rest of the grain from the parent.
    await qemuIo(sub, 'child2.vmdk', 'write -z 0 64k', `write -P 0x77 ${32 * MiB} 4k`, `write -P 0x78 ${50 * MiB + 4 * KiB} 512`);
    // From the parent directory: extents and parents resolve relative to the descriptor, not the cwd.
    await checkAgainstQemu({ cwd: s.dir, image: 'sub/child2.vmdk', chainLength: 3 });
  });

  test('monolithicFlat', T, async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    using s = scratchDir('rblock-vmdk-');
    randomInput(s.dir);
    await create(s.dir, 'mf.vmdk', 10 * MiB + 512, 'subformat=monolithicFlat');
    await qemuIo(s.dir, 'mf.vmdk', 'write -P 0x11 0 64k', 'write -P 0x22 1000000 70000', `write -s rnd.bin ${5 * MiB} 300k`);
    await checkAgainstQemu({ cwd: s.dir, image: 'mf.vmdk', flat: true });
  });

  for (const zeroed of [false, true]) {
    test(`twoGbMaxExtentSparse, two extents${zeroed ? ', zeroed_grain=on' : ''}`, T, async (t) => {
      if (!needTools(t, 'qemu-img', 'qemu-io')) return;
      using s = scratchDir('rblock-vmdk-');
      await create(s.dir, 'ts.vmdk', 2 * GiB + MiB, `subformat=twoGbMaxExtentSparse${zeroed ? ',zeroed_grain=on' : ''}`);
      const writes = ['write -P 0x11 0 64k', `write -P 0x22 ${32 * MiB - 4 * KiB} 8k`, `write -P 0x33 ${2 * GiB - 64 * KiB} 192k`];
      if (zeroed) writes.push(`write -z ${2 * GiB + 256 * KiB} 64k`, `write -z ${2 * GiB + 64 * KiB} 4k`);
      await qemuIo(s.dir, 'ts.vmdk', ...writes);
      await checkAgainstQemu({ cwd: s.dir, image: 'ts.vmdk' });
    });
  }

  test('twoGbMaxExtentFlat, two extents', T, async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    using s = scratchDir('rblock-vmdk-');
    await create(s.dir, 'tf.vmdk', 2 * GiB + MiB, 'subformat=twoGbMaxExtentFlat');
    await qemuIo(s.dir, 'tf.vmdk', 'write -P 0x11 4096 64k', `write -P 0x22 ${2 * GiB - 3 * KiB} 10k`);
    await checkAgainstQemu({ cwd: s.dir, image: 'tf.vmdk', flat: true });
  });

  test('streamOptimized from a raw with random, compressible and zero data', T, async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    using s = scratchDir('rblock-vmdk-');
    const raw = Buffer.alloc(33 * MiB + 4 * KiB); // the last grain is partial
    pseudoRandom(MiB + 1000, 1).copy(raw, 0);
    text(3 * MiB, 2).copy(raw, 2 * MiB);
    pseudoRandom(200 * KiB, 3).copy(raw, 32 * MiB - 100 * KiB); // across the grain table boundary
    text(raw.length - (33 * MiB - 5000), 4).copy(raw, 33 * MiB - 5000);
    writeFileSync(join(s.dir, 'src.raw'), raw);
    await qemuImg(s.dir, 'convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', 'src.raw', 'so.vmdk');
    const sha = await checkAgainstQemu({ cwd: s.dir, image: 'so.vmdk', stdout: true });
    assert.equal(sha, createHash('sha256').update(raw).digest('hex'), 'streamOptimized reads back the source raw');
  });
});

/** The guest sha256 from the second table of MANIFEST.md. */
function manifestSha256(manifest: string, file: string): string {
  for (const line of manifest.split('\n')) {
    if (!line.startsWith(`| ${file} |`)) continue;
    const sha = line.split('|').map((c) => c.trim())[4] ?? '';
    if (/^[0-9a-f]{64}$/.test(sha)) return sha;
  }
  throw new Error(`MANIFEST.md has no guest sha256 for ${file}`);
}

/**
 * sha256 of a sparse guest image: data ranges from `file`, zeros for the
 * ranges the map says are zero (hashing 16 GiB of zeros takes ~12 s of CPU,
 * so it runs in a worker and the event loop stays free).
 */
function hashWithHoles(file: string, map: MapEntry[]): Promise<string> {
  const code = `
    const { parentPort, workerData } = require('node:worker_threads');
    const fs = require('node:fs');
    const { createHash } = require('node:crypto');
    const h = createHash('sha256');
    const fd = fs.openSync(workerData.file, 'r');
    const chunk = 16 << 20;
    const zeros = Buffer.alloc(chunk);
    const buf = Buffer.alloc(chunk);
    for (const e of workerData.map) {
      for (let off = e.start; off < e.start + e.length; off += chunk) {
        const n = Math.min(chunk, e.start + e.length - off);
        if (e.zero) h.update(zeros.subarray(0, n));
        else {
          let got = 0;
          while (got < n) { const r = fs.readSync(fd, buf, got, n - got, off + got); if (r === 0) { buf.fill(0, got, n); break; } got += r; }
          h.update(buf.subarray(0, n));
        }
      }
    }
    fs.closeSync(fd);
    parentPort.postMessage(h.digest('hex'));`;
  return new Promise((res, rej) => {
    const w = new Worker(code, { eval: true, workerData: { file, map } });
    w.once('message', (m: string) => res(m));
    w.once('error', rej);
  });
}

async function bunzip(t: TestContext, name: string, dir: string): Promise<string | null> {
  const src = needShared(t, `corpus/qemu-samples/${name}.bz2`);
  if (src === null || !needTools(t, 'bzcat')) return null;
  const r = await exec('bzcat', [src], dir);
  assert.equal(r.status, 0, r.stderr);
  writeFileSync(join(dir, name), r.stdout);
  return join(dir, name);
}
