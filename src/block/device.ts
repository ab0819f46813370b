/**
 * The one interface everything in rblock talks to: a byte-addressed,
 * fixed-size device. Formats, filters, servers and tools only see this.
 */

export interface Capabilities {
  readonly readOnly: boolean;
  /** Flush has a real effect (durability barrier). */
  readonly flush: boolean;
  /** The driver honours FUA natively (else it is emulated with flush). */
  readonly fua: boolean;
  /** writeZeroes is efficient (no data written). */
  readonly zero: boolean;
  /** discard frees space. */
  readonly discard: boolean;
  /** blockStatus reports real allocation (not "all data"). */
  readonly blockStatus: boolean;
}

export interface IoOpts {
  /** Force unit access: durable before the call resolves. */
  fua?: boolean;
  /** For writeZeroes: the range may be deallocated if it then reads as zeros. */
  mayTrim?: boolean;
}

/**
 * One run of a device's mapping, as `qemu-img map` and NBD block status see
 * it. Half-open: [offset, offset + length).
 */
export interface Extent {
  offset: number;
  length: number;
  /** Reads as zeros. */
  zero: boolean;
  /** No data stored for it (NBD_STATE_HOLE; qemu's `data: false`). */
  hole: boolean;
  /** Allocated in some layer of the chain (qemu's `present`). Defaults to !hole. */
  allocated?: boolean;
  /** Which chain layer answers for it: 0 = the top image. */
  depth?: number;
  /** Offset in the host file where the data lives (not for compressed data). */
  hostOffset?: number;
  /** The host file that holds the data (for `map`'s human output). */
  file?: string;
  /** The data is stored compressed. */
  compressed?: boolean;
}

/** What readNow filled: runs covering the read, those that read as zeros marked (their bytes are zeros too). */
export type ReadRuns = Array<{ offset: number; length: number; zero: boolean }>;

export interface ReadNowOpts {
  /**
   * false: the caller does not need the runs that read as zeros marked (it
   * sends the bytes, or looks at them itself), so a device may report
   * everything as data instead of finding its holes. For a sparse raw file
   * finding them is two lseek calls, more than a small cached read costs.
   */
  holes?: boolean;
  /**
   * false: runs reported as zero may be left as they are in buf, because the
   * caller does not look at their bytes (the NBD server sends them as hole
   * chunks). Saves clearing them: a few percent of a copy of a sparse disk.
   */
  zeroFill?: boolean;
}

/**
 * Where a range of a device lives, in order: runs that read as zeros (fd -1),
 * and runs whose bytes are exactly bytes of a host file (fd, hostOffset).
 * One object shape for both, so the server's loop over them stays
 * monomorphic.
 */
export interface DeviceSpan {
  offset: number;
  length: number;
  zero: boolean;
  /** The host file's descriptor for a data span, -1 for zeros. */
  fd: number;
  hostOffset: number;
}

export interface BlockDevice extends AsyncDisposable {
  readonly size: number;
  readonly caps: Capabilities;
  /** Name of the format or backend, e.g. "qcow2", "raw", "memory". */
  readonly format: string;
  /** The file behind the device, when there is one. */
  readonly path?: string;

  /** Fill buf entirely from offset, or throw. */
  pread(buf: Uint8Array, offset: number, opts?: IoOpts): Promise<void>;
  /**
   * Fill buf from offset at once, without waiting, when everything needed is
   * already in memory (metadata cached, data in the host's page cache):
   * the runs read, or null, and then pread it (buf may have been written).
   * Never throws for a problem pread would report: it returns null. For
   * servers, where the promise chain of a pread cost more than a cached read.
   */
  readNow?(buf: Uint8Array, offset: number, opts?: ReadNowOpts): ReadRuns | null;
  /**
   * [offset, offset + length) as spans of host files and runs of zeros, at
   * once, when the mapping is in memory and every byte of the data spans is
   * in the host's page cache; else null (then readNow or pread). For a
   * server that hands page cache pages to a socket without copying them
   * (splice, src/nbd/stream.ts): only valid while nothing writes the
   * device, so only read-only exports use it. The descriptors stay the
   * device's: use them before it can be closed.
   */
  spansNow?(offset: number, length: number): DeviceSpan[] | null;
  /** Write buf entirely at offset, or throw. */
  pwrite(buf: Uint8Array, offset: number, opts?: IoOpts): Promise<void>;
  writeZeroes(offset: number, length: number, opts?: IoOpts): Promise<void>;
  discard(offset: number, length: number, opts?: IoOpts): Promise<void>;
  flush(): Promise<void>;
  /**
   * Extents covering a prefix of [offset, offset + length): the first starts
   * at offset, they are contiguous and there is at least one.
   */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  close(): Promise<void>;
}
