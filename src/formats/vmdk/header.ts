/**
 * The hosted sparse extent header, "KDMV" (spec digest §2): 512 bytes,
 * little-endian, sizes and offsets in sectors. The same structure is the
 * streamOptimized footer (§4.3). Parsing keeps every field with its offset
 * (for `inspect`); validation bounds everything a later allocation depends on.
 */
import { BlockError } from '../../block/errors.js';
import { dataView } from '../../util/bytes.js';
import * as C from './constants.js';

export interface HeaderField {
  name: string;
  offset: number;
  size: number;
  value: number | bigint | string;
}

export interface SparseHeader {
  version: number;
  flags: number;
  /** Extent size in sectors. */
  capacity: bigint;
  /** Sectors per grain. */
  grainSize: bigint;
  descriptorOffset: bigint;
  descriptorSize: bigint;
  numGTEsPerGT: number;
  rgdOffset: bigint;
  /** GD sector, or GD_AT_END. */
  gdOffset: bigint;
  overHead: bigint;
  uncleanShutdown: number;
  /** Bytes 73..76: "\n", " ", "\r", "\n" when the file was not mangled by a text-mode transfer. */
  newlineTest: number[];
  compressAlgorithm: number;
  fields: HeaderField[];
}

/** Offsets and widths of the header fields (§2), for parsing and for crafted test images. */
export const HEADER_LAYOUT = {
  magicNumber: [0, 4],
  version: [4, 4],
  flags: [8, 4],
  capacity: [12, 8],
  grainSize: [20, 8],
  descriptorOffset: [28, 8],
  descriptorSize: [36, 8],
  numGTEsPerGT: [44, 4],
  rgdOffset: [48, 8],
  gdOffset: [56, 8],
  overHead: [64, 8],
  uncleanShutdown: [72, 1],
  singleEndLineChar: [73, 1],
  nonEndLineChar: [74, 1],
  doubleEndLineChar1: [75, 1],
  doubleEndLineChar2: [76, 1],
  compressAlgorithm: [77, 2],
} as const satisfies Record<string, readonly [number, number]>;

export function hasKdmvMagic(buf: Uint8Array, off = 0): boolean {
  return buf.length >= off + 4 && buf[off] === 0x4b && buf[off + 1] === 0x44 && buf[off + 2] === 0x4d && buf[off + 3] === 0x56;
}

/** Decode a 512-byte header (or footer) without judging it. */
export function parseSparseHeader(buf: Uint8Array): SparseHeader {
  const dv = dataView(buf);
  const fields: HeaderField[] = [];
  const get = (name: keyof typeof HEADER_LAYOUT): number | bigint => {
    const [off, size] = HEADER_LAYOUT[name];
    const v =
      size === 8
        ? dv.getBigUint64(off, true)
        : size === 4
          ? dv.getUint32(off, true)
          : size === 2
            ? dv.getUint16(off, true)
            : dv.getUint8(off);
    fields.push({ name, offset: off, size, value: v });
    return v;
  };
  fields.push({ name: 'magicNumber', offset: 0, size: 4, value: String.fromCharCode(...buf.subarray(0, 4)) });
  const h: SparseHeader = {
    version: get('version') as number,
    flags: get('flags') as number,
    capacity: get('capacity') as bigint,
    grainSize: get('grainSize') as bigint,
    descriptorOffset: get('descriptorOffset') as bigint,
    descriptorSize: get('descriptorSize') as bigint,
    numGTEsPerGT: get('numGTEsPerGT') as number,
    rgdOffset: get('rgdOffset') as bigint,
    gdOffset: get('gdOffset') as bigint,
    overHead: get('overHead') as bigint,
    uncleanShutdown: get('uncleanShutdown') as number,
    newlineTest: [
      get('singleEndLineChar') as number,
      get('nonEndLineChar') as number,
      get('doubleEndLineChar1') as number,
      get('doubleEndLineChar2') as number,
    ],
    compressAlgorithm: get('compressAlgorithm') as number,
    fields,
  };
  return h;
}

/** The facts of a validated header, as safe numbers. */
export interface SparseGeometry {
  /** Extent size in sectors. */
  capacity: number;
  grainSectors: number;
  grainBytes: number;
  gtes: number;
  /** Guest bytes covered by one grain table. */
  gtCoverage: number;
  gdEntries: number;
  compressed: boolean;
  markers: boolean;
  zeroedGrains: boolean;
}

function corrupt(
  path: string,
  structure: string,
  field: string,
  what: string,
  kind: 'corrupt-image' | 'unsupported-feature' = 'corrupt-image',
): BlockError {
  return new BlockError(kind, `${path}: ${structure} ${what}`, { path, structure, field });
}

/**
 * Check every header field that sizes or locates something (§2, §3), in the
 * order that keeps later arithmetic safe: version, grain table size, grain
 * size, then the grain directory size (bounded like QEMU's "L1 size too big")
 * before the capacity is used as a byte count.
 */
export function validateSparseHeader(h: SparseHeader, path: string, structure = 'sparse header'): SparseGeometry {
  if (h.version < 1 || h.version > 3) {
    throw corrupt(path, structure, 'version', `has version ${h.version}; rblock reads VMDK sparse versions 1 to 3`, 'unsupported-feature');
  }
  if (h.compressAlgorithm !== C.COMPRESSION_NONE && h.compressAlgorithm !== C.COMPRESSION_DEFLATE) {
    throw corrupt(
      path,
      structure,
      'compressAlgorithm',
      `uses compression algorithm ${h.compressAlgorithm}; only 0 (none) and 1 (deflate) exist`,
      'unsupported-feature',
    );
  }
  const gtes = h.numGTEsPerGT;
  if (gtes === 0 || gtes > C.MAX_GTES_PER_GT) {
    throw corrupt(
      path,
      structure,
      'numGTEsPerGT',
      `says ${gtes} entries per grain table (must be 1 to ${C.MAX_GTES_PER_GT}); the header is corrupt`,
    );
  }
  const g = h.grainSize;
  if (g === 0n || (g & (g - 1n)) !== 0n || g > BigInt(C.MAX_GRAIN_SECTORS)) {
    throw corrupt(
      path,
      structure,
      'grainSize',
      `says a grain is ${g} sectors; it must be a power of two no larger than ${C.MAX_GRAIN_SECTORS} sectors; the header is corrupt`,
    );
  }
  const compressed = h.compressAlgorithm === C.COMPRESSION_DEFLATE;
  const grainBytes = Number(g) * C.SECTOR;
  if (compressed && grainBytes > C.MAX_COMPRESSED_GRAIN_BYTES) {
    throw corrupt(
      path,
      structure,
      'grainSize',
      `says compressed grains are ${grainBytes} bytes; rblock decompresses grains of at most ${C.MAX_COMPRESSED_GRAIN_BYTES} bytes`,
      'unsupported-feature',
    );
  }
  const span = BigInt(gtes) * g;
  const gdEntries = (h.capacity + span - 1n) / span;
  if (gdEntries > BigInt(C.MAX_GD_ENTRIES)) {
    throw corrupt(
      path,
      structure,
      'capacity',
      `capacity of ${h.capacity} sectors needs a grain directory of ${gdEntries} entries, more than the ${C.MAX_GD_ENTRIES} allowed (QEMU: 'L1 size too big'); the header is corrupt`,
    );
  }
  if (h.capacity * BigInt(C.SECTOR) > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw corrupt(path, structure, 'capacity', `capacity of ${h.capacity} sectors is too large`);
  }
  return {
    capacity: Number(h.capacity),
    grainSectors: Number(g),
    grainBytes,
    gtes,
    gtCoverage: gtes * grainBytes,
    gdEntries: Number(gdEntries),
    compressed,
    markers: (h.flags & C.FLAG_MARKERS) !== 0,
    zeroedGrains: (h.flags & C.FLAG_ZERO_GRAIN) !== 0,
  };
}

/** Flag bits as names, for inspect. */
export function flagNames(flags: number): string[] {
  const out: string[] = [];
  for (let b = 0; b < 32; b++) {
    const m = (1 << b) >>> 0;
    if ((flags & m) !== 0) out.push(`bit ${b}: ${C.FLAG_NAMES[m] ?? 'unknown'}`);
  }
  return out;
}
