/**
 * Rewriting the backing file name and format in place (rebase). The header
 * extensions are rebuilt in qemu's order (spec digest §1.2: backing format,
 * external data file, encryption, feature table, bitmaps, unknown ones, end
 * marker, then the backing name), keeping every extension we do not change.
 */
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import { dataView } from '../../util/bytes.js';
import * as C from './constants.js';
import type { Qcow2Header } from './header.js';

const ORDER = [C.EXT_BACKING_FORMAT, C.EXT_DATA_FILE, C.EXT_CRYPTO, C.EXT_FEATURE_TABLE, C.EXT_BITMAPS];

export async function rewriteBacking(file: HostFile, h: Qcow2Header, backing: { name: string; format?: string } | null): Promise<void> {
  const cs = h.clusterSize;
  const exts: { type: number; data: Uint8Array }[] = [];
  if (backing?.format !== undefined) exts.push({ type: C.EXT_BACKING_FORMAT, data: Buffer.from(backing.format) });
  const kept = h.extensions.filter((e) => e.type !== C.EXT_BACKING_FORMAT);
  kept.sort((a, b) => rank(a.type) - rank(b.type));
  for (const e of kept) exts.push({ type: e.type, data: e.data });
  const name = backing === null ? new Uint8Array(0) : Buffer.from(backing.name);
  if (name.length > C.MAX_BACKING_NAME)
    throw new BlockError('invalid-argument', `${file.path}: backing file name is too long`, { path: file.path });
  let len = 0;
  for (const e of exts) len += 8 + Math.ceil(e.data.length / 8) * 8;
  len += 8 + name.length;
  // Clear what the old extensions and name occupied too.
  const oldEnd = Math.max(h.backingFileOffset + h.backingFileSize, ...h.extensions.map((e) => e.offset + 8 + e.length), h.headerLength + 8);
  const area = new Uint8Array(Math.max(len, oldEnd - h.headerLength));
  if (h.headerLength + area.length > cs) {
    throw new BlockError('invalid-argument', `${file.path}: header extensions and backing file name would not fit in cluster 0`, {
      path: file.path,
    });
  }
  const dv = dataView(area);
  let off = 0;
  for (const e of exts) {
    dv.setUint32(off, e.type);
    dv.setUint32(off + 4, e.data.length);
    area.set(e.data, off + 8);
    off += 8 + Math.ceil(e.data.length / 8) * 8;
  }
  off += 8; // end marker
  const nameOffset = backing === null ? 0 : h.headerLength + off;
  area.set(name, off);
  await file.writeAt(area, h.headerLength);
  const fields = new Uint8Array(12);
  dataView(fields).setBigUint64(0, BigInt(nameOffset));
  dataView(fields).setUint32(8, name.length);
  await file.writeAt(fields, 8);
  await file.sync();
  h.backingFileOffset = nameOffset;
  h.backingFileSize = name.length;
  h.backingFile = backing === null ? null : backing.name;
  h.backingFormat = backing?.format ?? null;
}

function rank(type: number): number {
  const i = ORDER.indexOf(type);
  return i < 0 ? ORDER.length : i;
}
