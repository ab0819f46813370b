/**
 * L1 and L2 tables (spec §4): loading the L1 table, decoding L1 and L2
 * entries (standard, compressed, extended with subclusters), and turning a
 * guest range into this layer's runs.
 */
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import { dataView } from '../../util/bytes.js';
import type { Qcow2Header } from './header.js';

/** Bits 9..55 of an L1/L2 entry: the high word keeps bits 32..55, the low word bits 9..31. */
const HI_OFFSET_MASK = 0x00ff_ffff;
const LO_OFFSET_MASK = 0xffff_fe00;
const L1_HI_RESERVED = 0x7f00_0000; // bits 56..62
const L1_LO_RESERVED = 0x0000_01ff; // bits 0..8
const L2_HI_RESERVED = 0x3f00_0000; // bits 56..61
const L2_LO_RESERVED = 0x0000_01fe; // bits 1..8
const HI_COPIED = 0x8000_0000;
const HI_COMPRESSED = 0x4000_0000;

export type ClusterKind = 'unallocated' | 'zero' | 'zero-alloc' | 'normal' | 'compressed';
export type SubclusterState = 'data' | 'zero' | 'unallocated';

export interface L1Entry {
  index: number;
  raw: bigint;
  l2Offset: number;
  copied: boolean;
  reserved: boolean;
}

export interface L2Entry {
  index: number;
  raw: bigint;
  /** Extended L2 only: the subcluster bitmap word. */
  bitmap?: bigint;
  kind: ClusterKind;
  copied: boolean;
  /** Standard clusters: the host cluster offset (0 if none). */
  hostOffset: number;
  /** Compressed clusters: byte offset and the number of 512-byte sectors that hold the data. */
  compressedOffset?: number;
  compressedSectors?: number;
  /** Reserved bits set (corrupt). */
  reserved: boolean;
  /** Extended L2 only: the state of each of the 32 subclusters. */
  subclusters?: SubclusterState[];
}

function offsetOf(hi: number, lo: number): number {
  return (hi & HI_OFFSET_MASK) * 2 ** 32 + ((lo & LO_OFFSET_MASK) >>> 0);
}

export function decodeL1(raw: bigint, index: number): L1Entry {
  const hi = Number(raw >> 32n) >>> 0;
  const lo = Number(raw & 0xffff_ffffn) >>> 0;
  return {
    index,
    raw,
    l2Offset: offsetOf(hi, lo),
    copied: (hi & HI_COPIED) !== 0,
    reserved: (hi & L1_HI_RESERVED) !== 0 || (lo & L1_LO_RESERVED) !== 0,
  };
}

/** The L1 table, held whole (QEMU bounds it at 32 MiB; the header check enforces that). */
export class L1Table {
  private constructor(
    public entries: Float64Array,
    public raw: Uint8Array,
  ) {}

  static async load(file: HostFile, h: Qcow2Header): Promise<L1Table> {
    const raw = new Uint8Array(h.l1Size * 8);
    if (h.l1Size > 0) await file.readExact(raw, h.l1TableOffset, 'L1 table');
    const dv = dataView(raw);
    const entries = new Float64Array(h.l1Size);
    for (let i = 0; i < h.l1Size; i++) {
      const hi = dv.getUint32(i * 8);
      const lo = dv.getUint32(i * 8 + 4);
      entries[i] = offsetOf(hi, lo);
    }
    return new L1Table(entries, raw);
  }

  /** Swap in a new (bigger) table after L1 growth; entries are re-decoded. */
  replace(raw: Uint8Array): void {
    const dv = dataView(raw);
    const entries = new Float64Array(raw.length / 8);
    for (let i = 0; i < entries.length; i++) entries[i] = offsetOf(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4));
    this.entries = entries;
    this.raw = raw;
  }

  entry(i: number): L1Entry {
    return decodeL1(dataView(this.raw).getBigUint64(i * 8), i);
  }
}

/** Decode entry `index` of an L2 table held in `table`. */
export function decodeL2(table: Uint8Array, index: number, h: Qcow2Header): L2Entry {
  const dv = dataView(table);
  const base = index * h.l2EntrySize;
  const hi = dv.getUint32(base);
  const lo = dv.getUint32(base + 4);
  const raw = dv.getBigUint64(base);
  const copied = (hi & HI_COPIED) !== 0;
  if ((hi & HI_COMPRESSED) !== 0) {
    const x = BigInt(62 - (h.clusterBits - 8));
    const compressedOffset = Number(raw & ((1n << x) - 1n));
    const compressedSectors = Number((raw >> x) & ((1n << (62n - x)) - 1n)) + 1;
    const e: L2Entry = {
      index,
      raw,
      kind: 'compressed',
      copied,
      hostOffset: 0,
      compressedOffset,
      compressedSectors,
      reserved: copied || compressedOffset >= 2 ** 56,
    };
    if (h.extendedL2) e.bitmap = dv.getBigUint64(base + 8);
    return e;
  }
  const hostOffset = offsetOf(hi, lo);
  const zeroFlag = (lo & 1) !== 0;
  let reserved = (hi & L2_HI_RESERVED) !== 0 || (lo & L2_LO_RESERVED) !== 0;
  let kind: ClusterKind;
  if (zeroFlag && !h.extendedL2) kind = hostOffset !== 0 ? 'zero-alloc' : 'zero';
  else kind = hostOffset !== 0 || (copied && h.dataFile !== null) ? 'normal' : 'unallocated';
  if (zeroFlag && h.extendedL2) reserved = true;
  const e: L2Entry = { index, raw, kind, copied, hostOffset, reserved };
  if (h.extendedL2) {
    const bitmap = dv.getBigUint64(base + 8);
    e.bitmap = bitmap;
    const alloc = Number(bitmap & 0xffff_ffffn);
    const zero = Number(bitmap >> 32n);
    if ((alloc & zero) !== 0) e.reserved = true;
    e.subclusters = [];
    for (let i = 0; i < 32; i++) {
      const bit = 2 ** i;
      const isAlloc = Math.floor(alloc / bit) % 2 === 1;
      const isZero = Math.floor(zero / bit) % 2 === 1;
      e.subclusters.push(isZero ? 'zero' : isAlloc ? 'data' : 'unallocated');
    }
  }
  return e;
}

export function corruptEntry(path: string, structure: string, message: string, offset: number, field?: string): BlockError {
  const ctx = field === undefined ? { path, structure, offset } : { path, structure, offset, field };
  return new BlockError('corrupt-image', `${path}: ${structure} ${message}`, ctx);
}
