/**
 * Backing chains: resolving a backing file name relative to the image that
 * names it, bounding the depth, detecting loops, and composing a layer with
 * its backing device into one device (reads fall through unallocated runs,
 * block status reports which depth answers, as `qemu-img map` does).
 */
import { realpath } from 'node:fs/promises';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import type { BlockDevice, Extent } from '../block/device.js';
import { BlockError } from '../block/errors.js';
import { GenericDevice, type Driver } from '../block/generic.js';
import type { Layer, LayerRun } from './layer.js';

/** A chain deeper than this is refused: it is almost certainly a mistake or an attack. */
export const MAX_CHAIN_DEPTH = 64;

/**
 * Backing and data file names are relative to the directory of the image that
 * names them. Like qemu's path_combine, a relative image path gives a relative
 * result, so `info` shows the same full-backing-filename as qemu-img.
 */
export function resolveRelative(referrer: string, name: string): string {
  if (isAbsolute(name)) return name;
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

/** The driver of every layered image: one layer plus the device under it. */
export class LayeredDriver implements Driver {
  readonly format: string;
  readonly path: string;
  readonly readOnly: boolean;
  readonly caps = { blockStatus: true, flush: false, fua: false };

  constructor(readonly layer: Layer) {
    this.format = layer.format;
    this.path = layer.path;
    this.readOnly = layer.readOnly;
  }

  get size(): number {
    return this.layer.size;
  }

  get backing(): BlockDevice | null {
    return this.layer.backing;
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    const runs = await this.layer.map(offset, buf.length);
    let pos = offset;
    // Runs are independent: file reads and decompression (zlib runs in the libuv pool) overlap.
    const work: Promise<void>[] = [];
    for (const run of runs) {
      const end = Math.min(run.offset + run.length, offset + buf.length);
      if (end <= pos) continue;
      const dst = buf.subarray(pos - offset, end - offset);
      if (run.kind === 'zero') dst.fill(0);
      else if (run.kind === 'unallocated') work.push(this.readBacking(dst, pos));
      else work.push(this.layer.readRun(dst, run, pos));
      pos = end;
    }
    await Promise.all(work);
    if (pos !== offset + buf.length) {
      throw new BlockError('io', `${this.path}: mapping did not cover the read at ${pos}`, { path: this.path, op: 'read' });
    }
  }

  /** Unallocated runs read from the backing device; beyond its end, zeros. */
  private async readBacking(dst: Uint8Array, offset: number): Promise<void> {
    const b = this.layer.backing;
    const inBacking = b === null ? 0 : Math.max(0, Math.min(dst.length, b.size - offset));
    if (b !== null && inBacking > 0) await b.pread(dst.subarray(0, inBacking), offset);
    if (inBacking < dst.length) dst.fill(0, inBacking);
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const runs = await this.layer.map(offset, length);
    const out: Extent[] = [];
    for (const run of runs) {
      const s = Math.max(run.offset, offset);
      const e = Math.min(run.offset + run.length, offset + length);
      if (e <= s) continue;
      if (run.kind === 'unallocated') out.push(...(await this.backingStatus(s, e - s)));
      else out.push(runExtent(run, s, e - s));
    }
    return out;
  }

  /** Extents of an unallocated range: from the backing chain, one level deeper. */
  private async backingStatus(offset: number, length: number): Promise<Extent[]> {
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
    // Past the backing file's end (or with none) this layer answers: zeros, not allocated.
    if (pos < offset + length) out.push({ offset: pos, length: offset + length - pos, zero: true, hole: true, allocated: false, depth: 0 });
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
