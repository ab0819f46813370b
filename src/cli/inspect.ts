/** `rblock inspect`: the format's own structures, field by field. */
import { BlockError } from '../block/errors.js';
import { layerOf } from '../formats/chain.js';
import { Qcow2Layer } from '../formats/qcow2/image.js';
import { inspectQcow2, type InspectOptions, type InspectReport } from '../formats/qcow2/inspect.js';
import { openImage } from '../formats/registry.js';
import { VhdLayer } from '../formats/vhd/image.js';
import { inspectVhd } from '../formats/vhd/inspect.js';
import { VmdkLayer } from '../formats/vmdk/image.js';
import { inspectVmdk } from '../formats/vmdk/inspect.js';
import { humanVhdInspect } from './inspect-vhd.js';
import { humanVmdkInspect } from './inspect-vmdk.js';
import type { Io } from './io.js';

export interface InspectCliOptions extends InspectOptions {
  format?: string;
  output: 'human' | 'json';
  /** VHD: decode this block's sector bitmap. */
  block?: number;
  /** VMDK: decode this grain table (numbered across the sparse extents). */
  gt?: number;
}

const hx = (n: number): string => '0x' + n.toString(16);

function jsonReplacer(_k: string, v: unknown): unknown {
  return typeof v === 'bigint' ? (v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : '0x' + v.toString(16)) : v;
}

export function humanInspect(r: InspectReport): string {
  const out: string[] = [`${r.file}: qcow2`, '', 'Header:', `  ${'offset'.padEnd(8)} ${'size'.padEnd(5)} ${'field'.padEnd(24)} value`];
  for (const f of r.header) {
    const v = typeof f.value === 'number' && f.value > 9 ? `${f.value} (${hx(f.value)})` : String(f.value);
    out.push(`  ${hx(f.offset).padEnd(8)} ${String(f.size).padEnd(5)} ${f.name.padEnd(24)} ${v}`);
  }
  for (const [k, list] of Object.entries(r.features)) if (list.length > 0) out.push(`  ${k} features: ${list.join(', ')}`);
  out.push('', 'Header extensions:');
  if (r.extensions.length === 0) out.push('  (none)');
  for (const e of r.extensions) {
    let v = '';
    if (typeof e.value === 'string') v = ` '${e.value}'`;
    else if (e.name === 'feature name table' && Array.isArray(e.value)) v = ` ${e.value.length} entries`;
    else if (e.value !== undefined && e.value !== null) v = ' ' + JSON.stringify(e.value);
    out.push(`  ${hx(e.offset).padEnd(8)} ${e.type} ${e.name} (${e.length} bytes)${v}`);
  }
  if (r.backingFile !== null)
    out.push('', `Backing file name at ${hx(r.backingFile.offset)} (${r.backingFile.length} bytes): ${r.backingFile.name}`);
  if (r.snapshots.length > 0) {
    out.push('', 'Snapshots:');
    for (const s of r.snapshots) {
      out.push(
        `  ${hx(s.offset).padEnd(8)} id ${s.id} '${s.name}' L1 at ${hx(s.l1TableOffset)} (${s.l1Size} entries) date ${new Date(s.dateSec * 1000).toISOString()} vm-state ${s.vmStateSize}`,
      );
    }
  }
  if (r.bitmaps.length > 0) {
    out.push('', 'Bitmaps:');
    for (const b of r.bitmaps) {
      out.push(
        `  ${hx(b.offset).padEnd(8)} '${b.name}' granularity ${b.granularity} flags [${b.flagNames.join(', ')}] table at ${hx(b.tableOffset)} (${b.tableSize} entries)`,
      );
    }
  }
  if (r.l1 !== undefined) {
    out.push('', `L1 table at ${hx(r.l1.offset)}: ${r.l1.entries} entries, ${r.l1.allocated} allocated`);
    for (const e of r.l1.list) {
      out.push(`  L1[${e.index}] ${e.raw} -> L2 at ${hx(e.l2Offset)}${e.copied ? ' COPIED' : ''}${e.reserved ? ' RESERVED-BITS-SET' : ''}`);
    }
  }
  if (r.l2 !== undefined) {
    out.push(
      '',
      `L2 table ${r.l2.l1Index} at ${hx(r.l2.offset)} (guest ${hx(r.l2.guestStart)}...): ${r.l2.entries.length} non-empty entries`,
    );
    for (const e of r.l2.entries) {
      let where = '';
      if (e.kind === 'compressed') where = ` compressed at ${hx(e.compressedOffset ?? 0)} (${e.compressedSectors} sectors)`;
      else if (e.hostOffset !== 0) where = ` -> ${hx(e.hostOffset)}`;
      const flags = [e.copied ? 'COPIED' : '', e.reserved ? 'RESERVED-BITS-SET' : ''].filter((x) => x !== '').join(' ');
      const sub =
        e.subclusters !== undefined
          ? ` bitmap ${e.bitmap} [${e.subclusters.map((s) => (s === 'data' ? 'D' : s === 'zero' ? 'Z' : '.')).join('')}]`
          : '';
      out.push(`  L2[${e.index}] guest ${hx(e.guestOffset)} ${e.raw} ${e.kind}${where}${flags ? ' ' + flags : ''}${sub}`);
    }
  }
  if (r.refcounts !== undefined) {
    const rc = r.refcounts;
    out.push(
      '',
      `Refcount table at ${hx(rc.tableOffset)} (${rc.tableClusters} clusters), ${rc.refcountBits}-bit refcounts, ${rc.entriesPerBlock} per block:`,
    );
    for (const b of rc.blocks) {
      out.push(
        `  reftable[${b.index}] ${b.raw} -> block at ${hx(b.offset)}: clusters ${b.firstCluster}.. ${b.used} in use, max refcount ${b.maxRefcount}`,
      );
    }
  }
  return out.join('\n') + '\n';
}

export async function runInspect(image: string, opts: InspectCliOptions, io: Io): Promise<number> {
  await using dev = await openImage(image, opts.format !== undefined ? { format: opts.format, backing: null } : { backing: null });
  const layer = layerOf(dev);
  if (layer instanceof VhdLayer) {
    const qcow2Only = [opts.l1 ? '--l1' : '', opts.l2 !== undefined ? '--l2' : '', opts.refcounts ? '--refcounts' : ''].filter(
      (o) => o !== '',
    );
    if (qcow2Only.length > 0) {
      throw new BlockError('invalid-argument', `${image}: ${qcow2Only.join(', ')} are for qcow2 images; this is a VHD (use --block N)`, {
        path: image,
      });
    }
    const report = await inspectVhd(layer, opts.block !== undefined ? { block: opts.block } : {});
    await io.out(opts.output === 'json' ? JSON.stringify(report, jsonReplacer, 2) + '\n' : humanVhdInspect(report));
    return 0;
  }
  if (opts.block !== undefined) {
    throw new BlockError('invalid-argument', `${image}: --block is for VHD images; this image is ${dev.format}`, { path: image });
  }
  if (layer instanceof VmdkLayer) {
    const qcow2Only = [opts.l1 ? '--l1' : '', opts.l2 !== undefined ? '--l2' : '', opts.refcounts ? '--refcounts' : ''].filter(
      (o) => o !== '',
    );
    if (qcow2Only.length > 0) {
      throw new BlockError('invalid-argument', `${image}: ${qcow2Only.join(', ')} are for qcow2 images; this is a VMDK (use --gt N)`, {
        path: image,
      });
    }
    const report = await inspectVmdk(layer, opts.gt !== undefined ? { gt: opts.gt } : {});
    await io.out(opts.output === 'json' ? JSON.stringify(report, jsonReplacer, 2) + '\n' : humanVmdkInspect(report));
    return 0;
  }
  if (opts.gt !== undefined) {
    throw new BlockError('invalid-argument', `${image}: --gt is for VMDK images; this image is ${dev.format}`, { path: image });
  }
  if (!(layer instanceof Qcow2Layer)) {
    throw new BlockError('not-supported', `${image}: inspect knows qcow2, VHD and VMDK structures; this image is ${dev.format}`, {
      path: image,
    });
  }
  const report = await inspectQcow2(layer, opts);
  await io.out(opts.output === 'json' ? JSON.stringify(report, jsonReplacer, 2) + '\n' : humanInspect(report));
  return 0;
}
