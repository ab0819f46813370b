/**
 * compare and delta against qemu-img, on two 2 GiB raw disks of random data
 * that differ in 1% of their 512-byte sectors (scattered at random).
 *
 *   node dist/bench/compare.js [--size 2G] [--runs 3] [--dir DIR] [--keep]
 *
 * compare: `rblock compare --output json` (which lists every differing
 * range) against `qemu-img compare` (which stops at the first difference, so
 * it is also timed on two identical disks, where both read everything, and
 * as `rblock compare -q`, which stops at the first difference too).
 * delta: `rblock delta` against qemu's way of making the same overlay
 * (`qemu-img create -b TARGET` then a safe `qemu-img rebase -b BASE`).
 * Runs alternate A and B after a `sync`; medians are quoted.
 */
import { createCipheriv } from 'node:crypto';
import { closeSync, copyFileSync, existsSync, mkdirSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { prng } from './images.js';
import { median, run, sync, timedRun, type RunResult } from './measure.js';

const MiB = 1 << 20;
const SECTOR = 512;
const RBLOCK = resolve(dirname(fileURLToPath(import.meta.url)), '../../bin/rblock.cjs');

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

function parseSize(s: string): number {
  const m = /^(\d+)([KMG]?)$/i.exec(s);
  if (m === null) throw new Error(`bad size ${s}`);
  return Number(m[1]) * ({ '': 1, K: 1024, M: MiB, G: 1024 * MiB }[(m[2] as string).toUpperCase()] as number);
}

/** base.raw (AES-CTR keystream), target.raw (1% of sectors changed), same.raw (a copy of base). */
function makeImages(dir: string, size: number): number {
  const chunk = 8 * MiB;
  const cipher = createCipheriv('aes-128-ctr', Buffer.alloc(16, 7), Buffer.alloc(16, 1));
  const zeros = Buffer.alloc(chunk);
  const rnd = prng(1234);
  const fa = openSync(join(dir, 'base.raw'), 'w');
  const fb = openSync(join(dir, 'target.raw'), 'w');
  let changed = 0;
  try {
    for (let off = 0; off < size; off += chunk) {
      const n = Math.min(chunk, size - off);
      const a = cipher.update(zeros.subarray(0, n));
      writeSync(fa, a, 0, n, off);
      const b = Buffer.from(a);
      const sectors = Math.ceil(n / SECTOR);
      for (let s = 0; s < sectors; s++) {
        if (rnd() < 0.01) {
          b[s * SECTOR + Math.floor(rnd() * Math.min(SECTOR, n - s * SECTOR))]! ^= 0xff;
          changed++;
        }
      }
      writeSync(fb, b, 0, n, off);
    }
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
  copyFileSync(join(dir, 'base.raw'), join(dir, 'same.raw'));
  return changed;
}

interface Row {
  name: string;
  rblock: RunResult[];
  qemu: RunResult[];
}

async function pair(
  name: string,
  runs: number,
  dir: string,
  a: () => [string, string[], (() => void)?],
  b: () => [string, string[], (() => void)?],
): Promise<Row> {
  const row: Row = { name, rblock: [], qemu: [] };
  for (let i = 0; i < runs; i++) {
    for (const [side, mk] of [
      ['rblock', a],
      ['qemu', b],
    ] as const) {
      const [cmd, args, before] = mk();
      before?.();
      sync();
      row[side].push(await timedRun(cmd, args, { cwd: dir, scratch: dir }));
    }
  }
  return row;
}

/** timedRun treats any exit but 0 as failure; compare of different images exits 1 (2 is still an error). */
function shOk(cmd: string): [string, string[]] {
  return ['sh', ['-c', `${cmd}; test $? -le 1`]];
}

async function main(): Promise<void> {
  const size = parseSize(arg('--size') ?? '2G');
  const runs = Number(arg('--runs') ?? '3');
  const dir = resolve(arg('--dir') ?? join(tmpdir(), 'rblock-bench-compare'));
  mkdirSync(dir, { recursive: true });
  const marker = join(dir, `.ready-${size}`);
  if (!existsSync(marker)) {
    console.log(`making two ${size / MiB} MiB raw disks in ${dir} ...`);
    const changed = makeImages(dir, size);
    closeSync(openSync(marker, 'w'));
    console.log(`${changed} sectors changed (${((changed / (size / SECTOR)) * 100).toFixed(2)}%)`);
  }
  const node = process.execPath;
  const rows: Row[] = [];
  rows.push(
    await pair(
      'compare, 1% differ (qemu-img stops at the first)',
      runs,
      dir,
      () => shOk(`${node} ${RBLOCK} compare -f raw -F raw --output json base.raw target.raw > /dev/null`),
      () => shOk('qemu-img compare -f raw -F raw base.raw target.raw > /dev/null'),
    ),
  );
  rows.push(
    await pair(
      'compare -q, 1% differ (both stop at the first)',
      runs,
      dir,
      () => shOk(`${node} ${RBLOCK} compare -q -f raw -F raw base.raw target.raw`),
      () => shOk('qemu-img compare -q -f raw -F raw base.raw target.raw'),
    ),
  );
  rows.push(
    await pair(
      'compare, identical',
      runs,
      dir,
      () => [node, [RBLOCK, 'compare', '-f', 'raw', '-F', 'raw', 'base.raw', 'same.raw']],
      () => ['qemu-img', ['compare', '-f', 'raw', '-F', 'raw', 'base.raw', 'same.raw']],
    ),
  );
  const clean = (f: string) => (): void => rmSync(join(dir, f), { force: true });
  rows.push(
    await pair(
      'delta (rblock delta vs qemu-img create + rebase)',
      runs,
      dir,
      () => [node, [RBLOCK, 'delta', '--base', 'base.raw', '--target', 'target.raw', '-o', 'delta.qcow2', '-q'], clean('delta.qcow2')],
      () => [
        'sh',
        [
          '-c',
          'qemu-img create -q -f qcow2 -b target.raw -F raw qdelta.qcow2 && qemu-img rebase -q -f qcow2 -b base.raw -F raw qdelta.qcow2',
        ],
        clean('qdelta.qcow2'),
      ],
    ),
  );
  // Both deltas must read as the target.
  run('qemu-img', ['compare', '-F', 'raw', join(dir, 'delta.qcow2'), join(dir, 'target.raw')]);
  run('qemu-img', ['compare', '-F', 'raw', join(dir, 'qdelta.qcow2'), join(dir, 'target.raw')]);

  console.log(`\n${size / MiB} MiB raw disks, ${runs} runs each, medians (ratio = rblock / qemu-img):`);
  for (const r of rows) {
    const rm = median(r.rblock.map((x) => x.ms));
    const qm = median(r.qemu.map((x) => x.ms));
    const rr = Math.max(...r.rblock.map((x) => x.rssKiB)) / 1024;
    const qr = Math.max(...r.qemu.map((x) => x.rssKiB)) / 1024;
    console.log(
      `${r.name.padEnd(50)} rblock ${(rm / 1000).toFixed(2)} s (${rr.toFixed(0)} MiB RSS)  qemu-img ${(qm / 1000).toFixed(2)} s (${qr.toFixed(0)} MiB RSS)  ratio ${(rm / qm).toFixed(2)}`,
    );
  }
  if (!process.argv.includes('--keep')) {
    for (const f of ['base.raw', 'target.raw', 'same.raw', 'delta.qcow2', 'qdelta.qcow2', `.ready-${size}`])
      rmSync(join(dir, f), { force: true });
  }
}

await main();
