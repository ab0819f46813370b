/** Splitting a request into an unaligned head, an aligned body and a tail. */

export interface AlignedSplit {
  /** Unaligned bytes before the first boundary (may be 0). */
  head: number;
  /** Whole aligned units in the middle (a multiple of align; may be 0). */
  body: number;
  /** Unaligned bytes after the last boundary (may be 0). */
  tail: number;
}

export function isPowerOfTwo(n: number): boolean {
  // Math.log2 is exact for powers of two, so this also holds above 2^31.
  return Number.isSafeInteger(n) && n > 0 && Number.isInteger(Math.log2(n));
}

export function alignDown(n: number, align: number): number {
  return n - (n % align);
}

export function alignUp(n: number, align: number): number {
  const r = n % align;
  return r === 0 ? n : n + (align - r);
}

export function splitAligned(offset: number, length: number, align: number): AlignedSplit {
  const firstBoundary = alignUp(offset, align);
  const end = offset + length;
  if (firstBoundary >= end) return { head: length, body: 0, tail: 0 };
  const head = firstBoundary - offset;
  const lastBoundary = alignDown(end, align);
  return { head, body: lastBoundary - firstBoundary, tail: end - lastBoundary };
}
