/**
 * VHD (Virtual PC, qemu's "vpc") constants, from the spec digest
 * (../shared/specs/vhd.md). All integers on disk are big-endian; a sector is
 * 512 bytes.
 */

export const SECTOR = 512;

/** §2: the hard disk footer. */
export const FOOTER_SIZE = 512;
export const FOOTER_COOKIE = 'conectix';
/** §1: Virtual PC before 2004 wrote a 511-byte footer on fixed disks. */
export const OLD_FOOTER_SIZE = 511;

/** §3: the dynamic disk header. */
export const DYN_HEADER_SIZE = 1024;
export const DYN_HEADER_COOKIE = 'cxsparse';

/** §0: the three disk types (0 none, 1/5/6 deprecated). */
export const DISK_FIXED = 2;
export const DISK_DYNAMIC = 3;
export const DISK_DIFFERENCING = 4;

export const DISK_TYPE_NAMES: Record<number, string> = {
  0: 'none',
  1: 'deprecated (1)',
  2: 'fixed',
  3: 'dynamic',
  4: 'differencing',
  5: 'deprecated (5)',
  6: 'deprecated (6)',
};

/** §0: timestamps count seconds from 2000-01-01 00:00:00 UTC. */
export const VHD_EPOCH = 946684800;

/** §4: a BAT entry with this value is a block that is not allocated. */
export const BAT_UNUSED = 0xffff_ffff;

/** §2.2: the largest CHS geometry, 65535 x 16 x 255 sectors (~127.5 GiB). */
export const MAX_CHS_C = 65535;
export const MAX_CHS_H = 16;
export const MAX_CHS_S = 255;
export const MAX_GEOMETRY_SECTORS = MAX_CHS_C * MAX_CHS_H * MAX_CHS_S;

/** §7: qemu's VHD_MAX_SECTORS, 2040 GiB: larger images are refused. */
export const MAX_SECTORS = 0xff00_0000;

/**
 * qemu refuses more BAT entries than INT_MAX / 4 ("Max Table Entries too
 * large"); afl5.img claims 2^30 + 1. We refuse the same, before allocating.
 */
export const MAX_TABLE_ENTRIES = Math.floor(0x7fff_ffff / 4);

/**
 * §2.1: creator applications whose images qemu sizes from the footer's
 * current_size rather than from the CHS geometry: Hyper-V, QEMU with
 * force_size, Disk2vhd, XenConverter, XenServer (qemu 7.2), and Azure
 * ('wa\0\0', added by later qemu; see docs/vhd.md).
 */
export const CURRENT_SIZE_CREATORS: readonly string[] = ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0', 'wa\0\0'];

/** §3.1: parent locator platform codes. */
export const PLATFORM_NONE = 0;
export const PLATFORM_WI2K = 0x5769_326b; // 'Wi2k' absolute path, ANSI (deprecated)
export const PLATFORM_WI2R = 0x5769_3272; // 'Wi2r' relative path, ANSI (deprecated)
export const PLATFORM_W2KU = 0x5732_6b75; // 'W2ku' absolute path, UTF-16LE
export const PLATFORM_W2RU = 0x5732_7275; // 'W2ru' relative path, UTF-16LE
export const PLATFORM_MAC = 0x4d61_6320; // 'Mac ' Mac OS alias blob
export const PLATFORM_MACX = 0x4d61_6358; // 'MacX' file:// URL, UTF-8

/** Locator data longer than this is refused: a path is never that long. */
export const MAX_LOCATOR_BYTES = 64 * 1024;

/** The four-character code of a u32, with non-printable bytes escaped. */
export function fourcc(v: number): string {
  let s = '';
  for (const shift of [24, 16, 8, 0]) {
    const c = (v >>> shift) & 0xff;
    s += c >= 0x20 && c < 0x7f ? String.fromCharCode(c) : `\\x${c.toString(16).padStart(2, '0')}`;
  }
  return s;
}

/** §0: ones' complement of the byte sum, the checksum field (at `skip`, 4 bytes) counted as zero. */
export function vhdChecksum(buf: Uint8Array, skip: number): number {
  let sum = 0;
  for (let i = 0; i < buf.length; i++) {
    if (i >= skip && i < skip + 4) continue;
    sum = (sum + (buf[i] as number)) >>> 0;
  }
  return ~sum >>> 0;
}

/** A 16-byte unique id in the usual 8-4-4-4-12 form. */
export function formatUuid(b: Uint8Array): string {
  const h = Buffer.from(b).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}

/** A VHD timestamp as an ISO date. */
export function vhdTime(seconds: number): string {
  return new Date((VHD_EPOCH + seconds) * 1000).toISOString().replace('.000Z', 'Z');
}
