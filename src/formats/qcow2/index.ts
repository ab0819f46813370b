/** qcow2: the format driver (probe + open). Everything else in this folder is its subsystems. */
import type { BlockDevice } from '../../block/device.js';
import type { HostFile } from '../../block/file.js';
import { layeredDevice } from '../chain.js';
import type { FormatDriver, OpenContext, ProbeInput } from '../registry.js';
import { QCOW2_MAGIC } from './constants.js';
import { Qcow2Layer } from './image.js';

export const qcow2Format: FormatDriver = {
  name: 'qcow2',
  probe(p: ProbeInput): number {
    if (p.head.length < 8) return 0;
    const dv = new DataView(p.head.buffer, p.head.byteOffset, p.head.byteLength);
    // Version 1 (qcow) shares the magic; it is refused by the recognised-only list.
    return dv.getUint32(0) === QCOW2_MAGIC && dv.getUint32(4) >= 2 ? 100 : 0;
  },
  async open(file: HostFile, ctx: OpenContext): Promise<BlockDevice> {
    const layer = await Qcow2Layer.open(file, ctx);
    return layeredDevice(layer);
  },
};
