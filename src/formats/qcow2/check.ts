/**
 * `rblock check` for qcow2: the consistency check and repair of `qemu-img
 * check` 7.2 (spec digest §3, §10; QEMU block/qcow2-refcount.c).
 *
 * One pass (qemu's bdrv_check):
 *   1. read the snapshot table (v3 entries without 16 bytes of extra data are corrupt);
 *   2. count every reference from scratch into an in-memory refcount array
 *      (the "IMRT", one entry per host cluster, as wide as the image's
 *      refcounts): cluster 0, the active L1 and its L2 tables and data
 *      clusters, every snapshot's L1/L2/data, compressed clusters (every host
 *      cluster touched by [offset & ~511, + sectors * 512)), the snapshot
 *      table, the refcount table, the LUKS header, the bitmap directory,
 *      bitmap tables and bitmap data, and last the refcount blocks;
 *   3. compare with the stored refcounts: more stored than referenced is a
 *      leak, fewer is a corruption;
 *   4. check the COPIED flags of the active L1 and its L2 tables against the
 *      stored refcounts.
 * Messages, their order and the counting follow qemu-img check; per-cluster
 * lines go to `log` (qemu prints them on stderr).
 *
 * Repair (`-r leaks`, `-r all`) changes refcount blocks in place. Where qemu
 * would rebuild the whole refcount structure (a referenced cluster with
 * refcount 0, a broken refcount table entry), rblock instead fixes the
 * entries in place and allocates refcount blocks (and, if needed, a bigger
 * refcount table) at the end of the file. Crash safety by ordering: first
 * every changed block is written with max(old, new) per entry (raises only),
 * then new blocks are hooked into the table (or the new table into the
 * header), and only then are refcounts lowered; COPIED flags are fixed last.
 *
 * Memory: the IMRT is a typed array sized by the file's cluster count; L2
 * tables are read one at a time.
 */
import { BlockError } from '../../block/errors.js';
import { HostFile } from '../../block/file.js';
import { dataView } from '../../util/bytes.js';
import { resolveRelative } from '../chain.js';
import { openImage } from '../registry.js';
import { readBitmaps } from './bitmap.js';
import {
  NATIVE_LE,
  SwappedTable,
  copiedL2,
  countL2,
  decodeRefblock,
  nextNonZero,
  sameRange,
  type L2Tally,
  type NativeRefs,
} from './check-fast.js';
import * as C from './constants.js';
import { readHeader, type Qcow2Header } from './header.js';
import { Refcounts } from './refcount.js';

export type RepairMode = 'leaks' | 'all';

/** The counters of qemu's BdrvCheckResult (and BlockFragInfo). */
export interface CheckCounts {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

/** What `qemu-img check` reports for an image (its ImageCheck). */
export interface ImageCheck extends CheckCounts {
  filename: string;
  format: string;
}

export interface CheckOptions {
  repair?: RepairMode;
  /** One line per finding, as qemu-img prints them on stderr (no newline). */
  log?: (line: string) => void;
  /**
   * A repair needs the whole refcount array in memory: refuse to repair
   * images whose array would need more bytes than this (default 1 GiB).
   */
  maxMemory?: number;
  /**
   * Without a repair, references are counted in windows of host clusters
   * whose array takes at most this many bytes (default 64 MiB), the
   * metadata being read once per window: memory stays bounded whatever the
   * file's size. Findings and counts are the same; only per-cluster errors
   * found while counting (refcount overflows, shared refcount blocks) of
   * later windows come after the earlier windows' leak and corruption lines.
   */
  windowBytes?: number;
  /** Called before every write a repair makes; throwing stops the repair there (tests simulate a crash). */
  onWrite?: (offset: number, length: number) => void;
  /**
   * Synchronous host I/O (HostFile.useSyncIo) for a one-shot batch check,
   * as the CLI runs it: the metadata reads are small and mostly in the page
   * cache, so a thread-pool round trip per read costs more than the read.
   * Not for a check inside a server (a read that misses the cache would
   * stall the event loop).
   */
  syncIo?: boolean;
}

export interface CheckOutcome {
  /** The final report (after the double check when something was repaired); null if the check failed. */
  check: ImageCheck | null;
  /** What the repair pass fixed, when it fixed anything (qemu then checks again). */
  repaired: { leaks: number; corruptions: number } | null;
  /** Why the check could not complete (qemu-img: "Check failed: ..."), or null. */
  failure: string | null;
}

/** The check could not complete (qemu: a negative return from bdrv_check). */
export class CheckFailure extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CheckFailure';
  }
}

export function emptyCounts(): CheckCounts {
  return {
    checkErrors: 0,
    corruptions: 0,
    leaks: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
  };
}

const DEFAULT_MAX_MEMORY = 1 << 30;
const DEFAULT_WINDOW_BYTES = 64 << 20;
const TWO32 = 2 ** 32;
const EIO = 'Input/output error';

/** An on-disk u64 given as its two 32-bit halves, in qemu's %PRIx64 spelling. */
function hex64(hi: number, lo: number): string {
  return ((BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)).toString(16);
}

function hex(n: number): string {
  return n.toString(16);
}

/** C's "%#x": 0x-prefixed unless zero. */
function altHex(n: number): string {
  return n === 0 ? '0' : '0x' + n.toString(16);
}

/** Entry i of a refcount block (spec §3 packing), without a DataView per call. */
function refEntry(b: Uint8Array, i: number, bits: number): number {
  switch (bits) {
    case 16:
      return ((b[2 * i] as number) << 8) | (b[2 * i + 1] as number);
    case 8:
      return b[i] as number;
    case 32:
      return (
        (((b[4 * i] as number) << 24) | ((b[4 * i + 1] as number) << 16) | ((b[4 * i + 2] as number) << 8) | (b[4 * i + 3] as number)) >>> 0
      );
    case 64: {
      const j = 8 * i;
      const hi = (((b[j] as number) << 24) | ((b[j + 1] as number) << 16) | ((b[j + 2] as number) << 8) | (b[j + 3] as number)) >>> 0;
      const lo = (((b[j + 4] as number) << 24) | ((b[j + 5] as number) << 16) | ((b[j + 6] as number) << 8) | (b[j + 7] as number)) >>> 0;
      return hi === 0 ? lo : hi * TWO32 + lo;
    }
    default:
      return Refcounts.entry(b, i, bits);
  }
}

/** Bits 9..55 of an L1/L2 entry. */
function entryOffset(hi: number, lo: number): number {
  return (hi & 0x00ff_ffff) * TWO32 + ((lo & 0xffff_fe00) >>> 0);
}

/**
 * The in-memory refcount array: one counter per host cluster of
 * [base, base + size), saturating at the image's refcount maximum like
 * qemu's (an overflow is a corruption). `data[k - base]` counts cluster k.
 */
class RefArray {
  data: Uint8Array | Uint16Array | Uint32Array | Float64Array;
  size: number;
  readonly max: number;

  constructor(
    private readonly bits: number,
    size: number,
    readonly base = 0,
    /** An array of this width to reuse (zeroed here) when it is big enough. */
    reuse: RefArray['data'] | null = null,
  ) {
    this.max = bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
    this.size = size;
    if (reuse !== null && reuse.length >= size + 1) {
      reuse.fill(0);
      this.data = reuse;
    } else this.data = RefArray.alloc(bits, size + 1);
  }

  private static alloc(bits: number, n: number): Uint8Array | Uint16Array | Uint32Array | Float64Array {
    if (bits <= 8) return new Uint8Array(n);
    if (bits === 16) return new Uint16Array(n);
    if (bits === 32) return new Uint32Array(n);
    return new Float64Array(n);
  }

  get(i: number): number {
    const j = i - this.base;
    return j >= 0 && j < this.size ? (this.data[j] as number) : 0;
  }

  /** Make clusters [base, n) addressable (new ones are 0). */
  ensure(n: number): void {
    const m = n - this.base;
    if (m > this.data.length) {
      const grown = RefArray.alloc(this.bits, Math.max(m, Math.ceil(this.data.length * 1.5)));
      grown.set(this.data);
      this.data = grown;
    }
    if (m > this.size) this.size = m;
  }

  set(i: number, v: number): void {
    this.ensure(i + 1);
    this.data[i - this.base] = v;
  }
}

/** The refcount table as loaded (qemu reads refcount_table_clusters whole clusters; past EOF reads zeros). */
class RefTable {
  readonly entries: number;
  private readonly dv: DataView;

  constructor(readonly raw: Uint8Array) {
    this.entries = raw.length / 8;
    this.dv = dataView(raw);
  }

  static async load(file: HostFile, h: Qcow2Header): Promise<RefTable> {
    const raw = new Uint8Array(h.refcountTableClusters * h.clusterSize);
    await file.readAt(raw, h.refcountTableOffset);
    return new RefTable(raw);
  }

  hi(t: number): number {
    return this.dv.getUint32(t * 8);
  }

  lo(t: number): number {
    return this.dv.getUint32(t * 8 + 4);
  }

  /** Bits 9..63: the refcount block offset (may exceed 2^53 on a corrupt image; then it is far outside the file anyway). */
  offset(t: number): number {
    return this.hi(t) * TWO32 + ((this.lo(t) & 0xffff_fe00) >>> 0);
  }

  reserved(t: number): boolean {
    return (this.lo(t) & 0x1ff) !== 0;
  }
}

/** Stored refcounts, read through the refcount table like qemu's qcow2_get_refcount, with a small block cache. */
class StoredRefcounts {
  private readonly cache = new Map<number, Uint8Array>();
  private spare: Uint8Array | null = null;
  private lastT = -1;
  private lastBlock: Uint8Array | null | 'unaligned' = null;

  constructor(
    private readonly file: HostFile,
    private readonly table: RefTable,
    private readonly cs: number,
    readonly bits: number,
    readonly perBlock: number,
    /** Told once about the first unusable (unaligned) refcount block, as qemu signals the corruption once. */
    private readonly onUnaligned: (t: number, offset: number) => void,
  ) {}

  private signalled = false;

  /** The block for table index t: null if none, 'unaligned' if the entry cannot be used. */
  async block(t: number): Promise<Uint8Array | null | 'unaligned'> {
    if (t === this.lastT) return this.lastBlock;
    const b = await this.load(t);
    this.lastT = t;
    this.lastBlock = b;
    return b;
  }

  private async load(t: number): Promise<Uint8Array | null | 'unaligned'> {
    if (t >= this.table.entries) return null;
    const off = this.table.offset(t);
    if (off === 0) return null;
    if (off % this.cs !== 0) {
      if (!this.signalled) this.onUnaligned(t, off);
      this.signalled = true;
      return 'unaligned';
    }
    let b = this.cache.get(off);
    if (b !== undefined) {
      this.cache.delete(off);
      this.cache.set(off, b);
      return b;
    }
    // The block evicted last is read into again: a fresh array per block left the external
    // memory of every evicted one to the GC, growing with the image (32 MiB for 1 TiB).
    b = this.spare ?? new Uint8Array(this.cs);
    this.spare = null;
    await this.file.readAt(b, off);
    this.cache.set(off, b);
    if (this.cache.size > 64) {
      const oldest = this.cache.keys().next().value as number;
      this.spare = this.cache.get(oldest) ?? null;
      this.cache.delete(oldest);
      // 8-bit refcounts are used as they are read (native() returns the block itself): forget them.
      if (this.spare !== null && this.spare === this.nativeRefs) {
        this.nativeT = -1;
        this.nativeRefs = null;
      }
    }
    return b;
  }

  /** Refcount of cluster k; throws CheckFailure(EIO) where qemu fails (an unaligned refcount block). */
  async get(k: number): Promise<number> {
    const t = Math.floor(k / this.perBlock);
    const b = t === this.lastT ? this.lastBlock : await this.block(t);
    if (b === null) return 0;
    if (b === 'unaligned') throw new CheckFailure(EIO);
    return refEntry(b, k % this.perBlock, this.bits);
  }

  private nativeT = -1;
  private nativeRefs: NativeRefs | null = null;
  private nativeBuf: NativeRefs | null = null;

  /**
   * The stored refcounts of block t decoded to native numbers (see
   * check-fast.ts), or null where there is none (no block, an unusable one,
   * a width without a native array). Decoded once per block in a row, into
   * one reused array: valid until the next call.
   */
  async native(t: number): Promise<NativeRefs | null> {
    if (t === this.nativeT) return this.nativeRefs;
    const b = await this.block(t);
    this.nativeT = t;
    this.nativeRefs = b instanceof Uint8Array ? decodeRefblock(b, this.bits, this.nativeBuf) : null;
    if (this.nativeRefs !== null && this.nativeRefs !== b) this.nativeBuf = this.nativeRefs;
    return this.nativeRefs;
  }

  /** The block last used by get/peek/block, as its table index (-1: none). */
  get currentIndex(): number {
    return this.lastT;
  }

  /** Refcount of cluster k when its block is the one last used (no await), else -1. */
  peek(k: number): number {
    const t = Math.floor(k / this.perBlock);
    if (t !== this.lastT) return -1;
    const b = this.lastBlock;
    if (b === null) return 0;
    if (b === 'unaligned') return -1;
    return refEntry(b, k % this.perBlock, this.bits);
  }

  invalidate(): void {
    this.cache.clear();
    this.lastT = -1;
    this.nativeT = -1;
    this.nativeRefs = null;
  }
}

/**
 * Reads L1/L2 tables. Images with small clusters have many small L2 tables
 * close together: those go through a read-ahead window, so that a 512-byte
 * cluster image is not read 512 bytes at a time.
 */
class TableReader {
  private readonly windowSize: number;
  private win: Uint8Array | null = null;
  private winStart = 0;

  constructor(
    private readonly file: HostFile,
    private readonly cs: number,
  ) {
    this.windowSize = cs < 65536 ? 256 * 1024 : 0;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    if (buf.length > this.windowSize / 2 || !Number.isSafeInteger(offset + this.windowSize)) {
      await this.file.readAt(buf, offset);
      return;
    }
    const w = this.win;
    if (w === null || offset < this.winStart || offset + buf.length > this.winStart + w.length) {
      const start = offset - (offset % this.cs);
      const win = w ?? new Uint8Array(this.windowSize);
      this.win = null;
      await this.file.readAt(win, start);
      this.win = win;
      this.winStart = start;
    }
    buf.set((this.win as Uint8Array).subarray(offset - this.winStart, offset - this.winStart + buf.length));
  }

  /** Forget the window (after any write to the file). */
  invalidate(): void {
    this.win = null;
  }
}

/** A snapshot table entry, as much as the check needs. */
interface SnapshotEntry {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  extraDataSize: number;
}

/** Why a refcount table entry cannot be kept (qemu's check_refblocks findings). */
interface BadRefblock {
  kind: 'reserved' | 'unaligned' | 'outside' | 'shared';
  /** 'shared': the block's cluster, counted once for the block in the IMRT. */
  cluster?: number;
}

type ClusterType = 'compressed' | 'zero-plain' | 'zero-alloc' | 'normal' | 'unallocated';

/** One bdrv_check pass over an open qcow2 file. */
class CheckPass {
  /** The pass's counts; while a later window is counted, a scratch set (see countWindows). */
  res = emptyCounts();
  private readonly realRes = this.res;
  /** Where findings go; while a later window is counted, nowhere (they were reported with the first). */
  private log: (line: string) => void;
  /** Clusters [0, clusterEnd) are counted: the file's, and a last one a reference may reach past EOF. */
  private clusterEnd = 0;
  /** The window being counted ends before this cluster (Infinity: the last window, which may grow). */
  private winEnd = Infinity;
  private readonly cs: number;
  private readonly bits: number;
  private readonly perBlock: number;
  private readonly hasDataFile: boolean;
  private readonly fixLeaks: boolean;
  private readonly fixErrors: boolean;
  private imrt!: RefArray;
  private table!: RefTable;
  private stored!: StoredRefcounts;
  private snapshots: SnapshotEntry[] = [];
  private snapshotsSize = 0;
  private rebuild = false;
  private readonly bad = new Map<number, BadRefblock>();
  private reftableCounted = false;
  private highest = 0;
  /** Writes made while counting (L2 entries zeroed) that still need an fsync. */
  private unsynced = false;
  private readonly tables: TableReader;
  private swappedTable: SwappedTable | null = null;
  private l2Table: Uint8Array | null = null;

  /** The scratch table for the fast loops: one cluster, reused for every L2 table. */
  private swapped(): SwappedTable {
    return (this.swappedTable ??= new SwappedTable(this.cs));
  }

  constructor(
    private readonly file: HostFile,
    private h: Qcow2Header,
    private readonly fix: RepairMode | null,
    private readonly realLog: (line: string) => void,
    private readonly memory: { maxMemory: number; windowBytes: number },
    private readonly onWrite?: (offset: number, length: number) => void,
  ) {
    this.log = realLog;
    this.cs = h.clusterSize;
    this.bits = 2 ** h.refcountOrder;
    this.perBlock = (this.cs * 8) / this.bits;
    this.hasDataFile = (h.incompatible & C.INCOMPAT_DATA_FILE) !== 0n;
    this.fixLeaks = fix !== null;
    this.fixErrors = fix === 'all';
    this.tables = new TableReader(file, this.cs);
  }

  /** Every write of the check goes through here: cached table bytes become stale. */
  private async write(buf: Uint8Array, offset: number): Promise<void> {
    this.onWrite?.(offset, buf.length);
    this.tables.invalidate();
    this.stored.invalidate();
    await this.file.writeAt(buf, offset);
  }

  /** qcow2_co_check_locked: snapshot table, refcounts, then mark clean if repaired. */
  async run(): Promise<CheckCounts> {
    const snap = emptyCounts();
    try {
      await this.readSnapshotTable(snap);
    } catch (e) {
      this.res.checkErrors++;
      throw e;
    }
    try {
      await this.checkRefcounts();
    } finally {
      this.res = this.realRes;
      this.log = this.realLog;
      this.res.corruptions += snap.corruptions;
      this.res.corruptionsFixed += snap.corruptionsFixed;
    }
    if (this.fix !== null && this.res.checkErrors === 0 && this.res.corruptions === 0) await this.markClean();
    return this.res;
  }

  // ---- snapshot table (qcow2_check_read_snapshot_table) ----

  private async readSnapshotTable(out: CheckCounts): Promise<void> {
    const h = this.h;
    let off = h.snapshotsOffset;
    const fixed = new Uint8Array(40);
    for (let i = 0; i < h.nbSnapshots; i++) {
      off = Math.ceil(off / 8) * 8;
      await this.file.readAt(fixed, off);
      const dv = dataView(fixed);
      const l1Hi = dv.getUint32(0);
      const l1Lo = dv.getUint32(4);
      const extra = dv.getUint32(36);
      const idLen = dv.getUint16(12);
      const nameLen = dv.getUint16(14);
      if (extra > 1024) {
        throw new CheckFailure(`failed to read the snapshot table: Too much extra metadata in snapshot table entry ${i}`);
      }
      off += 40 + extra;
      const strings = new Uint8Array(idLen + nameLen);
      await this.file.readAt(strings, off);
      off += idLen + nameLen;
      if (off - h.snapshotsOffset > C.MAX_SNAPSHOT_TABLE_BYTES)
        throw new CheckFailure('failed to read the snapshot table: Snapshot table is too big');
      this.snapshots.push({
        l1TableOffset: l1Hi * TWO32 + l1Lo,
        l1Size: dv.getUint32(8),
        id: Buffer.from(strings.subarray(0, idLen)).toString('utf8'),
        name: Buffer.from(strings.subarray(idLen)).toString('utf8'),
        extraDataSize: extra,
      });
    }
    this.snapshotsSize = h.nbSnapshots > 0 ? off - h.snapshotsOffset : 0;
    if (h.version >= 3) {
      this.snapshots.forEach((s, i) => {
        if (s.extraDataSize < 16) {
          // qemu rewrites the snapshot table with -r all; rblock does not (yet), so this stays an error.
          out.corruptions++;
          this.log(`ERROR snapshot table entry ${i} is incomplete`);
        }
      });
    }
  }

  // ---- qcow2_check_refcounts ----

  private async checkRefcounts(): Promise<void> {
    const res = this.res;
    const nb = Math.ceil(this.file.size / this.cs);
    const entryBytes = Math.max(1, this.bits / 8);
    const bytes = nb * entryBytes;
    if (nb > 0x7fff_ffff) {
      res.checkErrors++;
      throw new CheckFailure('File too large');
    }
    const window = Math.max(1, Math.floor(this.memory.windowBytes / entryBytes));
    if (this.fix !== null && bytes > this.memory.maxMemory) {
      res.checkErrors++;
      throw new CheckFailure(
        `the image file has ${nb} clusters of ${this.cs} bytes; repairing it needs a refcount array of ${Math.ceil(bytes / 2 ** 20)} MiB in memory, more than the limit of ${Math.floor(this.memory.maxMemory / 2 ** 20)} MiB (a check without -r counts in bounded windows)`,
      );
    }
    res.totalClusters = Math.ceil((Math.floor(this.h.size / 512) * 512) / this.cs); // bs->total_sectors * 512
    await this.loadTable();
    this.highest = 0;
    if (this.fix === null && nb > window) {
      // Report only: count and compare one window of host clusters at a time (memory bounded).
      await this.countWindows(nb, window);
      await this.checkOflagCopied();
      res.imageEndOffset = (this.highest + 1) * this.cs;
      return;
    }
    this.imrt = new RefArray(this.bits, nb);
    this.clusterEnd = nb;
    this.winEnd = Infinity;

    await this.calculate();
    const pre = { ...res };
    await this.compare('report');

    if (this.fix === 'leaks' && this.rebuild) {
      this.log('ERROR need to rebuild refcount structures');
      res.checkErrors++;
      throw new CheckFailure(EIO);
    }
    if (this.fix !== null && (res.leaks > 0 || res.corruptions > 0 || this.bad.size > 0)) {
      Object.assign(res, pre);
      const fixedBad = this.fixErrors ? this.bad.size : 0;
      this.highest = 0;
      const wrote = await this.compare(this.fix);
      if (wrote || fixedBad > 0) {
        try {
          if (this.fix === 'all') await this.applyAll();
          else await this.applyLeaks();
        } catch (e) {
          res.checkErrors++;
          throw e;
        }
        res.corruptions -= fixedBad;
        res.corruptionsFixed += fixedBad;
        // The table may have moved: read the header and table again.
        this.h = await readHeader(this.file);
        await this.loadTable();
      }
    }
    await this.checkOflagCopied();
    res.imageEndOffset = (this.highest + 1) * this.cs;
  }

  /**
   * calculate + compare for clusters [base, base + window), window after
   * window. The first window's pass reports everything calculate finds;
   * later passes walk the same metadata again with findings and counts
   * going to a scratch set, except what concerns their own clusters
   * (inc's overflows, checkRefblocks' shared blocks), and each compare
   * reports its own clusters, in cluster order as with one window.
   */
  private async countWindows(nb: number, window: number): Promise<void> {
    let reuse: RefArray['data'] | null = null;
    for (let base = 0; base < nb; base += window) {
      const last = base + window >= nb;
      this.imrt = new RefArray(this.bits, last ? nb - base : window, base, reuse);
      reuse = this.imrt.data;
      this.clusterEnd = nb;
      this.winEnd = last ? Infinity : base + window;
      if (base > 0) {
        this.res = emptyCounts();
        this.log = (): void => {};
      }
      try {
        await this.calculate();
      } finally {
        this.res = this.realRes;
        this.log = this.realLog;
      }
      await this.compare('report');
    }
  }

  private async loadTable(): Promise<void> {
    this.table = await RefTable.load(this.file, this.h);
    this.stored = new StoredRefcounts(this.file, this.table, this.cs, this.bits, this.perBlock, (t, off) =>
      this.log(
        `qcow2: Image is corrupt: Refblock offset ${altHex(off)} unaligned (reftable index: ${altHex(t)}); further non-fatal corruption events will be suppressed`,
      ),
    );
  }

  /**
   * qcow2_inc_refcounts_imrt: one more reference to every cluster of
   * [offset, offset + size). Returns false if the range was refused (past EOF).
   */
  private inc(offset: number, size: number): boolean {
    if (size <= 0) return true;
    const cs = this.cs;
    if (offset + size - this.file.size >= cs) {
      this.log(
        `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hex(offset)} size 0x${hex(size)}`,
      );
      this.res.corruptions++;
      return false;
    }
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + size - 1) / cs);
    if (last >= this.clusterEnd) this.clusterEnd = last + 1;
    const imrt = this.imrt;
    const base = imrt.base;
    // Only the clusters of the window being counted (all of them with one window).
    const to = Math.min(last, this.winEnd - 1);
    for (let k = Math.max(first, base); k <= to; k++) {
      if (k - base >= imrt.size) imrt.ensure(k + 1);
      const r = imrt.data[k - base] as number;
      if (r === imrt.max) {
        // About this window's own cluster: reported in this window's pass.
        this.realLog(`ERROR: overflow cluster offset=0x${hex(k * cs)}`);
        this.realLog(
          'Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing',
        );
        this.realRes.corruptions++;
        continue;
      }
      imrt.data[k - base] = r + 1;
    }
    return true;
  }

  /** calculate_refcounts */
  private async calculate(): Promise<void> {
    const h = this.h;
    const res = this.res;
    this.inc(0, this.cs);
    await this.checkL1(h.l1TableOffset, h.l1Size, true);
    if (this.hasDataFile && h.nbSnapshots > 0) {
      this.log(`ERROR ${h.nbSnapshots} snapshots in image with data file`);
      res.corruptions++;
    }
    for (const sn of this.snapshots) {
      if (sn.l1TableOffset % this.cs !== 0) {
        this.log(
          `ERROR snapshot ${sn.id} (${sn.name}) l1_offset=${altHex(sn.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`,
        );
        res.corruptions++;
        continue;
      }
      if (sn.l1Size > C.MAX_L1_BYTES / 8) {
        this.log(
          `ERROR snapshot ${sn.id} (${sn.name}) l1_size=${altHex(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`,
        );
        res.corruptions++;
        continue;
      }
      await this.checkL1(sn.l1TableOffset, sn.l1Size, false);
    }
    this.inc(h.snapshotsOffset, this.snapshotsSize);
    this.reftableCounted = this.inc(h.refcountTableOffset, this.table.entries * 8);
    if (h.cryptMethod === 2 && h.crypto !== null && h.crypto.length > 0) this.inc(h.crypto.offset, h.crypto.length);
    await this.checkBitmaps();
    this.checkRefblocks();
    if (this.unsynced) await this.file.sync();
  }

  /** check_refcounts_l1 */
  private async checkL1(l1Offset: number, l1Size: number, active: boolean): Promise<void> {
    if (l1Size === 0) return;
    this.inc(l1Offset, l1Size * 8);
    const l1 = new Uint8Array(l1Size * 8);
    await this.readMeta(l1, l1Offset, 'ERROR: I/O error in check_refcounts_l1');
    const dv = dataView(l1);
    for (let i = 0; i < l1Size; i++) {
      const hi = dv.getUint32(i * 8);
      const lo = dv.getUint32(i * 8 + 4);
      if (hi === 0 && lo === 0) continue;
      if ((hi & 0x7f00_0000) !== 0 || (lo & 0x1ff) !== 0) {
        this.log(`ERROR found L1 entry with reserved bits set: ${hex64(hi, lo)}`);
        this.res.corruptions++;
      }
      const l2Offset = entryOffset(hi, lo);
      this.inc(l2Offset, this.cs);
      if (l2Offset % this.cs !== 0) {
        this.log(`ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
        this.res.corruptions++;
      }
      await this.checkL2(l2Offset, active);
    }
  }

  private async readMeta(buf: Uint8Array, offset: number, message: string): Promise<void> {
    try {
      await this.tables.read(buf, offset);
    } catch (e) {
      this.log(message);
      this.res.checkErrors++;
      throw new CheckFailure(e instanceof Error ? e.message : String(e));
    }
  }

  /** qcow2_get_cluster_type */
  private clusterType(hi: number, lo: number): ClusterType {
    if ((hi & 0x4000_0000) !== 0) return 'compressed';
    const hasOffset = (hi & 0x00ff_ffff) !== 0 || (lo & 0xffff_fe00) !== 0;
    if ((lo & 1) !== 0 && !this.h.extendedL2) return hasOffset ? 'zero-alloc' : 'zero-plain';
    if (!hasOffset) return this.hasDataFile && (hi & 0x8000_0000) !== 0 ? 'normal' : 'unallocated';
    return 'normal';
  }

  /** check_refcounts_l2 (the active L1's tables also feed the fragmentation numbers). */
  private async checkL2(l2Offset: number, active: boolean): Promise<void> {
    const h = this.h;
    const cs = this.cs;
    const res = this.res;
    const es = h.l2EntrySize;
    // One buffer for every L2 table of the pass: tables are checked one at a time, and a fresh
    // cluster-sized array per table left GC-pending external memory growing with the image.
    const table = (this.l2Table ??= new Uint8Array(cs));
    await this.readMeta(table, l2Offset, 'ERROR: I/O error in check_refcounts_l2');
    const dv = dataView(table);
    const x = 62 - (h.clusterBits - 8);
    const offMaskHi = 2 ** (x - 32) - 1;
    const csizeMask = 2 ** (h.clusterBits - 8) - 1;
    // The fast loop (check-fast.ts) takes the common entries of a standard L2 table (no external
    // data file); every other entry takes the general path below, and the fast loop resumes after it.
    const fast = NATIVE_LE && !h.extendedL2 && !this.hasDataFile;
    const words = fast ? this.swapped().load(table) : null;
    const nb = Math.ceil(this.file.size / cs);
    const tally: L2Tally = { allocated: 0, fragmented: 0, nextContiguous: 0 };
    const n = h.l2Entries;
    for (let i = 0; i < n; i++) {
      if (words !== null) {
        i = countL2(words, i, n, this.imrt, nb, this.winEnd, h.clusterBits, active, tally);
        if (i >= n) break;
      }
      const base = i * es;
      // General path: every entry type and every corruption qemu reports.
      let hi = dv.getUint32(base);
      const lo = dv.getUint32(base + 4);
      const bhi = h.extendedL2 ? dv.getUint32(base + 8) : 0;
      const blo = h.extendedL2 ? dv.getUint32(base + 12) : 0;
      const type = this.clusterType(hi, lo);
      if (type !== 'compressed' && ((hi & 0x3f00_0000) !== 0 || (lo & 0x1fe) !== 0)) {
        this.log(`ERROR found l2 entry with reserved bits set: ${hex64(hi, lo)}`);
        res.corruptions++;
      }
      switch (type) {
        case 'compressed': {
          if ((hi & 0x8000_0000) !== 0) {
            this.log(`ERROR: coffset=0x${hex((hi & offMaskHi) * TWO32 + lo)}: copied flag must never be set for compressed clusters`);
            hi = (hi & 0x7fff_ffff) >>> 0;
            res.corruptions++;
          }
          if (this.hasDataFile) {
            this.log(`ERROR compressed cluster ${i} with data file, entry=0x${hex64(hi, lo)}`);
            res.corruptions++;
            break;
          }
          if (bhi !== 0 || blo !== 0) {
            this.log(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${hex64(hi, lo)}`);
            res.corruptions++;
            break;
          }
          const coffset = (hi & offMaskHi) * TWO32 + lo;
          const sectors = ((hi >>> (x - 32)) & csizeMask) + 1;
          this.inc(coffset, sectors * 512 - (lo & 511));
          if (active) {
            res.allocatedClusters++;
            res.compressedClusters++;
            res.fragmentedClusters++;
          }
          break;
        }
        case 'zero-alloc':
        case 'normal': {
          const offset = entryOffset(hi, lo);
          if ((bhi & blo) !== 0) {
            res.corruptions++;
            this.log(`ERROR offset=${hex(offset)}: Allocated cluster has corrupted subcluster allocation bitmap`);
          }
          if (offset % cs !== 0) {
            res.corruptions++;
            const containsData = h.extendedL2 ? blo !== 0 : (lo & 1) === 0;
            if (!containsData) {
              this.log(
                `${this.fixErrors ? 'Repairing' : 'ERROR'} offset=${hex(offset)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`,
              );
              if (this.fixErrors) {
                // fix_l2_entry_by_zero: the entry becomes a plain zero cluster.
                const e = new Uint8Array(es);
                const ev = dataView(e);
                if (h.extendedL2) ev.setUint32(8, (bhi | blo) >>> 0);
                else ev.setUint32(4, 1);
                try {
                  await this.write(e, l2Offset + base);
                  this.unsynced = true;
                  res.corruptions--;
                  res.corruptionsFixed++;
                  continue;
                } catch {
                  this.log('ERROR: Failed to overwrite L2 table entry');
                  res.checkErrors++;
                }
              }
            } else {
              this.log(`ERROR offset=${hex(offset)}: Data cluster is not properly aligned; L2 entry corrupted.`);
            }
          }
          if (active) {
            res.allocatedClusters++;
            if (tally.nextContiguous !== 0 && offset !== tally.nextContiguous) res.fragmentedClusters++;
            tally.nextContiguous = offset + cs;
          }
          if (!this.hasDataFile) this.inc(offset, cs);
          break;
        }
        case 'zero-plain':
          break;
        case 'unallocated':
          if (blo !== 0) {
            res.corruptions++;
            this.log('ERROR: Unallocated cluster has non-zero subcluster allocation map');
          }
          break;
      }
    }
    res.allocatedClusters += tally.allocated;
    res.fragmentedClusters += tally.fragmented;
  }

  /** qcow2_check_bitmaps_refcounts */
  private async checkBitmaps(): Promise<void> {
    const h = this.h;
    if (h.bitmaps === null || (h.autoclear & C.AUTOCLEAR_BITMAPS) === 0n || h.bitmaps.nbBitmaps === 0) return;
    this.inc(h.bitmaps.directoryOffset, h.bitmaps.directorySize);
    let list: Awaited<ReturnType<typeof readBitmaps>>;
    try {
      list = await readBitmaps(this.file, h);
    } catch (e) {
      this.res.corruptions++;
      throw new CheckFailure(e instanceof Error ? e.message : String(e));
    }
    for (const bm of list) {
      this.inc(bm.tableOffset, bm.tableSize * 8);
      const t = new Uint8Array(bm.tableSize * 8);
      await this.file.readAt(t, bm.tableOffset);
      const dv = dataView(t);
      for (let i = 0; i < bm.tableSize; i++) {
        const hi = dv.getUint32(i * 8);
        const lo = dv.getUint32(i * 8 + 4);
        const offset = entryOffset(hi, lo);
        // check_table_entry: reserved bits, and with an offset no all-ones flag and alignment.
        if ((hi & 0xff00_0000) !== 0 || (lo & 0x1fe) !== 0 || (offset !== 0 && ((lo & 1) !== 0 || offset % this.cs !== 0))) {
          this.res.corruptions++;
          continue;
        }
        if (offset === 0) continue;
        this.inc(offset, this.cs);
      }
    }
  }

  /** check_refblocks */
  private checkRefblocks(): void {
    const t0 = this.table;
    // Zero entries (most of the table) change nothing unless the file has no cluster at all.
    const words =
      this.clusterEnd > 0 && t0.raw.byteOffset % 4 === 0 ? new Int32Array(t0.raw.buffer, t0.raw.byteOffset, t0.raw.length / 4) : null;
    for (let t = 0; t < t0.entries; t++) {
      if (words !== null) {
        t = nextNonZero(words, t, t0.entries);
        if (t >= t0.entries) break;
      }
      const off = t0.offset(t);
      if (t0.reserved(t)) {
        this.log(`ERROR refcount table entry ${t} has reserved bits set`);
        this.res.corruptions++;
        this.rebuild = true;
        this.bad.set(t, { kind: 'reserved' });
        continue;
      }
      if (off % this.cs !== 0) {
        this.log(`ERROR refcount block ${t} is not cluster aligned; refcount table entry corrupted`);
        this.res.corruptions++;
        this.rebuild = true;
        this.bad.set(t, { kind: 'unaligned' });
        continue;
      }
      const cluster = off / this.cs;
      if (cluster >= this.clusterEnd) {
        this.res.corruptions++;
        this.log(`${this.fixErrors ? 'Repairing' : 'ERROR'} refcount block ${t} is outside image`);
        this.bad.set(t, { kind: 'outside' });
        continue;
      }
      if (off !== 0) {
        this.inc(off, this.cs);
        // Known only in the pass whose window holds the block's cluster: reported there.
        if (cluster < this.imrt.base || cluster >= this.winEnd) continue;
        const r = this.imrt.get(cluster);
        if (r !== 1) {
          this.realLog(`ERROR refcount block ${t} refcount=${r}`);
          this.realRes.corruptions++;
          this.rebuild = true;
          this.bad.set(t, { kind: 'shared', cluster });
        }
      }
    }
  }

  /**
   * compare_refcounts. In 'report' mode mismatches are counted; in a repair
   * mode the ones that mode fixes are counted as fixed (applyAll/applyLeaks
   * write them). Returns whether anything is to be written. Covers the
   * clusters of the IMRT (one window of them; this.highest carries over).
   */
  private async compare(mode: 'report' | RepairMode): Promise<boolean> {
    const res = this.res;
    const imrt = this.imrt;
    let any = false;
    const P = this.perBlock;
    const data = imrt.data;
    const base = imrt.base;
    const to = base + imrt.size;
    let block: Uint8Array | null | 'unaligned' = null;
    // Whether whole blocks were passed over as equal: their highest non-zero entry is found at the end.
    let skipped = false;
    for (let k = base; k < to; k++) {
      if (k % P === 0 || k === base) {
        const t = Math.floor(k / P);
        block = await this.stored.block(t);
        // Widths 8, 16 and 32: a block whose stored refcounts all equal the counted ones (the
        // common case) is passed over with one native comparison; otherwise run through it while
        // they agree, and take the per-cluster path from the first difference on.
        const refs = block instanceof Uint8Array ? await this.stored.native(t) : null;
        if (refs !== null) {
          const end = Math.min(to, (t + 1) * P);
          const r0 = k - t * P; // k's index in the block (not 0 where a window starts inside it)
          if (sameRange(refs, r0, data as NativeRefs, k - base, end - k)) {
            skipped = true;
            k = end - 1; // the loop's k++ moves to the next block
            continue;
          }
          let i = 0;
          let last = -1;
          for (; k + i < end; i++) {
            const st = refs[r0 + i] as number;
            if (st !== data[k + i - base]) break;
            if (st !== 0) last = k + i;
          }
          if (last >= 0) this.highest = last;
          k += i;
          if (k >= end) {
            k--; // the loop's k++ moves to the next block
            continue;
          }
        }
      }
      if (block === 'unaligned') {
        this.log(`Can't get refcount for cluster ${k}: ${EIO}`);
        res.checkErrors++;
        continue;
      }
      const stored = block === null ? 0 : refEntry(block, k % P, this.bits);
      const ref = data[k - base] as number;
      if (stored > 0 || ref > 0) this.highest = k;
      if (stored === ref) continue;
      let fixed: 'leak' | 'corruption' | null = null;
      if (stored === 0) {
        this.rebuild = true;
        if (mode === 'all') fixed = 'corruption';
      } else if (stored > ref && mode !== 'report') fixed = 'leak';
      else if (stored < ref && mode === 'all') fixed = 'corruption';
      this.log(`${fixed !== null ? 'Repairing' : stored < ref ? 'ERROR' : 'Leaked'} cluster ${k} refcount=${stored} reference=${ref}`);
      if (fixed === 'leak') res.leaksFixed++;
      else if (fixed === 'corruption') res.corruptionsFixed++;
      else if (stored < ref) res.corruptions++;
      else res.leaks++;
      if (fixed !== null) any = true;
    }
    if (skipped) {
      // In the blocks passed over stored equals counted: the highest cluster in use there is the highest non-zero count.
      for (let k = to - 1; k > this.highest && k >= base; k--) {
        if (data[k - base] !== 0) {
          this.highest = k;
          break;
        }
      }
    }
    return any;
  }

  // ---- repair ----

  /** -r leaks: lower leaked refcounts in the blocks that hold them. */
  private async applyLeaks(): Promise<void> {
    const n = this.imrt.size;
    const lastBlock = Math.floor((n - 1) / this.perBlock);
    for (let t = 0; t <= lastBlock && t < this.table.entries; t++) {
      const b = await this.stored.block(t);
      if (b === null || b === 'unaligned' || this.bad.has(t)) continue;
      const out = b.slice();
      let changed = false;
      const end = Math.min(n, (t + 1) * this.perBlock);
      for (let k = t * this.perBlock; k < end; k++) {
        const i = k - t * this.perBlock;
        const stored = refEntry(b, i, this.bits);
        const ref = this.imrt.data[k] as number;
        if (stored > ref) {
          Refcounts.setEntry(out, i, this.bits, ref);
          changed = true;
        }
      }
      if (changed) await this.write(out, this.table.offset(t));
    }
    await this.file.sync();
  }

  /**
   * -r all: make the stored refcounts equal the references. Broken table
   * entries get new blocks, missing blocks are allocated, and if the table
   * is too small (or unusable) a bigger one is written; all new clusters are
   * appended at the end of the file and count themselves.
   */
  private async applyAll(): Promise<void> {
    const cs = this.cs;
    const P = this.perBlock;
    const bits = this.bits;
    const D = this.imrt; // becomes the desired refcounts
    const old = this.table;
    const h = this.h;
    const good = (t: number): boolean => t < old.entries && old.offset(t) !== 0 && !this.bad.has(t);

    // Structures the repair drops stop counting.
    for (const b of this.bad.values()) {
      if (b.kind === 'shared' && b.cluster !== undefined && D.get(b.cluster) > 0) D.set(b.cluster, D.get(b.cluster) - 1);
    }
    const oldTableFirst = h.refcountTableOffset / cs;
    const oldTableClusters = h.refcountTableClusters;
    let end = D.size;

    // Which blocks hold a non-zero desired refcount.
    const needed = new Set<number>();
    for (let k = 0; k < D.size; k++) if ((D.data[k] as number) > 0) needed.add(Math.floor(k / P));
    const newBlocks = new Map<number, number>();
    let newTable: { first: number; clusters: number } | null = null;
    const take = (): number => {
      const c = end++;
      D.set(c, 1);
      needed.add(Math.floor(c / P));
      return c;
    };
    for (;;) {
      let changed = false;
      let maxT = 0;
      for (const t of needed) if (t > maxT) maxT = t;
      const capacity = newTable !== null ? (newTable.clusters * cs) / 8 : old.entries;
      if (maxT >= capacity || (newTable === null && !this.reftableCounted)) {
        const clusters: number = Math.ceil(((maxT + 1) * 8) / cs) + (newTable === null ? 0 : 1);
        if (clusters * cs > C.MAX_REFTABLE_BYTES) throw new CheckFailure('File too large: the refcount table would exceed 8 MiB');
        if (newTable === null) {
          if (this.reftableCounted) {
            for (let c = oldTableFirst; c < oldTableFirst + oldTableClusters; c++) if (D.get(c) > 0) D.set(c, D.get(c) - 1);
          }
        } else {
          for (let c = newTable.first; c < newTable.first + newTable.clusters; c++) D.set(c, 0);
        }
        const first = end;
        for (let i = 0; i < clusters; i++) take();
        newTable = { first, clusters };
        changed = true;
      }
      for (const t of [...needed].sort((a, b) => a - b)) {
        if (good(t) || newBlocks.has(t)) continue;
        newBlocks.set(t, take());
        changed = true;
      }
      if (!changed) break;
    }

    // The final table.
    const entries = newTable !== null ? (newTable.clusters * cs) / 8 : old.entries;
    const finalOffset = (t: number): number => {
      const nb = newBlocks.get(t);
      if (nb !== undefined) return nb * cs;
      return good(t) ? old.offset(t) : 0;
    };
    const blocks: number[] = [];
    for (let t = 0; t < entries; t++) if (finalOffset(t) !== 0) blocks.push(t);

    // Phase 1: raise only (max of what is stored now and what is wanted), new blocks written whole.
    const phase1 = new Map<number, Uint8Array>();
    for (const t of blocks) {
      const isNew = !good(t);
      // What qemu reads for these clusters now: the block, or through a broken entry (zeros if unusable).
      const view = await this.stored.block(t);
      const old = view instanceof Uint8Array ? view : null;
      const buf = old !== null ? old.slice() : new Uint8Array(cs);
      let changed = isNew;
      for (let i = 0; i < P; i++) {
        const want = D.get(t * P + i);
        if (want > (old !== null ? refEntry(old, i, bits) : 0)) {
          Refcounts.setEntry(buf, i, bits, want);
          changed = true;
        }
      }
      phase1.set(t, buf);
      if (changed) await this.write(buf, finalOffset(t));
    }
    await this.file.sync();

    // Hook the new blocks up: a new table (then the header), or single entries.
    if (newTable !== null) {
      const raw = new Uint8Array(newTable.clusters * cs);
      const dv = dataView(raw);
      for (let t = 0; t < entries; t++) dv.setBigUint64(t * 8, BigInt(finalOffset(t)));
      await this.write(raw, newTable.first * cs);
      await this.file.sync();
      const hb = new Uint8Array(12);
      dataView(hb).setBigUint64(0, BigInt(newTable.first * cs));
      dataView(hb).setUint32(8, newTable.clusters);
      await this.write(hb, 48);
      await this.file.sync();
    } else {
      const e = new Uint8Array(8);
      let wrote = false;
      for (let t = 0; t < old.entries; t++) {
        const want = finalOffset(t);
        const cur = dataView(old.raw).getBigUint64(t * 8);
        if (BigInt(want) === cur) continue;
        dataView(e).setBigUint64(0, BigInt(want));
        await this.write(e, h.refcountTableOffset + t * 8);
        wrote = true;
      }
      if (wrote) await this.file.sync();
    }

    // Phase 2: lower to the wanted values.
    for (const t of blocks) {
      const buf = phase1.get(t) as Uint8Array;
      let changed = false;
      for (let i = 0; i < P; i++) {
        const want = D.get(t * P + i);
        if (refEntry(buf, i, bits) !== want) {
          Refcounts.setEntry(buf, i, bits, want);
          changed = true;
        }
      }
      if (changed) await this.write(buf, finalOffset(t));
    }
    await this.file.sync();
  }

  /** check_oflag_copied: COPIED in the active L1 and its L2 tables must mean refcount 1. */
  private async checkOflagCopied(): Promise<void> {
    const res = this.res;
    const h = this.h;
    const repair = this.fixErrors ? true : this.fixLeaks ? res.checkErrors === 0 && res.corruptions === 0 && res.leaks === 0 : false;
    const l1 = new Uint8Array(h.l1Size * 8);
    await this.file.readAt(l1, h.l1TableOffset);
    const l1v = dataView(l1);
    const table = new Uint8Array(this.cs);
    const dv = dataView(table);
    const es = h.l2EntrySize;
    const fastStd = NATIVE_LE && !h.extendedL2 && !this.hasDataFile;
    const cb = h.clusterBits;
    const none = new Uint8Array(0);
    for (let i = 0; i < h.l1Size; i++) {
      const hi = l1v.getUint32(i * 8);
      const lo = l1v.getUint32(i * 8 + 4);
      const l2Offset = entryOffset(hi, lo);
      if (l2Offset === 0) continue;
      let refcount: number;
      try {
        refcount = await this.stored.get(Math.floor(l2Offset / this.cs));
      } catch {
        continue;
      }
      const copied = (hi & 0x8000_0000) !== 0;
      if ((refcount === 1) !== copied) {
        res.corruptions++;
        this.log(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex64(hi, lo)} refcount=${refcount}`);
        if (repair) {
          const e = new Uint8Array(8);
          dataView(e).setUint32(0, refcount === 1 ? (hi | 0x8000_0000) >>> 0 : hi & 0x7fff_ffff);
          dataView(e).setUint32(4, lo);
          try {
            await this.write(e, h.l1TableOffset + i * 8);
          } catch (err) {
            res.checkErrors++;
            throw new CheckFailure(err instanceof Error ? err.message : String(err));
          }
          res.corruptions--;
          res.corruptionsFixed++;
        }
      }
      try {
        await this.tables.read(table, l2Offset);
      } catch (err) {
        this.log(`ERROR: Could not read L2 table: ${err instanceof Error ? err.message : String(err)}`);
        res.checkErrors++;
        throw new CheckFailure(err instanceof Error ? err.message : String(err));
      }
      let dirty = 0;
      const words = fastStd ? this.swapped().load(table) : null;
      const n = h.l2Entries;
      for (let j = 0; j < n; j++) {
        if (words !== null) {
          // The fast loop (check-fast.ts) takes entries whose COPIED flag agrees with a stored
          // refcount of the block last read; it stops at anything else, handled below.
          const t = this.stored.currentIndex;
          const refs = t >= 0 ? await this.stored.native(t) : null;
          j = copiedL2(words, j, n, refs ?? none, t >= 0 ? t * this.perBlock : 0, cb);
          if (j >= n) break;
        }
        const ehi = dv.getUint32(j * es);
        const elo = dv.getUint32(j * es + 4);
        const type = this.clusterType(ehi, elo);
        if (type !== 'normal' && type !== 'zero-alloc') continue;
        let r = 1;
        if (!this.hasDataFile) {
          const k = Math.floor(entryOffset(ehi, elo) / this.cs);
          r = this.stored.peek(k);
          if (r < 0) {
            try {
              r = await this.stored.get(k);
            } catch {
              continue;
            }
          }
        }
        if ((r === 1) !== ((ehi & 0x8000_0000) !== 0)) {
          res.corruptions++;
          this.log(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hex64(ehi, elo)} refcount=${r}`);
          if (repair) {
            dv.setUint32(j * es, r === 1 ? (ehi | 0x8000_0000) >>> 0 : ehi & 0x7fff_ffff);
            dirty++;
          }
        }
      }
      if (dirty > 0) {
        try {
          await this.write(table, l2Offset);
        } catch (err) {
          this.log(`ERROR: Could not write L2 table: ${err instanceof Error ? err.message : String(err)}`);
          res.checkErrors++;
          throw new CheckFailure(err instanceof Error ? err.message : String(err));
        }
        res.corruptions -= dirty;
        res.corruptionsFixed += dirty;
      }
    }
    if (res.corruptionsFixed > 0) await this.file.sync();
  }

  /** qcow2_mark_clean + qcow2_mark_consistent: clear the dirty and corrupt bits. */
  private async markClean(): Promise<void> {
    const h = await readHeader(this.file);
    const bits = C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT;
    if (h.version < 3 || (h.incompatible & bits) === 0n) return;
    const b = new Uint8Array(8);
    dataView(b).setBigUint64(0, h.incompatible & ~bits);
    await this.write(b, 72);
    await this.file.sync();
  }
}

/** Open the image as qemu-img check does: the header, the external data file and the backing chain must open. */
async function openForCheck(path: string, readOnly: boolean, syncIo: boolean): Promise<{ file: HostFile; header: Qcow2Header }> {
  const file = await HostFile.open(path, readOnly);
  if (syncIo) file.useSyncIo();
  try {
    const header = await readHeader(file);
    if ((header.incompatible & C.INCOMPAT_DATA_FILE) !== 0n) {
      if (header.dataFile === null) {
        throw new BlockError('invalid-image', `${path}: qcow2 image uses an external data file but does not name it`, {
          path,
          structure: 'external data file name extension',
        });
      }
      const data = await HostFile.open(resolveRelative(path, header.dataFile), true);
      await data.close();
    }
    if (header.backingFile !== null) {
      const bpath = resolveRelative(path, header.backingFile);
      try {
        const dev = await openImage(bpath, {
          ...(header.backingFormat !== null ? { format: header.backingFormat } : {}),
          ...(syncIo ? { syncIo: true } : {}),
        });
        await dev.close();
      } catch (e) {
        const msg = e instanceof Error ? e.message : String(e);
        throw new BlockError('not-found', `${path}: could not open backing file '${header.backingFile}': ${msg}`, {
          path,
          structure: 'backing file',
        });
      }
    }
    return { file, header };
  } catch (e) {
    await file.close();
    throw e;
  }
}

/** One check pass (bdrv_check) on a fresh open of the file. */
async function pass(
  path: string,
  fix: RepairMode | null,
  log: (line: string) => void,
  memory: { maxMemory: number; windowBytes: number },
  syncIo: boolean,
  onWrite?: (offset: number, length: number) => void,
): Promise<CheckCounts> {
  const { file, header } = await openForCheck(path, fix === null, syncIo);
  try {
    return await new CheckPass(file, header, fix, log, memory, onWrite).run();
  } finally {
    await file.close();
  }
}

/**
 * Check (and with `repair`, repair) a qcow2 image the way `qemu-img check
 * [-r leaks|all]` does: a pass with the repair, and if it fixed anything a
 * second, read-only pass whose findings are reported. Opening errors throw
 * (BlockError); a check that cannot complete is reported in `failure`.
 */
export async function checkQcow2(path: string, opts: CheckOptions = {}): Promise<CheckOutcome> {
  const log = opts.log ?? ((): void => {});
  const memory = { maxMemory: opts.maxMemory ?? DEFAULT_MAX_MEMORY, windowBytes: opts.windowBytes ?? DEFAULT_WINDOW_BYTES };
  const fix = opts.repair ?? null;
  const syncIo = opts.syncIo === true;
  const wrap = (c: CheckCounts): ImageCheck => ({ filename: path, format: 'qcow2', ...c });
  let first: CheckCounts;
  try {
    first = await pass(path, fix, log, memory, syncIo, opts.onWrite);
  } catch (e) {
    if (e instanceof CheckFailure) return { check: null, repaired: null, failure: e.message };
    throw e;
  }
  if (first.corruptionsFixed === 0 && first.leaksFixed === 0) return { check: wrap(first), repaired: null, failure: null };
  const repaired = { leaks: first.leaksFixed, corruptions: first.corruptionsFixed };
  try {
    const second = await pass(path, null, log, memory, syncIo);
    second.leaksFixed = first.leaksFixed;
    second.corruptionsFixed = first.corruptionsFixed;
    return { check: wrap(second), repaired, failure: null };
  } catch (e) {
    if (e instanceof CheckFailure) return { check: null, repaired, failure: e.message };
    throw e;
  }
}
