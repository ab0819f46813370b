/**
 * `convert`: copy any image rblock opens (backing chains flattened) into a
 * new qcow2 or raw image, sparsely and with bounded memory. Windows of the
 * source are read ahead while the previous one is written; zero runs are not
 * written (unless the target has a backing file that must be masked); with
 * compression, the clusters of a window are compressed concurrently (zlib's
 * async API runs in the libuv pool, so both cores work).
 */
import type { BlockDevice } from '../block/device.js';
import { BlockError } from '../block/errors.js';
import { isZeroRange } from '../block/zero.js';
import { layerOf } from '../formats/chain.js';
import { createImage } from '../formats/create.js';
import { compressClusters } from '../formats/qcow2/compress.js';
import { Qcow2Layer } from '../formats/qcow2/image.js';
import { openImage } from '../formats/registry.js';
import { convertToStreamOptimized } from '../formats/vmdk/stream-writer.js';
import { allocAligned } from '../block/file.js';
import { extentsOf } from './map.js';
import { truncate } from 'node:fs/promises';
import { readToFile } from './read.js';

export interface ConvertOptions {
  /** Output format: qcow2 or raw. */
  format: string;
  /** Creation options (-o), as for create. */
  options?: Record<string, string>;
  /** Compress data clusters (qcow2 output only). */
  compress?: boolean;
  /** Backing file of the target (-B) and its format. */
  backing?: string;
  backingFormat?: string;
  /** The target exists already (-n): do not create it. */
  noCreate?: boolean;
  /** With -n: the target reads as zeros already, so zero runs need no writes. */
  targetIsZero?: boolean;
  /** Size of the new target (default: the source's; never smaller). */
  size?: number;
  /** Bytes per read window (default 4 MiB, at least one cluster). */
  window?: number;
  /**
   * Synchronous host I/O for the target (and the raw fast path's output):
   * faster for a batch copy (HostFile.useSyncIo), but it holds the event loop
   * during each read and write; the CLI sets it, a server must not.
   */
  syncIo?: boolean;
  onProgress?: (done: number, total: number) => void;
}

export interface ConvertStats {
  bytesRead: number;
  bytesWritten: number;
  zeroBytes: number;
  compressedClusters: number;
}

interface Window {
  offset: number;
  length: number;
  /** null when the whole window reads as zeros (nothing was read). */
  data: Uint8Array | null;
  /** The arena slot holding data, returned to the pool once the window is written. */
  slot?: Uint8Array;
  /** Per cluster: reads as zeros. */
  zero?: boolean[];
  /** With compression: per cluster, the compressed bytes (null: store it uncompressed; zero clusters null too). */
  packed?: (Uint8Array | null)[];
  /** Gives the buffers holding `packed` back once the window is written. */
  release?: () => void;
}

export async function convert(src: BlockDevice, dstPath: string, o: ConvertOptions): Promise<ConvertStats> {
  if (o.compress && o.format !== 'qcow2') throw new BlockError('invalid-argument', `compression needs qcow2 output, not ${o.format}`);
  // A streamOptimized VMDK is written in one forward pass (it may go to a pipe), not created and then opened.
  if (o.format === 'vmdk' && o.options?.['subformat'] === 'streamOptimized' && !o.noCreate) {
    if (o.backing !== undefined) throw new BlockError('invalid-argument', 'a streamOptimized VMDK cannot have a backing file');
    return convertToStreamOptimized(src, dstPath, o);
  }
  // Plain raw output is the flatten of `rblock read --output`: its tuned pipeline (page-aligned
  // buffers, merged writes, holes for zeros) is the fastest way to write a sparse raw file.
  const rawKeys = Object.keys(o.options ?? {});
  if (
    o.format === 'raw' &&
    !o.noCreate &&
    o.backing === undefined &&
    rawKeys.every((k) => k === 'size' || (k === 'preallocation' && o.options?.[k] === 'off'))
  ) {
    const size = Math.ceil(Math.max(o.size ?? src.size, src.size) / 512) * 512;
    await readToFile(src, dstPath, {
      ...(o.onProgress !== undefined ? { onProgress: o.onProgress } : {}),
      ...(o.syncIo === true ? { syncIo: true } : {}),
    });
    if (size !== src.size) await truncate(dstPath, size);
    return { bytesRead: src.size, bytesWritten: 0, zeroBytes: 0, compressedClusters: 0 };
  }
  if (!o.noCreate) {
    const req: Parameters<typeof createImage>[0] = {
      format: o.format,
      path: dstPath,
      size: Math.max(o.size ?? src.size, src.size),
      options: o.options ?? {},
    };
    if (o.backing !== undefined) req.backingFile = o.backing;
    if (o.backingFormat !== undefined) req.backingFormat = o.backingFormat;
    await createImage(req);
  }
  // qemu-img convert writes its target with cache=unsafe (no flushes): so do we. Write order is
  // kept, so a killed convert still leaves a consistent (if incomplete) image.
  await using dst = await openImage(dstPath, {
    format: o.format,
    readOnly: false,
    cache: 'unsafe',
    ...(o.syncIo === true ? { syncIo: true } : {}),
  });
  if (dst.size < src.size)
    throw new BlockError('invalid-argument', `${dstPath}: target is smaller (${dst.size} bytes) than the source (${src.size} bytes)`);
  const layer = layerOf(dst);
  const q = layer instanceof Qcow2Layer ? layer : null;
  const cs = q?.header.clusterSize ?? 4096;
  const compressType = q?.header.compressionType ?? 0;
  // Zeros must be written where something below would otherwise show through.
  const writeZeros = (layer?.backing ?? null) !== null || (o.noCreate === true && !o.targetIsZero);
  const win = Math.max(cs, Math.floor((o.window ?? 4 << 20) / cs) * cs);
  const stats: ConvertStats = { bytesRead: 0, bytesWritten: 0, zeroBytes: 0, compressedClusters: 0 };

  // Read ahead up to `depth` windows while writing in order: memory is bounded by (depth + 1) * window.
  const depth = 3;
  // Window buffers are slices of one page-aligned arena, reused: the kernel copies several times
  // faster into page-aligned memory, and fresh buffers would page-fault on every window (a
  // sparse raw source is read whole, holes included, since node has no SEEK_HOLE).
  const aligned = allocAligned((depth + 1) * win);
  // A plain Uint8Array view: Buffer's slice() would not copy, and nothing here needs Buffer methods.
  const arena = new Uint8Array(aligned.buffer, aligned.byteOffset, aligned.length);
  const free: Uint8Array[] = [];
  for (let i = 0; i <= depth; i++) free.push(arena.subarray(i * win, (i + 1) * win));

  /**
   * Which cs-sized granules of a window read as zeros. Granules wholly
   * inside a known zero range (`zeroRuns`, window-relative) are zero without
   * looking; the others are scanned (isZeroRange: no view allocated per
   * granule, most data granules rejected in JS).
   */
  const granulesOf = (data: Uint8Array, length: number, zeroRuns: Array<[number, number]>): boolean[] => {
    const count = Math.ceil(length / cs);
    const zero = new Array<boolean>(count).fill(false);
    const known = new Uint8Array(count);
    for (const [zs, ze] of zeroRuns) {
      const last = ze === length ? count : Math.floor(ze / cs);
      for (let g = Math.ceil(zs / cs); g < last; g++) known[g] = 1;
    }
    const view = Buffer.from(data.buffer, data.byteOffset, length);
    for (let g = 0; g < count; g++) zero[g] = known[g] === 1 || isZeroRange(view, g * cs, Math.min((g + 1) * cs, length));
    return zero;
  };

  // Reading, zero detection and compression of a window all happen ahead of its write, so the
  // compressors (worker threads, the libuv pool) keep working while earlier windows are written.
  const read = async (offset: number): Promise<Window> => {
    const length = Math.min(win, src.size - offset);
    const ext = await extentsOf(src, offset, length);
    if (ext.every((e) => e.zero)) return { offset, length, data: null };
    const slot = free.pop();
    if (slot === undefined) throw new Error('convert: window pool exhausted'); // cannot happen: depth + 1 slots
    const data = slot.subarray(0, length);
    try {
      // Only the ranges that can hold data are read; the rest of the window
      // is zeroed in memory (holes of a sparse raw source, zero clusters).
      // Few large reads beat many small ones, so this only pays off when
      // the zero ranges are big: below 64 KiB they are read with the rest.
      // Window-relative [start, end) of the big zero ranges.
      const zeroRuns: Array<[number, number]> = ext
        .filter((e) => e.zero && e.length >= 65536)
        .map((e) => [Math.max(e.offset, offset) - offset, Math.min(e.offset + e.length, offset + length) - offset]);
      if (zeroRuns.length === 0) {
        await src.pread(data, offset);
      } else {
        let pos = 0;
        for (const [zs, ze] of zeroRuns) {
          if (zs > pos) await src.pread(data.subarray(pos, zs), offset + pos);
          // Only the parts that share a granule with data need zeros in memory: whole zero
          // granules are never written from the buffer (granulesOf marks them zero unread).
          const inner = Math.min(ze, Math.ceil(zs / cs) * cs);
          data.fill(0, zs, inner);
          if (ze < length) data.fill(0, Math.max(inner, Math.floor(ze / cs) * cs), ze);
          pos = ze;
        }
        if (pos < length) await src.pread(data.subarray(pos), offset + pos);
      }
      stats.bytesRead += length;
      const zero = granulesOf(data, length, zeroRuns);
      const w: Window = { offset, length, data, slot, zero };
      if (o.compress && q !== null) {
        const todo: Uint8Array[] = [];
        const at: number[] = [];
        zero.forEach((z, g) => {
          if (z) return;
          const chunk = data.subarray(g * cs, Math.min((g + 1) * cs, length));
          todo.push(chunk.length === cs ? chunk : padded(chunk, cs));
          at.push(g);
        });
        const batch = await compressClusters(compressType, todo);
        const packed: (Uint8Array | null)[] = zero.map(() => null);
        at.forEach((g, i) => (packed[g] = batch.out[i] ?? null));
        w.packed = packed;
        w.release = batch.release;
      }
      return w;
    } catch (e) {
      free.push(slot);
      throw e;
    }
  };

  const writeWindow = async (w: Window): Promise<void> => {
    if (w.data === null) {
      stats.zeroBytes += w.length;
      if (writeZeros) await dst.writeZeroes(w.offset, w.length, { mayTrim: true });
      return;
    }
    const data = w.data;
    const zero = w.zero as boolean[];
    const granules = zero.length;
    if (w.packed !== undefined && q !== null) {
      for (let g = 0; g < granules; g++) {
        const at = w.offset + g * cs;
        const len = Math.min(cs, w.length - g * cs);
        const c = w.packed[g];
        if (zero[g]) {
          stats.zeroBytes += len;
          if (writeZeros) await dst.writeZeroes(at, len, { mayTrim: true });
        } else if (c !== null && c !== undefined) {
          await q.writeCompressed(at, c);
          stats.compressedClusters++;
          stats.bytesWritten += c.length;
        } else {
          await dst.pwrite(data.subarray(g * cs, g * cs + len), at);
          stats.bytesWritten += len;
        }
      }
      return;
    }
    // Uncompressed: one write per run of non-zero granules.
    for (let g = 0; g < granules;) {
      let h = g + 1;
      while (h < granules && zero[h] === zero[g]) h++;
      const from = g * cs;
      const to = Math.min(h * cs, w.length);
      if (zero[g]) {
        stats.zeroBytes += to - from;
        if (writeZeros) await dst.writeZeroes(w.offset + from, to - from, { mayTrim: true });
      } else {
        await dst.pwrite(data.subarray(from, to), w.offset + from);
        stats.bytesWritten += to - from;
      }
      g = h;
    }
  };

  const pending: Promise<Window>[] = [];
  let next = 0;
  const fill = (): void => {
    while (pending.length < depth && next < src.size) {
      const p = read(next);
      p.catch(() => {}); // surfaced when awaited below
      pending.push(p);
      next += win;
    }
  };
  fill();
  while (pending.length > 0) {
    const w = await (pending.shift() as Promise<Window>);
    fill();
    await writeWindow(w);
    // The slot goes back only now: a window's bytes are written (or compressed) before reuse.
    if (w.slot !== undefined) free.push(w.slot);
    w.release?.();
    o.onProgress?.(Math.min(w.offset + w.length, src.size), src.size);
    // With synchronous I/O the loop could run on microtasks alone: let timers (the progress bar) run.
    if (o.syncIo === true) await new Promise((r) => setImmediate(r));
  }
  await dst.flush();
  return stats;
}

function padded(chunk: Uint8Array, size: number): Uint8Array {
  const out = new Uint8Array(size);
  out.set(chunk);
  return out;
}
