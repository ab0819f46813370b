/**
 * Backing chains: resolving a backing file name relative to the image that
 * names it, bounding the depth, detecting loops, and composing a layer with
 * its backing device into one device (reads fall through unallocated runs,
 * block status reports which depth answers, as `qemu-img map` does).
 */
import { realpath } from 'node:fs/promises';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import type { BlockDevice, Capabilities, DeviceSpan, Extent, IoOpts, ReadNowOpts, ReadRuns } from '../block/device.js';
import { BlockError } from '../block/errors.js';
import { GenericDevice, type Driver } from '../block/generic.js';
import { isNbdUri } from '../nbd/uri.js';
import type { Layer, LayerRun } from './layer.js';

/** A chain deeper than this is refused: it is almost certainly a mistake or an attack. */
export const MAX_CHAIN_DEPTH = 64;

/**
 * Backing and data file names are relative to the directory of the image that
 * names them. Like qemu's path_combine, a relative image path gives a relative
 * result, so `info` shows the same full-backing-filename as qemu-img.
 */
export function resolveRelative(referrer: string, name: string): string {
  if (isAbsolute(name) || isNbdUri(name)) return name;
  if (isNbdUri(referrer)) {
    // An image served over NBD names its backing file relative to its own
    // URI, like qemu's path_combine on a URL: nbd://h/dir/top + base -> nbd://h/dir/base.
    // The query (socket=, tls-*) belongs to the server, so it is kept.
    const u = new URL(referrer);
    const r = new URL(name, u);
    r.search = u.search;
    return r.href;
  }
  return join(dirname(referrer), name);
}

/** Where an image sits in a chain being opened: for loop and depth checks. */
export interface ChainState {
  depth: number;
  /** Real paths of the images above, top first. */
  seen: string[];
}

export async function enterChain(state: ChainState, path: string, referrer?: string): Promise<ChainState> {
  let real: string;
  try {
    real = await realpath(path);
  } catch {
    real = resolve(path);
  }
  if (state.seen.includes(real)) {
    throw new BlockError(
      'invalid-image',
      `${referrer ?? path}: backing chain loops back to ${path}`,
      referrer === undefined ? { path, structure: 'backing chain' } : { path: referrer, structure: 'backing chain' },
    );
  }
  if (state.depth >= MAX_CHAIN_DEPTH) {
    throw new BlockError('invalid-image', `${referrer ?? path}: backing chain is deeper than ${MAX_CHAIN_DEPTH} images`, {
      path: referrer ?? path,
      structure: 'backing chain',
    });
  }
  return { depth: state.depth + 1, seen: [...state.seen, real] };
}

/**
 * Read guest bytes of a layer: its data and compressed runs from the layer,
 * zero runs as zeros, unallocated runs from the backing device (zeros past its
 * end). Runs are independent, so file reads and decompression (zlib runs in
 * the libuv pool) overlap.
 */
export async function readLayered(layer: Layer, buf: Uint8Array, offset: number): Promise<void> {
  const runs = await layer.map(offset, buf.length);
  let pos = offset;
  const work: Promise<void>[] = [];
  for (const run of runs) {
    const end = Math.min(run.offset + run.length, offset + buf.length);
    if (end <= pos) continue;
    const dst = buf.subarray(pos - offset, end - offset);
    if (run.kind === 'zero') dst.fill(0);
    else if (run.kind === 'unallocated') work.push(readBacking(layer.backing, dst, pos));
    else work.push(layer.readRun(dst, run, pos));
    pos = end;
  }
  await Promise.all(work);
  if (pos !== offset + buf.length) {
    throw new BlockError('io', `${layer.path}: mapping did not cover the read at ${pos}`, { path: layer.path, op: 'read' });
  }
}

/**
 * readLayered at once from what is in memory (BlockDevice.readNow): the
 * layer's cached mapping, data in the page cache, backing devices likewise;
 * null as soon as anything would have to wait (compressed runs always do).
 */
export function readLayeredNow(layer: Layer, buf: Uint8Array, offset: number, opts?: ReadNowOpts): ReadRuns | null {
  const fill = opts?.zeroFill !== false;
  if (layer.mapNow === undefined || layer.readRunNow === undefined) return null;
  const runs = layer.mapNow(offset, buf.length);
  if (runs === null) return null;
  const out: ReadRuns = [];
  let pos = offset;
  for (const run of runs) {
    const end = Math.min(run.offset + run.length, offset + buf.length);
    if (end <= pos) continue;
    const dst = buf.subarray(pos - offset, end - offset);
    let zero = false;
    if (run.kind === 'zero') zero = (fill && dst.fill(0), true);
    else if (run.kind === 'unallocated') {
      const b = layer.backing;
      const inBacking = backingBytes(b, dst.length, pos);
      if (b !== null && inBacking > 0 && !b.readNow?.(dst.subarray(0, inBacking), pos, NO_HOLES)) return null;
      zero = inBacking === 0;
      if (inBacking < dst.length && (fill || !zero)) dst.fill(0, inBacking);
    } else if (!layer.readRunNow(dst, run, pos)) return null;
    out.push({ offset: pos, length: end - pos, zero });
    pos = end;
  }
  return pos === offset + buf.length ? out : null;
}

/**
 * BlockDevice.spansNow of a layered image: the layer's cached mapping, its
 * data runs as host file spans, unallocated runs from the backing device's
 * own spans (zeros past its end), null as soon as anything is not in memory
 * or is not stored as plain bytes (compressed, encrypted).
 */
export function spansLayeredNow(layer: Layer, offset: number, length: number): DeviceSpan[] | null {
  if (layer.mapNow === undefined || layer.spanRunNow === undefined) return null;
  const runs = layer.mapNow(offset, length);
  if (runs === null) return null;
  const out: DeviceSpan[] = [];
  const end = offset + length;
  let pos = offset;
  for (const run of runs) {
    const runEnd = Math.min(run.offset + run.length, end);
    if (runEnd <= pos) continue;
    const n = runEnd - pos;
    if (run.kind === 'zero') out.push({ offset: pos, length: n, zero: true, fd: -1, hostOffset: 0 });
    else if (run.kind === 'unallocated') {
      const b = layer.backing;
      const inBacking = backingBytes(b, n, pos);
      if (b !== null && inBacking > 0) {
        const sub = b.spansNow?.(pos, inBacking) ?? null;
        if (sub === null) return null;
        for (const s of sub) out.push(s);
      }
      if (inBacking < n) out.push({ offset: pos + inBacking, length: n - inBacking, zero: true, fd: -1, hostOffset: 0 });
    } else if (run.kind === 'data') {
      const at = layer.spanRunNow(run, pos, n);
      if (at === null) return null;
      out.push({ offset: pos, length: n, zero: false, fd: at.fd, hostOffset: at.hostOffset });
    } else return null;
    pos = runEnd;
  }
  return pos === end ? out : null;
}

/** A backing device's bytes fill an unallocated run; which of them are zeros does not matter. */
const NO_HOLES: ReadNowOpts = { holes: false };

/** How much of `length` bytes at `offset` the backing device has (a shorter backing file reads as zeros past its end). */
function backingBytes(b: BlockDevice | null, length: number, offset: number): number {
  return b === null ? 0 : Math.max(0, Math.min(length, b.size - offset));
}

/** Unallocated runs read from the backing device; beyond its end, zeros. */
async function readBacking(b: BlockDevice | null, dst: Uint8Array, offset: number): Promise<void> {
  const inBacking = backingBytes(b, dst.length, offset);
  if (b !== null && inBacking > 0) await b.pread(dst.subarray(0, inBacking), offset);
  if (inBacking < dst.length) dst.fill(0, inBacking);
}

/** The driver of every layered image: one layer plus the device under it. */
export class LayeredDriver implements Driver {
  readonly format: string;
  readonly path: string;
  readonly readOnly: boolean;
  readonly caps: Partial<Capabilities>;

  constructor(readonly layer: Layer) {
    this.format = layer.format;
    this.path = layer.path;
    this.readOnly = layer.readOnly;
    this.caps = {
      blockStatus: true,
      fua: false,
      flush: layer.flush !== undefined,
      zero: layer.writeZeroes !== undefined,
      discard: layer.discard !== undefined,
    };
  }

  get size(): number {
    return this.layer.size;
  }

  get backing(): BlockDevice | null {
    return this.layer.backing;
  }

  pread(buf: Uint8Array, offset: number): Promise<void> {
    return readLayered(this.layer, buf, offset);
  }

  readNow(buf: Uint8Array, offset: number, opts?: ReadNowOpts): ReadRuns | null {
    return readLayeredNow(this.layer, buf, offset, opts);
  }

  spansNow(offset: number, length: number): DeviceSpan[] | null {
    return spansLayeredNow(this.layer, offset, length);
  }

  async pwrite(buf: Uint8Array, offset: number): Promise<void> {
    if (this.layer.write === undefined) throw this.notWritable('write');
    await this.layer.write(buf, offset);
  }

  async writeZeroes(offset: number, length: number, opts: IoOpts): Promise<void> {
    if (this.layer.writeZeroes === undefined) throw this.notWritable('write-zeroes');
    await this.layer.writeZeroes(offset, length, opts.mayTrim ?? false);
  }

  async discard(offset: number, length: number): Promise<void> {
    if (this.layer.discard !== undefined) await this.layer.discard(offset, length);
  }

  async flush(): Promise<void> {
    if (this.layer.flush !== undefined) await this.layer.flush();
  }

  private notWritable(op: string): BlockError {
    return new BlockError('read-only', `${this.path}: ${op} on an image opened read-only`, { path: this.path, op });
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const runs = await this.layer.map(offset, length);
    const out: Extent[] = [];
    for (const run of runs) {
      const s = Math.max(run.offset, offset);
      const e = Math.min(run.offset + run.length, offset + length);
      if (e <= s) continue;
      if (run.kind === 'unallocated') out.push(...(await this.backingStatus(s, e - s, run)));
      else out.push(runExtent(run, s, e - s));
    }
    return out;
  }

  /**
   * Extents of an unallocated range: from the backing chain, one level deeper.
   * `run` is this layer's unallocated run; it may still carry a host offset
   * (an unallocated subcluster of an allocated qcow2 cluster).
   */
  private async backingStatus(offset: number, length: number, run: LayerRun): Promise<Extent[]> {
    const b = this.layer.backing;
    const out: Extent[] = [];
    const inBacking = b === null ? 0 : Math.max(0, Math.min(length, b.size - offset));
    let pos = offset;
    while (b !== null && pos < offset + inBacking) {
      const ext = await b.blockStatus(pos, offset + inBacking - pos);
      for (const x of ext) out.push({ ...x, depth: (x.depth ?? 0) + 1 });
      const last = ext[ext.length - 1] as Extent;
      pos = last.offset + last.length;
    }
    // Past the backing file's end (or with none) this layer answers: zeros, not allocated, and
    // like qemu-img map it still reports the host offset the layer has for the range, if any.
    if (pos < offset + length) {
      const ext: Extent = { offset: pos, length: offset + length - pos, zero: true, hole: true, allocated: false, depth: 0 };
      if (run.hostOffset !== undefined) ext.hostOffset = run.hostOffset + (pos - run.offset);
      if (run.hostOffset !== undefined && run.file !== undefined) ext.file = run.file;
      out.push(ext);
    }
    return out;
  }

  async close(): Promise<void> {
    try {
      await this.layer.close();
    } finally {
      if (this.layer.backing !== null) await this.layer.backing.close();
    }
  }
}

function runExtent(run: LayerRun, offset: number, length: number): Extent {
  switch (run.kind) {
    case 'zero': {
      const ext: Extent = { offset, length, zero: true, hole: true, allocated: true, depth: 0 };
      if (run.hostOffset !== undefined) ext.hostOffset = run.hostOffset + (offset - run.offset);
      if (run.file !== undefined) ext.file = run.file;
      return ext;
    }
    case 'compressed':
      return { offset, length, zero: false, hole: false, allocated: true, depth: 0, compressed: true };
    case 'data': {
      const ext: Extent = { offset, length, zero: false, hole: false, allocated: true, depth: 0 };
      if (run.hostOffset !== undefined) ext.hostOffset = run.hostOffset + (offset - run.offset);
      if (run.file !== undefined) ext.file = run.file;
      return ext;
    }
    default:
      throw new BlockError('io', 'unallocated run has no extent of its own');
  }
}

/** Wrap a layer (and its backing) as a full block device. */
export function layeredDevice(layer: Layer): GenericDevice {
  return new GenericDevice(new LayeredDriver(layer));
}

/** The layer behind a device made by layeredDevice, for format-aware tools (info, inspect). */
export function layerOf(dev: BlockDevice): Layer | undefined {
  if (dev instanceof GenericDevice && dev.inner instanceof LayeredDriver) return dev.inner.layer;
  return undefined;
}
