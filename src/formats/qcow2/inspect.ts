/**
 * The low-level view of a qcow2 image for `rblock inspect`: every header field
 * with its offset, the header extensions, L1 entries, one decoded L2 table,
 * the refcount table and a summary of each refcount block.
 */
import { BlockError } from '../../block/errors.js';
import { FEATURE_NAMES } from './constants.js';
import { readBitmaps, type Qcow2Bitmap } from './bitmap.js';
import { decodeL2, type L1Entry, type L2Entry } from './l1l2.js';
import type { Qcow2Layer } from './image.js';
import { Refcounts } from './refcount.js';
import { readSnapshots, type Qcow2Snapshot } from './snapshot.js';

export interface InspectOptions {
  l1?: boolean;
  /** Decode the L2 table named by this L1 index. */
  l2?: number;
  refcounts?: boolean;
}

export interface InspectReport {
  file: string;
  format: 'qcow2';
  header: { name: string; offset: number; size: number; value: string | number }[];
  features: { incompatible: string[]; compatible: string[]; autoclear: string[] };
  extensions: { type: string; name: string; offset: number; length: number; value?: unknown }[];
  backingFile: { offset: number; length: number; name: string } | null;
  snapshots: Qcow2Snapshot[];
  bitmaps: Qcow2Bitmap[];
  l1?: { offset: number; entries: number; allocated: number; list: (Omit<L1Entry, 'raw'> & { raw: string })[] };
  l2?: {
    l1Index: number;
    offset: number;
    guestStart: number;
    entries: (Omit<L2Entry, 'raw' | 'bitmap'> & { raw: string; bitmap?: string; guestOffset: number })[];
  };
  refcounts?: {
    tableOffset: number;
    tableClusters: number;
    refcountBits: number;
    entriesPerBlock: number;
    blocks: { index: number; offset: number; raw: string; firstCluster: number; used: number; maxRefcount: number }[];
  };
}

function bits(mask: bigint, type: keyof typeof FEATURE_NAMES, table: { type: string; bit: number; name: string }[]): string[] {
  const out: string[] = [];
  for (let b = 0; b < 64; b++) {
    if ((mask & (1n << BigInt(b))) === 0n) continue;
    const name = FEATURE_NAMES[type][b] ?? table.find((f) => f.type === type && f.bit === b)?.name ?? 'unknown';
    out.push(`bit ${b}: ${name}`);
  }
  return out;
}

const hex16 = (v: bigint): string => '0x' + v.toString(16).padStart(16, '0');

export async function inspectQcow2(layer: Qcow2Layer, opts: InspectOptions): Promise<InspectReport> {
  const h = layer.header;
  const file = layer.file;
  const report: InspectReport = {
    file: layer.path,
    format: 'qcow2',
    header: h.fields.map((f) => ({
      name: f.name,
      offset: f.offset,
      size: f.size,
      value:
        typeof f.value === 'bigint'
          ? f.value <= BigInt(Number.MAX_SAFE_INTEGER)
            ? Number(f.value)
            : '0x' + f.value.toString(16)
          : f.value,
    })),
    features: {
      incompatible: bits(h.incompatible, 'incompatible', h.featureNames),
      compatible: bits(h.compatible, 'compatible', h.featureNames),
      autoclear: bits(h.autoclear, 'autoclear', h.featureNames),
    },
    extensions: h.extensions.map((e) => {
      let value: unknown;
      if (e.name === 'backing file format' || e.name === 'external data file name') value = Buffer.from(e.data).toString('utf8');
      else if (e.name === 'feature name table') value = h.featureNames;
      else if (e.name === 'bitmaps') value = h.bitmaps;
      else if (e.name === 'full disk encryption header pointer') value = h.crypto;
      return { type: '0x' + e.type.toString(16).padStart(8, '0'), name: e.name, offset: e.offset, length: e.length, value };
    }),
    backingFile: h.backingFile === null ? null : { offset: h.backingFileOffset, length: h.backingFileSize, name: h.backingFile },
    snapshots: await readSnapshots(file, h),
    bitmaps: await readBitmaps(file, h),
  };
  if (opts.l1) {
    const list = [];
    let allocated = 0;
    for (let i = 0; i < h.l1Size; i++) {
      const e = layer.l1.entry(i);
      if (e.raw === 0n) continue;
      allocated++;
      list.push({ ...e, raw: hex16(e.raw) });
    }
    report.l1 = { offset: h.l1TableOffset, entries: h.l1Size, allocated, list };
  }
  if (opts.l2 !== undefined) {
    const i = opts.l2;
    if (!Number.isSafeInteger(i) || i < 0 || i >= h.l1Size) {
      throw new BlockError('out-of-bounds', `${layer.path}: L1 index ${i} is out of range (the L1 table has ${h.l1Size} entries)`, {
        path: layer.path,
        structure: 'L1 table',
      });
    }
    const l1e = layer.l1.entry(i);
    const guestStart = i * h.l2Entries * h.clusterSize;
    const entries: NonNullable<InspectReport['l2']>['entries'] = [];
    if (l1e.l2Offset !== 0) {
      const table = await layer.l2Table(l1e.l2Offset, i);
      for (let j = 0; j < h.l2Entries; j++) {
        const e = decodeL2(table, j, h);
        if (e.raw === 0n && (e.bitmap ?? 0n) === 0n) continue;
        const { raw, bitmap, ...rest } = e;
        const row: NonNullable<InspectReport['l2']>['entries'][number] = {
          ...rest,
          raw: hex16(raw),
          guestOffset: guestStart + j * h.clusterSize,
        };
        if (bitmap !== undefined) row.bitmap = hex16(bitmap);
        entries.push(row);
      }
    }
    report.l2 = { l1Index: i, offset: l1e.l2Offset, guestStart, entries };
  }
  if (opts.refcounts) {
    const rc = await Refcounts.load(file, h);
    const blocks = [];
    for (const e of rc.table) {
      if (e.blockOffset === 0) continue;
      const s = await rc.summary(e);
      blocks.push({ index: e.index, offset: e.blockOffset, raw: hex16(e.raw), firstCluster: e.index * rc.entriesPerBlock, ...s });
    }
    report.refcounts = {
      tableOffset: h.refcountTableOffset,
      tableClusters: h.refcountTableClusters,
      refcountBits: rc.bits,
      entriesPerBlock: rc.entriesPerBlock,
      blocks,
    };
  }
  return report;
}
