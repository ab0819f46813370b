/**
 * `rblock check` on VHD: hand-made corruptions (test/fixtures/vhd-craft.ts)
 * are found, `-r all` repairs the safe ones (checksums, footer copy, file
 * end) and the double check is then clean; what cannot be repaired safely
 * (a BAT entry past the end, overlapping blocks, a missing parent) stays
 * reported.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { appendFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { main } from '../../src/cli/main.js';
import { VhdCraft } from '../fixtures/vhd-craft.js';
import { scratchDir } from '../helpers/tools.js';

const scratch = scratchDir('rblock-vhd-check-');
after(() => scratch[Symbol.dispose]());
const DIR = scratch.dir;

async function check(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const code = await main(['check', ...args], {
    out: async (x) => {
      out += typeof x === 'string' ? x : Buffer.from(x).toString('latin1');
    },
    err: (x) => {
      err += x;
    },
  });
  return { code, out, err };
}

function sample(): VhdCraft {
  return new VhdCraft({ size: 6 << 20 }).write(0, Buffer.alloc(4096, 0x11)).write(4 << 20, Buffer.alloc(8192, 0x22));
}

function build(name: string, c: VhdCraft): string {
  return c.writeTo(join(DIR, name));
}

test('vhd check: a clean image, and repairable damage in the footer, its copy and the header', async () => {
  const clean = build('clean.vhd', sample());
  let r = await check(clean);
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /No errors were found/);

  const cases: [string, VhdCraft, RegExp][] = [
    ['trailing-sum.vhd', sample().breakFooterChecksum('trailing'), /footer at offset \d+: checksum/],
    ['copy-sum.vhd', sample().breakFooterChecksum('copy'), /footer copy at offset 0: bad checksum/],
    ['copy-differs.vhd', sample().footerField(24, 4, 12345, { copies: 'copy' }), /footer copy at offset 0: differs/],
    ['header-sum.vhd', sample().breakHeaderChecksum(), /dynamic disk header at offset 512: checksum/],
  ];
  for (const [name, craft, finding] of cases) {
    const p = build(name, craft);
    r = await check(p);
    assert.equal(r.code, 2, `${name}: ${r.out}${r.err}`);
    assert.match(r.err, finding, name);
    r = await check('-r', 'all', p);
    assert.equal(r.code, 0, `${name} after -r all: ${r.out}${r.err}`);
    assert.match(r.out, /repaired/);
    r = await check(p);
    assert.equal(r.code, 0, `${name} checked again: ${r.err}`);
    // The data is untouched: the repaired image reads like the clean one.
    const data = readFileSync(p);
    assert.equal(data.length, readFileSync(clean).length, name);
  }
});

test('vhd check: a missing trailing footer is put back; leaked space at the end is cut', async () => {
  const c = sample();
  const full = c.build();
  const p = join(DIR, 'no-tail.vhd');
  writeFileSync(p, full.subarray(0, full.length - 512));
  let r = await check(p);
  assert.equal(r.code, 2, r.out + r.err);
  assert.match(r.err, /no footer at the end/);
  r = await check('-r', 'all', p);
  assert.equal(r.code, 0, r.out + r.err);
  assert.deepEqual(readFileSync(p), Buffer.from(full));

  // An orphan block at the end (a write killed before its BAT update): a leak, cut by -r.
  const leak = join(DIR, 'leak.vhd');
  const footer = full.subarray(full.length - 512);
  writeFileSync(leak, full.subarray(0, full.length - 512));
  appendFileSync(leak, Buffer.alloc((2 << 20) + 512, 0x33));
  appendFileSync(leak, footer);
  r = await check(leak);
  assert.equal(r.code, 3, r.out + r.err);
  assert.match(r.out, /leaked clusters were found/);
  r = await check('-r', 'leaks', leak);
  assert.equal(r.code, 0, r.out + r.err);
  assert.deepEqual(readFileSync(leak), Buffer.from(full));
});

test('vhd check: BAT entries past the end, over the metadata or over each other; bad block size', async () => {
  const cases: [string, VhdCraft, RegExp][] = [
    ['bat-past-end.vhd', sample().batEntry(2, 0x100000), /BAT entry 2 .* ends past the trailing footer/],
    ['bat-over-bat.vhd', sample().batEntry(2, 3), /BAT entry 2 .* overlaps the BAT/],
    [
      'bat-overlap.vhd',
      sample().poke(0, (l) => {
        const b = Buffer.alloc(4);
        b.writeUInt32BE((l.blocks.get(0) as number) / 512 + 1);
        return [l.batOffset + 2 * 4, b];
      }),
      /overlaps the block of BAT entry/,
    ],
    ['block-size.vhd', sample().headerField(32, 4, 3000), /block_size 3000 is not a power of two/],
  ];
  for (const [name, craft, finding] of cases) {
    const p = build(name, craft);
    const r = await check(p);
    assert.equal(r.code, 2, `${name}: ${r.out}${r.err}`);
    assert.match(r.err, finding, name);
    // Nothing that points at data is changed by a repair: still corrupt.
    const before = readFileSync(p);
    const rr = await check('-r', 'all', p);
    assert.equal(rr.code, 2, `${name} after -r: ${rr.out}${rr.err}`);
    assert.deepEqual(readFileSync(p), before, name);
  }
});

test('vhd check: a differencing disk whose parent is missing or has another unique id', async () => {
  const parent = new VhdCraft({ size: 4 << 20 }).write(0, Buffer.alloc(512, 7));
  build('parent.vhd', parent);
  const wrongId = Buffer.from(parent.uuid);
  wrongId[0] = (wrongId[0] as number) ^ 0xff;
  const ok = build(
    'child.vhd',
    new VhdCraft({ size: 4 << 20, parent: { uuid: parent.uuid, locators: [{ code: 'W2ru', path: '.\\parent.vhd' }] } }),
  );
  assert.equal((await check(ok)).code, 0);
  const gone = build(
    'orphan.vhd',
    new VhdCraft({ size: 4 << 20, parent: { uuid: parent.uuid, locators: [{ code: 'W2ru', path: '.\\gone.vhd' }] } }),
  );
  let r = await check(gone);
  assert.equal(r.code, 2, r.out + r.err);
  assert.match(r.err, /parent: .*not found/);
  const other = build(
    'other.vhd',
    new VhdCraft({ size: 4 << 20, parent: { uuid: wrongId, locators: [{ code: 'W2ru', path: '.\\parent.vhd' }] } }),
  );
  r = await check(other);
  assert.equal(r.code, 2, r.out + r.err);
  assert.match(r.err, /unique id/);
});
