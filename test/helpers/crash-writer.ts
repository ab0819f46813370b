/**
 * Child process of the crash test: writes numbered blocks into a qcow2 image
 * and prints "flushed <n>" after each flush, until it is killed. Block i goes
 * to slot (i * 7919) % slots and holds pattern(i).
 */
import { openImage } from '../../src/index.js';
import { pattern } from './rng.js';

const [path, slotsArg, blockArg] = process.argv.slice(2);
const slots = Number(slotsArg);
const block = Number(blockArg);
const dev = await openImage(path as string, { readOnly: false });
for (let i = 0; ; i++) {
  const slot = (i * 7919) % slots;
  // Some writes are unaligned inside the slot, some zero the slot.
  if (i % 11 === 5) await dev.writeZeroes(slot * block, block);
  else await dev.pwrite(pattern(block, i), slot * block);
  if (i % 5 === 4) {
    await dev.flush();
    process.stdout.write(`flushed ${i}\n`);
  }
}
