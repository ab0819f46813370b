/**
 * Streaming the guest content out: `rblock read IMAGE --output FILE` flattens
 * an image. Memory is bounded by the chunk size and the number of chunks in
 * flight; zero and unallocated ranges are skipped so the output is sparse.
 */
import { open, type FileHandle } from 'node:fs/promises';
import type { BlockDevice } from '../block/device.js';
import { fromSystemError } from '../block/errors.js';
import { allocAligned, PAGE_SIZE } from '../block/file.js';
import { isZero } from '../block/zero.js';

export interface ReadToFileOptions {
  offset?: number;
  length?: number;
  /**
   * Bytes per read request (default 2 MiB). Bigger is not better: measured, 4 MiB requests made the kernel's copies
   * to and from the page cache almost twice as slow as 1-2 MiB ones (the buffer no longer stays in the CPU cache
   * between the read and the write).
   */
  chunkSize?: number;
  /** Reads in flight at once (default 3: with libuv's 4 threads, one stays free for the writer). */
  inFlight?: number;
  /** Called after each chunk with the bytes done so far. */
  onProgress?: (done: number, total: number) => void;
}

interface Job {
  offset: number;
  length: number;
  data: boolean;
}

/**
 * The chunks to copy: data ranges cut to chunkSize; zero ranges are holes.
 * Data extents that follow one another (say, clusters whose host offsets are
 * not contiguous) share a chunk: one read request, one write.
 */
async function* jobs(dev: BlockDevice, offset: number, length: number, chunk: number): AsyncGenerator<Job> {
  let pos = offset;
  const end = offset + length;
  let pending: Job | null = null;
  while (pos < end) {
    const ext = await dev.blockStatus(pos, Math.min(end - pos, 1 << 30));
    for (const e of ext) {
      if (e.zero) {
        if (pending !== null) yield pending;
        pending = null;
        yield { offset: e.offset, length: e.length, data: false };
        continue;
      }
      let o = e.offset;
      const eEnd = e.offset + e.length;
      while (o < eEnd) {
        if (pending !== null && pending.offset + pending.length === o && pending.length < chunk) {
          const n = Math.min(chunk - pending.length, eEnd - o);
          pending.length += n;
          o += n;
        } else {
          if (pending !== null) yield pending;
          const n = Math.min(chunk, eEnd - o);
          pending = { offset: o, length: n, data: true };
          o += n;
        }
      }
    }
    const last = ext[ext.length - 1]!;
    pos = last.offset + last.length;
  }
  if (pending !== null) yield pending;
}

/** Write all of bufs at pos: one pwritev, looping over short writes. */
async function writeFully(out: FileHandle, bufs: Uint8Array[], pos: number): Promise<void> {
  let rest = bufs;
  while (rest.length > 0) {
    const { bytesWritten } = rest.length === 1 ? await out.write(rest[0]!, 0, rest[0]!.length, pos) : await out.writev(rest, pos);
    pos += bytesWritten;
    let n = bytesWritten;
    while (rest.length > 0 && n >= rest[0]!.length) {
      n -= rest[0]!.length;
      rest = rest.slice(1);
    }
    if (n > 0) rest = [rest[0]!.subarray(n), ...rest.slice(1)];
  }
}

/** Most output chunks merged into one writev (which also stops once it holds a chunk's worth of bytes). */
const MAX_MERGED_WRITES = 64;

/**
 * Write bytes [offset, offset+length) of dev to a new file at outPath, sparsely.
 *
 * A pipeline: up to `inFlight` reads run at once, each into its own slot of a
 * page-aligned arena; chunks read as all zeros are dropped (holes); the rest
 * queue for one writer, which writes them lowest offset first and merges
 * queued chunks that continue one another into one writev. One writer is
 * enough (the file system serialises writes to a file anyway; concurrent
 * writers only spin on its lock) and reads go on while it writes.
 */
export async function readToFile(dev: BlockDevice, outPath: string, opts: ReadToFileOptions = {}): Promise<void> {
  const offset = opts.offset ?? 0;
  const length = opts.length ?? dev.size - offset;
  const chunk = opts.chunkSize ?? 2 << 20;
  const inFlight = Math.max(1, opts.inFlight ?? 3);
  let out: FileHandle;
  try {
    out = await open(outPath, 'w');
  } catch (e) {
    throw fromSystemError(e, outPath, 'open');
  }
  try {
    // Size the output first (as qemu-img does): the writes then never move the end of file.
    await out.truncate(length);
    // Twice as many slots as reads: the writer's queue holds the other half, so reads need not wait for writes.
    const slot = Math.min(chunk, Math.max(length, 1));
    const stride = Math.ceil(slot / PAGE_SIZE) * PAGE_SIZE;
    const slots = inFlight * 2;
    const arena = allocAligned(stride * slots);
    const free: Buffer[] = [];
    for (let i = slots - 1; i >= 0; i--) free.push(arena.subarray(i * stride, i * stride + slot));

    // The job loop is the only waiter: it sleeps until a slot, a read or the writer finishes.
    let wake: (() => void) | null = null;
    const signal = (): void => {
      const w = wake;
      wake = null;
      w?.();
    };
    const sleep = (): Promise<void> => new Promise<void>((r) => (wake = r));
    let failure = null as { error: unknown } | null; // (a cast: set from callbacks, so not narrowed to null)
    const fail = (e: unknown): void => {
      failure ??= { error: e };
    };
    let done = 0;
    const progress = (n: number): void => {
      done += n;
      opts.onProgress?.(done, length);
    };

    interface Pending {
      buf: Buffer;
      pos: number;
      len: number;
    }
    const queue: Pending[] = [];
    let writing = false;
    const writeQueued = async (): Promise<void> => {
      while (queue.length > 0 && failure === null) {
        queue.sort((a, b) => a.pos - b.pos);
        const batch = [queue.shift()!];
        let end = batch[0]!.pos + batch[0]!.len;
        while (queue.length > 0 && queue[0]!.pos === end && batch.length < MAX_MERGED_WRITES && end - batch[0]!.pos < chunk) {
          const p = queue.shift()!;
          batch.push(p);
          end += p.len;
        }
        try {
          await writeFully(
            out,
            batch.map((p) => p.buf.subarray(0, p.len)),
            batch[0]!.pos,
          );
        } catch (e) {
          throw fromSystemError(e, outPath, 'write');
        } finally {
          for (const p of batch) free.push(p.buf);
        }
        progress(end - batch[0]!.pos);
      }
    };
    const startWriter = (): void => {
      if (writing || queue.length === 0 || failure !== null) return;
      writing = true;
      writeQueued()
        .catch(fail)
        .finally(() => {
          writing = false;
          startWriter();
          signal();
        });
    };

    let reading = 0;
    const readJob = async (j: Job, buf: Buffer): Promise<void> => {
      const view = buf.subarray(0, j.length);
      try {
        await dev.pread(view, j.offset);
      } catch (e) {
        free.push(buf);
        throw e;
      }
      // Zero runs inside data also become holes (qemu-img convert does the same).
      if (failure !== null || isZero(view)) {
        free.push(buf);
        progress(j.length);
        return;
      }
      queue.push({ buf, pos: j.offset - offset, len: j.length });
      startWriter();
    };

    try {
      for await (const j of jobs(dev, offset, length, chunk)) {
        if (!j.data) {
          done += j.length;
          continue;
        }
        while (failure === null && (free.length === 0 || reading >= inFlight)) await sleep();
        if (failure !== null) break;
        reading++;
        readJob(j, free.pop()!)
          .catch(fail)
          .finally(() => {
            reading--;
            signal();
          });
      }
    } catch (e) {
      fail(e);
    }
    // Drain; after a failure, only wait for what is in flight (the file must not close under it).
    while (reading > 0 || writing || (failure === null && queue.length > 0)) await sleep();
    if (failure !== null) throw failure.error;
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
