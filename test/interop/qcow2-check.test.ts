/**
 * `rblock check` against `qemu-img check` 7.2 on the same images:
 *   - clean images of many layouts (made by qemu-img/qemu-io, and by rblock's
 *     own writer): the same JSON text, human text, stderr and exit code;
 *   - the same images broken on purpose (leaks, refcounts too low or 0, L2
 *     entries pointing at free clusters, wrong COPIED flags, overlapping
 *     metadata, a missing refcount block) and hand-crafted ones: the same
 *     findings line for line, the same counts and exit code; and after
 *     `rblock check -r all` (or `-r leaks` on a leaks-only image) both tools
 *     find the image clean and its guest content unchanged;
 *   - every one of those images (clean and broken) checked again in about
 *     seven windows of host clusters (the bounded-memory count of a check
 *     without repair): the same counts and the same findings.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { copyFileSync, openSync, closeSync, readSync, writeSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { describe, test } from 'node:test';
import { HostFile } from '../../src/block/file.js';
import type { Io } from '../../src/cli/io.js';
import { main } from '../../src/cli/main.js';
import { checkQcow2 } from '../../src/formats/qcow2/check.js';
import { readHeader, type Qcow2Header } from '../../src/formats/qcow2/header.js';
import { Refcounts } from '../../src/formats/qcow2/refcount.js';
import { openImage } from '../../src/index.js';
import { craft, INCOMPAT } from '../fixtures/craft.js';
import { pattern, rng } from '../helpers/rng.js';
import { needTools, rblock, scratchDir } from '../helpers/tools.js';

const TOOLS = ['qemu-img', 'qemu-io'];
const COPIED = 1n << 63n;
const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;

interface Out {
  status: number;
  stdout: string;
  stderr: string;
}

/** A peer tool, asynchronously (so the layouts can run side by side). */
function tool(cmd: string, args: string[], cwd?: string): Promise<Out> {
  // qemu 7.2 resolves a relative data_file name against its working directory: run it beside the image.
  const dir = cwd ?? args.map((a) => (a.startsWith('/') ? dirname(a) : null)).find((d) => d !== null) ?? undefined;
  return new Promise((res) => {
    execFile(cmd, args, { cwd: dir, maxBuffer: 64 << 20, encoding: 'utf8' }, (err, stdout, stderr) => {
      const status = err === null ? 0 : typeof err.code === 'number' ? err.code : -1;
      res({ status, stdout, stderr });
    });
  });
}

async function must(cmd: string, args: string[], cwd?: string): Promise<Out> {
  const r = await tool(cmd, args, cwd);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${r.stderr}${r.stdout}`);
  return r;
}

/** The rblock CLI in-process (the same main() bin/rblock.cjs runs), output captured. */
async function rb(...args: string[]): Promise<Out> {
  let stdout = '';
  let stderr = '';
  const io: Io = {
    out: async (s) => {
      stdout += typeof s === 'string' ? s : Buffer.from(s).toString('utf8');
    },
    err: (s) => {
      stderr += s;
    },
  };
  const status = await main(args, io);
  return { status, stdout, stderr };
}

function lines(s: string): string[] {
  return s
    .split('\n')
    .filter((l) => l.length > 0)
    .map((l) => l.replace(/^qemu-img: /, 'rblock: '));
}

interface Json {
  corruptions?: number;
  leaks?: number;
  'leaks-fixed'?: number;
  'corruptions-fixed'?: number;
  'check-errors': number;
}

/** Both tools check `img`: same exit code, same JSON text, same findings on stderr. */
async function sameCheck(img: string, label: string, human = false): Promise<{ status: number; json: Json | null }> {
  const [q, r] = await Promise.all([tool('qemu-img', ['check', '--output=json', img]), rb('check', '--output', 'json', img)]);
  assert.equal(r.status, q.status, `${label}: exit code ${r.status}, qemu-img ${q.status}\nqemu: ${q.stderr}\nrblock: ${r.stderr}`);
  assert.equal(r.stdout, q.stdout, `${label}: JSON differs from qemu-img's`);
  assert.deepEqual(lines(r.stderr), lines(q.stderr), `${label}: findings differ from qemu-img's`);
  if (human) {
    const [qh, rh] = await Promise.all([tool('qemu-img', ['check', img]), rb('check', img)]);
    assert.equal(rh.stdout, qh.stdout, `${label}: human output differs from qemu-img's`);
    assert.equal(rh.status, qh.status);
  }
  return { status: q.status, json: q.stdout.length > 0 ? (JSON.parse(q.stdout) as Json) : null };
}

/**
 * The check of `img` counted in about seven windows of host clusters (a
 * window size that does not divide refcount blocks, so windows start inside
 * them) gives the same counts and the same findings as one window. Only the
 * order of a few per-cluster lines may differ (CheckOptions.windowBytes), so
 * the findings are compared sorted; returns how many windows there were.
 */
async function sameWindowed(img: string, label: string): Promise<number> {
  const h = await header(img);
  const nb = Math.ceil(statSync(img).size / h.clusterSize);
  const entryBytes = Math.max(1, 2 ** h.refcountOrder / 8);
  const perWindow = Math.max(1, Math.ceil(nb / 7));
  const whole: string[] = [];
  const windowed: string[] = [];
  const a = await checkQcow2(img, { log: (l) => whole.push(l) });
  const b = await checkQcow2(img, { log: (l) => windowed.push(l), windowBytes: perWindow * entryBytes });
  assert.deepEqual(b, a, `${label}: windowed check result differs`);
  assert.deepEqual([...windowed].sort(), [...whole].sort(), `${label}: windowed check findings differ`);
  return Math.ceil(nb / perWindow);
}

/** Both tools find `img` clean. */
async function assertClean(img: string, label: string): Promise<void> {
  const [q, r] = await Promise.all([tool('qemu-img', ['check', img]), rb('check', img)]);
  assert.equal(q.status, 0, `${label}: qemu-img check after repair:\n${q.stdout}${q.stderr}`);
  assert.equal(r.status, 0, `${label}: rblock check after repair:\n${r.stdout}${r.stderr}`);
  assert.match(q.stdout, /No errors were found on the image/);
}

// ---- poking at qcow2 structures (through rblock's own header decoder) ----

async function header(path: string): Promise<Qcow2Header> {
  const f = await HostFile.open(path, true);
  try {
    return await readHeader(f);
  } finally {
    await f.close();
  }
}

function readAt(path: string, off: number, len: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(len);
    readSync(fd, b, 0, len, off);
    return b;
  } finally {
    closeSync(fd);
  }
}

function writeAt(path: string, off: number, b: Uint8Array): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, b, 0, b.length, off);
  } finally {
    closeSync(fd);
  }
}

function u64(path: string, off: number): bigint {
  return readAt(path, off, 8).readBigUInt64BE(0);
}

function setU64(path: string, off: number, v: bigint): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  writeAt(path, off, b);
}

/** Where the refcount of a cluster lives: the refcount block's offset (0 if none) and the entry index. */
async function refSlot(path: string, cluster: number): Promise<{ h: Qcow2Header; block: number; index: number; bits: number }> {
  const h = await header(path);
  const bits = 2 ** h.refcountOrder;
  const per = (h.clusterSize * 8) / bits;
  const t = Math.floor(cluster / per);
  const block = t < (h.refcountTableClusters * h.clusterSize) / 8 ? Number(u64(path, h.refcountTableOffset + t * 8) & ~0x1ffn) : 0;
  return { h, block, index: cluster % per, bits };
}

async function getRefcount(path: string, cluster: number): Promise<number> {
  const s = await refSlot(path, cluster);
  if (s.block === 0) return 0;
  return Refcounts.entry(readAt(path, s.block, s.h.clusterSize), s.index, s.bits);
}

async function setRefcount(path: string, cluster: number, v: number): Promise<void> {
  const s = await refSlot(path, cluster);
  assert.notEqual(s.block, 0, `no refcount block for cluster ${cluster}`);
  const b = readAt(path, s.block, s.h.clusterSize);
  Refcounts.setEntry(b, s.index, s.bits, v);
  writeAt(path, s.block, b);
}

/** The active L2 entries of the first L1 entry with an L2 table (and of the first whose table has a free entry, if asked). */
async function l2Entries(path: string, withFree = false): Promise<{ h: Qcow2Header; l1: bigint; entries: { at: number; raw: bigint }[] }> {
  const h = await header(path);
  for (let i = 0; i < h.l1Size; i++) {
    const l1 = u64(path, h.l1TableOffset + i * 8);
    const l2 = Number(l1 & OFFSET_MASK);
    if (l2 === 0) continue;
    const t = readAt(path, l2, h.clusterSize);
    const entries = [];
    for (let j = 0; j < h.l2Entries; j++) entries.push({ at: l2 + j * h.l2EntrySize, raw: t.readBigUInt64BE(j * h.l2EntrySize) });
    if (!withFree || entries.some((e) => e.raw === 0n)) return { h, l1, entries };
  }
  if (withFree) return { h, l1: 0n, entries: [] };
  throw new Error(`${path}: no L2 table`);
}

function isNormal(raw: bigint): boolean {
  return (raw & (1n << 62n)) === 0n && (raw & OFFSET_MASK) !== 0n;
}

/** Make the file one cluster longer; returns that cluster's index (its refcount is whatever the block says: 0). */
function appendCluster(path: string, cs: number): number {
  const n = Math.ceil(statSync(path).size / cs);
  truncateSync(path, (n + 1) * cs);
  return n;
}

// ---- the layouts: made by qemu-img and qemu-io ----

interface Layout {
  name: string;
  make: (dir: string, img: string) => Promise<void>;
  /** Data clusters are not refcounted (external data file): the refcount scenarios do not apply. */
  noDataRefcounts?: boolean;
  /** 1-bit refcounts: a cluster referenced twice overflows, which nothing can repair. */
  oneBit?: boolean;
}

const io = (...cmds: string[]): string[] => cmds.flatMap((c) => ['-c', c]);
const WRITES = io('write -P 0x11 0 700k', 'write -P 0x22 3M 300k', 'write -z 1M 128k', 'discard 128k 64k', 'write -P 0x33 6M 64k');

function textRaw(path: string, size: number): void {
  const b = Buffer.alloc(size);
  let pos = 0;
  let n = 0;
  while (pos < size) pos += b.write(`line ${String(n++).padStart(8, '0')}: the quick brown fox jumps over the lazy dog\n`, pos);
  writeFileSync(path, b);
}

const plain =
  (...opts: string[]) =>
  async (_dir: string, img: string): Promise<void> => {
    await must('qemu-img', ['create', '-q', '-f', 'qcow2', ...opts, img, '16M']);
    await must('qemu-io', ['-f', 'qcow2', ...WRITES, img]);
  };

const LAYOUTS: Layout[] = [
  { name: '64K clusters', make: plain() },
  { name: '512-byte clusters', make: plain('-o', 'cluster_size=512') },
  { name: '2M clusters, 64-bit refcounts', make: plain('-o', 'cluster_size=2M,refcount_bits=64') },
  { name: '4K clusters, 1-bit refcounts', make: plain('-o', 'cluster_size=4096,refcount_bits=1'), oneBit: true },
  {
    // 8-bit refcounts are compared as read; 24 MiB in 512-byte clusters is ~96 refcount blocks,
    // more than the 64 the check caches, so blocks are evicted and their buffers reused.
    name: '512-byte clusters, 8-bit refcounts, 96 refcount blocks',
    make: async (_dir, img) => {
      await must('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=8', img, '64M']);
      await must('qemu-io', ['-f', 'qcow2', ...io('write -P 0x11 32M 24M'), ...WRITES, img]);
    },
  },
  { name: 'compat 0.10', make: plain('-o', 'compat=0.10') },
  { name: 'extended L2', make: plain('-o', 'extended_l2=on') },
  {
    name: 'compressed (convert -c)',
    make: async (dir, img) => {
      const raw = join(dir, 'text.raw');
      textRaw(raw, 3 << 20);
      await must('qemu-img', ['convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, img]);
      await must('qemu-io', ['-f', 'qcow2', ...io('write -P 0x44 1M 20k'), img]);
    },
  },
  {
    name: 'internal snapshots',
    make: async (dir, img) => {
      await plain()(dir, img);
      await must('qemu-img', ['snapshot', '-c', 'one', img]);
      await must('qemu-io', ['-f', 'qcow2', ...io('write -P 0x55 64k 256k'), img]);
      await must('qemu-img', ['snapshot', '-c', 'two', img]);
      await must('qemu-io', ['-f', 'qcow2', ...io('write -P 0x66 0 64k'), img]);
    },
  },
  {
    name: 'persistent bitmaps',
    make: async (dir, img) => {
      await plain()(dir, img);
      await must('qemu-img', ['bitmap', '--add', img, 'b0']);
      await must('qemu-img', ['bitmap', '--add', '-g', '4096', img, 'b1']);
      // qemu-io marks the bitmaps dirty, which allocates bitmap tables and data clusters.
      await must('qemu-io', ['-f', 'qcow2', ...io('write -P 0x77 2M 600k'), img]);
    },
  },
  {
    name: 'backing file',
    make: async (dir, img) => {
      const base = join(dir, 'base.qcow2');
      await plain()(dir, base);
      await must('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', img]);
      await must('qemu-io', ['-f', 'qcow2', ...io('write -P 0x88 100k 300k', 'write -z 5M 64k'), img]);
    },
  },
  {
    name: 'external data file',
    noDataRefcounts: true,
    make: async (dir, img) => {
      await must('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'data_file=img.data', img, '16M'], dir);
      await must('qemu-io', ['-f', 'qcow2', ...io('write -P 0x11 0 700k', 'write -z 1M 128k'), img], dir);
    },
  },
];

// ---- ways to break an image ----

interface Breaker {
  name: string;
  /** Break the image; returns false if this layout has nothing to break that way (a test bug). */
  apply: (img: string, dir: string) => Promise<boolean>;
  /** What qemu-img must find (so the scenario really is what it says). */
  expect: 'leaks' | 'corruptions';
  needsDataRefcounts?: boolean;
  /** Makes a cluster referenced twice. */
  sharesCluster?: boolean;
}

const BREAKERS: Breaker[] = [
  {
    name: 'leaked cluster',
    expect: 'leaks',
    needsDataRefcounts: true,
    apply: async (img) => {
      // Drop a data cluster's L2 entry but not its refcount: counted once more than referenced.
      const { entries, h } = await l2Entries(img);
      const e = entries.find((x) => isNormal(x.raw));
      if (e === undefined) return false;
      setU64(img, e.at, 0n);
      if (h.extendedL2) setU64(img, e.at + 8, 0n);
      return true;
    },
  },
  {
    name: 'data cluster refcount 0',
    expect: 'corruptions',
    needsDataRefcounts: true,
    apply: async (img) => {
      const { entries, h } = await l2Entries(img);
      const e = entries.find((x) => (x.raw & OFFSET_MASK) !== 0n && (x.raw & (1n << 62n)) === 0n) ?? entries.find((x) => x.raw !== 0n);
      if (e === undefined) return false;
      const x = BigInt(62 - (h.clusterBits - 8));
      const host = (e.raw & (1n << 62n)) !== 0n ? Number(e.raw & ((1n << x) - 1n)) : Number(e.raw & OFFSET_MASK);
      await setRefcount(img, Math.floor(host / h.clusterSize), 0);
      return true;
    },
  },
  {
    name: 'L2 table refcount one too low',
    expect: 'corruptions',
    apply: async (img) => {
      const { l1, h } = await l2Entries(img);
      const c = Number(l1 & OFFSET_MASK) / h.clusterSize;
      await setRefcount(img, c, (await getRefcount(img, c)) - 1);
      return true;
    },
  },
  {
    name: 'L2 entry pointing at a cluster with refcount 0',
    expect: 'corruptions',
    needsDataRefcounts: true,
    apply: async (img) => {
      const { entries, h } = await l2Entries(img, true);
      const free = entries.find((x) => x.raw === 0n);
      if (free === undefined) return false;
      const c = appendCluster(img, h.clusterSize);
      if ((await getRefcount(img, c)) !== 0) return false;
      setU64(img, free.at, BigInt(c * h.clusterSize) | COPIED);
      return true;
    },
  },
  {
    name: 'COPIED flag wrong',
    expect: 'corruptions',
    needsDataRefcounts: true,
    apply: async (img) => {
      const { entries, h, l1 } = await l2Entries(img);
      const e = entries.find((x) => isNormal(x.raw) && (x.raw & COPIED) !== 0n);
      if (e !== undefined) setU64(img, e.at, e.raw & ~COPIED);
      else setU64(img, h.l1TableOffset, l1 ^ COPIED);
      return true;
    },
  },
  {
    name: 'L2 entry overlapping the L1 table',
    expect: 'corruptions',
    sharesCluster: true,
    needsDataRefcounts: true,
    apply: async (img) => {
      const { entries, h } = await l2Entries(img, true);
      const free = entries.find((x) => x.raw === 0n);
      if (free === undefined) return false;
      setU64(img, free.at, BigInt(h.l1TableOffset - (h.l1TableOffset % h.clusterSize)) | COPIED);
      return true;
    },
  },
  {
    name: 'L2 entry overlapping a refcount block',
    expect: 'corruptions',
    sharesCluster: true,
    needsDataRefcounts: true,
    apply: async (img) => {
      const { entries, h } = await l2Entries(img, true);
      const free = entries.find((x) => x.raw === 0n);
      if (free === undefined) return false;
      setU64(img, free.at, (u64(img, h.refcountTableOffset) & OFFSET_MASK) | COPIED);
      return true;
    },
  },
  {
    name: 'missing refcount block',
    expect: 'corruptions',
    apply: async (img) => {
      const h = await header(img);
      setU64(img, h.refcountTableOffset, 0n);
      return true;
    },
  },
];

/** Break a copy of `img`, compare the findings, repair with rblock, and check the result with both tools. */
async function breakAndRepair(base: string, dir: string, layout: string, b: Breaker): Promise<void> {
  const tag = `${layout.replace(/\W+/g, '_')}-${b.name.replace(/\W+/g, '_')}`;
  const img = join(dir, `${tag}.qcow2`);
  copyFileSync(base, img);
  assert.ok(await b.apply(img, dir), `${layout}: nothing to break for '${b.name}'`);
  const label = `${layout}, ${b.name}`;
  const found = await sameCheck(img, label);
  assert.ok((await sameWindowed(img, label)) >= 2, `${label}: the windowed check had one window`);
  const json = found.json as Json;
  if (b.expect === 'leaks') {
    assert.ok((json.leaks ?? 0) > 0 && (json.corruptions ?? 0) === 0, `${label}: qemu-img found ${JSON.stringify(json)}`);
    assert.equal(found.status, 3);
    // -r leaks, in both tools: the same repair report, then clean.
    const q = join(dir, `${tag}.q.qcow2`);
    const r = join(dir, `${tag}.r.qcow2`);
    copyFileSync(img, q);
    copyFileSync(img, r);
    const [qr, rr] = await Promise.all([
      tool('qemu-img', ['check', '-r', 'leaks', '--output=json', q]),
      rb('check', '-r', 'leaks', '--output', 'json', r),
    ]);
    assert.equal(rr.status, qr.status, `${label}: -r leaks exit code`);
    assert.deepEqual(JSON.parse(rr.stdout.replace(r, q)), JSON.parse(qr.stdout), `${label}: -r leaks report differs`);
    await assertClean(r, `${label} (-r leaks)`);
  } else {
    assert.ok((json.corruptions ?? 0) > 0, `${label}: qemu-img found ${JSON.stringify(json)}`);
    assert.equal(found.status, 2);
  }
  const fixed = join(dir, `${tag}.fixed.qcow2`);
  copyFileSync(img, fixed);
  const r = await rb('check', '-r', 'all', fixed);
  assert.equal(r.status, 0, `${label}: rblock check -r all:\n${r.stdout}${r.stderr}`);
  assert.match(r.stdout, /The following inconsistencies were found and repaired:/);
  await assertClean(fixed, label);
  // Only metadata changed: the guest reads the same.
  const cmp = await tool('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', img, fixed]);
  assert.equal(cmp.status, 0, `${label}: guest content changed by the repair: ${cmp.stdout}${cmp.stderr}`);
}

describe('qcow2 check against qemu-img check', { concurrency: 3 }, () => {
  for (const layout of LAYOUTS) {
    test(`qemu-made layout: ${layout.name}`, { timeout: 45_000 }, async (t) => {
      if (!needTools(t, ...TOOLS)) return;
      using s = scratchDir('rblock-check-');
      const img = join(s.dir, 'img.qcow2');
      await layout.make(s.dir, img);
      const clean = await sameCheck(img, `${layout.name} (clean)`, true);
      assert.equal(clean.status, 0);
      await sameWindowed(img, `${layout.name} (clean)`);
      for (const b of BREAKERS) {
        if ((b.needsDataRefcounts && layout.noDataRefcounts) || (b.sharesCluster && layout.oneBit)) continue;
        await breakAndRepair(img, s.dir, layout.name, b);
      }
    });
  }
});

describe('hand-made and special images', { concurrency: 3 }, () => {
  test('crafted: a reference beyond what the refcount table covers (the table must grow)', { timeout: 20_000 }, async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    using s = scratchDir('rblock-check-');
    const img = join(s.dir, 'grow.qcow2');
    // 512-byte clusters: one table cluster covers 64 blocks x 256 clusters = 8 MiB of file.
    const c = craft({ clusterBits: 9, size: 16 << 20 });
    c.fill(0, 0x11);
    c.setL2(512, COPIED | BigInt(20000 * 512));
    c.truncate(20001 * 512);
    c.writeTo(img);
    const found = await sameCheck(img, 'table growth');
    assert.equal(found.status, 2);
    const r = await rb('check', '-r', 'all', img);
    assert.equal(r.status, 0, r.stdout + r.stderr);
    await assertClean(img, 'table growth');
    const h = await header(img);
    assert.ok(h.refcountTableClusters >= 2, 'the refcount table grew');
  });

  test('crafted: 1-bit refcounts, an entry past the last refcount block; refcount table entry problems', { timeout: 20_000 }, async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    using s = scratchDir('rblock-check-');
    // [name, image, exit code of the check: 2 corruptions, 1 when refcounts cannot even be read]
    const cases: [string, () => Uint8Array, number?][] = [
      [
        'refcount_order 0',
        () => {
          const d = craft({ clusterBits: 9, size: 16 << 20, refcountOrder: 0 });
          d.fill(0, 0x11).fill(512, 0x12);
          d.setL2(1024, COPIED | BigInt(d.end));
          d.truncate(d.end + 512);
          return d.build();
        },
      ],
      ['reserved bits in a refcount table entry', () => craft({ clusterBits: 12 }).fill(0, 1).pokeU64(4096, 0x2001n).build()],
      [
        'refcount block outside the image',
        () =>
          craft({ clusterBits: 12 })
            .fill(0, 1)
            .pokeU64(4096, 1n << 30n)
            .build(),
      ],
      [
        'two table entries share a refcount block',
        () =>
          craft({ clusterBits: 12 })
            .fill(0, 1)
            .pokeU64(4096 + 8, 0x2000n)
            .build(),
      ],
      [
        'a snapshot sharing the active L1 table',
        () => {
          const d = craft({ clusterBits: 12, size: 4 << 20 });
          d.fill(0, 0x11).fill(4096, 0x22);
          d.snapshots([{ id: '1', name: 'same' }]);
          return d.build();
        },
      ],
      ['unaligned refcount block offset', () => craft({ clusterBits: 12 }).fill(0, 1).pokeU64(4096, 0x2200n).build(), 1],
    ];
    for (const [name, build, status] of cases) {
      const img = join(s.dir, `${name.replace(/\W+/g, '_')}.qcow2`);
      writeFileSync(img, build());
      const found = await sameCheck(img, name);
      assert.equal(found.status, status ?? 2, name);
      const copy = img + '.orig';
      copyFileSync(img, copy);
      const r = await rb('check', '-r', 'all', img);
      assert.equal(r.status, 0, `${name}: ${r.stdout}${r.stderr}`);
      await assertClean(img, name);
      const cmp = await tool('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', copy, img]);
      assert.equal(cmp.status, 0, `${name}: guest content changed: ${cmp.stdout}${cmp.stderr}`);
    }
  });

  test('refcount overflow (1-bit refcounts, shared clusters) is a corruption nobody can repair', { timeout: 20_000 }, async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    using s = scratchDir('rblock-check-');
    const img = join(s.dir, 'overflow.qcow2');
    const d = craft({ clusterBits: 12, size: 4 << 20, refcountOrder: 0 });
    d.fill(0, 0x11);
    d.snapshots([{ id: '1', name: 'same' }]);
    d.writeTo(img);
    assert.equal((await sameCheck(img, 'overflow')).status, 2);
    const q = img + '.q';
    copyFileSync(img, q);
    const [qr, rr] = await Promise.all([tool('qemu-img', ['check', '-r', 'all', q]), rb('check', '-r', 'all', img)]);
    assert.equal(rr.status, qr.status);
    assert.equal(rr.stdout, qr.stdout);
  });

  test(
    'dirty image (lazy refcounts, killed writer): findings match; -r all rebuilds and clears the dirty bit',
    { timeout: 20_000 },
    async (t) => {
      if (!needTools(t, ...TOOLS)) return;
      using s = scratchDir('rblock-check-');
      const img = join(s.dir, 'dirty.qcow2');
      await must('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', img, '64M']);
      await tool('qemu-io', ['-f', 'qcow2', ...io('write -P 1 0 1M', 'write -P 2 3M 200k', 'abort'), img]);
      const before = JSON.parse((await must('qemu-img', ['info', '--output=json', img])).stdout) as Record<string, unknown>;
      assert.equal(before['dirty-flag'], true);
      assert.equal((await sameCheck(img, 'dirty', true)).status, 2);
      const copy = img + '.orig';
      copyFileSync(img, copy);
      const r = await rb('check', '-r', 'all', img);
      assert.equal(r.status, 0, r.stdout + r.stderr);
      await assertClean(img, 'dirty');
      const after = JSON.parse((await must('qemu-img', ['info', '--output=json', img])).stdout) as Record<string, unknown>;
      assert.equal(after['dirty-flag'], false);
      assert.equal((await tool('qemu-img', ['compare', copy, img])).status, 0);
    },
  );

  test('image marked corrupt: check works; -r all clears the bit when nothing is wrong', { timeout: 20_000 }, async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    using s = scratchDir('rblock-check-');
    const img = join(s.dir, 'marked.qcow2');
    await plain()(s.dir, img);
    const h = await header(img);
    setU64(img, 72, h.incompatible | INCOMPAT.CORRUPT);
    assert.equal((await sameCheck(img, 'corrupt bit', true)).status, 0);
    const r = await rb('check', '-r', 'all', img);
    assert.equal(r.status, 0, r.stdout + r.stderr);
    assert.equal(((await header(img)).incompatible & INCOMPAT.CORRUPT) !== 0n, false, 'corrupt bit cleared');
    await assertClean(img, 'corrupt bit');
  });

  test("images written by rblock's own writer check clean in both tools", { timeout: 30_000 }, async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    using s = scratchDir('rblock-check-');
    const layouts = [
      [],
      ['-o', 'cluster_size=512'],
      ['-o', 'cluster_size=2M,refcount_bits=64'],
      ['-o', 'compat=0.10'],
      ['-o', 'refcount_bits=1,cluster_size=4096'],
    ];
    for (const [i, opts] of layouts.entries()) {
      const img = join(s.dir, `w${i}.qcow2`);
      const size = 12 << 20;
      const c = await rb('create', '-q', '-f', 'qcow2', ...opts, img, String(size));
      assert.equal(c.status, 0, c.stderr);
      const r = rng(77 + i);
      const dev = await openImage(img, { readOnly: false });
      try {
        for (let k = 0; k < 150; k++) {
          const off = Math.floor(r() * size);
          const len = Math.max(1, Math.min(size - off, Math.floor(r() * (r() < 0.7 ? 9000 : 300_000))));
          const op = r();
          if (op < 0.6) await dev.pwrite(pattern(len, k), off);
          else if (op < 0.8) await dev.writeZeroes(off, len, { mayTrim: r() < 0.5 });
          else if (op < 0.92) await dev.discard(off, len);
          else await dev.flush();
        }
      } finally {
        await dev.close();
      }
      assert.equal((await sameCheck(img, `rblock-written ${opts.join(' ') || 'default'}`, true)).status, 0);
    }
  });

  test(
    'repair is crash-safe: stopped after any write, it never adds a too-low refcount or a wrong COPIED flag',
    { timeout: 30_000 },
    async (t) => {
      if (!needTools(t, ...TOOLS)) return;
      using s = scratchDir('rblock-check-');
      const img = join(s.dir, 'many.qcow2');
      // 512-byte clusters: a reference past what the refcount table covers (new block, bigger table),
      // a leaked cluster, a data cluster with refcount 0, a wrong COPIED flag, a shared cluster counted once.
      const c = craft({ clusterBits: 9, size: 16 << 20 });
      c.fill(0, 0x11).fill(512, 0x12).fill(1024, 0x13).fill(1536, 0x14);
      c.allocClusters(1); // counted, never referenced: a leak
      const lone = c.allocClusters(1);
      c.setL2(2048, BigInt(lone)); // refcount 1 but COPIED clear
      c.setL2(2560, COPIED | BigInt(lone)); // the same cluster again: referenced twice, counted once, COPIED set
      c.setL2(4096, COPIED | BigInt(20000 * 512));
      c.truncate(20001 * 512);
      c.writeTo(img);
      const { entries, h } = await l2Entries(img);
      await setRefcount(img, Number((entries[1] as { raw: bigint }).raw & OFFSET_MASK) / h.clusterSize, 0);

      // Dangerous findings: a refcount below the references, a COPIED flag set where the refcount is not 1.
      const dangerous = (stderr: string): Set<string> => {
        const out = new Set<string>();
        for (const l of lines(stderr)) {
          const m = /^ERROR cluster (\d+) refcount=\d+ reference=\d+$/.exec(l);
          if (m !== null) out.add(`cluster ${m[1]}`);
          const o = /OFLAG_COPIED data cluster: l2_entry=([0-9a-f]{16}) /.exec(l);
          if (o !== null && parseInt((o[1] as string)[0] as string, 16) >= 8) out.add(`copied ${o[1]}`);
        }
        return out;
      };
      // A COPIED flag the image already had may become visibly wrong once its shared cluster is counted
      // right; the repair must never set one that is wrong.
      const hadCopied = new Set<string>();
      {
        const hh = await header(img);
        for (let i = 0; i < hh.l1Size; i++) {
          const l2 = Number(u64(img, hh.l1TableOffset + i * 8) & OFFSET_MASK);
          if (l2 === 0) continue;
          const tb = readAt(img, l2, hh.clusterSize);
          for (let j = 0; j < hh.l2Entries; j++) {
            const raw = tb.readBigUInt64BE(j * 8);
            if ((raw & COPIED) !== 0n) hadCopied.add(`copied ${raw.toString(16)}`);
          }
        }
      }
      const before = await tool('qemu-img', ['check', img]);
      assert.equal(before.status, 2, before.stdout + before.stderr);
      const bad = dangerous(before.stderr);
      assert.ok(bad.size >= 2, [...bad].join(', '));

      // How many writes a full repair makes.
      let writes = 0;
      const full = join(s.dir, 'full.qcow2');
      copyFileSync(img, full);
      const done = await checkQcow2(full, { repair: 'all', onWrite: () => void writes++ });
      assert.equal(done.check?.corruptions, 0, done.failure ?? '');
      assert.ok(writes >= 5, `only ${writes} writes`);
      t.diagnostic(`a full repair makes ${writes} writes`);
      await assertClean(full, 'full repair');

      for (let k = 0; k < writes; k++) {
        const copy = join(s.dir, `crash${k}.qcow2`);
        copyFileSync(img, copy);
        let n = 0;
        // The simulated crash surfaces as a thrown error or as a failed check, depending on the write.
        await checkQcow2(copy, {
          repair: 'all',
          onWrite: () => {
            if (n++ === k) throw new Error('simulated crash');
          },
        }).catch(() => undefined);
        assert.ok(n > k, `crash after ${k} writes did not happen`);
        const after = await tool('qemu-img', ['check', copy]);
        for (const x of dangerous(after.stderr)) {
          assert.ok(bad.has(x) || hadCopied.has(x), `crash after ${k} writes: new problem '${x}'\n${after.stderr}`);
        }
        // And the repair finishes from there.
        const again = await rb('check', '-r', 'all', copy);
        assert.equal(again.status, 0, `crash after ${k} writes, repair again: ${again.stdout}${again.stderr}`);
        await assertClean(copy, `crash after ${k} writes`);
      }
    },
  );

  test(
    'memory is bounded: a check counts in windows; a repair needing too big a refcount array is refused clearly',
    { timeout: 20_000 },
    async (t) => {
      if (!needTools(t, ...TOOLS)) return;
      using s = scratchDir('rblock-check-');
      const img = join(s.dir, 'a.qcow2');
      await plain('-o', 'cluster_size=512')(s.dir, img);
      const out = await checkQcow2(img, { repair: 'leaks', maxMemory: 4096 });
      assert.equal(out.check, null);
      assert.match(
        out.failure ?? '',
        /^the image file has \d+ clusters of 512 bytes; repairing it needs a refcount array of \d+ MiB in memory, more than the limit of 0 MiB \(a check without -r counts in bounded windows\)$/,
      );
      // Without -r: 4 KiB windows (2048 clusters of 16-bit counts), the same result as one window.
      assert.ok((await sameWindowed(img, '512-byte clusters')) >= 2);
      const w = await checkQcow2(img, { windowBytes: 4096 });
      assert.equal(w.check?.corruptions, 0);
      assert.equal(w.check?.leaks, 0);
      assert.ok((w.check?.allocatedClusters ?? 0) > 0);
    },
  );

  test('the CLI as a process: exit codes 0, 1, 2, 3, 63', { timeout: 20_000 }, async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    using s = scratchDir('rblock-check-');
    const img = join(s.dir, 'a.qcow2');
    await plain()(s.dir, img);
    assert.equal(rblock(['check', img]).status, 0);
    const { entries, h } = await l2Entries(img);
    const e = entries.find((x) => isNormal(x.raw));
    assert.ok(e !== undefined);
    const cluster = Number(e.raw & OFFSET_MASK) / h.clusterSize;
    await setRefcount(img, cluster, 2);
    setU64(img, e.at, e.raw & ~COPIED); // a shared-looking cluster: a leak only
    const leak = rblock(['check', img]);
    assert.equal(leak.status, 3, leak.stdout + leak.stderr);
    assert.match(leak.stderr, new RegExp(`^Leaked cluster ${cluster} refcount=2 reference=1$`, 'm'));
    assert.match(leak.stdout, /1 leaked clusters were found on the image\.\nThis means waste of disk space, but no harm to data\./);
    await setRefcount(img, cluster, 0);
    const bad = rblock(['check', img]);
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, new RegExp(`^ERROR cluster ${cluster} refcount=0 reference=1$`, 'm'));
    // Refcount 0 needs more than -r leaks (qemu: "need to rebuild"): the check fails.
    const leaksOnly = rblock(['check', '-r', 'leaks', img]);
    assert.equal(leaksOnly.status, 1);
    assert.match(leaksOnly.stderr, /ERROR need to rebuild refcount structures\nrblock: Check failed: Input\/output error/);
    const raw = join(s.dir, 'r.raw');
    writeFileSync(raw, Buffer.alloc(65536));
    const r63 = rblock(['check', raw]);
    assert.equal(r63.status, 63);
    assert.equal((await tool('qemu-img', ['check', raw])).status, 63);
    assert.match(r63.stderr, /This image format does not support checks/);
    assert.equal(rblock(['check', join(s.dir, 'missing.qcow2')]).status, 1);
    const fixed = rblock(['check', '-r', 'all', img]);
    assert.equal(fixed.status, 0, fixed.stdout + fixed.stderr);
    await assertClean(img, 'cli');
  });
});
