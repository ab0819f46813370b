/**
 * NBD benchmark (issue 4 §4): `rblock serve` against `qemu-nbd` and
 * `nbdkit file`, same run, servers alternating within every round.
 *
 * Exports: the 2 GiB raw (mix-2g.raw, sparse: about 1 GiB of data) and the
 * 2 GiB qcow2 it was flattened from (read-2g.qcow2), both cached in the
 * scratch directory (see images.ts / ops.ts; built here if missing).
 *
 * Figures, each from a fresh server started for it:
 *   read    `nbdcopy URI null:` (sequential, nbdcopy's defaults: 4
 *           connections when the server advertises multi-conn, 64 requests
 *           of 256 KiB in flight each), raw and qcow2, over TCP (127.0.0.1)
 *           and over a Unix socket;
 *   fio     4 KiB random reads, iodepth 16, one job, time-based, fixed seed
 *           (`fio --ioengine=nbd`), raw and qcow2, Unix socket;
 *   write   `nbdcopy mix-2g.raw URI`: the raw into a fresh empty 2 GiB qcow2
 *           served writable (Unix socket); afterwards `qemu-img compare`
 *           against the source and `qemu-img check` must both pass.
 * Every figure records the server's peak RSS (VmHWM) and CPU time
 * (utime+stime), read from /proc after the timed run. Read figures then copy
 * the export a second time from the same server ("2nd copy"): a fresh node
 * process spends its first few hundred ms of CPU in the JIT (TurboFan
 * compiles, code running unoptimised meanwhile), which the first figure
 * includes and a long-running server pays once; qemu-nbd's second copy is
 * timed alike.
 *
 * Servers: `rblock serve -t -e 8 -f FMT [-r]`; `qemu-nbd -t -e 8 -f FMT [-r]`
 * with qemu-nbd's defaults (--cache=writeback, --aio=threads, no
 * --discard/--detect-zeroes); `nbdkit -f file file=IMG [-r]` (raw only:
 * nbdkit 1.32 has no qcow2 reader, qcow2dec arrived in 1.36; the file
 * plugin cannot write qcow2 either). NODE_EXTRA_CA_CERTS is removed from
 * rblock's environment (see run.ts).
 *
 * Correctness before timing: every server's export of each image is copied
 * out (`nbdcopy URI -`) and hashed; all must equal sha256 of mix-2g.raw.
 *
 * Ratios are speed ratios rblock/peer: peer time / rblock time for nbdcopy,
 * rblock IOPS / peer IOPS for fio, so >= 1.0 means rblock is as fast as the
 * peer or faster. Medians over the rounds.
 *
 * Standalone: `node dist/bench/nbd.js [--rounds N] [--fio-seconds S]
 * [--only read|fio|write] [--scratch DIR] [--json FILE] [--rblock PATH]`;
 * from `npm run bench` via benchNbd().
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cached, ensureReadImage, finish } from './images.js';
import { eachArg, median, run, sha256File, sync } from './measure.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const MIX_VERSION = 'mix-v1';
const SHARED = 8;

export type Peer = 'rblock' | 'qemu-nbd' | 'nbdkit';
type Fmt = 'raw' | 'qcow2';
type Transport = 'unix' | 'tcp';
type Kind = 'read' | 'fio' | 'write';

interface Figure {
  kind: Kind;
  fmt: Fmt;
  transport: Transport;
  peers: Peer[];
  label: string;
}

interface Sample {
  /** ms for nbdcopy, IOPS for fio */
  value: number;
  /** read figures: ms of a second copy from the same server, right after the first */
  second?: number;
  rssKiB: number;
  /** CPU of the server up to the end of the (first) timed run */
  cpuMs: number;
}

export interface NbdBenchContext {
  rblock: string;
  env: NodeJS.ProcessEnv;
  scratch: string;
  /** Rounds for every figure (default 3). */
  rounds?: number;
  /** fio run time per sample in seconds (default 3). */
  fioSeconds?: number;
  /** Figure kinds to run (default all). */
  kinds?: ReadonlySet<Kind>;
  log: (s: string) => void;
}

export interface NbdBenchResult {
  text: string;
  ok: boolean;
  json: unknown;
}

function figures(kinds: ReadonlySet<Kind>): Figure[] {
  const out: Figure[] = [];
  const all: Peer[] = ['rblock', 'qemu-nbd', 'nbdkit'];
  const q: Peer[] = ['rblock', 'qemu-nbd'];
  if (kinds.has('read'))
    for (const fmt of ['raw', 'qcow2'] as const)
      for (const transport of ['tcp', 'unix'] as const)
        out.push({ kind: 'read', fmt, transport, peers: fmt === 'raw' ? all : q, label: `nbdcopy read ${fmt} ${transport}` });
  if (kinds.has('fio'))
    for (const fmt of ['raw', 'qcow2'] as const)
      out.push({ kind: 'fio', fmt, transport: 'unix', peers: fmt === 'raw' ? all : q, label: `fio 4K randread qd16 ${fmt} unix` });
  if (kinds.has('write')) out.push({ kind: 'write', fmt: 'qcow2', transport: 'unix', peers: q, label: 'nbdcopy write raw->qcow2 unix' });
  return out;
}

/** mix-2g.raw as ops.ts builds it (same version marker, so either may build it). */
function ensureMix(dir: string, log: (s: string) => void): { raw: string; qcow2: string } {
  const q = ensureReadImage(dir);
  const raw = join(dir, 'mix-2g.raw');
  if (cached(raw, MIX_VERSION) === null) {
    log(`  building ${raw} ...`);
    rmSync(raw, { force: true });
    run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', q.path, raw]);
    finish(raw, MIX_VERSION, `2 GiB RAW, the read image flattened (${q.description})`);
  }
  return { raw, qcow2: q.path };
}

/** sha256 of the raw, cached beside it (keyed by size and mtime). */
async function rawDigest(raw: string): Promise<string> {
  const st = statSync(raw);
  const key = `${st.size}:${st.mtimeMs}`;
  const side = `${raw}.sha256`;
  if (existsSync(side)) {
    const [k, h] = readFileSync(side, 'utf8').trim().split(' ');
    if (k === key && h !== undefined) return h;
  }
  const h = await sha256File(raw);
  writeFileSync(side, `${key} ${h}\n`);
  return h;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => resolve(p));
    });
  });
}

interface Server {
  proc: ChildProcess;
  uri: string;
  who: Peer;
}

async function waitListening(target: { path: string } | { port: number }, proc: ChildProcess, who: string): Promise<void> {
  const deadline = Date.now() + 15000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`${who} exited with ${proc.exitCode} before listening`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = 'path' in target ? connect(target.path) : connect(target.port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`${who}: nothing listens after 15 s`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function startServer(
  ctx: NbdBenchContext,
  who: Peer,
  img: string,
  fmt: Fmt,
  transport: Transport,
  readOnly: boolean,
): Promise<Server> {
  const sock = join(ctx.scratch, `nbd-bench-${process.pid}.sock`);
  rmSync(sock, { force: true });
  const port = transport === 'tcp' ? await freePort() : 0;
  const ro = readOnly ? ['-r'] : [];
  let proc: ChildProcess;
  const stdio = ['ignore', 'ignore', 'pipe'] as const;
  if (who === 'rblock') {
    const where = transport === 'unix' ? ['-k', sock] : ['--nbd', `127.0.0.1:${port}`];
    proc = spawn(process.execPath, [ctx.rblock, 'serve', ...ro, '-t', '-e', String(SHARED), '-f', fmt, ...where, img], {
      stdio: [...stdio],
      env: ctx.env,
    });
  } else if (who === 'qemu-nbd') {
    const where = transport === 'unix' ? ['-k', sock] : ['-b', '127.0.0.1', '-p', String(port)];
    proc = spawn('qemu-nbd', [...ro, '-t', '-e', String(SHARED), '-f', fmt, ...where, img], { stdio: [...stdio] });
  } else {
    const where = transport === 'unix' ? ['-U', sock] : ['-i', '127.0.0.1', '-p', String(port)];
    proc = spawn('nbdkit', ['-f', ...ro, ...where, 'file', `file=${img}`], { stdio: [...stdio] });
  }
  let err = '';
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (s: string) => {
    if (err.length < 4096) err += s;
  });
  try {
    await waitListening(transport === 'unix' ? { path: sock } : { port }, proc, who);
  } catch (e) {
    proc.kill('SIGKILL');
    throw new Error(`${e instanceof Error ? e.message : String(e)}: ${err.trim()}`);
  }
  const uri = transport === 'unix' ? `nbd+unix:///?socket=${sock}` : `nbd://127.0.0.1:${port}/`;
  return { proc, uri, who };
}

/** Peak RSS (KiB) and CPU time (ms) of a live process, from /proc. */
function procStats(pid: number): { rssKiB: number; cpuMs: number } {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // utime and stime are fields 14 and 15 (1-based), in clock ticks (USER_HZ = 100 on Linux).
    const ticks = Number(f[11]) + Number(f[12]);
    return { rssKiB: m === null ? 0 : Number(m[1]), cpuMs: ticks * 10 };
  } catch {
    return { rssKiB: 0, cpuMs: 0 };
  }
}

async function stopServer(s: Server): Promise<void> {
  if (s.proc.exitCode !== null || s.proc.signalCode !== null) return;
  const exited = new Promise((r) => s.proc.once('exit', r));
  s.proc.kill('SIGTERM');
  const t = setTimeout(() => s.proc.kill('SIGKILL'), 20000);
  await exited;
  clearTimeout(t);
}

function timed(cmd: string, args: string[], what: string): { ms: number; stdout: string } {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8', maxBuffer: 64 << 20 });
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  if (r.error !== undefined) throw r.error;
  if (r.status !== 0) throw new Error(`${what}: ${cmd} ${args.join(' ')} exited with ${r.status}: ${r.stderr.trim()}`);
  return { ms, stdout: r.stdout };
}

/** sha256 of what `nbdcopy URI -` writes, streamed (nothing on disk). */
async function exportDigest(uri: string): Promise<string> {
  const h = createHash('sha256');
  const p = spawn('nbdcopy', [uri, '-'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  p.stderr.setEncoding('utf8');
  p.stderr.on('data', (s: string) => (err += s));
  p.stdout.on('data', (b: Buffer) => h.update(b));
  const code = await new Promise<number | null>((r) => p.on('close', (c) => r(c)));
  if (code !== 0) throw new Error(`nbdcopy ${uri} - failed: ${err.trim()}`);
  return h.digest('hex');
}

function fioIops(uri: string, seconds: number): number {
  const args = [
    '--name=randread',
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--rw=randread',
    '--bs=4k',
    '--iodepth=16',
    '--numjobs=1',
    '--time_based',
    `--runtime=${seconds}`,
    '--randseed=20240601',
    '--output-format=json',
  ];
  const { stdout } = timed('fio', args, 'fio');
  const j = JSON.parse(stdout.slice(stdout.indexOf('{'))) as { jobs: Array<{ read: { iops: number } }> };
  const iops = j.jobs[0]?.read.iops;
  if (iops === undefined || !(iops > 0)) throw new Error('fio reported no read IOPS');
  return iops;
}

/** The export flag nbdcopy decides its connection count on. */
function multiConn(uri: string): string {
  const r = spawnSync('nbdinfo', ['--can', 'multi-conn', uri]);
  return r.status === 0 ? 'yes' : 'no';
}

function mib(kib: number): string {
  return `${(kib / 1024).toFixed(0)} MiB`;
}

export async function benchNbd(ctx: NbdBenchContext): Promise<NbdBenchResult> {
  const rounds = ctx.rounds ?? 3;
  const fioSeconds = ctx.fioSeconds ?? 3;
  const kinds = ctx.kinds ?? new Set<Kind>(['read', 'fio', 'write']);
  const log = ctx.log;
  for (const tool of ['qemu-img', 'qemu-nbd', 'nbdkit', 'nbdcopy', 'nbdinfo', 'fio']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) throw new Error(`nbd bench: ${tool} is needed`);
  }
  const t0 = Date.now();
  log('nbd: preparing images...');
  const src = ensureMix(ctx.scratch, log);
  const imgOf: Record<Fmt, string> = { raw: src.raw, qcow2: src.qcow2 };
  const want = await rawDigest(src.raw);
  const figs = figures(kinds);
  let ok = true;
  const checks: string[] = [];

  // Correctness first: every server's export of each image hashes to the raw's sha256.
  const multi: Record<string, string> = {};
  if (kinds.has('read') || kinds.has('fio')) {
    for (const fmt of ['raw', 'qcow2'] as const) {
      for (const who of fmt === 'raw' ? (['rblock', 'qemu-nbd', 'nbdkit'] as const) : (['rblock', 'qemu-nbd'] as const)) {
        const s = await startServer(ctx, who, imgOf[fmt], fmt, 'unix', true);
        try {
          multi[`${who} ${fmt} ro`] = multiConn(s.uri);
          const got = await exportDigest(s.uri);
          if (got !== want) {
            ok = false;
            checks.push(`${who} ${fmt}: SHA256 DIFFERS (${got}, want ${want})`);
          }
        } finally {
          await stopServer(s);
        }
      }
    }
    if (ok) checks.push(`exports copied out identical to mix-2g.raw by every server (sha256 ${want.slice(0, 16)}...)`);
    log(`  ${checks[checks.length - 1]}`);
  }

  const samples = new Map<string, Sample[]>();
  const key = (f: Figure, p: Peer): string => `${f.label}|${p}`;
  const writeTarget = join(ctx.scratch, `nbd-write-${process.pid}.qcow2`);
  for (let r = 0; r < rounds; r++) {
    for (const f of figs) {
      // Rotate the order every round so no server always goes first.
      const order = f.peers.map((_, i) => f.peers[(i + r) % f.peers.length]!);
      const line: string[] = [];
      for (const who of order) {
        const readOnly = f.kind !== 'write';
        let img = imgOf[f.fmt];
        if (f.kind === 'write') {
          rmSync(writeTarget, { force: true });
          run('qemu-img', ['create', '-q', '-f', 'qcow2', writeTarget, '2G']);
          img = writeTarget;
        }
        sync();
        const s = await startServer(ctx, who, img, f.fmt, f.transport, readOnly);
        let value: number;
        let second: number | undefined;
        let st: { rssKiB: number; cpuMs: number };
        try {
          if (f.kind === 'write' && r === 0) multi[`${who} qcow2 rw`] = multiConn(s.uri);
          if (f.kind === 'read') value = timed('nbdcopy', [s.uri, 'null:'], f.label).ms;
          else if (f.kind === 'fio') value = fioIops(s.uri, fioSeconds);
          else value = timed('nbdcopy', [src.raw, s.uri], f.label).ms;
          st = procStats(s.proc.pid ?? 0);
          // The same copy again from the same, now warmed-up, server: steady-state throughput.
          if (f.kind === 'read') {
            second = timed('nbdcopy', [s.uri, 'null:'], f.label).ms;
            st.rssKiB = procStats(s.proc.pid ?? 0).rssKiB;
          }
        } finally {
          await stopServer(s);
        }
        if (f.kind === 'write') {
          const cmp = spawnSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', src.raw, writeTarget], { encoding: 'utf8' });
          const chk = spawnSync('qemu-img', ['check', '-q', '-f', 'qcow2', writeTarget], { encoding: 'utf8' });
          if (cmp.status !== 0 || chk.status !== 0) {
            ok = false;
            checks.push(
              `${who} write round ${r + 1}: compare exit ${cmp.status}, check exit ${chk.status} ${chk.stdout}${chk.stderr}`.trim(),
            );
          }
        }
        const list = samples.get(key(f, who)) ?? [];
        list.push({ value, ...(second !== undefined ? { second } : {}), ...st });
        samples.set(key(f, who), list);
        line.push(
          `${who} ${f.kind === 'fio' ? `${value.toFixed(0)} IOPS` : `${(value / 1000).toFixed(2)} s`}` +
            `${second !== undefined ? ` (2nd ${(second / 1000).toFixed(2)} s)` : ''} ${mib(st.rssKiB)}`,
        );
      }
      log(`  ${f.label} round ${r + 1}/${rounds}: ${line.join(', ')}`);
    }
  }
  rmSync(writeTarget, { force: true });
  if (kinds.has('write')) {
    const bad = checks.some((c) => c.includes('write round'));
    checks.push(
      bad
        ? 'write: qemu-img compare/check FAILED (above)'
        : `write: every written qcow2 equal to the source (qemu-img compare) and clean (qemu-img check)`,
    );
  }

  // Table: one row per figure and peer; ratio = rblock speed / peer speed (>= 1.0: rblock as fast or faster).
  const head = ['figure', 'server', 'median', 'speed ratio rblock/peer', '2nd copy', 'ratio (2nd)', 'peak RSS', 'server CPU'];
  const body: string[][] = [];
  const jsonFigs: unknown[] = [];
  for (const f of figs) {
    const rb = samples.get(key(f, 'rblock')) ?? [];
    const rbMed = median(rb.map((x) => x.value));
    const rbSecond = f.kind === 'read' ? median(rb.map((x) => x.second ?? NaN)) : NaN;
    for (const p of f.peers) {
      const xs = samples.get(key(f, p)) ?? [];
      const m = median(xs.map((x) => x.value));
      const ratio = f.kind === 'fio' ? rbMed / m : m / rbMed;
      const m2 = f.kind === 'read' ? median(xs.map((x) => x.second ?? NaN)) : NaN;
      const shown =
        f.kind === 'fio'
          ? `${m.toFixed(0)} IOPS`
          : f.kind === 'write'
            ? `${(m / 1000).toFixed(2)} s (${((2048 / m) * 1000).toFixed(0)} MiB/s)`
            : `${(m / 1000).toFixed(2)} s (${((2048 / m) * 1000).toFixed(0)} MiB/s)`;
      body.push([
        p === 'rblock' ? f.label : '',
        p,
        shown,
        p === 'rblock' ? '' : `${ratio.toFixed(2)}`,
        Number.isNaN(m2) ? '' : `${(m2 / 1000).toFixed(2)} s`,
        p === 'rblock' || Number.isNaN(m2) ? '' : `${(m2 / rbSecond).toFixed(2)}`,
        mib(Math.max(...xs.map((x) => x.rssKiB))),
        `${(median(xs.map((x) => x.cpuMs)) / 1000).toFixed(2)} s`,
      ]);
      jsonFigs.push({
        figure: f.label,
        server: p,
        samples: xs,
        median: m,
        ratio: p === 'rblock' ? 1 : ratio,
        ...(Number.isNaN(m2) ? {} : { secondMedian: m2, secondRatio: p === 'rblock' ? 1 : m2 / rbSecond }),
      });
    }
  }
  const w = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const row = (cells: string[]): string => '| ' + cells.map((c, i) => (i < 2 ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join(' | ') + ' |';
  const sep = '|' + w.map((n, i) => (i < 2 ? '-'.repeat(n + 2) : '-'.repeat(n + 1) + ':')).join('|') + '|';
  const text = [
    '',
    `NBD (issue 4): ${rounds} rounds, medians; MiB/s over the 2 GiB virtual size; fio ${fioSeconds} s a sample; ` +
      'speed ratio = rblock speed / peer speed (>= 1.0: rblock as fast or faster); 2nd copy = the same nbdcopy again from the same server ' +
      "(steady state: rblock's JIT warmed up); peak RSS = max VmHWM of the server, CPU = server utime+stime up to the end of the first run",
    row(head),
    sep,
    ...body.map(row),
    '',
    ...checks.map((c) => `nbd: ${c}`),
    `nbd: multi-conn advertised: ${Object.entries(multi)
      .map(([k, v]) => `${k} ${v}`)
      .join(', ')}`,
    'nbd: qcow2 via nbdkit: n/a (nbdkit 1.32 has no qcow2 reader; the file plugin cannot write qcow2)',
    `nbd: bench part took ${((Date.now() - t0) / 1000).toFixed(0)} s`,
  ].join('\n');
  return { text, ok, json: { rounds, fioSeconds, multiConn: multi, checks, figures: jsonFigs } };
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  let rounds: number | undefined;
  let fioSeconds: number | undefined;
  let scratch = join(tmpdir(), 'rblock-bench');
  let json: string | undefined;
  let rblock = join(ROOT, 'bin', 'rblock.cjs');
  const kinds = new Set<Kind>();
  eachArg(argv, (k, v) => {
    if (k === '--rounds') rounds = Math.max(1, Number(v()));
    else if (k === '--fio-seconds') fioSeconds = Math.max(1, Number(v()));
    else if (k === '--scratch') scratch = v();
    else if (k === '--json') json = v();
    else if (k === '--rblock') rblock = v();
    else if (k === '--only') {
      const n = v();
      if (n !== 'read' && n !== 'fio' && n !== 'write') throw new Error(`unknown --only ${n} (read, fio, write)`);
      kinds.add(n);
    } else throw new Error(`unknown option ${k}`);
  });
  const env = { ...process.env };
  delete env['NODE_EXTRA_CA_CERTS'];
  const r = await benchNbd({
    rblock,
    env,
    scratch,
    log: (s) => process.stderr.write(s + '\n'),
    ...(rounds !== undefined ? { rounds } : {}),
    ...(fioSeconds !== undefined ? { fioSeconds } : {}),
    ...(kinds.size > 0 ? { kinds } : {}),
  });
  process.stdout.write(r.text + '\n');
  if (json !== undefined) writeFileSync(json, JSON.stringify({ date: new Date().toISOString(), ...(r.json as object) }, null, 2) + '\n');
  if (!r.ok) process.exitCode = 1;
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  main().catch((e: unknown) => {
    console.error(e instanceof Error ? e.message : String(e));
    process.exitCode = 1;
  });
}
