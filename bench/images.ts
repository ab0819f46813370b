/**
 * Benchmark images, built once and cached under the scratch directory.
 *
 * Fast path: node writes a sparse raw file (the data runs only), then
 * `qemu-img convert -O qcow2` turns it into a compact qcow2 (holes stay
 * unallocated), then one `qemu-io` pass adds what convert never makes:
 * zero clusters (`write -z`), compressed clusters (`write -c`) and later
 * writes into holes, which land at the end of the file (a fragmented host
 * layout, as an image that has lived in a VM has).
 *
 * Content is deterministic (seeded PRNG, AES-CTR keystream), so every run of
 * the benchmark reads the same bytes. A marker file written last makes a
 * half-built image (interrupted generation) count as missing.
 */
import { createCipheriv } from 'node:crypto';
import { closeSync, existsSync, ftruncateSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { run } from './measure.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;
const CLUSTER = 64 * KiB;

/** mulberry32: small, fast, seeded (also used by ops.ts). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Log-uniform length in [lo, hi], a multiple of `align`. */
function logUniform(rnd: () => number, lo: number, hi: number, align: number): number {
  const v = Math.exp(Math.log(lo) + rnd() * (Math.log(hi) - Math.log(lo)));
  return Math.max(align, Math.round(v / align) * align);
}

type Content = 'random' | 'text';

interface DataRun {
  offset: number;
  length: number;
  content: Content;
}

const WORDS =
  'the of and to in is for that with on as by at from this block disk image cluster sector guest host table entry write read zero data qemu kernel boot config log error warning info user system file directory mount'.split(
    ' ',
  );

/** 64 KiB of text-like bytes: compresses about 3-4x, never zero. */
function textTemplate(): Buffer {
  const rnd = prng(7);
  let s = '';
  while (s.length < CLUSTER + 4096) {
    let line = '';
    const n = 4 + Math.floor(rnd() * 10);
    for (let i = 0; i < n; i++) line += WORDS[Math.floor(rnd() * WORDS.length)] + ' ';
    s += `${Math.floor(rnd() * 1e6)} ${line.trim()}\n`;
  }
  return Buffer.from(s.slice(0, CLUSTER + 4096), 'latin1');
}

/** Fill `buf` with the content of a run at guest offset `at` (deterministic per offset). */
function fill(buf: Buffer, content: Content, at: number, template: Buffer): void {
  if (content === 'random') {
    const iv = Buffer.alloc(16);
    iv.writeBigUInt64BE(BigInt(at));
    const c = createCipheriv('aes-128-ctr', Buffer.from('rblock-bench-key'), iv);
    const ks = c.update(Buffer.alloc(buf.length));
    ks.copy(buf);
    return;
  }
  // Text: the template at a shifting phase, stamped every 4 KiB with the guest offset (no two blocks alike).
  for (let o = 0; o < buf.length; o += 4096) {
    const n = Math.min(4096, buf.length - o);
    const phase = ((at + o) / 4096) % 16;
    template.copy(buf, o, phase * 256, phase * 256 + n);
    if (n >= 24) buf.write(`@${(at + o).toString(16).padStart(14, '0')}\n`, o, 'latin1');
  }
}

function writeRaw(path: string, size: number, runs: DataRun[]): void {
  const template = textTemplate();
  const buf = Buffer.allocUnsafe(4 * MiB);
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    for (const r of runs) {
      for (let o = 0; o < r.length; o += buf.length) {
        const n = Math.min(buf.length, r.length - o);
        const view = buf.subarray(0, n);
        fill(view, r.content, r.offset + o, template);
        writeSync(fd, view, 0, n, r.offset + o);
      }
    }
  } finally {
    closeSync(fd);
  }
}

export interface ImageFacts {
  path: string;
  virtualSize: number;
  description: string;
  /** Seconds it took to build (0 when it came from the cache). */
  builtSeconds: number;
}

export function cached(path: string, version: string): string | null {
  const marker = `${path}.ok`;
  if (!existsSync(path) || !existsSync(marker)) return null;
  const m = JSON.parse(readFileSync(marker, 'utf8')) as { version: string; description: string };
  return m.version === version ? m.description : null;
}

export function finish(path: string, version: string, description: string): void {
  writeFileSync(`${path}.ok`, JSON.stringify({ version, description }) + '\n');
}

function qemuIo(path: string, cmds: string[]): void {
  // Commands on the command line: a few thousand fit easily in ARG_MAX.
  const args = ['-f', 'qcow2', '-t', 'unsafe'];
  for (const c of cmds) args.push('-c', c);
  run('qemu-io', [...args, path]);
}

function convert(raw: string, qcow2: string): void {
  run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536', raw, qcow2]);
}

const READ_VERSION = 'read-v1';

/**
 * The read benchmark's image: 2 GiB virtual, 64 KiB clusters, about half
 * allocated. Data runs of 4 KiB .. 8 MiB (log-uniform, 4 KiB aligned, so
 * many clusters are partly data and partly zero) separated by gaps drawn from
 * the same distribution; half the runs are random (incompressible) bytes,
 * half text-like. Then zero clusters, compressed clusters and 4 KiB..256 KiB
 * writes into gaps (allocated at the end of the file, out of guest order).
 */
export function ensureReadImage(dir: string): ImageFacts {
  const path = join(dir, 'read-2g.qcow2');
  const hit = cached(path, READ_VERSION);
  if (hit !== null) return { path, virtualSize: 2 * GiB, description: hit, builtSeconds: 0 };
  const t0 = Date.now();
  rmSync(path, { force: true });
  const size = 2 * GiB;
  const rnd = prng(20240601);
  const runs: DataRun[] = [];
  let pos = 0;
  let dataBytes = 0;
  for (;;) {
    pos += logUniform(rnd, 4 * KiB, 8 * MiB, 4 * KiB);
    if (pos >= size) break;
    const length = Math.min(logUniform(rnd, 4 * KiB, 8 * MiB, 4 * KiB), size - pos);
    runs.push({ offset: pos, length, content: rnd() < 0.5 ? 'random' : 'text' });
    dataBytes += length;
    pos += length;
  }
  // Clusters that convert leaves wholly unallocated: where later writes may go.
  const touched = new Set<number>();
  for (const r of runs) for (let c = Math.floor(r.offset / CLUSTER); c * CLUSTER < r.offset + r.length; c++) touched.add(c);
  const free: number[] = [];
  for (let c = 0; c < size / CLUSTER; c++) if (!touched.has(c)) free.push(c);
  const pick = (): number => {
    const i = Math.floor(rnd() * free.length);
    const c = free[i]!;
    free[i] = free[free.length - 1]!;
    free.pop();
    return c;
  };
  const cmds: string[] = [];
  const compressed = 64;
  for (let i = 0; i < compressed; i++) cmds.push(`write -c -P 0x${(0x41 + (i % 26)).toString(16)} ${pick() * CLUSTER} ${CLUSTER}`);
  const holeWrites = 160;
  let holeBytes = 0;
  for (let i = 0; i < holeWrites; i++) {
    const len = logUniform(rnd, 4 * KiB, 256 * KiB, 4 * KiB);
    const c = pick();
    const off = c * CLUSTER + Math.floor(rnd() * 8) * 4 * KiB;
    const n = Math.min(len, size - off);
    cmds.push(`write -P 0x${(0x61 + (i % 26)).toString(16)} ${off} ${n}`);
    holeBytes += n;
  }
  // Zero clusters: some over data (zero-flagged, still allocated), some over gaps.
  const zeroes = 48;
  let zeroBytes = 0;
  for (let i = 0; i < zeroes; i++) {
    const len = logUniform(rnd, CLUSTER, 2 * MiB, CLUSTER);
    const off = Math.floor((rnd() * (size - len)) / CLUSTER) * CLUSTER;
    cmds.push(`write -z ${off} ${len}`);
    zeroBytes += len;
  }
  const raw = join(dir, 'read-2g.raw.tmp');
  try {
    writeRaw(raw, size, runs);
    convert(raw, path);
  } finally {
    rmSync(raw, { force: true });
  }
  qemuIo(path, cmds);
  const description =
    `2 GiB virtual, 64 KiB clusters; ${runs.length} data runs of 4 KiB..8 MiB (${(dataBytes / MiB).toFixed(0)} MiB, ` +
    `half random, half text), ${holeWrites} later writes of 4..256 KiB into holes (${(holeBytes / MiB).toFixed(1)} MiB, ` +
    `out of guest order on the host), ${compressed} compressed clusters, ${zeroes} zero-cluster ranges ` +
    `(${(zeroBytes / MiB).toFixed(1)} MiB, over data and holes)`;
  finish(path, READ_VERSION, description);
  return { path, virtualSize: size, description, builtSeconds: (Date.now() - t0) / 1000 };
}

const BIG_VERSION = 'big-v2';
const BIG_STRIDE = 256 * MiB;

/**
 * The info/map image: 1 TiB virtual, 64 KiB clusters. Every 256 MiB stride
 * (4096 of them, so all 2048 L2 tables are in use) holds one random run of
 * 256 KiB..768 KiB and four 64 KiB text runs scattered in the stride; then
 * 512 zero-cluster ranges: 2.8 GiB of data in 4.0 GiB of clusters (the 64 KiB
 * runs start at 4 KiB offsets, so each spans two clusters). Metadata, not
 * data volume, is what info and map walk; this keeps the build near 30 s.
 */
export function ensureBigImage(dir: string): ImageFacts {
  const path = join(dir, 'big-1t.qcow2');
  const hit = cached(path, BIG_VERSION);
  if (hit !== null) return { path, virtualSize: TiB, description: hit, builtSeconds: 0 };
  const t0 = Date.now();
  rmSync(path, { force: true });
  const size = TiB;
  const rnd = prng(1099511627);
  const runs: DataRun[] = [];
  let dataBytes = 0;
  let clusters = 0;
  for (let base = 0; base < size; base += BIG_STRIDE) {
    const segs: DataRun[] = [];
    const big = logUniform(rnd, 256 * KiB, 768 * KiB, 4 * KiB);
    segs.push({ offset: base + Math.floor(rnd() * 16) * 4 * MiB + Math.floor(rnd() * 16) * 4 * KiB, length: big, content: 'random' });
    for (let i = 0; i < 4; i++) {
      segs.push({ offset: base + 64 * MiB + i * 48 * MiB + Math.floor(rnd() * 1024) * 4 * KiB, length: CLUSTER, content: 'text' });
    }
    for (const s of segs) {
      dataBytes += s.length;
      clusters += Math.ceil((s.offset + s.length) / CLUSTER) - Math.floor(s.offset / CLUSTER);
    }
    runs.push(...segs);
  }
  const cmds: string[] = [];
  const zeroes = 512;
  for (let i = 0; i < zeroes; i++) {
    const len = logUniform(rnd, CLUSTER, MiB, CLUSTER);
    const off = Math.floor((rnd() * (size - len)) / CLUSTER) * CLUSTER;
    cmds.push(`write -z ${off} ${len}`);
  }
  const raw = join(dir, 'big-1t.raw.tmp');
  try {
    writeRaw(raw, size, runs);
    convert(raw, path);
  } finally {
    rmSync(raw, { force: true });
  }
  qemuIo(path, cmds);
  const description =
    `1 TiB virtual, 64 KiB clusters; ${runs.length} data runs, one random 256..768 KiB run and four 64 KiB text runs ` +
    `in every 256 MiB (${(dataBytes / GiB).toFixed(2)} GiB of data in ${((clusters * CLUSTER) / GiB).toFixed(2)} GiB of clusters, ` +
    `all 2048 L2 tables used), ${zeroes} zero-cluster ranges`;
  finish(path, BIG_VERSION, description);
  return { path, virtualSize: size, description, builtSeconds: (Date.now() - t0) / 1000 };
}
