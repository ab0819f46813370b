/**
 * Creating qcow2 images (qemu-img create -f qcow2). Layout as qemu makes it
 * (spec digest §2): header and extensions in cluster 0, the refcount table,
 * the refcount blocks, then the L1 table (not padded to a cluster). With
 * preallocation the L2 tables and data clusters follow.
 */
import { open } from 'node:fs/promises';
import { BlockError, fromSystemError } from '../../block/errors.js';
import { dataView } from '../../util/bytes.js';
import * as C from './constants.js';
import { Refcounts } from './refcount.js';

export interface Qcow2CreateOptions {
  size: number;
  clusterSize?: number;
  refcountBits?: number;
  /** '0.10' (v2) or '1.1' (v3, default). */
  compat?: '0.10' | '1.1';
  extendedL2?: boolean;
  compressionType?: 'zlib' | 'zstd';
  lazyRefcounts?: boolean;
  preallocation?: 'off' | 'metadata' | 'full';
  /** External data file name (stored as given; resolved relative to the image). */
  dataFile?: string;
  dataFileRaw?: boolean;
  backingFile?: string;
  backingFormat?: string;
}

const FEATURE_TABLE: [number, number, string][] = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

function invalid(path: string, msg: string): BlockError {
  return new BlockError('invalid-argument', `${path}: ${msg}`, { path, op: 'create' });
}

function log2(n: number): number {
  return Math.round(Math.log2(n));
}

/** Header extension: type, length, data padded to 8 bytes (§1.2). */
function ext(type: number, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(8 + Math.ceil(data.length / 8) * 8);
  dataView(out).setUint32(0, type);
  dataView(out).setUint32(4, data.length);
  out.set(data, 8);
  return out;
}

export async function createQcow2(path: string, o: Qcow2CreateOptions): Promise<void> {
  const cs = o.clusterSize ?? 65536;
  const v3 = (o.compat ?? '1.1') === '1.1';
  const refBits = o.refcountBits ?? 16;
  const extL2 = o.extendedL2 ?? false;
  const zstd = (o.compressionType ?? 'zlib') === 'zstd';
  const prealloc = o.preallocation ?? 'off';
  if (!Number.isSafeInteger(o.size) || o.size < 0) throw invalid(path, `invalid size ${o.size}`);
  if (!Number.isInteger(Math.log2(cs)) || cs < 512 || cs > 2 << 20)
    throw invalid(path, `cluster size ${cs} must be a power of two between 512 and 2M`);
  if (!Number.isInteger(Math.log2(refBits)) || refBits < 1 || refBits > 64)
    throw invalid(path, `refcount bits ${refBits} must be a power of two up to 64`);
  if (!v3 && (refBits !== 16 || extL2 || zstd || o.lazyRefcounts || o.dataFile !== undefined)) {
    throw invalid(path, 'compat=0.10 supports none of refcount_bits other than 16, extended_l2, zstd, lazy_refcounts, data_file');
  }
  if (extL2 && cs < 16384) throw invalid(path, 'extended_l2 needs a cluster size of at least 16K');
  if (o.dataFileRaw && o.dataFile === undefined) throw invalid(path, 'data_file_raw needs data_file');
  if (o.dataFile !== undefined && o.backingFile !== undefined && o.dataFileRaw)
    throw invalid(path, 'data_file_raw cannot be used with a backing file');
  if (o.backingFile !== undefined && Buffer.byteLength(o.backingFile) > C.MAX_BACKING_NAME)
    throw invalid(path, 'backing file name is too long');

  const l2Entries = cs / (extL2 ? 16 : 8);
  const l1Size = Math.ceil(o.size / (cs * l2Entries));
  if (l1Size * 8 > C.MAX_L1_BYTES)
    throw invalid(path, `size ${o.size} needs an L1 table larger than 32 MiB with ${cs}-byte clusters; use bigger clusters`);
  const l1Clusters = Math.ceil((l1Size * 8) / cs);
  const perBlock = (cs * 8) / refBits;
  const external = o.dataFile !== undefined;
  // Raw external data means every guest cluster is mapped (qemu does the same).
  const mapAll = prealloc !== 'off' || (o.dataFileRaw ?? false);
  const l2Tables = mapAll ? l1Size : 0;
  const dataClusters = mapAll && !external ? Math.ceil(o.size / cs) : 0;

  // Fixed point: the refcount blocks and table must count themselves.
  let rbc = 1;
  let rtc = 1;
  for (;;) {
    const total = 1 + rtc + rbc + l1Clusters + l2Tables + dataClusters;
    const needRbc = Math.ceil(total / perBlock);
    const needRtc = Math.ceil((needRbc * 8) / cs);
    if (needRbc <= rbc && needRtc <= rtc) break;
    rbc = Math.max(rbc, needRbc);
    rtc = Math.max(rtc, needRtc);
  }
  if (rtc * cs > C.MAX_REFTABLE_BYTES)
    throw invalid(path, 'the image is too large for its refcount table; use bigger clusters or wider refcounts');
  const reftableAt = 1;
  const refblocksAt = reftableAt + rtc;
  const l1At = refblocksAt + rbc;
  const l2At = l1At + l1Clusters;
  const dataAt = l2At + l2Tables;
  const metaClusters = dataAt + dataClusters;

  // Cluster 0: header, extensions, backing file name.
  const c0 = new Uint8Array(cs);
  const dv = dataView(c0);
  const headerLength = v3 ? 112 : 72;
  dv.setUint32(0, C.QCOW2_MAGIC);
  dv.setUint32(4, v3 ? 3 : 2);
  dv.setUint32(20, log2(cs));
  dv.setBigUint64(24, BigInt(o.size));
  dv.setUint32(36, l1Size);
  dv.setBigUint64(40, BigInt(l1At * cs));
  dv.setBigUint64(48, BigInt(reftableAt * cs));
  dv.setUint32(56, rtc);
  if (v3) {
    let incompat = 0n;
    if (external) incompat |= C.INCOMPAT_DATA_FILE;
    if (zstd) incompat |= C.INCOMPAT_COMPRESSION;
    if (extL2) incompat |= C.INCOMPAT_EXTL2;
    dv.setBigUint64(72, incompat);
    dv.setBigUint64(80, o.lazyRefcounts ? C.COMPAT_LAZY_REFCOUNTS : 0n);
    dv.setBigUint64(88, o.dataFileRaw ? C.AUTOCLEAR_DATA_FILE_RAW : 0n);
    dv.setUint32(96, log2(refBits));
    dv.setUint32(100, headerLength);
    c0[104] = zstd ? 1 : 0;
  }
  const exts: Uint8Array[] = [];
  if (o.backingFile !== undefined && o.backingFormat !== undefined) exts.push(ext(C.EXT_BACKING_FORMAT, Buffer.from(o.backingFormat)));
  if (o.dataFile !== undefined) exts.push(ext(C.EXT_DATA_FILE, Buffer.from(o.dataFile)));
  // qemu 7.2 writes the feature name table only with clusters above 4 KiB (observed; we match its bytes).
  if (v3 && cs > 4096) {
    const table = new Uint8Array(48 * FEATURE_TABLE.length);
    FEATURE_TABLE.forEach(([type, bit, name], i) => {
      table[i * 48] = type;
      table[i * 48 + 1] = bit;
      table.set(Buffer.from(name), i * 48 + 2);
    });
    exts.push(ext(C.EXT_FEATURE_TABLE, table));
  }
  let off = headerLength;
  for (const e of exts) {
    c0.set(e, off);
    off += e.length;
  }
  off += 8; // end-of-extensions marker (zeros)
  if (o.backingFile !== undefined) {
    const name = Buffer.from(o.backingFile);
    if (off + name.length > cs) throw invalid(path, 'header, extensions and backing file name do not fit in one cluster');
    c0.set(name, off);
    dv.setBigUint64(8, BigInt(off));
    dv.setUint32(16, name.length);
  }

  // Refcount table and blocks: every cluster written here has refcount 1.
  const reftable = new Uint8Array(rtc * cs);
  for (let i = 0; i < rbc; i++) dataView(reftable).setBigUint64(i * 8, BigInt((refblocksAt + i) * cs));
  const refblocks = new Uint8Array(rbc * cs);
  for (let ci = 0; ci < metaClusters; ci++) {
    const b = Math.floor(ci / perBlock);
    Refcounts.setEntry(refblocks.subarray(b * cs, (b + 1) * cs), ci % perBlock, refBits, 1);
  }

  // L1 (and with preallocation, L2 tables pointing at consecutive data clusters).
  const COPIED = 1n << 63n;
  const l1 = new Uint8Array(l1Size * 8);
  const l2 = new Uint8Array(l2Tables * cs);
  for (let i = 0; i < l2Tables; i++) {
    dataView(l1).setBigUint64(i * 8, BigInt((l2At + i) * cs) | COPIED);
    const t = dataView(l2);
    for (let j = 0; j < l2Entries; j++) {
      const guestCluster = i * l2Entries + j;
      if (guestCluster * cs >= o.size) break;
      const host = external ? guestCluster * cs : (dataAt + guestCluster) * cs;
      t.setBigUint64((i * l2Entries + j) * (extL2 ? 16 : 8), BigInt(host) | COPIED);
      // Extended L2: all 32 subclusters allocated.
      if (extL2) t.setBigUint64((i * l2Entries + j) * 16 + 8, 0xffff_ffffn);
    }
  }

  let fh;
  try {
    fh = await open(path, 'wx');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') {
      fh = await open(path, 'w').catch((e2: unknown) => {
        throw fromSystemError(e2, path, 'create');
      });
    } else throw fromSystemError(e, path, 'create');
  }
  try {
    await fh.write(c0, 0, cs, 0);
    await fh.write(reftable, 0, reftable.length, reftableAt * cs);
    await fh.write(refblocks, 0, refblocks.length, refblocksAt * cs);
    if (l1.length > 0) await fh.write(l1, 0, l1.length, l1At * cs);
    if (l2.length > 0) await fh.write(l2, 0, l2.length, l2At * cs);
    if (dataClusters > 0) {
      await fh.truncate(metaClusters * cs);
      if (prealloc === 'full') {
        const z = new Uint8Array(Math.min(8 << 20, dataClusters * cs));
        for (let p = dataAt * cs; p < metaClusters * cs; p += z.length) await fh.write(z, 0, Math.min(z.length, metaClusters * cs - p), p);
      }
    }
    await fh.datasync();
  } catch (e) {
    throw fromSystemError(e, path, 'create');
  } finally {
    await fh.close();
  }
}
