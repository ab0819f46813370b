/** qcow2 constants (QEMU docs/interop/qcow2.txt; our digest ../shared/specs/qcow2.md). */

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const V2_HEADER_LENGTH = 72;
export const MIN_V3_HEADER_LENGTH = 104;

// QEMU's limits (block/qcow2.h); they bound every allocation driven by a header field.
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const MAX_L1_BYTES = 32 << 20;
export const MAX_REFTABLE_BYTES = 8 << 20;
export const MAX_SNAPSHOTS = 65536;
export const MAX_SNAPSHOT_TABLE_BYTES = 64 << 20;
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY_BYTES = 64 << 20;
export const MAX_BACKING_NAME = 1023;

// Incompatible feature bits (§1.1).
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = 0x1fn;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

export const FEATURE_NAMES: Record<'incompatible' | 'compatible' | 'autoclear', Record<number, string>> = {
  incompatible: { 0: 'dirty bit', 1: 'corrupt bit', 2: 'external data file', 3: 'compression type', 4: 'extended L2 entries' },
  compatible: { 0: 'lazy refcounts' },
  autoclear: { 0: 'bitmaps', 1: 'raw external data' },
};

// Header extension types (§1.2).
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export const EXT_NAMES: Record<number, string> = {
  [EXT_BACKING_FORMAT]: 'backing file format',
  [EXT_FEATURE_TABLE]: 'feature name table',
  [EXT_BITMAPS]: 'bitmaps',
  [EXT_CRYPTO]: 'full disk encryption header pointer',
  [EXT_DATA_FILE]: 'external data file name',
};
