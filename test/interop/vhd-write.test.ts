/**
 * VHD (vpc) writing, checked by other tools: images made and written by
 * rblock (create dynamic / fixed / differencing, random writes with
 * unaligned and zero writes, convert -O vpc, --preset azure) must be read by
 * `qemu-img` exactly like an in-memory reference (`qemu-img compare`), be
 * recognised by libvhdi's `vhdiinfo` with the right type and size, and pass
 * `rblock check`. qemu-img 7.2 cannot read through a differencing disk's
 * parent, so differencing chains are checked by rblock against the reference
 * and by vhdiinfo for their parent links; the parent's bytes never change.
 * A crash test kills a writer (SIGKILL) at random points, 20+ times: the
 * disk must open, pass check (leaks allowed) and hold every flushed write.
 */
import { after, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { main } from '../../src/cli/main.js';
import { openImage } from '../../src/formats/registry.js';
import { hasTool, needTools, REQUIRE_TOOLS, ROOT as REPO, run, scratchDir, sha256File } from '../helpers/tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const scratch = scratchDir('rblock-vhd-write-');
after(() => scratch[Symbol.dispose]());
const DIR = scratch.dir;
const at = (name: string): string => join(DIR, name);

function ready(t: TestContext): boolean {
  return needTools(t, 'qemu-img', 'qemu-io');
}

function qemuImg(...args: string[]): string {
  return run('qemu-img', args, { cwd: DIR }).stdout;
}

/** The rblock CLI in process; returns exit code and output. */
async function rb(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const code = await main(args, {
    out: async (x) => {
      out += typeof x === 'string' ? x : Buffer.from(x).toString('latin1');
    },
    err: (x) => {
      err += x;
    },
  });
  return { code, out, err };
}

async function rbOk(...args: string[]): Promise<string> {
  const r = await rb(...args);
  assert.equal(r.code, 0, `rblock ${args.join(' ')}: ${r.err}`);
  return r.out;
}

/** xorshift32 */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n: number) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

function bytes(len: number, seed: number): Uint8Array {
  const r = rng(seed);
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = r(255) + 1;
  return b;
}

/** Random writes (unaligned, across blocks), zero writes and discards, mirrored in `mem`. */
async function workload(path: string, mem: Uint8Array, seed: number, ops: number): Promise<void> {
  const r = rng(seed);
  await using dev = await openImage(path, { readOnly: false });
  assert.equal(dev.size, mem.length);
  for (let i = 0; i < ops; i++) {
    const len = 1 + (r(4) === 0 ? r(3 * MiB) : r(70 * KiB));
    const off = r(mem.length - len);
    const op = r(6);
    if (op === 0) {
      await dev.writeZeroes(off, len, {});
      mem.fill(0, off, off + len);
    } else if (op === 1) {
      await dev.discard(off, len); // advisory: nothing changes
    } else {
      const b = bytes(len, seed * 1000 + i);
      await dev.pwrite(b, off);
      mem.set(b, off);
    }
  }
  await dev.flush();
  const back = new Uint8Array(mem.length);
  await dev.pread(back, 0);
  assert.ok(Buffer.from(back).equals(Buffer.from(mem)), `${path}: reads back what was written`);
}

function vhdiinfo(t: TestContext, path: string): string | null {
  if (!hasTool('vhdiinfo')) {
    if (REQUIRE_TOOLS) throw new Error('missing tool: vhdiinfo (RBLOCK_REQUIRE_TOOLS=1 forbids skipping)');
    t.diagnostic('vhdiinfo (libvhdi-utils) not installed: libvhdi checks skipped');
    return null;
  }
  return run('vhdiinfo', [path]).stdout;
}

function assertVhdi(t: TestContext, path: string, type: 'Dynamic' | 'Fixed' | 'Differential', size: number): string | null {
  const info = vhdiinfo(t, path);
  if (info === null) return null;
  assert.match(info, new RegExp(`Disk type\\s*: ${type}\\b`), `${path}: vhdiinfo type\n${info}`);
  assert.match(info, new RegExp(`Media size\\s*: .*\\(${size} bytes\\)`), `${path}: vhdiinfo size\n${info}`);
  return info;
}

async function assertClean(path: string): Promise<void> {
  const r = await rb('check', path);
  assert.equal(r.code, 0, `check ${path}: ${r.out}${r.err}`);
}

/** Byte positions where two files differ, as ranges. */
function diffRanges(a: Uint8Array, b: Uint8Array): [number, number][] {
  assert.equal(a.length, b.length);
  const out: [number, number][] = [];
  for (let i = 0; i < a.length; i++) {
    if (a[i] === b[i]) continue;
    const last = out[out.length - 1];
    if (last !== undefined && last[1] >= i - 1) last[1] = i;
    else out.push([i, i]);
  }
  return out;
}

test('vhd create: byte for byte what qemu-img 7.2 writes, but for uuid, timestamp and checksums', async (t) => {
  if (!ready(t)) return;
  const cases: [string, string[]][] = [
    ['10M', []],
    ['10M', ['-o', 'force_size=on']],
    ['10M', ['-o', 'subformat=fixed']],
    ['10M', ['-o', 'subformat=fixed,force_size=on']],
    ['100M', []],
    ['1000000', []],
    ['130G', []],
    ['3G', ['-o', 'force_size=on']],
  ];
  let n = 0;
  for (const [size, opts] of cases) {
    const q = at(`q${n}.vhd`);
    const r = at(`r${n}.vhd`);
    n++;
    const qout = qemuImg('create', '-f', 'vpc', ...opts, q, size);
    const rout = await rbOk('create', '-f', 'vpc', ...opts, r, size);
    assert.equal(rout.replace(r, q), qout, 'summary line');
    const a = readFileSync(q);
    const b = readFileSync(r);
    assert.equal(b.length, a.length, `${size} ${opts.join(' ')}: file size`);
    const fixed = opts.join().includes('fixed');
    // The footer (and its copy): timestamp 24..27, checksum 64..67, unique id 68..83.
    const footers = fixed ? [a.length - 512] : [0, a.length - 512];
    for (const [s, e] of diffRanges(a, b)) {
      const ok = footers.some((f) => s >= f + 24 && e < f + 84 && !(s >= f + 28 && e < f + 64) && !(s < f + 28 && e >= f + 28));
      assert.ok(ok, `${size} ${opts.join(' ')}: bytes ${s}..${e} differ`);
    }
    const qi = JSON.parse(qemuImg('info', '-f', 'vpc', '--output=json', r)) as Record<string, unknown>;
    const ri = JSON.parse(await rbOk('info', '--output', 'json', r)) as Record<string, unknown>;
    assert.equal(ri['virtual-size'], qi['virtual-size']);
  }
});

test('vhd write: random writes, unaligned and zero writes, read identically by qemu-img and libvhdi', async (t) => {
  if (!ready(t)) return;
  for (const [name, opts, seed] of [
    ['dyn.vhd', [], 1],
    ['dyn-force.vhd', ['-o', 'force_size=on,block_size=1M'], 2],
    ['fixed.vhd', ['-o', 'subformat=fixed'], 3],
  ] as const) {
    const p = at(name);
    await rbOk('create', '-f', 'vpc', ...opts, p, '24M');
    const size = JSON.parse(await rbOk('info', '--output', 'json', p))['virtual-size'] as number;
    const mem = new Uint8Array(size);
    await workload(p, mem, seed, 60);
    // A second session: writes into blocks allocated by the first.
    await workload(p, mem, seed + 100, 40);
    writeFileSync(at(`${name}.ref`), mem);
    assert.match(qemuImg('compare', '-f', 'vpc', '-F', 'raw', p, at(`${name}.ref`)), /Images are identical/);
    await assertClean(p);
    assertVhdi(t, p, name.startsWith('fixed') ? 'Fixed' : 'Dynamic', size);
  }
  // Zero writes and discards never allocate a block of a dynamic disk.
  const z = at('zeros.vhd');
  await rbOk('create', '-f', 'vpc', z, '8M');
  const before = statSync(z).size;
  {
    await using dev = await openImage(z, { readOnly: false });
    await dev.writeZeroes(0, dev.size, {});
    await dev.discard(0, dev.size);
  }
  assert.equal(statSync(z).size, before);
  // qemu-io writes into an rblock-made disk, and rblock reads them.
  await rbOk('create', '-f', 'vpc', at('qio.vhd'), '8M');
  run('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x5a 1000000 300000', at('qio.vhd')]);
  await rbOk('convert', '-O', 'raw', at('qio.vhd'), at('qio.raw'));
  assert.match(qemuImg('compare', '-f', 'vpc', '-F', 'raw', at('qio.vhd'), at('qio.raw')), /identical/);
});

test('vhd differencing: a chain of depth 3 made and written by rblock; parents never change', async (t) => {
  if (!ready(t)) return;
  mkdirSync(at('chain/kids'), { recursive: true });
  const base = at('chain/base.vhd');
  await rbOk('create', '-f', 'vpc', base, '12M');
  const size = JSON.parse(await rbOk('info', '--output', 'json', base))['virtual-size'] as number;
  const mem = new Uint8Array(size);
  await workload(base, mem, 7, 30);
  const c1 = at('chain/kids/c1.vhd');
  const c2 = at('chain/kids/c2.vhd');
  await rbOk('create', '-f', 'vpc', '-b', '../base.vhd', c1);
  await rbOk('create', '-f', 'vpc', '-b', 'c1.vhd', c2);
  const baseSum = await sha256File(base);
  await workload(c1, mem, 8, 40);
  const c1Sum = await sha256File(c1);
  assert.equal(await sha256File(base), baseSum, 'the base is untouched by writes into c1');
  await workload(c2, mem, 9, 40);
  assert.equal(await sha256File(base), baseSum, 'the base is untouched by writes into c2');
  assert.equal(await sha256File(c1), c1Sum, 'c1 is untouched by writes into c2');
  await rbOk('read', c2, '--output', at('chain/c2.raw'));
  assert.ok(readFileSync(at('chain/c2.raw')).equals(Buffer.from(mem)), 'the chain reads like the reference');
  for (const p of [base, c1, c2]) await assertClean(p);
  // convert -O vpc -B: a differencing target that stores only what differs from its parent.
  const flat = at('chain/flat.raw');
  writeFileSync(flat, mem);
  const conv = at('chain/kids/conv.vhd');
  await rbOk('convert', '-O', 'vpc', '-B', 'c1.vhd', '-F', 'vpc', flat, conv);
  await rbOk('read', conv, '--output', at('chain/conv.raw'));
  assert.ok(readFileSync(at('chain/conv.raw')).equals(Buffer.from(mem)), 'convert -B: reads like the reference');
  await assertClean(conv);
  const ri = JSON.parse(await rbOk('info', '--output', 'json', c2)) as Record<string, unknown>;
  assert.equal(ri['backing-filename'], 'c1.vhd');
  const spec = (ri['format-specific'] as { data: Record<string, unknown> }).data;
  assert.equal(spec['disk-type'], 'differencing');
  const uuidOf = async (p: string): Promise<string> =>
    (JSON.parse(await rbOk('info', '--output', 'json', p))['format-specific'] as { data: { uuid: string } }).data.uuid;
  const info = assertVhdi(t, c2, 'Differential', size);
  if (info !== null) {
    assert.match(info, new RegExp(`Parent identifier\\s*: ${await uuidOf(c1)}`));
    assert.match(info, /Parent filename\s*: c1\.vhd/);
  }
  // qemu-img (no differencing support) still opens the child as a dynamic disk of the right size.
  const qi = JSON.parse(qemuImg('info', '-f', 'vpc', '--output=json', c2)) as Record<string, unknown>;
  assert.equal(qi['virtual-size'], size);
});

/** Mount `image` with libvhdi's vhdimount (FUSE) and hash the image's layer; null where FUSE does not work here. */
async function vhdimountSha(t: TestContext, image: string, mnt: string): Promise<string | null> {
  mkdirSync(mnt, { recursive: true });
  const proc = spawn('vhdimount', ['-X', 'allow_root', image, mnt], { stdio: 'ignore' });
  const gone = new Promise<void>((resolve) => proc.on('exit', () => resolve()));
  try {
    const deadline = Date.now() + 5000;
    while (Date.now() < deadline) {
      try {
        // vhdi1 is the bottom of the chain, vhdiN the image itself.
        const top = readdirSync(mnt)
          .filter((n) => /^vhdi\d+$/.test(n))
          .sort((a, b) => Number(a.slice(4)) - Number(b.slice(4)))
          .pop();
        if (top !== undefined && statSync(join(mnt, top)).size > 0) return await sha256File(join(mnt, top));
      } catch {
        // not mounted yet
      }
      if (proc.exitCode !== null && proc.exitCode !== 0) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    t.diagnostic('vhdimount could not mount here (FUSE): libvhdi data check skipped');
    return null;
  } finally {
    run('fusermount', ['-u', mnt], { check: false });
    run('umount', [mnt], { check: false });
    if (proc.exitCode === null) proc.kill('SIGTERM');
    await Promise.race([gone, new Promise((r) => setTimeout(r, 1000))]);
  }
}

test('vhd differencing: libvhdi (vhdimount) reads an rblock chain of depth 3 like the reference', async (t) => {
  if (!ready(t)) return;
  if (!hasTool('vhdimount')) {
    if (REQUIRE_TOOLS) throw new Error('missing tool: vhdimount (RBLOCK_REQUIRE_TOOLS=1 forbids skipping)');
    t.skip('vhdimount (libvhdi-utils) not installed');
    return;
  }
  // libvhdi looks for a parent by the header's parent name in the child's directory: one directory.
  mkdirSync(at('same'), { recursive: true });
  const base = at('same/base.vhd');
  await rbOk('create', '-f', 'vpc', base, '10M');
  const size = JSON.parse(await rbOk('info', '--output', 'json', base))['virtual-size'] as number;
  const mem = new Uint8Array(size);
  await workload(base, mem, 21, 20);
  await rbOk('create', '-f', 'vpc', '-b', 'base.vhd', at('same/c1.vhd'));
  await workload(at('same/c1.vhd'), mem, 22, 25);
  await rbOk('create', '-f', 'vpc', '-b', 'c1.vhd', at('same/c2.vhd'));
  await workload(at('same/c2.vhd'), mem, 23, 25);
  writeFileSync(at('same/ref.raw'), mem);
  const got = await vhdimountSha(t, at('same/c2.vhd'), at('same/mnt'));
  if (got !== null) assert.equal(got, await sha256File(at('same/ref.raw')), 'libvhdi reads the chain as written');
});

test('vhd convert -O vpc (from raw and qcow2) and --preset azure', async (t) => {
  if (!ready(t)) return;
  const src = at('src.raw');
  const raw = new Uint8Array(9 * MiB + 12345);
  raw.set(bytes(3 * MiB, 11), 0);
  raw.set(bytes(100 * KiB + 7, 12), 6 * MiB + 3);
  writeFileSync(src, raw);
  qemuImg('convert', '-f', 'raw', '-O', 'qcow2', src, at('src.qcow2'));
  for (const [from, fmt] of [
    [src, 'raw'],
    [at('src.qcow2'), 'qcow2'],
  ] as const) {
    for (const sub of ['dynamic', 'fixed']) {
      const out = at(`conv-${fmt}-${sub}.vhd`);
      await rbOk('convert', '-O', 'vpc', '-o', `subformat=${sub}`, from, out);
      // The VHD is rounded up to a CHS size: compare the source's bytes, and zeros after (not strict).
      assert.match(qemuImg('compare', '-f', fmt, '-F', 'vpc', from, out), /Images are identical/, `${fmt} -> ${sub}`);
      await assertClean(out);
      const q = at(`qconv-${fmt}-${sub}.vhd`);
      qemuImg('convert', '-f', fmt, '-O', 'vpc', '-o', `subformat=${sub}`, from, q);
      if (sub === 'dynamic') {
        // Sparse like qemu-img: blocks that are all zeros are not written.
        assert.equal(statSync(out).size, statSync(q).size, 'dynamic VHD file size as qemu-img');
      }
      assertVhdi(
        t,
        out,
        sub === 'fixed' ? 'Fixed' : 'Dynamic',
        JSON.parse(qemuImg('info', '-f', 'vpc', '--output=json', out))['virtual-size'] as number,
      );
    }
  }
  const az = at('azure.vhd');
  await rbOk('convert', '-O', 'vpc', '--preset', 'azure', src, az);
  const want = 10 * MiB;
  assert.equal(statSync(az).size, want + 512, 'fixed: data then footer');
  const qi = JSON.parse(qemuImg('info', '-f', 'vpc', '--output=json', az)) as Record<string, unknown>;
  assert.equal(qi['virtual-size'], want, 'a whole number of MiB');
  const footer = readFileSync(az).subarray(want);
  assert.equal(footer.subarray(0, 8).toString('latin1'), 'conectix');
  assert.equal(footer.readUInt32BE(60), 2, 'fixed disk');
  assert.equal(footer.readBigUInt64BE(48), BigInt(want), 'current_size');
  assert.equal(footer.readUInt32BE(8), 2, 'features');
  assert.equal(footer.readUInt32BE(12), 0x10000, 'version');
  assert.match(qemuImg('compare', '-f', 'raw', '-F', 'vpc', src, az), /Images are identical/);
  assertVhdi(t, az, 'Fixed', want);
  await assertClean(az);
});

/** The writer run by the crash test: writes rounds into disjoint slots, prints each round once flushed. */
const CHILD = `
import { openImage } from ${JSON.stringify(join(REPO, 'dist', 'src', 'formats', 'registry.js'))};
const [path, seedText] = process.argv.slice(2);
const seed = Number(seedText);
let x = seed >>> 0 || 1;
const r = (n) => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x % n; };
const dev = await openImage(path, { readOnly: false });
const SLOT = 96 * 1024;
const slots = Math.floor(dev.size / SLOT);
const order = [...Array(slots).keys()];
for (let i = slots - 1; i > 0; i--) { const j = r(i + 1); [order[i], order[j]] = [order[j], order[i]]; }
for (let k = 0; k < order.length; k++) {
  const len = 1 + r(SLOT - 1024);
  const off = order[k] * SLOT + r(SLOT - len);
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = ((seed * 31 + k * 7 + i) % 251) + 1;
  await dev.pwrite(b, off);
  if (k % 3 === 2) await dev.writeZeroes(off + (len >> 2), len >> 2, {});
  await dev.flush();
  process.stdout.write(k + ' ' + off + ' ' + len + '\\n');
}
await dev.close();
`;

async function killedRun(script: string, path: string, seed: number, afterRounds: number): Promise<{ lines: string[]; killed: boolean }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [script, path, String(seed)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let killed = false;
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (!killed && out.split('\n').length > afterRounds) {
        killed = true;
        setTimeout(() => child.kill('SIGKILL'), seed % 7);
      }
    });
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (signal !== 'SIGKILL' && code !== 0) reject(new Error(`writer failed (${code}): ${err}`));
      else resolve({ lines: out.split('\n').filter((l) => l !== ''), killed: signal === 'SIGKILL' });
    });
  });
}

test('vhd crash: SIGKILL during writes leaves a disk that opens, checks and holds every flushed write', async (t) => {
  if (!ready(t)) return;
  const script = at('writer.mjs');
  writeFileSync(script, CHILD);
  let kills = 0;
  let leaky = 0;
  for (const [name, opts] of [
    ['crash-dyn.vhd', []],
    ['crash-diff.vhd', ['-b', 'crash-base.vhd']],
  ] as const) {
    if (name === 'crash-diff.vhd') {
      await rbOk('create', '-f', 'vpc', at('crash-base.vhd'), '16M');
      await workload(at('crash-base.vhd'), await baseMem(at('crash-base.vhd')), 5, 20);
    }
    const p = at(name);
    await rbOk('create', '-f', 'vpc', ...opts, p, ...(opts.length === 0 ? ['16M'] : []));
    for (let k = 0; k < 12; k++) {
      const seed = k * 977 + name.length;
      const { lines, killed } = await killedRun(script, p, seed, 1 + ((k * 5) % 17));
      if (killed) kills++;
      // Every flushed round must read back (rounds write disjoint slots).
      await using dev = await openImage(p);
      for (const line of lines) {
        const [round, off, len] = line.split(' ').map(Number) as [number, number, number];
        const want = new Uint8Array(len);
        for (let i = 0; i < len; i++) want[i] = ((seed * 31 + round * 7 + i) % 251) + 1;
        if (round % 3 === 2) want.fill(0, len >> 2, (len >> 2) + (len >> 2));
        const got = new Uint8Array(len);
        await dev.pread(got, off);
        assert.ok(Buffer.from(got).equals(Buffer.from(want)), `${name} kill ${k}: round ${round} (${len} bytes at ${off}) lost`);
      }
      const r = await rb('check', p);
      assert.ok(r.code === 0 || r.code === 3, `${name} kill ${k}: check exit ${r.code}: ${r.out}${r.err}`);
      if (r.code === 3) leaky++;
    }
  }
  assert.ok(kills >= 20, `only ${kills} writers were killed mid-way`);
  t.diagnostic(`${kills} kills, ${leaky} left leaked space (allowed)`);
  // qemu-img reads the crashed dynamic disk as rblock does.
  qemuImg('convert', '-f', 'vpc', '-O', 'raw', at('crash-dyn.vhd'), at('crash-dyn.qemu.raw'));
  await rbOk('read', at('crash-dyn.vhd'), '--output', at('crash-dyn.rblock.raw'));
  assert.equal(await sha256File(at('crash-dyn.rblock.raw')), await sha256File(at('crash-dyn.qemu.raw')));
});

async function baseMem(path: string): Promise<Uint8Array> {
  await using dev = await openImage(path);
  return new Uint8Array(dev.size);
}

test('vhd crash: a block put where an interrupted allocation wrote shows none of its bytes; close gives reserved space back', async (t) => {
  if (!ready(t)) return;
  const p = at('reuse.vhd');
  await rbOk('create', '-f', 'vpc', p, '64M');
  const created = statSync(p).size;
  const script = at('orphan.mjs');
  // A writer that fills block 0 and exits without flush or close: the block is written, its BAT entry is not.
  writeFileSync(
    script,
    `import { openImage } from ${JSON.stringify(join(REPO, 'dist/src/formats/registry.js'))};
const dev = await openImage(process.argv[2], { format: 'vpc', readOnly: false });
await dev.pwrite(new Uint8Array(2 * 1024 * 1024).fill(0xab), 0);
process.exit(0);
`,
  );
  const r = run(process.execPath, [script, p]);
  assert.equal(r.status, 0, r.stderr);
  {
    await using dev = await openImage(p, { readOnly: false });
    const head = new Uint8Array(4 * KiB).fill(0xcd);
    await dev.pwrite(head, 4 * MiB); // block 2, in the orphan's place
  }
  await using dev = await openImage(p);
  const got = new Uint8Array(2 * MiB);
  await dev.pread(got, 4 * MiB);
  assert.ok(
    got.subarray(0, 4 * KiB).every((x) => x === 0xcd),
    'written bytes',
  );
  assert.ok(
    got.subarray(4 * KiB).every((x) => x === 0),
    'the rest of the new block reads as zeros',
  );
  await dev.pread(got, 0);
  assert.ok(
    got.every((x) => x === 0),
    'the orphaned block is not part of the disk',
  );
  assert.equal((await rb('check', p)).code, 0, 'no leak left after close');
  // One block (bitmap and data) where the trailing footer was, and the footer after it.
  assert.equal(statSync(p).size, created + 512 + 2 * MiB);
});
