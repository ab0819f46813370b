/**
 * The one wrapper that turns a small driver into a full BlockDevice:
 * range validation, read-only enforcement, capability defaults, emulation of
 * what the driver lacks (writeZeroes by writing zeros, FUA by flush),
 * request splitting, and normalisation of block status answers.
 * Drivers therefore only implement what they really can.
 */
import type { BlockDevice, Capabilities, DeviceSpan, Extent, IoOpts, ReadNowOpts, ReadRuns } from './device.js';
import { BlockError } from './errors.js';
import { checkRange } from './ranges.js';
import { zeroBuffer } from './zero.js';

export interface Driver {
  readonly size: number;
  readonly format: string;
  readonly path?: string;
  readonly readOnly: boolean;
  /** Largest request handed to the driver in one call (default 32 MiB). */
  readonly maxRequest?: number;
  /** Capabilities beyond what the presence of methods implies. */
  readonly caps?: Partial<Capabilities>;
  pread(buf: Uint8Array, offset: number): Promise<void>;
  /** See BlockDevice.readNow; the range is checked before. */
  readNow?(buf: Uint8Array, offset: number, opts?: ReadNowOpts): ReadRuns | null;
  /** See BlockDevice.spansNow; the range is checked before. */
  spansNow?(offset: number, length: number): DeviceSpan[] | null;
  pwrite?(buf: Uint8Array, offset: number, opts: IoOpts): Promise<void>;
  writeZeroes?(offset: number, length: number, opts: IoOpts): Promise<void>;
  discard?(offset: number, length: number): Promise<void>;
  flush?(): Promise<void>;
  blockStatus?(offset: number, length: number): Promise<Extent[]>;
  close(): Promise<void>;
}

const DEFAULT_MAX_REQUEST = 32 << 20;

export class GenericDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  readonly format: string;
  readonly path?: string;
  private readonly maxRequest: number;
  private closed = false;

  constructor(private readonly driver: Driver) {
    this.size = driver.size;
    this.format = driver.format;
    if (driver.path !== undefined) this.path = driver.path;
    this.maxRequest = driver.maxRequest ?? DEFAULT_MAX_REQUEST;
    const c = driver.caps ?? {};
    this.caps = Object.freeze({
      readOnly: driver.readOnly,
      flush: c.flush ?? driver.flush !== undefined,
      fua: c.fua ?? false,
      zero: c.zero ?? driver.writeZeroes !== undefined,
      discard: c.discard ?? driver.discard !== undefined,
      blockStatus: c.blockStatus ?? driver.blockStatus !== undefined,
    });
  }

  /** The wrapped driver, for tools that inspect format internals. */
  get inner(): Driver {
    return this.driver;
  }

  private check(op: string, offset: number, length: number, write: boolean): void {
    const ctx = this.path === undefined ? { op } : { op, path: this.path };
    if (this.closed) throw new BlockError('invalid-argument', `${this.path ?? this.format}: device is closed`, ctx);
    if (write && this.caps.readOnly) {
      throw new BlockError('read-only', `${this.path ?? this.format}: ${op} on a read-only device`, ctx);
    }
    checkRange(offset, length, this.size, ctx);
  }

  readNow(buf: Uint8Array, offset: number, opts?: ReadNowOpts): ReadRuns | null {
    if (this.closed || this.driver.readNow === undefined) return null;
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + buf.length > this.size || buf.length === 0) return null;
    try {
      return this.driver.readNow(buf, offset, opts);
    } catch {
      // pread will say what is wrong
      return null;
    }
  }

  spansNow(offset: number, length: number): DeviceSpan[] | null {
    if (this.closed || this.driver.spansNow === undefined) return null;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0 || offset + length > this.size)
      return null;
    try {
      return this.driver.spansNow(offset, length);
    } catch {
      // pread will say what is wrong
      return null;
    }
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    this.check('read', offset, buf.length, false);
    for (let done = 0; done < buf.length;) {
      const n = Math.min(this.maxRequest, buf.length - done);
      await this.driver.pread(buf.subarray(done, done + n), offset + done);
      done += n;
    }
  }

  async pwrite(buf: Uint8Array, offset: number, opts: IoOpts = {}): Promise<void> {
    this.check('write', offset, buf.length, true);
    const write = this.driver.pwrite;
    if (write === undefined) throw new BlockError('not-supported', `${this.format}: writing is not supported yet`, { op: 'write' });
    const nativeFua = this.caps.fua;
    for (let done = 0; done < buf.length;) {
      const n = Math.min(this.maxRequest, buf.length - done);
      await write.call(this.driver, buf.subarray(done, done + n), offset + done, nativeFua ? opts : {});
      done += n;
    }
    if (opts.fua && !nativeFua) await this.flush();
  }

  async writeZeroes(offset: number, length: number, opts: IoOpts = {}): Promise<void> {
    this.check('write-zeroes', offset, length, true);
    if (length === 0) return;
    if (this.driver.writeZeroes !== undefined) {
      await this.driver.writeZeroes(offset, length, this.caps.fua ? opts : { ...opts, fua: false });
      if (opts.fua && !this.caps.fua) await this.flush();
      return;
    }
    // Emulation: write zeros from a shared buffer, in bounded chunks.
    const z = zeroBuffer();
    for (let done = 0; done < length;) {
      const n = Math.min(z.length, length - done);
      await this.pwrite(z.subarray(0, n), offset + done);
      done += n;
    }
    if (opts.fua) await this.flush();
  }

  async discard(offset: number, length: number, opts: IoOpts = {}): Promise<void> {
    this.check('discard', offset, length, true);
    // Discard is advisory: a driver that cannot free space does nothing.
    if (this.driver.discard !== undefined && length > 0) await this.driver.discard(offset, length);
    if (opts.fua) await this.flush();
  }

  async flush(): Promise<void> {
    if (this.driver.flush !== undefined) await this.driver.flush();
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.check('block-status', offset, length, false);
    if (length === 0) return [];
    if (this.driver.blockStatus === undefined) {
      return [{ offset, length, zero: false, hole: false, allocated: true, depth: 0 }];
    }
    return normalizeExtents(await this.driver.blockStatus(offset, length), offset, length, this.path ?? this.format);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.driver.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/**
 * Clip a driver's extents to [offset, offset+length), check they are
 * contiguous from offset, and merge neighbours with identical flags.
 */
export function normalizeExtents(extents: Extent[], offset: number, length: number, who: string): Extent[] {
  const out: Extent[] = [];
  let pos = offset;
  const end = offset + length;
  for (const e of extents) {
    if (pos >= end) break;
    const eEnd = e.offset + e.length;
    if (e.length <= 0 || eEnd <= pos) continue;
    if (e.offset > pos) throw new BlockError('io', `${who}: block status left a gap at ${pos}`, { op: 'block-status' });
    const cut = pos - e.offset;
    const clipped: Extent = { ...e, offset: pos, length: Math.min(eEnd, end) - pos };
    if (clipped.hostOffset !== undefined) clipped.hostOffset += cut;
    const prev = out[out.length - 1];
    if (prev !== undefined && canMerge(prev, clipped)) prev.length += clipped.length;
    else out.push(clipped);
    pos = clipped.offset + clipped.length;
  }
  if (out.length === 0) throw new BlockError('io', `${who}: block status returned nothing at ${offset}`, { op: 'block-status' });
  return out;
}

/** Two adjacent extents merge when every flag agrees and host data is contiguous. */
export function canMerge(a: Extent, b: Extent): boolean {
  if (a.zero !== b.zero || a.hole !== b.hole || (a.allocated ?? !a.hole) !== (b.allocated ?? !b.hole)) return false;
  if ((a.depth ?? 0) !== (b.depth ?? 0) || (a.compressed ?? false) !== (b.compressed ?? false) || a.file !== b.file) return false;
  if (a.hostOffset === undefined || b.hostOffset === undefined) return a.hostOffset === b.hostOffset;
  return a.hostOffset + a.length === b.hostOffset;
}
