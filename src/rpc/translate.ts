/**
 * `translate`: where a guest byte lives. Walks the chain from the top layer
 * down until a layer answers for the byte (data, zero or compressed), and for
 * each layer visited shows the path through its tables:
 *   qcow2: L1 index and entry, L2 table offset, L2 index, raw L2 entry and
 *          flags, subcluster index (extended L2), host cluster and its refcount;
 *   VHD:   BAT index and entry, sector bitmap offset, sector, bit, present;
 *   VMDK:  extent, grain directory index and entry, grain table index and entry.
 */
import type { BlockDevice } from '../block/device.js';
import { BlockError } from '../block/errors.js';
import { layerOf } from '../formats/chain.js';
import type { Layer } from '../formats/layer.js';
import { Qcow2Layer } from '../formats/qcow2/image.js';
import { decodeL2 } from '../formats/qcow2/l1l2.js';
import { Refcounts } from '../formats/qcow2/refcount.js';
import { sectorPresent } from '../formats/vhd/bitmap.js';
import { BAT_UNUSED, SECTOR } from '../formats/vhd/constants.js';
import { VhdLayer } from '../formats/vhd/image.js';
import { VmdkLayer } from '../formats/vmdk/image.js';
import { SparseExtent } from '../formats/vmdk/sparse.js';

export type ByteKind = 'data' | 'zero' | 'unallocated' | 'compressed';

export interface LayerStep {
  depth: number;
  format: string;
  file: string;
  kind: ByteKind;
  hostFile: string | null;
  hostOffset: number | null;
  /** The format's tables on the way (absent for raw). */
  tables?: Record<string, unknown>;
}

export interface Translation {
  guestOffset: number;
  /** The layer that answers (the deepest visited); its kind says how the byte reads. */
  depth: number;
  format: string;
  file: string;
  kind: ByteKind;
  hostFile: string | null;
  hostOffset: number | null;
  /** Every layer visited, top first. */
  layers: LayerStep[];
}

const hex16 = (v: bigint): string => '0x' + v.toString(16).padStart(16, '0');

async function qcow2Tables(layer: Qcow2Layer, offset: number): Promise<Record<string, unknown>> {
  const h = layer.header;
  const cs = h.clusterSize;
  const l1Index = Math.floor(offset / (cs * h.l2Entries));
  const l2Index = Math.floor(offset / cs) % h.l2Entries;
  const t: Record<string, unknown> = { clusterSize: cs, guestCluster: Math.floor(offset / cs), l1Index, l1TableOffset: h.l1TableOffset };
  if (l1Index >= h.l1Size) {
    t['l1Entry'] = null;
    t['note'] = `L1 index ${l1Index} is past the L1 table (${h.l1Size} entries)`;
    return t;
  }
  const l1 = layer.l1.entry(l1Index);
  t['l1EntryOffset'] = h.l1TableOffset + l1Index * 8;
  t['l1Entry'] = hex16(l1.raw);
  t['l2TableOffset'] = l1.l2Offset;
  t['l1Copied'] = l1.copied;
  if (l1.l2Offset === 0) return t;
  const table = await layer.l2Table(l1.l2Offset, l1Index);
  const e = decodeL2(table, l2Index, h);
  t['l2Index'] = l2Index;
  t['l2EntryOffset'] = l1.l2Offset + l2Index * h.l2EntrySize;
  t['l2Entry'] = hex16(e.raw);
  if (e.bitmap !== undefined) t['l2Bitmap'] = hex16(e.bitmap);
  t['l2Kind'] = e.kind;
  t['flags'] = { copied: e.copied, compressed: e.kind === 'compressed', zero: (e.raw & 1n) === 1n && e.kind !== 'compressed' };
  if (e.kind === 'compressed') {
    t['compressedOffset'] = e.compressedOffset;
    t['compressedSectors'] = e.compressedSectors;
  }
  if (h.extendedL2) {
    const si = Math.floor((offset % cs) / (cs / 32));
    t['subclusterIndex'] = si;
    t['subcluster'] = e.subclusters?.[si] ?? null;
  } else t['subclusterIndex'] = null;
  // Refcounts count clusters of the image file; an external data file has none.
  const host = e.kind === 'compressed' ? (e.compressedOffset as number) : e.hostOffset;
  if (host !== 0 && h.dataFile === null) {
    const hc = Math.floor(host / cs);
    const rc = await Refcounts.load(layer.file, h);
    t['hostCluster'] = hc;
    t['refcount'] = await rc.get(hc);
  } else {
    t['hostCluster'] = null;
    t['refcount'] = null;
  }

  return t;
}

async function vhdTables(layer: VhdLayer, offset: number): Promise<Record<string, unknown>> {
  if (layer.sparse === null) return { diskType: 'fixed' };
  const { header, bat, bitmaps } = layer.sparse;
  const block = Math.floor(offset / header.blockSize);
  const raw = await bat.raw(block);
  const t: Record<string, unknown> = {
    diskType: layer.kind,
    blockSize: header.blockSize,
    batIndex: block,
    batEntryOffset: header.tableOffset + block * 4,
    batEntry: raw,
  };
  if (raw === BAT_UNUSED) return t;
  const bitmapOffset = raw * SECTOR;
  const sector = Math.floor((offset % header.blockSize) / SECTOR);
  const bitmap = await bitmaps.get(bitmapOffset);
  Object.assign(t, {
    bitmapOffset,
    dataOffset: bitmapOffset + header.bitmapSize,
    sector,
    bitmapByteOffset: bitmapOffset + (sector >> 3),
    bitmapBit: 7 - (sector & 7),
    present: sectorPresent(bitmap, sector),
  });
  return t;
}

async function vmdkTables(layer: VmdkLayer, offset: number): Promise<Record<string, unknown>> {
  const x = layer.extents.find((e) => offset >= e.start && offset < e.start + e.length);
  if (x === undefined) return { extent: null };
  const t: Record<string, unknown> = { extent: x.index, extentKind: x.kind, extentStart: x.start, extentFile: x.file?.path ?? null };
  if (!(x instanceof SparseExtent)) return t;
  const geo = x.geometry;
  const rel = offset - x.start;
  if (rel >= geo.capacity * SECTOR) return t;
  const gdIndex = Math.floor(rel / geo.gtCoverage);
  const gdEntry = x.gd.entries[gdIndex] as number;
  Object.assign(t, {
    grainSize: geo.grainBytes,
    grainDirectory: x.gd.which,
    gdOffset: x.gd.offset,
    gdIndex,
    gdEntryOffset: x.gd.offset + gdIndex * 4,
    gdEntry,
  });
  if (gdEntry === 0) return t;
  const gtIndex = Math.floor(rel / geo.grainBytes) % geo.gtes;
  const gt = await x.gt(gdIndex);
  const gte = gt[gtIndex] as number;
  Object.assign(t, {
    gtOffset: gdEntry * SECTOR,
    gtIndex,
    gtEntryOffset: gdEntry * SECTOR + gtIndex * 4,
    gtEntry: gte,
    grainOffset: gte > 1 ? gte * SECTOR : null,
    compressed: geo.compressed,
  });
  return t;
}

async function tablesOf(layer: Layer, offset: number): Promise<Record<string, unknown> | undefined> {
  if (layer instanceof Qcow2Layer) return qcow2Tables(layer, offset);
  if (layer instanceof VhdLayer) return vhdTables(layer, offset);
  if (layer instanceof VmdkLayer) return vmdkTables(layer, offset);
  return undefined;
}

/** Where guest byte `offset` of `dev` lives, layer by layer. */
export async function translate(dev: BlockDevice, offset: number): Promise<Translation> {
  if (!Number.isSafeInteger(offset) || offset < 0 || offset >= dev.size) {
    throw new BlockError('out-of-bounds', `${dev.path ?? dev.format}: guest offset ${offset} is outside the disk (${dev.size} bytes)`, {
      ...(dev.path !== undefined ? { path: dev.path } : {}),
      offset,
      op: 'translate',
    });
  }
  const layers: LayerStep[] = [];
  let cur: BlockDevice | null = dev;
  for (let depth = 0; cur !== null && offset < cur.size; depth++) {
    const layer = layerOf(cur);
    if (layer === undefined) {
      // A raw file (or another plain device): the byte is where the guest says.
      const [ext] = await cur.blockStatus(offset, 1);
      const host = ext?.hostOffset ?? null;
      layers.push({
        depth,
        format: cur.format,
        file: cur.path ?? '',
        kind: ext?.zero === true ? 'zero' : 'data',
        hostFile: host === null ? null : (ext?.file ?? cur.path ?? null),
        hostOffset: host,
      });
      break;
    }
    const [run] = await layer.map(offset, 1);
    if (run === undefined) break;
    const step: LayerStep = {
      depth,
      format: layer.format,
      file: layer.path,
      kind: run.kind,
      hostFile: run.hostOffset !== undefined ? (run.file ?? layer.path) : null,
      hostOffset: run.hostOffset !== undefined ? run.hostOffset + (offset - run.offset) : null,
    };
    const tables = await tablesOf(layer, offset);
    if (tables !== undefined) step.tables = tables;
    layers.push(step);
    if (run.kind !== 'unallocated') break;
    cur = layer.backing;
  }
  const last = layers[layers.length - 1];
  if (last === undefined) throw new BlockError('io', `${dev.path ?? dev.format}: no layer answered for offset ${offset}`);
  const answered = last.kind !== 'unallocated';
  return {
    guestOffset: offset,
    depth: last.depth,
    format: last.format,
    file: last.file,
    kind: last.kind,
    hostFile: answered && last.kind !== 'zero' ? last.hostFile : null,
    hostOffset: answered && last.kind !== 'zero' ? last.hostOffset : null,
    layers,
  };
}
