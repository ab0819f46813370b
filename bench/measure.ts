/**
 * Benchmark plumbing: run a command, time it from the parent, and find the
 * child's peak resident set size (RSS) with only what Debian and node give.
 *
 * Peak RSS: GNU time (`/usr/bin/time -f %M`, KiB) when it exists; otherwise
 * the parent polls /proc/PID/status VmHWM while the child runs (the last poll
 * before exit is kept; the kernel's high-water mark only grows, so a poll can
 * only be late, not wrong, and 5 ms polling misses at most the final moments).
 */
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, openSync, closeSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';

const GNU_TIME = '/usr/bin/time';

export interface RunResult {
  /** Wall time in milliseconds, measured by the parent around spawn..exit. */
  ms: number;
  /** Peak RSS of the command in KiB (0 if it could not be measured). */
  rssKiB: number;
}

export type RssMethod = 'gnu-time' | 'proc-poll';

export function rssMethod(): RssMethod {
  if (process.env['RBLOCK_BENCH_RSS'] === 'poll') return 'proc-poll';
  return existsSync(GNU_TIME) ? 'gnu-time' : 'proc-poll';
}

export interface RunOptions {
  /** Where the command's stdout goes (default /dev/null). */
  stdoutPath?: string;
  cwd?: string;
  /** Scratch directory for GNU time's report. */
  scratch: string;
  /** Environment of the command (default: this process's). */
  env?: NodeJS.ProcessEnv;
  /** Exit codes that mean success (default [0]; compare exits 1 for "different"). */
  exits?: number[];
}

/** Run cmd once; throw if it fails. */
export async function timedRun(cmd: string, args: string[], opts: RunOptions): Promise<RunResult> {
  const method = rssMethod();
  const report = join(opts.scratch, `.rss-${process.pid}`);
  rmSync(report, { force: true });
  const [file, argv] = method === 'gnu-time' ? [GNU_TIME, ['-f', '%M', '-o', report, '--', cmd, ...args]] : [cmd, args];
  const outFd = openSync(opts.stdoutPath ?? '/dev/null', 'w');
  let stderr = '';
  let hwm = 0;
  const t0 = process.hrtime.bigint();
  const child = spawn(file, argv, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ['ignore', outFd, 'pipe'] });
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (s: string) => {
    if (stderr.length < 8192) stderr += s;
  });
  let timer: NodeJS.Timeout | undefined;
  if (method === 'proc-poll') {
    const poll = (): void => {
      try {
        const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'));
        if (m !== null) hwm = Math.max(hwm, Number(m[1]));
      } catch {
        // the child has gone; keep the last value
      }
    };
    poll();
    timer = setInterval(poll, 5);
  }
  const code = await new Promise<number | null>((res, rej) => {
    child.on('error', rej);
    child.on('exit', (c) => res(c));
  });
  const t1 = process.hrtime.bigint();
  if (timer !== undefined) clearInterval(timer);
  closeSync(outFd);
  if (code === null || !(opts.exits ?? [0]).includes(code))
    throw new Error(`${cmd} ${args.join(' ')} exited with ${code}: ${stderr.trim()}`);
  if (method === 'gnu-time') {
    const lines = readFileSync(report, 'utf8').trim().split('\n');
    hwm = Number(lines[lines.length - 1]);
    rmSync(report, { force: true });
  }
  return { ms: Number(t1 - t0) / 1e6, rssKiB: hwm };
}

/** Flush dirty pages so one run's write-back does not land on the next. */
export function sync(): void {
  spawnSync('sync', { stdio: 'ignore' });
}

/** Run a command for setup; throw with its stderr if it fails. */
export function run(cmd: string, args: string[], input?: string): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', input, maxBuffer: 256 << 20 });
  if (r.error !== undefined) throw r.error;
  if (r.status !== 0) throw new Error(`${cmd} ${args.slice(0, 8).join(' ')}... exited with ${r.status}: ${r.stderr}`);
  return r.stdout;
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 4 << 20 })) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** Walk argv: on(name, value) for each option, where value() takes the next argument (or throws naming the option). */
export function eachArg(argv: string[], on: (name: string, value: () => string) => void): void {
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i] as string;
    on(k, () => {
      const x = argv[++i];
      if (x === undefined) throw new Error(`${k} needs a value`);
      return x;
    });
  }
}
