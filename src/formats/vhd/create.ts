/**
 * Creating VHDs (spec digest §5.3, §2.2, §6): fixed and dynamic disks laid
 * out byte for byte as qemu-img 7.2 writes them (`qemu-img create -f vpc`,
 * with its geometry search and `force_size`), and differencing disks, which
 * qemu-img cannot make: the parent's unique id and timestamp in the header,
 * its file name (UTF-16BE) and two parent locators, W2ku (absolute path) and
 * W2ru (relative to the child), both UTF-16LE.
 */
import { open } from 'node:fs/promises';
import { basename, dirname, relative, resolve } from 'node:path';
import { BlockError, fromSystemError } from '../../block/errors.js';
import { dataView } from '../../util/bytes.js';
import { parseSize } from '../../util/size.js';
import { layerOf, resolveRelative } from '../chain.js';
import { openImage } from '../registry.js';
import {
  DISK_DIFFERENCING,
  DISK_DYNAMIC,
  DISK_FIXED,
  DYN_HEADER_COOKIE,
  DYN_HEADER_SIZE,
  FOOTER_COOKIE,
  FOOTER_SIZE,
  MAX_CHS_C,
  MAX_CHS_H,
  MAX_CHS_S,
  MAX_GEOMETRY_SECTORS,
  MAX_SECTORS,
  PLATFORM_W2KU,
  PLATFORM_W2RU,
  SECTOR,
  VHD_EPOCH,
  vhdChecksum,
} from './constants.js';
import { calculateGeometry, chsSectors, type Geometry } from './geometry.js';
import { VhdLayer } from './image.js';

export const DEFAULT_BLOCK_SIZE = 2 << 20;

/** The parent of a new differencing disk, as read from its footer. */
export interface VhdParentSpec {
  /** Host path of the parent (absolute or relative to the working directory). */
  hostPath: string;
  uniqueId: Uint8Array;
  timestamp: number;
  /** The parent's footer fields that fix its size: copied, so the child has the same size. */
  creatorApp: string;
  geometry: Geometry;
  currentSize: bigint;
  originalSize: bigint;
}

export interface VhdCreateOptions {
  /** Requested size in bytes (rounded like qemu: up to a CHS geometry, or exact with forceSize). */
  size: number;
  subformat?: 'dynamic' | 'fixed';
  /** Dynamic and differencing disks: bytes per block, a power of two from 4 KiB to 256 MiB. */
  blockSize?: number;
  forceSize?: boolean;
  parent?: VhdParentSpec;
  /** For tests: fixed unique id and timestamp. */
  uniqueId?: Uint8Array;
  timestamp?: number;
}

export interface VhdSizing {
  geometry: Geometry;
  /** The virtual size the disk gets (whole sectors). */
  size: number;
  creatorApp: string;
}

/** qemu's calculate_rounded_image_size: the smallest CHS geometry holding `size`, or the exact size with force_size. */
export function vhdSizing(size: number, forceSize: boolean): VhdSizing {
  let geometry: Geometry = { cylinders: 0, heads: 0, sectorsPerTrack: 0 };
  if (forceSize) geometry = { cylinders: MAX_CHS_C, heads: MAX_CHS_H, sectorsPerTrack: MAX_CHS_S };
  else {
    const total = Math.min(MAX_GEOMETRY_SECTORS, Math.floor(size / SECTOR));
    for (let i = 0; total > chsSectors(geometry); i++) geometry = calculateGeometry(total + i);
  }
  let sectors: number;
  if (chsSectors(geometry) === MAX_GEOMETRY_SECTORS) {
    sectors = Math.floor(size / SECTOR);
    if (sectors > MAX_SECTORS) throw new BlockError('invalid-argument', 'Disk size is too large, max size is 2040 GiB');
  } else sectors = chsSectors(geometry);
  return { geometry, size: sectors * SECTOR, creatorApp: forceSize ? 'qem2' : 'qemu' };
}

function ascii(buf: Uint8Array, at: number, s: string): void {
  for (let i = 0; i < s.length; i++) buf[at + i] = s.charCodeAt(i);
}

export interface FooterFields {
  dataOffset: bigint;
  timestamp: number;
  creatorApp: string;
  originalSize: bigint;
  currentSize: bigint;
  geometry: Geometry;
  diskType: number;
  uniqueId: Uint8Array;
}

/** §2: 512 bytes of footer, checksum included (qemu's field values: features 2, version 1.0, creator 5.3 on Wi2k). */
export function encodeFooter(f: FooterFields): Uint8Array {
  const buf = new Uint8Array(FOOTER_SIZE);
  const dv = dataView(buf);
  ascii(buf, 0, FOOTER_COOKIE);
  dv.setUint32(8, 2);
  dv.setUint32(12, 0x0001_0000);
  dv.setBigUint64(16, f.dataOffset);
  dv.setUint32(24, f.timestamp >>> 0);
  ascii(buf, 28, f.creatorApp);
  dv.setUint32(32, 0x0005_0003);
  ascii(buf, 36, 'Wi2k');
  dv.setBigUint64(40, f.originalSize);
  dv.setBigUint64(48, f.currentSize);
  dv.setUint16(56, f.geometry.cylinders);
  buf[58] = f.geometry.heads;
  buf[59] = f.geometry.sectorsPerTrack;
  dv.setUint32(60, f.diskType);
  buf.set(f.uniqueId.subarray(0, 16), 68);
  dv.setUint32(64, vhdChecksum(buf, 64));
  return buf;
}

/** Recompute the checksum of a footer (offset 64) or dynamic header (offset 36) in place. */
export function fixChecksum(buf: Uint8Array, at: 64 | 36): void {
  dataView(buf).setUint32(at, vhdChecksum(buf, at));
}

interface LocatorSpec {
  code: number;
  data: Uint8Array;
  offset: number;
  space: number;
}

function encodeHeader(
  tableOffset: number,
  entries: number,
  blockSize: number,
  parent?: { uuid: Uint8Array; timestamp: number; name: string; locators: LocatorSpec[] },
): Uint8Array {
  const buf = new Uint8Array(DYN_HEADER_SIZE);
  const dv = dataView(buf);
  ascii(buf, 0, DYN_HEADER_COOKIE);
  dv.setBigUint64(8, 0xffff_ffff_ffff_ffffn);
  dv.setBigUint64(16, BigInt(tableOffset));
  dv.setUint32(24, 0x0001_0000);
  dv.setUint32(28, entries);
  dv.setUint32(32, blockSize);
  if (parent !== undefined) {
    buf.set(parent.uuid.subarray(0, 16), 40);
    dv.setUint32(56, parent.timestamp >>> 0);
    const name = Buffer.from(parent.name.slice(0, 256), 'utf16le');
    name.swap16();
    buf.set(name, 64);
    parent.locators.forEach((l, i) => {
      const at = 576 + i * 24;
      dv.setUint32(at, l.code);
      dv.setUint32(at + 4, l.space);
      dv.setUint32(at + 8, l.data.length);
      dv.setBigUint64(at + 16, BigInt(l.offset));
    });
  }
  fixChecksum(buf, 36);
  return buf;
}

export function vhdNow(): number {
  return Math.max(0, Math.floor(Date.now() / 1000) - VHD_EPOCH);
}

/** The relative locator of the parent: `.\dir\parent.vhd` or `..\parent.vhd`, as Hyper-V writes it. */
export function relativeLocator(childPath: string, parentPath: string): string {
  const rel = relative(dirname(resolve(childPath)), resolve(parentPath))
    .split('/')
    .join('\\');
  return rel.startsWith('..') ? rel : `.\\${rel}`;
}

/** Write a new VHD at `path`; returns the virtual size it got. */
export async function createVhd(path: string, o: VhdCreateOptions): Promise<{ size: number }> {
  const fixed = o.subformat === 'fixed';
  if (fixed && o.parent !== undefined) throw new BlockError('invalid-argument', `${path}: a fixed VHD cannot have a parent (backing file)`);
  const blockSize = o.blockSize ?? DEFAULT_BLOCK_SIZE;
  if (blockSize < 4096 || blockSize > 256 << 20 || (blockSize & (blockSize - 1)) !== 0) {
    throw new BlockError('invalid-argument', `block_size must be a power of two from 4 KiB to 256 MiB, not ${blockSize}`);
  }
  const timestamp = o.timestamp ?? vhdNow();
  const uniqueId = o.uniqueId ?? Buffer.from(globalThis.crypto.randomUUID().replace(/-/g, ''), 'hex');
  let sizing: VhdSizing;
  let originalSize: bigint;
  let currentSize: bigint;
  const p = o.parent;
  if (p !== undefined) {
    // The child states its size exactly as the parent does, so every reader sizes both alike.
    sizing = { geometry: p.geometry, size: o.size, creatorApp: p.creatorApp };
    originalSize = p.originalSize;
    currentSize = p.currentSize;
  } else {
    sizing = vhdSizing(o.size, o.forceSize === true);
    originalSize = currentSize = BigInt(sizing.size);
  }
  const footer = (diskType: number, dataOffset: bigint): Uint8Array =>
    encodeFooter({
      dataOffset,
      timestamp,
      creatorApp: sizing.creatorApp,
      originalSize,
      currentSize,
      geometry: sizing.geometry,
      diskType,
      uniqueId,
    });

  let fh;
  try {
    fh = await open(path, 'w');
  } catch (e) {
    throw fromSystemError(e, path, 'create');
  }
  try {
    if (fixed) {
      // qemu: truncate to size + 512 (sparse), footer in the last sector.
      await fh.truncate(sizing.size + FOOTER_SIZE);
      await fh.write(footer(DISK_FIXED, 0xffff_ffff_ffff_ffffn), 0, FOOTER_SIZE, sizing.size);
      return { size: sizing.size };
    }
    const entries = Math.ceil(sizing.size / SECTOR / (blockSize / SECTOR));
    const tableOffset = 3 * SECTOR;
    const batBytes = Math.ceil((entries * 4) / SECTOR) * SECTOR;
    let end = tableOffset + batBytes;
    let parentHeader: Parameters<typeof encodeHeader>[3];
    if (p !== undefined) {
      const locators: LocatorSpec[] = [];
      for (const [code, text] of [
        [PLATFORM_W2KU, resolve(p.hostPath)],
        [PLATFORM_W2RU, relativeLocator(path, p.hostPath)],
      ] as const) {
        const data = Buffer.from(text, 'utf16le');
        const space = Math.max(SECTOR, Math.ceil(data.length / SECTOR) * SECTOR);
        locators.push({ code, data, offset: end, space });
        end += space;
      }
      parentHeader = { uuid: p.uniqueId, timestamp: p.timestamp, name: basename(p.hostPath), locators };
      for (const l of locators) await fh.write(l.data, 0, l.data.length, l.offset);
    }
    const diskType = p !== undefined ? DISK_DIFFERENCING : DISK_DYNAMIC;
    const f = footer(diskType, BigInt(SECTOR));
    // qemu's order: footer copy, trailing footer, BAT (0xFF, padded to whole sectors), header.
    await fh.write(f, 0, FOOTER_SIZE, 0);
    await fh.write(f, 0, FOOTER_SIZE, end);
    await fh.write(new Uint8Array(batBytes).fill(0xff), 0, batBytes, tableOffset);
    await fh.write(encodeHeader(tableOffset, entries, blockSize, parentHeader), 0, DYN_HEADER_SIZE, SECTOR);
    return { size: sizing.size };
  } finally {
    await fh.close();
  }
}

const VPC_KEYS = ['subformat', 'block_size', 'force_size', 'size', 'backing_file', 'backing_fmt'];

/**
 * createImage's `vpc` branch: qemu-img's options (subformat, force_size) plus
 * block_size, and a parent (-b) for a differencing disk. `shownSize` is the
 * size as asked for, which the summary line shows (as qemu-img does).
 */
export async function createVpc(
  path: string,
  size: number,
  o: Record<string, string>,
  shownSize: number,
  backingFile: string | undefined,
  backingFormat: string | undefined,
): Promise<{ size: number; summary: string }> {
  for (const k of Object.keys(o)) {
    if (!VPC_KEYS.includes(k)) throw new BlockError('invalid-argument', `vpc has no option '${k}' (known: ${VPC_KEYS.join(', ')})`);
  }
  const sub = o['subformat'] ?? 'dynamic';
  if (sub !== 'dynamic' && sub !== 'fixed') throw new BlockError('invalid-argument', `subformat must be dynamic or fixed, not '${sub}'`);
  const fs = o['force_size'];
  if (fs !== undefined && !['on', 'off', 'true', 'false', 'yes', 'no', '1', '0'].includes(fs)) {
    throw new BlockError('invalid-argument', `option force_size: expected on or off, got '${fs}'`);
  }
  const forceSize = fs !== undefined && ['on', 'true', 'yes', '1'].includes(fs);
  const c: VhdCreateOptions = { size, subformat: sub, forceSize };
  if (o['block_size'] !== undefined) c.blockSize = parseSize(o['block_size'], 'block_size');
  const parts = ['fmt=vpc', `size=${shownSize}`];
  if (o['subformat'] !== undefined) parts.push(`subformat=${sub}`);
  if (fs !== undefined) parts.push(`force_size=${forceSize ? 'on' : 'off'}`);
  if (c.blockSize !== undefined) parts.push(`block_size=${c.blockSize}`);
  if (backingFile !== undefined) {
    if (backingFormat !== undefined && backingFormat !== 'vpc') {
      throw new BlockError('invalid-argument', `${path}: the parent of a differencing VHD must be a VHD (vpc), not ${backingFormat}`);
    }
    if (forceSize || o['subformat'] !== undefined) {
      throw new BlockError(
        'invalid-argument',
        `${path}: a differencing VHD takes its size and layout from its parent (no subformat or force_size)`,
      );
    }
    const hostPath = resolveRelative(path, backingFile);
    await using dev = await openImage(hostPath, { format: 'vpc', backing: null });
    const layer = layerOf(dev);
    if (!(layer instanceof VhdLayer)) throw new BlockError('invalid-argument', `${hostPath}: not a VHD`, { path: hostPath });
    if (size !== dev.size) {
      throw new BlockError(
        'invalid-argument',
        `${path}: a differencing VHD has its parent's size (${dev.size} bytes), not ${size}; leave the size out`,
        { path },
      );
    }
    const f = layer.footer;
    c.parent = {
      hostPath,
      uniqueId: f.uniqueId,
      timestamp: f.timestamp,
      creatorApp: f.creatorApp,
      geometry: f.geometry,
      currentSize: f.currentSize,
      originalSize: f.originalSize,
    };
    parts.push(`backing_file=${backingFile}`, 'backing_fmt=vpc');
  }
  const r = await createVhd(path, c);
  return { size: r.size, summary: parts.join(' ') };
}
