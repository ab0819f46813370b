/**
 * Writing a VHD (spec digest §5.2): fixed disks in place; dynamic and
 * differencing disks through the BAT, allocating whole blocks at the end of
 * the file. A new block is written so that a process killed (or a machine
 * stopped) at any point leaves a disk that opens with every flushed write:
 *
 * 1. when the block would reach the trailing footer: a footer at a new end
 *    of the file, RESERVE_BLOCKS blocks ahead (the old trailing footer, still
 *    intact, is now an orphan in the middle; the space between is holes);
 * 2. the block's sector bitmap (perhaps over the old footer) and the written
 *    sectors, together;
 * 3. the BAT entry, staged in memory (reads see it at once) and written at
 *    the next flush, after an fdatasync has made the blocks durable (and
 *    every 1024 new blocks, so memory stays bounded). Only then does the
 *    block exist in the file.
 *
 * A kill before step 3 reaches the file leaves orphan blocks: leaked space
 * (never wrong data) that `check` reports and the next allocation reuses
 * (writing a reused block whole, zeros where nothing was written, so no stale
 * byte shows through its all-ones bitmap). close() moves the footer down to
 * the last block and cuts the file. The footer copy at offset 0 never
 * changes: nothing in the footer does when a block moves it.
 *
 * Dynamic disks get all-ones bitmaps, as qemu writes them (the rest of a new
 * block is a hole in the file and reads as zeros). Differencing disks copy
 * no block from the parent: the bitmap marks only the sectors written; a
 * partial sector is completed from what the chain reads there (read-modify-
 * write of that one sector), and a write ends on a whole bitmap byte (up to
 * 7 more sectors from the chain; libvhdi misreads a byte with a present run
 * followed by absent sectors). In a block that exists already, the bitmap
 * change waits in memory for the next flush, which makes the sectors durable
 * before writing it (a power cut then loses the write, never shows zeros for
 * the parent's data). Zero writes and discards never allocate a block
 * of a dynamic disk; discard is advisory and changes nothing.
 */
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import { bitRuns, setSectors } from './bitmap.js';
import { BAT_UNUSED, FOOTER_SIZE, SECTOR } from './constants.js';
import type { VhdSparse } from './image.js';

/** What the writer needs of an open VhdLayer. */
export interface WritableVhd {
  file: HostFile;
  size: number;
  sparse: VhdSparse | null;
  differencing: boolean;
  /** The 512 bytes of the footer in use (rewritten at the end of the file when a block is added). */
  footerBytes: Uint8Array;
  /** Guest bytes through the whole chain (for read-modify-write of partial sectors). */
  read(buf: Uint8Array, offset: number): Promise<void>;
  /** Whether the parent (of a differencing disk) reads as zeros over the range; true without one. */
  parentZero(offset: number, length: number): Promise<boolean>;
}

const ZERO_CHUNK = 1 << 20;
/**
 * New blocks one trailing footer write makes room for: the footer goes this
 * many blocks past the new one, so only every 16th new block writes one
 * (each write is a round trip in a convert's chain of them). Space reserved
 * and unused at a kill is a leak at the end of the file; close() gives it back.
 */
const RESERVE_BLOCKS = 16;
/** New blocks whose BAT entries may wait in memory for the next flush. */
const MAX_STAGED = 1024;
let zeroBuf: Uint8Array | null = null;
function zeros(n: number): Uint8Array {
  if (zeroBuf === null || zeroBuf.length < n) zeroBuf = new Uint8Array(Math.max(n, ZERO_CHUNK));
  return zeroBuf.subarray(0, n);
}

export class VhdWriter {
  private lock: Promise<void> = Promise.resolve();
  /** Where the next block goes: after every block and all metadata (the trailing footer's place, or before it). */
  private freeOffset: number;
  /**
   * From here to the trailing footer the file holds nothing (holes this
   * writer reserved); before it, unused space may hold what an interrupted
   * allocation or an old footer left.
   */
  private cleanFrom: number;
  /** Whether this writer has added a block (and so may have left reserved space before the footer). */
  private allocated = false;

  constructor(
    private readonly v: WritableVhd,
    freeOffset: number,
  ) {
    this.freeOffset = freeOffset;
    this.cleanFrom = v.file.size - FOOTER_SIZE;
  }

  /** Where the next new block would be put (for tests and check). */
  get nextBlockOffset(): number {
    return this.freeOffset;
  }

  /** Mutations run one at a time: a block allocation must not interleave with another. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.lock.then(fn);
    this.lock = p.then(
      () => undefined,
      () => undefined,
    );
    return p;
  }

  private checkRange(offset: number, length: number, op: string): void {
    if (offset < 0 || length < 0 || offset + length > this.v.size) {
      throw new BlockError(
        'invalid-argument',
        `${this.v.file.path}: ${op} of ${length} bytes at ${offset} is outside the disk (${this.v.size} bytes)`,
        {
          path: this.v.file.path,
          op,
        },
      );
    }
  }

  write(buf: Uint8Array, offset: number): Promise<void> {
    this.checkRange(offset, buf.length, 'write');
    return this.serial(async () => {
      const sp = this.v.sparse;
      if (sp === null) {
        await this.v.file.writeAt(buf, offset);
        return;
      }
      const bs = sp.header.blockSize;
      const end = offset + buf.length;
      let pos = offset;
      while (pos < end) {
        const b = Math.floor(pos / bs);
        const bEnd = Math.min((b + 1) * bs, end);
        await this.writeInBlock(sp, b, buf.subarray(pos - offset, bEnd - offset), pos);
        pos = bEnd;
      }
    });
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length, 'write-zeroes');
    return this.serial(async () => {
      const sp = this.v.sparse;
      const end = offset + length;
      if (sp === null) {
        for (let pos = offset; pos < end; pos += ZERO_CHUNK) await this.v.file.writeAt(zeros(Math.min(ZERO_CHUNK, end - pos)), pos);
        return;
      }
      const bs = sp.header.blockSize;
      let pos = offset;
      while (pos < end) {
        const b = Math.floor(pos / bs);
        const bEnd = Math.min((b + 1) * bs, end);
        const raw = await sp.bat.raw(b);
        // A block a dynamic disk does not have reads as zeros already; a differencing disk must
        // mask its parent, so there zeros are written (allocating) like any data, unless the
        // parent reads as zeros there too.
        if (raw !== BAT_UNUSED || (this.v.differencing && !(await this.v.parentZero(pos, bEnd - pos)))) {
          for (let p = pos; p < bEnd; p += ZERO_CHUNK) {
            const n = Math.min(ZERO_CHUNK, bEnd - p);
            await this.writeInBlock(sp, b, zeros(n), p);
          }
        }
        pos = bEnd;
      }
    });
  }

  /** Advisory: nothing is freed (a VHD cannot give a block back without moving others). */
  discard(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length, 'discard');
    return Promise.resolve();
  }

  flush(): Promise<void> {
    return this.serial(() => this.commit());
  }

  /**
   * Blocks and sectors durable first, then the bitmap changes and BAT entries that make them
   * part of the disk, then those too.
   */
  private async commit(): Promise<void> {
    await this.v.file.sync();
    const sp = this.v.sparse;
    if (sp === undefined || sp === null) return;
    const bitmapsWritten = await sp.bitmaps.writeDirty();
    const batPending = sp.bat.pendingCount > 0;
    if (batPending) await sp.bat.commit();
    if (bitmapsWritten || batPending) await this.v.file.sync();
  }

  /** Write `data` at guest `pos`, all inside block b. */
  private async writeInBlock(sp: VhdSparse, b: number, data: Uint8Array, pos: number): Promise<void> {
    const { header, bat, bitmaps } = sp;
    const bStart = b * header.blockSize;
    const rel = pos - bStart;
    const s0 = Math.floor(rel / SECTOR);
    const s1 = Math.ceil((rel + data.length) / SECTOR);
    const n = s1 - s0;
    let sectors: Uint8Array;
    if (rel % SECTOR === 0 && data.length % SECTOR === 0) sectors = data;
    else {
      // Read-modify-write of the partial first and last sectors, from whatever the chain has there.
      sectors = new Uint8Array(n * SECTOR);
      const first = bStart + s0 * SECTOR;
      const headPartial = rel % SECTOR !== 0;
      if (headPartial) await this.v.read(sectors.subarray(0, SECTOR), first);
      if ((rel + data.length) % SECTOR !== 0 && (n > 1 || !headPartial)) {
        const last = (n - 1) * SECTOR;
        await this.v.read(sectors.subarray(last, last + SECTOR), first + last);
      }
      sectors.set(data, rel - s0 * SECTOR);
    }
    // libvhdi (20210425) reads the sectors after a run of present ones up to the end of that
    // bitmap byte from the child: a differencing write ends on a whole byte of the bitmap (8
    // sectors, 4 KiB), the few sectors added read from the chain (the parent, unless already here).
    const s1x = this.v.differencing
      ? Math.min(Math.ceil(s1 / 8) * 8, header.sectorsPerBlock, Math.floor((this.v.size - bStart) / SECTOR))
      : s1;
    if (s1x > s1) {
      const grown = new Uint8Array((s1x - s0) * SECTOR);
      grown.set(sectors);
      await this.v.read(grown.subarray(n * SECTOR), bStart + s1 * SECTOR);
      sectors = grown;
    }
    const raw = await bat.raw(b);
    if (raw === BAT_UNUSED) {
      await this.allocate(sp, b, s0, sectors);
      return;
    }
    const bitmapOffset = raw * SECTOR;
    await this.v.file.writeAt(sectors, bitmapOffset + header.bitmapSize + s0 * SECTOR);
    const bitmap = await bitmaps.get(bitmapOffset);
    const count = sectors.length / SECTOR;
    const runs = bitRuns(bitmap, s0, count);
    if (runs.length !== 1 || runs[0]?.present !== true) {
      // The bitmap may say so only once the data is durable: a bit set over sectors the disk has
      // not stored yet would, after a power cut, show what was there (zeros) instead of the
      // parent's data. So the change is kept in memory (reads see it at once) and written at the
      // next flush, after an fdatasync, like the BAT entries of new blocks (qemu's qcow2 orders
      // its L2 updates after the data the same way, at flush time).
      setSectors(bitmap, s0, count, true);
      sp.bitmaps.markDirty(bitmapOffset, bitmap);
      if (sp.bitmaps.dirtyCount >= MAX_STAGED) await this.commit();
    }
  }

  /** §5.2: a new block at the end of the file, in crash-safe order (see the top of this file). */
  private async allocate(sp: VhdSparse, b: number, s0: number, sectors: Uint8Array): Promise<void> {
    const { header, bat, bitmaps } = sp;
    const file = this.v.file;
    const at = this.freeOffset;
    if (at / SECTOR >= BAT_UNUSED) {
      throw new BlockError('no-space', `${file.path}: no room for another block: VHD blocks must start below 2 TiB in the file`, {
        path: file.path,
        op: 'write',
      });
    }
    const blockBytes = header.bitmapSize + header.blockSize;
    const blockEnd = at + blockBytes;
    if (blockEnd + FOOTER_SIZE > file.size) {
      // A new trailing footer, RESERVE_BLOCKS blocks ahead: the next blocks go in before it without one.
      const reserve = Math.max(1, Math.min(RESERVE_BLOCKS, header.maxTableEntries - bat.allocated));
      await file.writeAt(this.v.footerBytes, at + reserve * blockBytes);
    }
    const bitmap = new Uint8Array(header.bitmapSize);
    if (this.v.differencing) setSectors(bitmap, s0, sectors.length / SECTOR, true);
    else bitmap.fill(0xff);
    let data = sectors;
    let dataAt = at + header.bitmapSize + s0 * SECTOR;
    if (at < this.cleanFrom && !this.v.differencing) {
      // Space an interrupted allocation may have written (or the old footer): a dynamic block reads
      // every sector of it, so the sectors not written now are written as zeros.
      const inDisk = Math.min(header.blockSize, this.v.size - b * header.blockSize);
      data = new Uint8Array(Math.max(inDisk, s0 * SECTOR + sectors.length));
      data.set(sectors, s0 * SECTOR);
      dataAt = at + header.bitmapSize;
    }
    // With a footer after the block, the bitmap (perhaps over the old footer) and the data go out together:
    // neither counts before the BAT entry does, so their order does not matter.
    await Promise.all([file.writeAt(bitmap, at), file.writeAt(data, dataAt)]);
    bat.stage(b, at / SECTOR);
    bitmaps.put(at, bitmap);
    this.freeOffset = blockEnd;
    this.cleanFrom = Math.max(this.cleanFrom, blockEnd);
    this.allocated = true;
    if (bat.pendingCount >= MAX_STAGED) await this.commit();
  }

  /**
   * At close: the trailing footer comes down to just after the last block
   * (written there first, then the file cut), so no reserved space is left,
   * nor any an interrupted allocation left and this writer reused.
   */
  close(): Promise<void> {
    return this.serial(async () => {
      await this.commit();
      const file = this.v.file;
      // Only after allocating: a disk opened and closed without new blocks is left as it was.
      if (!this.allocated || file.size <= this.freeOffset + FOOTER_SIZE) return;
      await file.writeAt(this.v.footerBytes, this.freeOffset);
      await file.sync();
      await file.truncate(this.freeOffset + FOOTER_SIZE);
    });
  }
}

/**
 * Where a new block goes in an open dynamic or differencing disk: after the
 * header, the BAT, every allocated block and every parent locator's data
 * (qemu's free_data_block_offset, which forgets the locators). Space after
 * that and before the trailing footer is what an interrupted allocation
 * left (nothing else lives in a VHD): it is reused.
 */
export function firstFreeOffset(sp: VhdSparse): number {
  let end = Math.max(sp.bat.endOfBlocks, sp.header.offset + 1024);
  for (const l of sp.header.locators) {
    if (l.dataLength > 0) end = Math.max(end, l.dataOffset + Math.max(l.dataLength, l.dataSpace >= SECTOR ? l.dataSpace : 0));
  }
  return Math.ceil(end / SECTOR) * SECTOR;
}
