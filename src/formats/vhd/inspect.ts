/**
 * The low-level view of a VHD for `rblock inspect`: footer (and the copy at
 * offset 0) and dynamic disk header field by field with their file offsets,
 * the parent locators, the BAT (runs of unallocated entries folded) and, on
 * request, one block's sector bitmap.
 */
import { BlockError } from '../../block/errors.js';
import { BAT_UNUSED, SECTOR } from './constants.js';
import { bitRuns, sectorPresent, type BitRun } from './bitmap.js';
import { footerValid, type VhdFooter } from './footer.js';
import type { VhdField } from './fields.js';
import type { VhdLayer } from './image.js';

export interface VhdInspectOptions {
  /** Decode the sector bitmap of this block. */
  block?: number;
}

export interface InspectField {
  name: string;
  offset: number;
  rel: number;
  size: number;
  value: number | string;
  meaning?: string;
}

export interface InspectFooter {
  offset: number;
  source: string;
  checksumOk: boolean;
  computedChecksum: number;
  fields: InspectField[];
}

export type InspectBatRow =
  | { block: number; raw: number; bitmap: [number, number]; data: [number, number] }
  | { block: number; last: number; raw: number; count: number };

export interface VhdInspectReport {
  file: string;
  format: 'vpc';
  diskType: string;
  virtualSize: number;
  sizeFrom: string;
  sizeReason: string;
  footer: InspectFooter;
  /** The copy at offset 0 when it differs from (or stands in for) the trailing footer. */
  footerCopy?: InspectFooter;
  notes: string[];
  header?: { offset: number; checksumOk: boolean; fields: InspectField[]; bitmapSize: number; sectorsPerBlock: number };
  locators?: {
    index: number;
    offset: number;
    platform: string;
    dataSpace: number;
    dataLength: number;
    dataOffset: number;
    text?: string;
    problem?: string;
  }[];
  parent?: { name: string; path: string; from: string }[];
  bat?: { offset: number; entries: number; allocated: number; blockSize: number; bitmapSize: number; rows: InspectBatRow[] };
  block?: {
    index: number;
    raw: number;
    guestOffset: number;
    bitmapOffset?: number;
    dataOffset?: number;
    sectors: number;
    present?: number;
    runs?: BitRun[];
    /** One character per sector, 64 per row: '#' stored in this file, '.' not. */
    rows?: string[];
  };
}

function fields(list: VhdField[]): InspectField[] {
  return list.map((f) => {
    const row: InspectField = {
      name: f.name,
      offset: f.offset,
      rel: f.rel,
      size: f.size,
      value:
        typeof f.value === 'bigint'
          ? f.value <= BigInt(Number.MAX_SAFE_INTEGER)
            ? Number(f.value)
            : '0x' + f.value.toString(16)
          : f.value,
    };
    if (f.meaning !== undefined) row.meaning = f.meaning;
    return row;
  });
}

function footerReport(f: VhdFooter): InspectFooter {
  return { offset: f.offset, source: f.source, checksumOk: footerValid(f), computedChecksum: f.computedChecksum, fields: fields(f.fields) };
}

export async function inspectVhd(layer: VhdLayer, opts: VhdInspectOptions = {}): Promise<VhdInspectReport> {
  const loc = layer.located;
  const report: VhdInspectReport = {
    file: layer.path,
    format: 'vpc',
    diskType: layer.kind,
    virtualSize: layer.size,
    sizeFrom: layer.sizeDecision.source,
    sizeReason: layer.sizeDecision.reason,
    footer: footerReport(loc.footer),
    notes: [...loc.notes],
  };
  if (loc.copy !== null && loc.copy !== loc.footer && loc.notes.length > 0) report.footerCopy = footerReport(loc.copy);
  const sparse = layer.sparse;
  if (sparse === null) {
    if (opts.block !== undefined) {
      throw new BlockError(
        'invalid-argument',
        `${layer.path}: a fixed VHD has no blocks or sector bitmaps (--block is for dynamic and differencing disks)`,
        {
          path: layer.path,
          structure: 'BAT',
        },
      );
    }
    return report;
  }
  const h = sparse.header;
  report.header = {
    offset: h.offset,
    checksumOk: h.checksum === h.computedChecksum,
    fields: fields(h.fields),
    bitmapSize: h.bitmapSize,
    sectorsPerBlock: h.sectorsPerBlock,
  };
  if (h.locators.length > 0) {
    const decoded = layer.parent?.decoded;
    report.locators = h.locators.map((e) => {
      const d = decoded?.find((x) => x.entry.index === e.index);
      const row: NonNullable<VhdInspectReport['locators']>[number] = {
        index: e.index,
        offset: e.offset,
        platform: e.platform,
        dataSpace: e.dataSpace,
        dataLength: e.dataLength,
        dataOffset: e.dataOffset,
      };
      if (d !== undefined && d.text !== null) row.text = d.text;
      if (d?.problem !== undefined) row.problem = d.problem;
      return row;
    });
  }
  if (layer.parent !== null) report.parent = layer.parent.candidates.map((c) => ({ name: c.name, path: c.path, from: c.from }));

  const bat = sparse.bat;
  const rows: InspectBatRow[] = [];
  for (let i = 0; i < h.maxTableEntries; i++) {
    const raw = await bat.raw(i);
    if (raw === BAT_UNUSED) {
      const last = rows[rows.length - 1];
      if (last !== undefined && 'count' in last && last.raw === raw && last.last === i - 1) {
        last.last = i;
        last.count++;
      } else rows.push({ block: i, last: i, raw, count: 1 });
      continue;
    }
    const b = raw * SECTOR;
    rows.push({ block: i, raw, bitmap: [b, b + h.bitmapSize], data: [b + h.bitmapSize, b + h.bitmapSize + h.blockSize] });
  }
  report.bat = {
    offset: h.tableOffset,
    entries: h.maxTableEntries,
    allocated: bat.allocated,
    blockSize: h.blockSize,
    bitmapSize: h.bitmapSize,
    rows,
  };

  if (opts.block !== undefined) {
    const i = opts.block;
    if (!Number.isSafeInteger(i) || i < 0 || i >= h.maxTableEntries) {
      throw new BlockError('out-of-bounds', `${layer.path}: block ${i} is out of range (the BAT has ${h.maxTableEntries} entries)`, {
        path: layer.path,
        structure: 'BAT',
      });
    }
    const e = await bat.entry(i);
    const sectors = h.sectorsPerBlock;
    const blk: NonNullable<VhdInspectReport['block']> = { index: i, raw: e.raw, guestOffset: i * h.blockSize, sectors };
    if (e.bitmapOffset !== undefined) {
      const bm = await sparse.bitmaps.get(e.bitmapOffset);
      blk.bitmapOffset = e.bitmapOffset;
      blk.dataOffset = e.dataOffset as number;
      blk.runs = bitRuns(bm, 0, sectors);
      blk.present = blk.runs.reduce((n, r) => n + (r.present ? r.count : 0), 0);
      blk.rows = [];
      for (let s = 0; s < sectors; s += 64) {
        let row = '';
        for (let j = s; j < Math.min(s + 64, sectors); j++) row += sectorPresent(bm, j) ? '#' : '.';
        blk.rows.push(row);
      }
    }
    report.block = blk;
  }
  return report;
}
