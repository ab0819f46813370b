/**
 * QEMU's own sample images (../shared/corpus/qemu-samples, see its
 * MANIFEST.md): what rblock must do with each.
 *
 * The expectations are one table, SAMPLES. A row either reads (format,
 * virtual size and guest sha256 as qemu-img 7.2 reads it) or is refused
 * (exit 1, one line on stderr naming the file, no stack trace, and never
 * served as raw). The qemu facts are in every row, so a format that gains a
 * driver only needs its rows flipped from `refuse(...)` to `reads(...)` (as
 * the VHD (vpc) and VMDK rows were). afl5.img and afl9.vmdk stay refused:
 * they are broken on purpose and qemu refuses them too.
 *
 * Every sample is expanded with bzcat into a sparse file (zero runs are not
 * written), which keeps even the 264 and 272 MB samples cheap; the expanded
 * bytes are checked against the manifest's sha256 for samples up to 100 MiB.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { needShared, needTools, RBLOCK, run, scratchDir, sha256File } from '../helpers/tools.js';

const MiB = 1024 * 1024;
/** Expanded samples larger than this are not hashed (only decompressed, sparsely). */
const HASH_EXPANDED_LIMIT = 100 * MiB;
/** Guest content larger than this is not hashed by reading it: see readsCheck. */
const HASH_GUEST_LIMIT = 1024 * MiB;

/** What qemu-img 7.2 makes of the sample (from MANIFEST.md). */
type QemuFacts =
  | {
      format: string;
      virtualSize: number;
      guestSha256: string;
      /** The manifest says the guest is all zeros. */
      allZeros?: boolean;
    }
  | { format: string; refuses: string };

/** What rblock must do with it. */
type Expect = { kind: 'reads'; format: string } | { kind: 'refuse'; why: string };

interface Sample {
  file: string;
  expandedSize: number;
  expandedSha256: string;
  qemu: QemuFacts;
  rblock: Expect;
}

const reads = (format: string): Expect => ({ kind: 'reads', format });
const refuse = (why: string): Expect => ({ kind: 'refuse', why });
const NOT_TARGETED = 'a format rblock does not target: must be refused, not read as raw';

const SAMPLES: readonly Sample[] = [
  {
    file: 'grub_mbr.raw',
    expandedSize: 512,
    expandedSha256: '3cc502da6ecbbb8ae090212ed77ee5aadf942d2c26897753f871cdfc23e359b6',
    qemu: { format: 'raw', virtualSize: 512, guestSha256: '3cc502da6ecbbb8ae090212ed77ee5aadf942d2c26897753f871cdfc23e359b6' },
    rblock: reads('raw'),
  },
  {
    file: 'afl5.img',
    expandedSize: 1028,
    expandedSha256: '36f4a8d05b5a19635e387d1b449ace3dab9bb82461a9c08606dae322377de958',
    qemu: { format: 'vpc', refuses: 'Max Table Entries too large (1073741825)' },
    rblock: refuse('fuzzed VHD with a 2^30+1 entry BAT: stays refused once the vpc driver lands'),
  },
  {
    file: 'afl9.vmdk',
    expandedSize: 196608,
    expandedSha256: '71996b27606bda1c6ae0c3294595b03d8ab896923688632fe254a127b4f651e4',
    qemu: { format: 'vmdk', refuses: 'L1 size too big' },
    rblock: refuse('fuzzed VMDK whose grain directory size overflows: stays refused once the vmdk driver lands'),
  },
  {
    file: 'd2v-zerofilled.vhd',
    expandedSize: 264308224,
    expandedSha256: 'af175e3c442b659e26b91029aacf2e62f2f7cf054404446db3185aafc38e079f',
    qemu: {
      format: 'vpc',
      virtualSize: 263454720,
      guestSha256: '1ba076be94a8a64541c25aae8d5a5f8b0da758c3797af597e03acb431ff8d143',
      allZeros: true,
    },
    rblock: reads('vpc'),
  },
  {
    file: 'empty.bochs',
    expandedSize: 2560,
    expandedSha256: '70eba138ce39c1b7864a20766e8db888293d881ca4c5b823bcbb236e7be09351',
    qemu: {
      format: 'bochs',
      virtualSize: 1032192,
      guestSha256: '85e614bc2ef17bec493b849dbeea34687ba52d7b1fedc4e5fc3729b0fb059aad',
      allZeros: true,
    },
    rblock: refuse(NOT_TARGETED),
  },
  {
    file: 'hyperv2012r2-dynamic.vhd',
    expandedSize: 266240,
    expandedSha256: '1340b8a51517ba5f0112c47694f3c8a4a2bb4f9933336a18cf0392f3490c6674',
    qemu: {
      format: 'vpc',
      virtualSize: 136365211648,
      guestSha256: 'dcb4f171cbcedb416d5da34e48d5a17ecc2828a0f14c416de3669b8463cb1d8e',
      allZeros: true,
    },
    rblock: reads('vpc'),
  },
  {
    file: 'iotest-dirtylog-10G-4M.vhdx',
    expandedSize: 31457280,
    expandedSha256: '511daba998dba208ffc57a7814194d5dd3afb7c314731b904ff1682e3fb4951a',
    qemu: { format: 'vhdx', refuses: 'contains a log that needs to be replayed' },
    rblock: refuse(NOT_TARGETED),
  },
  {
    file: 'iotest-dynamic-1G.vhdx',
    expandedSize: 104857600,
    expandedSha256: 'a4fb24fa51fb4852d5a6bdc2b390a91b0a4e19b47696edc5a00c816067257402',
    qemu: { format: 'vhdx', virtualSize: 1073741824, guestSha256: 'd3d112d8dab7fd360609f7d5a7b769904b7a2a7d7b6b8c535f65a23293c05478' },
    rblock: refuse(NOT_TARGETED),
  },
  {
    file: 'iotest-version3.vmdk',
    expandedSize: 282624,
    expandedSha256: '0b67f248809938335a6f9375a8a76b3079f7c7e355df2837d5e05c9b45aaad5c',
    qemu: {
      format: 'vmdk',
      virtualSize: 17179869184,
      guestSha256: '0859bb3397bc1d30fa979c80a289ce98bfd6c1141a64594d6f3cc8cd68218faf',
      // Not all zeros and 16 GiB: checked against qemu-img convert's output (see readsCheck). The
      // manifest's description of its content (100 patterned sectors) is incomplete: qemu reads
      // about 150 data grains, e.g. 0x31 at 335806464 (i = 512).
    },
    rblock: reads('vmdk'),
  },
  {
    file: 'parallels-v1',
    expandedSize: 327680,
    expandedSha256: '81a884331adb1196cdc7f5c64c16071d04ec0b82946e6bd98874a875b51d0c1f',
    qemu: { format: 'parallels', virtualSize: 2097152, guestSha256: '15faf41ebc93b5f734341cb7a2d909001e3f7306960f9d8bc63894f2a8e5bc45' },
    rblock: refuse(NOT_TARGETED),
  },
  {
    file: 'parallels-v2',
    expandedSize: 327680,
    expandedSha256: '8d963be70b8b41101494ddc9d49fc7ecf6ae05e90d7d5078e2a10fade407b92a',
    qemu: { format: 'parallels', virtualSize: 2097152, guestSha256: '15faf41ebc93b5f734341cb7a2d909001e3f7306960f9d8bc63894f2a8e5bc45' },
    rblock: refuse(NOT_TARGETED),
  },
  {
    file: 'parallels-with-bitmap',
    expandedSize: 3145728,
    expandedSha256: 'a4f46c6a5d2054339b147e522bc27cefa5cefd52172bbf87da4a505767af694a',
    qemu: {
      format: 'parallels',
      virtualSize: 68719476736,
      guestSha256: '57b295ba06757c81edca2d1e299133b2f059bea28e6cf9f438d7741611c36541',
      allZeros: true,
    },
    rblock: refuse(NOT_TARGETED),
  },
  {
    file: 'simple-dmg.dmg',
    expandedSize: 19479,
    expandedSha256: 'a1b8b5a17fb487dcc77e9aced334ba5e3d6fba7f11c9e0df85b6171ed57e60e7',
    qemu: { format: 'dmg', virtualSize: 1799168, guestSha256: '20647e0a98a830a6a250b91e0e6d7200a872caea07b87a3c19611f3dd031c9df' },
    rblock: refuse(NOT_TARGETED),
  },
  {
    file: 'simple-pattern.cloop',
    expandedSize: 1690,
    expandedSha256: 'bdb59118010c88bd121ec11262beab8adcd35b5d4a53fe98f3a762c1334c59d8',
    qemu: { format: 'cloop', virtualSize: 1048576, guestSha256: '7c77af2771e0f86b7ec9707374c7416037fedae45cb0e6e27fbdf55688a5dd12' },
    rblock: refuse(NOT_TARGETED),
  },
  {
    file: 'test-disk2vhd.vhdx',
    expandedSize: 272630272,
    expandedSha256: '5b6721d4f26ef13d259c380a7327b794d1c6dd79e386737d77e8d88f43259812',
    qemu: { format: 'vhdx', virtualSize: 268435456, guestSha256: '96d964042be9b58dda1725567abfb0cf9fd8380e2118754afa979c2ad445938a' },
    rblock: refuse(NOT_TARGETED),
  },
  {
    file: 'virtualpc-dynamic.vhd',
    expandedSize: 262656,
    expandedSha256: '7675fd9bcc5f705f69e69a2c5e948d2a6522eaac044540a0782ae6097a458d6a',
    qemu: {
      format: 'vpc',
      virtualSize: 136363130880,
      guestSha256: '2a4f06d5c9672ce7acfe68d55f16be1e1c96891af6a79eefe50eefae0cc5ae8d',
      allZeros: true,
    },
    rblock: reads('vpc'),
  },
];

const CORPUS = 'corpus/qemu-samples';

interface Proc {
  status: number;
  stdout: Buffer;
  stderr: string;
}

function rblockAsync(args: string[], cwd: string): Promise<Proc> {
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

const ZEROS = Buffer.alloc(1 << 16);
function allZero(b: Buffer): boolean {
  for (let off = 0; off < b.length; off += ZEROS.length) {
    const n = Math.min(ZEROS.length, b.length - off);
    if (!b.subarray(off, off + n).equals(ZEROS.subarray(0, n))) return false;
  }
  return true;
}

/** bzcat src into a sparse file dst; returns the expanded size and (if asked) its sha256. */
async function bunzipSparse(src: string, dst: string, hash: boolean): Promise<{ size: number; sha256: string | null }> {
  // Open first: node drains (and drops) a child's unread stdout once it exits, so the
  // reading must start before any await.
  const fh = await open(dst, 'w');
  const child = spawn('bzcat', [src], { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<number>((res, rej) => {
    child.on('error', rej);
    child.on('close', (code) => res(code ?? -1));
  });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const h = hash ? createHash('sha256') : null;
  let pos = 0;
  try {
    for await (const chunk of child.stdout as AsyncIterable<Buffer>) {
      h?.update(chunk);
      if (!allZero(chunk)) await fh.write(chunk, 0, chunk.length, pos);
      pos += chunk.length;
    }
    await fh.truncate(pos);
  } finally {
    await fh.close();
  }
  const code = await exited;
  assert.equal(code, 0, `bzcat ${src} exited ${code}: ${stderr}`);
  return { size: pos, sha256: h === null ? null : h.digest('hex') };
}

/** The rows of the manifest's two tables, keyed by sample name (without .bz2). */
function manifestFacts(
  manifest: string,
): Map<string, { expandedSize: number; expandedSha256: string; format: string; virtualSize: string; outcome: string }> {
  const sizes = new Map<string, { size: number; sha: string }>();
  const facts = new Map<string, { expandedSize: number; expandedSha256: string; format: string; virtualSize: string; outcome: string }>();
  for (const line of manifest.split('\n')) {
    const cells = line.split('|').map((c) => c.trim());
    // | file (.bz2) | git blob | .bz2 sha256 | expanded size | expanded sha256 |
    if (cells.length === 7 && cells[1]!.endsWith('.bz2')) {
      sizes.set(cells[1]!.replace(/\.bz2$/, ''), { size: Number(cells[4]), sha: cells[5]! });
    }
  }
  for (const line of manifest.split('\n')) {
    const cells = line.split('|').map((c) => c.trim());
    // | file | format (qemu probe) | virtual size | guest sha256 / outcome | iotest ... |
    const s = cells.length >= 6 ? sizes.get(cells[1]!) : undefined;
    if (s !== undefined) {
      facts.set(cells[1]!, {
        expandedSize: s.size,
        expandedSha256: s.sha,
        format: cells[2]!.split(' ')[0]!,
        virtualSize: cells[3]!,
        outcome: cells[4]!,
      });
    }
  }
  return facts;
}

function corpusDir(t: TestContext): string | null {
  const dir = needShared(t, CORPUS);
  if (dir === null) return null;
  return needTools(t, 'bzcat') ? dir : null;
}

test('the expectation table covers the corpus and agrees with its MANIFEST.md', (t) => {
  const dir = corpusDir(t);
  if (dir === null) return;
  const files = readdirSync(dir)
    .filter((f) => f.endsWith('.bz2'))
    .map((f) => f.replace(/\.bz2$/, ''))
    .sort();
  assert.deepEqual(SAMPLES.map((s) => s.file).sort(), files, 'every sample needs a row in SAMPLES (and every row a sample)');
  const facts = manifestFacts(readFileSync(join(dir, 'MANIFEST.md'), 'utf8'));
  for (const s of SAMPLES) {
    const m = facts.get(s.file);
    assert.ok(m !== undefined, `${s.file}: not in MANIFEST.md`);
    assert.equal(s.expandedSize, m.expandedSize, `${s.file}: expanded size`);
    assert.equal(s.expandedSha256, m.expandedSha256, `${s.file}: expanded sha256`);
    assert.equal(s.qemu.format, m.format, `${s.file}: qemu's format`);
    if ('guestSha256' in s.qemu) {
      assert.equal(String(s.qemu.virtualSize), m.virtualSize, `${s.file}: virtual size`);
      assert.ok(m.outcome.startsWith(s.qemu.guestSha256), `${s.file}: guest sha256 (manifest: ${m.outcome.slice(0, 64)})`);
    } else {
      assert.match(m.outcome, /qemu-img refuses/, `${s.file}: the manifest does not say qemu refuses it`);
    }
  }
});

/** Checks for a sample rblock must refuse: every command, the same clean failure. */
async function refuseCheck(name: string, cwd: string): Promise<void> {
  const cmds = [
    ['info', name],
    ['info', '--output', 'json', name],
    ['map', '--output', 'json', name],
    ['read', name, '--length', '512', '--hexdump'],
  ];
  const results = await Promise.all(cmds.map((c) => rblockAsync(c, cwd)));
  results.forEach((r, i) => {
    const what = `rblock ${cmds[i]!.join(' ')}`;
    assert.equal(r.status, 1, `${what}: expected exit 1, got ${r.status} (stdout: ${r.stdout.toString('utf8').slice(0, 200)})`);
    assert.equal(r.stdout.length, 0, `${what}: printed something on stdout`);
    const lines = r.stderr.split('\n').filter((l) => l.length > 0);
    assert.equal(lines.length, 1, `${what}: expected one line on stderr, got:\n${r.stderr}`);
    assert.ok(!lines.some((l) => l.startsWith('    at ')), `${what}: stack trace on stderr`);
    assert.ok(lines[0]!.includes(name), `${what}: the message does not name the file: ${lines[0]}`);
    assert.doesNotMatch(lines[0]!, /\braw\b/, `${what}: the message talks about raw: ${lines[0]}`);
  });
}

/** The data ranges of a `map --output json` answer, after checking it tiles [0, size). */
function dataRanges(json: string, size: number, who: string): Array<[number, number]> {
  const entries = JSON.parse(json) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
  let pos = 0;
  for (const e of entries) {
    assert.equal(e.start, pos, `${who}: the map has a gap or overlap at ${pos}`);
    pos += e.length;
  }
  assert.equal(pos, size, `${who}: the map does not cover the disk`);
  return entries.filter((e) => e.data && !e.zero).map((e) => [e.start, e.length]);
}

/** Checks for a sample rblock must read: format, size, and the guest bytes qemu reads. */
async function readsCheck(t: TestContext, s: Sample, format: string, name: string, cwd: string): Promise<void> {
  assert.ok('guestSha256' in s.qemu, `${s.file}: a 'reads' row needs qemu's guest facts`);
  const q = s.qemu;
  const info = await rblockAsync(['info', '--output', 'json', name], cwd);
  assert.equal(info.status, 0, `rblock info ${name}: ${info.stderr}`);
  const i = JSON.parse(info.stdout.toString('utf8')) as { format: string; 'virtual-size': number };
  assert.equal(i.format, format, `${name}: probed format`);
  assert.equal(i['virtual-size'], q.virtualSize, `${name}: virtual size`);
  const out = `${name}.guest.raw`;
  if (q.virtualSize <= HASH_GUEST_LIMIT) {
    const r = await rblockAsync(['read', name, '--output', out], cwd);
    assert.equal(r.status, 0, `rblock read ${name}: ${r.stderr}`);
    assert.equal(await sha256File(join(cwd, out)), q.guestSha256, `${name}: guest sha256 differs from qemu-img's`);
    if (q.virtualSize <= MiB) {
      const st = await rblockAsync(['read', name], cwd);
      assert.equal(st.status, 0, `rblock read ${name} (stdout): ${st.stderr}`);
      assert.equal(createHash('sha256').update(st.stdout).digest('hex'), q.guestSha256, `${name}: guest sha256 via stdout`);
    }
    return;
  }
  // Hashing e.g. 136 GB of zeros takes minutes (the manifest's warning). Instead flatten the disk
  // sparsely (the ranges the map calls zero become holes) and compare the ranges that hold data:
  // with zeros when the manifest says the guest is all zeros, else with qemu-img convert's own
  // sparse output (qemu-img is then needed).
  const [m, r] = await Promise.all([
    rblockAsync(['map', '--output', 'json', name], cwd),
    rblockAsync(['read', name, '--output', out], cwd),
  ]);
  assert.equal(m.status, 0, `rblock map ${name}: ${m.stderr}`);
  assert.equal(r.status, 0, `rblock read ${name}: ${r.stderr}`);
  const ranges = dataRanges(m.stdout.toString('utf8'), q.virtualSize, `rblock map ${name}`);
  let ref: string | null = null;
  if (q.allZeros !== true) {
    if (!needTools(t, 'qemu-img')) return;
    ref = `${name}.qemu.raw`;
    run('qemu-img', ['convert', '-O', 'raw', name, ref], { cwd });
    const qmap = run('qemu-img', ['map', '--output=json', name], { cwd }).stdout;
    // Bytes outside both tools' data ranges are holes in both files.
    ranges.push(...dataRanges(qmap, q.virtualSize, `qemu-img map ${name}`));
  }
  const fh = await open(join(cwd, out), 'r');
  const rh = ref === null ? null : await open(join(cwd, ref), 'r');
  try {
    assert.equal((await fh.stat()).size, q.virtualSize, `${name}: flattened size`);
    for (const [start, length] of ranges) {
      const got = Buffer.alloc(length);
      const want = Buffer.alloc(length);
      await fh.read(got, 0, length, start);
      if (rh !== null) await rh.read(want, 0, length, start);
      assert.ok(got.equals(want), `${name}: the guest bytes at ${start} (+${length}) differ from ${rh === null ? 'zeros' : 'qemu-img'}'s`);
    }
  } finally {
    await fh.close();
    await rh?.close();
  }
}

for (const s of SAMPLES) {
  const title =
    s.rblock.kind === 'reads'
      ? `${s.file}: read as ${s.rblock.format}, with qemu's guest content`
      : `${s.file}: refused cleanly, not read as raw (${s.rblock.why})`;
  test(title, async (t) => {
    const dir = corpusDir(t);
    if (dir === null) return;
    using scratch = scratchDir('rblock-corpus-');
    const hash = s.expandedSize <= HASH_EXPANDED_LIMIT;
    const x = await bunzipSparse(join(dir, `${s.file}.bz2`), join(scratch.dir, s.file), hash);
    assert.equal(x.size, s.expandedSize, `${s.file}: expanded size differs from the manifest`);
    if (hash) assert.equal(x.sha256, s.expandedSha256, `${s.file}: expanded sha256 differs from the manifest`);
    if (s.rblock.kind === 'reads') await readsCheck(t, s, s.rblock.format, s.file, scratch.dir);
    else await refuseCheck(s.file, scratch.dir);
  });
}
