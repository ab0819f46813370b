/** `rblock inspect` on a VMDK: the human rendering of the report of src/formats/vmdk/inspect.ts. */
import type { InspectField, SparseReport, VmdkInspectReport } from '../formats/vmdk/inspect.js';

const hx = (n: number): string => '0x' + n.toString(16);

function fieldLines(fields: InspectField[], indent: string): string[] {
  const out = [`${indent}${'offset'.padEnd(8)} ${'size'.padEnd(5)} ${'field'.padEnd(20)} value`];
  for (const f of fields) {
    const v =
      typeof f.value === 'number' && f.name === 'flags'
        ? hx(f.value)
        : typeof f.value === 'number' && f.value > 9
          ? `${f.value} (${hx(f.value)})`
          : String(f.value);
    out.push(`${indent}${hx(f.offset).padEnd(8)} ${String(f.size).padEnd(5)} ${f.name.padEnd(20)} ${v}`);
  }
  return out;
}

function sparseLines(s: SparseReport): string[] {
  const out = ['  Sparse header:', ...fieldLines(s.header, '    ')];
  if (s.flags.length > 0) out.push(`    flags: ${s.flags.join(', ')}`);
  if (s.footer !== null) {
    out.push(
      `  Footer at ${hx(s.footer.offset)} (the header says GD_AT_END; offsets relative to the footer):`,
      ...fieldLines(s.footer.fields, '    '),
    );
  }
  const kinds = [s.compressed ? 'compressed' : '', s.markers ? 'with markers' : '', s.zeroedGrains ? 'zeroed-grain GTEs' : ''].filter(
    (k) => k !== '',
  );
  out.push(
    `  Grains: ${s.grainBytes} bytes, ${s.gtesPerGt} per grain table (${s.gtCoverage} bytes per table)${kinds.length > 0 ? ', ' + kinds.join(', ') : ''}`,
  );
  const gd = s.grainDirectory;
  const rgd = gd.redundantOffset !== undefined && gd.using === 'primary' ? `; redundant copy at ${hx(gd.redundantOffset)}` : '';
  out.push(`  Grain directory (${gd.using}) at ${hx(gd.offset)}: ${gd.entries} entries, ${gd.allocated} allocated${rgd}`);
  if (gd.damage !== undefined) out.push(`    the primary grain directory is damaged: ${gd.damage}`);
  for (const e of gd.list) out.push(`    GD[${e.index}] -> grain table at sector ${e.sector} (${hx(e.sector * 512)})`);
  if (gd.truncated) out.push(`    ... (${gd.allocated - gd.list.length} more)`);
  if (s.streamMarkers !== undefined) {
    out.push(`  Stream markers (${s.streamMarkers.list.length}${s.streamMarkers.truncated ? ', list truncated' : ''}):`);
    for (const m of s.streamMarkers.list) {
      const what =
        m.kind === 'grain'
          ? `grain lba ${m.val} (guest ${typeof m.val === 'number' ? hx(m.val * 512) : m.val}), ${m.size} compressed bytes`
          : m.kind === 'end of stream' || m.kind === 'unknown'
            ? m.kind
            : `${m.kind} marker, ${m.val} sectors follow`;
      out.push(`    ${hx(m.offset).padEnd(12)} ${what}`);
    }
  }
  return out;
}

export function humanVmdkInspect(r: VmdkInspectReport): string {
  const out: string[] = [
    `${r.file}: vmdk ${r.createType}, ${r.size} bytes, ${r.extents.length} extent${r.extents.length === 1 ? '' : 's'}`,
    `CID ${r.cid}, parentCID ${r.parentCid}${r.parentFileNameHint !== null ? `, parentFileNameHint "${r.parentFileNameHint}"` : ''}`,
    '',
  ];
  const d = r.descriptor;
  out.push(
    d.source === 'embedded'
      ? `Descriptor (embedded at ${hx(d.offset)}, ${d.reserved} bytes reserved, ${d.text.length} used):`
      : `Descriptor (text file, ${d.reserved} bytes):`,
  );
  for (const l of d.text.replace(/\r?\n$/, '').split(/\r?\n/)) out.push(`  | ${l}`);
  for (const x of r.extents) {
    const name = x.name !== null ? ` "${x.name}"` : '';
    const at = x.flatOffset !== undefined ? ` at file offset ${hx(x.flatOffset)}` : '';
    out.push(
      '',
      `Extent ${x.index}: ${x.access} ${x.type}${name}${at}, guest ${hx(x.guestOffset)}..${hx(x.guestOffset + x.length)} (${x.length} bytes)${x.descriptorLine !== null ? `, descriptor line ${x.descriptorLine}` : ''}`,
    );
    if (x.path !== null && x.name !== x.path) out.push(`  file: ${x.path}`);
    if (x.sparse !== undefined) out.push(...sparseLines(x.sparse));
  }
  const g = r.grainTable;
  if (g !== undefined) {
    out.push(
      '',
      `Grain table ${g.index} (extent ${g.extent}, GD[${g.gdIndex}]) ${g.offset === 0 ? 'not allocated' : `at ${hx(g.offset)}`}, guest ${hx(g.guestStart)}..: ${g.entries.length} non-empty entries`,
    );
    for (const e of g.entries) {
      let where = '';
      if (e.kind === 'data') where = ` -> ${hx(e.hostOffset)}`;
      else if (e.kind === 'compressed')
        where = ` marker at ${hx(e.hostOffset)}${e.marker !== undefined ? ` (lba ${e.marker.lba}, ${e.marker.size} bytes)` : ''}`;
      out.push(`  GT[${e.index}] guest ${hx(e.guestOffset)} ${e.raw} ${e.kind}${where}`);
    }
  }
  return out.join('\n') + '\n';
}
