/** `rblock commit`, `rebase` and `resize`: the chain and size operations, as qemu-img has them. */
import { commitImage } from '../copy/commit.js';
import { rebaseImage } from '../copy/rebase.js';
import { resizeImage } from '../formats/resize.js';
import type { Io } from './io.js';

export async function runCommit(image: string, o: { format?: string; quiet?: boolean }, io: Io): Promise<number> {
  await commitImage(image, o.format !== undefined ? { format: o.format } : {});
  if (!o.quiet) await io.out('Image committed.\n');
  return 0;
}

export async function runRebase(
  image: string,
  o: { backing: string; backingFormat?: string; format?: string; unsafe?: boolean },
  io: Io,
): Promise<number> {
  const r = await rebaseImage(image, o.backing, {
    ...(o.format !== undefined ? { format: o.format } : {}),
    ...(o.backingFormat !== undefined ? { backingFormat: o.backingFormat } : {}),
    ...(o.unsafe ? { unsafe: true } : {}),
  });
  void io;
  void r;
  return 0;
}

export async function runResize(
  image: string,
  size: string,
  o: { format?: string; shrink?: boolean; quiet?: boolean },
  io: Io,
): Promise<number> {
  await resizeImage(image, size, { ...(o.format !== undefined ? { format: o.format } : {}), ...(o.shrink ? { shrink: true } : {}) });
  if (!o.quiet) await io.out('Image resized.\n');
  return 0;
}
