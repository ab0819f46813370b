/**
 * The low-level view of a VMDK for `rblock inspect`: the descriptor text and
 * where it lives, every extent with its descriptor line, and for sparse
 * extents the header fields with their offsets (§2), the footer (§4.3), the
 * grain directory in use (§3, §3.1), the markers of a stream (§4.1), and one
 * grain table decoded entry by entry (`--gt N`).
 */
import { BlockError } from '../../block/errors.js';
import * as C from './constants.js';
import type { VmdkExtent } from './extent.js';
import { flagNames, type HeaderField } from './header.js';
import type { VmdkLayer } from './image.js';
import { SparseExtent } from './sparse.js';
import { decodeMarker, walkMarkers, type Marker } from './stream.js';

export interface VmdkInspectOptions {
  /** Decode grain table N: numbered across the sparse extents in disk order. */
  gt?: number;
  /** Most stream markers to list per extent (default 1000). */
  markers?: number;
}

export interface InspectField {
  name: string;
  offset: number;
  size: number;
  value: number | string;
}

export interface MarkerReport {
  offset: number;
  kind: Marker['kind'];
  /** Grain markers: the grain's first sector; metadata markers: sectors that follow. */
  val: number | string;
  size: number;
}

export interface SparseReport {
  header: InspectField[];
  flags: string[];
  footer: { offset: number; fields: InspectField[]; flags: string[] } | null;
  grainBytes: number;
  gtesPerGt: number;
  gtCoverage: number;
  compressed: boolean;
  markers: boolean;
  zeroedGrains: boolean;
  grainDirectory: {
    using: 'primary' | 'redundant';
    offset: number;
    entries: number;
    allocated: number;
    /** Byte offset of the redundant GD, when the header has one (flag bit 1). */
    redundantOffset?: number;
    /** Why the primary was not used. */
    damage?: string;
    /** Allocated entries: GT sector (listed up to 4096). */
    list: { index: number; sector: number }[];
    truncated: boolean;
  };
  /** Stream markers from the first grain on (streamOptimized). */
  streamMarkers?: { list: MarkerReport[]; truncated: boolean };
}

export interface ExtentReport {
  index: number;
  access: string;
  type: string;
  /** The file as the descriptor names it, and as opened. */
  name: string | null;
  path: string | null;
  guestOffset: number;
  length: number;
  descriptorLine: number | null;
  /** FLAT/VMFS: byte offset of the extent in its file. */
  flatOffset?: number;
  sparse?: SparseReport;
}

export interface GtEntryReport {
  index: number;
  raw: string;
  guestOffset: number;
  kind: 'zero' | 'data' | 'compressed';
  hostOffset: number;
  marker?: { lba: number | string; size: number };
}

export interface VmdkInspectReport {
  file: string;
  format: 'vmdk';
  createType: string;
  size: number;
  cid: string;
  parentCid: string;
  parentFileNameHint: string | null;
  descriptor: { source: 'embedded' | 'file'; offset: number; reserved: number; text: string };
  extents: ExtentReport[];
  grainTable?: {
    index: number;
    extent: number;
    /** Index in that extent's grain directory. */
    gdIndex: number;
    offset: number;
    guestStart: number;
    entries: GtEntryReport[];
  };
}

const hex8 = (n: number): string => (n >>> 0).toString(16).padStart(8, '0');
const num = (v: number | bigint | string): number | string =>
  typeof v === 'bigint' ? (v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : '0x' + v.toString(16)) : v;
const fields = (f: HeaderField[]): InspectField[] => f.map((x) => ({ name: x.name, offset: x.offset, size: x.size, value: num(x.value) }));

const GD_LIST_MAX = 4096;

async function sparseReport(x: SparseExtent, markerLimit: number): Promise<SparseReport> {
  const geo = x.geometry;
  const list: { index: number; sector: number }[] = [];
  let allocated = 0;
  for (let i = 0; i < x.gd.entries.length; i++) {
    const e = x.gd.entries[i] as number;
    if (e === 0) continue;
    allocated++;
    if (list.length < GD_LIST_MAX) list.push({ index: i, sector: e });
  }
  const r: SparseReport = {
    header: fields(x.header.fields),
    flags: flagNames(x.header.flags),
    footer:
      x.footer === null
        ? null
        : { offset: x.footer.offset, fields: fields(x.footer.header.fields), flags: flagNames(x.footer.header.flags) },
    grainBytes: geo.grainBytes,
    gtesPerGt: geo.gtes,
    gtCoverage: geo.gtCoverage,
    compressed: geo.compressed,
    markers: geo.markers,
    zeroedGrains: geo.zeroedGrains,
    grainDirectory: {
      using: x.gd.which,
      offset: x.gd.offset,
      entries: x.gd.entries.length,
      allocated,
      list,
      truncated: allocated > list.length,
    },
  };
  const eff = x.effective;
  if ((eff.flags & C.FLAG_RGD) !== 0 && eff.rgdOffset !== 0n) r.grainDirectory.redundantOffset = Number(eff.rgdOffset) * C.SECTOR;
  if (x.gdDamage !== null) r.grainDirectory.damage = x.gdDamage;
  if (geo.markers) {
    const start = Number(x.effective.overHead) * C.SECTOR;
    const w = await walkMarkers(x.file, start, markerLimit);
    r.streamMarkers = {
      list: w.markers.map((m) => ({ offset: m.offset, kind: m.kind, val: num(m.val), size: m.size })),
      truncated: w.truncated,
    };
  }
  return r;
}

async function gtReport(layer: VmdkLayer, n: number): Promise<NonNullable<VmdkInspectReport['grainTable']>> {
  const sparse = layer.extents.filter((x): x is SparseExtent => x instanceof SparseExtent);
  if (sparse.length === 0) {
    throw new BlockError('invalid-argument', `${layer.path}: --gt is for sparse extents; this ${layer.createType} disk has none`, {
      path: layer.path,
    });
  }
  const total = sparse.reduce((s, x) => s + x.gd.entries.length, 0);
  if (!Number.isSafeInteger(n) || n < 0 || n >= total) {
    throw new BlockError(
      'out-of-bounds',
      `${layer.path}: grain table ${n} is out of range (the disk has ${total} grain directory entries)`,
      {
        path: layer.path,
        structure: 'grain directory',
      },
    );
  }
  let i = n;
  let x = sparse[0] as SparseExtent;
  for (const s of sparse) {
    x = s;
    if (i < s.gd.entries.length) break;
    i -= s.gd.entries.length;
  }
  const geo = x.geometry;
  const sector = x.gd.entries[i] as number;
  const guestStart = x.start + i * geo.gtCoverage;
  const entries: GtEntryReport[] = [];
  if (sector !== 0) {
    const gt = await x.gt(i);
    const one = new Uint8Array(C.SECTOR);
    for (let j = 0; j < gt.length; j++) {
      const e = gt[j] as number;
      if (e === 0) continue;
      const row: GtEntryReport = {
        index: j,
        raw: '0x' + hex8(e),
        guestOffset: guestStart + j * geo.grainBytes,
        kind: e === C.GTE_ZEROED && geo.zeroedGrains ? 'zero' : geo.compressed ? 'compressed' : 'data',
        hostOffset: e * C.SECTOR,
      };
      if (row.kind === 'compressed' && geo.markers && row.hostOffset + C.SECTOR <= x.file.size) {
        await x.file.readAt(one, row.hostOffset);
        const m = decodeMarker(one, row.hostOffset);
        row.marker = { lba: num(m.val), size: m.size };
      }
      entries.push(row);
    }
  }
  return { index: n, extent: x.index, gdIndex: i, offset: sector * C.SECTOR, guestStart, entries };
}

function extentReport(layer: VmdkLayer, x: VmdkExtent): ExtentReport {
  const line = x.line;
  const r: ExtentReport = {
    index: x.index,
    access: line?.access ?? 'RW',
    type: line?.type ?? 'SPARSE',
    name: line?.file ?? (x.file !== null ? layer.path : null),
    path: x.file?.path ?? null,
    guestOffset: x.start,
    length: x.length,
    descriptorLine: line?.line ?? null,
  };
  if (x.kind === 'flat') r.flatOffset = (line?.offset ?? 0) * C.SECTOR;
  return r;
}

export async function inspectVmdk(layer: VmdkLayer, opts: VmdkInspectOptions = {}): Promise<VmdkInspectReport> {
  const src = layer.descriptorSource;
  const report: VmdkInspectReport = {
    file: layer.path,
    format: 'vmdk',
    createType: layer.createType,
    size: layer.size,
    cid: hex8(layer.cid),
    parentCid: hex8(layer.parentCid),
    parentFileNameHint: layer.descriptor.parentFileNameHint,
    descriptor:
      src.kind === 'embedded'
        ? { source: 'embedded', offset: src.offset, reserved: src.reserved, text: layer.descriptor.text }
        : { source: 'file', offset: 0, reserved: src.size, text: layer.descriptor.text },
    extents: [],
  };
  for (const x of layer.extents) {
    const r = extentReport(layer, x);
    if (x instanceof SparseExtent) r.sparse = await sparseReport(x, opts.markers ?? 1000);
    report.extents.push(r);
  }
  if (opts.gt !== undefined) report.grainTable = await gtReport(layer, opts.gt);
  return report;
}
