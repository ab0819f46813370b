/**
 * The qcow2 header (spec §1) and header extensions (§1.2), decoded with the
 * offset of every field so that `rblock inspect` can show where each lives.
 * Every field that later drives an allocation or a file read is bounded here.
 */
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import { cString, dataView, safeNumber } from '../../util/bytes.js';
import * as C from './constants.js';

export interface HeaderField {
  name: string;
  offset: number;
  size: number;
  value: number | bigint | string;
}

export interface HeaderExtension {
  type: number;
  name: string;
  /** Offset of the extension's 8-byte type/length prefix in the file. */
  offset: number;
  length: number;
  data: Uint8Array;
}

export interface FeatureName {
  type: 'incompatible' | 'compatible' | 'autoclear';
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  clusterSize: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Derived facts. */
  extendedL2: boolean;
  l2EntrySize: number;
  l2Entries: number;
  backingFile: string | null;
  backingFormat: string | null;
  dataFile: string | null;
  bitmaps: BitmapsExtension | null;
  crypto: { offset: number; length: number } | null;
  featureNames: FeatureName[];
  extensions: HeaderExtension[];
  fields: HeaderField[];
}

function bad(path: string, field: string, message: string, kind: 'invalid-image' | 'corrupt-image' = 'invalid-image'): BlockError {
  return new BlockError(kind, `${path}: qcow2 header field ${field} ${message}`, { path, structure: 'qcow2 header', field });
}

/** Names of the set bits of `mask` outside `known`, using the image's feature table when it has one. */
function unknownBits(mask: bigint, known: bigint, type: FeatureName['type'], table: FeatureName[]): string[] {
  const out: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    const m = 1n << BigInt(bit);
    if ((mask & m) !== 0n && (known & m) === 0n) {
      const named = table.find((f) => f.type === type && f.bit === bit);
      out.push(named ? `bit ${bit} (${named.name})` : `bit ${bit}`);
    }
  }
  return out;
}

export async function readHeader(file: HostFile): Promise<Qcow2Header> {
  const path = file.path;
  if (file.size < C.V2_HEADER_LENGTH) {
    throw new BlockError('invalid-image', `${path}: qcow2 header is truncated (file is ${file.size} bytes, the header needs 72)`, {
      path,
      structure: 'qcow2 header',
    });
  }
  const first = new Uint8Array(Math.min(file.size, 1 << C.MIN_CLUSTER_BITS));
  await file.readAt(first, 0);
  const dv = dataView(first);
  if (dv.getUint32(0) !== C.QCOW2_MAGIC) throw bad(path, 'magic', 'is not QFI\\xfb: not a qcow2 image');
  const version = dv.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw new BlockError('unsupported-feature', `${path}: qcow2 version ${version} is not supported (only 2 and 3)`, {
      path,
      structure: 'qcow2 header',
      field: 'version',
    });
  }
  const clusterBits = dv.getUint32(20);
  if (clusterBits < C.MIN_CLUSTER_BITS || clusterBits > C.MAX_CLUSTER_BITS) {
    throw bad(path, 'cluster_bits', `= ${clusterBits} is out of range (${C.MIN_CLUSTER_BITS}..${C.MAX_CLUSTER_BITS})`);
  }
  const clusterSize = 2 ** clusterBits;

  // The whole header, extensions and backing name live in cluster 0.
  const cluster0 = new Uint8Array(Math.min(file.size, clusterSize));
  await file.readAt(cluster0, 0);
  const v = dataView(cluster0);
  const fields: HeaderField[] = [];
  const f32 = (name: string, off: number): number => {
    const value = v.getUint32(off);
    fields.push({ name, offset: off, size: 4, value });
    return value;
  };
  const f64 = (name: string, off: number): bigint => {
    const value = v.getBigUint64(off);
    fields.push({ name, offset: off, size: 8, value });
    return value;
  };
  const num64 = (name: string, off: number): number => safeNumber(f64(name, off), { path, structure: 'qcow2 header', field: name });

  f32('magic', 0);
  f32('version', 4);
  const backingFileOffset = num64('backing_file_offset', 8);
  const backingFileSize = f32('backing_file_size', 16);
  f32('cluster_bits', 20);
  const size = num64('size', 24);
  const cryptMethod = f32('crypt_method', 32);
  const l1Size = f32('l1_size', 36);
  const l1TableOffset = num64('l1_table_offset', 40);
  const refcountTableOffset = num64('refcount_table_offset', 48);
  const refcountTableClusters = f32('refcount_table_clusters', 56);
  const nbSnapshots = f32('nb_snapshots', 60);
  const snapshotsOffset = num64('snapshots_offset', 64);

  let incompatible = 0n;
  let compatible = 0n;
  let autoclear = 0n;
  let refcountOrder = 4;
  let headerLength = C.V2_HEADER_LENGTH;
  let compressionType = 0;
  if (version === 3) {
    if (cluster0.length < C.MIN_V3_HEADER_LENGTH) throw bad(path, 'header_length', 'is beyond the end of the file (truncated v3 header)');
    incompatible = f64('incompatible_features', 72);
    compatible = f64('compatible_features', 80);
    autoclear = f64('autoclear_features', 88);
    refcountOrder = f32('refcount_order', 96);
    headerLength = f32('header_length', 100);
    if (headerLength < C.MIN_V3_HEADER_LENGTH || headerLength % 8 !== 0 || headerLength > clusterSize) {
      throw bad(path, 'header_length', `= ${headerLength} is invalid (must be >= 104, a multiple of 8 and fit in cluster 0)`);
    }
    if (headerLength > cluster0.length) throw bad(path, 'header_length', 'is beyond the end of the file (truncated header)');
    if (headerLength > 104) {
      compressionType = cluster0[104] as number;
      fields.push({ name: 'compression_type', offset: 104, size: 1, value: compressionType });
    }
  }
  if (refcountOrder > 6) throw bad(path, 'refcount_order', `= ${refcountOrder} is out of range (0..6)`);

  // Header extensions: from header_length up to the backing file name (or the end of cluster 0).
  const extensions: HeaderExtension[] = [];
  const extLimit = backingFileOffset > 0 ? Math.min(backingFileOffset, cluster0.length) : cluster0.length;
  let off = headerLength;
  while (off + 8 <= extLimit) {
    const type = v.getUint32(off);
    const length = v.getUint32(off + 4);
    if (type === C.EXT_END) break;
    if (off + 8 + length > extLimit) {
      throw new BlockError(
        'invalid-image',
        `${path}: qcow2 header extension ${'0x' + type.toString(16)} at offset ${off} (length ${length}) runs past cluster 0`,
        { path, structure: 'qcow2 header extension', offset: off },
      );
    }
    extensions.push({ type, name: C.EXT_NAMES[type] ?? 'unknown', offset: off, length, data: cluster0.slice(off + 8, off + 8 + length) });
    off += 8 + Math.ceil(length / 8) * 8;
  }

  const featureNames: FeatureName[] = [];
  let backingFormat: string | null = null;
  let dataFile: string | null = null;
  let bitmaps: BitmapsExtension | null = null;
  let crypto: { offset: number; length: number } | null = null;
  for (const ext of extensions) {
    const ed = dataView(ext.data);
    if (ext.type === C.EXT_BACKING_FORMAT) backingFormat = cString(ext.data);
    else if (ext.type === C.EXT_DATA_FILE) dataFile = cString(ext.data);
    else if (ext.type === C.EXT_FEATURE_TABLE) {
      const types = ['incompatible', 'compatible', 'autoclear'] as const;
      for (let i = 0; i + 48 <= ext.length; i += 48) {
        const t = types[ext.data[i] as number];
        if (t !== undefined)
          featureNames.push({ type: t, bit: ext.data[i + 1] as number, name: cString(ext.data.subarray(i + 2, i + 48)) });
      }
    } else if (ext.type === C.EXT_BITMAPS) {
      if (ext.length < 24) throw bad(path, 'bitmaps extension', `is ${ext.length} bytes, expected 24`);
      bitmaps = {
        nbBitmaps: ed.getUint32(0),
        directorySize: safeNumber(ed.getBigUint64(8), { path, structure: 'bitmaps extension', field: 'bitmap_directory_size' }),
        directoryOffset: safeNumber(ed.getBigUint64(16), { path, structure: 'bitmaps extension', field: 'bitmap_directory_offset' }),
      };
    } else if (ext.type === C.EXT_CRYPTO && ext.length >= 16) {
      crypto = {
        offset: safeNumber(ed.getBigUint64(0), { path, structure: 'crypto extension', field: 'offset' }),
        length: safeNumber(ed.getBigUint64(8), { path, structure: 'crypto extension', field: 'length' }),
      };
    }
  }

  const unknown = unknownBits(incompatible, C.INCOMPAT_KNOWN, 'incompatible', featureNames);
  if (unknown.length > 0) {
    throw new BlockError(
      'unsupported-feature',
      `${path}: qcow2 image uses unknown incompatible features: ${unknown.join(', ')}; refusing to open`,
      { path, structure: 'qcow2 header', field: 'incompatible_features' },
    );
  }
  if (compressionType > 1) {
    throw new BlockError('unsupported-feature', `${path}: unknown qcow2 compression_type ${compressionType}`, {
      path,
      structure: 'qcow2 header',
      field: 'compression_type',
    });
  }
  if (compressionType !== 0 && (incompatible & C.INCOMPAT_COMPRESSION) === 0n) {
    throw bad(path, 'compression_type', `= ${compressionType} but the compression type feature bit is clear`);
  }
  const extendedL2 = (incompatible & C.INCOMPAT_EXTL2) !== 0n;
  if (extendedL2 && clusterBits < 14)
    throw bad(path, 'cluster_bits', `= ${clusterBits} is too small for extended L2 entries (needs >= 14)`);

  // Structures located by the header: alignment and QEMU's size limits.
  const aligned = (name: string, value: number): void => {
    if (value % clusterSize !== 0) throw bad(path, name, `= ${value} is not aligned to the cluster size ${clusterSize}`, 'corrupt-image');
  };
  aligned('l1_table_offset', l1TableOffset);
  aligned('refcount_table_offset', refcountTableOffset);
  aligned('snapshots_offset', snapshotsOffset);
  if (l1Size * 8 > C.MAX_L1_BYTES) throw bad(path, 'l1_size', `= ${l1Size} is too large (more than ${C.MAX_L1_BYTES} bytes of L1 table)`);
  if (refcountTableClusters * clusterSize > C.MAX_REFTABLE_BYTES) {
    throw bad(path, 'refcount_table_clusters', `= ${refcountTableClusters} is too large (more than ${C.MAX_REFTABLE_BYTES} bytes)`);
  }
  if (nbSnapshots > C.MAX_SNAPSHOTS) throw bad(path, 'nb_snapshots', `= ${nbSnapshots} is too large (max ${C.MAX_SNAPSHOTS})`);

  const l2EntrySize = extendedL2 ? 16 : 8;
  const l2Entries = clusterSize / l2EntrySize;
  const needL1 = Math.ceil(size / (clusterSize * l2Entries));
  if (l1Size < needL1)
    throw bad(path, 'l1_size', `= ${l1Size} is too small for a virtual size of ${size} bytes (needs ${needL1})`, 'corrupt-image');
  if (!Number.isSafeInteger(size) || size > 2 ** 53 - 2 ** 30) throw bad(path, 'size', `= ${size} is too large`);

  let backingFile: string | null = null;
  if (backingFileOffset > 0) {
    if (backingFileSize > C.MAX_BACKING_NAME)
      throw bad(path, 'backing_file_size', `= ${backingFileSize} is too long (max ${C.MAX_BACKING_NAME})`);
    if (backingFileOffset + backingFileSize > clusterSize) throw bad(path, 'backing_file_offset', 'points outside cluster 0');
    if (backingFileOffset + backingFileSize > cluster0.length)
      throw bad(path, 'backing_file_offset', 'points beyond the end of the file (truncated)');
    backingFile = Buffer.from(cluster0.subarray(backingFileOffset, backingFileOffset + backingFileSize)).toString('utf8');
  }

  return {
    version,
    backingFileOffset,
    backingFileSize,
    clusterBits,
    clusterSize,
    size,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatible,
    compatible,
    autoclear,
    refcountOrder,
    headerLength,
    compressionType,
    extendedL2,
    l2EntrySize,
    l2Entries,
    backingFile,
    backingFormat,
    dataFile,
    bitmaps,
    crypto,
    featureNames,
    extensions,
    fields,
  };
}
