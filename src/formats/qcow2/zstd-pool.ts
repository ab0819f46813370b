/**
 * A small pool of worker threads for zstd compression, so `convert -c` with
 * zstd uses every core (the wasm encoder is synchronous; zlib needs no pool:
 * node runs its async API in the libuv thread pool). Workers are unref'd:
 * an idle pool never keeps the process alive.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';

interface Job {
  resolve: (out: Uint8Array) => void;
  reject: (e: Error) => void;
}

class ZstdPool {
  private readonly workers: Worker[] = [];
  private readonly jobs = new Map<number, Job>();
  private nextId = 0;
  private next = 0;

  private worker(): Worker {
    const size = Math.max(1, Math.min(4, availableParallelism()));
    if (this.workers.length < size) {
      const w = new Worker(new URL('./zstd-worker.js', import.meta.url));
      w.on('message', (m: { id: number; out?: Uint8Array; error?: string }) => {
        const job = this.jobs.get(m.id);
        if (job === undefined) return;
        this.jobs.delete(m.id);
        if (this.jobs.size === 0) for (const x of this.workers) x.unref();
        if (m.out !== undefined) job.resolve(m.out);
        else job.reject(new Error(m.error ?? 'zstd worker failed'));
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

  compress(data: Uint8Array, level: number): Promise<Uint8Array> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      // Referenced only while work is pending: waiting for a result must keep the process alive.
      if (this.jobs.size === 0) for (const x of this.workers) x.ref();
      this.jobs.set(id, { resolve, reject });
      // Copy: the caller's buffer may be a view into a bigger read window.
      const w = this.worker();
      w.ref();
      w.postMessage({ id, data: data.slice(), level });
    });
  }
}

let pool: ZstdPool | null = null;

export function zstdCompressAsync(data: Uint8Array, level = 3): Promise<Uint8Array> {
  pool ??= new ZstdPool();
  return pool.compress(data, level);
}
