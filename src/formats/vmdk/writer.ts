/**
 * Writing a VMDK disk in place (spec digest §3.1, §3.2, §5), as QEMU's
 * vmdk_pwritev does:
 *
 * - Flat extents are written in place.
 * - Hosted sparse extents: an allocated grain is written in place; a new
 *   grain is appended at the end of the file (rounded up to a grain), whole:
 *   the untouched part comes from the parent (unallocated grain of a delta
 *   disk) or is zeros. Then the grain table entries are written, in the
 *   primary table first and then in the redundant one. Ordering: data, then
 *   the entry that points at it, so a kill at any point leaves a readable
 *   disk (at worst an orphaned grain, or a redundant table one step behind).
 * - With zeroed-grain GTEs (flag bit 2), write-zeroes of whole grains set the
 *   entry to 1 in both tables and write no data.
 * - The first write after open changes the CID (a random one) in the
 *   descriptor, which is otherwise rewritten as it was (every ddb.* key, every
 *   comment): only the CID line changes, as QEMU's vmdk_write_cid does.
 * - uncleanShutdown: QEMU never sets it (it writes 0 at create and ignores it
 *   when reading); rblock does the same.
 */
import type { BlockDevice } from '../../block/device.js';
import { BlockError } from '../../block/errors.js';
import { isZero } from '../../block/zero.js';
import type { HostFile } from '../../block/file.js';
import { dataView } from '../../util/bytes.js';
import { Mutex } from '../../util/mutex.js';
import * as C from './constants.js';
import { serializeDescriptor, type VmdkDescriptor } from './descriptor.js';
import { FlatExtent, type VmdkExtent } from './extent.js';
import { SparseExtent } from './sparse.js';
import { randomCid } from './create.js';

/** What the writer needs of the layer. */
export interface WritableDisk {
  readonly path: string;
  readonly file: HostFile;
  readonly descriptor: VmdkDescriptor;
  readonly descriptorSource: { kind: 'embedded'; offset: number; reserved: number } | { kind: 'file'; size: number };
  readonly extents: VmdkExtent[];
  readonly backing: BlockDevice | null;
  readonly size: number;
}

/** Entries of a grain table changed in memory and not yet written: [lo, hi]. */
interface DirtyRange {
  lo: number;
  hi: number;
}

/** Per sparse extent: the other grain directory (kept in step), the next free grain, the tables to write back. */
interface SparseState {
  other: Uint32Array | null;
  nextGrain: number;
  /** By grain directory index, oldest first; the tables themselves are pinned in the extent. */
  dirty: Map<number, DirtyRange>;
}

/**
 * Grain tables whose new entries may wait in memory (2 KiB each at the
 * default 512 entries). Their grains are written first, so a kill before the
 * table is written back leaves only orphaned grains; writing each table once
 * (at a flush, or when more than this many wait) instead of after every
 * write took two thirds of the write calls of a convert out.
 */
const MAX_DIRTY_TABLES = 64;

const ZERO_CHUNK = 1 << 20;

export class VmdkWriter {
  private readonly lock = new Mutex();
  private cidUpdated = false;
  private readonly state = new Map<SparseExtent, SparseState>();

  private constructor(private readonly disk: WritableDisk) {}

  /** Check that every extent can be written, and load the redundant grain directories. */
  static async open(disk: WritableDisk): Promise<VmdkWriter> {
    const w = new VmdkWriter(disk);
    for (const x of disk.extents) {
      if (!(x instanceof SparseExtent)) continue;
      if (x.geometry.compressed) {
        throw new BlockError(
          'not-supported',
          `${disk.path}: writing into a streamOptimized (compressed) VMDK is not supported; open it read-only, or make a new one with convert -O vmdk -o subformat=streamOptimized`,
          { path: disk.path, op: 'open' },
        );
      }
      if (x.effective.version === 3) {
        throw new BlockError('not-supported', `${x.path}: VMDK version 3 must be read only (as QEMU)`, { path: x.path, op: 'open' });
      }
      w.state.set(x, { other: await loadOtherGd(x), nextGrain: 0, dirty: new Map() });
    }
    return w;
  }

  write(buf: Uint8Array, offset: number): Promise<void> {
    return this.lock.run(() =>
      this.each(offset, buf.length, (x, at, len) => this.writeExtent(x, at, buf.subarray(at - offset, at - offset + len))),
    );
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.lock.run(() => this.each(offset, length, (x, at, len) => this.writeExtent(x, at, null, len)));
  }

  flush(): Promise<void> {
    return this.lock.run(async () => {
      for (const [x, st] of this.state) await writeBack(x, st, 0);
      const files = new Set<HostFile>([this.disk.file]);
      for (const x of this.disk.extents) if (x.file !== null) files.add(x.file);
      for (const f of files) await f.sync();
    });
  }

  private async each(offset: number, length: number, fn: (x: VmdkExtent, at: number, len: number) => Promise<void>): Promise<void> {
    if (length === 0) return;
    await this.updateCid();
    const end = offset + length;
    for (const x of this.disk.extents) {
      const a = Math.max(offset, x.start);
      const b = Math.min(end, x.start + x.length);
      if (a >= b) continue;
      if (x.line !== null && x.line.access !== 'RW') {
        throw new BlockError('read-only', `${this.disk.path}: guest offset ${a} is in extent ${x.index}, which is ${x.line.access}`, {
          path: this.disk.path,
          op: 'write',
          offset: a,
        });
      }
      await fn(x, a, b - a);
    }
  }

  /** Write `data` (or `len` zero bytes when data is null) at guest `at`, inside extent x. */
  private async writeExtent(x: VmdkExtent, at: number, data: Uint8Array | null, len = data?.length ?? 0): Promise<void> {
    if (x instanceof FlatExtent) {
      const base = x.base + (at - x.start);
      if (data !== null) await x.file.writeAt(data, base);
      else {
        const z = new Uint8Array(Math.min(len, ZERO_CHUNK));
        for (let p = 0; p < len; p += z.length) await x.file.writeAt(z.subarray(0, Math.min(z.length, len - p)), base + p);
      }
      return;
    }
    if (x instanceof SparseExtent) return this.writeSparse(x, at - x.start, data, len);
    throw new BlockError('read-only', `${this.disk.path}: guest offset ${at} is in a ${x.kind} extent, which cannot be written`, {
      path: this.disk.path,
      op: 'write',
      offset: at,
    });
  }

  private async writeSparse(x: SparseExtent, pos: number, data: Uint8Array | null, len: number): Promise<void> {
    const geo = x.geometry;
    const st = this.state.get(x) as SparseState;
    const capBytes = geo.capacity * C.SECTOR;
    const end = Math.min(pos + len, capBytes);
    if (pos + len > capBytes && data !== null && !isZero(data.subarray(capBytes - pos))) {
      throw new BlockError('invalid-argument', `${x.path}: write past the end of the sparse extent (${capBytes} bytes)`, {
        path: x.path,
        op: 'write',
      });
    }
    const file = x.file;
    const gb = geo.grainBytes;
    let p = pos;
    while (p < end) {
      const gdi = Math.floor(p / geo.gtCoverage);
      const spanEnd = Math.min(end, (gdi + 1) * geo.gtCoverage);
      const gtSector = x.gd.entries[gdi] as number;
      if (gtSector === 0) {
        throw new BlockError(
          'not-supported',
          `${x.path}: grain directory entry ${gdi} has no grain table; rblock writes only into sparse extents whose grain tables are preallocated (as QEMU and VMware make them)`,
          { path: x.path, op: 'write', structure: 'grain directory' },
        );
      }
      const gt = await x.gt(gdi);
      let lo = Number.MAX_SAFE_INTEGER;
      let hi = -1;
      const setEntry = (i: number, v: number): void => {
        gt[i] = v;
        lo = Math.min(lo, i);
        hi = Math.max(hi, i);
      };
      // New grains of this table, appended in one write.
      if (st.nextGrain === 0) st.nextGrain = Math.ceil(file.size / gb) * gb;
      const newStart = st.nextGrain;
      const fresh: Uint8Array[] = [];
      while (p < spanEnd) {
        const gi = Math.floor(p / gb);
        const idx = gi % geo.gtes;
        const gStart = gi * gb;
        const gEnd = Math.min(gStart + gb, spanEnd);
        const a = p - gStart;
        const n = gEnd - p;
        const slice = data === null ? null : data.subarray(p - pos, p - pos + n);
        const gte = gt[idx] as number;
        const zeroGrain = gte === C.GTE_ZEROED && geo.zeroedGrains;
        const allocated = gte !== 0 && !zeroGrain;
        const whole = a === 0 && (n === gb || gStart + n >= capBytes);
        if (slice === null) {
          if (whole && geo.zeroedGrains) {
            if (!zeroGrain) setEntry(idx, C.GTE_ZEROED);
            p = gEnd;
            continue;
          }
          if (!allocated && (zeroGrain || this.disk.backing === null)) {
            p = gEnd; // reads as zeros already
            continue;
          }
        }
        if (allocated) {
          const host = gte * C.SECTOR + a;
          if (slice !== null) await file.writeAt(slice, host);
          else await file.writeAt(new Uint8Array(n), host);
        } else if (slice !== null && slice.length === gb) {
          // A whole new grain: written as it is.
          fresh.push(slice);
          setEntry(idx, st.nextGrain / C.SECTOR);
          st.nextGrain += gb;
        } else {
          const grain = new Uint8Array(gb);
          if (!whole || slice === null) {
            if (gte === 0 && this.disk.backing !== null) await readBelow(this.disk.backing, grain, x.start + gStart);
          }
          if (slice !== null) grain.set(slice, a);
          else grain.fill(0, a, a + n);
          const host = st.nextGrain;
          st.nextGrain += gb;
          fresh.push(grain);
          setEntry(idx, host / C.SECTOR);
        }
        p = gEnd;
      }
      // 1. the data of the new grains; 2. later (writeBack), the primary table, 3. the redundant one.
      if (fresh.length > 0) await writeJoined(file, fresh, newStart);
      if (hi >= lo) {
        x.pin(gdi, gt);
        const d = st.dirty.get(gdi);
        st.dirty.delete(gdi); // re-inserted as the newest
        st.dirty.set(gdi, d === undefined ? { lo, hi } : { lo: Math.min(d.lo, lo), hi: Math.max(d.hi, hi) });
        if (st.dirty.size > MAX_DIRTY_TABLES) await writeBack(x, st, MAX_DIRTY_TABLES / 2);
      }
    }
  }

  /** Change the CID on the first write after open (QEMU's vmdk_write_cid): only the CID line of the text changes. */
  private async updateCid(): Promise<void> {
    if (this.cidUpdated) return;
    this.cidUpdated = true;
    const d = this.disk.descriptor;
    const cid = randomCid();
    const re = /^([ \t]*CID[ \t]*=[ \t]*)("?)[0-9a-fA-F]+("?)/m;
    const text = re.test(d.text) ? d.text.replace(re, `$1$2${cid.toString(16)}$3`) : serializeDescriptor({ ...d, cid });
    const bytes = new TextEncoder().encode(text);
    const src = this.disk.descriptorSource;
    if (src.kind === 'embedded') {
      const old = new TextEncoder().encode(d.text).length;
      if (bytes.length > src.reserved) {
        throw new BlockError(
          'not-supported',
          `${this.disk.path}: the new descriptor does not fit the ${src.reserved} bytes reserved for it`,
          {
            path: this.disk.path,
            op: 'write',
          },
        );
      }
      const out = new Uint8Array(Math.max(old, bytes.length));
      out.set(bytes);
      await this.disk.file.writeAt(out, src.offset);
    } else {
      await this.disk.file.writeAt(bytes, 0);
      if (bytes.length < this.disk.file.size) await this.disk.file.truncate(bytes.length);
    }
    d.text = text;
    d.cid = cid;
  }
}

/**
 * Write back the changed grain tables of an extent, oldest first, until at
 * most `keep` wait: each in the primary table, then in the redundant one.
 */
async function writeBack(x: SparseExtent, st: SparseState, keep: number): Promise<void> {
  for (const [gdi, { lo, hi }] of st.dirty) {
    if (st.dirty.size <= keep) break;
    const gt = await x.gt(gdi);
    const bytes = new Uint8Array((hi - lo + 1) * 4);
    const dv = dataView(bytes);
    for (let i = lo; i <= hi; i++) dv.setUint32((i - lo) * 4, gt[i] as number, true);
    await x.file.writeAt(bytes, (x.gd.entries[gdi] as number) * C.SECTOR + lo * 4);
    const o = st.other?.[gdi] ?? 0;
    if (o !== 0) await x.file.writeAt(bytes, o * C.SECTOR + lo * 4);
    st.dirty.delete(gdi);
    x.unpin(gdi);
  }
}

/**
 * Write consecutive buffers at `at`: runs of them that are consecutive views
 * of one buffer (the whole grains of a long write) go out as that view, not
 * copied; the writes (a few: a partial grain at each end at most) run
 * together, as nothing points at the grains yet.
 */
async function writeJoined(file: HostFile, parts: Uint8Array[], at: number): Promise<void> {
  const writes: Promise<void>[] = [];
  let pos = at;
  for (let i = 0; i < parts.length;) {
    const first = parts[i] as Uint8Array;
    let end = first.byteOffset + first.length;
    let j = i + 1;
    while (j < parts.length) {
      const p = parts[j] as Uint8Array;
      if (p.buffer !== first.buffer || p.byteOffset !== end) break;
      end += p.length;
      j++;
    }
    const view = new Uint8Array(first.buffer, first.byteOffset, end - first.byteOffset);
    writes.push(file.writeAt(view, pos));
    pos += view.length;
    i = j;
  }
  await Promise.all(writes);
}

/** Guest bytes of the parent (zeros past its end). */
async function readBelow(b: BlockDevice, dst: Uint8Array, offset: number): Promise<void> {
  if (offset >= b.size) return;
  await b.pread(dst.subarray(0, Math.min(dst.length, b.size - offset)), offset);
}

/** The grain directory not in use (the redundant one, §3.1), when it exists and is sane. */
async function loadOtherGd(x: SparseExtent): Promise<Uint32Array | null> {
  const h = x.effective;
  if (x.gd.which !== 'primary' || (h.flags & C.FLAG_RGD) === 0 || h.rgdOffset === 0n) return null;
  const off = Number(h.rgdOffset) * C.SECTOR;
  const n = x.geometry.gdEntries;
  if (off + n * 4 > x.file.size) return null;
  const raw = new Uint8Array(n * 4);
  await x.file.readAt(raw, off);
  const dv = dataView(raw);
  const t = new Uint32Array(n);
  for (let i = 0; i < n; i++) {
    const e = dv.getUint32(i * 4, true);
    t[i] = e * C.SECTOR + x.geometry.gtes * 4 <= x.file.size ? e : 0;
  }
  return t;
}
