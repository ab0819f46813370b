/**
 * The qcow2 writer (spec §4, §6): guest writes, zero writes, discards and
 * flushes on one image layer.
 *
 * Ordering (the crash-safety invariant of §6): guest data is written to its
 * cluster before anything references it; allocation raises refcounts in
 * memory, and flush writes back refcount blocks (fsync), then the refcount
 * table, then L2 tables (fsync), then L1 entries (fsync), and only then
 * applies the decrements of clusters that lost their last reference. A kill at
 * any instant therefore leaves at most leaked clusters. Between flushes the
 * changed tables stay pinned in memory (bounded: past the bound, a flush).
 */
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import { dataView } from '../../util/bytes.js';
import { Mutex } from '../../util/mutex.js';
import { ClusterAllocator } from './allocator.js';
import * as C from './constants.js';
import type { Qcow2Header } from './header.js';
import type { L1Table } from './l1l2.js';

/** What the writer needs from the layer it writes. */
export interface WriterHost {
  readonly path: string;
  readonly header: Qcow2Header;
  readonly file: HostFile;
  readonly dataFile: HostFile | null;
  readonly l1: L1Table;
  readonly hasBacking: boolean;
  /** L2 tables changed since the last flush, by host offset; the layer reads these first. */
  readonly pinned: Map<number, Uint8Array>;
  l2Table(offset: number, l1Index: number): Promise<Uint8Array>;
  /** Guest bytes as the image reads now (this layer plus backing): the source of copy-on-write. */
  readGuest(buf: Uint8Array, offset: number): Promise<void>;
}

const MAX_PINNED_BYTES = 32 << 20;
const MAX_DIRTY_REFBLOCKS = 128;
const COPIED = 1n << 63n;
const ZERO_FLAG = 1n;

interface Entry {
  raw: bigint;
  kind: 'unallocated' | 'zero' | 'zero-alloc' | 'normal' | 'compressed';
  host: number;
  copied: boolean;
}

export class Qcow2Writer {
  private readonly lock = new Mutex();
  private readonly dirtyL1 = new Set<number>();
  private readonly cs: number;
  private readonly external: boolean;
  private autoclearChecked = false;

  private constructor(
    private readonly img: WriterHost,
    private readonly alloc: ClusterAllocator,
  ) {
    this.cs = img.header.clusterSize;
    this.external = img.dataFile !== null;
  }

  static async open(img: WriterHost): Promise<Qcow2Writer> {
    return new Qcow2Writer(img, await ClusterAllocator.load(img.file, img.header));
  }

  private get h(): Qcow2Header {
    return this.img.header;
  }

  private decode(table: Uint8Array, idx: number): Entry {
    const raw = dataView(table).getBigUint64(idx * this.h.l2EntrySize);
    const copied = (raw & COPIED) !== 0n;
    if ((raw & (1n << 62n)) !== 0n) return { raw, kind: 'compressed', host: 0, copied: false };
    const host = Number(raw & 0x00ff_ffff_ffff_fe00n);
    const allocated = host !== 0 || (copied && this.external);
    if ((raw & ZERO_FLAG) !== 0n) return { raw, kind: host !== 0 ? 'zero-alloc' : 'zero', host, copied };
    return { raw, kind: allocated ? 'normal' : 'unallocated', host, copied };
  }

  /** Queue the release of whatever host storage an entry held (§6: after the new table is durable). */
  private release(e: Entry): void {
    if (this.external) return; // data clusters in an external file are not refcounted
    if (e.kind === 'compressed') {
      const x = BigInt(62 - (this.h.clusterBits - 8));
      const coff = Number(e.raw & ((1n << x) - 1n));
      const sectors = Number((e.raw >> x) & ((1n << (62n - x)) - 1n)) + 1;
      // qemu counts every host cluster touched by [coff & ~511, + sectors * 512).
      const start = coff - (coff % 512);
      this.alloc.freeLater(start, sectors * 512);
    } else if ((e.kind === 'normal' || e.kind === 'zero-alloc') && e.host !== 0) {
      this.alloc.freeLater(e.host, this.cs);
    }
  }

  private setEntry(table: Uint8Array, l2Off: number, idx: number, raw: bigint): void {
    dataView(table).setBigUint64(idx * this.h.l2EntrySize, raw);
    this.img.pinned.set(l2Off, table);
  }

  private l1Offset(l1i: number): number {
    return this.img.l1.entries[l1i] as number;
  }

  /** The L2 table for l1i, allocated (zeroed) if the L1 entry is empty. */
  private async l2ForWrite(l1i: number): Promise<{ table: Uint8Array; l2Off: number }> {
    const off = this.l1Offset(l1i);
    if (off !== 0) {
      const raw = dataView(this.img.l1.raw).getBigUint64(l1i * 8);
      if ((raw & COPIED) === 0n) {
        throw new BlockError(
          'not-supported',
          `${this.img.path}: L2 table ${l1i} is shared (COPIED flag clear); writing shared tables is not supported`,
          {
            path: this.img.path,
            structure: 'L1 table',
            offset: this.h.l1TableOffset + l1i * 8,
          },
        );
      }
      return { table: await this.img.l2Table(off, l1i), l2Off: off };
    }
    const l2Off = await this.alloc.allocate(1);
    const table = new Uint8Array(this.cs);
    this.img.pinned.set(l2Off, table);
    this.img.l1.entries[l1i] = l2Off;
    dataView(this.img.l1.raw).setBigUint64(l1i * 8, BigInt(l2Off) | COPIED);
    this.dirtyL1.add(l1i);
    return { table, l2Off };
  }

  private hostFile(): HostFile {
    return this.img.dataFile ?? this.img.file;
  }

  /** Autoclear bits we do not know must be cleared before the first write (§1.1). */
  private async clearUnknownAutoclear(): Promise<void> {
    if (this.autoclearChecked) return;
    this.autoclearChecked = true;
    const known = C.AUTOCLEAR_BITMAPS | C.AUTOCLEAR_DATA_FILE_RAW;
    if (this.h.version === 3 && (this.h.autoclear & ~known) !== 0n) {
      this.h.autoclear &= known;
      const b = new Uint8Array(8);
      dataView(b).setBigUint64(0, this.h.autoclear);
      await this.img.file.writeAt(b, 88);
    }
  }

  write(buf: Uint8Array, offset: number): Promise<void> {
    return this.lock.run(() => this.writeLocked(buf, offset));
  }

  private async writeLocked(buf: Uint8Array, offset: number): Promise<void> {
    await this.clearUnknownAutoclear();
    const cs = this.cs;
    const size = this.h.size;
    const end = offset + buf.length;
    let pos = offset;
    while (pos < end) {
      const ci = Math.floor(pos / cs);
      const cStart = ci * cs;
      const l1i = Math.floor(ci / this.h.l2Entries);
      const idx = ci % this.h.l2Entries;
      const { table, l2Off } = await this.l2ForWrite(l1i);
      if (this.h.extendedL2) {
        pos = await this.writeSubclusters(buf, offset, pos, table, l2Off, idx, cStart);
        await this.maybeFlush();
        continue;
      }
      const e = this.decode(table, idx);
      if (e.kind === 'normal' && (e.copied || this.external)) {
        // Overwrite in place: the cluster is ours alone. Extend over following in-place clusters that are contiguous on the host.
        let cEnd = Math.min(cStart + cs, end);
        let n = 1;
        while (cEnd < end && idx + n < this.h.l2Entries) {
          const next = this.decode(table, idx + n);
          if (next.kind !== 'normal' || !(next.copied || this.external) || next.host !== e.host + n * cs) break;
          cEnd = Math.min(cStart + (n + 1) * cs, end);
          n++;
        }
        await this.hostFile().writeAt(buf.subarray(pos - offset, cEnd - offset), e.host + (pos - cStart));
        pos = cEnd;
        continue;
      }
      const clusterEnd = Math.min(cStart + cs, size);
      if (pos === cStart && end >= clusterEnd) {
        // Whole clusters: allocate a contiguous run for every following whole cluster that needs one.
        let n = 1;
        while (idx + n < this.h.l2Entries) {
          const nStart = cStart + n * cs;
          if (nStart >= end || end < Math.min(nStart + cs, size)) break;
          const next = this.decode(table, idx + n);
          if (next.kind === 'normal' && (next.copied || this.external)) break;
          n++;
        }
        const bytes = Math.min(n * cs, end - pos);
        const host = this.external ? cStart : await this.alloc.allocate(n);
        await this.hostFile().writeAt(buf.subarray(pos - offset, pos - offset + bytes), host);
        for (let k = 0; k < n; k++) {
          const old = this.decode(table, idx + k);
          this.setEntry(table, l2Off, idx + k, BigInt(host + k * cs) | COPIED);
          this.release(old);
        }
        pos += bytes;
      } else {
        // Part of a cluster: copy-on-write of the rest from what the guest reads now (§6 step 2).
        const cbuf = new Uint8Array(clusterEnd - cStart);
        await this.img.readGuest(cbuf, cStart);
        const cEnd = Math.min(clusterEnd, end);
        cbuf.set(buf.subarray(pos - offset, cEnd - offset), pos - cStart);
        const host = this.external ? cStart : await this.alloc.allocate(1);
        await this.hostFile().writeAt(cbuf, host);
        this.setEntry(table, l2Off, idx, BigInt(host) | COPIED);
        this.release(e);
        pos = cEnd;
      }
      await this.maybeFlush();
    }
  }

  /**
   * Store one guest cluster as compressed data (§4.2, §5). `offset` is
   * cluster-aligned; `data` is the compressed stream of the whole cluster.
   * Compressed clusters are packed byte-contiguously, as qemu does; every host
   * cluster they touch gets one more reference.
   */
  writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    return this.lock.run(async () => {
      if (this.external)
        throw new BlockError('not-supported', `${this.img.path}: compressed clusters are not allowed with an external data file`, {
          path: this.img.path,
        });
      await this.clearUnknownAutoclear();
      const ci = Math.floor(offset / this.cs);
      const l1i = Math.floor(ci / this.h.l2Entries);
      const idx = ci % this.h.l2Entries;
      const { table, l2Off } = await this.l2ForWrite(l1i);
      const host = await this.allocBytes(data.length);
      await this.img.file.writeAt(data, host);
      const x = BigInt(62 - (this.h.clusterBits - 8));
      const additional = Math.floor((host + data.length - 1) / 512) - Math.floor(host / 512);
      const old = this.decode(table, idx);
      this.setEntry(table, l2Off, idx, (1n << 62n) | (BigInt(additional) << x) | BigInt(host));
      this.release(old);
      await this.maybeFlush();
    });
  }

  /** Where the next compressed cluster goes: the rest of the last packed cluster, else new clusters. */
  private byteCursor = 0;

  private async allocBytes(len: number): Promise<number> {
    const cs = this.cs;
    const cur = this.byteCursor;
    const curCluster = Math.floor(cur / cs);
    const curEnd = (curCluster + 1) * cs;
    if (cur > 0 && cur + len <= curEnd) {
      await this.alloc.add(curCluster, 1);
      this.byteCursor = cur + len === curEnd ? 0 : cur + len;
      return cur;
    }
    const k = Math.ceil(len / cs);
    const start = await this.alloc.allocate(k);
    let host = start;
    if (cur > 0 && start === curEnd) {
      // Contiguous with the partly used cluster: continue there, and give back a new cluster the data does not reach.
      host = cur;
      await this.alloc.add(curCluster, 1);
      const lastTouched = Math.floor((cur + len - 1) / cs);
      for (let c = lastTouched + 1; c < start / cs + k; c++) await this.alloc.add(c, -1);
    }
    const end = host + len;
    this.byteCursor = end % cs === 0 ? 0 : end;
    return host;
  }

  /**
   * One cluster of an extended-L2 image (§4.3): only the touched subclusters
   * are written (copy-on-write inside the first and last of them) and marked
   * allocated; the others keep their zero or unallocated state. A compressed
   * or shared cluster is copied whole into a new one. Returns the new position.
   */
  private async writeSubclusters(
    buf: Uint8Array,
    offset: number,
    pos: number,
    table: Uint8Array,
    l2Off: number,
    idx: number,
    cStart: number,
  ): Promise<number> {
    const cs = this.cs;
    const sc = cs / 32;
    const end = offset + buf.length;
    const guestEnd = Math.min(cStart + cs, this.h.size);
    const wEnd = Math.min(guestEnd, end);
    const dv = dataView(table);
    const raw = dv.getBigUint64(idx * 16);
    const bitmap = dv.getBigUint64(idx * 16 + 8);
    const compressed = (raw & (1n << 62n)) !== 0n;
    const host0 = compressed ? 0 : Number(raw & 0x00ff_ffff_ffff_fe00n);
    const hasHost = !compressed && (host0 !== 0 || ((raw & COPIED) !== 0n && this.external));
    let alloc = Number(bitmap & 0xffff_ffffn);
    let zero = Number(bitmap >> 32n);
    let from: number;
    let to: number;
    let host: number;
    if (compressed || (hasHost && (raw & COPIED) === 0n && !this.external)) {
      // Whole-cluster copy: every subcluster becomes allocated.
      from = cStart;
      to = guestEnd;
      host = await this.alloc.allocate(1);
      alloc = 0xffff_ffff;
      zero = 0;
    } else {
      const s0 = Math.floor((pos - cStart) / sc);
      const s1 = Math.floor((wEnd - 1 - cStart) / sc);
      from = cStart + s0 * sc;
      to = Math.min(cStart + (s1 + 1) * sc, guestEnd);
      host = hasHost ? host0 : this.external ? cStart : await this.alloc.allocate(1);
      const mask = (s1 === 31 ? 0xffff_ffff : 2 ** (s1 + 1) - 1) - (2 ** s0 - 1);
      alloc = (alloc | mask) >>> 0;
      zero = (zero & ~mask) >>> 0;
    }
    const region = new Uint8Array(to - from);
    if (pos > from || wEnd < to) await this.img.readGuest(region, from);
    region.set(buf.subarray(pos - offset, wEnd - offset), pos - from);
    await this.hostFile().writeAt(region, host + (from - cStart));
    const old = this.decode(table, idx);
    dv.setBigUint64(idx * 16, BigInt(host) | COPIED);
    dv.setBigUint64(idx * 16 + 8, (BigInt(zero) << 32n) | BigInt(alloc));
    this.img.pinned.set(l2Off, table);
    // The old storage (a compressed cluster, or a shared one we copied away from) loses a reference.
    if (host !== host0 || compressed) this.release(old);
    return wEnd;
  }

  writeZeroes(offset: number, length: number, mayTrim: boolean): Promise<void> {
    return this.lock.run(() => this.zeroLocked(offset, length, mayTrim, false));
  }

  discard(offset: number, length: number): Promise<void> {
    return this.lock.run(() => this.zeroLocked(offset, length, true, true));
  }

  /**
   * Zero (or discard) [offset, offset+length). Whole clusters change only
   * their L2 entry; partial clusters are written with zeros (write-zeroes) or
   * left alone (discard is advisory).
   */
  private async zeroLocked(offset: number, length: number, mayTrim: boolean, isDiscard: boolean): Promise<void> {
    await this.clearUnknownAutoclear();
    const cs = this.cs;
    const size = this.h.size;
    const end = offset + length;
    const firstWhole = Math.ceil(offset / cs) * cs;
    const lastWhole = end >= size ? Math.ceil(size / cs) * cs : Math.floor(end / cs) * cs;
    // Unaligned head and tail (or an image where metadata cannot express zeros).
    const rawZeros = this.external && (this.h.autoclear & C.AUTOCLEAR_DATA_FILE_RAW) !== 0n;
    const v2WithBacking = this.h.version === 2 && this.img.hasBacking;
    if (firstWhole >= lastWhole || rawZeros || (v2WithBacking && !isDiscard)) {
      if (!isDiscard) await this.writeZeroBytes(offset, end);
      return;
    }
    if (!isDiscard) {
      await this.writeZeroBytes(offset, firstWhole);
      await this.writeZeroBytes(Math.min(lastWhole, end), end);
    }
    for (let pos = firstWhole; pos < Math.min(lastWhole, end + cs); pos += cs) {
      if (pos >= end) break;
      const ci = pos / cs;
      const l1i = Math.floor(ci / this.h.l2Entries);
      const idx = ci % this.h.l2Entries;
      if (this.l1Offset(l1i) === 0 && !this.img.hasBacking) {
        // The whole L2 range is unallocated and reads as zeros already.
        pos = (l1i + 1) * this.h.l2Entries * cs - cs;
        continue;
      }
      const { table, l2Off } = await this.l2ForWrite(l1i);
      const e = this.decode(table, idx);
      if (this.h.extendedL2) {
        // All 32 subclusters read as zeros; the host cluster (if any) is released (§4.3).
        const dv = dataView(table);
        const allZero = 0xffff_ffff_0000_0000n;
        if (dv.getBigUint64(idx * 16) === 0n && dv.getBigUint64(idx * 16 + 8) === allZero) continue;
        if (isDiscard && e.kind === 'unallocated' && dv.getBigUint64(idx * 16 + 8) === 0n && !this.img.hasBacking) continue;
        dv.setBigUint64(idx * 16, 0n);
        dv.setBigUint64(idx * 16 + 8, allZero);
        this.img.pinned.set(l2Off, table);
        this.release(e);
        await this.maybeFlush();
        continue;
      }
      let raw: bigint;
      if (isDiscard) {
        // qemu's discard: only allocated clusters (or any, with a backing file) change; v3 reads zeros after.
        if (e.kind === 'unallocated' && !this.img.hasBacking) continue;
        if (e.kind === 'zero') continue;
        raw = this.h.version >= 3 ? ZERO_FLAG : 0n;
      } else if (this.h.version === 2) {
        raw = 0n; // no backing (checked above): unallocated reads as zeros
      } else if (!mayTrim && e.kind === 'normal' && e.copied && !this.external) {
        raw = BigInt(e.host) | COPIED | ZERO_FLAG; // keep the preallocated cluster
      } else if (e.kind === 'zero') {
        continue;
      } else raw = ZERO_FLAG;
      if (raw === e.raw) continue;
      this.setEntry(table, l2Off, idx, raw);
      if ((raw & ~ZERO_FLAG & ~COPIED) !== BigInt(e.host) || e.kind === 'compressed') this.release(e);
      await this.maybeFlush();
    }
  }

  private async writeZeroBytes(from: number, to: number): Promise<void> {
    const chunk = 1 << 20;
    for (let pos = from; pos < to; pos += chunk) await this.writeLocked(new Uint8Array(Math.min(chunk, to - pos)), pos);
  }

  private async maybeFlush(): Promise<void> {
    if (this.img.pinned.size * this.cs > MAX_PINNED_BYTES || this.alloc.dirtyBlockCount > MAX_DIRTY_REFBLOCKS) await this.flushLocked();
  }

  flush(): Promise<void> {
    return this.lock.run(() => this.flushLocked());
  }

  private async flushLocked(): Promise<void> {
    const file = this.img.file;
    // 1. Data (in the data file too) and refcount blocks, then the refcount table: durable first.
    if (this.img.dataFile !== null) await this.img.dataFile.sync();
    await this.alloc.writeBack((offset, clusters) => this.updateReftableHeader(offset, clusters));
    await file.sync();
    // 2. L2 tables, then 3. the L1 entries that point to new ones.
    if (this.img.pinned.size > 0) {
      for (const [off, table] of this.img.pinned) await file.writeAt(table, off);
      await file.sync();
      this.img.pinned.clear();
    }
    if (this.dirtyL1.size > 0) {
      const e = new Uint8Array(8);
      for (const i of [...this.dirtyL1].sort((a, b) => a - b)) {
        e.set(this.img.l1.raw.subarray(i * 8, i * 8 + 8));
        await file.writeAt(e, this.h.l1TableOffset + i * 8);
      }
      this.dirtyL1.clear();
      await file.sync();
    }
    // 4. Only now drop the references the tables no longer hold.
    if (this.alloc.hasPendingFrees) {
      await this.alloc.applyFrees();
      await this.alloc.writeBack((offset, clusters) => this.updateReftableHeader(offset, clusters));
    }
  }

  /**
   * Change the virtual size (qemu-img resize). Growing past what the L1
   * table covers moves L1 to a bigger table (§6: new table written and synced,
   * then one 12-byte header write, then the old clusters freed). Shrinking is
   * allowed only when nothing allocated lies past the new end.
   */
  resize(newSize: number): Promise<void> {
    return this.lock.run(async () => {
      const h = this.h;
      const cs = this.cs;
      if (newSize < h.size) {
        // First make sure nothing with data is cut, then clear the zero clusters past the end
        // (so growing later reads zeros or the backing file cleanly): two passes, no change on refusal.
        await this.scanCut(newSize, false);
        await this.scanCut(newSize, true);
      }
      const need = Math.ceil(newSize / (cs * h.l2Entries));
      if (need > h.l1Size) {
        if (need * 8 > C.MAX_L1_BYTES) {
          throw new BlockError(
            'invalid-argument',
            `${this.img.path}: ${newSize} bytes needs an L1 table over 32 MiB with ${cs}-byte clusters`,
            {
              path: this.img.path,
              op: 'resize',
            },
          );
        }
        await this.flushLocked();
        const clusters = Math.ceil((need * 8) / cs);
        const at = await this.alloc.allocate(clusters);
        const raw = new Uint8Array(need * 8);
        raw.set(this.img.l1.raw);
        await this.alloc.writeBack((o, c) => this.updateReftableHeader(o, c));
        await this.img.file.writeAt(raw, at);
        await this.img.file.sync();
        const b = new Uint8Array(12);
        dataView(b).setUint32(0, need);
        dataView(b).setBigUint64(4, BigInt(at));
        await this.img.file.writeAt(b, 36);
        await this.img.file.sync();
        if (h.l1Size > 0) this.alloc.freeLater(h.l1TableOffset, h.l1Size * 8);
        this.img.l1.replace(raw);
        h.l1Size = need;
        h.l1TableOffset = at;
      }
      const b = new Uint8Array(8);
      dataView(b).setBigUint64(0, BigInt(newSize));
      await this.img.file.writeAt(b, 24);
      h.size = newSize;
      await this.flushLocked();
    });
  }

  private async scanCut(newSize: number, clear: boolean): Promise<void> {
    const h = this.h;
    const cs = this.cs;
    for (let ci = Math.ceil(newSize / cs); ci * cs < h.size; ci++) {
      const l1i = Math.floor(ci / h.l2Entries);
      if (l1i >= h.l1Size || this.l1Offset(l1i) === 0) {
        ci = (l1i + 1) * h.l2Entries - 1;
        continue;
      }
      const idx = ci % h.l2Entries;
      const table = await this.img.l2Table(this.l1Offset(l1i), l1i);
      const e = this.decode(table, idx);
      if (e.kind === 'zero') {
        if (clear) this.setEntry(table, this.l1Offset(l1i), idx, 0n);
      } else if (e.kind !== 'unallocated') {
        throw new BlockError(
          'invalid-argument',
          `${this.img.path}: cannot shrink to ${newSize} bytes: guest offset ${ci * cs} is allocated (${e.kind}); discard it first`,
          { path: this.img.path, op: 'resize' },
        );
      }
    }
  }

  /**
   * Deallocate every cluster of the active L1 (qemu's make_empty, used by
   * commit): reads then fall through to the backing file.
   */
  makeEmpty(): Promise<void> {
    return this.lock.run(async () => {
      const h = this.h;
      for (let l1i = 0; l1i < h.l1Size; l1i++) {
        const off = this.l1Offset(l1i);
        if (off === 0) continue;
        const { table, l2Off } = await this.l2ForWrite(l1i);
        for (let idx = 0; idx < h.l2Entries; idx++) {
          const e = this.decode(table, idx);
          if (e.raw === 0n) continue;
          this.setEntry(table, l2Off, idx, 0n);
          this.release(e);
        }
        await this.maybeFlush();
      }
      await this.flushLocked();
    });
  }

  /** One 12-byte header write moves the refcount table (§3.1). */
  private async updateReftableHeader(offset: number, clusters: number): Promise<void> {
    const b = new Uint8Array(12);
    dataView(b).setBigUint64(0, BigInt(offset));
    dataView(b).setUint32(8, clusters);
    await this.img.file.writeAt(b, 48);
    this.h.refcountTableOffset = offset;
    this.h.refcountTableClusters = clusters;
  }
}
