/**
 * bin/rblock.cjs, the launcher: it compiles dist/bundle/cli.cjs with a V8
 * code cache per command in dist/cache/. The cache is an optimisation only,
 * so these tests check that it is written, keyed by the build, and that a
 * stale, corrupt or unwritable cache never changes what a command prints.
 * Each test works on a copy of bin/ and dist/bundle/ so the checkout's own
 * cache is left alone.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, cpSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, run, scratchDir } from '../helpers/tools.js';

/** A throw-away install: bin/rblock.cjs and dist/bundle/ copied, node_modules linked. */
function install(dir: string): { cli: (args: string[]) => { status: number; stdout: string; stderr: string }; cache: string } {
  mkdirSync(join(dir, 'bin'));
  mkdirSync(join(dir, 'dist'));
  cpSync(join(ROOT, 'bin', 'rblock.cjs'), join(dir, 'bin', 'rblock.cjs'));
  cpSync(join(ROOT, 'dist', 'bundle'), join(dir, 'dist', 'bundle'), { recursive: true });
  cpSync(join(ROOT, 'package.json'), join(dir, 'package.json'));
  symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'));
  const bin = join(dir, 'bin', 'rblock.cjs');
  return {
    cli: (args) => run(process.execPath, [bin, ...args], { check: false, cwd: dir }),
    cache: join(dir, 'dist', 'cache'),
  };
}

const build = (): string => {
  const m = /^\/\* rblock-build ([0-9a-f]{16}) \*\//.exec(readFileSync(join(ROOT, 'dist', 'bundle', 'cli.cjs'), 'latin1'));
  assert.ok(m, 'the bundle names its build on its first line');
  return m[1] as string;
};

test('launcher: the first run of a command writes its code cache, the next runs use it', () => {
  using s = scratchDir();
  const { cli, cache } = install(s.dir);
  const version = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
  const first = cli(['--version']);
  assert.equal(first.status, 0, first.stderr);
  assert.equal(first.stdout.trim(), version);
  assert.deepEqual(readdirSync(cache), [`none-${build()}.v8`]);
  const bytes = readFileSync(join(cache, `none-${build()}.v8`));
  assert.ok(bytes.length > 1000, 'a real V8 code cache');
  const second = cli(['--version']);
  assert.equal(second.stdout, first.stdout);
  assert.equal(second.status, 0);
  // One file per command; an error exit does not write one for a word that is not a command.
  const bad = cli(['frobnicate']);
  assert.notEqual(bad.status, 0);
  const img = join(s.dir, 'x.raw');
  writeFileSync(img, Buffer.alloc(4096));
  const info = cli(['info', '--output', 'json', img]);
  assert.equal(info.status, 0, info.stderr);
  assert.equal((JSON.parse(info.stdout) as { 'virtual-size': number })['virtual-size'], 4096);
  assert.deepEqual(readdirSync(cache).sort(), [`info-${build()}.v8`, `none-${build()}.v8`]);
});

test('launcher: a corrupt cache is ignored and replaced; a stale build id is never read', () => {
  using s = scratchDir();
  const { cli, cache } = install(s.dir);
  mkdirSync(cache);
  const file = join(cache, `none-${build()}.v8`);
  writeFileSync(file, Buffer.alloc(5000, 0xa5));
  const r = cli(['--version']);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /^\d+\.\d+\.\d+\n$/);
  assert.notDeepEqual(readFileSync(file), Buffer.alloc(5000, 0xa5), 'the rejected cache is rewritten');
  // A cache made for another build sits under another name and is not touched.
  const stale = join(cache, 'none-0123456789abcdef.v8');
  writeFileSync(stale, 'not a cache');
  assert.equal(cli(['--version']).stdout, r.stdout);
  assert.equal(readFileSync(stale, 'utf8'), 'not a cache');
});

test('launcher: an unwritable cache directory only means no cache', (t) => {
  using s = scratchDir();
  const { cli, cache } = install(s.dir);
  // A file where the directory should be: mkdir fails whoever runs the test (root ignores modes).
  writeFileSync(cache, '');
  chmodSync(cache, 0o444);
  const r = cli(['--version']);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stderr, '');
  assert.match(r.stdout, /^\d+\.\d+\.\d+\n$/);
  t.diagnostic('ran with dist/cache unusable');
});
