/**
 * Decoding a fixed-layout VHD structure (footer, dynamic header, locator
 * entry) field by field, remembering where each field lives in the file so
 * that `rblock inspect` can show it.
 */
import { dataView } from '../../util/bytes.js';

export interface VhdField {
  name: string;
  /** Absolute offset in the file. */
  offset: number;
  /** Offset inside the structure. */
  rel: number;
  size: number;
  value: number | bigint | string;
  /** What the value means, for people (a date, a type name, a checksum verdict). */
  meaning?: string;
}

/** Reads big-endian fields of `buf` (found at `base` in the file) and records them. */
export class FieldReader {
  readonly fields: VhdField[] = [];
  private readonly dv: DataView;

  constructor(
    readonly buf: Uint8Array,
    readonly base: number,
  ) {
    this.dv = dataView(buf);
  }

  private push<T extends VhdField['value']>(name: string, rel: number, size: number, value: T): T {
    this.fields.push({ name, offset: this.base + rel, rel, size, value });
    return value;
  }

  /** Attach a meaning to the field called `name`. */
  explain(name: string, meaning: string): void {
    const f = this.fields.find((x) => x.name === name);
    if (f !== undefined) f.meaning = meaning;
  }

  u8(name: string, rel: number): number {
    return this.push(name, rel, 1, this.dv.getUint8(rel));
  }

  u16(name: string, rel: number): number {
    return this.push(name, rel, 2, this.dv.getUint16(rel));
  }

  u32(name: string, rel: number): number {
    return this.push(name, rel, 4, this.dv.getUint32(rel));
  }

  u64(name: string, rel: number): bigint {
    return this.push(name, rel, 8, this.dv.getBigUint64(rel));
  }

  /** Raw bytes shown as text (cookies, four-character codes); non-printable bytes escaped. */
  ascii(name: string, rel: number, size: number): string {
    let s = '';
    for (const c of this.buf.subarray(rel, rel + size))
      s += c >= 0x20 && c < 0x7f ? String.fromCharCode(c) : `\\x${c.toString(16).padStart(2, '0')}`;
    return this.push(name, rel, size, s);
  }

  /** Raw bytes, recorded as a display string produced by `show`. */
  bytes(name: string, rel: number, size: number, show: (b: Uint8Array) => string): Uint8Array {
    const b = this.buf.slice(rel, rel + size);
    this.push(name, rel, size, show(b));
    return b;
  }
}

/** The first `size` bytes of `buf` as a 4-character code (raw, for comparisons). */
export function rawCode(buf: Uint8Array, rel: number, size = 4): string {
  return String.fromCharCode(...buf.subarray(rel, rel + size));
}
