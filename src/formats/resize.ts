/** `resize`: change an image's virtual size (qcow2 and raw), growing freely, shrinking only on request and only when safe. */
import { BlockError } from '../block/errors.js';
import { GenericDevice } from '../block/generic.js';
import { parseSize } from '../util/size.js';
import { layerOf } from './chain.js';
import { Qcow2Layer } from './qcow2/image.js';
import { RawDriver } from './raw/index.js';
import { openImage } from './registry.js';

/** "+1G", "-512M" or an absolute "10G", relative to the current size. */
export function newSizeFrom(spec: string, current: number): number {
  const t = spec.trim();
  if (t.startsWith('+')) return current + parseSize(t.slice(1));
  if (t.startsWith('-')) return current - parseSize(t.slice(1));
  return parseSize(t);
}

export async function resizeImage(
  path: string,
  spec: string,
  opts: { shrink?: boolean; format?: string } = {},
): Promise<{ from: number; to: number }> {
  await using dev = await openImage(path, { readOnly: false, ...(opts.format !== undefined ? { format: opts.format } : {}) });
  const from = dev.size;
  const to = newSizeFrom(spec, from);
  if (!Number.isSafeInteger(to) || to < 0)
    throw new BlockError('invalid-argument', `${path}: invalid new size ${spec}`, { path, op: 'resize' });
  if (to < from && !opts.shrink) {
    throw new BlockError(
      'invalid-argument',
      `${path}: shrinking from ${from} to ${to} bytes needs --shrink (data past the new end would be lost)`,
      {
        path,
        op: 'resize',
      },
    );
  }
  if (to === from) return { from, to };
  const layer = layerOf(dev);
  if (layer instanceof Qcow2Layer) {
    await layer.resize(to);
  } else if (dev instanceof GenericDevice && dev.inner instanceof RawDriver) {
    await dev.inner.file.truncate(to);
  } else {
    throw new BlockError('not-supported', `${path}: resizing ${dev.format} images is not supported`, { path, op: 'resize' });
  }
  return { from, to };
}
