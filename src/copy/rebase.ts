/**
 * `rebase`: point an overlay at another backing file (qemu-img rebase).
 * Safe mode first copies into the overlay every cluster it does not hold
 * whose content differs between the old and the new backing, so the guest
 * content is unchanged; then the header is rewritten. `unsafe` only rewrites
 * the name. An empty new name removes the backing file (flattening).
 */
import { BlockError } from '../block/errors.js';
import type { BlockDevice } from '../block/device.js';
import { layerOf, resolveRelative } from '../formats/chain.js';
import { rewriteBacking } from '../formats/qcow2/header-write.js';
import { Qcow2Layer } from '../formats/qcow2/image.js';
import { openImage } from '../formats/registry.js';

export interface RebaseOptions {
  format?: string;
  backingFormat?: string;
  unsafe?: boolean;
}

async function readOrZero(dev: BlockDevice | null, buf: Uint8Array, offset: number): Promise<void> {
  const inDev = dev === null ? 0 : Math.max(0, Math.min(buf.length, dev.size - offset));
  if (dev !== null && inDev > 0) await dev.pread(buf.subarray(0, inDev), offset);
  buf.fill(0, inDev);
}

export async function rebaseImage(path: string, newBacking: string, o: RebaseOptions = {}): Promise<{ copiedBytes: number }> {
  const open = { readOnly: false, ...(o.format !== undefined ? { format: o.format } : {}), ...(o.unsafe ? { backing: null } : {}) };
  await using top = await openImage(path, open);
  const layer = layerOf(top);
  if (!(layer instanceof Qcow2Layer)) throw new BlockError('not-supported', `${path}: rebase needs a qcow2 image`, { path, op: 'rebase' });
  let format = o.backingFormat;
  let copiedBytes = 0;
  if (!o.unsafe) {
    const next =
      newBacking === ''
        ? null
        : await openImage(resolveRelative(path, newBacking), o.backingFormat !== undefined ? { format: o.backingFormat } : {});
    try {
      format ??= next?.format;
      const cs = layer.header.clusterSize;
      const oldB = new Uint8Array(cs);
      const newB = new Uint8Array(cs);
      const window = 64 * cs;
      for (let pos = 0; pos < top.size; pos += window) {
        for (const run of await layer.map(pos, Math.min(window, top.size - pos))) {
          if (run.kind !== 'unallocated') continue;
          for (let c = Math.floor(run.offset / cs) * cs; c < run.offset + run.length; c += cs) {
            const len = Math.min(cs, top.size - c);
            await readOrZero(layer.backing, oldB.subarray(0, len), c);
            await readOrZero(next, newB.subarray(0, len), c);
            if (Buffer.compare(oldB.subarray(0, len), newB.subarray(0, len)) !== 0) {
              await top.pwrite(oldB.subarray(0, len), c);
              copiedBytes += len;
            }
          }
        }
      }
      await top.flush();
    } finally {
      await next?.close();
    }
  }
  await rewriteBacking(
    layer.file,
    layer.header,
    newBacking === '' ? null : { name: newBacking, ...(format !== undefined ? { format } : {}) },
  );
  return { copiedBytes };
}
