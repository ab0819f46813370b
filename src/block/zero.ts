/** Zero detection and a shared read-only zero buffer. */

const ZERO_CHUNK = 1 << 20;
let zeroBuf: Buffer | null = null;

/** A shared buffer of zeros, at least `length` bytes for length <= 1 MiB. Never write to it. */
export function zeroBuffer(length = ZERO_CHUNK): Buffer {
  if (zeroBuf === null || zeroBuf.length < length) zeroBuf = Buffer.alloc(Math.max(length, ZERO_CHUNK));
  return zeroBuf;
}

/** True when every byte is zero. Uses a native compare against a zero buffer. */
export function isZero(buf: Uint8Array): boolean {
  let off = 0;
  const z = zeroBuffer();
  while (off < buf.length) {
    const n = Math.min(z.length, buf.length - off);
    if (Buffer.compare(buf.subarray(off, off + n), z.subarray(0, n)) !== 0) return false;
    off += n;
  }
  return true;
}

/**
 * True when buf[start, end) is all zeros, without allocating views: the
 * first bytes are checked in JS (data rarely starts with 16 zero bytes, so
 * most data granules cost no native call), then a native compare against
 * the zero buffer.
 */
export function isZeroRange(buf: Buffer, start: number, end: number): boolean {
  const probe = Math.min(end, start + 16);
  for (let i = start; i < probe; i++) if (buf[i] !== 0) return false;
  const z = zeroBuffer();
  for (let off = probe; off < end; off += z.length) {
    const n = Math.min(z.length, end - off);
    if (buf.compare(z, 0, n, off, off + n) !== 0) return false;
  }
  return true;
}
