/** VHD (qemu's "vpc"): the format driver (probe + open). Everything else in this folder is its subsystems. */
import type { BlockDevice } from '../../block/device.js';
import type { HostFile } from '../../block/file.js';
import { layeredDevice } from '../chain.js';
import type { FormatDriver, OpenContext, ProbeInput } from '../registry.js';
import { FOOTER_COOKIE } from './constants.js';
import { VhdLayer } from './image.js';

function cookieAt(buf: Uint8Array, off: number): boolean {
  if (off < 0 || buf.length < off + 8) return false;
  return String.fromCharCode(...buf.subarray(off, off + 8)) === FOOTER_COOKIE;
}

export const vhdFormat: FormatDriver = {
  name: 'vpc',
  /**
   * Spec digest §8: dynamic and differencing disks start with a copy of the
   * footer; fixed disks have it only in the last 512 bytes (511 for very old
   * Virtual PC). qemu probes only offset 0, so it takes a fixed VHD for raw;
   * rblock recognises it (a damaged footer is then reported, not served as data).
   */
  probe(p: ProbeInput): number {
    if (cookieAt(p.head, 0)) return 100;
    if (p.size > 512 && (cookieAt(p.tail, p.tail.length - 512) || cookieAt(p.tail, p.tail.length - 511))) return 100;
    return 0;
  },
  async open(file: HostFile, ctx: OpenContext): Promise<BlockDevice> {
    return layeredDevice(await VhdLayer.open(file, ctx));
  },
};
