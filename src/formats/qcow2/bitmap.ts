/** The persistent dirty bitmap directory (spec §8): listed by `info` and `inspect`. */
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import { dataView, safeNumber } from '../../util/bytes.js';
import { AUTOCLEAR_BITMAPS, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES } from './constants.js';
import type { Qcow2Header } from './header.js';

export interface Qcow2Bitmap {
  offset: number;
  name: string;
  tableOffset: number;
  tableSize: number;
  flags: number;
  /** qemu-img's flag names: in-use, auto. */
  flagNames: string[];
  type: number;
  granularityBits: number;
  granularity: number;
}

export async function readBitmaps(file: HostFile, h: Qcow2Header): Promise<Qcow2Bitmap[]> {
  const ext = h.bitmaps;
  if (ext === null || (h.autoclear & AUTOCLEAR_BITMAPS) === 0n) return [];
  const path = file.path;
  const structure = 'bitmap directory';
  if (ext.nbBitmaps > MAX_BITMAPS || ext.directorySize > MAX_BITMAP_DIRECTORY_BYTES) {
    throw new BlockError(
      'corrupt-image',
      `${path}: bitmap directory of ${ext.nbBitmaps} bitmaps in ${ext.directorySize} bytes is too large (max ${MAX_BITMAPS} bitmaps, ${MAX_BITMAP_DIRECTORY_BYTES} bytes)`,
      { path, structure, field: ext.nbBitmaps > MAX_BITMAPS ? 'nb_bitmaps' : 'bitmap_directory_size' },
    );
  }
  const dir = new Uint8Array(ext.directorySize);
  await file.readExact(dir, ext.directoryOffset, structure);
  const dv = dataView(dir);
  const out: Qcow2Bitmap[] = [];
  let off = 0;
  for (let i = 0; i < ext.nbBitmaps; i++) {
    if (off + 24 > dir.length) {
      throw new BlockError('corrupt-image', `${path}: bitmap directory entry ${i} runs past the directory`, {
        path,
        structure,
        offset: ext.directoryOffset + off,
      });
    }
    const nameSize = dv.getUint16(off + 18);
    const extra = dv.getUint32(off + 20);
    const end = off + 24 + extra + nameSize;
    if (end > dir.length) {
      throw new BlockError('corrupt-image', `${path}: bitmap directory entry ${i} runs past the directory`, {
        path,
        structure,
        offset: ext.directoryOffset + off,
      });
    }
    const flags = dv.getUint32(off + 12);
    const flagNames: string[] = [];
    if (flags & 1) flagNames.push('in-use');
    if (flags & 2) flagNames.push('auto');
    const granularityBits = dir[off + 17] as number;
    out.push({
      offset: ext.directoryOffset + off,
      name: Buffer.from(dir.subarray(off + 24 + extra, end)).toString('utf8'),
      tableOffset: safeNumber(dv.getBigUint64(off), { path, structure, field: 'bitmap_table_offset' }),
      tableSize: dv.getUint32(off + 8),
      flags,
      flagNames,
      type: dir[off + 16] as number,
      granularityBits,
      granularity: 2 ** granularityBits,
    });
    off = Math.ceil(end / 8) * 8;
  }
  return out;
}
