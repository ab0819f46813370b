/**
 * `rblock check [-r leaks|all]` for VMDK (spec digest §3, §1.2), with
 * qemu-img check's counters and exit codes. QEMU's own vmdk check only finds
 * grains that point past the end of their file; rblock also reports:
 *
 * - corruptions: grain tables or grains past the end of the file, grain
 *   tables or grains overlapping each other or the header, descriptor or
 *   grain directories, a redundant grain table that differs from the primary
 *   one, a primary grain directory damaged (the redundant one is in use), a
 *   delta disk whose parentCID is not its parent's CID or whose parent is
 *   missing;
 * - leaks: grains of an uncompressed sparse extent that no grain table entry
 *   points at (what a write killed between its data and its table update
 *   leaves).
 *
 * Repairs are the safe ones: `-r leaks` cuts leaked grains off the end of
 * the file; `-r all` also copies the primary grain tables over differing
 * redundant ones. Nothing that points at data in the table in use is changed.
 * Like QEMU, the human report has no allocation line for VMDK.
 */
import { BlockError } from '../../block/errors.js';
import { HostFile } from '../../block/file.js';
import { dataView } from '../../util/bytes.js';
import { layerOf, resolveRelative } from '../chain.js';
import { emptyCounts, type CheckOutcome, type ImageCheck, type RepairMode } from '../qcow2/check.js';
import { openImage } from '../registry.js';
import * as C from './constants.js';
import { VmdkLayer } from './image.js';
import { SparseExtent } from './sparse.js';
import { runCheck, type CheckPass } from '../check-runner.js';

export interface VmdkCheckOptions {
  repair?: RepairMode;
  log?: (line: string) => void;
}

type Pass = CheckPass;

interface Range {
  start: number;
  end: number;
  what: string;
}

const hex = (n: number): string => (n >>> 0).toString(16);

function u32s(b: Uint8Array): Uint32Array {
  const dv = dataView(b);
  const t = new Uint32Array(b.length >>> 2);
  for (let i = 0; i < t.length; i++) t[i] = dv.getUint32(i * 4, true);
  return t;
}

async function checkExtent(
  x: SparseExtent,
  c: ImageCheck,
  repair: RepairMode | undefined,
  log: (l: string) => void,
): Promise<{ fixedCorruptions: number; fixedLeaks: number }> {
  let fixedCorruptions = 0;
  let fixedLeaks = 0;
  const geo = x.geometry;
  const h = x.effective;
  const path = x.path;
  const size = x.file.size;
  const gtBytes = Math.ceil((geo.gtes * 4) / C.SECTOR) * C.SECTOR;
  const gdBytes = Math.ceil((geo.gdEntries * 4) / C.SECTOR) * C.SECTOR;
  const corrupt = (msg: string): void => {
    c.corruptions++;
    log(`ERROR: ${path}: ${msg}`);
  };
  if (x.gdDamage !== null) corrupt(`the primary grain directory is damaged (${x.gdDamage}); the redundant one is in use`);

  const meta: Range[] = [{ start: 0, end: C.HEADER_SIZE, what: 'the header' }];
  if (h.descriptorOffset !== 0n) {
    const s = Number(h.descriptorOffset) * C.SECTOR;
    meta.push({ start: s, end: s + Number(h.descriptorSize) * C.SECTOR, what: 'the embedded descriptor' });
  }
  meta.push({ start: x.gd.offset, end: x.gd.offset + gdBytes, what: `the ${x.gd.which} grain directory` });
  // The other directory (redundant, or primary when the redundant one is in use) and its tables.
  let other: Uint32Array | null = null;
  const otherSector = x.gd.which === 'primary' ? ((h.flags & C.FLAG_RGD) !== 0 ? Number(h.rgdOffset) : 0) : Number(h.gdOffset);
  if (otherSector !== 0 && !geo.compressed && otherSector * C.SECTOR + gdBytes <= size) {
    const raw = new Uint8Array(geo.gdEntries * 4);
    await x.file.readAt(raw, otherSector * C.SECTOR);
    other = u32s(raw);
    meta.push({ start: otherSector * C.SECTOR, end: otherSector * C.SECTOR + gdBytes, what: 'the other grain directory' });
  }
  const tables: Range[] = [];
  for (let i = 0; i < geo.gdEntries; i++) {
    const e = x.gd.entries[i] as number;
    if (e !== 0) tables.push({ start: e * C.SECTOR, end: e * C.SECTOR + gtBytes, what: `grain table ${i}` });
    const o = other?.[i] ?? 0;
    if (o !== 0) {
      if (o * C.SECTOR + gtBytes > size) corrupt(`the other copy of grain table ${i} (sector ${o}) is past the end of the file`);
      else tables.push({ start: o * C.SECTOR, end: o * C.SECTOR + gtBytes, what: `the other copy of grain table ${i}` });
    }
  }
  const grains: Range[] = [];
  const grainBytes = geo.grainBytes;
  for (let i = 0; i < geo.gdEntries; i++) {
    if ((x.gd.entries[i] as number) === 0) continue;
    const gt = await x.gt(i);
    for (let j = 0; j < gt.length; j++) {
      const g = gt[j] as number;
      if (g === 0 || (g === C.GTE_ZEROED && geo.zeroedGrains)) continue;
      const sector = (i * geo.gtes + j) * geo.grainSectors;
      if (sector >= geo.capacity) continue;
      const off = g * C.SECTOR;
      if (off >= size) {
        // QEMU's message.
        corrupt(`cluster offset for sector ${sector} points after EOF`);
        continue;
      }
      if (!geo.compressed) grains.push({ start: off, end: off + grainBytes, what: `the grain of sector ${sector}` });
    }
    const o = other?.[i] ?? 0;
    if (o !== 0 && o * C.SECTOR + gtBytes <= size) {
      const raw = new Uint8Array(geo.gtes * 4);
      await x.file.readAt(raw, o * C.SECTOR);
      const copy = u32s(raw);
      let diff = 0;
      for (let j = 0; j < gt.length; j++) if (copy[j] !== gt[j]) diff++;
      if (diff > 0) {
        corrupt(`the other copy of grain table ${i} differs from the one in use in ${diff} entries`);
        if (repair === 'all') {
          const b = new Uint8Array(geo.gtes * 4);
          const dv = dataView(b);
          for (let j = 0; j < gt.length; j++) dv.setUint32(j * 4, gt[j] as number, true);
          await x.file.writeAt(b, o * C.SECTOR);
          fixedCorruptions++;
        }
      }
    }
  }
  // Overlaps: every structure against every other, after sorting.
  const all = [...meta, ...tables, ...grains].sort((a, b) => a.start - b.start || a.end - b.end);
  let reach: Range | null = null;
  for (const r of all) {
    if (reach !== null && r.start < reach.end) corrupt(`${r.what} (offset 0x${hex(r.start)}) overlaps ${reach.what}`);
    if (reach === null || r.end > reach.end) reach = r;
  }
  // Leaks: whole grains past the metadata that nothing points at (uncompressed extents).
  if (!geo.compressed) {
    const first = Number(h.overHead) * C.SECTOR;
    const leaked: number[] = [];
    // One sweep: a slot is in use when some structure starting before its end reaches past its start.
    let k = 0;
    let reachEnd = 0;
    for (let off = first; off < size; off += grainBytes) {
      while (k < all.length && (all[k] as Range).start < off + grainBytes) reachEnd = Math.max(reachEnd, (all[k++] as Range).end);
      if (reachEnd <= off) leaked.push(off);
    }
    for (const off of leaked) log(`Leaked grain at offset 0x${hex(off)} in ${path}`);
    c.leaks += leaked.length;
    if (repair !== undefined && leaked.length > 0) {
      // Only the leaked grains at the very end can go: cut the file after the last structure.
      const end = all.reduce((m, r) => Math.max(m, r.end), first);
      const cut = Math.ceil(end / grainBytes) * grainBytes;
      const n = leaked.filter((off) => off >= cut).length;
      if (n > 0) {
        await x.file.truncate(cut);
        fixedLeaks += n;
      }
    }
  }
  return { fixedCorruptions, fixedLeaks };
}

async function pass(path: string, repair: RepairMode | undefined, log: (l: string) => void): Promise<Pass> {
  const c: ImageCheck = {
    filename: path,
    format: 'vmdk',
    ...emptyCounts(),
  };
  let fixedCorruptions = 0;
  let fixedLeaks = 0;
  // Opened without its parent: a broken chain is a finding, not a failure to open.
  await using dev = await openImage(path, { format: 'vmdk', backing: null });
  const layer = layerOf(dev);
  if (!(layer instanceof VmdkLayer)) throw new BlockError('invalid-image', `${path}: not a VMDK image`, { path });
  for (const x of layer.extents) {
    if (!(x instanceof SparseExtent)) continue;
    // Repairs write through a handle of their own.
    const file = repair !== undefined ? await HostFile.open(x.path, false) : null;
    try {
      const target = file !== null ? await SparseExtent.open(file, { index: x.index, line: x.line, start: x.start, ownsFile: false }) : x;
      const r = await checkExtent(target, c, repair, log);
      fixedCorruptions += r.fixedCorruptions;
      fixedLeaks += r.fixedLeaks;
    } finally {
      await file?.close();
    }
  }
  const hint = layer.descriptor.parentFileNameHint;
  if (hint !== null) {
    const ppath = resolveRelative(path, hint);
    try {
      await using p = await openImage(ppath, { format: 'vmdk', backing: null });
      const parent = layerOf(p);
      if (parent instanceof VmdkLayer && parent.cid !== layer.parentCid) {
        c.corruptions++;
        log(
          `ERROR: ${path}: parentCID ${hex(layer.parentCid)} is not the CID ${hex(parent.cid)} of the parent ${ppath}: the CID chain is broken`,
        );
      }
    } catch (e) {
      if (!(e instanceof BlockError)) throw e;
      c.corruptions++;
      log(`ERROR: ${path}: the parent ${ppath} cannot be opened: ${e.message}`);
    }
  }
  return { check: c, fixedCorruptions, fixedLeaks };
}

/** Check (and with `repair`, fix what is safe, then check again, as qemu-img does). */
export function checkVmdk(path: string, o: VmdkCheckOptions = {}): Promise<CheckOutcome> {
  return runCheck(pass, path, o.repair, o.log ?? ((): void => {}));
}
