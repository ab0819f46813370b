/**
 * The hot loops of the qcow2 check (check.ts), over whole tables at once.
 *
 * Why a file of its own: a one-shot `rblock check` runs these loops mostly
 * in V8's interpreter (an 8 GiB image has only 16 L2 tables of 8192 entries;
 * optimised code arrives late, and was deoptimised again by branches of the
 * big general-path methods that had not run yet). So each loop here is a
 * small function with few bytecodes per entry and no cold code inside: it
 * handles the common entries and returns the index of the first entry it
 * cannot, which check.ts then handles on its general path (every finding,
 * message and repair stays there) before calling the loop again.
 *
 * Entries are read as 32-bit words of a byte-swapped copy of the table
 * (Buffer#swap64 is native), not byte by byte: a big-endian u64 entry i then
 * has its low word at [2i] and its high word at [2i + 1], both as int32 (small
 * integers: no heap numbers in the interpreter). On a big-endian host the
 * bytes need no swap but the words sit the other way round; there these fast
 * paths are simply not used (NATIVE_LE false) and the general path runs.
 */

/** Whether this host is little-endian (the swapped-word layout above holds). */
export const NATIVE_LE = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** A table of big-endian u64 entries as native-endian int32 words (see above). */
export class SwappedTable {
  readonly words: Int32Array;
  private readonly bytes: Buffer;

  constructor(byteLength: number) {
    this.words = new Int32Array(byteLength / 4);
    this.bytes = Buffer.from(this.words.buffer, 0, byteLength);
  }

  /** Load from raw on-disk bytes (same length). */
  load(raw: Uint8Array): Int32Array {
    this.bytes.set(raw);
    this.bytes.swap64();
    return this.words;
  }
}

/** A stored refcount block decoded to native-endian numbers (widths 8, 16 and 32 only). */
export type NativeRefs = Uint8Array | Uint16Array | Uint32Array;

/**
 * Decode a refcount block of `bits`-wide big-endian entries, or null for the
 * widths without a native array; into `reuse` when it has the right type and
 * length (the previous result then changes).
 */
export function decodeRefblock(raw: Uint8Array, bits: number, reuse: NativeRefs | null = null): NativeRefs | null {
  if (!NATIVE_LE) return null;
  if (bits === 8) return raw;
  if (bits !== 16 && bits !== 32) return null;
  const fits =
    reuse !== null && reuse.byteLength === raw.length && (bits === 16 ? reuse instanceof Uint16Array : reuse instanceof Uint32Array);
  const out = fits ? reuse : bits === 16 ? new Uint16Array(raw.length / 2) : new Uint32Array(raw.length / 4);
  const b = Buffer.from(out.buffer, 0, raw.length);
  b.set(raw);
  if (bits === 16) b.swap16();
  else b.swap32();
  return out;
}

/** Whether a[aFrom, aFrom + n) equals b[bFrom, bFrom + n) (same element type): a native memcmp. */
export function sameRange(a: NativeRefs, aFrom: number, b: NativeRefs, bFrom: number, n: number): boolean {
  const w = a.BYTES_PER_ELEMENT;
  return (
    Buffer.compare(Buffer.from(a.buffer, a.byteOffset + aFrom * w, n * w), Buffer.from(b.buffer, b.byteOffset + bFrom * w, n * w)) === 0
  );
}

/** What check_refcounts_l2 carries from entry to entry of the active L1's tables. */
export interface L2Tally {
  allocated: number;
  fragmented: number;
  /** qemu's next_contiguous_offset, in bytes (0: none yet). */
  nextContiguous: number;
}

/**
 * check_refcounts_l2 over standard L2 entries (no extended L2, no external
 * data file) from entry `from`: zero entries are skipped, and data clusters
 * with no flag but COPIED, aligned, inside the file (cluster k, 0 < k < nb)
 * and below the refcount maximum are counted in the IMRT if they are in its
 * window (imrt.base <= k < winEnd), and for the active L1 in `tally`
 * whatever the window. Returns the first entry index (< n) it did not
 * handle, or n.
 */
export function countL2(
  e: Int32Array,
  from: number,
  n: number,
  counts: { readonly data: Uint8Array | Uint16Array | Uint32Array | Float64Array; readonly max: number; readonly base: number },
  nb: number,
  winEnd: number,
  clusterBits: number,
  active: boolean,
  tally: L2Tally,
): number {
  const imrt = counts.data;
  const max = counts.max;
  const base = counts.base;
  const hiScale = 2 ** (32 - clusterBits);
  const alignMask = 2 ** clusterBits - 1; // also covers bits 0..8: the zero flag and reserved bits
  const cs = 2 ** clusterBits;
  const nc = tally.nextContiguous;
  // The next contiguous cluster: -1 none yet, -2 an unaligned byte offset no cluster can match.
  let nk = nc === 0 ? -1 : nc % cs === 0 ? nc / cs : -2;
  let allocated = 0;
  let fragmented = 0;
  let i = from;
  for (; i < n; i++) {
    const lo = e[2 * i] as number;
    const hi = e[2 * i + 1] as number;
    if ((lo | hi) === 0) continue;
    if ((hi & 0x7f00_0000) !== 0 || (lo & alignMask) !== 0) break; // compressed, reserved bits, zero flag, unaligned
    const k = (hi & 0xff_ffff) * hiScale + (lo >>> clusterBits);
    if (k === 0 || k >= nb) break;
    if (k >= base && k < winEnd) {
      const r = imrt[k - base] as number;
      if (r === max) break; // the general path reports the overflow
      imrt[k - base] = r + 1;
    }
    if (active) {
      allocated++;
      if (nk !== -1 && k !== nk) fragmented++;
      nk = k + 1;
    }
  }
  tally.allocated += allocated;
  tally.fragmented += fragmented;
  if (nk >= 0) tally.nextContiguous = nk * cs;
  return i;
}

/**
 * check_oflag_copied over standard L2 entries from entry `from`: skips
 * compressed and offset-less entries, and data clusters whose COPIED flag
 * agrees with their stored refcount (refcount 1), as long as that refcount is
 * in `refs` (the stored refcounts of clusters [base, base + refs.length)).
 * Returns the first entry index (< n) it did not handle, or n.
 */
export function copiedL2(e: Int32Array, from: number, n: number, refs: NativeRefs, base: number, clusterBits: number): number {
  const hiScale = 2 ** (32 - clusterBits);
  const len = refs.length;
  let i = from;
  for (; i < n; i++) {
    const lo = e[2 * i] as number;
    const hi = e[2 * i + 1] as number;
    if ((hi & 0x4000_0000) !== 0) continue; // compressed: no COPIED check
    const hiOff = hi & 0xff_ffff;
    if ((hiOff | (lo & -512)) === 0) continue; // no offset: unallocated or plain zero
    const rel = hiOff * hiScale + (lo >>> clusterBits) - base;
    if (rel < 0 || rel >= len) break; // another refcount block: the caller loads it
    if (((refs[rel] as number) === 1) !== hi < 0) break; // a mismatch: the general path reports it
  }
  return i;
}

/** The first u64 entry at or after `from` (below n) that is not zero, or n; `words` may be in either byte order. */
export function nextNonZero(words: Int32Array, from: number, n: number): number {
  let i = from;
  while (i < n && ((words[2 * i] as number) | (words[2 * i + 1] as number)) === 0) i++;
  return i;
}
