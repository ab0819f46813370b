/** raw: the file is the guest disk, byte for byte. */
import type { BlockDevice } from '../../block/device.js';
import type { HostFile } from '../../block/file.js';
import { GenericDevice, type Driver } from '../../block/generic.js';
import type { DeviceSpan, Extent, IoOpts, ReadNowOpts, ReadRuns } from '../../block/device.js';
import type { FormatDriver } from '../registry.js';

export class RawDriver implements Driver {
  readonly format = 'raw';
  readonly path: string;
  readonly readOnly: boolean;
  readonly size: number;
  readonly caps = { flush: true, fua: false, zero: false, discard: false, blockStatus: true };

  constructor(readonly file: HostFile) {
    this.path = file.path;
    this.readOnly = file.readOnly;
    this.size = file.size;
  }

  pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.file.readAt(buf, offset);
  }

  readNow(buf: Uint8Array, offset: number, opts?: ReadNowOpts): ReadRuns | null {
    const runs = (opts?.holes === false ? null : this.file.dataRuns(offset, buf.length)) ?? [{ offset, length: buf.length, data: true }];
    for (const r of runs) {
      const dst = buf.subarray(r.offset - offset, r.offset - offset + r.length);
      if (!r.data) {
        if (opts?.zeroFill !== false) dst.fill(0);
      } else if (!this.file.readNow(dst, r.offset)) return null;
    }
    return runs.map((r) => ({ offset: r.offset, length: r.length, zero: !r.data }));
  }

  spansNow(offset: number, length: number): DeviceSpan[] | null {
    const runs = this.file.dataRuns(offset, length) ?? [{ offset, length, data: true }];
    const out: DeviceSpan[] = [];
    for (const r of runs) {
      const fd = r.data ? this.file.spanNow(r.offset, r.length) : -1;
      if (r.data && fd < 0) return null;
      out.push({ offset: r.offset, length: r.length, zero: !r.data, fd, hostOffset: r.offset });
    }
    return out;
  }

  pwrite(buf: Uint8Array, offset: number, _opts: IoOpts): Promise<void> {
    return this.file.writeAt(buf, offset);
  }

  flush(): Promise<void> {
    return this.file.sync();
  }

  /**
   * Holes of the host file read as zeros and are reported as such (qemu's
   * file driver: present, zero, no data, with their offset), found with
   * SEEK_DATA/SEEK_HOLE. Without the native helper (block/hostio.ts) all data.
   */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const runs = this.file.dataRuns(offset, length);
    if (runs === null)
      return [{ offset, length, zero: false, hole: false, allocated: true, depth: 0, hostOffset: offset, file: this.path }];
    return runs.map((r) => ({
      offset: r.offset,
      length: r.length,
      zero: !r.data,
      hole: !r.data,
      allocated: true,
      depth: 0,
      hostOffset: r.offset,
      file: this.path,
    }));
  }

  async info(): Promise<{ 'virtual-size': number; filename: string; format: string; 'actual-size': number }> {
    return { 'virtual-size': this.size, filename: this.path, format: 'raw', 'actual-size': await this.file.allocatedBytes() };
  }

  close(): Promise<void> {
    return this.file.close();
  }
}

export const rawFormat: FormatDriver = {
  name: 'raw',
  probe: () => 1,
  async open(file: HostFile): Promise<BlockDevice> {
    return new GenericDevice(new RawDriver(file));
  },
};
