/**
 * Operations benchmarks (issues 3, 6 and 7), called from run.ts: convert
 * between raw, qcow2 (plain, zlib, zstd), vpc and vmdk, check, compare and
 * delta, each as `rblock ...` against the same `qemu-img ...` in the same run.
 *
 * Source: a 2 GiB RAW disk with a realistic mix, the read benchmark's qcow2
 * flattened with `qemu-img convert -O raw` (runs of random and text-like
 * data, zeros, `qemu-io -P` pattern clusters; sparse where it reads zero).
 * The qcow2, VHD and VMDK sources of the "X -> raw" figures are made from it
 * by qemu-img once. check runs on an 8 GiB fully allocated qcow2
 * (`qemu-img convert -S 0` of a fallocated raw with two 64 MiB pattern
 * writes: every cluster allocated; about 27 s to build), where qemu-img's
 * whole run (20-35 ms) is shorter than node's start-up alone; and on a
 * 256 GiB qcow2 made with `preallocation=metadata` (every one of its 4 Mi
 * clusters allocated, the file sparse on the host: about 40 MB on disk),
 * where the check's own work outweighs start-up.
 *
 * compare and delta run on a pair: the 2 GiB RAW above as the old disk, and
 * a sparse copy of it with one byte changed in 1% of its 512-byte sectors
 * (chosen at random, seeded; in data and in holes alike) as the new one;
 * plus a plain sparse copy for "identical". qemu-img compare stops at the
 * first difference, so the like-for-like figures are `compare -q` on the
 * pair (both stop there) and compare of the identical pair (both read
 * everything); `rblock compare --output json` listing every changed sector
 * of the pair is timed against qemu-img reading the identical pair. delta's
 * peer is qemu's way of making the same overlay: `qemu-img create -b NEW`
 * then a safe `qemu-img rebase -b OLD`.
 *
 * Each figure: the first timed round's outputs (rblock's and qemu-img's,
 * kept apart) are checked with `qemu-img compare` against the source before
 * the next rounds; then output deleted and `sync` before every run, tools
 * alternating. Rounds: --ops-rounds (default 3); the zlib-compressing
 * figures (qcow2 -c, vmdk streamOptimized: 30-40 s a run here) take one
 * round unless --ops-rounds is given.
 */
import { closeSync, fstatSync, openSync, readFileSync, readSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { cached, ensureReadImage, finish, prng, type ImageFacts } from './images.js';
import { run, sync, timedRun, type RunResult } from './measure.js';

const GiB = 1 << 30;

export interface OpsContext {
  rblock: string;
  env: NodeJS.ProcessEnv;
  scratch: string;
  /** Rounds per figure; undefined: 3, and 1 for the zlib-compressing ones. */
  rounds: number | undefined;
  log: (s: string) => void;
}

export interface OpRow {
  name: string;
  rblock: RunResult[];
  qemu: RunResult[];
  check: string;
}

type Source = 'mix' | 'qcow2' | 'vpc' | 'vmdk' | 'full' | 'meta' | 'pair';

/** The compare/delta pair (see the top of this file). */
interface Pair {
  old: string;
  new: string;
  same: string;
  /** Sectors that differ between old and new. */
  changed: number;
}

/**
 * A command other than convert and check (compare, delta): each tool's argv
 * (rblock's after `node bin/rblock.cjs`; the peer's whole), the exit codes
 * that mean success, and the check of the first round's results (stdout of
 * each run is kept in OUT.stdout; "" when all is right, else why not).
 */
interface Custom {
  rblock: (p: Pair, out: string) => string[];
  peer: (p: Pair, out: string) => [string, ...string[]];
  exits: number[];
  verify: (p: Pair, outR: string, outQ: string) => string;
}

interface Op {
  /** --only name */
  key: string;
  /** table label */
  name: string;
  src: Source;
  /** Output format (undefined: no output, the command only reads). */
  out?: 'qcow2' | 'raw' | 'vpc' | 'vmdk';
  /** Arguments after `convert` and before SRC DST (the same for both tools), or the command for check. */
  opts: string[];
  slow?: boolean;
  custom?: Custom;
}

const SRC_FMT: Record<Source, string> = { mix: 'raw', qcow2: 'qcow2', vpc: 'vpc', vmdk: 'vmdk', full: 'qcow2', meta: 'qcow2', pair: 'raw' };

/** rblock compare --output json, as far as the checks below read it. */
interface CompareJson {
  identical: boolean;
  firstMismatch: number | null;
  changedSectors: number;
}

function compareJson(path: string): CompareJson {
  return JSON.parse(readFileSync(path, 'utf8')) as CompareJson;
}

const COMPARE_OPS: Op[] = [
  {
    key: 'compare-q',
    name: 'compare -q, 1% of sectors differ',
    src: 'pair',
    opts: [],
    custom: {
      rblock: (p) => ['compare', '-q', '-f', 'raw', '-F', 'raw', p.old, p.new],
      peer: (p) => ['qemu-img', 'compare', '-q', '-f', 'raw', '-F', 'raw', p.old, p.new],
      exits: [1],
      verify: () => '',
    },
  },
  {
    key: 'compare-same',
    name: 'compare, identical 2 GiB disks',
    src: 'pair',
    opts: [],
    custom: {
      rblock: (p) => ['compare', '-f', 'raw', '-F', 'raw', p.old, p.same],
      peer: (p) => ['qemu-img', 'compare', '-f', 'raw', '-F', 'raw', p.old, p.same],
      exits: [0],
      verify: () => '',
    },
  },
  {
    key: 'compare-all',
    name: 'compare listing all (peer: reads all)',
    src: 'pair',
    opts: [],
    custom: {
      rblock: (p) => ['compare', '-f', 'raw', '-F', 'raw', '--output', 'json', p.old, p.new],
      peer: (p) => ['qemu-img', 'compare', '-f', 'raw', '-F', 'raw', p.old, p.same],
      exits: [0, 1],
      verify: (p, outR) => {
        const r = compareJson(`${outR}.stdout`);
        const q = run('sh', ['-c', `qemu-img compare -f raw -F raw '${p.old}' '${p.new}'; test $? -eq 1`]);
        const first = /Content mismatch at offset (\d+)!/.exec(q)?.[1];
        if (r.changedSectors !== p.changed) return `rblock found ${r.changedSectors} changed sectors, ${p.changed} were changed`;
        if (String(r.firstMismatch) !== first) return `first mismatch ${r.firstMismatch}, qemu-img says ${first}`;
        return '';
      },
    },
  },
  {
    key: 'delta',
    name: 'delta (peer: create -b + rebase)',
    src: 'pair',
    out: 'qcow2',
    opts: [],
    custom: {
      rblock: (p, out) => ['delta', '--base', p.old, '--target', p.new, '-o', out, '-q'],
      peer: (p, out) => [
        'sh',
        '-c',
        `qemu-img create -q -f qcow2 -b '${p.new}' -F raw '${out}' && qemu-img rebase -q -f qcow2 -b '${p.old}' -F raw '${out}'`,
      ],
      exits: [0],
      verify: (p, outR, outQ) => {
        const bad: string[] = [];
        for (const [who, out] of [
          ['rblock', outR],
          ['qemu-img', outQ],
        ] as const) {
          const c = identical(p.new, 'raw', out, 'qcow2');
          if (c !== '') bad.push(`${who}: ${c}`);
          try {
            run('qemu-img', ['check', '-q', out]);
          } catch (e) {
            bad.push(`${who}: qemu-img check: ${(e as Error).message.split('\n')[0]}`);
          }
        }
        return bad.join('; ');
      },
    },
  },
];

export const OPS: Op[] = [
  { key: 'convert-qcow2', name: 'convert raw -> qcow2', src: 'mix', out: 'qcow2', opts: ['-O', 'qcow2'] },
  { key: 'convert-raw', name: 'convert qcow2 -> raw', src: 'qcow2', out: 'raw', opts: ['-O', 'raw'] },
  { key: 'convert-zlib', name: 'convert raw -> qcow2 -c (zlib)', src: 'mix', out: 'qcow2', opts: ['-O', 'qcow2', '-c'], slow: true },
  {
    key: 'convert-zstd',
    name: 'convert raw -> qcow2 -c zstd',
    src: 'mix',
    out: 'qcow2',
    opts: ['-O', 'qcow2', '-c', '-o', 'compression_type=zstd'],
  },
  { key: 'check', name: 'check 8 GiB allocated qcow2', src: 'full', opts: [] },
  { key: 'check-256g', name: 'check 256 GiB qcow2, metadata prealloc', src: 'meta', opts: [] },
  { key: 'convert-vpc', name: 'convert raw -> vpc dynamic', src: 'mix', out: 'vpc', opts: ['-O', 'vpc', '-o', 'subformat=dynamic'] },
  { key: 'vpc-raw', name: 'convert vpc -> raw', src: 'vpc', out: 'raw', opts: ['-O', 'raw'] },
  {
    key: 'convert-vmdk-stream',
    name: 'convert raw -> vmdk streamOptimized',
    src: 'mix',
    out: 'vmdk',
    opts: ['-O', 'vmdk', '-o', 'subformat=streamOptimized'],
    slow: true,
  },
  {
    key: 'convert-vmdk-sparse',
    name: 'convert raw -> vmdk monolithicSparse',
    src: 'mix',
    out: 'vmdk',
    opts: ['-O', 'vmdk', '-o', 'subformat=monolithicSparse'],
  },
  { key: 'vmdk-raw', name: 'convert vmdk -> raw', src: 'vmdk', out: 'raw', opts: ['-O', 'raw'] },
  ...COMPARE_OPS,
];

const MIX_VERSION = 'mix-v1';
const FULL_VERSION = 'full-v1';
const META_VERSION = 'meta-v1';
const PAIR_VERSION = 'pair-v1';

/**
 * The new disk of the pair: a sparse copy of `old` with one byte flipped in
 * 1% of its 512-byte sectors (seeded). Returns how many sectors changed.
 */
function makeChanged(old: string, path: string): number {
  run('cp', ['--sparse=always', old, path]);
  const rnd = prng(0x1ce);
  const fd = openSync(path, 'r+');
  const byte = Buffer.alloc(1);
  let changed = 0;
  try {
    const sectors = Math.ceil(fstatSync(fd).size / 512);
    for (let s = 0; s < sectors; s++) {
      if (rnd() >= 0.01) continue;
      const at = s * 512 + Math.floor(rnd() * 512);
      readSync(fd, byte, 0, 1, at);
      byte[0] = (byte[0] as number) ^ 0xff; // every bit flipped: always a change
      writeSync(fd, byte, 0, 1, at);
      changed++;
    }
  } finally {
    closeSync(fd);
  }
  return changed;
}

function ready(path: string, version: string, make: () => string, log: (s: string) => void): ImageFacts {
  const hit = cached(path, version);
  if (hit !== null) {
    log(`  ${path}: ${hit} (cached)`);
    return { path, virtualSize: 0, description: hit, builtSeconds: 0 };
  }
  const t0 = Date.now();
  rmSync(path, { force: true });
  const description = make();
  finish(path, version, description);
  const builtSeconds = (Date.now() - t0) / 1000;
  log(`  ${path}: ${description} (built in ${builtSeconds.toFixed(1)} s)`);
  return { path, virtualSize: 0, description, builtSeconds };
}

/** The sources the selected ops need, built (or found cached) in the scratch directory. */
function sources(ctx: OpsContext, need: Set<Source>): { paths: Map<Source, string>; images: ImageFacts[]; pair: Pair | null } {
  const paths = new Map<Source, string>();
  const images: ImageFacts[] = [];
  let pair: Pair | null = null;
  const dir = ctx.scratch;
  const needMix = need.has('mix') || need.has('qcow2') || need.has('vpc') || need.has('vmdk') || need.has('pair');
  if (needMix) {
    const q = ensureReadImage(dir);
    paths.set('qcow2', q.path);
    const mix = join(dir, 'mix-2g.raw');
    const img = ready(
      mix,
      MIX_VERSION,
      () => {
        run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', q.path, mix]);
        return `2 GiB RAW, the read image flattened (${q.description})`;
      },
      ctx.log,
    );
    images.push(img);
    paths.set('mix', mix);
    for (const [s, file, fmt, o] of [
      ['vpc', 'mix-2g.vhd', 'vpc', 'subformat=dynamic'],
      ['vmdk', 'mix-2g.vmdk', 'vmdk', 'subformat=monolithicSparse'],
    ] as const) {
      if (!need.has(s)) continue;
      const p = join(dir, file);
      images.push(
        ready(
          p,
          MIX_VERSION,
          () => {
            run('qemu-img', ['convert', '-f', 'raw', '-O', fmt, '-o', o, mix, p]);
            return `mix-2g.raw as ${fmt} (${o}) by qemu-img convert`;
          },
          ctx.log,
        ),
      );
      paths.set(s, p);
    }
    if (need.has('pair')) {
      const changedPath = join(dir, 'mix-2g-changed.raw');
      const samePath = join(dir, 'mix-2g-same.raw');
      const ch = ready(
        changedPath,
        PAIR_VERSION,
        () => `mix-2g.raw with one byte flipped in ${makeChanged(mix, changedPath)} sectors (1%, seeded), sparse`,
        ctx.log,
      );
      const same = ready(
        samePath,
        PAIR_VERSION,
        () => {
          run('cp', ['--sparse=always', mix, samePath]);
          return 'a sparse copy of mix-2g.raw';
        },
        ctx.log,
      );
      images.push(ch, same);
      const changed = Number(/flipped in (\d+) sectors/.exec(ch.description)?.[1]);
      if (!(changed > 0)) throw new Error(`${changedPath}: no sector count in its description: ${ch.description}`);
      pair = { old: mix, new: changedPath, same: samePath, changed };
      // Into the page cache once, untimed: the first timed run (rblock's) would otherwise pay for both tools.
      run('sh', ['-c', `cat '${mix}' '${changedPath}' '${samePath}' > /dev/null`]);
      paths.set('pair', changedPath);
    }
  }
  if (need.has('full')) {
    const p = join(dir, 'full-8g.qcow2');
    images.push(
      ready(
        p,
        FULL_VERSION,
        () => {
          const raw = join(dir, 'full-8g.raw.tmp');
          try {
            rmSync(raw, { force: true });
            run('fallocate', ['-l', String(8 * GiB), raw]);
            run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 64M', '-c', 'write -P 0xa5 4G 64M', raw]);
            run('qemu-img', ['convert', '-S', '0', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536', raw, p]);
          } finally {
            rmSync(raw, { force: true });
          }
          return '8 GiB qcow2, 64 KiB clusters, all 131072 clusters allocated (qemu-img convert -S 0 of a fallocated raw with two 64 MiB pattern writes)';
        },
        ctx.log,
      ),
    );
    paths.set('full', p);
  }
  if (need.has('meta')) {
    const p = join(dir, 'meta-256g.qcow2');
    images.push(
      ready(
        p,
        META_VERSION,
        () => {
          run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata,cluster_size=65536', p, '256G']);
          return '256 GiB qcow2, 64 KiB clusters, preallocation=metadata: all 4194304 clusters allocated, sparse on the host';
        },
        ctx.log,
      ),
    );
    // Its metadata into the page cache once, untimed (cat would read 256 GiB of holes).
    run('qemu-img', ['check', '-q', p]);
    paths.set('meta', p);
  }
  return { paths, images, pair };
}

/** qemu-img compare SRC OUT; "" when identical, else the reason. */
function identical(src: string, srcFmt: string, out: string, outFmt: string): string {
  try {
    run('qemu-img', ['compare', '-f', srcFmt, '-F', outFmt, src, out]);
    return '';
  } catch (e) {
    return (e as Error).message.split('\n').slice(0, 2).join(' ');
  }
}

async function bench(ctx: OpsContext, op: Op, src: string, pair: Pair | null): Promise<OpRow> {
  const rounds = ctx.rounds ?? (op.slow === true ? 1 : 3);
  const srcFmt = SRC_FMT[op.src];
  const ext = op.out === 'vpc' ? 'vhd' : (op.out ?? 'out');
  const outR = join(ctx.scratch, `ops-rblock.${ext}`);
  const outQ = join(ctx.scratch, `ops-qemu.${ext}`);
  const custom = op.custom;
  if (custom !== undefined && pair === null) throw new Error(`${op.key}: no compare pair was prepared`);
  // Each tool's whole argv.
  const rb = (out: string): string[] =>
    custom !== undefined
      ? [process.execPath, ctx.rblock, ...custom.rblock(pair as Pair, out)]
      : op.out === undefined
        ? [process.execPath, ctx.rblock, 'check', '-f', srcFmt, src]
        : [process.execPath, ctx.rblock, 'convert', '-f', srcFmt, ...op.opts, src, out];
  const qi = (out: string): string[] =>
    custom !== undefined
      ? custom.peer(pair as Pair, out)
      : op.out === undefined
        ? ['qemu-img', 'check', '-f', srcFmt, src]
        : ['qemu-img', 'convert', '-f', srcFmt, ...op.opts, src, out];
  const clean = (): void => {
    for (const f of [outR, outQ, `${outR}.stdout`, `${outQ}.stdout`]) rmSync(f, { force: true });
  };
  const opts = (out: string) => ({
    scratch: ctx.scratch,
    env: ctx.env,
    stdoutPath: `${out}.stdout`,
    ...(custom !== undefined ? { exits: custom.exits } : {}),
  });
  const ra: RunResult[] = [];
  const rq: RunResult[] = [];
  let check = '';
  clean();
  for (let i = 0; i < rounds; i++) {
    sync();
    const [ca, ...aa] = rb(outR) as [string, ...string[]];
    ra.push(await timedRun(ca, aa, opts(outR)));
    sync();
    const [cq, ...aq] = qi(outQ) as [string, ...string[]];
    rq.push(await timedRun(cq, aq, opts(outQ)));
    ctx.log(
      `  ${op.key} round ${i + 1}/${rounds}: rblock ${(ra[i]!.ms / 1000).toFixed(3)} s ${(ra[i]!.rssKiB / 1024).toFixed(1)} MiB, ` +
        `qemu-img ${(rq[i]!.ms / 1000).toFixed(3)} s ${(rq[i]!.rssKiB / 1024).toFixed(1)} MiB`,
    );
    if (i === 0) {
      if (custom !== undefined) {
        const why = custom.verify(pair as Pair, outR, outQ);
        check = why === '' ? `both exit ${custom.exits.join(' or ')}, results checked` : `RESULT WRONG: ${why}`;
      } else if (op.out === undefined) {
        check = 'both exit 0 (no errors)';
      } else {
        // A fixed or dynamic VHD may be probed as raw: name the format.
        const a = identical(src, srcFmt, outR, op.out);
        const b = identical(src, srcFmt, outQ, op.out);
        check =
          a === '' && b === ''
            ? 'qemu-img compare: both outputs identical to the source'
            : `OUTPUT DIFFERS: rblock ${a === '' ? 'ok' : a}; qemu-img ${b === '' ? 'ok' : b}`;
      }
      ctx.log(`  ${op.key}: ${check}`);
    }
    clean();
  }
  return { name: op.name, rblock: ra, qemu: rq, check };
}

/** Run the ops whose key `want` accepts; returns their rows and the images they used. */
export async function benchOps(ctx: OpsContext, want: (key: string) => boolean): Promise<{ rows: OpRow[]; images: ImageFacts[] }> {
  const ops = OPS.filter((o) => want(o.key));
  if (ops.length === 0) return { rows: [], images: [] };
  ctx.log('ops images: preparing...');
  const { paths, images, pair } = sources(ctx, new Set(ops.map((o) => o.src)));
  const rows: OpRow[] = [];
  for (const op of ops) rows.push(await bench(ctx, op, paths.get(op.src)!, pair));
  return { rows, images };
}
