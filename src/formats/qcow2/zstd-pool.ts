/**
 * A small pool of worker threads for zstd compression, so `convert -c` with
 * zstd uses every core (the wasm encoder is synchronous; zlib needs no pool:
 * node runs its async API in the libuv thread pool). Workers are unref'd:
 * an idle pool never keeps the process alive.
 *
 * Clusters go to the workers in batches (one message per worker per call),
 * each batch copied once into a buffer of its own that is transferred, not
 * cloned: per-cluster messages cost more than the compression of small
 * clusters, and cloning a view would copy its whole ArrayBuffer.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import type { ZstdReply, ZstdRequest } from './zstd-worker.js';

/** Compressed clusters (null: keep uncompressed) in a pooled buffer; call release() once they are written. */
export interface ZstdBatch {
  out: (Uint8Array | null)[];
  release(): void;
}

interface Job {
  resolve: (b: ZstdBatch) => void;
  reject: (e: Error) => void;
}

/** Spare batch buffers kept for reuse (a few windows' worth is all convert has in flight). */
const MAX_SPARE = 16;

/**
 * Where the batch starts in its buffer. The chunks usually come from a
 * page-aligned read arena, and a large ArrayBuffer from malloc starts 16 bytes
 * past a page boundary: a copy whose destination is just past its source
 * modulo 4 KiB runs into 4K aliasing (measured 10x slower, 0.9 s per GiB).
 * Half a page of skew keeps the two far apart.
 */
const SKEW = 2048;

class ZstdPool {
  private readonly workers: Worker[] = [];
  private readonly jobs = new Map<number, Job>();
  private readonly spare: ArrayBuffer[] = [];
  private nextId = 0;
  private next = 0;
  readonly size = Math.max(1, Math.min(4, availableParallelism()));

  private worker(): Worker {
    if (this.workers.length < this.size) {
      const w = new Worker(new URL('./zstd-worker.js', import.meta.url));
      w.on('message', (m: ZstdReply) => {
        const job = this.jobs.get(m.id);
        if (job === undefined) return;
        this.jobs.delete(m.id);
        if (this.jobs.size === 0) for (const x of this.workers) x.unref();
        if (m.data !== undefined && m.lens !== undefined) {
          const buf = m.data.buffer as ArrayBuffer;
          const out: (Uint8Array | null)[] = [];
          let at = m.data.byteOffset;
          for (const len of m.lens) {
            if (len < 0) out.push(null);
            else {
              out.push(new Uint8Array(buf, at, len));
              at += len;
            }
          }
          let released = false;
          job.resolve({
            out,
            release: () => {
              if (released) return;
              released = true;
              if (this.spare.length < MAX_SPARE) this.spare.push(buf);
            },
          });
        } else job.reject(new Error(m.error ?? 'zstd worker failed'));
      });
      w.on('error', (e) => {
        for (const job of this.jobs.values()) job.reject(e);
        this.jobs.clear();
      });
      // After the listeners: adding a 'message' listener refs the port again.
      w.unref();
      this.workers.push(w);
      return w;
    }
    const w = this.workers[this.next % this.workers.length] as Worker;
    this.next++;
    return w;
  }

  /** A buffer for `n` bytes: a spare one big enough, else a new one. */
  private buffer(n: number): ArrayBuffer {
    const i = this.spare.findIndex((b) => b.byteLength >= n);
    if (i >= 0) return this.spare.splice(i, 1)[0] as ArrayBuffer;
    return new ArrayBuffer(n);
  }

  /** Compress one batch of clusters on one worker. */
  batch(chunks: Uint8Array[], level: number): Promise<ZstdBatch> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      // Referenced only while work is pending: waiting for a result must keep the process alive.
      if (this.jobs.size === 0) for (const x of this.workers) x.ref();
      this.jobs.set(id, { resolve, reject });
      let total = 0;
      for (const c of chunks) total += c.length;
      // The one copy of the input: the caller's chunks may be views into a bigger read window.
      const buf = this.buffer(SKEW + total);
      const data = new Uint8Array(buf, SKEW, total);
      let at = 0;
      for (const c of chunks) {
        data.set(c, at);
        at += c.length;
      }
      const w = this.worker();
      w.ref();
      const req: ZstdRequest = { id, data, lens: chunks.map((c) => c.length), level };
      w.postMessage(req, [buf]);
    });
  }
}

let pool: ZstdPool | null = null;

/**
 * Compress each chunk as one zstd frame, spread over the workers; results in
 * order, null where the frame would not be smaller than the chunk minus one
 * byte. The frames live in pooled buffers until release().
 */
export async function zstdCompressMany(chunks: Uint8Array[], level = 3): Promise<ZstdBatch> {
  pool ??= new ZstdPool();
  if (chunks.length === 0) return { out: [], release: () => {} };
  const p = pool;
  const per = Math.ceil(chunks.length / p.size);
  const parts: Promise<ZstdBatch>[] = [];
  for (let i = 0; i < chunks.length; i += per) parts.push(p.batch(chunks.slice(i, i + per), level));
  const done = await Promise.allSettled(parts);
  const ok = done.flatMap((d) => (d.status === 'fulfilled' ? [d.value] : []));
  const failed = done.find((d) => d.status === 'rejected');
  if (failed !== undefined) {
    for (const b of ok) b.release();
    throw (failed as PromiseRejectedResult).reason;
  }
  return { out: ok.flatMap((b) => b.out), release: () => ok.forEach((b) => b.release()) };
}
