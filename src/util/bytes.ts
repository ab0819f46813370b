/** Checked reads of on-disk integers. u64 fields are narrowed to safe numbers or rejected. */
import { BlockError, type ErrorContext } from '../block/errors.js';

export function dataView(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

/** Big-endian u64 as bigint. */
export function u64be(buf: Uint8Array, off: number): bigint {
  return dataView(buf).getBigUint64(off, false);
}

/** Narrow an on-disk u64 to a safe integer, or throw corrupt-image naming the field. */
export function safeNumber(v: bigint, ctx: ErrorContext & { path: string; field: string }): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new BlockError('corrupt-image', `${ctx.path}: ${ctx.structure ?? 'header'} field ${ctx.field} = ${v} is too large`, ctx);
  }
  return Number(v);
}

export function hex(n: number | bigint, width = 0): string {
  return '0x' + n.toString(16).padStart(width, '0');
}

/** A NUL-padded or plain byte string as UTF-8 text. */
export function cString(buf: Uint8Array): string {
  const end = buf.indexOf(0);
  return Buffer.from(end < 0 ? buf : buf.subarray(0, end)).toString('utf8');
}
