/** Refcount table and blocks (spec §3): read for `inspect --refcounts` and the RPC `refcount`. */
import type { HostFile } from '../../block/file.js';
import { dataView } from '../../util/bytes.js';
import type { Qcow2Header } from './header.js';
import { LruCache } from '../../util/lru.js';

export interface RefcountTableEntry {
  index: number;
  raw: bigint;
  blockOffset: number;
  reserved: boolean;
}

export class Refcounts {
  readonly bits: number;
  readonly entriesPerBlock: number;
  private readonly blocks = new LruCache<number, Uint8Array>(16);

  private constructor(
    private readonly file: HostFile,
    private readonly h: Qcow2Header,
    readonly table: RefcountTableEntry[],
  ) {
    this.bits = 2 ** h.refcountOrder;
    this.entriesPerBlock = (h.clusterSize * 8) / this.bits;
  }

  /** Load the table; its size is bounded by the header check (8 MiB). */
  static async load(file: HostFile, h: Qcow2Header): Promise<Refcounts> {
    const raw = new Uint8Array(h.refcountTableClusters * h.clusterSize);
    await file.readExact(raw, h.refcountTableOffset, 'refcount table');
    const dv = dataView(raw);
    const table: RefcountTableEntry[] = [];
    for (let i = 0; i < raw.length / 8; i++) {
      const r = dv.getBigUint64(i * 8);
      table.push({ index: i, raw: r, blockOffset: Number(r & 0xffff_ffff_ffff_fe00n), reserved: (r & 0x1ffn) !== 0n });
    }
    // Trailing empty entries carry no information.
    while (table.length > 0 && table[table.length - 1]!.raw === 0n) table.pop();
    return new Refcounts(file, h, table);
  }

  private block(offset: number): Promise<Uint8Array> {
    return this.blocks.get(offset, async () => {
      const b = new Uint8Array(this.h.clusterSize);
      await this.file.readExact(b, offset, 'refcount block');
      return b;
    });
  }

  /** Entry i of a refcount block, packed LSB-first for widths below 8 bits (§3). */
  static entry(block: Uint8Array, i: number, bits: number): number {
    if (bits < 8) {
      const perByte = 8 / bits;
      const byte = block[Math.floor(i / perByte)] as number;
      return (byte >> ((i % perByte) * bits)) & ((1 << bits) - 1);
    }
    const dv = dataView(block);
    if (bits === 8) return block[i] as number;
    if (bits === 16) return dv.getUint16(i * 2);
    if (bits === 32) return dv.getUint32(i * 4);
    return Number(dv.getBigUint64(i * 8));
  }

  /** Store `value` as entry i of a refcount block (the inverse of entry()). */
  static setEntry(block: Uint8Array, i: number, bits: number, value: number): void {
    if (bits < 8) {
      const perByte = 8 / bits;
      const shift = (i % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      const at = Math.floor(i / perByte);
      block[at] = ((block[at] as number) & ~mask) | ((value << shift) & mask);
      return;
    }
    const dv = dataView(block);
    if (bits === 8) block[i] = value;
    else if (bits === 16) dv.setUint16(i * 2, value);
    else if (bits === 32) dv.setUint32(i * 4, value);
    else dv.setBigUint64(i * 8, BigInt(value));
  }

  /** Refcount of a host cluster (by index). */
  async get(clusterIndex: number): Promise<number> {
    const t = Math.floor(clusterIndex / this.entriesPerBlock);
    const e = this.table[t];
    if (e === undefined || e.blockOffset === 0) return 0;
    return Refcounts.entry(await this.block(e.blockOffset), clusterIndex % this.entriesPerBlock, this.bits);
  }

  /** Summary of one refcount block: how many clusters it counts as used, and the highest refcount. */
  async summary(e: RefcountTableEntry): Promise<{ used: number; maxRefcount: number }> {
    const b = await this.block(e.blockOffset);
    let used = 0;
    let maxRefcount = 0;
    for (let i = 0; i < this.entriesPerBlock; i++) {
      const r = Refcounts.entry(b, i, this.bits);
      if (r > 0) used++;
      if (r > maxRefcount) maxRefcount = r;
    }
    return { used, maxRefcount };
  }
}
