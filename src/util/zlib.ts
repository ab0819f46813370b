/**
 * node:zlib's one-shot calls as promises, with zlib loaded on first use.
 *
 * Why lazily: every command opens images through the registry, which loads
 * every format driver, and node:zlib pulls in node's whole stream stack at
 * load time: about 5 ms of every run (`rblock check` of an 8 GiB image is
 * about 80 ms in all), for images that mostly have no compressed cluster.
 */
import type { InputType, ZlibOptions } from 'node:zlib';
import { promisify } from 'node:util';

type OneShot = (input: InputType, options?: ZlibOptions) => Promise<Buffer>;
type OneShotSync = (input: InputType, options?: ZlibOptions) => Buffer;

interface Calls {
  deflate: OneShot;
  deflateRaw: OneShot;
  /**
   * Inflating one cluster or grain is done synchronously: an async one-shot
   * call builds a zlib stream and makes several trips through the libuv pool,
   * about 650 us per call on the development machine against 35-120 us for
   * the synchronous inflate of a 64 KiB cluster (output bounded by
   * maxOutputLength, so the time is bounded by the input size).
   */
  inflateSync: OneShotSync;
  inflateRawSync: OneShotSync;
  /** zlib.constants */
  constants: typeof import('node:zlib').constants;
}

let calls: Promise<Calls> | null = null;

/** The one-shot calls (loading node:zlib the first time). */
export function zlibCalls(): Promise<Calls> {
  calls ??= import('node:zlib').then((z) => ({
    deflate: promisify(z.deflate) as OneShot,
    deflateRaw: promisify(z.deflateRaw) as OneShot,
    inflateSync: z.inflateSync,
    inflateRawSync: z.inflateRawSync,
    constants: z.constants,
  }));
  return calls;
}
