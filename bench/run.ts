/**
 * `npm run bench`: rblock against qemu-img on the same machine, same run.
 *
 *   read   `rblock read IMG --output F` vs `qemu-img convert -O raw IMG F`
 *          on a 2 GiB qcow2 (half allocated, mixed content); outputs checked
 *          identical by sha256 once before timing.
 *   info   `rblock info IMG` vs `qemu-img info IMG` on a 1 TiB sparse qcow2.
 *   map    `rblock map IMG --output json` vs `qemu-img map --output=json IMG`
 *          on the same image; outputs checked identical once.
 *   ops    convert raw<->qcow2 (plain, -c zlib, -c zstd), raw<->vpc, raw<->vmdk
 *          (streamOptimized, monolithicSparse) and check of an 8 GiB
 *          allocated qcow2, rblock vs the same qemu-img command: see ops.ts
 *          for the figures' --only names (or `--only ops` for all of them).
 *   nbd    rblock serve vs qemu-nbd and nbdkit file: nbdcopy reads, fio
 *          random reads, nbdcopy write into qcow2 (see nbd.ts).
 *
 * Each timed run: output deleted, `sync`, then spawn; tools alternate
 * (A B A B ...), N rounds each (default 5); medians are reported with the
 * peak RSS (the largest over the rounds), and the ratio of the best runs
 * (on a shared machine the least disturbed run of each is the steadiest
 * figure).
 *
 * Options: --rounds N, --ops-rounds N (ops figures; default 3, 1 for the
 * zlib-compressing ones), --nbd-rounds N (NBD figures; default 3: a median
 * of three, since single rounds on a shared host swing by up to 2x), --only read|info|map|ops|nbd|<op name> (repeatable), --scratch DIR,
 * --json FILE (also write the results as JSON), --rblock PATH (another
 * bin/rblock.cjs, e.g. a build of an older tree, to compare), --keep-env.
 * Images are cached in $TMPDIR/rblock-bench (or --scratch) and rebuilt when missing.
 *
 * NODE_EXTRA_CA_CERTS is removed from the commands' environment unless
 * --keep-env: with it set, every node process parses that CA bundle at
 * startup (about 50 ms on the machine this was written on), which rblock
 * never needs and which a user's shell does not normally set.
 */
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ensureBigImage, ensureReadImage, type ImageFacts } from './images.js';
import { benchNbd } from './nbd.js';
import { benchOps, OPS } from './ops.js';
import { eachArg, median, rssMethod, run, sha256File, sync, timedRun, type RunResult } from './measure.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
let RBLOCK = join(ROOT, 'bin', 'rblock.cjs');
let ENV: NodeJS.ProcessEnv = process.env;
const RSS_LIMIT_MIB = 256;
const READ_TARGET = 1.2;

interface Args {
  rounds: number;
  opsRounds?: number;
  nbdRounds: number;
  only: Set<string>;
  scratch: string;
  json?: string;
  rblock?: string;
  keepEnv: boolean;
}

function parseArgs(argv: string[]): Args {
  const a: Args = { rounds: 5, nbdRounds: 3, only: new Set(), scratch: join(tmpdir(), 'rblock-bench'), keepEnv: false };
  eachArg(argv, (k, v) => {
    if (k === '--rounds') a.rounds = Math.max(1, Number(v()));
    else if (k === '--ops-rounds') a.opsRounds = Math.max(1, Number(v()));
    else if (k === '--nbd-rounds') a.nbdRounds = Math.max(1, Number(v()));
    else if (k === '--only') {
      const n = v();
      if (!['read', 'info', 'map', 'ops', 'nbd', ...OPS.map((o) => o.key)].includes(n)) throw new Error(`unknown --only ${n}`);
      a.only.add(n);
    } else if (k === '--scratch') a.scratch = v();
    else if (k === '--json') a.json = v();
    else if (k === '--rblock') a.rblock = v();
    else if (k === '--keep-env') a.keepEnv = true;
    else throw new Error(`unknown option ${k}`);
  });
  return a;
}

interface Cmd {
  cmd: string;
  args: string[];
}

interface Row {
  name: string;
  rblock: RunResult[];
  qemu: RunResult[];
  check: string;
}

function log(s: string): void {
  process.stderr.write(s + '\n');
}

/** Alternate A and B, `rounds` times each; `before` runs untimed ahead of every run (delete output, sync). */
async function alternate(
  name: string,
  a: Cmd,
  b: Cmd,
  rounds: number,
  scratch: string,
  before: () => void,
  stdoutPath?: string,
): Promise<{ rblock: RunResult[]; qemu: RunResult[] }> {
  const ra: RunResult[] = [];
  const rb: RunResult[] = [];
  const opts = stdoutPath === undefined ? { scratch, env: ENV } : { scratch, stdoutPath, env: ENV };
  for (let i = 0; i < rounds; i++) {
    before();
    sync();
    ra.push(await timedRun(a.cmd, a.args, opts));
    before();
    sync();
    rb.push(await timedRun(b.cmd, b.args, opts));
    log(
      `  ${name} round ${i + 1}/${rounds}: rblock ${(ra[i]!.ms / 1000).toFixed(3)} s ${mib(ra[i]!.rssKiB)}, ` +
        `qemu-img ${(rb[i]!.ms / 1000).toFixed(3)} s ${mib(rb[i]!.rssKiB)}`,
    );
  }
  return { rblock: ra, qemu: rb };
}

function mib(kib: number): string {
  return `${(kib / 1024).toFixed(1)} MiB`;
}

async function benchRead(args: Args, img: ImageFacts): Promise<Row> {
  const outR = join(args.scratch, 'out-rblock.raw');
  const outQ = join(args.scratch, 'out-qemu.raw');
  const rb = (out: string): Cmd => ({ cmd: process.execPath, args: [RBLOCK, 'read', img.path, '--output', out] });
  const qi = (out: string): Cmd => ({ cmd: 'qemu-img', args: ['convert', '-O', 'raw', img.path, out] });
  const clean = (): void => {
    rmSync(outR, { force: true });
    rmSync(outQ, { force: true });
  };
  // One untimed run of each: checks the result and warms the page cache for both alike.
  clean();
  await timedRun(rb(outR).cmd, rb(outR).args, { scratch: args.scratch, env: ENV });
  await timedRun(qi(outQ).cmd, qi(outQ).args, { scratch: args.scratch, env: ENV });
  const [hr, hq] = await Promise.all([sha256File(outR), sha256File(outQ)]);
  const check = hr === hq ? `sha256 identical (${hr.slice(0, 16)}...)` : `SHA256 DIFFERS: rblock ${hr} qemu-img ${hq}`;
  log(`  read: ${check}`);
  clean();
  const r = await alternate('read', rb(outR), qi(outR), args.rounds, args.scratch, clean);
  clean();
  return { name: 'read 2 GiB qcow2 -> raw', ...r, check };
}

async function benchInfo(args: Args, img: ImageFacts): Promise<Row> {
  const a: Cmd = { cmd: process.execPath, args: [RBLOCK, 'info', img.path] };
  const b: Cmd = { cmd: 'qemu-img', args: ['info', img.path] };
  const r = await alternate('info', a, b, args.rounds, args.scratch, () => {});
  return { name: 'info 1 TiB qcow2', ...r, check: '' };
}

async function benchMap(args: Args, img: ImageFacts): Promise<Row> {
  const a: Cmd = { cmd: process.execPath, args: [RBLOCK, 'map', img.path, '--output', 'json'] };
  const b: Cmd = { cmd: 'qemu-img', args: ['map', '--output=json', img.path] };
  const outR = join(args.scratch, 'map-rblock.json');
  const outQ = join(args.scratch, 'map-qemu.json');
  await timedRun(a.cmd, a.args, { scratch: args.scratch, stdoutPath: outR, env: ENV });
  await timedRun(b.cmd, b.args, { scratch: args.scratch, stdoutPath: outQ, env: ENV });
  const tr = readFileSync(outR, 'utf8');
  const tq = readFileSync(outQ, 'utf8');
  const entries = tq.split('\n').filter((l) => l.startsWith('{') || l.startsWith('[{')).length;
  const check = tr === tq ? `output identical (${entries} entries)` : `OUTPUT DIFFERS (qemu-img: ${entries} entries)`;
  log(`  map: ${check}`);
  // Timed runs write stdout to a file too, as a user redirecting it would.
  const r = await alternate('map', a, b, args.rounds, args.scratch, () => rmSync(outR, { force: true }), outR);
  rmSync(outR, { force: true });
  rmSync(outQ, { force: true });
  return { name: 'map --output json 1 TiB', ...r, check };
}

function table(rows: Row[]): string {
  const head = ['benchmark', 'rblock', 'qemu-img', 'ratio', 'ratio of bests', 'rblock peak RSS', 'qemu-img peak RSS'];
  const body = rows.map((r) => {
    const a = median(r.rblock.map((x) => x.ms));
    const b = median(r.qemu.map((x) => x.ms));
    const best = Math.min(...r.rblock.map((x) => x.ms)) / Math.min(...r.qemu.map((x) => x.ms));
    const ra = Math.max(...r.rblock.map((x) => x.rssKiB));
    const rq = Math.max(...r.qemu.map((x) => x.rssKiB));
    return [r.name, secs(a), secs(b), `${(a / b).toFixed(2)}x`, `${best.toFixed(2)}x`, mib(ra), mib(rq)];
  });
  const w = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const line = (cells: string[]): string => '| ' + cells.map((c, i) => (i === 0 ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join(' | ') + ' |';
  const sep = '|' + w.map((n, i) => (i === 0 ? '-'.repeat(n + 2) : '-'.repeat(n + 1) + ':')).join('|') + '|';
  return [line(head), sep, ...body.map(line)].join('\n');
}

function secs(ms: number): string {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(0)} ms`;
}

async function main(): Promise<number> {
  const t0 = Date.now();
  const load0 = loadavg();
  const args = parseArgs(process.argv.slice(2));
  const want = (k: string): boolean => args.only.size === 0 || args.only.has(k);
  mkdirSync(args.scratch, { recursive: true });
  if (args.rblock !== undefined) RBLOCK = resolve(args.rblock);
  if (!args.keepEnv && process.env['NODE_EXTRA_CA_CERTS'] !== undefined) {
    ENV = { ...process.env };
    delete ENV['NODE_EXTRA_CA_CERTS'];
    log("NODE_EXTRA_CA_CERTS removed from the commands' environment (--keep-env keeps it)");
  }
  log(`rblock: ${RBLOCK}`);
  const qv = run('qemu-img', ['--version']).split('\n')[0];
  log(`rblock bench: ${args.rounds} rounds, scratch ${args.scratch}, peak RSS via ${rssMethod()}, node ${process.version}, ${qv}`);
  const rows: Row[] = [];
  const images: ImageFacts[] = [];
  if (want('read')) {
    log('read image: preparing...');
    const img = ensureReadImage(args.scratch);
    images.push(img);
    log(`  ${img.path}: ${img.description}${img.builtSeconds > 0 ? ` (built in ${img.builtSeconds.toFixed(1)} s)` : ' (cached)'}`);
    rows.push(await benchRead(args, img));
  }
  if (want('info') || want('map')) {
    log('1 TiB image: preparing...');
    const img = ensureBigImage(args.scratch);
    images.push(img);
    log(`  ${img.path}: ${img.description}${img.builtSeconds > 0 ? ` (built in ${img.builtSeconds.toFixed(1)} s)` : ' (cached)'}`);
    if (want('info')) rows.push(await benchInfo(args, img));
    if (want('map')) rows.push(await benchMap(args, img));
  }
  const ops = await benchOps(
    { rblock: RBLOCK, env: ENV, scratch: args.scratch, rounds: args.opsRounds, log },
    (k) => want(k) || args.only.has('ops'),
  );
  rows.push(...ops.rows);
  images.push(...ops.images);
  // NBD servers (issue 4): its own table and checks, see nbd.ts.
  const nbd = want('nbd') ? await benchNbd({ rblock: RBLOCK, env: ENV, scratch: args.scratch, rounds: args.nbdRounds, log }) : null;
  // Context for the figures: what starting node, and the rblock CLI with no work to do, cost on their own.
  const startup = async (args2: string[]): Promise<number> => {
    const xs: number[] = [];
    for (let i = 0; i < args.rounds; i++) xs.push((await timedRun(process.execPath, args2, { scratch: args.scratch, env: ENV })).ms);
    return median(xs);
  };
  const nodeStart = await startup(['-e', '']);
  const cliStart = await startup([RBLOCK, '--version']);

  let ok = true;
  const out: string[] = rows.length > 0 ? ['', table(rows), ''] : [];
  for (const r of rows) {
    if (r.check !== '') out.push(`${r.name}: ${r.check}`);
    if (r.check.includes('DIFFERS')) ok = false;
  }
  for (const r of rows) {
    const ratio = median(r.rblock.map((x) => x.ms)) / median(r.qemu.map((x) => x.ms));
    if (r.name.startsWith('read'))
      out.push(`read target <= ${READ_TARGET}x: ${ratio <= READ_TARGET ? 'met' : 'NOT MET'} (${ratio.toFixed(2)}x)`);
    else if (r.name.startsWith('info') || r.name.startsWith('map')) {
      const peak = Math.max(...r.rblock.map((x) => x.rssKiB)) / 1024;
      out.push(`${r.name}: rblock peak RSS ${peak.toFixed(1)} MiB ${peak < RSS_LIMIT_MIB ? '<' : 'NOT <'} ${RSS_LIMIT_MIB} MiB`);
      if (peak >= RSS_LIMIT_MIB) ok = false;
    }
  }
  if (nbd !== null) {
    out.push(nbd.text);
    if (!nbd.ok) ok = false;
  }
  out.push(`startup alone: node -e '' ${secs(nodeStart)}, rblock --version ${secs(cliStart)} (medians)`);
  const l1 = loadavg();
  out.push(`load average (1 min) at start ${load0[0]!.toFixed(2)}, at end ${l1[0]!.toFixed(2)} on ${cpus().length} CPUs`);
  out.push(`bench total: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  process.stdout.write(out.join('\n') + '\n');
  if (args.json !== undefined) {
    const json = {
      date: new Date().toISOString(),
      node: process.version,
      qemu: qv,
      rss: rssMethod(),
      rblock: RBLOCK,
      nodeExtraCaCerts: ENV['NODE_EXTRA_CA_CERTS'] !== undefined,
      loadavg: { start: load0, end: loadavg() },
      images: images.map((i) => ({ path: i.path, description: i.description, builtSeconds: i.builtSeconds })),
      nodeStartMs: nodeStart,
      cliStartMs: cliStart,
      rows: rows.map((r) => ({
        name: r.name,
        check: r.check,
        rblockMs: r.rblock.map((x) => x.ms),
        qemuMs: r.qemu.map((x) => x.ms),
        rblockRssKiB: r.rblock.map((x) => x.rssKiB),
        qemuRssKiB: r.qemu.map((x) => x.rssKiB),
      })),
      nbd: nbd?.json,
    };
    writeFileSync(args.json, JSON.stringify(json, null, 2) + '\n');
  }
  return ok ? 0 : 1;
}

process.exitCode = await main();
