/** `info`: the facts of an image (and of its backing chain), in qemu-img's JSON shape. */
import type { BlockDevice } from '../block/device.js';
import { GenericDevice } from '../block/generic.js';
import { layerOf } from './chain.js';
import type { ImageInfo } from './layer.js';
import { RawDriver } from './raw/index.js';

export async function imageInfo(dev: BlockDevice): Promise<ImageInfo> {
  const layer = layerOf(dev);
  if (layer !== undefined) return layer.info();
  if (dev instanceof GenericDevice && dev.inner instanceof RawDriver) return dev.inner.info();
  return { 'virtual-size': dev.size, filename: dev.path ?? '', format: dev.format };
}

/** The image and every backing file below it, top first. */
export async function imageInfoChain(dev: BlockDevice): Promise<ImageInfo[]> {
  const out: ImageInfo[] = [];
  let cur: BlockDevice | null = dev;
  while (cur !== null) {
    out.push(await imageInfo(cur));
    cur = layerOf(cur)?.backing ?? null;
  }
  return out;
}
