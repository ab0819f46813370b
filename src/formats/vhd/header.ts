/**
 * The dynamic disk header (spec digest §3) of dynamic and differencing disks,
 * with its parent locator entries (§3.1). Every field that sizes a read or an
 * allocation is bounded here, before anything is allocated: afl5.img claims
 * 2^30 + 1 BAT entries.
 */
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import { hex, safeNumber } from '../../util/bytes.js';
import { DYN_HEADER_COOKIE, DYN_HEADER_SIZE, MAX_TABLE_ENTRIES, SECTOR, fourcc, formatUuid, vhdChecksum, vhdTime } from './constants.js';
import { FieldReader, type VhdField } from './fields.js';
import type { VhdFooter } from './footer.js';

export interface ParentLocatorEntry {
  index: number;
  /** File offset of the 24-byte entry. */
  offset: number;
  platformCode: number;
  platform: string;
  /** Bytes reserved (sectors, by the letter of the spec; see §3.1). */
  dataSpace: number;
  dataLength: number;
  dataOffset: number;
  fields: VhdField[];
}

export interface DynamicHeader {
  offset: number;
  cookie: string;
  tableOffset: number;
  headerVersion: number;
  maxTableEntries: number;
  blockSize: number;
  checksum: number;
  computedChecksum: number;
  parentUuid: Uint8Array;
  parentTimestamp: number;
  /** §3: UTF-16 big-endian, NUL-padded. */
  parentName: string;
  /** The non-empty parent locator entries. */
  locators: ParentLocatorEntry[];
  fields: VhdField[];
  /** §5: bytes of sector bitmap before each block's data (a whole number of sectors). */
  bitmapSize: number;
  sectorsPerBlock: number;
}

const STRUCT = 'VHD dynamic disk header';

function bad(path: string, field: string, message: string, offset: number, kind: 'invalid-image' | 'corrupt-image' = 'invalid-image') {
  return new BlockError(kind, `${path}: ${STRUCT} field ${field} ${message}`, { path, structure: STRUCT, field, offset });
}

/** UTF-16BE, up to the first NUL. */
function utf16be(b: Uint8Array): string {
  const swapped = Buffer.from(b);
  swapped.swap16();
  const s = swapped.toString('utf16le');
  const nul = s.indexOf('\0');
  return nul < 0 ? s : s.slice(0, nul);
}

/**
 * Read and check the dynamic disk header named by the footer. `virtualSize`
 * is the size decided from the footer: the BAT must cover it.
 */
export async function readDynamicHeader(file: HostFile, footer: VhdFooter, virtualSize: number): Promise<DynamicHeader> {
  const path = file.path;
  const offset = safeNumber(footer.dataOffset, { path, structure: 'VHD footer', field: 'data_offset' });
  if (offset >= file.size) {
    throw new BlockError(
      'invalid-image',
      `${path}: VHD footer field data_offset = ${offset} points past the end of the file (${file.size} bytes): no ${STRUCT} there`,
      { path, structure: 'VHD footer', field: 'data_offset', offset: footer.offset + 16 },
    );
  }
  // Read what there is: the fields that bound allocations are checked before truncation and checksum.
  const buf = new Uint8Array(DYN_HEADER_SIZE);
  await file.readAt(buf, offset);
  const r = new FieldReader(buf, offset);
  const cookie = r.ascii('cookie', 0, 8);
  r.u64('data_offset', 8);
  const tableOffset64 = r.u64('table_offset', 16);
  const headerVersion = r.u32('header_version', 24);
  const maxTableEntries = r.u32('max_table_entries', 28);
  const blockSize = r.u32('block_size', 32);
  const checksum = r.u32('checksum', 36);
  const parentUuid = r.bytes('parent_unique_id', 40, 16, formatUuid);
  const parentTimestamp = r.u32('parent_timestamp', 56);
  r.u32('reserved', 60);
  const parentName = utf16be(buf.subarray(64, 576));
  r.bytes('parent_unicode_name', 64, 512, () => parentName);

  r.explain('data_offset', 'unused');
  r.explain('header_version', `${headerVersion >>> 16}.${headerVersion & 0xffff}`);
  if (parentTimestamp !== 0) r.explain('parent_timestamp', vhdTime(parentTimestamp));
  const computedChecksum = vhdChecksum(buf, 36);
  r.explain('checksum', checksum === computedChecksum ? 'ok' : `BAD: the bytes add up to ${hex(computedChecksum, 8)}`);

  if (cookie !== DYN_HEADER_COOKIE) {
    throw bad(
      path,
      'cookie',
      `is '${cookie}', not '${DYN_HEADER_COOKIE}' (at offset ${offset}, named by the footer's data_offset)`,
      offset,
    );
  }
  if (blockSize < SECTOR || (blockSize & (blockSize - 1)) !== 0) {
    throw bad(path, 'block_size', `= ${blockSize} is not a power of two of at least 512 bytes`, offset + 32);
  }
  if (maxTableEntries > MAX_TABLE_ENTRIES) {
    throw bad(path, 'max_table_entries', `= ${maxTableEntries} is too large (more than ${MAX_TABLE_ENTRIES}, qemu's limit)`, offset + 28);
  }
  if (maxTableEntries * blockSize < virtualSize) {
    throw bad(
      path,
      'max_table_entries',
      `= ${maxTableEntries} is too small: ${maxTableEntries} blocks of ${blockSize} bytes do not cover the virtual size of ${virtualSize} bytes`,
      offset + 28,
      'corrupt-image',
    );
  }
  if (offset + DYN_HEADER_SIZE > file.size) {
    throw new BlockError(
      'invalid-image',
      `${path}: ${STRUCT} at offset ${offset} (1024 bytes) is beyond the end of the file (${file.size} bytes); the file may be truncated`,
      { path, structure: STRUCT, offset },
    );
  }
  if (checksum !== computedChecksum) {
    throw new BlockError(
      'corrupt-image',
      `${path}: ${STRUCT} at offset ${offset} has checksum ${hex(checksum, 8)} but its bytes add up to ${hex(computedChecksum, 8)}; the header is damaged`,
      { path, structure: STRUCT, field: 'checksum', offset: offset + 36 },
    );
  }
  const tableOffset = safeNumber(tableOffset64, { path, structure: STRUCT, field: 'table_offset' });
  if (tableOffset + maxTableEntries * 4 > file.size) {
    throw new BlockError(
      'invalid-image',
      `${path}: BAT at offset ${tableOffset} (${maxTableEntries} entries, ${maxTableEntries * 4} bytes) is beyond the end of the file (${file.size} bytes); the file may be truncated or table_offset is wrong`,
      { path, structure: 'BAT', field: 'table_offset', offset: offset + 16 },
    );
  }

  const locators: ParentLocatorEntry[] = [];
  for (let i = 0; i < 8; i++) {
    const rel = 576 + i * 24;
    const lr = new FieldReader(buf.subarray(rel, rel + 24), offset + rel);
    const platformCode = lr.u32('platform_code', 0);
    const dataSpace = lr.u32('platform_data_space', 4);
    const dataLength = lr.u32('platform_data_length', 8);
    lr.u32('reserved', 12);
    const dataOffset64 = lr.u64('platform_data_offset', 16);
    if (platformCode === 0 && dataLength === 0 && dataOffset64 === 0n) continue;
    const entry: ParentLocatorEntry = {
      index: i,
      offset: offset + rel,
      platformCode,
      platform: fourcc(platformCode),
      dataSpace,
      dataLength,
      dataOffset: safeNumber(dataOffset64, { path, structure: `parent locator ${i}`, field: 'platform_data_offset' }),
      fields: lr.fields,
    };
    lr.explain('platform_code', fourcc(platformCode));
    for (const f of entry.fields) f.name = `parent_locator[${i}].${f.name}`;
    locators.push(entry);
  }
  const sectorsPerBlock = blockSize / SECTOR;
  return {
    offset,
    cookie,
    tableOffset,
    headerVersion,
    maxTableEntries,
    blockSize,
    checksum,
    computedChecksum,
    parentUuid,
    parentTimestamp,
    parentName,
    locators,
    fields: r.fields,
    // §5: ceil(sectors / 8) bytes, rounded up to a whole sector (qemu computes 0 for blocks under 4 KiB; see docs/vhd.md).
    bitmapSize: Math.ceil(Math.ceil(sectorsPerBlock / 8) / SECTOR) * SECTOR,
    sectorsPerBlock,
  };
}
