/**
 * `node dist/bench/nbd.js`: `nbdcopy` reading a 1 GiB qcow2 served by
 * `rblock serve` against the same image served by `qemu-nbd`, same run.
 *
 * The image (half data in 1 MiB runs, holes and zero clusters between) is
 * built once with qemu-img and cached in $TMPDIR/rblock-bench (or --scratch).
 * Each round starts a fresh server (read-only, Unix socket), runs `sync`,
 * times `nbdcopy URI null:` (the server's read path, no disk writes), reads
 * the server's peak RSS (VmHWM) and stops it. Servers alternate A B A B;
 * medians are reported with the ratio rblock/qemu-nbd (lower is better) and
 * the largest peak RSS. Once before timing, both exports are copied to files
 * and checked identical by sha256 (and equal to `qemu-img convert`).
 *
 * Options: --rounds N (default 5), --shared N (clients per server, default 1;
 * above 1 both advertise multi-conn and nbdcopy opens several connections),
 * --scratch DIR, --json FILE.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { median, run, sha256File, sync } from './measure.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const RBLOCK = join(ROOT, 'bin', 'rblock.js');
const MiB = 1 << 20;
const SIZE = 1024 * MiB;

interface Args {
  rounds: number;
  shared: number;
  scratch: string;
  json?: string;
}

function parseArgs(argv: string[]): Args {
  const a: Args = { rounds: 5, shared: 1, scratch: join(tmpdir(), 'rblock-bench') };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const v = (): string => {
      const x = argv[++i];
      if (x === undefined) throw new Error(`${k} needs a value`);
      return x;
    };
    if (k === '--rounds') a.rounds = Math.max(1, Number(v()));
    else if (k === '--shared') a.shared = Math.max(1, Number(v()));
    else if (k === '--scratch') a.scratch = v();
    else if (k === '--json') a.json = v();
    else throw new Error(`unknown option ${k}`);
  }
  return a;
}

/** 1 GiB: 1 MiB of pseudo-random data, then 1 MiB hole, repeated; every 16th hole a zero cluster run. */
function ensureImage(dir: string): string {
  const img = join(dir, 'nbd-1g.qcow2');
  const marker = `${img}.done`;
  if (existsSync(img) && existsSync(marker)) return img;
  mkdirSync(dir, { recursive: true });
  const raw = join(dir, 'nbd-1g.raw');
  const fd = openSync(raw, 'w');
  ftruncateSync(fd, SIZE);
  const block = Buffer.alloc(MiB);
  let x = 0x9e3779b9;
  for (let off = 0; off < SIZE; off += 2 * MiB) {
    for (let i = 0; i < MiB; i += 4) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      block.writeUInt32LE(x >>> 0, i);
    }
    writeSync(fd, block, 0, MiB, off);
  }
  closeSync(fd);
  rmSync(img, { force: true });
  run('qemu-img', ['convert', '-O', 'qcow2', raw, img]);
  rmSync(raw);
  const zeros: string[] = [];
  for (let off = MiB; off < SIZE; off += 32 * MiB) zeros.push('-c', `write -z ${off} 512k`);
  run('qemu-io', ['-f', 'qcow2', ...zeros, img]);
  writeFileSync(marker, '');
  return img;
}

interface Server {
  proc: ChildProcess;
  uri: string;
}

async function waitForSocket(path: string): Promise<void> {
  const deadline = Date.now() + 15000;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect(path);
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on ${path}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Start a read-only server on a fresh socket. The readiness probe takes one extra slot for a moment. */
async function startServer(who: 'rblock' | 'qemu-nbd', img: string, sock: string, shared: number): Promise<Server> {
  rmSync(sock, { force: true });
  const e = String(shared + 1);
  const proc =
    who === 'rblock'
      ? spawn(process.execPath, [RBLOCK, 'serve', '-r', '-t', '-e', e, '-f', 'qcow2', '-k', sock, img], { stdio: 'ignore' })
      : spawn('qemu-nbd', ['-r', '-t', '-e', e, '-f', 'qcow2', '-k', sock, img], { stdio: 'ignore' });
  await waitForSocket(sock);
  return { proc, uri: `nbd+unix:///?socket=${sock}` };
}

function peakRssKiB(pid: number): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m === null ? 0 : Number(m[1]);
  } catch {
    return 0;
  }
}

async function stopServer(s: Server): Promise<void> {
  if (s.proc.exitCode !== null) return;
  const exited = new Promise((r) => s.proc.once('exit', r));
  s.proc.kill('SIGTERM');
  await exited;
}

function nbdcopy(uri: string, dest: string, shared: number): number {
  const args = shared > 1 ? ['-C', String(shared), uri, dest] : [uri, dest];
  const t0 = process.hrtime.bigint();
  const r = spawnSync('nbdcopy', args, { stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' });
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  if (r.status !== 0) throw new Error(`nbdcopy ${args.join(' ')} failed: ${r.stderr}`);
  return ms;
}

async function main(): Promise<void> {
  const a = parseArgs(process.argv.slice(2));
  for (const tool of ['qemu-img', 'qemu-io', 'qemu-nbd', 'nbdcopy']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) throw new Error(`${tool} is needed`);
  }
  const img = ensureImage(a.scratch);
  const sock = join(a.scratch, `nbd-bench-${process.pid}.sock`);

  // Correctness once: both exports copy to the same bytes as qemu-img convert.
  const ref = join(a.scratch, 'nbd-ref.raw');
  const out = join(a.scratch, 'nbd-out.raw');
  run('qemu-img', ['convert', '-O', 'raw', img, ref]);
  const want = await sha256File(ref);
  for (const who of ['rblock', 'qemu-nbd'] as const) {
    const s = await startServer(who, img, sock, a.shared);
    rmSync(out, { force: true });
    nbdcopy(s.uri, out, a.shared);
    await stopServer(s);
    if ((await sha256File(out)) !== want) throw new Error(`${who}: nbdcopy output differs from qemu-img convert`);
  }
  rmSync(out, { force: true });
  rmSync(ref, { force: true });

  const times: Record<'rblock' | 'qemu-nbd', number[]> = { rblock: [], 'qemu-nbd': [] };
  const rss: Record<'rblock' | 'qemu-nbd', number> = { rblock: 0, 'qemu-nbd': 0 };
  for (let i = 0; i < a.rounds; i++) {
    for (const who of ['rblock', 'qemu-nbd'] as const) {
      const s = await startServer(who, img, sock, a.shared);
      sync();
      times[who].push(nbdcopy(s.uri, 'null:', a.shared));
      rss[who] = Math.max(rss[who], peakRssKiB(s.proc.pid ?? 0));
      await stopServer(s);
    }
  }
  const r = median(times.rblock);
  const q = median(times['qemu-nbd']);
  const mibs = (ms: number): string => ((SIZE / MiB / ms) * 1000).toFixed(0);
  console.log(`nbdcopy of a 1 GiB qcow2 (half data), ${a.rounds} rounds, --shared ${a.shared}: outputs identical (sha256)`);
  console.log(`  rblock serve  ${r.toFixed(0)} ms  (${mibs(r)} MiB/s)  peak RSS ${(rss.rblock / 1024).toFixed(0)} MiB`);
  console.log(`  qemu-nbd      ${q.toFixed(0)} ms  (${mibs(q)} MiB/s)  peak RSS ${(rss['qemu-nbd'] / 1024).toFixed(0)} MiB`);
  console.log(`  ratio rblock/qemu-nbd: ${(r / q).toFixed(2)} (lower is better)`);
  if (a.json !== undefined) {
    writeFileSync(
      a.json,
      JSON.stringify(
        { rounds: a.rounds, shared: a.shared, times, medianMs: { rblock: r, 'qemu-nbd': q }, peakRssKiB: rss, ratio: r / q },
        null,
        2,
      ),
    );
  }
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : String(e));
  process.exitCode = 1;
});
