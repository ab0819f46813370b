/** Worker thread body for zstd-pool.ts: compresses clusters with zstd-wasm off the main thread. */
import { parentPort } from 'node:worker_threads';
import { init, compress } from '@bokuweb/zstd-wasm';

const ready = init();
parentPort?.on('message', (msg: { id: number; data: Uint8Array; level: number }) => {
  void ready.then(() => {
    try {
      const out = compress(msg.data, msg.level);
      parentPort?.postMessage({ id: msg.id, out }, [out.buffer as ArrayBuffer]);
    } catch (e) {
      parentPort?.postMessage({ id: msg.id, error: e instanceof Error ? e.message : String(e) });
    }
  });
});
