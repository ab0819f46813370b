/**
 * Compressed clusters (spec §5): zlib is raw deflate with a 4 KiB window;
 * zstd is one frame. The input length is only sector-precise, so trailing
 * bytes after the stream belong to the next compressed cluster and are
 * ignored; the output must be exactly one cluster.
 *
 * zstd: node 20's zlib has no zstd. We use @bokuweb/zstd-wasm: the WebAssembly
 * ships inside the npm package, so nothing is downloaded or compiled at install
 * time (zstd-napi fetches a prebuilt binary or falls back to node-gyp).
 */
import { zlibCalls } from '../../util/zlib.js';
import { BlockError, type ErrorContext } from '../../block/errors.js';
import type { ZstdBatch } from './zstd-pool.js';

// The zstd library (its emscripten glue and wasm) and the compression worker
// pool are loaded on first use only: most images have no zstd cluster, and
// loading them cost every command ~15 ms of startup (more under load).
type ZstdLib = typeof import('@bokuweb/zstd-wasm');
let zstdLib: Promise<ZstdLib> | null = null;
function loadZstd(): Promise<ZstdLib> {
  // init() twice re-instantiates the wasm module under functions already bound to the first
  // instance, which then decode garbage: skip it when the application has initialised it already.
  zstdLib ??= import('@bokuweb/zstd-wasm').then(async (lib) => {
    if (!zstdUsable(lib)) await lib.init();
    return lib;
  });
  return zstdLib;
}

/** An empty zstd frame: single segment, content size 0, one empty raw last block. */
const EMPTY_FRAME = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x00, 0x01, 0x00, 0x00]);

function zstdUsable(lib: ZstdLib): boolean {
  try {
    return lib.decompress(EMPTY_FRAME, { defaultHeapSize: 1 }).length === 0;
  } catch {
    return false;
  }
}

function fail(ctx: ErrorContext & { path: string }, what: string, cause?: unknown): BlockError {
  const at = ctx.offset !== undefined ? ` at host offset 0x${ctx.offset.toString(16)}` : '';
  return new BlockError(
    'corrupt-image',
    `${ctx.path}: compressed cluster${at} does not decompress: ${what}`,
    { ...ctx, structure: 'compressed cluster' },
    cause,
  );
}

export async function decompressCluster(
  type: number,
  input: Uint8Array,
  clusterSize: number,
  ctx: ErrorContext & { path: string },
): Promise<Uint8Array> {
  let out: Uint8Array;
  if (type === 0) {
    try {
      // Z_SYNC_FLUSH: accept input that ends without the stream's final block marker being seen
      // (the sector-rounded length may cut nothing, but garbage after the end is fine too).
      const z = await zlibCalls();
      out = z.inflateRawSync(input, { finishFlush: z.constants.Z_SYNC_FLUSH, maxOutputLength: clusterSize });
    } catch (e) {
      throw fail(ctx, e instanceof Error ? e.message : String(e), e);
    }
  } else {
    const frameLen = zstdFrameLength(input, clusterSize);
    if (typeof frameLen === 'string') throw fail(ctx, frameLen);
    const zstd = await loadZstd();
    try {
      out = zstd.decompress(input.subarray(0, frameLen), { defaultHeapSize: clusterSize });
    } catch (e) {
      throw fail(ctx, e instanceof Error ? e.message : String(e), e);
    }
  }
  if (out.length !== clusterSize) throw fail(ctx, `got ${out.length} bytes, expected ${clusterSize}`);
  return out;
}

/**
 * Length of the zstd frame at the start of buf (RFC 8878 §3.1.1), or a reason
 * it is not a valid frame. Walking the block headers lets us hand the decoder
 * exactly one frame, and checking the content size first keeps a hostile
 * header from sizing an allocation.
 */
export function zstdFrameLength(buf: Uint8Array, maxContent: number): number | string {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (buf.length < 6 || dv.getUint32(0, true) !== 0xfd2fb528) return 'no zstd frame magic';
  const fhd = buf[4] as number;
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const dictFlag = fhd & 3;
  if (fhd & 0x08) return 'reserved bit set in frame header';
  // The decoder refuses windows above 2^30 on wasm32, and the wasm wrapper would then size its output
  // buffer from the error code: refuse them here.
  if (!single && 10 + ((buf[5] as number) >> 3) > 30) return 'window size too large';
  let pos = 5 + (single ? 0 : 1) + [0, 1, 2, 4][dictFlag]!;
  const fcsSize = [single ? 1 : 0, 2, 4, 8][fcsFlag]!;
  if (pos + fcsSize > buf.length) return 'truncated frame header';
  let content = -1;
  if (fcsSize === 1) content = buf[pos] as number;
  else if (fcsSize === 2) content = dv.getUint16(pos, true) + 256;
  else if (fcsSize === 4) content = dv.getUint32(pos, true);
  else if (fcsSize === 8) content = Number(dv.getBigUint64(pos, true));
  if (content > maxContent) return `frame content size ${content} is larger than a cluster`;
  pos += fcsSize;
  for (;;) {
    if (pos + 3 > buf.length) return 'truncated block header';
    const bh = (buf[pos] as number) | ((buf[pos + 1] as number) << 8) | ((buf[pos + 2] as number) << 16);
    const last = bh & 1;
    const btype = (bh >> 1) & 3;
    const bsize = bh >>> 3;
    if (btype === 3) return 'reserved block type';
    pos += 3 + (btype === 1 ? 1 : bsize);
    if (pos > buf.length) return 'truncated block';
    if (last) break;
  }
  pos += checksum ? 4 : 0;
  if (pos > buf.length) return 'truncated checksum';
  return pos;
}

let zstdPool: Promise<typeof import('./zstd-pool.js')> | null = null;

/**
 * Compress one cluster for writing (§5). zlib: raw deflate with a 4 KiB
 * window, so qemu's windowBits=-12 inflater accepts it; zstd: one frame with
 * its content size, as qemu writes it. Returns null when the result would not
 * be smaller than a cluster (qemu then stores the cluster uncompressed).
 */
export async function compressCluster(type: number, data: Uint8Array): Promise<Uint8Array | null> {
  let out: Uint8Array;
  if (type === 0) {
    out = await (await zlibCalls()).deflateRaw(data, { windowBits: 12, memLevel: 9 });
    return out.length < data.length - 1 ? out : null;
  }
  const b = await compressClusters(type, [data]);
  const c = b.out[0] ?? null;
  // A copy: the frame lives in a pooled buffer.
  const kept = c === null ? null : c.slice();
  b.release();
  return kept;
}

/**
 * compressCluster over several clusters at once, results in order (null:
 * store uncompressed): zstd clusters go to the worker pool in one batch per
 * worker; zlib ones run concurrently in the libuv pool. The compressed bytes
 * may live in pooled buffers: call release() once they are written.
 */
export async function compressClusters(type: number, chunks: Uint8Array[]): Promise<ZstdBatch> {
  if (type === 0) return { out: await Promise.all(chunks.map((c) => compressCluster(0, c))), release: () => {} };
  // Level 3: zstd's default, which qemu uses (qcow2_zstd_compress sets no level).
  zstdPool ??= import('./zstd-pool.js');
  return (await zstdPool).zstdCompressMany(chunks, 3);
}
