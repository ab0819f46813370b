/**
 * The hard disk footer (spec digest §2): decoding with field offsets,
 * checksum verification, and finding it. Fixed disks have it only in the
 * last 512 bytes (511 for Virtual PC before 2004, §1); dynamic and
 * differencing disks have it at the end and a copy at offset 0, which is
 * used when the trailing one is damaged (§1, §5.3).
 */
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import { hex } from '../../util/bytes.js';
import {
  DISK_DIFFERENCING,
  DISK_DYNAMIC,
  DISK_FIXED,
  DISK_TYPE_NAMES,
  FOOTER_COOKIE,
  FOOTER_SIZE,
  OLD_FOOTER_SIZE,
  formatUuid,
  vhdChecksum,
  vhdTime,
} from './constants.js';
import { FieldReader, rawCode, type VhdField } from './fields.js';
import type { Geometry } from './geometry.js';

export type FooterSource = 'trailing' | 'trailing (511-byte)' | 'copy at offset 0';

export interface VhdFooter {
  /** Where the footer was read, and which copy it is. */
  offset: number;
  source: FooterSource;
  cookie: string;
  features: number;
  formatVersion: number;
  /** Offset of the dynamic header; all ones for fixed disks. */
  dataOffset: bigint;
  timestamp: number;
  /** The 4 raw characters (may contain NULs, e.g. 'tap\0'). */
  creatorApp: string;
  creatorVersion: number;
  creatorOs: string;
  originalSize: bigint;
  currentSize: bigint;
  geometry: Geometry;
  diskType: number;
  checksum: number;
  /** The checksum the bytes actually add up to. */
  computedChecksum: number;
  uniqueId: Uint8Array;
  savedState: number;
  fields: VhdField[];
}

/** §2: decode 512 bytes found at `offset` (a 511-byte footer is passed zero-padded). */
export function decodeFooter(buf: Uint8Array, offset: number, source: FooterSource): VhdFooter {
  const r = new FieldReader(buf, offset);
  const cookie = r.ascii('cookie', 0, 8);
  const features = r.u32('features', 8);
  const formatVersion = r.u32('file_format_version', 12);
  const dataOffset = r.u64('data_offset', 16);
  const timestamp = r.u32('timestamp', 24);
  r.ascii('creator_application', 28, 4);
  const creatorApp = rawCode(buf, 28);
  const creatorVersion = r.u32('creator_version', 32);
  const creatorOs = r.ascii('creator_host_os', 36, 4);
  const originalSize = r.u64('original_size', 40);
  const currentSize = r.u64('current_size', 48);
  const cylinders = r.u16('disk_geometry.cylinders', 56);
  const heads = r.u8('disk_geometry.heads', 58);
  const sectorsPerTrack = r.u8('disk_geometry.sectors_per_track', 59);
  const diskType = r.u32('disk_type', 60);
  const checksum = r.u32('checksum', 64);
  const uniqueId = r.bytes('unique_id', 68, 16, formatUuid);
  const savedState = r.u8('saved_state', 84);
  const computedChecksum = vhdChecksum(buf, 64);
  r.explain(
    'features',
    [features & 1 ? 'temporary' : '', features & 2 ? 'reserved bit (always set)' : ''].filter((x) => x).join(', ') || 'none',
  );
  r.explain('file_format_version', `${formatVersion >>> 16}.${formatVersion & 0xffff}`);
  r.explain('timestamp', vhdTime(timestamp));
  r.explain('creator_version', `${creatorVersion >>> 16}.${creatorVersion & 0xffff}`);
  r.explain('disk_type', diskTypeName(diskType));
  r.explain('checksum', checksum === computedChecksum ? 'ok' : `BAD: the bytes add up to ${hex(computedChecksum, 8)}`);
  if (dataOffset === 0xffff_ffff_ffff_ffffn) r.explain('data_offset', 'none (fixed disk)');
  return {
    offset,
    source,
    cookie,
    features,
    formatVersion,
    dataOffset,
    timestamp,
    creatorApp,
    creatorVersion,
    creatorOs,
    originalSize,
    currentSize,
    geometry: { cylinders, heads, sectorsPerTrack },
    diskType,
    checksum,
    computedChecksum,
    uniqueId,
    savedState,
    fields: r.fields,
  };
}

export function footerValid(f: VhdFooter): boolean {
  return f.cookie === FOOTER_COOKIE && f.checksum === f.computedChecksum;
}

export function diskTypeName(t: number): string {
  return DISK_TYPE_NAMES[t] ?? `unknown (${t})`;
}

/** A short description of the footer for messages and `info`. */
export function describeFooter(f: VhdFooter): Record<string, unknown> {
  return {
    'creator-app': f.creatorApp.replace(/\0/g, '\\0'),
    'creator-version': `${f.creatorVersion >>> 16}.${f.creatorVersion & 0xffff}`,
    'creator-os': f.creatorOs,
    timestamp: vhdTime(f.timestamp),
    uuid: formatUuid(f.uniqueId),
  };
}

function badChecksum(path: string, f: VhdFooter): BlockError {
  return new BlockError(
    'corrupt-image',
    `${path}: VHD footer (${f.source}, at offset ${f.offset}) has checksum ${hex(f.checksum, 8)} but its bytes add up to ${hex(f.computedChecksum, 8)}; the footer is damaged`,
    { path, structure: 'VHD footer', field: 'checksum', offset: f.offset + 64 },
  );
}

export interface LocatedFooter {
  footer: VhdFooter;
  /** The copy at offset 0 (dynamic and differencing disks), when it has the cookie. */
  copy: VhdFooter | null;
  /** Oddities worth showing in `info` and `inspect` (a damaged or differing copy). */
  notes: string[];
  /** For fixed disks: where the guest data ends (the footer's offset). */
  dataEnd: number;
}

/**
 * Find the footer: the trailing one when it is intact (a fixed disk whose
 * guest data happens to start with 'conectix' is still a fixed disk), else
 * the copy at offset 0 of a dynamic or differencing disk. A footer with the
 * cookie but a wrong checksum is reported, not ignored.
 */
export async function locateFooter(file: HostFile): Promise<LocatedFooter> {
  const path = file.path;
  if (file.size < FOOTER_SIZE) {
    throw new BlockError('invalid-image', `${path}: file is ${file.size} bytes, too small for a VHD footer (512 bytes)`, {
      path,
      structure: 'VHD footer',
    });
  }
  const read = async (offset: number, length: number, source: FooterSource): Promise<VhdFooter> => {
    const buf = new Uint8Array(FOOTER_SIZE);
    await file.readAt(buf.subarray(0, length), offset);
    return decodeFooter(buf, offset, source);
  };
  const head = await read(0, FOOTER_SIZE, 'copy at offset 0');
  const copy = head.cookie === FOOTER_COOKIE ? head : null;
  let tail = await read(file.size - FOOTER_SIZE, FOOTER_SIZE, 'trailing');
  if (tail.cookie !== FOOTER_COOKIE && copy === null && file.size > FOOTER_SIZE) {
    const old = await read(file.size - OLD_FOOTER_SIZE, OLD_FOOTER_SIZE, 'trailing (511-byte)');
    if (old.cookie === FOOTER_COOKIE) tail = old;
  }
  const notes: string[] = [];

  if (tail.cookie === FOOTER_COOKIE && footerValid(tail)) {
    if (tail.diskType !== DISK_FIXED && copy === null) notes.push('there is no footer copy at offset 0; the trailing footer is used');
    if (tail.diskType !== DISK_FIXED && copy !== null && !sameFooter(copy, tail)) {
      notes.push(
        footerValid(copy)
          ? 'the footer copy at offset 0 differs from the trailing footer; the trailing one is used'
          : 'the footer copy at offset 0 is damaged (bad checksum); the trailing footer is used',
      );
    }
    return { footer: tail, copy, notes, dataEnd: tail.offset };
  }
  if (copy !== null && (copy.diskType === DISK_DYNAMIC || copy.diskType === DISK_DIFFERENCING || !footerValid(copy))) {
    if (!footerValid(copy)) {
      // Both copies are unusable: report the trailing one's checksum when it had the cookie.
      throw badChecksum(path, tail.cookie === FOOTER_COOKIE ? tail : copy);
    }
    notes.push(
      tail.cookie === FOOTER_COOKIE
        ? `the trailing footer at offset ${tail.offset} is damaged (bad checksum); the copy at offset 0 is used`
        : `there is no footer at the end of the file (offset ${tail.offset}); the copy at offset 0 is used (was the file truncated?)`,
    );
    return { footer: copy, copy, notes, dataEnd: tail.offset };
  }
  if (tail.cookie === FOOTER_COOKIE) throw badChecksum(path, tail);
  if (copy !== null) {
    throw new BlockError(
      'invalid-image',
      `${path}: the VHD footer at offset 0 says disk type ${diskTypeName(copy.diskType)}, but a fixed disk has its footer only at the end, and there is none there`,
      { path, structure: 'VHD footer', field: 'disk_type', offset: 60 },
    );
  }
  throw new BlockError('invalid-image', `${path}: no VHD footer cookie 'conectix' at offset 0 or at the end of the file: not a VHD image`, {
    path,
    structure: 'VHD footer',
    field: 'cookie',
  });
}

function sameFooter(a: VhdFooter, b: VhdFooter): boolean {
  // Field values, not raw bytes: the offsets differ by construction.
  return a.fields.every((f, i) => f.value === b.fields[i]?.value);
}
