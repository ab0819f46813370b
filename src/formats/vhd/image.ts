/**
 * A VHD as one layer of a chain (spec digest §5.1): fixed disks map the
 * guest straight onto the file; dynamic and differencing disks go through
 * the BAT and each block's sector bitmap. Sectors this file does not hold
 * are 'unallocated': chain.ts reads them from the parent of a differencing
 * disk, or as zeros.
 */
import type { BlockDevice } from '../../block/device.js';
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import { layerOf, readLayered } from '../chain.js';
import type { ImageInfo, Layer, LayerRun } from '../layer.js';
import type { OpenContext } from '../registry.js';
import { Bat } from './bat.js';
import { bitRuns, SectorBitmaps } from './bitmap.js';
import {
  BAT_UNUSED,
  DISK_DIFFERENCING,
  DISK_DYNAMIC,
  DISK_FIXED,
  FOOTER_SIZE,
  MAX_SECTORS,
  SECTOR,
  formatUuid,
  vhdTime,
} from './constants.js';
import { describeFooter, diskTypeName, locateFooter, type LocatedFooter, type VhdFooter } from './footer.js';
import { chsSectors, decideSize, type SizeCalc, type SizeDecision } from './geometry.js';
import { readDynamicHeader, type DynamicHeader } from './header.js';
import { openParent, type OpenedParent } from './parent.js';
import { firstFreeOffset, VhdWriter } from './writer.js';

export type VhdKind = 'fixed' | 'dynamic' | 'differencing';

/** The dynamic part of a VHD: header, BAT, bitmaps. */
export interface VhdSparse {
  header: DynamicHeader;
  bat: Bat;
  bitmaps: SectorBitmaps;
}

/** Bytes of sector bitmaps one map() step reads at once (512 blocks' with 2 MiB blocks). */
const MAP_BATCH_BYTES = 256 << 10;

const numberOrString = (v: bigint): number | string => (v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v.toString());

export class VhdLayer implements Layer {
  readonly format = 'vpc';
  readonly readOnly: boolean;
  readonly path: string;
  readonly size: number;
  /** Present when opened with readOnly: false (writer.ts). */
  private writer: VhdWriter | null = null;

  private constructor(
    readonly file: HostFile,
    readonly located: LocatedFooter,
    readonly sizeDecision: SizeDecision,
    readonly sparse: VhdSparse | null,
    /** Parent of a differencing disk: the device (null when opened alone) and how it was found. */
    readonly parent: OpenedParent | null,
  ) {
    this.path = file.path;
    this.size = sizeDecision.size;
    this.readOnly = file.readOnly;
  }

  get footer(): VhdFooter {
    return this.located.footer;
  }

  get kind(): VhdKind {
    const t = this.footer.diskType;
    return t === DISK_FIXED ? 'fixed' : t === DISK_DYNAMIC ? 'dynamic' : 'differencing';
  }

  get backing(): BlockDevice | null {
    return this.parent?.device ?? null;
  }

  static async open(file: HostFile, ctx: OpenContext): Promise<VhdLayer> {
    const path = file.path;
    const located = await locateFooter(file);
    const f = located.footer;
    if (f.diskType !== DISK_FIXED && f.diskType !== DISK_DYNAMIC && f.diskType !== DISK_DIFFERENCING) {
      throw new BlockError(
        'unsupported-feature',
        `${path}: VHD footer field disk_type = ${f.diskType} (${diskTypeName(f.diskType)}) is not supported (only fixed, dynamic and differencing)`,
        {
          path,
          structure: 'VHD footer',
          field: 'disk_type',
          offset: f.offset + 60,
        },
      );
    }
    const force: SizeCalc | undefined = ctx.options.forceSizeCalc;
    const decision = decideSize(f, force);
    if (decision.size > MAX_SECTORS * SECTOR) {
      const field = decision.source === 'chs' ? 'disk_geometry' : 'current_size';
      throw new BlockError(
        'invalid-image',
        `${path}: VHD footer field ${field} gives a virtual size of ${decision.source === 'chs' ? decision.size : f.currentSize} bytes, more than the VHD maximum of 2040 GiB`,
        { path, structure: 'VHD footer', field },
      );
    }
    let sparse: VhdSparse | null = null;
    if (f.diskType === DISK_FIXED) {
      if (decision.size > located.dataEnd) {
        const other = decideSize(f, decision.source === 'chs' ? 'current_size' : 'chs');
        const hint = other.size <= located.dataEnd ? `; opening it with forceSizeCalc '${other.source}' gives ${other.size} bytes` : '';
        throw new BlockError(
          'corrupt-image',
          `${path}: VHD footer field ${decision.source === 'chs' ? 'disk_geometry' : 'current_size'} gives this fixed disk a virtual size of ${decision.size} bytes (${decision.reason}), but the file holds only ${located.dataEnd} bytes of data before its footer${hint}`,
          { path, structure: 'VHD footer', field: decision.source === 'chs' ? 'disk_geometry' : 'current_size' },
        );
      }
    } else {
      const header = await readDynamicHeader(file, f, decision.size);
      const bat = await Bat.load(file, header);
      sparse = { header, bat, bitmaps: new SectorBitmaps(file, header) };
    }
    let parent: OpenedParent | null = null;
    if (f.diskType === DISK_DIFFERENCING && sparse !== null) {
      parent = await openParent(file, sparse.header, ctx, (dev) => {
        const l = layerOf(dev);
        return l instanceof VhdLayer ? l.footer.uniqueId : null;
      });
    }
    const layer = new VhdLayer(file, located, decision, sparse, parent);
    if (!ctx.readOnly) {
      try {
        await layer.startWriting();
      } catch (e) {
        await parent?.device?.close();
        throw e;
      }
    }
    return layer;
  }

  private async startWriting(): Promise<void> {
    const f = this.footer;
    if (f.source === 'trailing (511-byte)') {
      throw new BlockError(
        'not-supported',
        `${this.path}: this fixed VHD has an old 511-byte footer (Virtual PC before 2004); writing to it is not supported, convert it first`,
        { path: this.path, op: 'open' },
      );
    }
    const footerBytes = new Uint8Array(FOOTER_SIZE);
    await this.file.readExact(footerBytes, f.offset, 'VHD footer');
    if (this.sparse !== null) {
      // Keep the footer copy at offset 0 in step with the footer in use (spec digest §5.3).
      const copy = new Uint8Array(FOOTER_SIZE);
      await this.file.readAt(copy, 0);
      if (Buffer.compare(Buffer.from(copy), Buffer.from(footerBytes)) !== 0) await this.file.writeAt(footerBytes, 0);
    }
    const free = this.sparse === null ? 0 : firstFreeOffset(this.sparse);
    this.writer = new VhdWriter(
      {
        file: this.file,
        size: this.size,
        sparse: this.sparse,
        differencing: this.kind === 'differencing',
        footerBytes,
        read: (buf, offset) => readLayered(this, buf, offset),
        parentZero: async (offset, length) => {
          const b = this.backing;
          const end = Math.min(offset + length, b?.size ?? 0);
          for (let pos = offset; b !== null && pos < end;) {
            const ext = await b.blockStatus(pos, end - pos);
            for (const e of ext) if (!e.zero) return false;
            const last = ext[ext.length - 1];
            if (last === undefined) return false;
            pos = last.offset + last.length;
          }
          return true;
        },
      },
      free,
    );
  }

  private w(op: string): VhdWriter {
    if (this.writer === null)
      throw new BlockError('read-only', `${this.path}: ${op} on an image opened read-only`, { path: this.path, op });
    return this.writer;
  }

  write(buf: Uint8Array, offset: number): Promise<void> {
    return this.w('write').write(buf, offset);
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.w('write-zeroes').writeZeroes(offset, length);
  }

  discard(offset: number, length: number): Promise<void> {
    return this.w('discard').discard(offset, length);
  }

  async flush(): Promise<void> {
    if (this.writer !== null) await this.writer.flush();
  }

  async map(offset: number, length: number): Promise<LayerRun[]> {
    const end = Math.min(offset + length, this.size);
    if (this.sparse === null) return [{ offset, length: end - offset, kind: 'data', hostOffset: offset, file: this.path }];
    const { header, bat, bitmaps } = this.sparse;
    const bs = header.blockSize;
    const runs: LayerRun[] = [];
    const push = (r: LayerRun): void => {
      const last = runs[runs.length - 1];
      if (
        last !== undefined &&
        last.kind === r.kind &&
        (last.hostOffset === undefined ? r.hostOffset === undefined : r.hostOffset === last.hostOffset + last.length)
      ) {
        last.length += r.length;
      } else runs.push(r);
    };
    let pos = offset;
    while (pos < end) {
      // The sector bitmaps of the allocated blocks of a batch are read all at once (one 512-byte read each,
      // through the cache): one after the other, their round trips were most of the time of a large map().
      // Batches bound the reads (and bitmaps) in flight whatever the length asked for.
      const first = Math.floor(pos / bs);
      const last = Math.min(Math.ceil(end / bs), first + Math.max(1, Math.floor(MAP_BATCH_BYTES / header.bitmapSize)));
      const batch: { raw: number; bitmap: Promise<Uint8Array> | null }[] = [];
      for (let b = first; b < last; b++) {
        const raw = await bat.raw(b);
        batch.push({ raw, bitmap: raw === BAT_UNUSED ? null : bitmaps.get(raw * SECTOR) });
      }
      const loaded = await Promise.all(batch.map((x) => x.bitmap));
      for (let b = first; b < last; b++) {
        const bStart = b * bs;
        const bEnd = Math.min(bStart + bs, end);
        const raw = (batch[b - first] as { raw: number }).raw;
        const bitmap = loaded[b - first] ?? null;
        if (bitmap === null) {
          push({ offset: pos, length: bEnd - pos, kind: 'unallocated' });
          pos = bEnd;
          continue;
        }
        const dataOffset = raw * SECTOR + header.bitmapSize;
        const s0 = Math.floor((pos - bStart) / SECTOR);
        const s1 = Math.ceil((bEnd - bStart) / SECTOR);
        for (const run of bitRuns(bitmap, s0, s1 - s0)) {
          const rs = Math.max(pos, bStart + run.start * SECTOR);
          const re = Math.min(bEnd, bStart + (run.start + run.count) * SECTOR);
          // Sectors not stored here still have their place in the block: like qcow2's unallocated
          // subclusters, the run keeps the host offset (layer.ts), which map reports.
          push({
            offset: rs,
            length: re - rs,
            kind: run.present ? 'data' : 'unallocated',
            hostOffset: dataOffset + (rs - bStart),
            file: this.path,
          });
        }
        pos = bEnd;
      }
    }
    return runs;
  }

  async readRun(buf: Uint8Array, run: LayerRun, offset: number): Promise<void> {
    await this.file.readAt(buf, (run.hostOffset as number) + (offset - run.offset));
  }

  /** Facts beyond qemu-img's fields, for `info`'s format-specific part. */
  details(): Record<string, unknown> {
    const f = this.footer;
    const g = f.geometry;
    const data: Record<string, unknown> = {
      'disk-type': diskTypeName(f.diskType),
      ...describeFooter(f),
      geometry: { cylinders: g.cylinders, heads: g.heads, 'sectors-per-track': g.sectorsPerTrack },
      'chs-size': chsSectors(g) * SECTOR,
      'current-size': numberOrString(f.currentSize),
      'original-size': numberOrString(f.originalSize),
      'size-from': this.sizeDecision.source,
      'size-reason': this.sizeDecision.reason,
      'saved-state': f.savedState !== 0,
      footer: `${f.source} at offset ${f.offset}`,
    };
    if (this.sparse !== null) {
      const h = this.sparse.header;
      data['block-size'] = h.blockSize;
      data['bat-offset'] = h.tableOffset;
      data['max-table-entries'] = h.maxTableEntries;
      data['allocated-blocks'] = this.sparse.bat.allocated;
    }
    if (this.parent !== null && this.sparse !== null) {
      const h = this.sparse.header;
      const parent: Record<string, unknown> = {
        uuid: formatUuid(h.parentUuid),
        timestamp: vhdTime(h.parentTimestamp),
        name: h.parentName,
      };
      if (this.parent.link !== null) {
        parent['path'] = this.parent.link.path;
        parent['found-by'] = this.parent.link.from;
      }
      parent['locators'] = this.parent.decoded.map((d) => ({
        platform: d.entry.platform,
        ...(d.text !== null ? { path: d.text } : {}),
        ...(d.problem !== undefined ? { problem: d.problem } : {}),
      }));
      data['parent'] = parent;
    }
    if (this.located.notes.length > 0) data['notes'] = [...this.located.notes];
    return data;
  }

  async info(): Promise<ImageInfo> {
    const info: ImageInfo = { 'virtual-size': this.size, filename: this.path } as ImageInfo;
    if (this.sparse !== null) info['cluster-size'] = this.sparse.header.blockSize;
    info.format = 'vpc';
    info['actual-size'] = await this.file.allocatedBytes();
    const link = this.parent?.link ?? null;
    if (link !== null) {
      info['backing-filename'] = link.name;
      info['full-backing-filename'] = link.path;
      info['backing-filename-format'] = 'vpc';
    }
    info['format-specific'] = { type: 'vpc', data: this.details() };
    info['dirty-flag'] = false;
    return info;
  }

  async close(): Promise<void> {
    if (this.writer !== null) await this.writer.close();
    this.sparse?.bat.clear();
    this.sparse?.bitmaps.clear();
    await this.file.close();
  }
}
