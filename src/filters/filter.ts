/**
 * Pass-through base for filters (the nbdkit-filter model): a filter is a
 * driver over another device; subclasses override only what they change.
 */
import type { BlockDevice, Capabilities, Extent, IoOpts } from '../block/device.js';
import type { Driver } from '../block/generic.js';

export class FilterDriver implements Driver {
  readonly format: string;
  readonly path?: string;

  constructor(protected readonly next: BlockDevice) {
    this.format = next.format;
    if (next.path !== undefined) this.path = next.path;
  }

  get size(): number {
    return this.next.size;
  }
  get readOnly(): boolean {
    return this.next.caps.readOnly;
  }
  get caps(): Partial<Capabilities> {
    return this.next.caps;
  }
  pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.next.pread(buf, offset);
  }
  pwrite(buf: Uint8Array, offset: number, opts: IoOpts): Promise<void> {
    return this.next.pwrite(buf, offset, opts);
  }
  writeZeroes(offset: number, length: number, opts: IoOpts): Promise<void> {
    return this.next.writeZeroes(offset, length, opts);
  }
  discard(offset: number, length: number): Promise<void> {
    return this.next.discard(offset, length);
  }
  flush(): Promise<void> {
    return this.next.flush();
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.next.blockStatus(offset, length);
  }
  close(): Promise<void> {
    return this.next.close();
  }
}
