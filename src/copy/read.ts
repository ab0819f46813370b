/**
 * Streaming the guest content out: `rblock read IMAGE --output FILE` flattens
 * an image. Memory is bounded by the chunk size and the number of chunks in
 * flight; zero and unallocated ranges are skipped so the output is sparse.
 */
import { open, type FileHandle } from 'node:fs/promises';
import type { BlockDevice } from '../block/device.js';
import { fromSystemError } from '../block/errors.js';
import { isZero } from '../block/zero.js';

export interface ReadToFileOptions {
  offset?: number;
  length?: number;
  /** Bytes per read request (default 4 MiB). */
  chunkSize?: number;
  /** Reads in flight at once (default 4). */
  inFlight?: number;
  /** Called after each chunk with the bytes done so far. */
  onProgress?: (done: number, total: number) => void;
}

interface Job {
  offset: number;
  length: number;
  data: boolean;
}

/** The chunks to copy: data ranges cut to chunkSize; zero ranges are holes. */
async function* jobs(dev: BlockDevice, offset: number, length: number, chunk: number): AsyncGenerator<Job> {
  let pos = offset;
  const end = offset + length;
  while (pos < end) {
    const ext = await dev.blockStatus(pos, Math.min(end - pos, 1 << 30));
    for (const e of ext) {
      if (e.zero) yield { offset: e.offset, length: e.length, data: false };
      else
        for (let o = e.offset; o < e.offset + e.length; o += chunk)
          yield { offset: o, length: Math.min(chunk, e.offset + e.length - o), data: true };
    }
    const last = ext[ext.length - 1]!;
    pos = last.offset + last.length;
  }
}

/** Write bytes [offset, offset+length) of dev to a new file at outPath, sparsely. */
export async function readToFile(dev: BlockDevice, outPath: string, opts: ReadToFileOptions = {}): Promise<void> {
  const offset = opts.offset ?? 0;
  const length = opts.length ?? dev.size - offset;
  const chunk = opts.chunkSize ?? 4 << 20;
  const inFlight = Math.max(1, opts.inFlight ?? 4);
  let out: FileHandle;
  try {
    out = await open(outPath, 'w');
  } catch (e) {
    throw fromSystemError(e, outPath, 'open');
  }
  try {
    const pool: Buffer[] = [];
    const running = new Set<Promise<void>>();
    let done = 0;
    const copy = async (j: Job): Promise<void> => {
      const buf = pool.pop() ?? Buffer.allocUnsafe(chunk);
      try {
        const view = buf.subarray(0, j.length);
        await dev.pread(view, j.offset);
        // Zero runs inside data also become holes (qemu-img convert does the same).
        if (!isZero(view)) {
          try {
            await out.write(view, 0, view.length, j.offset - offset);
          } catch (e) {
            throw fromSystemError(e, outPath, 'write');
          }
        }
      } finally {
        pool.push(buf);
      }
      done += j.length;
      opts.onProgress?.(done, length);
    };
    for await (const j of jobs(dev, offset, length, chunk)) {
      if (!j.data) {
        done += j.length;
        continue;
      }
      const p: Promise<void> = copy(j).finally(() => running.delete(p));
      running.add(p);
      p.catch(() => {}); // the failure surfaces through race/all below
      if (running.size >= inFlight) await Promise.race(running);
    }
    await Promise.all(running);
    await out.truncate(length);
  } finally {
    await out.close();
  }
}

/** Stream bytes to a writable (stdout), in order, in bounded chunks. */
export async function readToStream(
  dev: BlockDevice,
  write: (chunk: Buffer) => Promise<void>,
  offset = 0,
  length = dev.size - offset,
  chunk = 4 << 20,
): Promise<void> {
  const buf = Buffer.allocUnsafe(Math.min(chunk, Math.max(length, 1)));
  for (let pos = offset; pos < offset + length;) {
    const n = Math.min(buf.length, offset + length - pos);
    const view = buf.subarray(0, n);
    await dev.pread(view, pos);
    await write(Buffer.from(view));
    pos += n;
  }
}
