/**
 * A qcow2 image as one layer of a chain: its own mapping (L1 -> L2 -> data),
 * reads of data and compressed clusters, and the facts `info` reports.
 * Backing files and the external data file are opened here; chain.ts does
 * the falling-through.
 */
import type { BlockDevice } from '../../block/device.js';
import { BlockError, fromSystemError } from '../../block/errors.js';
import { HostFile } from '../../block/file.js';
import { dataView } from '../../util/bytes.js';
import { readLayered, resolveRelative } from '../chain.js';
import type { ImageInfo, Layer, LayerRun } from '../layer.js';
import type { OpenContext } from '../registry.js';
import { readBitmaps } from './bitmap.js';
import { LruCache } from '../../util/lru.js';
import { decompressCluster } from './compress.js';
import * as C from './constants.js';
import { readHeader, type Qcow2Header } from './header.js';
import { corruptEntry, L1Table } from './l1l2.js';
import { readSnapshots } from './snapshot.js';
import { Qcow2Writer, type WriterHost } from './writer.js';

/**
 * Images rblock will not write yet, refused at open with the reason (never
 * corrupted): internal snapshots (shared clusters), persistent bitmaps (would
 * go stale), extended L2, encryption, and images marked dirty or corrupt.
 */
function refuseWriting(path: string, h: Qcow2Header): void {
  const why =
    (h.incompatible & C.INCOMPAT_CORRUPT) !== 0n
      ? 'it is marked corrupt; repair it (qemu-img check -r all) or open it read-only'
      : (h.incompatible & C.INCOMPAT_DIRTY) !== 0n
        ? 'its dirty bit is set (refcounts may be stale); repair it with qemu-img check -r all first'
        : h.nbSnapshots > 0
          ? `it has ${h.nbSnapshots} internal snapshot(s), and writing images with snapshots is not supported yet`
          : h.bitmaps !== null && (h.autoclear & C.AUTOCLEAR_BITMAPS) !== 0n
            ? 'it has persistent bitmaps, which rblock cannot keep up to date yet'
            : h.cryptMethod !== 0
              ? 'it is encrypted'
              : null;
  if (why !== null) {
    throw new BlockError(
      why.startsWith('it is marked corrupt') ? 'corrupt-image' : 'not-supported',
      `${path}: cannot open for writing: ${why}`,
      {
        path,
        structure: 'qcow2 header',
        op: 'open',
      },
    );
  }
}

/** A compressed run carries where its bytes are; data runs carry hostOffset. */
interface Qcow2Run extends LayerRun {
  clusterStart?: number;
  compressedOffset?: number;
  compressedBytes?: number;
}

const L2_CACHE_BYTES = 16 << 20;
const HI_OFFSET_MASK = 0x00ff_ffff;
const LO_OFFSET_MASK = 0xffff_fe00;

/**
 * Append a run to `runs`, or lengthen the last one when it continues it: same
 * kind (never compressed: those are added directly), and either both without
 * a host offset or the host offsets contiguous. host < 0: no host offset.
 */
function addRun(runs: Qcow2Run[], offset: number, length: number, kind: 'data' | 'zero' | 'unallocated', host: number, file: string): void {
  const last = runs[runs.length - 1];
  if (
    last !== undefined &&
    last.kind === kind &&
    (host < 0 ? last.hostOffset === undefined : last.hostOffset !== undefined && last.hostOffset + last.length === host)
  ) {
    last.length += length;
    return;
  }
  runs.push(host < 0 ? { offset, length, kind } : { offset, length, kind, hostOffset: host, file });
}

export class Qcow2Layer implements Layer {
  readonly format = 'qcow2';
  readonly path: string;
  readonly size: number;
  readonly readOnly: boolean;
  private readonly l2Cache: LruCache<number, Uint8Array>;
  private readonly clusterCache = new LruCache<number, Uint8Array>(8);
  private readonly l1Span: number;
  /** L2 tables changed by the writer and not yet written back: read before the cache. */
  readonly pinned = new Map<number, Uint8Array>();
  private writer: Qcow2Writer | null = null;

  private constructor(
    readonly file: HostFile,
    readonly header: Qcow2Header,
    readonly l1: L1Table,
    readonly dataFile: HostFile | null,
    readonly backing: BlockDevice | null,
    /** The backing file name as resolved (for info), or null. */
    readonly backingPath: string | null,
  ) {
    this.path = file.path;
    this.size = header.size;
    this.readOnly = dataFile === null ? file.readOnly : file.readOnly || dataFile.readOnly;
    this.l2Cache = new LruCache(Math.max(4, Math.floor(L2_CACHE_BYTES / header.clusterSize)));
    this.l1Span = header.clusterSize * header.l2Entries;
  }

  static async open(file: HostFile, ctx: OpenContext): Promise<Qcow2Layer> {
    const h = await readHeader(file);
    const l1 = await L1Table.load(file, h);
    if (!ctx.readOnly) refuseWriting(file.path, h);
    let dataFile: HostFile | null = null;
    let backing: BlockDevice | null = null;
    let backingPath: string | null = null;
    try {
      if ((h.incompatible & C.INCOMPAT_DATA_FILE) !== 0n) {
        if (h.dataFile === null) {
          throw new BlockError('invalid-image', `${file.path}: qcow2 image uses an external data file but does not name it`, {
            path: file.path,
            structure: 'external data file name extension',
          });
        }
        // Relative to the image's directory, like a backing file (qemu 7.2 uses the working directory).
        const dpath = resolveRelative(file.path, h.dataFile);
        try {
          dataFile = await HostFile.open(dpath, ctx.readOnly);
        } catch (e) {
          const err = fromSystemError(e, dpath, 'open');
          throw new BlockError(
            err.kind,
            `${file.path}: external data file '${h.dataFile}' (${dpath}): ${err.message.replace(`${dpath}: `, '')}`,
            {
              path: file.path,
              structure: 'external data file',
            },
            e,
          );
        }
      }
      const override = ctx.options.backing;
      if (override !== null && (override !== undefined || h.backingFile !== null)) {
        const name = override ?? (h.backingFile as string);
        backingPath = override !== undefined ? name : resolveRelative(file.path, name);
        const fmt = override !== undefined ? ctx.options.backingFormat : (h.backingFormat ?? undefined);
        try {
          backing = await ctx.openBacking(backingPath, fmt, file.path);
        } catch (e) {
          // Only the backing file itself missing: an error about a file further down names its own referrer.
          if (e instanceof BlockError && e.kind === 'not-found' && e.context.path === backingPath && e.context.structure === undefined) {
            throw new BlockError(
              'not-found',
              `${file.path}: backing file '${name}' not found (looked for ${backingPath})`,
              {
                path: file.path,
                structure: 'backing file',
              },
              e,
            );
          }
          throw e;
        }
      }
    } catch (e) {
      await dataFile?.close();
      throw e;
    }
    const layer = new Qcow2Layer(file, h, l1, dataFile, backing, backingPath);
    if (!ctx.readOnly) {
      try {
        layer.writer = await Qcow2Writer.open(layer.writerHost());
      } catch (e) {
        await layer.close();
        if (backing !== null) await backing.close();
        throw e;
      }
    }
    return layer;
  }

  private writerHost(): WriterHost {
    return {
      path: this.path,
      header: this.header,
      file: this.file,
      dataFile: this.dataFile,
      l1: this.l1,
      hasBacking: this.backing !== null,
      pinned: this.pinned,
      l2Table: (offset, l1Index) => this.l2Table(offset, l1Index),
      readGuest: (buf, offset) => readLayered(this, buf, offset),
    };
  }

  write(buf: Uint8Array, offset: number): Promise<void> {
    return this.requireWriter('write').write(buf, offset);
  }

  /** Change the virtual size (the layer's own `size` is stale afterwards: reopen). */
  resize(newSize: number): Promise<void> {
    return this.requireWriter('resize').resize(newSize);
  }

  /** Deallocate every cluster (commit empties the overlay this way). */
  makeEmpty(): Promise<void> {
    return this.requireWriter('make-empty').makeEmpty();
  }

  /** Store a whole guest cluster as compressed bytes (used by convert -c). */
  writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    return this.requireWriter('write').writeCompressed(offset, data);
  }

  writeZeroes(offset: number, length: number, mayTrim: boolean): Promise<void> {
    return this.requireWriter('write-zeroes').writeZeroes(offset, length, mayTrim);
  }

  discard(offset: number, length: number): Promise<void> {
    return this.requireWriter('discard').discard(offset, length);
  }

  async flush(): Promise<void> {
    if (this.writer !== null) await this.writer.flush();
  }

  private requireWriter(op: string): Qcow2Writer {
    if (this.writer === null)
      throw new BlockError('read-only', `${this.path}: ${op} on an image opened read-only`, { path: this.path, op });
    return this.writer;
  }

  /** The L2 table at `offset`, via the bounded cache. */
  l2Table(offset: number, l1Index: number): Promise<Uint8Array> {
    const pinned = this.pinned.get(offset);
    if (pinned !== undefined) return Promise.resolve(pinned);
    return this.l2Cache.get(offset, async () => {
      const h = this.header;
      if (offset % h.clusterSize !== 0) {
        throw corruptEntry(
          this.path,
          `L1 entry ${l1Index}`,
          `points to an L2 table at unaligned offset 0x${offset.toString(16)}`,
          h.l1TableOffset + l1Index * 8,
        );
      }
      if (offset >= this.file.size) {
        throw corruptEntry(
          this.path,
          `L1 entry ${l1Index}`,
          `points to an L2 table at 0x${offset.toString(16)}, past the end of the file (${this.file.size} bytes)`,
          h.l1TableOffset + l1Index * 8,
        );
      }
      // L2 tables are written whole: one cut by the end of the file means a truncated image.
      const t = new Uint8Array(h.clusterSize);
      await this.file.readExact(t, offset, `L2 table of L1 entry ${l1Index}`);
      return t;
    });
  }

  private checkL1(i: number): void {
    const e = this.l1.entry(i);
    if (e.reserved) {
      throw corruptEntry(
        this.path,
        `L1 entry ${i}`,
        `has reserved bits set (0x${e.raw.toString(16).padStart(16, '0')})`,
        this.header.l1TableOffset + i * 8,
      );
    }
  }

  async map(offset: number, length: number): Promise<LayerRun[]> {
    const runs: Qcow2Run[] = [];
    const end = offset + length;
    let got: { offset: number; table: Uint8Array } | null = null;
    let pos = offset;
    while (pos < end) {
      const at = this.mapFrom(runs, pos, end, (l2Off) => (got !== null && got.offset === l2Off ? got.table : this.peekL2(l2Off)));
      pos = at.pos;
      if (at.need !== null) got = { offset: at.need.l2Off, table: await this.l2Table(at.need.l2Off, at.need.l1i) };
    }
    return runs;
  }

  /** Like map, but only from L2 tables already in memory: null when one is not. */
  mapNow(offset: number, length: number): LayerRun[] | null {
    const runs: Qcow2Run[] = [];
    const at = this.mapFrom(runs, offset, offset + length, (l2Off) => this.peekL2(l2Off));
    return at.need === null ? runs : null;
  }

  /** An L2 table that is pinned or cached now, without reading. */
  private peekL2(offset: number): Uint8Array | undefined {
    return this.pinned.get(offset) ?? this.l2Cache.peek(offset);
  }

  /**
   * Map [pos, end) onto `runs` for as long as `tableAt` has the L2 tables;
   * returns where it stopped and the table it lacked (need: null when done).
   *
   * Split in small methods on purpose: the common entry (standard L2, not
   * compressed) runs in mapL2's loop with nothing allocated but the
   * runs themselves, and the rare ones (compressed, extended L2, errors) are
   * calls. A one-function walk cost the NBD server about 130 ms of TurboFan
   * compile time per fresh process (compiled twice, with its closures
   * inlined), more than a whole 2 GiB copy's worth of mapping.
   */
  private mapFrom(
    runs: Qcow2Run[],
    start: number,
    end: number,
    tableAt: (l2Off: number) => Uint8Array | undefined,
  ): { pos: number; need: { l2Off: number; l1i: number } | null } {
    const h = this.header;
    let pos = start;
    while (pos < end) {
      const l1i = Math.floor(pos / this.l1Span);
      const spanEnd = Math.min(end, (l1i + 1) * this.l1Span);
      const l2Off = l1i < h.l1Size ? (this.l1.entries[l1i] as number) : 0;
      if (l2Off === 0) {
        addRun(runs, pos, spanEnd - pos, 'unallocated', -1, '');
        pos = spanEnd;
        continue;
      }
      this.checkL1(l1i);
      const table = tableAt(l2Off);
      if (table === undefined) return { pos, need: { l2Off, l1i } };
      pos = this.mapL2(runs, pos, spanEnd, table, l2Off);
    }
    return { pos, need: null };
  }

  /** The host file of data clusters, and the size past which an offset is corrupt. */
  private get host(): { file: string; size: number; own: boolean } {
    const own = this.dataFile === null;
    return { file: own ? this.path : (this.dataFile as HostFile).path, size: own ? this.file.size : Infinity, own };
  }

  /** mapFrom over [pos, spanEnd) of one L2 table, standard (§4.1) or extended (§4.3); returns spanEnd. */
  private mapL2(runs: Qcow2Run[], pos: number, spanEnd: number, table: Uint8Array, l2Off: number): number {
    const h = this.header;
    const cs = h.clusterSize;
    const es = h.l2EntrySize;
    const { file, size: hostSize, own } = this.host;
    const dv = dataView(table);
    while (pos < spanEnd) {
      const ci = Math.floor(pos / cs);
      const cStart = ci * cs;
      const cEnd = Math.min(cStart + cs, spanEnd);
      const idx = ci % h.l2Entries;
      const base = idx * es;
      const hi = dv.getUint32(base);
      const lo = dv.getUint32(base + 4);
      if ((hi & 0x4000_0000) !== 0) {
        this.mapCompressed(runs, pos, cEnd, cStart, dv, base, l2Off, idx);
      } else {
        const host = this.entryHost(dv, base, l2Off, idx, cStart, hostSize, own);
        if (h.extendedL2) this.mapSubclusters(runs, pos, cEnd, cStart, dv, base, l2Off, idx, host, lo, file);
        else if ((lo & 1) !== 0) {
          // A preallocated zero cluster keeps its host offset, and qemu-img map reports it. Offset 0
          // is "zero, unallocated" even with an external data file: there only COPIED marks 0 valid.
          addRun(runs, pos, cEnd - pos, 'zero', host > 0 ? host + (pos - cStart) : -1, file);
        } else if (host >= 0) addRun(runs, pos, cEnd - pos, 'data', host + (pos - cStart), file);
        else addRun(runs, pos, cEnd - pos, 'unallocated', -1, '');
      }
      pos = cEnd;
    }
    return pos;
  }

  /** A compressed cluster (§4.2): x = 62 - (cluster_bits - 8) bits of byte offset, then "additional sectors". */
  private mapCompressed(
    runs: Qcow2Run[],
    pos: number,
    cEnd: number,
    cStart: number,
    dv: DataView,
    base: number,
    l2Off: number,
    idx: number,
  ): void {
    const h = this.header;
    const raw = dv.getBigUint64(base);
    const x = BigInt(62 - (h.clusterBits - 8));
    const coff = Number(raw & ((1n << x) - 1n));
    const sectors = Number((raw >> x) & ((1n << (62n - x)) - 1n)) + 1;
    if (h.dataFile !== null)
      throw this.entryError(l2Off, idx, cStart, base, 'is compressed, which is not allowed with an external data file');
    if (coff >= this.file.size)
      throw this.entryError(l2Off, idx, cStart, base, `points to compressed data at 0x${coff.toString(16)}, past the end of the file`);
    // Never merged with a neighbour: each compressed cluster is read on its own.
    runs.push({
      offset: pos,
      length: cEnd - pos,
      kind: 'compressed',
      clusterStart: cStart,
      compressedOffset: coff,
      compressedBytes: sectors * 512 - (coff % 512),
    });
  }

  /** [pos, cEnd) of one extended L2 entry (§4.3: 32 subclusters, zero and allocation bitmaps); host -1: none. */
  private mapSubclusters(
    runs: Qcow2Run[],
    pos: number,
    cEnd: number,
    cStart: number,
    dv: DataView,
    base: number,
    l2Off: number,
    idx: number,
    host: number,
    lo: number,
    file: string,
  ): void {
    if ((lo & 1) !== 0) throw this.entryError(l2Off, idx, cStart, base, 'has the zero flag set, which extended L2 entries do not use');
    const alloc = dv.getUint32(base + 12);
    const zero = dv.getUint32(base + 8);
    if ((alloc & zero) !== 0) throw this.entryError(l2Off, idx, cStart, base, 'has subclusters marked both allocated and zero');
    if (alloc !== 0 && host < 0) throw this.entryError(l2Off, idx, cStart, base, 'has allocated subclusters but no host offset');
    const sc = this.header.clusterSize / 32;
    while (pos < cEnd) {
      const si = Math.floor((pos - cStart) / sc);
      const sEnd = Math.min(cStart + (si + 1) * sc, cEnd);
      const bit = 1 << si;
      // Zero and unallocated subclusters of an allocated cluster keep its host offset (qemu's
      // ZERO_ALLOC and UNALLOCATED_ALLOC), which qemu-img map reports.
      const at = host >= 0 ? host + (pos - cStart) : -1;
      if ((zero & bit) !== 0) addRun(runs, pos, sEnd - pos, 'zero', at, file);
      else if ((alloc & bit) !== 0) addRun(runs, pos, sEnd - pos, 'data', host + (pos - cStart), file);
      else addRun(runs, pos, sEnd - pos, 'unallocated', at, file);
      pos = sEnd;
    }
  }

  /** The error for an L2 entry that breaks the spec. */
  private entryError(l2Off: number, idx: number, cStart: number, base: number, msg: string): BlockError {
    return corruptEntry(this.path, `L2 table at 0x${l2Off.toString(16)} entry ${idx} (guest offset ${cStart})`, msg, l2Off + base);
  }

  /**
   * The host offset of a standard or extended L2 entry that is not compressed
   * (§4.1), checked (reserved bits, alignment, inside the file), or -1 where
   * no cluster is allocated. Offset 0 is allocated only with COPIED in an
   * external data file (`own` false).
   */
  private entryHost(dv: DataView, base: number, l2Off: number, idx: number, cStart: number, hostSize: number, own: boolean): number {
    const hi = dv.getUint32(base);
    const lo = dv.getUint32(base + 4);
    if ((hi & 0x3f00_0000) !== 0 || (lo & 0x1fe) !== 0) throw this.reservedBits(dv, base, l2Off, idx, cStart);
    const host = (hi & HI_OFFSET_MASK) * 2 ** 32 + ((lo & LO_OFFSET_MASK) >>> 0);
    if (host === 0 && ((hi & 0x8000_0000) === 0 || own)) return -1;
    if (host % this.header.clusterSize !== 0 || host >= hostSize) throw this.badHostOffset(host, hostSize, l2Off, idx, cStart, base);
    return host;
  }

  private reservedBits(dv: DataView, base: number, l2Off: number, idx: number, cStart: number): BlockError {
    return this.entryError(l2Off, idx, cStart, base, `has reserved bits set (0x${dv.getBigUint64(base).toString(16).padStart(16, '0')})`);
  }

  private badHostOffset(host: number, hostSize: number, l2Off: number, idx: number, cStart: number, base: number): BlockError {
    return this.entryError(
      l2Off,
      idx,
      cStart,
      base,
      host % this.header.clusterSize !== 0
        ? `points to unaligned host offset 0x${host.toString(16)}`
        : `points to host offset 0x${host.toString(16)}, past the end of the file (${hostSize} bytes)`,
    );
  }

  spanRunNow(run: LayerRun, offset: number, length: number): { fd: number; hostOffset: number } | null {
    const r = run as Qcow2Run;
    if (this.header.cryptMethod !== 0 || r.kind !== 'data') return null;
    const hostOffset = (r.hostOffset as number) + (offset - r.offset);
    const fd = (this.dataFile ?? this.file).spanNow(hostOffset, length);
    return fd < 0 ? null : { fd, hostOffset };
  }

  readRunNow(buf: Uint8Array, run: LayerRun, offset: number): boolean {
    const r = run as Qcow2Run;
    if (this.header.cryptMethod !== 0 || r.kind !== 'data') return false;
    return (this.dataFile ?? this.file).readNow(buf, (r.hostOffset as number) + (offset - r.offset));
  }

  async readRun(buf: Uint8Array, run: LayerRun, offset: number): Promise<void> {
    const r = run as Qcow2Run;
    if (this.header.cryptMethod !== 0) {
      throw new BlockError(
        'unsupported-feature',
        `${this.path}: the image is encrypted (crypt_method ${this.header.cryptMethod}); rblock cannot decrypt it`,
        {
          path: this.path,
          structure: 'qcow2 header',
          field: 'crypt_method',
          op: 'read',
        },
      );
    }
    if (r.kind === 'data') {
      const f = this.dataFile ?? this.file;
      await f.readAt(buf, (r.hostOffset as number) + (offset - r.offset));
      return;
    }
    const start = r.clusterStart as number;
    // Keyed by host offset: a guest cluster rewritten later must not hit stale data.
    const cluster = await this.clusterCache.get(r.compressedOffset as number, () => this.decompress(r));
    buf.set(cluster.subarray(offset - start, offset - start + buf.length));
  }

  private async decompress(r: Qcow2Run): Promise<Uint8Array> {
    const coff = r.compressedOffset as number;
    // The sector count bounds the input at 2 clusters at most (§4.2), whatever the entry says.
    const input = new Uint8Array(Math.min(r.compressedBytes as number, this.file.size - coff));
    await this.file.readAt(input, coff);
    return decompressCluster(this.header.compressionType, input, this.header.clusterSize, { path: this.path, offset: coff });
  }

  async info(): Promise<ImageInfo> {
    const h = this.header;
    const info: ImageInfo = {
      'virtual-size': h.size,
      filename: this.path,
      format: 'qcow2',
      'actual-size': await this.file.allocatedBytes(),
    };
    if (h.cryptMethod !== 0) (info as unknown as Record<string, unknown>)['encrypted'] = true;
    info['cluster-size'] = h.clusterSize;
    if (h.backingFile !== null) {
      info['backing-filename'] = h.backingFile;
      info['full-backing-filename'] = this.backingPath ?? resolveRelative(this.path, h.backingFile);
      if (h.backingFormat !== null) info['backing-filename-format'] = h.backingFormat;
    }
    const snaps = await readSnapshots(this.file, h);
    if (snaps.length > 0) {
      info.snapshots = snaps.map((s) => ({
        icount: s.icount ?? 0,
        'vm-clock-nsec': s.vmClockNsec % 1e9,
        name: s.name,
        'date-sec': s.dateSec,
        'date-nsec': s.dateNsec,
        'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9),
        id: s.id,
        'vm-state-size': s.vmStateSize,
      }));
    }
    const data: Record<string, unknown> = {
      compat: h.version === 2 ? '0.10' : '1.1',
      'compression-type': h.compressionType === 1 ? 'zstd' : 'zlib',
    };
    if (h.version === 3) data['lazy-refcounts'] = (h.compatible & C.COMPAT_LAZY_REFCOUNTS) !== 0n;
    const bitmaps = await readBitmaps(this.file, h);
    if (bitmaps.length > 0) data['bitmaps'] = bitmaps.map((b) => ({ flags: b.flagNames, name: b.name, granularity: b.granularity }));
    data['refcount-bits'] = 2 ** h.refcountOrder;
    if (h.dataFile !== null) {
      data['data-file'] = h.dataFile;
      data['data-file-raw'] = (h.autoclear & C.AUTOCLEAR_DATA_FILE_RAW) !== 0n;
    }
    if (h.version === 3) {
      data['corrupt'] = (h.incompatible & C.INCOMPAT_CORRUPT) !== 0n;
      data['extended-l2'] = h.extendedL2;
    }
    info['format-specific'] = { type: 'qcow2', data };
    info['dirty-flag'] = (h.incompatible & C.INCOMPAT_DIRTY) !== 0n;
    return info;
  }

  async close(): Promise<void> {
    try {
      if (this.writer !== null) await this.writer.flush();
    } finally {
      await this.closeFiles();
    }
  }

  private async closeFiles(): Promise<void> {
    this.l2Cache.clear();
    this.clusterCache.clear();
    try {
      await this.dataFile?.close();
    } finally {
      await this.file.close();
    }
  }
}
