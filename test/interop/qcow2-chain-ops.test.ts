/**
 * rebase, commit and resize against qemu-img: the guest content is what
 * qemu-img reads before the operation (qemu-img compare), the images check
 * clean, and the headers say what qemu-img info expects.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import test from 'node:test';
import { needTools, rblock, run, scratchDir } from '../helpers/tools.js';

function info(img: string): Record<string, unknown> {
  return JSON.parse(run('qemu-img', ['info', '--output=json', img]).stdout) as Record<string, unknown>;
}

function same(a: string, b: string): void {
  const r = run('qemu-img', ['compare', a, b], { check: false });
  assert.equal(r.status, 0, `${a} vs ${b}: ${r.stdout}${r.stderr}`);
}

function clean(img: string): void {
  const r = run('qemu-img', ['check', img], { check: false });
  assert.equal(r.status, 0, r.stdout + r.stderr);
}

function ok(args: string[]): void {
  const r = rblock(args);
  assert.equal(r.status, 0, `rblock ${args.join(' ')}: ${r.stderr}`);
}

test('rebase: safe mode keeps the guest content; -u only renames; "" flattens', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  using s = scratchDir();
  const p = (n: string): string => join(s.dir, n);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', p('b1.qcow2'), '8M']);
  run('qemu-io', ['-c', 'write -P 1 0 4M', p('b1.qcow2')]);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', p('b2.qcow2'), '8M']);
  run('qemu-io', ['-c', 'write -P 2 1M 4M', '-c', 'write -P 1 6M 64k', p('b2.qcow2')]);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'b1.qcow2', '-F', 'qcow2', p('top.qcow2')]);
  run('qemu-io', ['-c', 'write -P 3 3M 2M', '-c', 'write -P 4 100k 5000', p('top.qcow2')]);
  run('qemu-img', ['convert', '-O', 'raw', p('top.qcow2'), p('before.raw')]);

  ok(['rebase', '-b', 'b2.qcow2', '-F', 'qcow2', p('top.qcow2')]);
  assert.equal(info(p('top.qcow2'))['backing-filename'], 'b2.qcow2');
  assert.equal(info(p('top.qcow2'))['backing-filename-format'], 'qcow2');
  same(p('top.qcow2'), p('before.raw'));
  clean(p('top.qcow2'));
  // Only clusters where b1 and b2 differ were copied: 0..3M (b1 has 1, b2 has 0 then 2) and
  // 6M..6M+64k (b2 has data there); 5M..6M is zero in both; 3M..5M is the overlay's own.
  const map = JSON.parse(run('qemu-img', ['map', '--output=json', p('top.qcow2')]).stdout) as {
    start: number;
    length: number;
    depth: number;
  }[];
  const own = map.filter((m) => m.depth === 0 && m.start < 8 << 20).reduce((n, m) => n + m.length, 0);
  assert.equal(own, 5 * 2 ** 20 + 65536, JSON.stringify(map));

  ok(['rebase', '-u', '-b', 'b1.qcow2', '-F', 'qcow2', p('top.qcow2')]);
  assert.equal(info(p('top.qcow2'))['backing-filename'], 'b1.qcow2');
  ok(['rebase', '-b', '', p('top.qcow2')]);
  assert.equal(info(p('top.qcow2'))['backing-filename'], undefined);
  same(p('top.qcow2'), p('before.raw'));
  clean(p('top.qcow2'));
});

test('commit: the base gets the overlay content (and grows), the overlay is emptied', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  using s = scratchDir();
  const p = (n: string): string => join(s.dir, n);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', p('base.qcow2'), '8M']);
  run('qemu-io', ['-c', 'write -P 1 0 6M', p('base.qcow2')]);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', p('top.qcow2'), '12M']);
  run('qemu-io', ['-c', 'write -P 9 2M 3M', '-c', 'write -z 0 64k', '-c', 'write -P 8 10M 1M', '-c', 'write -P 7 4097 3', p('top.qcow2')]);
  run('qemu-img', ['convert', '-O', 'raw', p('top.qcow2'), p('before.raw')]);
  ok(['commit', p('top.qcow2')]);
  same(p('base.qcow2'), p('before.raw'));
  same(p('top.qcow2'), p('before.raw'));
  clean(p('base.qcow2'));
  clean(p('top.qcow2'));
  assert.equal(info(p('base.qcow2'))['virtual-size'], 12 << 20);
  const map = JSON.parse(run('qemu-img', ['map', '--output=json', p('top.qcow2')]).stdout) as { depth: number; data: boolean }[];
  assert.ok(
    map.every((m) => m.depth !== 0 || !m.data),
    `overlay not empty: ${JSON.stringify(map)}`,
  );
  const bad = rblock(['commit', p('base.qcow2')]);
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /no backing file/);
});

test('resize: grow (with L1 growth), shrink only with --shrink and only when nothing is cut', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  using s = scratchDir();
  const img = join(s.dir, 'r.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, '8M']);
  run('qemu-io', ['-c', 'write -P 5 1M 2M', img]);
  run('qemu-img', ['convert', '-O', 'raw', img, join(s.dir, 'ref.raw')]);
  ok(['resize', img, '+3G']);
  assert.equal(info(img)['virtual-size'], 8 * 2 ** 20 + 3 * 2 ** 30);
  clean(img);
  run('qemu-io', ['-c', 'write -P 6 3G 64k', img]);
  const cut = rblock(['resize', '--shrink', img, '8M']);
  assert.equal(cut.status, 1);
  assert.match(cut.stderr, /is allocated/);
  const noFlag = rblock(['resize', img, '--', '-1M']);
  assert.equal(noFlag.status, 1);
  assert.match(noFlag.stderr, /--shrink/);
  run('qemu-io', ['-c', 'discard 3G 64k', img]);
  ok(['resize', '--shrink', img, '8M']);
  assert.equal(info(img)['virtual-size'], 8 << 20);
  clean(img);
  same(img, join(s.dir, 'ref.raw'));
  const raw = join(s.dir, 'r.raw');
  run('qemu-img', ['create', '-q', '-f', 'raw', raw, '1M']);
  ok(['resize', '-f', 'raw', raw, '2M']);
  assert.equal(info(raw)['virtual-size'], 2 << 20);
});
