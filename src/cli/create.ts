/** `rblock create`: a new image, with qemu-img create's options. */
import { createImage, parseOptionList } from '../formats/create.js';
import type { Io } from './io.js';

export interface CreateCliOptions {
  format: string;
  options?: string[];
  backing?: string;
  backingFormat?: string;
  unsafe?: boolean;
  quiet?: boolean;
}

export async function runCreate(image: string, size: number | undefined, o: CreateCliOptions, io: Io): Promise<number> {
  const options: Record<string, string> = {};
  for (const list of o.options ?? []) Object.assign(options, parseOptionList(list));
  const req: Parameters<typeof createImage>[0] = { format: o.format, path: image, options };
  if (size !== undefined) req.size = size;
  if (o.backing !== undefined) req.backingFile = o.backing;
  if (o.backingFormat !== undefined) req.backingFormat = o.backingFormat;
  if (o.unsafe) req.unsafe = true;
  const r = await createImage(req);
  if (!o.quiet) await io.out(`Formatting '${image}', ${r.summary}\n`);
  return 0;
}
