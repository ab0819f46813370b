/**
 * The Block Allocation Table (spec digest §4): one big-endian u32 per block,
 * the sector number of the block's bitmap, or 0xFFFFFFFF for a block that is
 * not allocated. Read in chunks through a bounded LRU cache, so memory does
 * not grow with the disk; checked once, streaming, at open: every allocated
 * block must lie inside the file (qemu's "image has been truncated" check).
 */
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import { dataView } from '../../util/bytes.js';
import { LruCache } from '../../util/lru.js';
import { BAT_UNUSED, SECTOR } from './constants.js';
import type { DynamicHeader } from './header.js';

/** Entries per cached chunk (16 KiB), and chunks kept (1 MiB). */
const CHUNK_ENTRIES = 4096;
const CACHED_CHUNKS = 64;

export interface BatEntry {
  index: number;
  raw: number;
  /** File offsets of the block's sector bitmap and data, when allocated. */
  bitmapOffset?: number;
  dataOffset?: number;
}

export class Bat {
  private readonly cache = new LruCache<number, Uint32Array>(CACHED_CHUNKS);

  private constructor(
    private readonly file: HostFile,
    readonly header: DynamicHeader,
    /** Allocated entries, counted at open (and kept up to date by the writer). */
    public allocated: number,
    /** Where a new block would go: after the BAT and every allocated block (qemu's free_data_block_offset). */
    readonly endOfBlocks: number,
  ) {}

  get entries(): number {
    return this.header.maxTableEntries;
  }

  /** Scan every entry once (streaming) and check it, then serve lookups from a small cache. */
  static async load(file: HostFile, header: DynamicHeader): Promise<Bat> {
    const blockBytes = header.bitmapSize + header.blockSize;
    let allocated = 0;
    let end = Math.ceil((header.tableOffset + header.maxTableEntries * 4) / SECTOR) * SECTOR;
    for (let first = 0; first < header.maxTableEntries; first += CHUNK_ENTRIES) {
      const chunk = await readChunk(file, header, first);
      for (let j = 0; j < chunk.length; j++) {
        const raw = chunk[j] as number;
        if (raw === BAT_UNUSED) continue;
        allocated++;
        const blockEnd = raw * SECTOR + blockBytes;
        if (blockEnd > file.size) {
          const i = first + j;
          throw new BlockError(
            'corrupt-image',
            `${file.path}: BAT entry ${i} (guest offset ${i * header.blockSize}) points to sector 0x${raw.toString(16)}: the block (bitmap and data, ${blockBytes} bytes at offset ${raw * SECTOR}) ends past the end of the file (${file.size} bytes); the image is truncated or the BAT is damaged`,
            { path: file.path, structure: 'BAT', offset: header.tableOffset + i * 4 },
          );
        }
        if (blockEnd > end) end = blockEnd;
      }
    }
    return new Bat(file, header, allocated, end);
  }

  private chunk(first: number): Promise<Uint32Array> {
    return this.cache.get(first, () => readChunk(this.file, this.header, first));
  }

  /** The raw entry of block i (BAT_UNUSED beyond the table). */
  async raw(i: number): Promise<number> {
    if (i >= this.header.maxTableEntries) return BAT_UNUSED;
    const staged = this.pending.get(i);
    if (staged !== undefined) return staged;
    const first = i - (i % CHUNK_ENTRIES);
    return (await this.chunk(first))[i - first] as number;
  }

  async entry(i: number): Promise<BatEntry> {
    const raw = await this.raw(i);
    if (raw === BAT_UNUSED) return { index: i, raw };
    const bitmapOffset = raw * SECTOR;
    return { index: i, raw, bitmapOffset, dataOffset: bitmapOffset + this.header.bitmapSize };
  }

  /**
   * Entries of new blocks not yet written to the table (the writer, spec
   * digest §5.2): lookups see them at once; commit() writes them, after the
   * writer has made the blocks durable.
   */
  private readonly pending = new Map<number, number>();

  get pendingCount(): number {
    return this.pending.size;
  }

  /** Point entry i at a new block, in memory until commit(). */
  stage(i: number, raw: number): void {
    this.pending.set(i, raw);
    this.allocated++;
  }

  /** Write the staged entries (runs of consecutive entries in one write each) and update the cached chunks. */
  async commit(): Promise<void> {
    if (this.pending.size === 0) return;
    const idx = [...this.pending.keys()].sort((a, b) => a - b);
    for (let k = 0; k < idx.length;) {
      let e = k + 1;
      while (e < idx.length && idx[e] === (idx[e - 1] as number) + 1) e++;
      const first = idx[k] as number;
      const buf = new Uint8Array((e - k) * 4);
      const view = dataView(buf);
      for (let j = k; j < e; j++) view.setUint32((j - k) * 4, this.pending.get(idx[j] as number) as number);
      await this.file.writeAt(buf, this.header.tableOffset + first * 4);
      k = e;
    }
    for (const [i, raw] of this.pending) {
      const first = i - (i % CHUNK_ENTRIES);
      const chunk = await this.chunk(first);
      chunk[i - first] = raw;
    }
    this.pending.clear();
  }

  clear(): void {
    this.cache.clear();
  }
}

async function readChunk(file: HostFile, header: DynamicHeader, first: number): Promise<Uint32Array> {
  const n = Math.min(CHUNK_ENTRIES, header.maxTableEntries - first);
  const buf = new Uint8Array(n * 4);
  await file.readExact(buf, header.tableOffset + first * 4, 'BAT');
  const dv = dataView(buf);
  const out = new Uint32Array(n);
  for (let j = 0; j < n; j++) out[j] = dv.getUint32(j * 4);
  return out;
}
