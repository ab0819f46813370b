/**
 * Mutated images: the "bad input" rule (a clear BlockError, never a crash, a
 * hang or memory sized by an untrusted field) checked on thousands of damaged
 * images rather than only the hand-crafted cases of test/unit/*bad-input*.
 *
 * Seeds are small images made by the real qemu-img/qemu-io (qcow2 plain,
 * extended L2, zlib and zstd compressed, with a backing file; VHD dynamic and
 * fixed; VMDK monolithicSparse and streamOptimized). Each mutant flips bits,
 * writes extreme 32/64-bit values (0, 2^31-1, 2^32-1, 2^63, ...) or nudges a
 * field, mostly in the first 64 KiB and the last KiB where the metadata
 * lives, sometimes truncates. Every mutant is then opened read-only, its info
 * (whole chain) taken, up to 8 MiB read, its map walked, and checked by
 * rblock's own check with repair=all: anything thrown must be a BlockError,
 * each mutant must finish within 10 s, and RSS must not grow by 256 MiB.
 *
 * A second test runs `qemu-img check` and `rblock check` on qcow2 mutants
 * and wants the same exit status and the same corruption/leak/check-error
 * counts: qemu's classification is the reference (issue 3 §2).
 *
 * Deterministic: the mutations come from fixed seeds, so a failure (it names
 * the mutant's index and seed image) comes back on every run.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { isBlockError } from '../../src/block/errors.js';
import { mapImage } from '../../src/copy/map.js';
import { imageInfoChain } from '../../src/formats/info.js';
import { checkQcow2 } from '../../src/formats/qcow2/check.js';
import { openImage } from '../../src/formats/registry.js';
import { checkVhd } from '../../src/formats/vhd/check.js';
import { checkVmdk } from '../../src/formats/vmdk/check.js';
import { hasTool, rblock, REQUIRE_TOOLS, run, scratchDir } from '../helpers/tools.js';
import { rng } from '../helpers/rng.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const scratch = scratchDir('rblock-mutants-');
after(() => scratch[Symbol.dispose]());
const SEEDS = join(scratch.dir, 'seeds');
const WORK = join(scratch.dir, 'work');

let ready = false;
before(() => {
  const missing = ['qemu-img', 'qemu-io'].filter((t) => !hasTool(t));
  if (missing.length > 0) {
    if (REQUIRE_TOOLS) throw new Error(`missing tool(s): ${missing.join(', ')} (RBLOCK_REQUIRE_TOOLS=1 forbids skipping)`);
    return;
  }
  mkdirSync(SEEDS);
  mkdirSync(WORK);
  const at = (f: string): string => join(SEEDS, f);
  const io = (img: string, ...cmds: string[]): void => void run('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), img]);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', at('q.qcow2'), '4M']);
  io(at('q.qcow2'), 'write -P 0x11 0 64k', 'write -P 0x22 1M 8k', 'write -z 2M 64k');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=16384,extended_l2=on', at('qx.qcow2'), '4M']);
  io(at('qx.qcow2'), 'write -P 0x33 4096 2048', 'write -z 8192 4096', 'write -P 0x44 100k 10k');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'q.qcow2', '-F', 'qcow2', at('qb.qcow2')]);
  io(at('qb.qcow2'), 'write -P 0x55 512k 4k');
  // Compressible content (text, then zeros) so that -c really compresses.
  const text = Buffer.alloc(MiB);
  for (let i = 0, n = 0; i < 600 * KiB; n++) i += text.write(`line ${n}: the quick brown fox ${n * 7919}\n`, i);
  writeFileSync(at('t.raw'), text);
  run('qemu-img', ['convert', '-c', '-O', 'qcow2', at('t.raw'), at('qc.qcow2')]);
  run('qemu-img', ['convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', at('t.raw'), at('qz.qcow2')]);
  run('qemu-img', ['convert', '-O', 'vpc', at('t.raw'), at('v.vhd')]);
  run('qemu-img', ['convert', '-O', 'vpc', '-o', 'subformat=fixed', at('t.raw'), at('vf.vhd')]);
  run('qemu-img', ['convert', '-O', 'vmdk', at('t.raw'), at('k.vmdk')]);
  run('qemu-img', ['convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', at('t.raw'), at('ks.vmdk')]);
  rmSync(at('t.raw'));
  // The backing file of qb.qcow2, unmutated, beside every mutant.
  copyFileSync(at('q.qcow2'), join(WORK, 'q.qcow2'));
  ready = true;
});

const QCOW2_SEEDS = ['q.qcow2', 'qx.qcow2', 'qb.qcow2', 'qc.qcow2', 'qz.qcow2'];
const ALL_SEEDS = [...QCOW2_SEEDS, 'v.vhd', 'vf.vhd', 'k.vmdk', 'ks.vmdk'];
const EXTREMES = [
  0n,
  1n,
  0xffn,
  0xffffn,
  0x200n,
  0x10000n,
  0x7fffffffn,
  0xfffffe00n,
  0xffffffffn,
  0x100000000n,
  1n << 63n,
  (1n << 64n) - 1n,
];

/** One mutant of `orig`: 1-4 local damages, mostly in the metadata areas; sometimes truncated. */
function mutate(orig: Buffer, r: () => number): Buffer {
  const ri = (n: number): number => Math.floor(r() * n);
  const b = Buffer.from(orig);
  for (let k = 1 + ri(4); k > 0; k--) {
    const tail = r() < 0.15;
    const lo = tail ? Math.max(0, b.length - KiB) : 0;
    const hi = tail ? b.length : r() < 0.8 ? Math.min(b.length, 64 * KiB) : b.length;
    const off = lo + ri(Math.max(1, hi - lo - 8));
    const v = EXTREMES[ri(EXTREMES.length)] as bigint;
    switch (ri(5)) {
      case 0:
        b[off] = (b[off] as number) ^ (1 << ri(8));
        break;
      case 1:
        b[off] = ri(256);
        break;
      case 2: {
        const at = off & ~7;
        if (r() < 0.5) b.writeBigUInt64BE(v, at);
        else b.writeBigUInt64LE(v, at);
        break;
      }
      case 3: {
        const at = off & ~3;
        if (r() < 0.5) b.writeUInt32BE(Number(v & 0xffffffffn), at);
        else b.writeUInt32LE(Number(v & 0xffffffffn), at);
        break;
      }
      default: {
        const at = off & ~3;
        b.writeUInt32BE((b.readUInt32BE(at) + (ri(3) - 1) * (1 << ri(20))) >>> 0, at);
      }
    }
  }
  return r() < 0.05 ? b.subarray(0, ri(b.length)) : b;
}

async function exercise(path: string): Promise<void> {
  const dev = await openImage(path, { readOnly: true });
  try {
    await imageInfoChain(dev);
    const n = Math.min(dev.size, 8 * MiB);
    const buf = new Uint8Array(MiB);
    for (let o = 0; o < n; o += buf.length) await dev.pread(buf.subarray(0, Math.min(buf.length, n - o)), o);
    let entries = 0;
    for await (const e of mapImage(dev)) {
      assert.ok(e.length > 0, `${path}: empty map entry`);
      if (++entries > 100_000) break;
    }
  } finally {
    await dev.close();
  }
  const check = path.endsWith('.qcow2') ? checkQcow2 : path.endsWith('.vhd') ? checkVhd : checkVmdk;
  await check(path, { repair: 'all', log: () => {} });
}

test('mutated images: only BlockErrors, no hang, bounded memory (1200 mutants)', { timeout: 600_000 }, async (t) => {
  if (!ready) return t.skip('qemu-img/qemu-io missing');
  const r = rng(20261121);
  const outcomes = { opened: 0, refused: 0 };
  for (let i = 0; i < 1200; i++) {
    const seed = ALL_SEEDS[Math.floor(r() * ALL_SEEDS.length)] as string;
    const path = join(WORK, `m${i}-${seed}`);
    writeFileSync(path, mutate(readFileSync(join(SEEDS, seed)), r));
    const rss0 = process.memoryUsage().rss;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        exercise(path),
        new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`${path}: still running after 10 s`)), 10_000))),
      ]);
      outcomes.opened++;
    } catch (e) {
      assert.ok(isBlockError(e), `${path}: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
      assert.ok(e.message.includes(path) || e.message.includes('q.qcow2'), `${path}: the error names no file: ${e.message}`);
      outcomes.refused++;
    } finally {
      clearTimeout(timer);
    }
    const grew = process.memoryUsage().rss - rss0;
    assert.ok(grew < 256 * MiB, `${path}: RSS grew by ${grew >> 20} MiB`);
    rmSync(path);
  }
  t.diagnostic(`opened and read: ${outcomes.opened}, refused with a BlockError: ${outcomes.refused}`);
  // Both paths must be exercised, or the mutations are too weak or too strong to test anything.
  assert.ok(outcomes.opened > 100 && outcomes.refused > 30, JSON.stringify(outcomes));
});

test('qemu-img check and rblock check agree on mutated qcow2 images (80 mutants)', { timeout: 600_000 }, async (t) => {
  if (!ready) return t.skip('qemu-img/qemu-io missing');
  const r = rng(7);
  const counts = (json: string): string => {
    try {
      const j = JSON.parse(json) as Record<string, number>;
      return `corruptions ${j['corruptions'] ?? 0}, leaks ${j['leaks'] ?? 0}, check-errors ${j['check-errors'] ?? 0}`;
    } catch {
      return 'no JSON';
    }
  };
  let unclean = 0;
  for (let i = 0; i < 80; i++) {
    const seed = QCOW2_SEEDS[Math.floor(r() * QCOW2_SEEDS.length)] as string;
    const path = join(WORK, `c${i}-${seed}`);
    writeFileSync(path, mutate(readFileSync(join(SEEDS, seed)), r));
    const q = run('qemu-img', ['check', '--output=json', '-f', 'qcow2', path], { check: false });
    const ours = rblock(['check', '--output', 'json', '-f', 'qcow2', path]);
    assert.equal(ours.status, q.status, `${path}: exit status (qemu-img stderr: ${q.stderr.trim()}; rblock stderr: ${ours.stderr.trim()})`);
    if (q.status === 0 || q.status === 2 || q.status === 3) assert.equal(counts(ours.stdout), counts(q.stdout), path);
    if (q.status !== 0) unclean++;
    rmSync(path);
  }
  t.diagnostic(`mutants qemu-img did not find clean: ${unclean}`);
});
