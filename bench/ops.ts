/**
 * Operations benchmarks (issues 3, 6 and 7), called from run.ts: convert
 * between raw, qcow2 (plain, zlib, zstd), vpc and vmdk, and check, each as
 * `rblock ...` against the same `qemu-img ...` in the same run.
 *
 * Source: a 2 GiB RAW disk with a realistic mix, the read benchmark's qcow2
 * flattened with `qemu-img convert -O raw` (runs of random and text-like
 * data, zeros, `qemu-io -P` pattern clusters; sparse where it reads zero).
 * The qcow2, VHD and VMDK sources of the "X -> raw" figures are made from it
 * by qemu-img once. check runs on an 8 GiB fully allocated qcow2
 * (`qemu-img convert -S 0` of a fallocated raw with two 64 MiB pattern
 * writes: every cluster allocated; about 27 s to build).
 *
 * Each figure: the first timed round's outputs (rblock's and qemu-img's,
 * kept apart) are checked with `qemu-img compare` against the source before
 * the next rounds; then output deleted and `sync` before every run, tools
 * alternating. Rounds: --ops-rounds (default 3); the zlib-compressing
 * figures (qcow2 -c, vmdk streamOptimized: 30-40 s a run here) take one
 * round unless --ops-rounds is given.
 */
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { cached, ensureReadImage, finish, type ImageFacts } from './images.js';
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

type Source = 'mix' | 'qcow2' | 'vpc' | 'vmdk' | 'full';

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
}

const SRC_FMT: Record<Source, string> = { mix: 'raw', qcow2: 'qcow2', vpc: 'vpc', vmdk: 'vmdk', full: 'qcow2' };

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
];

const MIX_VERSION = 'mix-v1';
const FULL_VERSION = 'full-v1';

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
function sources(ctx: OpsContext, need: Set<Source>): { paths: Map<Source, string>; images: ImageFacts[] } {
  const paths = new Map<Source, string>();
  const images: ImageFacts[] = [];
  const dir = ctx.scratch;
  const needMix = need.has('mix') || need.has('qcow2') || need.has('vpc') || need.has('vmdk');
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
  return { paths, images };
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

async function bench(ctx: OpsContext, op: Op, src: string): Promise<OpRow> {
  const rounds = ctx.rounds ?? (op.slow === true ? 1 : 3);
  const srcFmt = SRC_FMT[op.src];
  const ext = op.out === 'vpc' ? 'vhd' : (op.out ?? '');
  const outR = join(ctx.scratch, `ops-rblock.${ext}`);
  const outQ = join(ctx.scratch, `ops-qemu.${ext}`);
  const rb = (out: string): string[] =>
    op.out === undefined ? [ctx.rblock, 'check', '-f', srcFmt, src] : [ctx.rblock, 'convert', '-f', srcFmt, ...op.opts, src, out];
  const qi = (out: string): string[] =>
    op.out === undefined ? ['check', '-f', srcFmt, src] : ['convert', '-f', srcFmt, ...op.opts, src, out];
  const clean = (): void => {
    rmSync(outR, { force: true });
    rmSync(outQ, { force: true });
  };
  const opts = { scratch: ctx.scratch, env: ctx.env };
  const ra: RunResult[] = [];
  const rq: RunResult[] = [];
  let check = '';
  clean();
  for (let i = 0; i < rounds; i++) {
    sync();
    ra.push(await timedRun(process.execPath, rb(outR), opts));
    sync();
    rq.push(await timedRun('qemu-img', qi(outQ), opts));
    ctx.log(
      `  ${op.key} round ${i + 1}/${rounds}: rblock ${(ra[i]!.ms / 1000).toFixed(3)} s ${(ra[i]!.rssKiB / 1024).toFixed(1)} MiB, ` +
        `qemu-img ${(rq[i]!.ms / 1000).toFixed(3)} s ${(rq[i]!.rssKiB / 1024).toFixed(1)} MiB`,
    );
    if (i === 0) {
      if (op.out === undefined) {
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
  const { paths, images } = sources(ctx, new Set(ops.map((o) => o.src)));
  const rows: OpRow[] = [];
  for (const op of ops) rows.push(await bench(ctx, op, paths.get(op.src)!));
  return { rows, images };
}
