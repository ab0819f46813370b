/**
 * `commit`: write an overlay's own clusters into its backing file, then empty
 * the overlay (qemu-img commit). The backing file is grown first if the
 * overlay is bigger. Base writes are flushed before the overlay is emptied,
 * so a crash in between leaves both images reading the same guest content.
 */
import { BlockError } from '../block/errors.js';
import { layerOf, resolveRelative } from '../formats/chain.js';
import { Qcow2Layer } from '../formats/qcow2/image.js';
import { openImage } from '../formats/registry.js';
import { resizeImage } from '../formats/resize.js';

export interface CommitResult {
  base: string;
  bytes: number;
}

export async function commitImage(path: string, opts: { format?: string } = {}): Promise<CommitResult> {
  await using top = await openImage(path, {
    readOnly: false,
    backing: null,
    ...(opts.format !== undefined ? { format: opts.format } : {}),
  });
  const layer = layerOf(top);
  if (!(layer instanceof Qcow2Layer))
    throw new BlockError('not-supported', `${path}: commit needs a qcow2 overlay`, { path, op: 'commit' });
  const h = layer.header;
  if (h.backingFile === null)
    throw new BlockError('invalid-argument', `${path}: the image has no backing file to commit into`, { path, op: 'commit' });
  const basePath = resolveRelative(path, h.backingFile);
  const baseFormat = h.backingFormat ?? undefined;
  {
    await using probe = await openImage(basePath, baseFormat !== undefined ? { format: baseFormat } : {});
    if (probe.size < top.size) {
      await probe.close();
      await resizeImage(basePath, String(top.size), baseFormat !== undefined ? { format: baseFormat } : {});
    }
  }
  let bytes = 0;
  {
    await using base = await openImage(basePath, { readOnly: false, ...(baseFormat !== undefined ? { format: baseFormat } : {}) });
    const window = 4 << 20;
    const buf = new Uint8Array(window);
    for (let pos = 0; pos < top.size; pos += window) {
      const len = Math.min(window, top.size - pos);
      for (const run of await layer.map(pos, len)) {
        if (run.kind === 'unallocated') continue;
        const s = Math.max(run.offset, pos);
        const e = Math.min(run.offset + run.length, pos + len);
        if (run.kind === 'zero') await base.writeZeroes(s, e - s);
        else {
          const view = buf.subarray(0, e - s);
          await top.pread(view, s);
          await base.pwrite(view, s);
        }
        bytes += e - s;
      }
    }
    await base.flush();
  }
  await layer.makeEmpty();
  return { base: basePath, bytes };
}
