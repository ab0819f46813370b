/**
 * Sector bitmaps (spec digest §5): before each block's data, one bit per
 * sector, most significant bit first; 1 = the sector is stored in this
 * file, 0 = it is not (a dynamic disk reads zeros, a differencing disk reads
 * its parent). Bitmaps go through a bounded LRU cache.
 */
import type { HostFile } from '../../block/file.js';
import { LruCache } from '../../util/lru.js';
import type { DynamicHeader } from './header.js';

const CACHE_BYTES = 4 << 20;

export interface BitRun {
  /** First sector of the run, inside the block. */
  start: number;
  count: number;
  present: boolean;
}

export class SectorBitmaps {
  private readonly cache: LruCache<number, Uint8Array>;
  /**
   * Bitmaps of existing blocks changed by the writer and not yet written:
   * pinned here (the cache may drop them) until the next flush writes them,
   * after the sectors they mark are durable (see writer.ts).
   */
  private readonly dirty = new Map<number, Uint8Array>();

  constructor(
    private readonly file: HostFile,
    private readonly header: DynamicHeader,
  ) {
    this.cache = new LruCache(Math.max(4, Math.floor(CACHE_BYTES / header.bitmapSize)));
  }

  /** The bitmap stored at this file offset (the BAT checked at open that it lies inside the file). */
  get(bitmapOffset: number): Promise<Uint8Array> {
    const d = this.dirty.get(bitmapOffset);
    if (d !== undefined) return Promise.resolve(d);
    return this.cache.get(bitmapOffset, async () => {
      const b = new Uint8Array(this.header.bitmapSize);
      await this.file.readExact(b, bitmapOffset, 'sector bitmap');
      return b;
    });
  }

  /** Cache a bitmap the writer has just written (a new block). */
  put(bitmapOffset: number, bitmap: Uint8Array): void {
    this.cache.delete(bitmapOffset);
    void this.cache.get(bitmapOffset, () => Promise.resolve(bitmap));
  }

  /** Keep a changed bitmap (the same object get() returned) until writeDirty(). */
  markDirty(bitmapOffset: number, bitmap: Uint8Array): void {
    this.dirty.set(bitmapOffset, bitmap);
  }

  get dirtyCount(): number {
    return this.dirty.size;
  }

  /** Write every changed bitmap in place; true when there was one. */
  async writeDirty(): Promise<boolean> {
    if (this.dirty.size === 0) return false;
    const all = [...this.dirty];
    for (const [at, bitmap] of all) await this.file.writeAt(bitmap, at);
    for (const [at] of all) this.dirty.delete(at);
    return true;
  }

  /** Drop everything cached; changed bitmaps must have been written (writeDirty) first. */
  clear(): void {
    this.cache.clear();
    this.dirty.clear();
  }
}

/** §5: set (or clear) the bits of sectors [first, first + count); true when a bit changed. */
export function setSectors(bitmap: Uint8Array, first: number, count: number, present: boolean): boolean {
  let changed = false;
  for (let i = first; i < first + count; i++) {
    const byte = i >> 3;
    const mask = 1 << (7 - (i & 7));
    const old = bitmap[byte] as number;
    const v = present ? old | mask : old & ~mask;
    if (v !== old) {
      bitmap[byte] = v;
      changed = true;
    }
  }
  return changed;
}

/** §5: bit for sector i: byte i/8, bit 7 - i%8. */
export function sectorPresent(bitmap: Uint8Array, i: number): boolean {
  return (((bitmap[i >> 3] as number) >> (7 - (i & 7))) & 1) === 1;
}

/** Runs of present / absent sectors over [first, first + count), whole bytes at a time where possible. */
export function bitRuns(bitmap: Uint8Array, first: number, count: number): BitRun[] {
  const runs: BitRun[] = [];
  const push = (start: number, n: number, present: boolean): void => {
    const last = runs[runs.length - 1];
    if (last !== undefined && last.present === present && last.start + last.count === start) last.count += n;
    else runs.push({ start, count: n, present });
  };
  const end = first + count;
  let i = first;
  while (i < end) {
    if ((i & 7) === 0 && i + 8 <= end) {
      const byte = bitmap[i >> 3] as number;
      if (byte === 0xff || byte === 0) {
        push(i, 8, byte === 0xff);
        i += 8;
        continue;
      }
    }
    push(i, 1, sectorPresent(bitmap, i));
    i++;
  }
  return runs;
}
