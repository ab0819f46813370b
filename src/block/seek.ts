/**
 * SEEK_DATA / SEEK_HOLE (lseek(2)) for finding the holes of sparse host
 * files, from the small native helper native/seek.c (built at install by
 * scripts/build-native.mjs). Node's fs has no lseek at all. When the helper
 * is missing (no compiler at install) or RBLOCK_NO_NATIVE=1, `hostSeek` is
 * null and callers treat the whole file as data, as before.
 */
import { createRequire } from 'node:module';

export interface HostSeek {
  /** Offset of the first data byte at or after `offset`; -1: none (ENXIO); below -1: -(2 + errno). */
  seekData(fd: number, offset: number): number;
  /** Offset of the first hole at or after `offset` (the file's end counts as one); -1 past the end. */
  seekHole(fd: number, offset: number): number;
}

function load(): HostSeek | null {
  if (process.env['RBLOCK_NO_NATIVE'] === '1') return null;
  const require = createRequire(import.meta.url);
  // From tsc's output (dist/src/block/) or the CLI bundle (dist/bundle/).
  for (const rel of ['../native/rblock-seek.node', '../../native/rblock-seek.node']) {
    try {
      return require(new URL(rel, import.meta.url).pathname) as HostSeek;
    } catch {
      // not at this level
    }
  }
  return null;
}

export const hostSeek: HostSeek | null = load();
