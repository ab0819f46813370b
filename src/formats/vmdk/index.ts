/** vmdk: the format driver (probe + open). Everything else in this folder is its subsystems. */
import type { BlockDevice } from '../../block/device.js';
import type { HostFile } from '../../block/file.js';
import { layeredDevice } from '../chain.js';
import type { FormatDriver, OpenContext, ProbeInput } from '../registry.js';
import { probeVmdk } from './probe.js';
import { VmdkLayer } from './image.js';

export const vmdkFormat: FormatDriver = {
  name: 'vmdk',
  probe(p: ProbeInput): number {
    return probeVmdk(p.head);
  },
  async open(file: HostFile, ctx: OpenContext): Promise<BlockDevice> {
    return layeredDevice(await VmdkLayer.open(file, ctx));
  },
};
