/**
 * A VMDK disk as one layer of a chain (spec digest §1, §8): the descriptor
 * (a text file, or embedded in a hosted sparse extent), the extents it names
 * laid end to end, and the parent of a delta disk (parentFileNameHint, with
 * parentCID checked against the parent's CID). chain.ts does the falling
 * through to the parent.
 */
import type { BlockDevice } from '../../block/device.js';
import { BlockError } from '../../block/errors.js';
import { HostFile } from '../../block/file.js';
import { layerOf, resolveRelative } from '../chain.js';
import type { ImageInfo, Layer, LayerRun } from '../layer.js';
import type { OpenContext } from '../registry.js';
import * as C from './constants.js';
import { descriptorText, NO_PARENT_CID, parseDescriptor, type ExtentLine, type VmdkDescriptor } from './descriptor.js';
import { FlatExtent, NoAccessExtent, ZeroExtent, type VmdkExtent, type VmdkRun } from './extent.js';
import { hasKdmvMagic, parseSparseHeader } from './header.js';
import { probeVmdk } from './probe.js';
import { SparseExtent } from './sparse.js';
import { VmdkWriter } from './writer.js';

/** Where the descriptor text came from. */
export type DescriptorSource = { kind: 'embedded'; offset: number; reserved: number } | { kind: 'file'; size: number };

const hex8 = (n: number): string => (n >>> 0).toString(16).padStart(8, '0');

function ascii4(b: Uint8Array): string {
  return String.fromCharCode(...b.subarray(0, 4));
}

/** Refusals for the kinds of VMDK extent rblock does not read (§6, §7). */
function unsupportedExtent(path: string, what: string): BlockError {
  return new BlockError(
    'unsupported-feature',
    `${path}: ${what}; rblock reads hosted sparse, streamOptimized, flat and VMFS extents only`,
    {
      path,
      structure: 'VMDK extent',
    },
  );
}

/** Refuse COWD (vmfsSparse) and seSparse files by their magic. */
export function refuseOtherSparse(head: Uint8Array, path: string): void {
  if (ascii4(head) === C.COWD) throw unsupportedExtent(path, 'this is an ESX vmfsSparse (COWD) extent, which is not supported');
  if (head.length >= 8 && new DataView(head.buffer, head.byteOffset, 8).getBigUint64(0, true) === C.SESPARSE_MAGIC) {
    throw unsupportedExtent(path, 'this is an ESXi seSparse extent, which is not supported');
  }
}

async function readEmbeddedDescriptor(
  file: HostFile,
  sector: bigint,
  sectors: bigint,
): Promise<{ text: string; offset: number; reserved: number } | null> {
  if (sector === 0n || sectors === 0n) return null;
  const off = sector * BigInt(C.SECTOR);
  if (off >= BigInt(file.size)) {
    throw new BlockError(
      'corrupt-image',
      `${file.path}: the embedded descriptor at offset ${off} is beyond the end of the file (${file.size} bytes)`,
      {
        path: file.path,
        structure: 'sparse header',
        field: 'descriptorOffset',
      },
    );
  }
  const reserved = sectors * BigInt(C.SECTOR);
  // Bounded: a descriptor is a few hundred bytes; never allocate what a header field claims.
  const n = Math.min(
    Number(reserved < BigInt(C.MAX_DESCRIPTOR_BYTES) ? reserved : BigInt(C.MAX_DESCRIPTOR_BYTES)),
    file.size - Number(off),
  );
  const bytes = new Uint8Array(n);
  await file.readAt(bytes, Number(off));
  const text = descriptorText(bytes);
  return text.trim() === ''
    ? null
    : { text, offset: Number(off), reserved: Number(reserved < BigInt(Number.MAX_SAFE_INTEGER) ? reserved : 0n) };
}

async function openExtentFile(descPath: string, line: ExtentLine, readOnly: boolean): Promise<HostFile> {
  const name = line.file as string;
  const p = resolveRelative(descPath, name);
  try {
    return await HostFile.open(p, readOnly || line.access !== 'RW');
  } catch (e) {
    if (e instanceof BlockError && e.kind === 'not-found') {
      throw new BlockError(
        'not-found',
        `${descPath}: extent file "${name}" (descriptor line ${line.line}) not found (looked for ${p})`,
        { path: descPath, structure: 'extent file' },
        e,
      );
    }
    throw e;
  }
}

/** Open the extents a descriptor names, in order, laid end to end (§1.3). */
async function openExtents(desc: VmdkDescriptor, descPath: string, readOnly: boolean): Promise<VmdkExtent[]> {
  const out: VmdkExtent[] = [];
  let start = 0;
  try {
    for (const [index, line] of desc.extents.entries()) {
      const length = line.sectors * C.SECTOR;
      if (!Number.isSafeInteger(start + length)) {
        throw new BlockError('invalid-image', `${descPath}: the extents add up to more than ${Number.MAX_SAFE_INTEGER} bytes`, {
          path: descPath,
        });
      }
      const where = `extent ${index} (descriptor line ${line.line})`;
      if (line.access === 'NOACCESS') out.push(new NoAccessExtent(index, line, start, length, descPath));
      else if (line.type === 'ZERO') out.push(new ZeroExtent(index, line, start, length));
      else if (line.type === 'FLAT' || line.type === 'VMFS') {
        const f = await openExtentFile(descPath, line, readOnly);
        out.push(new FlatExtent(index, line, start, length, f, (line.offset ?? 0) * C.SECTOR));
      } else if (line.type === 'SPARSE') {
        const f = await openExtentFile(descPath, line, readOnly);
        try {
          const head = new Uint8Array(Math.min(8, f.size));
          await f.readAt(head, 0);
          refuseOtherSparse(head, f.path);
          out.push(await SparseExtent.open(f, { index, line, start, length, ownsFile: true }));
        } catch (e) {
          await f.close();
          throw e;
        }
      } else if (line.type === 'VMFSSPARSE')
        throw unsupportedExtent(descPath, `${where} is an ESX vmfsSparse (COWD) delta extent, which is not supported`);
      else if (line.type === 'SESPARSE') throw unsupportedExtent(descPath, `${where} is an ESXi seSparse extent, which is not supported`);
      else throw unsupportedExtent(descPath, `${where} is a raw device mapping (${line.type}), which is not supported`);
      start += length;
    }
  } catch (e) {
    await Promise.allSettled(out.map((x) => x.close()));
    throw e;
  }
  return out;
}

export class VmdkLayer implements Layer {
  readonly format = 'vmdk';
  readonly size: number;
  private readonly starts: number[];
  private writer: VmdkWriter | null = null;

  private constructor(
    /** The file that was opened: a text descriptor or a hosted sparse extent. */
    readonly file: HostFile,
    readonly descriptor: VmdkDescriptor,
    readonly descriptorSource: DescriptorSource,
    readonly extents: VmdkExtent[],
    /** qemu's create-type: the descriptor's, or monolithicSparse/streamOptimized for a sparse file opened directly. */
    readonly createType: string,
    readonly backing: BlockDevice | null,
    readonly backingPath: string | null,
    readonly readOnly: boolean,
  ) {
    this.size = extents.reduce((s, e) => s + e.length, 0);
    this.starts = extents.map((e) => e.start);
  }

  get path(): string {
    return this.file.path;
  }

  get cid(): number {
    return this.descriptor.cid as number;
  }

  get parentCid(): number {
    return this.descriptor.parentCid ?? NO_PARENT_CID;
  }

  static async open(file: HostFile, ctx: OpenContext): Promise<VmdkLayer> {
    const path = file.path;
    if (file.size < 4) throw new BlockError('invalid-image', `${path}: too small (${file.size} bytes) to be a VMDK image`, { path });
    const head = new Uint8Array(Math.min(C.HEADER_SIZE, file.size));
    await file.readAt(head, 0);
    refuseOtherSparse(head, path);

    let desc: VmdkDescriptor;
    let source: DescriptorSource;
    let extents: VmdkExtent[];
    let createType: string;
    if (hasKdmvMagic(head)) {
      if (head.length < C.HEADER_SIZE)
        throw new BlockError('invalid-image', `${path}: too small (${file.size} bytes) for a VMDK sparse header`, { path });
      const h = parseSparseHeader(head);
      if (h.capacity === 0n && h.descriptorOffset !== 0n) {
        // A sparse header with no capacity that only carries a descriptor naming other extents (as QEMU reads it).
        const emb = await readEmbeddedDescriptor(file, h.descriptorOffset, h.descriptorSize);
        if (emb === null) throw new BlockError('invalid-image', `${path}: sparse header has capacity 0 and an empty descriptor`, { path });
        desc = parseDescriptor(emb.text, path);
        source = { kind: 'embedded', offset: emb.offset, reserved: emb.reserved };
        extents = await openExtents(desc, path, ctx.readOnly);
        createType = desc.createType ?? 'monolithicSparse';
      } else {
        const sparse = await SparseExtent.open(file, { index: 0, line: null, start: 0, ownsFile: false });
        extents = [sparse];
        try {
          const f = sparse.footer?.header;
          const emb =
            (await readEmbeddedDescriptor(file, h.descriptorOffset, h.descriptorSize)) ??
            (f !== undefined ? await readEmbeddedDescriptor(file, f.descriptorOffset, f.descriptorSize) : null);
          if (emb === null) {
            throw new BlockError(
              'invalid-image',
              `${path}: this sparse extent has no embedded descriptor: it is one extent of a split disk (e.g. twoGbMaxExtentSparse); open the descriptor file that names it`,
              { path, structure: 'embedded descriptor' },
            );
          }
          desc = parseDescriptor(emb.text, path);
          source = { kind: 'embedded', offset: emb.offset, reserved: emb.reserved };
        } catch (err) {
          await sparse.close();
          throw err;
        }
        // QEMU names a sparse file opened directly by its compression, whatever the embedded createType says.
        createType = sparse.geometry.compressed ? 'streamOptimized' : 'monolithicSparse';
      }
    } else {
      if (probeVmdk(head) === 0) {
        throw new BlockError('invalid-image', `${path}: not a VMDK image (no KDMV magic at offset 0, and not a text VMDK descriptor)`, {
          path,
          structure: 'VMDK descriptor',
        });
      }
      if (file.size > C.MAX_DESCRIPTOR_BYTES) {
        throw new BlockError(
          'invalid-image',
          `${path}: ${file.size} bytes is too large for a VMDK text descriptor (at most ${C.MAX_DESCRIPTOR_BYTES}); it is not a VMDK image`,
          { path, structure: 'VMDK descriptor' },
        );
      }
      const bytes = new Uint8Array(file.size);
      await file.readAt(bytes, 0);
      desc = parseDescriptor(descriptorText(bytes), path);
      if (desc.createType === null) {
        throw new BlockError('invalid-image', `${path}: the VMDK descriptor has no createType line`, {
          path,
          structure: 'VMDK descriptor',
          field: 'createType',
        });
      }
      if (desc.extents.length === 0) {
        throw new BlockError('invalid-image', `${path}: the VMDK descriptor names no extents`, { path, structure: 'VMDK descriptor' });
      }
      source = { kind: 'file', size: file.size };
      extents = await openExtents(desc, path, ctx.readOnly);
      createType = desc.createType;
    }

    let backing: BlockDevice | null = null;
    let backingPath: string | null = null;
    try {
      if (desc.cid === null) {
        throw new BlockError('invalid-image', `${path}: the VMDK descriptor has no CID line`, {
          path,
          structure: 'VMDK descriptor',
          field: 'CID',
        });
      }
      const override = ctx.options.backing;
      const hint = desc.parentFileNameHint;
      if (override !== null && (override !== undefined || hint !== null)) {
        const name = override ?? (hint as string);
        backingPath = override !== undefined ? name : resolveRelative(path, name);
        // A parent named by parentFileNameHint is a VMDK (QEMU forces the format).
        const fmt = override !== undefined ? ctx.options.backingFormat : 'vmdk';
        try {
          backing = await ctx.openBacking(backingPath, fmt, path);
        } catch (e) {
          if (e instanceof BlockError && e.kind === 'not-found' && e.context.path === backingPath) {
            throw new BlockError(
              'not-found',
              `${path}: parent disk '${name}' not found (looked for ${backingPath})`,
              { path, structure: 'parentFileNameHint' },
              e,
            );
          }
          throw e;
        }
        const parent = layerOf(backing);
        const pcid = desc.parentCid ?? NO_PARENT_CID;
        if (override === undefined && parent instanceof VmdkLayer && parent.cid !== pcid) {
          const err = new BlockError(
            'corrupt-image',
            `${path}: parentCID ${hex8(pcid)} does not match CID ${hex8(parent.cid)} of the parent ${backingPath}: the parent changed after this delta disk was made, so reads through it would be wrong`,
            { path, structure: 'VMDK descriptor', field: 'parentCID' },
          );
          await backing.close();
          backing = null;
          throw err;
        }
      }
    } catch (e) {
      await Promise.allSettled(extents.map((x) => x.close()));
      throw e;
    }
    const layer = new VmdkLayer(file, desc, source, extents, createType, backing, backingPath, ctx.readOnly);
    if (!ctx.readOnly) {
      try {
        layer.writer = await VmdkWriter.open(layer);
      } catch (e) {
        await layer.close();
        throw e;
      }
    }
    return layer;
  }

  private get w(): VmdkWriter {
    if (this.writer === null) throw new BlockError('read-only', `${this.path}: opened read-only`, { path: this.path, op: 'write' });
    return this.writer;
  }

  write(buf: Uint8Array, offset: number): Promise<void> {
    return this.w.write(buf, offset);
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.w.writeZeroes(offset, length);
  }

  async flush(): Promise<void> {
    if (this.writer !== null) await this.writer.flush();
  }

  /** Index of the extent holding guest offset `offset`. */
  private extentAt(offset: number): number {
    let lo = 0;
    let hi = this.starts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if ((this.starts[mid] as number) <= offset) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  async map(offset: number, length: number): Promise<LayerRun[]> {
    const runs: VmdkRun[] = [];
    const end = offset + length;
    let pos = offset;
    for (let i = this.extentAt(offset); pos < end && i < this.extents.length; i++) {
      const x = this.extents[i] as VmdkExtent;
      const e = Math.min(end, x.start + x.length);
      if (e <= pos) continue;
      runs.push(...(await x.map(pos, e - pos)));
      pos = e;
    }
    return runs;
  }

  readRun(buf: Uint8Array, run: LayerRun, offset: number): Promise<void> {
    const r = run as VmdkRun;
    return (this.extents[r.extent] as VmdkExtent).read(buf, r, offset);
  }

  /** What `qemu-img info --output=json` shows for a VMDK (vmdk_get_info, vmdk_get_specific_info). */
  async info(): Promise<ImageInfo> {
    let actual = await this.file.allocatedBytes();
    for (const x of this.extents) if (x.file !== null && x.file !== this.file) actual += await x.file.allocatedBytes();
    const info: ImageInfo = { 'virtual-size': this.size, filename: this.path, format: 'vmdk', 'actual-size': actual };
    // QEMU reports a cluster size (and the dirty flag) only when all extents are alike.
    const stored = this.extents.filter((x) => x.kind === 'flat' || x.kind === 'sparse');
    const first = stored[0];
    const sig = (x: VmdkExtent): string =>
      x instanceof SparseExtent ? `sparse:${x.geometry.compressed}:${x.geometry.grainBytes}` : 'flat';
    const alike = first !== undefined && stored.every((x) => sig(x) === sig(first));
    if (alike && first instanceof SparseExtent) info['cluster-size'] = first.geometry.grainBytes;
    if (this.descriptor.parentFileNameHint !== null) {
      info['backing-filename'] = this.descriptor.parentFileNameHint;
      info['full-backing-filename'] = this.backingPath ?? resolveRelative(this.path, this.descriptor.parentFileNameHint);
      info['backing-filename-format'] = 'vmdk';
    }
    info['format-specific'] = {
      type: 'vmdk',
      data: { cid: this.cid, 'parent-cid': this.parentCid, 'create-type': this.createType, extents: this.extents.map((x) => x.info()) },
    };
    if (alike) info['dirty-flag'] = false;
    return info;
  }

  async close(): Promise<void> {
    try {
      if (this.writer !== null) await this.writer.flush();
      await Promise.all(this.extents.map((x) => x.close()));
    } finally {
      await this.file.close();
    }
  }
}
