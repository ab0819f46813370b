/**
 * Write ordering in a differencing VHD (writer.ts): a write into a block the
 * child already has puts the sectors in place at once, but the sector
 * bitmap bit that makes them the child's reaches the file only at the next
 * flush, after an fdatasync of the sectors. A power cut can then lose the
 * write, but never show the child's unwritten sectors (zeros) in place of
 * the parent's data. Checked on the file itself: before the flush the
 * bitmap on disk is unchanged while reads already see the new data; after
 * it the bits are there, and the guest content is what was written over
 * the parent.
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { openImage } from '../../src/formats/registry.js';
import { needTools, rblock, run, scratchDir } from '../helpers/tools.js';

const KiB = 1024;

/** Byte `index` of the sector bitmap of block 0, as stored in the file. */
function bitmapByteOnDisk(path: string, index: number): number {
  const f = readFileSync(path);
  const headerAt = Number(f.readBigUInt64BE(16)); // footer copy at 0: data offset (§3.1)
  const tableAt = Number(f.readBigUInt64BE(headerAt + 16)); // dynamic header: table offset (§4)
  const block0 = f.readUInt32BE(tableAt);
  assert.notEqual(block0, 0xffffffff, 'block 0 is allocated');
  return f[block0 * 512 + index] as number;
}

test('differencing VHD: bitmap changes of an existing block reach the file only after the data, at flush', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  using s = scratchDir('rblock-vhd-order-');
  const parent = join(s.dir, 'parent.vhd');
  const child = join(s.dir, 'child.vhd');
  run('qemu-img', ['create', '-q', '-f', 'vpc', parent, '8M']);
  run('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x11 0 1M', parent]);
  const c = rblock(['create', '-f', 'vpc', '-b', parent, child]);
  assert.equal(c.status, 0, c.stderr);
  {
    await using dev = await openImage(child, { readOnly: false });
    await dev.pwrite(Buffer.alloc(4 * KiB, 0x22), 0); // allocates block 0, its bitmap written with it
    await dev.flush();
    assert.equal(bitmapByteOnDisk(child, 0), 0xff, 'sectors 0-7 are the child’s');
    assert.equal(bitmapByteOnDisk(child, 16), 0x00, 'sectors 128-135 are the parent’s');

    await dev.pwrite(Buffer.alloc(4 * KiB, 0x33), 64 * KiB); // sectors 128-135 of the same block
    const back = Buffer.alloc(4 * KiB);
    await dev.pread(back, 64 * KiB);
    assert.ok(
      back.every((b) => b === 0x33),
      'reads see the write before any flush',
    );
    assert.equal(bitmapByteOnDisk(child, 16), 0x00, 'the bitmap on disk waits for the flush');

    await dev.flush();
    assert.equal(bitmapByteOnDisk(child, 16), 0xff, 'after the flush the bitmap marks the sectors');
  }
  const out = join(s.dir, 'flat.raw');
  assert.equal(rblock(['read', child, '--output', out]).status, 0);
  const flat = readFileSync(out);
  assert.ok(flat.subarray(0, 4 * KiB).every((b) => b === 0x22));
  assert.ok(flat.subarray(4 * KiB, 64 * KiB).every((b) => b === 0x11));
  assert.ok(flat.subarray(64 * KiB, 68 * KiB).every((b) => b === 0x33));
  assert.ok(flat.subarray(68 * KiB, 1024 * KiB).every((b) => b === 0x11));
  assert.ok(flat.subarray(1024 * KiB).every((b) => b === 0));
});
