/**
 * `delta`: a qcow2 overlay that turns BASE into TARGET. The new image has
 * BASE as its backing file and allocates exactly the clusters where TARGET
 * differs from BASE, each written whole with TARGET's content, so reading it
 * gives TARGET byte for byte. BASE and TARGET may be of any format rblock
 * reads and of different sizes: the delta takes TARGET's size, and past
 * BASE's end (which reads as zeros through a backing file) every non-zero
 * cluster of TARGET is allocated.
 *
 * It reuses compare's window reader: both images are walked in windows of
 * whole clusters read ahead of the comparison, a side known to be zero is
 * not read, and runs of differing clusters become one write each.
 */
import { realpath } from 'node:fs/promises';
import { dirname, relative, resolve } from 'node:path';
import type { BlockDevice } from '../block/device.js';
import { BlockError } from '../block/errors.js';
import { zeroBuffer } from '../block/zero.js';
import { layerOf } from '../formats/chain.js';
import { createImage } from '../formats/create.js';
import { Qcow2Layer } from '../formats/qcow2/image.js';
import { openImage } from '../formats/registry.js';
import { pairedWindows } from './compare.js';

const DEFAULT_WINDOW = 4 << 20;

export interface DeltaOptions {
  /**
   * The backing file name stored in the delta. Default: BASE's path relative
   * to the delta's directory (qemu resolves it from there).
   */
  backingPath?: string;
  /** Backing format recorded in the delta (default: BASE's format). */
  backingFormat?: string;
  /** qcow2 creation options (cluster_size=, compat=, refcount_bits=, ...), as for create. */
  options?: Record<string, string>;
  /** Bytes per read window (default 4 MiB, rounded to whole clusters). */
  window?: number;
  onProgress?: (done: number, total: number) => void;
}

export interface DeltaResult {
  path: string;
  /** Virtual size of the delta: TARGET's size, rounded up to whole 512-byte sectors. */
  size: number;
  clusterSize: number;
  /** Clusters allocated in the delta. */
  clusters: number;
  /** Guest bytes written (whole clusters; the last one clipped to the size). */
  bytes: number;
  backingFile: string;
  backingFormat: string;
  bytesRead: number;
}

/** The keys delta sets itself: refused in the creation options. */
const RESERVED = ['backing_file', 'backing_fmt', 'size', 'data_file', 'data_file_raw', 'preallocation'];

async function samePath(a: string, b: string): Promise<boolean> {
  try {
    return (await realpath(a)) === (await realpath(b));
  } catch {
    return resolve(a) === resolve(b);
  }
}

/** Write a delta of `target` over `base` to a new qcow2 image at `deltaPath`. */
export async function createDelta(base: BlockDevice, target: BlockDevice, deltaPath: string, o: DeltaOptions = {}): Promise<DeltaResult> {
  for (const k of Object.keys(o.options ?? {})) {
    if (RESERVED.includes(k)) throw new BlockError('invalid-argument', `delta sets ${k} itself: leave it out of the creation options`);
  }
  for (const [dev, what] of [
    [base, 'BASE'],
    [target, 'TARGET'],
  ] as const) {
    if (dev.path !== undefined && (await samePath(dev.path, deltaPath))) {
      throw new BlockError('invalid-argument', `${deltaPath}: the delta would overwrite ${what}; choose another output file`, {
        path: deltaPath,
      });
    }
  }
  let backingFile = o.backingPath;
  if (backingFile === undefined) {
    if (base.path === undefined) throw new BlockError('invalid-argument', 'BASE has no file path: give the backing name explicitly');
    backingFile = relative(dirname(resolve(deltaPath)), resolve(base.path));
  }
  if (backingFile === '') throw new BlockError('invalid-argument', 'the backing file name is empty');
  const backingFormat = o.backingFormat ?? base.format;

  // The base was opened (and checked) already, and the name may be one that only resolves
  // where the delta will be used: create without opening it again.
  // qcow2 sizes are whole sectors (qemu-img rounds up, and reads a header size rounded down):
  // TARGET's last partial sector is completed with zeros, as qemu reads such a raw file.
  const total = Math.ceil(target.size / 512) * 512;
  await createImage({
    format: 'qcow2',
    path: deltaPath,
    size: total,
    options: o.options ?? {},
    backingFile,
    backingFormat,
    unsafe: true,
  });
  // Every write is of whole clusters, so the delta needs no copy-on-write reads from its backing file.
  await using dst = await openImage(deltaPath, { format: 'qcow2', readOnly: false, backing: null });
  const layer = layerOf(dst);
  if (!(layer instanceof Qcow2Layer)) throw new BlockError('io', `${deltaPath}: did not open as qcow2`, { path: deltaPath });
  const cs = layer.header.clusterSize;
  const win = Math.max(cs, Math.floor((o.window ?? DEFAULT_WINDOW) / cs) * cs);
  const zero = zeroBuffer(win);
  const result: DeltaResult = {
    path: deltaPath,
    size: total,
    clusterSize: cs,
    clusters: 0,
    bytes: 0,
    backingFile,
    backingFormat,
    bytesRead: 0,
  };

  for await (const w of pairedWindows(base, target, { window: win, total, onRead: (n) => (result.bytesRead += n) })) {
    if (w.dataA !== null || w.dataB !== null) {
      const a = w.dataA ?? zero;
      const t = w.dataB ?? zero;
      // Runs of differing clusters, each written with one request.
      let runStart = -1;
      const flushRun = async (end: number): Promise<void> => {
        if (runStart < 0) return;
        await dst.pwrite(t.subarray(runStart, end), w.offset + runStart);
        result.bytes += end - runStart;
        runStart = -1;
      };
      for (let c = 0; c < w.length; c += cs) {
        const e = Math.min(c + cs, w.length);
        if (a.compare(t, c, e, c, e) !== 0) {
          if (runStart < 0) runStart = c;
          result.clusters++;
        } else await flushRun(c);
      }
      await flushRun(w.length);
    }
    o.onProgress?.(w.offset + w.length, total);
  }
  await dst.flush();
  return result;
}
