/**
 * Positional I/O on a host file. Format drivers read their metadata and data
 * through this; the raw backend is a thin device over it.
 */
import { readSync, writeSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { BlockError, fromSystemError } from './errors.js';
import { hostIo } from './hostio.js';

/** Host memory page size assumed for alignment (x86-64 and most arm64 kernels). */
export const PAGE_SIZE = 4096;
/** Size of the kernel's largest page-cache folio for ordinary files here (2 MiB: PMD size on x86-64). */
const HUGE_FOLIO = 2 << 20;

interface WasmMemoryCtor {
  new (descriptor: { initial: number; maximum?: number }): { readonly buffer: ArrayBuffer };
}
/** WebAssembly.Memory, unless node runs without WebAssembly (--jitless). Not in the ES lib typings. */
const WasmMemory = (globalThis as unknown as { WebAssembly?: { Memory?: WasmMemoryCtor } }).WebAssembly?.Memory;

/**
 * A zero-filled buffer that starts on a page boundary, for bulk host I/O.
 *
 * The kernel copies between the page cache and user memory several times
 * faster into or out of a page-aligned buffer (measured 4-6x for 2 MiB
 * preads on x86-64). Node's Buffers come from malloc, which for large sizes
 * returns memory 16 bytes past a page boundary. A WebAssembly.Memory is the
 * one allocation node makes page-aligned (an mmap of whole 64 KiB pages);
 * where it is unavailable this falls back to an ordinary (unaligned) Buffer.
 * Each call maps a new region (about 0.1 ms): allocate an arena once and
 * hand out slices of it, rather than calling this per request.
 */
export function allocAligned(size: number): Buffer {
  if (WasmMemory !== undefined && size > 0) {
    const pages = Math.ceil(size / 65536);
    try {
      return Buffer.from(new WasmMemory({ initial: pages, maximum: pages }).buffer, 0, size);
    } catch {
      // out of address space or over the 4 GiB wasm limit: fall through
    }
  }
  return Buffer.alloc(size);
}

/**
 * What HostFile does its I/O on: a node FileHandle, or (block/device-file.ts)
 * a block device such as an NBD export, so that a format driver can read an
 * image whose bytes are served over the network (`-f qcow2 nbd://...`, as
 * qemu-img does).
 */
export interface FileBackend {
  read(buf: Uint8Array, offset: number, length: number, position: number): Promise<{ bytesRead: number }>;
  write(buf: Uint8Array, offset: number, length: number, position: number): Promise<{ bytesWritten: number }>;
  truncate(size: number): Promise<void>;
  datasync(): Promise<void>;
  stat(): Promise<{ blocks: number }>;
  close(): Promise<void>;
}

/** See HostFile.useQuickWrites. */
const SLOW_WRITE_MS = 5;
const QUICK_BACKOFF_FACTOR = 20;
const QUICK_BACKOFF_MAX_MS = 2000;

/** Cleared for the process once the kernel refuses RWF_NOWAIT reads; RBLOCK_NO_NOWAIT=1 for A/B measurements. */
let nowaitReads = process.env['RBLOCK_NO_NOWAIT'] !== '1';
/** Cleared once cachestat(2) fails (kernels before 6.5); RBLOCK_NO_SPLICE=1 for A/B measurements. */
let cachestatWorks = process.env['RBLOCK_NO_SPLICE'] !== '1';

export class HostFile {
  private constructor(
    readonly path: string,
    private readonly fh: FileBackend,
    readonly readOnly: boolean,
    private cachedSize: number,
  ) {}

  /** A HostFile over another backend (a block device: see block/device-file.ts). */
  static over(path: string, backend: FileBackend, readOnly: boolean, size: number): HostFile {
    return new HostFile(path, backend, readOnly, size);
  }

  static async open(path: string, readOnly: boolean): Promise<HostFile> {
    let fh: FileHandle;
    try {
      fh = await open(path, readOnly ? 'r' : 'r+');
    } catch (e) {
      throw fromSystemError(e, path, 'open');
    }
    try {
      const st = await fh.stat();
      if (st.isDirectory()) throw new BlockError('invalid-argument', `${path}: is a directory`, { path, op: 'open' });
      // Block devices report size 0 from stat; a seek-free way is to read the size via the end.
      return new HostFile(path, fh, readOnly, st.size);
    } catch (e) {
      await fh.close();
      throw fromSystemError(e, path, 'open');
    }
  }

  /**
   * The data runs of [offset, offset + length) as the file system stores
   * them (SEEK_DATA/SEEK_HOLE), holes between them; null when that cannot be
   * known (no native helper, not a plain file, a file system without
   * SEEK_DATA): then treat it all as data. Offsets past the end are holes.
   */
  dataRuns(offset: number, length: number): Array<{ offset: number; length: number; data: boolean }> | null {
    const fd = (this.fh as { fd?: unknown }).fd;
    if (hostIo === null || typeof fd !== 'number') return null;
    const end = offset + length;
    const known = this.knownData;
    if (known !== null && offset >= known.start && end <= known.end) return [{ offset, length, data: true }];
    const runs: Array<{ offset: number; length: number; data: boolean }> = [];
    const push = (o: number, e: number, data: boolean): void => {
      if (e <= o) return;
      const last = runs[runs.length - 1];
      if (last !== undefined && last.data === data && last.offset + last.length === o) last.length += e - o;
      else runs.push({ offset: o, length: e - o, data });
    };
    let pos = offset;
    // Bounded: each round moves pos forward; a pathological file of many tiny extents is capped.
    for (let rounds = 0; pos < end && rounds < 4096; rounds++) {
      const d = hostIo.seekData(fd, pos);
      if (d < -1) return runs.length === 0 ? null : (push(pos, end, true), runs);
      if (d === -1 || d >= end) {
        push(pos, end, false);
        return runs;
      }
      push(pos, d, false);
      const h = hostIo.seekHole(fd, d);
      if (h > d) this.knownData = { start: d, end: h };
      const he = h < 0 ? end : Math.min(h, end);
      push(d, he, true);
      pos = he;
    }
    if (pos < end) push(pos, end, true);
    return runs;
  }

  /**
   * The last data run SEEK_HOLE found, whole: later questions inside it need
   * no syscalls (the NBD server asks before every read of a raw export).
   * Only data is remembered, never holes: anyone may write into a hole, and
   * nothing here punches one (truncate forgets the run). A run that another
   * process has since punched reads as zeros anyway, as qemu's file driver
   * also accepts for its cached data extent.
   */
  private knownData: { start: number; end: number } | null = null;

  /** File size in bytes, as of open or the last write/truncate through this handle. */
  get size(): number {
    return this.cachedSize;
  }

  /** Allocated bytes on the host file system (qemu's "disk size"). */
  async allocatedBytes(): Promise<number> {
    const st = await this.fh.stat();
    return st.blocks * 512;
  }

  /**
   * Fill buf from offset. Bytes past the end of the file read as zeros:
   * qcow2 files are not padded to a cluster boundary (spec digest §2).
   */
  async readAt(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    const want = buf.length;
    while (done < want) {
      const pos = offset + done;
      if (pos >= this.cachedSize) break;
      let n: number;
      const len = Math.min(want - done, 0x7fff_f000);
      try {
        if (this.syncFd !== null) n = readSync(this.syncFd, buf, done, len, pos);
        else {
          n = this.readCached(buf.subarray(done, done + len), pos);
          if (n <= 0) ({ bytesRead: n } = await this.fh.read(buf, done, len, pos));
        }
      } catch (e) {
        throw fromSystemError(e, this.path, 'read');
      }
      if (n === 0) break;
      done += n;
    }
    if (done < want) buf.fill(0, done);
  }

  /** Read exactly buf.length bytes or throw invalid-image naming the structure. */
  async readExact(buf: Uint8Array, offset: number, structure: string): Promise<void> {
    if (offset + buf.length > this.cachedSize) {
      throw new BlockError(
        'invalid-image',
        `${this.path}: ${structure} at offset ${offset} (${buf.length} bytes) is beyond the end of the file (${this.cachedSize} bytes); the file may be truncated`,
        { path: this.path, structure, offset },
      );
    }
    await this.readAt(buf, offset);
  }

  async writeAt(buf: Uint8Array, offset: number): Promise<void> {
    if (this.readOnly) throw new BlockError('read-only', `${this.path}: opened read-only`, { path: this.path, op: 'write' });
    let done = 0;
    while (done < buf.length) {
      let n: number;
      const pos = offset + done;
      // No single write may cover a whole 2 MiB-aligned window of the file: the kernel then
      // gives it a 2 MiB page-cache folio, measured at about 7x the system time of the same
      // bytes written in 1 MiB pieces (Linux 6.18, ext4; see copy/read.ts). Cut such a write
      // in the middle of the window; every other write goes out whole.
      const window = Math.ceil(pos / HUGE_FOLIO) * HUGE_FOLIO;
      const len = window + HUGE_FOLIO <= offset + buf.length ? window + HUGE_FOLIO / 2 - pos : buf.length - done;
      try {
        if (this.syncFd !== null) n = writeSync(this.syncFd, buf, done, len, pos);
        else if (this.quickFd !== null && performance.now() >= this.quickPausedUntil) n = this.quickWrite(buf, done, len, pos);
        else ({ bytesWritten: n } = await this.fh.write(buf, done, len, pos));
      } catch (e) {
        throw fromSystemError(e, this.path, 'write');
      }
      done += n;
    }
    if (offset + buf.length > this.cachedSize) this.cachedSize = offset + buf.length;
  }

  async truncate(size: number): Promise<void> {
    try {
      this.knownData = null;
      await this.fh.truncate(size);
    } catch (e) {
      throw fromSystemError(e, this.path, 'truncate');
    }
    this.cachedSize = size;
  }

  /**
   * With cache 'unsafe' (qemu-img convert's default for its target) flushes
   * are skipped: the data reaches the disk when the kernel writes it back.
   * Only for files whose contents are worthless after a crash anyway.
   */
  unsafe = false;

  /**
   * Synchronous reads and writes on the calling thread instead of node's
   * thread pool, for batch commands (read, convert) where nothing else waits
   * on the event loop: with the data in the page cache each thread-pool round
   * trip (a promise, a hand-off, a wake-up) cost more than the copy, measured
   * on the 2 GiB bench copy at 0.55 s of system time synchronously against
   * 0.9-1.0 s through the pool. Never for servers: a read that misses the
   * page cache would stall every client.
   */
  useSyncIo(): void {
    const fd = (this.fh as { fd?: unknown }).fd;
    if (typeof fd === 'number') this.syncFd = fd;
  }

  private syncFd: number | null = null;

  /**
   * Writes on the calling thread while they are quick, for servers: a
   * buffered write normally only copies into the page cache, and handing it
   * to node's thread pool cost more than that (nbdcopy of 1 GiB of data into
   * a served qcow2: server CPU 3.0 -> 1.9 s, 3.4 -> 2.4 s of wall time; qemu-nbd
   * took 1.7 s and 3.1 s). A write that takes long (the kernel throttling
   * writers because too much is dirty, a slow disk) would stall every client,
   * so after a slow write the writes go through the thread pool again for
   * QUICK_BACKOFF_FACTOR times as long as it took (at most
   * QUICK_BACKOFF_MAX_MS): under steady throttling the event loop is then
   * blocked by writes at most 1/21 of the time, while a one-off hiccup (a
   * 5-10 ms write when the scheduler preempts us on a busy 2-core machine)
   * costs 0.1-0.2 s of pool writes instead of a whole second, which cost
   * nbdcopy writing 1 GiB about 0.5 s each time. Reads: see readCached.
   */
  useQuickWrites(): void {
    const fd = (this.fh as { fd?: unknown }).fd;
    if (typeof fd === 'number') this.quickFd = fd;
  }

  private quickFd: number | null = null;
  private quickPausedUntil = 0;

  private quickWrite(buf: Uint8Array, done: number, len: number, pos: number): number {
    const t0 = performance.now();
    const n = writeSync(this.quickFd as number, buf, done, len, pos);
    const took = performance.now() - t0;
    // Slow: longer than a page-cache copy at about 1 GB/s plus a few ms of slack.
    if (took > SLOW_WRITE_MS + len / 1e6) this.quickPausedUntil = t0 + took + Math.min(QUICK_BACKOFF_MAX_MS, took * QUICK_BACKOFF_FACTOR);
    return n;
  }

  /**
   * This file's descriptor when all of [pos, pos + length) is inside the
   * file and in the page cache now (cachestat, native/hostio.c), so that
   * splicing it to a socket cannot wait for the disk; else -1.
   */
  spanNow(pos: number, length: number): number {
    if (!cachestatWorks || hostIo === null || pos + length > this.cachedSize || this.syncFd !== null) return -1;
    const fd = (this.fh as { fd?: unknown }).fd;
    if (typeof fd !== 'number') return -1;
    const r = hostIo.cached(fd, pos, length);
    // ENOSYS (a kernel before 6.5) or any other failure: never again; the copying paths remain.
    if (r < 0) cachestatWorks = false;
    return r === 1 ? fd : -1;
  }

  /** Fill buf from pos entirely from the page cache, at once (see readCached), or return false. */
  readNow(buf: Uint8Array, pos: number): boolean {
    if (pos + buf.length > this.cachedSize || this.syncFd !== null) return false;
    return this.readCached(buf, pos) === buf.length;
  }

  /**
   * The part of a read the page cache holds, read at once on this thread
   * (preadv2 with RWF_NOWAIT, see native/hostio.c): 0 when nothing could be
   * read that way, and the caller goes through node's thread pool, which may
   * wait for the disk without stalling the event loop. Asynchronous reads
   * take this path first: for the NBD server under `fio` 4 KiB random reads
   * the pool's hand-off, wake-up and promise cost more than the cached read.
   */
  private readCached(buf: Uint8Array, pos: number): number {
    if (!nowaitReads || hostIo === null) return 0;
    const fd = (this.fh as { fd?: unknown }).fd;
    if (typeof fd !== 'number') return 0;
    const n = hostIo.preadNowait(fd, buf, pos);
    // Any failure other than "would block" (EOPNOTSUPP on an old kernel or an odd file
    // system, EINVAL, ...) leaves it to the thread pool, which reports real errors.
    if (n < -1) nowaitReads = false;
    return n;
  }

  async sync(): Promise<void> {
    if (this.readOnly || this.unsafe) return;
    try {
      await this.fh.datasync();
    } catch (e) {
      throw fromSystemError(e, this.path, 'flush');
    }
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}
