/**
 * Helpers for the qcow2 interop tests: making images with the real qemu-img
 * and qemu-io, deterministic test data, and the one comparison every image
 * goes through (guest bytes, allocation map and info, rblock against qemu).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { RBLOCK, run, sha256File, type RunResult } from '../helpers/tools.js';
import { pseudoRandom } from '../helpers/rng.js';
export { pseudoRandom };

/** The tools every test of qcow2-read.test.ts needs. */
export const QEMU_TOOLS = ['qemu-img', 'qemu-io'] as const;

/** Run qemu-img in `cwd` (relative image and backing names are resolved from there). */
export function qemuImg(cwd: string, ...args: string[]): RunResult {
  return run('qemu-img', args, { cwd });
}

/** Run qemu-io on an existing image with a list of commands (`write -P 0x11 0 4k`, ...). */
export function qemuIo(cwd: string, image: string, ...commands: string[]): RunResult {
  const args = ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), image];
  const r = run('qemu-io', args, { cwd, check: false });
  // qemu-io reports a failed command on stdout (and exits 1 at the end).
  if (r.status !== 0 || /failed|error/i.test(r.stdout)) {
    throw new Error(`qemu-io ${args.join(' ')} exited ${r.status}: ${(r.stderr + r.stdout).trim()}`);
  }
  return r;
}

/** `qemu-img create -f qcow2 [-o opts] [-b backing -F qcow2] image size`. */
export function createQcow2(
  cwd: string,
  image: string,
  size: number | string,
  opts: { o?: string; backing?: string; backingFormat?: string } = {},
): void {
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts.o !== undefined) args.push('-o', opts.o);
  if (opts.backing !== undefined) args.push('-b', opts.backing, '-F', opts.backingFormat ?? 'qcow2');
  qemuImg(cwd, ...args, image, String(size));
}

/** Compressible text: numbered lines of prose. */
export function text(length: number, seed = 0): Buffer {
  const lines: string[] = [];
  let n = 0;
  let total = 0;
  while (total < length) {
    const l = `${String(seed).padStart(4, '0')}:${String(n++).padStart(8, '0')} The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n`;
    lines.push(l);
    total += l.length;
  }
  return Buffer.from(lines.join('')).subarray(0, length);
}

/**
 * A raw disk that mixes compressible text, incompressible random data and
 * zeros, in pieces whose boundaries mostly do not fall on cluster boundaries.
 */
export function mixedRaw(size: number, seed: number): Buffer {
  const out = Buffer.alloc(size);
  const pieces: Array<['text' | 'random' | 'zero', number]> = [
    ['text', 100_000],
    ['random', 70_000],
    ['zero', 200_000],
    ['text', 30_000],
    ['random', 131_072],
    ['zero', 65_536],
    ['text', 65_536],
    ['random', 1_000],
    ['text', 150_000],
    ['zero', 300_000],
    ['random', 65_536 * 3 + 17],
  ];
  let pos = 0;
  let i = 0;
  while (pos < size) {
    const [kind, len] = pieces[i % pieces.length]!;
    const n = Math.min(len, size - pos);
    if (kind === 'text') text(n, seed + i).copy(out, pos);
    else if (kind === 'random') pseudoRandom(n, seed * 7919 + i).copy(out, pos);
    pos += n;
    i++;
  }
  return out;
}

/** Write a pseudo-random file for `qemu-io -c 'write -s FILE off len'`; returns its path. */
export function randomFile(path: string, length: number, seed: number): string {
  writeFileSync(path, pseudoRandom(length, seed));
  return path;
}

/** The fields of a map entry that `qemu-img map --output=json` defines. */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

function mapEntries(json: string, who: string): MapEntry[] {
  let parsed: unknown;
  try {
    parsed = JSON.parse(json);
  } catch (e) {
    throw new Error(`${who}: map output is not JSON: ${String(e)}\n${json.slice(0, 500)}`);
  }
  assert.ok(Array.isArray(parsed), `${who}: map output is not an array`);
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

export type Info = Record<string, unknown>;

/** Fields of `info` that must agree exactly. */
const INFO_FIELDS = [
  'format',
  'virtual-size',
  'cluster-size',
  'backing-filename',
  'backing-filename-format',
  'encrypted',
  'dirty-flag',
  'format-specific',
  'snapshots',
];

function compareInfo(r: Info, q: Info, where: { rblockCwd: string; qemuCwd: string; label: string }): void {
  for (const k of INFO_FIELDS) assert.deepEqual(r[k], q[k], `${where.label}: info field '${k}' differs from qemu-img`);
  // The resolved backing path: qemu prints it relative to its working directory, rblock absolute.
  const qf = q['full-backing-filename'];
  const rf = r['full-backing-filename'];
  assert.equal(rf === undefined, qf === undefined, `${where.label}: full-backing-filename present in one output only`);
  if (typeof qf === 'string' && typeof rf === 'string') {
    assert.equal(resolve(where.rblockCwd, rf), resolve(where.qemuCwd, qf), `${where.label}: full-backing-filename differs`);
  }
}

/** The rblock CLI as a child process, without blocking: the checks of one image run side by side. */
function rblockAsync(args: string[], cwd: string): Promise<{ status: number; stdout: Buffer; stderr: string }> {
  return new Promise((res, rej) => {
    const child = spawn(process.execPath, [RBLOCK, ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    child.on('error', rej);
    child.on('close', (code) => res({ status: code ?? -1, stdout: Buffer.concat(out), stderr: Buffer.concat(err).toString('utf8') }));
  });
}

/** An rblock JSON answer: exit 0, nothing on stderr, parsable stdout. */
function rblockJson(r: { status: number; stdout: Buffer; stderr: string }, what: string): unknown {
  assert.equal(r.status, 0, `${what} exited ${r.status}: ${r.stderr}`);
  assert.equal(r.stderr, '', `${what} wrote to stderr`);
  return JSON.parse(r.stdout.toString('utf8')) as unknown;
}

export interface CheckSpec {
  /** The image as rblock is given it (relative to rblockCwd). */
  image: string;
  /** Working directory of rblock: deliberately not the image's directory where that matters. */
  rblockCwd: string;
  /** The image as qemu is given it (default: the same path, from the same cwd). */
  qemuImage?: string;
  qemuCwd?: string;
  /** Where reference and output files go. */
  outDir: string;
  /** Also hash `rblock read IMG` streamed to stdout (default: for disks up to 2 MiB). */
  stdout?: boolean;
  /**
   * Also compare `info --backing-chain` (every element) and expect a chain
   * of this length. Left out, only the top image's info is compared.
   */
  chainLength?: number;
}

/**
 * The interop contract for one image:
 * (a) `rblock read` (to a file and to stdout) gives qemu-img convert's bytes;
 * (b) `rblock map --output json` equals `qemu-img map --output=json`, entry for entry;
 * (c) `rblock info --output json` agrees with qemu-img info (and with --backing-chain).
 */
export async function checkAgainstQemu(spec: CheckSpec): Promise<{ map: MapEntry[]; info: Info }> {
  const qemuCwd = spec.qemuCwd ?? spec.rblockCwd;
  const qemuImage = spec.qemuImage ?? spec.image;
  const label = spec.image;
  const tag = spec.image.replace(/[^A-Za-z0-9]+/g, '_');
  const ref = join(spec.outDir, `${tag}.ref.raw`);
  const out = join(spec.outDir, `${tag}.out.raw`);
  const cwd = spec.rblockCwd;
  const qi = JSON.parse(qemuImg(qemuCwd, 'info', '--output=json', qemuImage).stdout) as Info;
  const stdout = spec.stdout ?? (qi['virtual-size'] as number) <= 2 * 1024 * 1024;

  // What rblock says, all commands at once.
  const [rRead, rStdout, rMap, rInfo, rChain] = await Promise.all([
    rblockAsync(['read', spec.image, '--output', out], cwd),
    stdout ? rblockAsync(['read', spec.image], cwd) : null,
    rblockAsync(['map', '--output', 'json', spec.image], cwd),
    rblockAsync(['info', '--output', 'json', spec.image], cwd),
    spec.chainLength !== undefined ? rblockAsync(['info', '--output', 'json', '--backing-chain', spec.image], cwd) : null,
  ]);

  // (a) guest content
  qemuImg(qemuCwd, 'convert', '-O', 'raw', qemuImage, ref);
  const want = await sha256File(ref);
  assert.equal(rRead.status, 0, `${label}: rblock read --output failed: ${rRead.stderr}`);
  assert.equal(await sha256File(out), want, `${label}: rblock read --output differs from qemu-img convert -O raw`);
  if (rStdout !== null) {
    assert.equal(rStdout.status, 0, `${label}: rblock read to stdout failed: ${rStdout.stderr}`);
    assert.equal(createHash('sha256').update(rStdout.stdout).digest('hex'), want, `${label}: rblock read to stdout differs from qemu`);
  }

  // (b) allocation map
  const qmap = mapEntries(qemuImg(qemuCwd, 'map', '--output=json', qemuImage).stdout, `qemu-img map ${label}`);
  assert.equal(rMap.status, 0, `${label}: rblock map failed: ${rMap.stderr}`);
  const rmap = mapEntries(rMap.stdout.toString('utf8'), `rblock map ${label}`);
  assert.deepEqual(rmap, qmap, `${label}: rblock map differs from qemu-img map`);

  // (c) info, and the backing chain
  const where = { rblockCwd: cwd, qemuCwd, label };
  compareInfo(rblockJson(rInfo, `rblock info ${label}`) as Info, qi, where);

  if (rChain === null) return { map: qmap, info: qi };
  const qc = JSON.parse(qemuImg(qemuCwd, 'info', '--output=json', '--backing-chain', qemuImage).stdout) as Info[];
  const rc = rblockJson(rChain, `rblock info --backing-chain ${label}`) as Info[];
  assert.ok(Array.isArray(rc), `${label}: rblock info --backing-chain did not print an array`);
  assert.equal(rc.length, qc.length, `${label}: backing chain length differs from qemu-img`);
  assert.equal(qc.length, spec.chainLength, `${label}: qemu-img sees an unexpected chain`);
  rc.forEach((r, i) => {
    compareInfo(r, qc[i]!, { ...where, label: `${label} (chain element ${i})` });
    if (i > 0) {
      assert.equal(
        resolve(cwd, r['filename'] as string),
        resolve(qemuCwd, qc[i]!['filename'] as string),
        `${label}: chain element ${i} is a different file`,
      );
    }
  });
  return { map: qmap, info: qi };
}
