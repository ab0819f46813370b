/**
 * VMDK constants (spec digest /work/shared/specs/vmdk.md). Binary structures
 * are little-endian and count in 512-byte sectors.
 */

export const SECTOR = 512;

/** "KDMV" as bytes at offset 0 of a hosted sparse extent (§2). */
export const KDMV = 'KDMV';
/** "COWD": an ESX vmfsSparse extent (§6), refused. */
export const COWD = 'COWD';
/** seSparse const header magic, little-endian u64 0xCAFEBABE (§7), refused. */
export const SESPARSE_MAGIC = 0xcafebaben;

/** Size of the hosted sparse header (§2). */
export const HEADER_SIZE = 512;

/** Header flags (§2.1). */
export const FLAG_NL_DETECT = 1 << 0;
export const FLAG_RGD = 1 << 1;
export const FLAG_ZERO_GRAIN = 1 << 2;
export const FLAG_COMPRESSED = 1 << 16;
export const FLAG_MARKERS = 1 << 17;

export const FLAG_NAMES: Record<number, string> = {
  [FLAG_NL_DETECT]: 'valid newline detection',
  [FLAG_RGD]: 'redundant grain directory',
  [FLAG_ZERO_GRAIN]: 'zeroed-grain GTEs',
  [FLAG_COMPRESSED]: 'compressed grains',
  [FLAG_MARKERS]: 'markers',
};

/** compressAlgorithm values (§2). */
export const COMPRESSION_NONE = 0;
export const COMPRESSION_DEFLATE = 1;

/** gdOffset meaning "the grain directory is found through the footer" (§4.3). */
export const GD_AT_END = 0xffff_ffff_ffff_ffffn;

/** A grain table entry meaning "reads as zeros" when FLAG_ZERO_GRAIN is set (§3). */
export const GTE_ZEROED = 1;

/** Marker types (§4.1). */
export const MARKER_EOS = 0;
export const MARKER_GT = 1;
export const MARKER_GD = 2;
export const MARKER_FOOTER = 3;
export const MARKER_NAMES = ['end of stream', 'grain table', 'grain directory', 'footer'] as const;

/** Grain marker header: u64 lba + u32 size, then the compressed bytes (§4.1). */
export const GRAIN_MARKER_HEADER = 12;

// ---- Bounds on header-driven allocations (QEMU's limits, §3, and ours) ----

/** Most grain table entries per table: QEMU refuses more ("L2 table size too big"). */
export const MAX_GTES_PER_GT = 512;
/** Largest grain, in sectors: QEMU's "Invalid granularity" limit (1 GiB). */
export const MAX_GRAIN_SECTORS = 0x20_0000;
/** Largest compressed grain we decompress, in bytes: keeps the grain cache bounded. */
export const MAX_COMPRESSED_GRAIN_BYTES = 16 << 20;
/** Most grain directory entries: QEMU's "L1 size too big" limit (32 Mi entries, 128 MiB). */
export const MAX_GD_ENTRIES = 32 * 1024 * 1024;
/** Largest descriptor we read: a text descriptor is a few hundred bytes; QEMU reads at most 1 MiB. */
export const MAX_DESCRIPTOR_BYTES = 1 << 20;
/** Most extents named by one descriptor. */
export const MAX_EXTENTS = 4096;
