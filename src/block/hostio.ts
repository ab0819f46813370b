/**
 * Host I/O calls node's fs lacks, from the small native helper
 * native/hostio.c (built at install by scripts/build-native.mjs):
 * SEEK_DATA / SEEK_HOLE (lseek(2)) for the holes of sparse host files, and
 * preadv2(2) with RWF_NOWAIT for reads served from the page cache without a
 * trip through node's thread pool, dup(2) (see nbd/socket-onread.ts), and
 * non-blocking sendmsg(2) of several buffers and splice(2) of cached file
 * ranges to a socket (nbd/stream.ts). When the helper is missing (no
 * compiler at install) or RBLOCK_NO_NATIVE=1, `hostIo` is null: callers
 * treat the whole file as data, read through the thread pool and write
 * sockets through node's streams.
 */
import { createRequire } from 'node:module';

export interface HostIo {
  /** Offset of the first data byte at or after `offset`; -1: none (ENXIO); below -1: -(2 + errno). */
  seekData(fd: number, offset: number): number;
  /** Offset of the first hole at or after `offset` (the file's end counts as one); -1 past the end. */
  seekHole(fd: number, offset: number): number;
  /**
   * Read into buf from offset only as far as the page cache holds it: bytes
   * read (0 at the end of the file), -1 when none without blocking (EAGAIN),
   * below -1: -(2 + errno) (EOPNOTSUPP: no RWF_NOWAIT here).
   */
  preadNowait(fd: number, buf: Uint8Array, offset: number): number;
  /** A close-on-exec duplicate of fd; below -1: -(2 + errno). */
  dupFd(fd: number): number;
  /** SO_SNDBUF (the kernel caps it at net.core.wmem_max): the size the kernel then reports; below -1: -(2 + errno). */
  setSendBuffer(fd: number, bytes: number): number;
  /** 1 when every page of the range is in the page cache, 0 when not; below -1: -(2 + errno) (ENOSYS: no cachestat). */
  cached(fd: number, offset: number, length: number): number;
  /** A non-blocking pipe: [readFd, writeFd, capacity], or -(2 + errno). */
  pipeOpen(bytes: number): [number, number, number] | number;
  /**
   * Send byte items and file ranges in order without blocking (file ranges
   * spliced through the pipe): [k, into, rest, err] as native/hostio.c says.
   */
  sendItems(
    sock: number,
    pipeR: number,
    pipeW: number,
    items: ReadonlyArray<Uint8Array | FileSpan>,
  ): [number, number, Buffer | null, number];
}

/** Bytes of a host file to send as they are (BlockDevice.spansNow, StreamWriter). */
export interface FileSpan {
  readonly fd: number;
  readonly offset: number;
  readonly length: number;
}

function load(): HostIo | null {
  if (process.env['RBLOCK_NO_NATIVE'] === '1') return null;
  const require = createRequire(import.meta.url);
  // From tsc's output (dist/src/block/) or the CLI bundle (dist/bundle/).
  for (const rel of ['../native/rblock-hostio.node', '../../native/rblock-hostio.node']) {
    try {
      return require(new URL(rel, import.meta.url).pathname) as HostIo;
    } catch {
      // not at this level
    }
  }
  return null;
}

export const hostIo: HostIo | null = load();
