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

interface Calls {
  inflate: OneShot;
  inflateRaw: OneShot;
  deflate: OneShot;
  deflateRaw: OneShot;
  /** zlib.constants */
  constants: typeof import('node:zlib').constants;
}

let calls: Promise<Calls> | null = null;

/** The one-shot calls (loading node:zlib the first time). */
export function zlibCalls(): Promise<Calls> {
  calls ??= import('node:zlib').then((z) => ({
    inflate: promisify(z.inflate) as OneShot,
    inflateRaw: promisify(z.inflateRaw) as OneShot,
    deflate: promisify(z.deflate) as OneShot,
    deflateRaw: promisify(z.deflateRaw) as OneShot,
    constants: z.constants,
  }));
  return calls;
}
