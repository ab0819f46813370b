/**
 * `map`: the guest ranges of an image with their allocation, merged the way
 * `qemu-img map` merges them, and the same JSON entries
 * ({start, length, depth, present, zero, data[, offset]}).
 */
import type { BlockDevice, Extent } from '../block/device.js';
import { canMerge } from '../block/generic.js';

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  /** Not in qemu's JSON: the host file, for the human output. */
  file?: string;
}

/** Guest bytes asked of blockStatus per call: bounds the extents held at once. */
const MAP_CHUNK = 2 ** 32;

/** Yield merged extents over [offset, offset + length) of the device. */
export async function* extents(dev: BlockDevice, offset = 0, length = dev.size - offset): AsyncGenerator<Extent> {
  let pending: Extent | null = null;
  let pos = offset;
  const end = offset + length;
  while (pos < end) {
    const ext = await dev.blockStatus(pos, Math.min(MAP_CHUNK, end - pos));
    for (const e of ext) {
      if (pending !== null && canMerge(pending, e)) pending.length += e.length;
      else {
        if (pending !== null) yield pending;
        pending = { ...e };
      }
    }
    const last = ext[ext.length - 1] as Extent;
    pos = last.offset + last.length;
  }
  if (pending !== null) yield pending;
}

/**
 * All extents of [offset, offset + length), asking block status until the
 * range is covered (a driver may answer only a prefix).
 */
export async function extentsOf(dev: BlockDevice, offset: number, length: number): Promise<Extent[]> {
  const out: Extent[] = [];
  let pos = offset;
  while (pos < offset + length) {
    const ext = await dev.blockStatus(pos, offset + length - pos);
    out.push(...ext);
    const last = ext[ext.length - 1] as Extent;
    pos = last.offset + last.length;
  }
  return out;
}

export function toMapEntry(e: Extent): MapEntry {
  const m: MapEntry = {
    start: e.offset,
    length: e.length,
    depth: e.depth ?? 0,
    present: e.allocated ?? !e.hole,
    zero: e.zero,
    data: !e.hole,
  };
  if (e.hostOffset !== undefined) m.offset = e.hostOffset;
  if (e.file !== undefined) m.file = e.file;
  return m;
}

export async function* mapImage(dev: BlockDevice): AsyncGenerator<MapEntry> {
  for await (const e of extents(dev)) yield toMapEntry(e);
}

/** One line of `qemu-img map --output=json` (its exact spacing). */
export function mapEntryJson(m: MapEntry): string {
  const off = m.offset !== undefined ? `, "offset": ${m.offset}` : '';
  return `{ "start": ${m.start}, "length": ${m.length}, "depth": ${m.depth}, "present": ${m.present}, "zero": ${m.zero}, "data": ${m.data}${off}}`;
}

/** One line of `qemu-img map`'s human output, or null for ranges it does not list. */
export function mapEntryHuman(m: MapEntry, fileName: (path: string) => string): string | null {
  if (!m.data || m.offset === undefined) return null;
  const hx = (n: number): string => (n === 0 ? '0' : '0x' + n.toString(16));
  return `${hx(m.start).padEnd(16)}${hx(m.length).padEnd(16)}${hx(m.offset).padEnd(16)}${fileName(m.file ?? '')}`;
}
