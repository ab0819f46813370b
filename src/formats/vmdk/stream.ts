/**
 * streamOptimized extents (spec digest §4): compressed grains behind grain
 * markers, metadata markers (grain table, grain directory, footer, end of
 * stream), and the footer that holds the real grain directory offset when the
 * header says GD_AT_END.
 */
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import { dataView } from '../../util/bytes.js';
import { zlibCalls } from '../../util/zlib.js';
import * as C from './constants.js';
import { hasKdmvMagic, parseSparseHeader, type SparseHeader } from './header.js';

export interface Marker {
  /** Byte offset of the marker in the file. */
  offset: number;
  kind: 'grain' | 'end of stream' | 'grain table' | 'grain directory' | 'footer' | 'unknown';
  /** Grain markers: the grain's first sector (lba); metadata markers: sectors that follow. */
  val: bigint;
  /** Grain markers: compressed bytes; 0 for metadata markers. */
  size: number;
  /** Metadata marker type (§4.1). */
  type?: number;
  /** Where the next marker starts. */
  next: number;
}

/** Decode the marker in the first 16 bytes of `sector`, which was read at `offset` (§4.1). */
export function decodeMarker(sector: Uint8Array, offset: number): Marker {
  const dv = dataView(sector);
  const val = dv.getBigUint64(0, true);
  const size = dv.getUint32(8, true);
  if (size > 0) {
    const end = offset + C.GRAIN_MARKER_HEADER + size;
    return { offset, kind: 'grain', val, size, next: Math.ceil(end / C.SECTOR) * C.SECTOR };
  }
  const type = dv.getUint32(12, true);
  const kind = type <= C.MARKER_FOOTER ? C.MARKER_NAMES[type]! : 'unknown';
  let next = offset + C.SECTOR;
  if (type === C.MARKER_GT || type === C.MARKER_GD || type === C.MARKER_FOOTER) {
    next += val <= BigInt(Math.floor(Number.MAX_SAFE_INTEGER / C.SECTOR)) ? Number(val) * C.SECTOR : Number.MAX_SAFE_INTEGER;
  }
  return { offset, kind, val, size, type, next };
}

/**
 * The footer of a stream whose header says GD_AT_END (§4.3): footer marker at
 * EOF - 1536, the footer (a header copy with the real gdOffset) at EOF - 1024,
 * the end-of-stream marker at EOF - 512. Checked as QEMU checks it.
 */
export async function readFooter(file: HostFile): Promise<{ footer: SparseHeader; offset: number }> {
  const path = file.path;
  const end = Math.floor(file.size / C.SECTOR) * C.SECTOR;
  const fail = (what: string): BlockError =>
    new BlockError(
      'corrupt-image',
      `${path}: the header says the grain directory is at the end (GD_AT_END) but the streamOptimized footer is invalid: ${what}; the file may be truncated`,
      { path, structure: 'streamOptimized footer' },
    );
  if (end < 3 * C.SECTOR + C.HEADER_SIZE) throw fail(`the file is only ${file.size} bytes`);
  const buf = new Uint8Array(3 * C.SECTOR);
  const at = end - buf.length;
  await file.readAt(buf, at);
  const fm = decodeMarker(buf.subarray(0, C.SECTOR), at);
  if (fm.size !== 0 || fm.type !== C.MARKER_FOOTER) throw fail(`no footer marker at offset ${at}`);
  if (!hasKdmvMagic(buf, C.SECTOR)) throw fail(`no KDMV magic in the footer at offset ${at + C.SECTOR}`);
  const eos = decodeMarker(buf.subarray(2 * C.SECTOR), at + 2 * C.SECTOR);
  if (eos.val !== 0n || eos.size !== 0 || eos.type !== C.MARKER_EOS) throw fail(`no end-of-stream marker at offset ${at + 2 * C.SECTOR}`);
  return { footer: parseSparseHeader(buf.subarray(C.SECTOR, 2 * C.SECTOR)), offset: at + C.SECTOR };
}

/**
 * Read and inflate the compressed grain at `offset` (§4.1, §4.2). With
 * markers, the grain marker gives the compressed length; without, up to two
 * grains are handed to zlib (as QEMU does). The payload is a zlib stream
 * (RFC 1950) despite the "deflate" name. The result is exactly one grain;
 * at least `want` bytes must come out of the stream (the final grain of an
 * extent may be shorter than a grain).
 */
export async function readCompressedGrain(
  file: HostFile,
  offset: number,
  grainBytes: number,
  markers: boolean,
  want: number,
): Promise<Uint8Array> {
  const path = file.path;
  const fail = (what: string, cause?: unknown): BlockError =>
    new BlockError(
      'corrupt-image',
      `${path}: compressed grain at offset 0x${offset.toString(16)} ${what}`,
      { path, structure: 'compressed grain', offset },
      cause,
    );
  const avail = file.size - offset;
  if (avail <= (markers ? C.GRAIN_MARKER_HEADER : 0)) throw fail(`is beyond the end of the file (${file.size} bytes)`);
  const limit = 2 * grainBytes;
  let buf = new Uint8Array(Math.min(avail, grainBytes + 4096, limit));
  await file.readAt(buf, offset);
  let data: Uint8Array;
  if (markers) {
    const size = dataView(buf).getUint32(8, true);
    if (size === 0) throw fail('has a marker with size 0 (a metadata marker where a grain was expected)');
    if (C.GRAIN_MARKER_HEADER + size > limit) throw fail(`claims ${size} compressed bytes, more than two grains`);
    if (C.GRAIN_MARKER_HEADER + size > avail) throw fail(`claims ${size} compressed bytes, past the end of the file`);
    if (C.GRAIN_MARKER_HEADER + size > buf.length) {
      buf = new Uint8Array(C.GRAIN_MARKER_HEADER + size);
      await file.readAt(buf, offset);
    }
    data = buf.subarray(C.GRAIN_MARKER_HEADER, C.GRAIN_MARKER_HEADER + size);
  } else {
    if (buf.length < Math.min(avail, limit)) {
      buf = new Uint8Array(Math.min(avail, limit));
      await file.readAt(buf, offset);
    }
    data = buf;
  }
  let out: Uint8Array;
  try {
    out = (await zlibCalls()).inflateSync(data, { maxOutputLength: grainBytes });
  } catch (e) {
    const msg =
      (e as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE'
        ? `inflates to more than one grain (${grainBytes} bytes)`
        : (e as Error).message;
    throw fail(`does not inflate: ${msg}`, e);
  }
  if (out.length < want) throw fail(`inflates to ${out.length} bytes, expected ${want}`);
  if (out.length === grainBytes) return out;
  const full = new Uint8Array(grainBytes);
  full.set(out);
  return full;
}

/**
 * Walk the markers of a stream from `start` (the first grain, at overHead),
 * for `inspect`: at most `limit` markers, stopping at the end of stream, at
 * an unknown marker or at the end of the file.
 */
export async function walkMarkers(file: HostFile, start: number, limit: number): Promise<{ markers: Marker[]; truncated: boolean }> {
  const markers: Marker[] = [];
  const sector = new Uint8Array(C.SECTOR);
  let pos = start;
  while (pos + C.SECTOR <= file.size) {
    if (markers.length >= limit) return { markers, truncated: true };
    await file.readAt(sector, pos);
    const m = decodeMarker(sector, pos);
    markers.push(m);
    if (m.kind === 'end of stream' || m.kind === 'unknown' || m.next <= pos) break;
    pos = m.next;
  }
  return { markers, truncated: false };
}
