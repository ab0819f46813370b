/**
 * Host cluster allocation and refcount bookkeeping for the qcow2 writer
 * (spec §3, §3.1, §6).
 *
 * Crash safety is by ordering, not by the dirty bit: refcount blocks and the
 * refcount table are written back (and fsynced) before any L2/L1 table that
 * references a newly allocated cluster, and refcount decrements are applied
 * only after the tables that dropped the reference are durable. Clusters freed
 * since the last flush are not reused until then. So a kill at any instant can
 * only leak clusters (refcount too high), never leave a reference to a cluster
 * whose refcount is 0 on disk.
 */
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import { dataView } from '../../util/bytes.js';
import type { Qcow2Header } from './header.js';
import { Refcounts } from './refcount.js';

interface RefBlock {
  data: Uint8Array;
  dirty: boolean;
}

/** Refcount blocks kept in memory before clean ones are dropped. */
const MAX_CACHED_BLOCKS = 256;

export class ClusterAllocator {
  readonly bits: number;
  readonly perBlock: number;
  private readonly maxRefcount: number;
  private readonly cs: number;
  /** Refcount table: block offset per entry (0 = none). Its length is the table's capacity. */
  private table: number[];
  private tableOffset: number;
  private tableClusters: number;
  private readonly dirtyTable = new Set<number>();
  /** Set when the table moved: the whole new table and the header are written at the next flush. */
  private moved: { oldOffset: number; oldClusters: number } | null = null;
  private readonly blocks = new Map<number, RefBlock>();
  /** First cluster index that may be free. */
  private freeHint = 0;
  /** One past the highest cluster in use or in the file. */
  private end: number;
  /** Decrements waiting for the tables that dropped the references to be durable. */
  private pendingFrees: number[] = [];

  private constructor(
    private readonly file: HostFile,
    h: Qcow2Header,
    table: number[],
  ) {
    this.cs = h.clusterSize;
    this.bits = 2 ** h.refcountOrder;
    this.perBlock = (h.clusterSize * 8) / this.bits;
    this.maxRefcount = this.bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** this.bits - 1;
    this.table = table;
    this.tableOffset = h.refcountTableOffset;
    this.tableClusters = h.refcountTableClusters;
    this.end = Math.ceil(file.size / this.cs);
  }

  static async load(file: HostFile, h: Qcow2Header): Promise<ClusterAllocator> {
    const raw = new Uint8Array(h.refcountTableClusters * h.clusterSize);
    await file.readExact(raw, h.refcountTableOffset, 'refcount table');
    const dv = dataView(raw);
    const table: number[] = [];
    for (let i = 0; i < raw.length / 8; i++) {
      const v = dv.getBigUint64(i * 8) & 0xffff_ffff_ffff_fe00n;
      const off = Number(v);
      if (off % h.clusterSize !== 0) {
        throw new BlockError('corrupt-image', `${file.path}: refcount table entry ${i} points to unaligned offset 0x${off.toString(16)}`, {
          path: file.path,
          structure: 'refcount table',
          offset: h.refcountTableOffset + i * 8,
        });
      }
      table.push(off);
    }
    const alloc = new ClusterAllocator(file, h, table);
    await alloc.findEnd();
    return alloc;
  }

  /** Clusters past the end of the file may still be counted (a crash, preallocation): never hand those out. */
  private async findEnd(): Promise<void> {
    for (let ti = this.table.length - 1; ti >= 0; ti--) {
      if (this.table[ti] === 0) continue;
      const b = await this.block(ti);
      for (let i = this.perBlock - 1; i >= 0; i--) {
        if (Refcounts.entry(b.data, i, this.bits) !== 0) {
          this.end = Math.max(this.end, ti * this.perBlock + i + 1);
          return;
        }
      }
    }
  }

  /** Byte offset of one past the last cluster in use (allocation appends here). */
  get endOffset(): number {
    return this.end * this.cs;
  }

  private async block(ti: number): Promise<RefBlock> {
    let b = this.blocks.get(ti);
    if (b !== undefined) return b;
    const off = this.table[ti] as number;
    const data = new Uint8Array(this.cs);
    await this.file.readExact(data, off, `refcount block ${ti}`);
    b = { data, dirty: false };
    this.blocks.set(ti, b);
    if (this.blocks.size > MAX_CACHED_BLOCKS) {
      for (const [k, v] of this.blocks) {
        if (this.blocks.size <= MAX_CACHED_BLOCKS) break;
        if (!v.dirty && k !== ti) this.blocks.delete(k);
      }
    }
    return b;
  }

  async get(ci: number): Promise<number> {
    const ti = Math.floor(ci / this.perBlock);
    if (ti >= this.table.length || this.table[ti] === 0) return 0;
    const b = await this.block(ti);
    return Refcounts.entry(b.data, ci % this.perBlock, this.bits);
  }

  private async set(ci: number, value: number): Promise<void> {
    if (value < 0 || value > this.maxRefcount) {
      throw new BlockError(
        'corrupt-image',
        `${this.file.path}: refcount of cluster ${ci} would become ${value} (${this.bits}-bit refcounts)`,
        {
          path: this.file.path,
          structure: 'refcount block',
        },
      );
    }
    const ti = Math.floor(ci / this.perBlock);
    if (ti >= this.table.length) await this.growTable(ti + 1);
    if (this.table[ti] === 0) await this.newBlock(ti);
    const b = await this.block(ti);
    Refcounts.setEntry(b.data, ci % this.perBlock, this.bits, value);
    b.dirty = true;
    if (ci + 1 > this.end) this.end = ci + 1;
  }

  async add(ci: number, delta: number): Promise<void> {
    await this.set(ci, (await this.get(ci)) + delta);
  }

  /** A new, empty refcount block for table entry ti, appended; it counts itself when it can (§3.1). */
  private async newBlock(ti: number): Promise<void> {
    const at = this.end++;
    this.table[ti] = at * this.cs;
    this.dirtyTable.add(ti);
    this.blocks.set(ti, { data: new Uint8Array(this.cs), dirty: true });
    await this.set(at, 1);
  }

  /**
   * Move the refcount table to a bigger one at the end of the file (§3.1).
   * Sized with room for the blocks that describe the new table itself.
   */
  private async growTable(minEntries: number): Promise<void> {
    const perCluster = this.cs / 8;
    let entries = Math.max(minEntries, Math.ceil(this.table.length * 1.5));
    let clusters = Math.ceil(entries / perCluster);
    // The new table's clusters (and the blocks counting them) must fit in what it covers.
    while (Math.ceil((this.end + clusters + 2) / this.perBlock) + 1 > clusters * perCluster) clusters++;
    entries = clusters * perCluster;
    if (clusters * this.cs > 8 << 20) {
      throw new BlockError('no-space', `${this.file.path}: the refcount table would exceed 8 MiB (qemu's limit)`, { path: this.file.path });
    }
    const start = this.end;
    this.end += clusters;
    if (this.moved === null) this.moved = { oldOffset: this.tableOffset, oldClusters: this.tableClusters };
    else this.pendingFrees.push(...range(this.tableOffset / this.cs, this.tableClusters));
    while (this.table.length < entries) this.table.push(0);
    this.tableOffset = start * this.cs;
    this.tableClusters = clusters;
    for (let i = 0; i < clusters; i++) await this.set(start + i, 1);
  }

  /** Allocate n contiguous clusters with refcount 1; returns the byte offset of the first. */
  async allocate(n: number): Promise<number> {
    // First fit from the hint below the end; a free tail that reaches the end is extended.
    let start = this.freeHint;
    while (start < this.end && (await this.get(start)) !== 0) start++;
    this.freeHint = start;
    while (start < this.end) {
      let k = 0;
      while (k < n && start + k < this.end && (await this.get(start + k)) === 0) k++;
      if (k === n || start + k >= this.end) break;
      start += k + 1;
      while (start < this.end && (await this.get(start)) !== 0) start++;
    }
    // Reserve the run first, so refcount blocks created while counting it land after it.
    if (start + n > this.end) this.end = start + n;
    for (let i = 0; i < n; i++) await this.set(start + i, 1);
    if (start === this.freeHint) this.freeHint = start + n;
    return start * this.cs;
  }

  /** Drop one reference to each cluster in [offset, offset+bytes) once the tables are durable. */
  freeLater(offset: number, bytes: number): void {
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + bytes - 1) / this.cs);
    for (let ci = first; ci <= last; ci++) this.pendingFrees.push(ci);
  }

  get hasPendingFrees(): boolean {
    return this.pendingFrees.length > 0;
  }

  get dirtyBlockCount(): number {
    let n = 0;
    for (const b of this.blocks.values()) if (b.dirty) n++;
    return n;
  }

  /**
   * Write dirty refcount blocks, then the refcount table (and the header if it
   * moved). Each group is fsynced before the next, so the table never points
   * at a block that is not on disk.
   */
  async writeBack(updateHeader: (offset: number, clusters: number) => Promise<void>): Promise<void> {
    let wrote = false;
    for (const [ti, b] of this.blocks) {
      if (!b.dirty) continue;
      await this.file.writeAt(b.data, this.table[ti] as number);
      b.dirty = false;
      wrote = true;
    }
    if (wrote || this.moved !== null || this.dirtyTable.size > 0) await this.file.sync();
    if (this.moved !== null) {
      const raw = new Uint8Array(this.tableClusters * this.cs);
      const dv = dataView(raw);
      this.table.forEach((off, i) => dv.setBigUint64(i * 8, BigInt(off)));
      await this.file.writeAt(raw, this.tableOffset);
      await this.file.sync();
      await updateHeader(this.tableOffset, this.tableClusters);
      await this.file.sync();
      const old = this.moved;
      this.moved = null;
      this.dirtyTable.clear();
      this.pendingFrees.push(...range(old.oldOffset / this.cs, old.oldClusters));
    } else if (this.dirtyTable.size > 0) {
      const e = new Uint8Array(8);
      for (const ti of [...this.dirtyTable].sort((a, b) => a - b)) {
        dataView(e).setBigUint64(0, BigInt(this.table[ti] as number));
        await this.file.writeAt(e, this.tableOffset + ti * 8);
      }
      this.dirtyTable.clear();
      await this.file.sync();
    }
  }

  /** Apply the decrements queued by freeLater (call only once the referencing tables are durable). */
  async applyFrees(): Promise<void> {
    const frees = this.pendingFrees;
    this.pendingFrees = [];
    for (const ci of frees) {
      const v = await this.get(ci);
      if (v === 0) continue; // already free: a corrupt image; never go negative
      await this.set(ci, v - 1);
      if (v === 1 && ci < this.freeHint) this.freeHint = ci;
    }
  }
}

function range(start: number, n: number): number[] {
  return Array.from({ length: n }, (_, i) => start + i);
}
