/**
 * Worker thread body for zstd-pool.ts: compresses batches of clusters with
 * zstd-wasm off the main thread.
 *
 * Speed: one compression context is created once and reused for every
 * cluster. ZSTD_compress() sets up (and frees) a whole context per call,
 * which in the wasm build costs about twice the compression itself;
 * ZSTD_compress_usingDict with no dictionary is what ZSTD_compress calls
 * internally, so the frames are byte-identical.
 *
 * Memory: nothing is allocated per cluster. The batch buffer comes in
 * transferred, each compressed frame is written back into it right behind the
 * previous one (a frame is kept only when smaller than its input, so it never
 * reaches input not yet compressed), and the same buffer goes back. The wasm
 * input and output areas are allocated once.
 */
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { parentPort } from 'node:worker_threads';
import { init, createCCtx, compressUsingDict } from '@bokuweb/zstd-wasm';

/** A batch: `lens[i]` bytes of `data` per cluster, in order. */
export interface ZstdRequest {
  id: number;
  data: Uint8Array;
  lens: number[];
  level: number;
}

/**
 * The batch buffer back, now holding the kept frames back to back; lens[i] is
 * the length of cluster i's frame, or -1 when compressing did not make it
 * smaller than its input minus one byte (qemu then stores it uncompressed).
 */
export interface ZstdReply {
  id: number;
  data?: Uint8Array;
  lens?: number[];
  error?: string;
}

/** The emscripten module under @bokuweb/zstd-wasm's wrappers: the C API on the wasm heap. */
interface ZstdModule {
  HEAPU8: Uint8Array;
  _malloc(n: number): number;
  _ZSTD_compressBound(n: number): number;
  _ZSTD_isError(code: number): number;
  _ZSTD_compress_usingDict(
    cctx: number,
    dst: number,
    cap: number,
    src: number,
    n: number,
    dict: number,
    dictSize: number,
    level: number,
  ): number;
}

/**
 * The package's emscripten module, loaded by absolute path (its exports map hides it) from
 * the directory of the entry point the import above resolved to, so it is the same instance.
 * null if this version of the package is laid out differently: the public wrappers are used then.
 */
function directModule(): ZstdModule | null {
  try {
    const req = createRequire(import.meta.url);
    const m = (req(join(dirname(req.resolve('@bokuweb/zstd-wasm')), 'module.js')) as { Module?: Partial<ZstdModule> }).Module;
    if (
      m !== undefined &&
      m.HEAPU8 instanceof Uint8Array &&
      typeof m._malloc === 'function' &&
      typeof m._ZSTD_compressBound === 'function' &&
      typeof m._ZSTD_isError === 'function' &&
      typeof m._ZSTD_compress_usingDict === 'function'
    )
      return m as ZstdModule;
  } catch {
    // fall back to the wrappers
  }
  return null;
}

const ready = init();
const NO_DICT = new Uint8Array(0);
let cctx = 0;
let mod: ZstdModule | null | undefined;
let src = 0;
let srcCap = 0;
let dst = 0;
let dstCap = 0;

/** Compress `chunk`; returns the frame (a view that is valid until the next call) or null if not worth keeping. */
function compressOne(chunk: Uint8Array, level: number): Uint8Array | null {
  if (mod === null) {
    const c = compressUsingDict(cctx, chunk, NO_DICT, level);
    return c.length < chunk.length - 1 ? c : null;
  }
  const m = mod as ZstdModule;
  if (chunk.length > srcCap) {
    // Sized for the largest cluster seen; clusters are at most 2 MiB (spec §2), so this is bounded.
    // Both areas start on a 4 KiB boundary of the (page-aligned) wasm heap, so copies in and out do
    // not hit 4K aliasing against the batch buffer, which starts mid-page (see zstd-pool.ts).
    dstCap = m._ZSTD_compressBound(chunk.length);
    const s = m._malloc(chunk.length + 4096);
    const d = m._malloc(dstCap + 4096);
    if (s === 0 || d === 0) throw new Error('zstd: out of wasm memory');
    src = Math.ceil(s / 4096) * 4096;
    dst = Math.ceil(d / 4096) * 4096;
    srcCap = chunk.length;
  }
  m.HEAPU8.set(chunk, src);
  const n = m._ZSTD_compress_usingDict(cctx, dst, dstCap, src, chunk.length, 0, 0, level);
  if (m._ZSTD_isError(n) !== 0) throw new Error(`zstd: compression failed (code ${n})`);
  // HEAPU8 is read again after the call: the heap may have grown (a new ArrayBuffer).
  return n < chunk.length - 1 ? m.HEAPU8.subarray(dst, dst + n) : null;
}

parentPort?.on('message', (msg: ZstdRequest) => {
  void ready.then(() => {
    try {
      if (cctx === 0) {
        cctx = createCCtx();
        mod = directModule();
      }
      const data = msg.data;
      const lens: number[] = [];
      let off = 0;
      let at = 0;
      for (const len of msg.lens) {
        const c = compressOne(data.subarray(off, off + len), msg.level);
        off += len;
        if (c === null) lens.push(-1);
        else {
          // at + c.length < off: the frame lands on input already consumed.
          data.set(c, at);
          at += c.length;
          lens.push(c.length);
        }
      }
      const reply: ZstdReply = { id: msg.id, data, lens };
      parentPort?.postMessage(reply, [data.buffer as ArrayBuffer]);
    } catch (e) {
      const reply: ZstdReply = { id: msg.id, error: e instanceof Error ? e.message : String(e) };
      parentPort?.postMessage(reply);
    }
  });
});
