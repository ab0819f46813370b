/** `rblock inspect` on a VHD: the human rendering of the report of formats/vhd/inspect.ts. */
import type { InspectField, InspectFooter, VhdInspectReport } from '../formats/vhd/inspect.js';

const hx = (n: number): string => '0x' + n.toString(16);
const hx8 = (n: number): string => '0x' + n.toString(16).padStart(8, '0');

function fieldLines(list: InspectField[]): string[] {
  const out = [`  ${'offset'.padEnd(10)} ${'rel'.padEnd(6)} ${'size'.padEnd(4)} ${'field'.padEnd(40)} value`];
  for (const f of list) {
    let v: string;
    if (typeof f.value !== 'number') v = f.name === 'parent_unicode_name' ? `'${f.value}'` : f.value;
    else if (f.name.endsWith('checksum') || f.name.endsWith('features') || f.name.endsWith('version') || f.name.endsWith('platform_code')) {
      v = '0x' + f.value.toString(16).padStart(f.size * 2, '0');
    } else v = f.value > 9 ? `${f.value} (${hx(f.value)})` : String(f.value);
    if (f.meaning !== undefined) v += ` : ${f.meaning}`;
    out.push(`  ${hx(f.offset).padEnd(10)} ${('+' + hx(f.rel)).padEnd(6)} ${String(f.size).padEnd(4)} ${f.name.padEnd(40)} ${v}`);
  }
  return out;
}

function footerLines(title: string, f: InspectFooter): string[] {
  const ck = f.checksumOk ? 'checksum ok' : `CHECKSUM BAD (bytes add up to ${hx8(f.computedChecksum)})`;
  return [`${title} (${f.source}) at ${hx(f.offset)}: ${ck}`, ...fieldLines(f.fields)];
}

export function humanVhdInspect(r: VhdInspectReport): string {
  const out: string[] = [
    `${r.file}: vpc (VHD), ${r.diskType} disk`,
    `virtual size ${r.virtualSize} bytes, from ${r.sizeFrom === 'chs' ? 'the CHS geometry' : 'current_size'}: ${r.sizeReason}`,
  ];
  for (const n of r.notes) out.push(`note: ${n}`);
  out.push('', ...footerLines('Footer', r.footer));
  if (r.footerCopy !== undefined) out.push('', ...footerLines('Footer copy', r.footerCopy));
  if (r.header !== undefined) {
    const h = r.header;
    out.push(
      '',
      `Dynamic disk header at ${hx(h.offset)}: ${h.checksumOk ? 'checksum ok' : 'CHECKSUM BAD'}; ${h.sectorsPerBlock} sectors per block, ${h.bitmapSize}-byte sector bitmaps`,
      ...fieldLines(h.fields.filter((f) => !f.name.startsWith('parent_locator['))),
    );
  }
  if (r.locators !== undefined) {
    out.push('', 'Parent locators:');
    for (const l of r.locators) {
      const what = l.text !== undefined ? ` '${l.text}'` : l.problem !== undefined ? ` (${l.problem})` : '';
      out.push(
        `  [${l.index}] at ${hx(l.offset)}: ${l.platform} data ${l.dataLength} bytes at ${hx(l.dataOffset)} (space ${l.dataSpace})${what}`,
      );
    }
  }
  if (r.parent !== undefined && r.parent.length > 0) {
    out.push('', 'Parent candidates, in the order they are tried:');
    for (const p of r.parent) out.push(`  ${p.path} (${p.from})`);
  }
  if (r.bat !== undefined) {
    const b = r.bat;
    const w = Math.max(4, String(b.entries - 1).length);
    const num = (n: number): string => String(n).padStart(w, '0');
    out.push('', `BAT at ${hx(b.offset)}: ${b.entries} entries, ${b.allocated} allocated; blocks of ${b.blockSize} bytes`);
    for (const row of b.rows) {
      if ('count' in row) {
        const name = row.count === 1 ? `Block#${num(row.block)}` : `Block#${num(row.block)}..#${num(row.last)}`;
        out.push(`  ${name} -> ${hx8(row.raw)} : not allocated${row.count > 1 ? ` (${row.count} blocks)` : ''}`);
      } else {
        out.push(
          `  Block#${num(row.block)} -> ${hx8(row.raw)} : bitmap [${hx(row.bitmap[0])}..${hx(row.bitmap[1])}), data [${hx(row.data[0])}..${hx(row.data[1])})`,
        );
      }
    }
  }
  if (r.block !== undefined) {
    const k = r.block;
    out.push('');
    if (k.rows === undefined) {
      out.push(`Block ${k.index} (guest ${hx(k.guestOffset)}): not allocated, no sector bitmap`);
    } else {
      out.push(
        `Block ${k.index} (guest ${hx(k.guestOffset)}): sector bitmap at ${hx(k.bitmapOffset as number)}, data at ${hx(k.dataOffset as number)}; ${k.present}/${k.sectors} sectors stored here`,
      );
      for (const run of k.runs ?? []) {
        out.push(
          `  sectors ${run.start}..${run.start + run.count - 1} (${run.count}): ${run.present ? 'stored in this file' : 'not stored'}`,
        );
      }
      out.push(`  map, 64 sectors per row ('#' stored, '.' not):`);
      let prev: string | null = null;
      let starred = false;
      k.rows.forEach((row, i) => {
        if (row === prev) {
          if (!starred) out.push('  *');
          starred = true;
          return;
        }
        starred = false;
        prev = row;
        out.push(`  ${String(i * 64).padStart(6)} ${row}`);
      });
    }
  }
  return out.join('\n') + '\n';
}
