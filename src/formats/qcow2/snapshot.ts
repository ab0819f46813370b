/** The internal snapshot table (spec §9): listed by `info`, decoded by `inspect`. */
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import { dataView, safeNumber } from '../../util/bytes.js';
import { MAX_SNAPSHOT_TABLE_BYTES } from './constants.js';
import type { Qcow2Header } from './header.js';

export interface Qcow2Snapshot {
  /** Offset of the entry in the file. */
  offset: number;
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  diskSize: number | null;
  icount: number | null;
  extraDataSize: number;
}

export async function readSnapshots(file: HostFile, h: Qcow2Header): Promise<Qcow2Snapshot[]> {
  const path = file.path;
  const out: Qcow2Snapshot[] = [];
  let off = h.snapshotsOffset;
  const structure = 'snapshot table';
  for (let i = 0; i < h.nbSnapshots; i++) {
    if (off - h.snapshotsOffset > MAX_SNAPSHOT_TABLE_BYTES) {
      throw new BlockError('corrupt-image', `${path}: snapshot table is larger than ${MAX_SNAPSHOT_TABLE_BYTES} bytes`, {
        path,
        structure,
      });
    }
    const fixed = new Uint8Array(40);
    await file.readExact(fixed, off, `snapshot table entry ${i}`);
    const dv = dataView(fixed);
    const idLen = dv.getUint16(12);
    const nameLen = dv.getUint16(14);
    const extraDataSize = dv.getUint32(36);
    if (extraDataSize > 1024) {
      throw new BlockError('corrupt-image', `${path}: snapshot table entry ${i} has ${extraDataSize} bytes of extra data (max 1024)`, {
        path,
        structure,
        field: 'extra_data_size',
        offset: off,
      });
    }
    const rest = new Uint8Array(extraDataSize + idLen + nameLen);
    await file.readExact(rest, off + 40, `snapshot table entry ${i}`);
    const rv = dataView(rest);
    const ctx = { path, structure, offset: off };
    const vmState32 = dv.getUint32(32);
    const vmStateSize = extraDataSize >= 8 ? safeNumber(rv.getBigUint64(0), { ...ctx, field: 'vm_state_size_large' }) : vmState32;
    const diskSize = extraDataSize >= 16 ? safeNumber(rv.getBigUint64(8), { ...ctx, field: 'disk_size' }) : null;
    const icountRaw = extraDataSize >= 24 ? rv.getBigInt64(16) : null;
    out.push({
      offset: off,
      l1TableOffset: safeNumber(dv.getBigUint64(0), { ...ctx, field: 'l1_table_offset' }),
      l1Size: dv.getUint32(8),
      id: Buffer.from(rest.subarray(extraDataSize, extraDataSize + idLen)).toString('utf8'),
      name: Buffer.from(rest.subarray(extraDataSize + idLen)).toString('utf8'),
      dateSec: dv.getUint32(16),
      dateNsec: dv.getUint32(20),
      vmClockNsec: safeNumber(dv.getBigUint64(24), { ...ctx, field: 'vm_clock_nsec' }),
      vmStateSize,
      diskSize,
      icount: icountRaw === null || icountRaw < 0n ? null : Number(icountRaw),
      extraDataSize,
    });
    off += Math.ceil((40 + rest.length) / 8) * 8;
  }
  return out;
}
