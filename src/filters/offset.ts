/** A window [offset, offset + size) of another device (a partition, a slice). */
import type { BlockDevice, Extent, IoOpts } from '../block/device.js';
import { BlockError } from '../block/errors.js';
import { GenericDevice } from '../block/generic.js';
import { FilterDriver } from './filter.js';

class OffsetDriver extends FilterDriver {
  constructor(
    next: BlockDevice,
    private readonly start: number,
    private readonly length: number,
  ) {
    super(next);
  }
  override get size(): number {
    return this.length;
  }
  override pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.next.pread(buf, this.start + offset);
  }
  override pwrite(buf: Uint8Array, offset: number, opts: IoOpts): Promise<void> {
    return this.next.pwrite(buf, this.start + offset, opts);
  }
  override writeZeroes(offset: number, length: number, opts: IoOpts): Promise<void> {
    return this.next.writeZeroes(this.start + offset, length, opts);
  }
  override discard(offset: number, length: number): Promise<void> {
    return this.next.discard(this.start + offset, length);
  }
  override async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const ext = await this.next.blockStatus(this.start + offset, length);
    return ext.map((e) => ({ ...e, offset: e.offset - this.start }));
  }
}

/** Expose bytes [start, start + length) of `next` as a device of its own. */
export function offsetFilter(next: BlockDevice, start: number, length = next.size - start): BlockDevice {
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length) || start < 0 || length < 0 || start + length > next.size) {
    throw new BlockError('out-of-bounds', `slice [${start}, +${length}) does not fit a device of ${next.size} bytes`, {
      op: 'open',
    });
  }
  return new GenericDevice(new OffsetDriver(next, start, length));
}
