/** A device held in memory: for tests, scratch overlays and small images. */
import type { BlockDevice } from './device.js';
import { GenericDevice, type Driver } from './generic.js';

class MemoryDriver implements Driver {
  readonly format = 'memory';
  readonly readOnly = false;
  readonly caps = { flush: false, fua: true, zero: true, discard: true, blockStatus: false };

  constructor(private readonly data: Uint8Array) {}

  get size(): number {
    return this.data.length;
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    buf.set(this.data.subarray(offset, offset + buf.length));
  }

  async pwrite(buf: Uint8Array, offset: number): Promise<void> {
    this.data.set(buf, offset);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.data.fill(0, offset, offset + length);
  }

  async discard(offset: number, length: number): Promise<void> {
    this.data.fill(0, offset, offset + length);
  }

  async close(): Promise<void> {}
}

/** A zero-filled memory device of `size` bytes, or one over the given bytes (not copied). */
export function memoryDevice(sizeOrData: number | Uint8Array): BlockDevice {
  const data = typeof sizeOrData === 'number' ? new Uint8Array(sizeOrData) : sizeOrData;
  return new GenericDevice(new MemoryDriver(data));
}
