/** Half-open ranges [offset, offset + length) and checked arithmetic on them. */
import { BlockError, type ErrorContext } from './errors.js';

export interface Range {
  offset: number;
  length: number;
}

export function rangeEnd(r: Range): number {
  return r.offset + r.length;
}

/** Intersection of two ranges, or null when they do not overlap. */
export function intersect(a: Range, b: Range): Range | null {
  const start = Math.max(a.offset, b.offset);
  const end = Math.min(rangeEnd(a), rangeEnd(b));
  return end > start ? { offset: start, length: end - start } : null;
}

export function overlaps(a: Range, b: Range): boolean {
  return intersect(a, b) !== null;
}

/** Validate an I/O request against a device size: out-of-bounds otherwise. */
export function checkRange(offset: number, length: number, size: number, ctx: ErrorContext = {}): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new BlockError('invalid-argument', `invalid range offset=${offset} length=${length}`, ctx);
  }
  if (offset + length > size) {
    const where = ctx.path ? `${ctx.path}: ` : '';
    throw new BlockError(
      'out-of-bounds',
      `${where}${ctx.op ?? 'I/O'} at offset ${offset} length ${length} is beyond the end of the device (${size} bytes)`,
      { ...ctx, offset },
    );
  }
}

/**
 * A sorted set of disjoint half-open ranges. Adjacent ranges merge.
 * Used for overlap checks of metadata and for tracking dirty regions.
 */
export class RangeSet {
  private starts: number[] = [];
  private ends: number[] = [];

  get count(): number {
    return this.starts.length;
  }

  /** Index of the first range whose end is > offset. */
  private lowerBound(offset: number): number {
    let lo = 0;
    let hi = this.ends.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((this.ends[mid] as number) <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  add(offset: number, length: number): void {
    if (length <= 0) return;
    let start = offset;
    let end = offset + length;
    // Merge with touching neighbours too (end == start).
    let i = this.lowerBound(start - 1);
    if (i < this.starts.length && (this.ends[i] as number) < start) i++;
    let j = i;
    while (j < this.starts.length && (this.starts[j] as number) <= end) {
      start = Math.min(start, this.starts[j] as number);
      end = Math.max(end, this.ends[j] as number);
      j++;
    }
    this.starts.splice(i, j - i, start);
    this.ends.splice(i, j - i, end);
  }

  /** The first stored range overlapping [offset, offset+length), if any. */
  findOverlap(offset: number, length: number): Range | null {
    const i = this.lowerBound(offset);
    if (i < this.starts.length && (this.starts[i] as number) < offset + length) {
      const s = this.starts[i] as number;
      return { offset: s, length: (this.ends[i] as number) - s };
    }
    return null;
  }

  has(offset: number, length = 1): boolean {
    const i = this.lowerBound(offset);
    return i < this.starts.length && (this.starts[i] as number) <= offset && (this.ends[i] as number) >= offset + length;
  }

  *[Symbol.iterator](): IterableIterator<Range> {
    for (let i = 0; i < this.starts.length; i++) {
      const s = this.starts[i] as number;
      yield { offset: s, length: (this.ends[i] as number) - s };
    }
  }
}
