/**
 * A hosted sparse extent (spec digest §2-§4): the KDMV header, the grain
 * directory (GD) and grain tables (GT), and the mapping they describe.
 *
 *   GD[s / gt_coverage] -> sector of a GT
 *   GT[(s / grain) % numGTEsPerGT] -> 0 unallocated | 1 zero grain (flag bit 2) | sector of the grain
 *
 * streamOptimized extents (§4) are sparse extents whose grains are
 * compressed behind grain markers; their GD may be found through the footer
 * (GD_AT_END). A damaged primary GD falls back to the redundant one (§3.1).
 */
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import { LruCache } from '../../util/lru.js';
import * as C from './constants.js';
import type { ExtentLine } from './descriptor.js';
import type { VmdkExtent, VmdkExtentInfo, VmdkRun } from './extent.js';
import { hasKdmvMagic, parseSparseHeader, validateSparseHeader, type SparseGeometry, type SparseHeader } from './header.js';
import { readCompressedGrain, readFooter } from './stream.js';

/** Grain tables kept in memory (2 KiB each at the default 512 entries). */
const GT_CACHE_ENTRIES = 512;
/** Decompressed grains kept in memory, in bytes. */
const GRAIN_CACHE_BYTES = 4 << 20;

export interface GrainDirectory {
  /** Which copy is in use. */
  which: 'primary' | 'redundant';
  /** Byte offset in the file. */
  offset: number;
  entries: Uint32Array;
}

export interface SparseOpenOptions {
  index: number;
  /** The descriptor line naming this file, or null when the file was opened directly. */
  line: ExtentLine | null;
  /** Guest offset of the extent's first byte. */
  start: number;
  /** Guest bytes the descriptor gives the extent (default: the header's capacity). */
  length?: number;
  /** Close the file with the extent (false when the layer owns it). */
  ownsFile: boolean;
}

function u32Table(bytes: Uint8Array): Uint32Array {
  const t = new Uint32Array(bytes.length >>> 2);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < t.length; i++) t[i] = dv.getUint32(i * 4, true);
  return t;
}

export class SparseExtent implements VmdkExtent {
  readonly kind = 'sparse';
  private readonly gtCache = new LruCache<number, Uint32Array>(GT_CACHE_ENTRIES);
  private readonly grainCache: LruCache<number, Uint8Array>;
  private readonly capacityBytes: number;

  private constructor(
    readonly file: HostFile,
    private readonly ownsFile: boolean,
    readonly index: number,
    readonly line: ExtentLine | null,
    readonly start: number,
    readonly length: number,
    /** The header in sector 0. */
    readonly header: SparseHeader,
    /** The footer, when the header says GD_AT_END, and where it is. */
    readonly footer: { header: SparseHeader; offset: number } | null,
    readonly geometry: SparseGeometry,
    readonly gd: GrainDirectory,
    /** Why the primary GD was not used, when the redundant one is. */
    readonly gdDamage: string | null,
  ) {
    this.capacityBytes = geometry.capacity * C.SECTOR;
    this.grainCache = new LruCache(Math.max(2, Math.floor(GRAIN_CACHE_BYTES / geometry.grainBytes)));
  }

  get path(): string {
    return this.file.path;
  }

  /** The header that describes the extent: the footer when the GD is at the end (§4.3). */
  get effective(): SparseHeader {
    return this.footer?.header ?? this.header;
  }

  static async open(file: HostFile, o: SparseOpenOptions): Promise<SparseExtent> {
    const path = file.path;
    const sector0 = new Uint8Array(C.HEADER_SIZE);
    if (file.size < C.HEADER_SIZE) {
      throw new BlockError('invalid-image', `${path}: too small (${file.size} bytes) for a VMDK sparse extent header`, {
        path,
        structure: 'sparse header',
      });
    }
    await file.readAt(sector0, 0);
    if (!hasKdmvMagic(sector0)) {
      throw new BlockError('invalid-image', `${path}: not a hosted sparse extent (no KDMV magic at offset 0)`, {
        path,
        structure: 'sparse header',
        field: 'magicNumber',
      });
    }
    const header = parseSparseHeader(sector0);
    let footer: { header: SparseHeader; offset: number } | null = null;
    if (header.gdOffset === C.GD_AT_END) {
      const f = await readFooter(file);
      footer = { header: f.footer, offset: f.offset };
      if (f.footer.gdOffset === C.GD_AT_END) {
        throw new BlockError(
          'corrupt-image',
          `${path}: the streamOptimized footer also says GD_AT_END; the grain directory cannot be found`,
          {
            path,
            structure: 'streamOptimized footer',
            field: 'gdOffset',
          },
        );
      }
    }
    const eff = footer?.header ?? header;
    const geo = validateSparseHeader(eff, path, footer !== null ? 'streamOptimized footer' : 'sparse header');
    const { gd, damage } = await loadGrainDirectory(file, eff, geo);
    const capBytes = geo.capacity * C.SECTOR;
    return new SparseExtent(file, o.ownsFile, o.index, o.line, o.start, o.length ?? capBytes, header, footer, geo, gd, damage);
  }

  /**
   * Grain tables the writer has changed and not yet written back (writer.ts):
   * lookups see them, and the cache cannot drop them before they are written.
   */
  private readonly pinned = new Map<number, Uint32Array>();

  /** Keep table i (changed in memory) until unpin. */
  pin(i: number, gt: Uint32Array): void {
    this.pinned.set(i, gt);
  }

  /** Table i is written back: the cache serves it from now on. */
  unpin(i: number): void {
    const gt = this.pinned.get(i);
    if (gt === undefined) return;
    this.pinned.delete(i);
    this.gtCache.delete(i);
    void this.gtCache.get(i, () => Promise.resolve(gt));
  }

  /** Grain table number `i` of the directory in use, via the bounded cache. */
  gt(i: number): Promise<Uint32Array> {
    const p = this.pinned.get(i);
    if (p !== undefined) return Promise.resolve(p);
    return this.gtCache.get(i, async () => {
      const bytes = new Uint8Array(this.geometry.gtes * 4);
      await this.file.readAt(bytes, (this.gd.entries[i] as number) * C.SECTOR);
      return u32Table(bytes);
    });
  }

  async map(offset: number, length: number): Promise<VmdkRun[]> {
    const geo = this.geometry;
    const runs: VmdkRun[] = [];
    const push = (r: VmdkRun): void => {
      const last = runs[runs.length - 1];
      if (
        last !== undefined &&
        last.kind === r.kind &&
        r.kind !== 'compressed' &&
        (last.hostOffset === undefined ? r.hostOffset === undefined : r.hostOffset === last.hostOffset + last.length)
      ) {
        last.length += r.length;
      } else runs.push(r);
    };
    const end = offset + length - this.start;
    let pos = offset - this.start;
    while (pos < end) {
      if (pos >= this.capacityBytes) {
        // The descriptor gives the extent more sectors than its header: nothing is stored there.
        push({ offset: this.start + pos, length: end - pos, kind: 'unallocated', extent: this.index });
        break;
      }
      const gdi = Math.floor(pos / geo.gtCoverage);
      const spanEnd = Math.min(end, (gdi + 1) * geo.gtCoverage, this.capacityBytes);
      if (this.gd.entries[gdi] === 0) {
        push({ offset: this.start + pos, length: spanEnd - pos, kind: 'unallocated', extent: this.index });
        pos = spanEnd;
        continue;
      }
      const gt = await this.gt(gdi);
      while (pos < spanEnd) {
        const gi = Math.floor(pos / geo.grainBytes);
        const gStart = gi * geo.grainBytes;
        const gEnd = Math.min(gStart + geo.grainBytes, spanEnd);
        const n = gEnd - pos;
        const gte = gt[gi % geo.gtes] as number;
        const at = this.start + pos;
        if (gte === 0) push({ offset: at, length: n, kind: 'unallocated', extent: this.index });
        else if (gte === C.GTE_ZEROED && geo.zeroedGrains) push({ offset: at, length: n, kind: 'zero', extent: this.index });
        else {
          const host = gte * C.SECTOR;
          if (host >= this.file.size) {
            throw new BlockError(
              'corrupt-image',
              `${this.path}: grain table ${gdi} entry ${gi % geo.gtes} (guest offset ${this.start + gStart}) points to sector ${gte}, past the end of the file (${this.file.size} bytes)`,
              { path: this.path, structure: 'grain table', offset: (this.gd.entries[gdi] as number) * C.SECTOR + (gi % geo.gtes) * 4 },
            );
          }
          if (geo.compressed) {
            push({ offset: at, length: n, kind: 'compressed', extent: this.index, grainStart: this.start + gStart, grainHost: host });
          } else push({ offset: at, length: n, kind: 'data', hostOffset: host + (pos - gStart), file: this.path, extent: this.index });
        }
        pos = gEnd;
      }
    }
    return runs;
  }

  async read(buf: Uint8Array, run: VmdkRun, offset: number): Promise<void> {
    if (run.kind === 'data') {
      await this.file.readAt(buf, (run.hostOffset as number) + (offset - run.offset));
      return;
    }
    const gStart = run.grainStart as number;
    const host = run.grainHost as number;
    const geo = this.geometry;
    const want = Math.min(geo.grainBytes, this.capacityBytes - (gStart - this.start));
    const grain = await this.grainCache.get(host, () => readCompressedGrain(this.file, host, geo.grainBytes, geo.markers, want));
    buf.set(grain.subarray(offset - gStart, offset - gStart + buf.length));
  }

  info(): VmdkExtentInfo {
    // qemu's key order; `format` is the descriptor's extent type, "" for a file opened directly.
    return {
      ...(this.geometry.compressed ? { compressed: true } : {}),
      'virtual-size': this.length,
      filename: this.path,
      'cluster-size': this.geometry.grainBytes,
      format: this.line?.type ?? '',
    };
  }

  async close(): Promise<void> {
    this.gtCache.clear();
    this.pinned.clear();
    this.grainCache.clear();
    if (this.ownsFile) await this.file.close();
  }
}

/**
 * Read the GD the header names and check it (§3): it must lie inside the
 * file, and so must every grain table it points to. When it does not and a
 * redundant GD exists (flag bit 1), that one is used instead (§3.1).
 */
async function loadGrainDirectory(
  file: HostFile,
  h: SparseHeader,
  geo: SparseGeometry,
): Promise<{ gd: GrainDirectory; damage: string | null }> {
  const path = file.path;
  const tableBytes = geo.gtes * 4;
  const load = async (sector: bigint, which: 'primary' | 'redundant'): Promise<GrainDirectory | string> => {
    const bytes = geo.gdEntries * 4;
    if (sector === 0n) return `the ${which} grain directory offset is 0`;
    const off = sector * BigInt(C.SECTOR);
    if (off + BigInt(bytes) > BigInt(file.size)) {
      return `the ${which} grain directory at offset ${off} (${geo.gdEntries} entries) is beyond the end of the file (${file.size} bytes)`;
    }
    const raw = new Uint8Array(bytes);
    await file.readAt(raw, Number(off));
    const entries = u32Table(raw);
    for (let i = 0; i < entries.length; i++) {
      const e = entries[i] as number;
      if (e !== 0 && e * C.SECTOR + tableBytes > file.size) {
        return `${which} grain directory entry ${i} points to a grain table at sector ${e}, past the end of the file (${file.size} bytes)`;
      }
    }
    return { which, offset: Number(off), entries };
  };
  const primary = await load(h.gdOffset, 'primary');
  if (typeof primary !== 'string') return { gd: primary, damage: null };
  if ((h.flags & C.FLAG_RGD) !== 0 && h.rgdOffset !== 0n) {
    const redundant = await load(h.rgdOffset, 'redundant');
    if (typeof redundant !== 'string') return { gd: redundant, damage: primary };
    throw new BlockError('corrupt-image', `${path}: ${primary}, and ${redundant}`, {
      path,
      structure: 'grain directory',
      field: 'gdOffset',
    });
  }
  throw new BlockError('corrupt-image', `${path}: ${primary}; the image is corrupt or truncated`, {
    path,
    structure: 'grain directory',
    field: 'gdOffset',
  });
}
