/**
 * The virtual size of a VHD, decided the way qemu decides it (spec digest
 * §2.1), and the CHS geometry algorithm (§2.2).
 *
 * qemu first takes cylinders x heads x sectors; it uses the footer's
 * current_size instead when the creator application is one known to size
 * disks by current_size (Hyper-V, qemu with force_size, Disk2vhd,
 * XenConverter, XenServer, Azure), when the geometry is the maximum
 * 65535/16/255 (it cannot describe a bigger disk), or when the user forces it.
 */
import { CURRENT_SIZE_CREATORS, MAX_CHS_C, MAX_CHS_H, MAX_CHS_S, MAX_GEOMETRY_SECTORS, SECTOR } from './constants.js';

/** qemu's force_size_calc option. */
export type SizeCalc = 'chs' | 'current_size';

export interface Geometry {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

export interface SizeDecision {
  /** The virtual size in bytes (a whole number of sectors). */
  size: number;
  /** Which footer field it came from. */
  source: SizeCalc;
  /** Why, in words, for `info` and `inspect`. */
  reason: string;
}

export interface SizeInputs {
  /** The creator application, 4 raw characters. */
  creatorApp: string;
  geometry: Geometry;
  currentSize: bigint;
}

export function chsSectors(g: Geometry): number {
  return g.cylinders * g.heads * g.sectorsPerTrack;
}

const printable = (s: string): string => s.replace(/[^\x20-\x7e]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);

/** §2.1: qemu's vpc_open size rule, with its force_size_calc override. */
export function decideSize(f: SizeInputs, force?: SizeCalc): SizeDecision {
  const chs = chsSectors(f.geometry);
  const creatorUsesSize = CURRENT_SIZE_CREATORS.includes(f.creatorApp);
  const useChs = !creatorUsesSize || force === 'chs';
  const app = `'${printable(f.creatorApp)}'`;
  let reason: string;
  if (chs === MAX_GEOMETRY_SECTORS) reason = `the geometry is the maximum ${MAX_CHS_C}/${MAX_CHS_H}/${MAX_CHS_S}`;
  else if (force === 'current_size') reason = 'forced (force_size_calc=current_size)';
  else if (!useChs) reason = `creator application ${app} sizes disks by current_size`;
  else {
    reason = force === 'chs' ? 'forced (force_size_calc=chs)' : `creator application ${app} sizes disks by CHS geometry`;
    return { size: chs * SECTOR, source: 'chs', reason };
  }
  // qemu: total_sectors = current_size / 512 (rounded down to whole sectors).
  const sectors = f.currentSize / BigInt(SECTOR);
  const size = sectors > BigInt(Math.floor(Number.MAX_SAFE_INTEGER / SECTOR)) ? Number.MAX_SAFE_INTEGER : Number(sectors) * SECTOR;
  return { size, source: 'current_size', reason };
}

/**
 * §2.2: the geometry the VHD spec (and qemu's calculate_geometry) gives a
 * number of sectors. It usually rounds the size down.
 */
export function calculateGeometry(totalSectors: number): Geometry {
  const ts = Math.min(totalSectors, MAX_GEOMETRY_SECTORS);
  let spt: number;
  let heads: number;
  let cth: number;
  if (ts >= 65535 * 16 * 63) {
    spt = 255;
    heads = 16;
    cth = Math.floor(ts / spt);
  } else {
    spt = 17;
    cth = Math.floor(ts / spt);
    heads = Math.max(4, Math.ceil(cth / 1024));
    if (cth >= heads * 1024 || heads > 16) {
      spt = 31;
      heads = 16;
      cth = Math.floor(ts / spt);
    }
    if (cth >= heads * 1024) {
      spt = 63;
      heads = 16;
      cth = Math.floor(ts / spt);
    }
  }
  return { cylinders: Math.floor(cth / heads), heads, sectorsPerTrack: spt };
}
