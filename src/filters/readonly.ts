/** Refuse every write with `read-only`, whatever the device underneath allows. */
import type { BlockDevice } from '../block/device.js';
import { GenericDevice } from '../block/generic.js';
import { FilterDriver } from './filter.js';

class ReadOnlyDriver extends FilterDriver {
  override get readOnly(): boolean {
    return true;
  }
}

export function readOnlyFilter(next: BlockDevice): BlockDevice {
  return new GenericDevice(new ReadOnlyDriver(next));
}
