/**
 * `create -f vmdk`: new VMDK disks in the layout qemu-img 7.2 writes (spec
 * digest §3.2, §8), byte for byte apart from the random CID:
 *
 * - monolithicSparse / streamOptimized: one hosted sparse file; header, the
 *   descriptor embedded at sector 1 (20 sectors), the redundant grain
 *   directory and its grain tables, then the primary ones, all preallocated;
 *   the file ends at the first grain (overHead, grain aligned).
 * - twoGbMaxExtentSparse: a text descriptor and `NAME-s001.vmdk`... sparse
 *   files of 2 GiB each (the same layout, descriptor area left empty).
 * - monolithicFlat / twoGbMaxExtentFlat: a text descriptor and sparse raw
 *   files `NAME-flat.vmdk` or `NAME-f001.vmdk`...
 */
import { open } from 'node:fs/promises';
import { basename, extname } from 'node:path';
import { BlockError, fromSystemError } from '../../block/errors.js';
import { dataView } from '../../util/bytes.js';
import * as C from './constants.js';
import { HEADER_LAYOUT } from './header.js';

export const SUBFORMATS = ['monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat', 'streamOptimized'] as const;
export type VmdkSubformat = (typeof SUBFORMATS)[number];
export const ADAPTER_TYPES = ['ide', 'buslogic', 'lsilogic', 'legacyESX'] as const;

export interface VmdkCreateOptions {
  /** Bytes (a multiple of 512). */
  size: number;
  subformat?: VmdkSubformat;
  adapterType?: string;
  hwversion?: string;
  toolsVersion?: string;
  zeroedGrain?: boolean;
  /** parentFileNameHint, as given. */
  backingFile?: string;
  /** The parent's CID (required with backingFile). */
  parentCid?: number;
  /** CID of the new disk (default: random, as QEMU). */
  cid?: number;
}

/** Sectors per grain of the disks QEMU creates (64 KiB grains). */
export const DEFAULT_GRAIN_SECTORS = 128;
/** Sectors QEMU reserves for an embedded descriptor. */
export const EMBEDDED_DESCRIPTOR_SECTORS = 20;
/** Extent size of the split (twoGbMaxExtent*) subformats: 2 GiB. */
export const SPLIT_EXTENT_SECTORS = 4_194_304;

export function randomCid(): number {
  // The Web Crypto global, not node:crypto: that module would load at every startup.
  return globalThis.crypto.getRandomValues(new Uint32Array(1))[0] as number;
}

const hex = (n: number): string => (n >>> 0).toString(16);

/** The descriptor text QEMU writes (vmdk_co_do_create's template). */
export function descriptorTemplate(o: {
  cid: number;
  parentCid: number;
  createType: string;
  parentFileNameHint?: string;
  extentLines: string[];
  sizeBytes: number;
  adapterType: string;
  hwversion: string;
  toolsVersion: string;
}): string {
  const heads = o.adapterType === 'ide' ? 16 : 255;
  const cylinders = Math.floor(o.sizeBytes / (63 * heads * C.SECTOR));
  return (
    '# Disk DescriptorFile\n' +
    'version=1\n' +
    `CID=${hex(o.cid)}\n` +
    `parentCID=${hex(o.parentCid)}\n` +
    `createType="${o.createType}"\n` +
    // QEMU's parent line replaces the blank line (its template has no newline after it).
    (o.parentFileNameHint !== undefined ? `parentFileNameHint="${o.parentFileNameHint}"` : '') +
    '\n' +
    '# Extent description\n' +
    o.extentLines.map((l) => l + '\n').join('') +
    '\n' +
    '# The Disk Data Base\n' +
    '#DDB\n' +
    '\n' +
    `ddb.virtualHWVersion = "${o.hwversion}"\n` +
    `ddb.geometry.cylinders = "${cylinders}"\n` +
    `ddb.geometry.heads = "${heads}"\n` +
    'ddb.geometry.sectors = "63"\n' +
    `ddb.adapterType = "${o.adapterType}"\n` +
    `ddb.toolsVersion = "${o.toolsVersion}"\n`
  );
}

export interface SparseLayout {
  gtCount: number;
  gdSectors: number;
  gtSectors: number;
  rgdOffset: number;
  gdOffset: number;
  /** Sectors before the first grain. */
  overhead: number;
}

/** Where QEMU puts the metadata of a new sparse extent (§3.2). */
export function sparseLayout(capacity: number, grainSectors = DEFAULT_GRAIN_SECTORS, gtes = 512): SparseLayout {
  const gtCount = Math.ceil(capacity / (gtes * grainSectors));
  const gdSectors = Math.ceil((gtCount * 4) / C.SECTOR);
  const gtSectors = Math.ceil((gtes * 4) / C.SECTOR);
  const rgdOffset = 1 + EMBEDDED_DESCRIPTOR_SECTORS;
  const gdOffset = rgdOffset + gdSectors + gtCount * gtSectors;
  const overhead = Math.ceil((gdOffset + gdSectors + gtCount * gtSectors) / grainSectors) * grainSectors;
  return { gtCount, gdSectors, gtSectors, rgdOffset, gdOffset, overhead };
}

/** A sparse header (§2) as bytes. */
export function sparseHeaderBytes(h: {
  version: number;
  flags: number;
  capacity: number;
  grainSectors: number;
  descriptorOffset: number;
  descriptorSize: number;
  gtes: number;
  rgdOffset: number;
  gdOffset: bigint | number;
  overhead: number;
  compress: boolean;
}): Uint8Array {
  const b = new Uint8Array(C.HEADER_SIZE);
  const dv = dataView(b);
  b.set([0x4b, 0x44, 0x4d, 0x56], 0);
  const u64 = (k: keyof typeof HEADER_LAYOUT, v: bigint | number): void => dv.setBigUint64(HEADER_LAYOUT[k][0], BigInt(v), true);
  dv.setUint32(HEADER_LAYOUT.version[0], h.version, true);
  dv.setUint32(HEADER_LAYOUT.flags[0], h.flags >>> 0, true);
  u64('capacity', h.capacity);
  u64('grainSize', h.grainSectors);
  u64('descriptorOffset', h.descriptorOffset);
  u64('descriptorSize', h.descriptorSize);
  dv.setUint32(HEADER_LAYOUT.numGTEsPerGT[0], h.gtes, true);
  u64('rgdOffset', h.rgdOffset);
  u64('gdOffset', h.gdOffset);
  u64('overHead', h.overhead);
  b.set([0x0a, 0x20, 0x0d, 0x0a], HEADER_LAYOUT.singleEndLineChar[0]);
  dv.setUint16(HEADER_LAYOUT.compressAlgorithm[0], h.compress ? C.COMPRESSION_DEFLATE : C.COMPRESSION_NONE, true);
  return b;
}

/** The bytes of a new, empty hosted sparse extent as QEMU makes it (vmdk_init_extent). */
export function sparseExtentBytes(capacity: number, o: { zeroedGrain: boolean; compress: boolean; descriptor: string | null }): Uint8Array {
  const L = sparseLayout(capacity);
  const out = new Uint8Array(L.overhead * C.SECTOR);
  const version = o.compress ? 3 : o.zeroedGrain ? 2 : 1;
  const flags =
    C.FLAG_NL_DETECT | C.FLAG_RGD | (o.zeroedGrain ? C.FLAG_ZERO_GRAIN : 0) | (o.compress ? C.FLAG_COMPRESSED | C.FLAG_MARKERS : 0);
  out.set(
    sparseHeaderBytes({
      version,
      flags,
      capacity,
      grainSectors: DEFAULT_GRAIN_SECTORS,
      descriptorOffset: 1,
      descriptorSize: EMBEDDED_DESCRIPTOR_SECTORS,
      gtes: 512,
      rgdOffset: L.rgdOffset,
      gdOffset: L.gdOffset,
      overhead: L.overhead,
      compress: o.compress,
    }),
    0,
  );
  if (o.descriptor !== null) {
    const d = new TextEncoder().encode(o.descriptor);
    if (d.length > EMBEDDED_DESCRIPTOR_SECTORS * C.SECTOR)
      throw new BlockError('invalid-argument', 'the VMDK descriptor is too long to embed');
    out.set(d, C.SECTOR);
  }
  const dv = dataView(out);
  for (const gd of [L.rgdOffset, L.gdOffset]) {
    for (let i = 0; i < L.gtCount; i++) dv.setUint32(gd * C.SECTOR + i * 4, gd + L.gdSectors + i * L.gtSectors, true);
  }
  return out;
}

/** QEMU's extent file names: `PREFIX-flat.EXT`, `PREFIX-s001.EXT`, `PREFIX-f001.EXT`. */
export function extentFileName(path: string, kind: 'flat' | 's' | 'f', index: number): string {
  const ext = extname(path);
  const prefix = ext === '' ? path : path.slice(0, -ext.length);
  return kind === 'flat' ? `${prefix}-flat${ext}` : `${prefix}-${kind}${String(index).padStart(3, '0')}${ext}`;
}

async function writeNewFile(path: string, bytes: Uint8Array, size: number): Promise<void> {
  let fh;
  try {
    fh = await open(path, 'w');
  } catch (e) {
    throw fromSystemError(e, path, 'create');
  }
  try {
    if (bytes.length > 0) await fh.write(bytes, 0, bytes.length, 0);
    await fh.truncate(size);
  } catch (e) {
    throw fromSystemError(e, path, 'create');
  } finally {
    await fh.close();
  }
}

/** Check and default the options (QEMU's messages where it has them). */
export function normalizeCreateOptions(o: VmdkCreateOptions): Required<Omit<VmdkCreateOptions, 'backingFile' | 'parentCid' | 'cid'>> {
  const subformat = o.subformat ?? 'monolithicSparse';
  if (!(SUBFORMATS as readonly string[]).includes(subformat)) {
    throw new BlockError('invalid-argument', `Unknown VMDK subformat '${subformat}' (known: ${SUBFORMATS.join(', ')})`);
  }
  const adapterType = o.adapterType ?? 'ide';
  if (!(ADAPTER_TYPES as readonly string[]).includes(adapterType)) {
    throw new BlockError('invalid-argument', `Unknown adapter type: '${adapterType}' (known: ${ADAPTER_TYPES.join(', ')})`);
  }
  const flat = subformat === 'monolithicFlat' || subformat === 'twoGbMaxExtentFlat';
  if (flat && o.zeroedGrain === true) throw new BlockError('invalid-argument', "Flat image can't enable zeroed grain");
  if (flat && o.backingFile !== undefined) throw new BlockError('invalid-argument', "Flat image can't have backing file");
  if (o.size / C.SECTOR > 0xffff_ffff * (subformat.startsWith('twoGb') ? 1024 : 1)) {
    throw new BlockError('invalid-argument', `a ${subformat} VMDK extent cannot be larger than 2 TiB`);
  }
  return {
    size: o.size,
    subformat,
    adapterType,
    hwversion: o.hwversion ?? '4',
    toolsVersion: o.toolsVersion ?? '2147483647',
    zeroedGrain: o.zeroedGrain ?? false,
  };
}

/** Create a VMDK disk at `path`; returns the files written (descriptor first). */
export async function createVmdk(path: string, opts: VmdkCreateOptions): Promise<string[]> {
  const o = normalizeCreateOptions(opts);
  if (opts.backingFile !== undefined && opts.parentCid === undefined)
    throw new Error('createVmdk: parentCid is required with a backing file');
  const sectors = o.size / C.SECTOR;
  const desc = (createType: string, extentLines: string[]): string =>
    descriptorTemplate({
      cid: opts.cid ?? randomCid(),
      parentCid: opts.parentCid ?? C_NO_PARENT,
      createType,
      ...(opts.backingFile !== undefined ? { parentFileNameHint: opts.backingFile } : {}),
      extentLines,
      sizeBytes: o.size,
      adapterType: o.adapterType,
      hwversion: o.hwversion,
      toolsVersion: o.toolsVersion,
    });
  const sub = o.subformat;
  if (sub === 'monolithicSparse' || sub === 'streamOptimized') {
    const compress = sub === 'streamOptimized';
    const text = desc(sub, [`RW ${sectors} SPARSE "${basename(path)}"`]);
    const bytes = sparseExtentBytes(sectors, { zeroedGrain: o.zeroedGrain, compress, descriptor: text });
    await writeNewFile(path, bytes, bytes.length);
    return [path];
  }
  const split = sub.startsWith('twoGb');
  const flat = sub.endsWith('Flat');
  const per = split ? SPLIT_EXTENT_SECTORS : Math.max(sectors, 1);
  const files: string[] = [];
  const lines: string[] = [];
  for (let start = 0, i = 1; start < sectors || (start === 0 && i === 1); start += per, i++) {
    const n = Math.min(per, sectors - start);
    const file = extentFileName(path, split ? (flat ? 'f' : 's') : 'flat', i);
    files.push(file);
    if (flat) {
      lines.push(`RW ${n} FLAT "${basename(file)}" 0`);
      await writeNewFile(file, new Uint8Array(0), n * C.SECTOR);
    } else {
      lines.push(`RW ${n} SPARSE "${basename(file)}"`);
      const bytes = sparseExtentBytes(n, { zeroedGrain: o.zeroedGrain, compress: false, descriptor: null });
      await writeNewFile(file, bytes, bytes.length);
    }
    if (n <= 0) break;
  }
  const text = new TextEncoder().encode(desc(sub, lines));
  await writeNewFile(path, text, text.length);
  return [path, ...files];
}

const C_NO_PARENT = 0xffff_ffff;

const VMDK_KEYS = [
  'subformat',
  'adapter_type',
  'hwversion',
  'toolsversion',
  'compat6',
  'zeroed_grain',
  'backing_file',
  'backing_fmt',
  'size',
];

function onOff(v: string | undefined, key: string): boolean | undefined {
  if (v === undefined) return undefined;
  if (['on', 'true', 'yes', '1'].includes(v)) return true;
  if (['off', 'false', 'no', '0'].includes(v)) return false;
  throw new BlockError('invalid-argument', `option ${key}: expected on or off, got '${v}'`);
}

/** The 'vmdk' branch of createImage: qemu-img's -o names (subformat, adapter_type, hwversion, toolsversion, compat6, zeroed_grain). */
export async function createVmdkImage(
  req: { path: string },
  o: Record<string, string>,
  size: number,
  backingFile: string | undefined,
  backingFormat: string | undefined,
): Promise<{ size: number; summary: string }> {
  for (const k of Object.keys(o)) {
    if (!VMDK_KEYS.includes(k)) throw new BlockError('invalid-argument', `vmdk has no option '${k}' (known: ${VMDK_KEYS.join(', ')})`);
  }
  const compat6 = onOff(o['compat6'], 'compat6') ?? false;
  if (compat6 && o['hwversion'] !== undefined) throw new BlockError('invalid-argument', 'compat6 cannot be enabled with hwversion set');
  const c: VmdkCreateOptions = { size, subformat: (o['subformat'] ?? 'monolithicSparse') as VmdkSubformat };
  if (o['adapter_type'] !== undefined) c.adapterType = o['adapter_type'];
  const hw = o['hwversion'] ?? (compat6 ? '6' : undefined);
  if (hw !== undefined) c.hwversion = hw;
  if (o['toolsversion'] !== undefined) c.toolsVersion = o['toolsversion'];
  const zg = onOff(o['zeroed_grain'], 'zeroed_grain');
  if (zg !== undefined) c.zeroedGrain = zg;
  if (backingFile !== undefined) {
    if (backingFormat !== undefined && backingFormat !== 'vmdk') {
      throw new BlockError('invalid-argument', `Invalid backing file format: ${backingFormat}. Must be vmdk.`);
    }
    const { openImage } = await import('../registry.js');
    const { resolveRelative, layerOf } = await import('../chain.js');
    const { VmdkLayer } = await import('./image.js');
    await using b = await openImage(resolveRelative(req.path, backingFile), { format: 'vmdk' });
    const parent = layerOf(b);
    if (!(parent instanceof VmdkLayer)) throw new BlockError('invalid-argument', `Invalid backing file format: ${b.format}. Must be vmdk.`);
    c.backingFile = backingFile;
    c.parentCid = parent.cid;
  }
  await createVmdk(req.path, c);
  const n = normalizeCreateOptions(c);
  const parts = [`fmt=vmdk size=${size}`];
  if (backingFile !== undefined) parts.push(`backing_file=${backingFile}`, 'backing_fmt=vmdk');
  parts.push(
    `adapter_type=${n.adapterType}`,
    `hwversion=${n.hwversion}`,
    `subformat=${n.subformat}`,
    `zeroed_grain=${n.zeroedGrain ? 'on' : 'off'}`,
  );
  return { size, summary: parts.join(' ') };
}
