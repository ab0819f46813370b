/** `rblock info`: what `qemu-img info` shows, human or JSON. */
import { basename } from 'node:path';
import { openImage } from '../formats/registry.js';
import { imageInfo, imageInfoChain } from '../formats/info.js';
import type { ImageInfo } from '../formats/layer.js';
import { humanSize } from '../util/size.js';
import type { Io } from './io.js';

export interface InfoOptions {
  format?: string;
  output: 'human' | 'json';
  backingChain?: boolean;
}

function pad2(n: number): string {
  return String(n).padStart(2, '0');
}

function snapshotLines(info: ImageInfo): string[] {
  if (info.snapshots === undefined) return [];
  const lines = ['Snapshot list:', 'ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT'];
  for (const s of info.snapshots) {
    const d = new Date(s['date-sec'] * 1000);
    const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
    const secs = s['vm-clock-sec'];
    const clock = `${pad2(Math.floor(secs / 3600))}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}.${String(Math.floor(s['vm-clock-nsec'] / 1e6)).padStart(3, '0')}`;
    lines.push(
      `${s.id.padEnd(10)}${s.name.padEnd(18)}${humanSize(s['vm-state-size']).padStart(7)} ${date} ${clock} ${String(s.icount ?? 0).padStart(10)}`,
    );
  }
  return lines;
}

/** qemu's indented rendering of the format-specific data. */
function specificLines(value: unknown, indent: string): string[] {
  const out: string[] = [];
  if (Array.isArray(value)) {
    value.forEach((v, i) => {
      if (typeof v === 'object' && v !== null) out.push(`${indent}[${i}]:`, ...specificLines(v, indent + '    '));
      else out.push(`${indent}[${i}]: ${String(v)}`);
    });
  } else if (typeof value === 'object' && value !== null) {
    for (const [k, v] of Object.entries(value)) {
      const key = k.replace(/-/g, ' ');
      if (typeof v === 'object' && v !== null) out.push(`${indent}${key}:`, ...specificLines(v, indent + '    '));
      else out.push(`${indent}${key}: ${String(v)}`);
    }
  }
  return out;
}

export function humanInfo(info: ImageInfo): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${humanSize(info['virtual-size'])} (${info['virtual-size']} bytes)`,
  ];
  if (info['actual-size'] !== undefined) lines.push(`disk size: ${humanSize(info['actual-size'])}`);
  const rec = info as unknown as Record<string, unknown>;
  if (rec['encrypted'] === true) lines.push('encrypted: yes');
  if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${info['cluster-size']}`);
  if (info['backing-filename'] !== undefined) {
    const full = info['full-backing-filename'];
    lines.push(
      `backing file: ${info['backing-filename']}${full !== undefined && full !== info['backing-filename'] ? ` (actual path: ${full})` : ''}`,
    );
    if (info['backing-filename-format'] !== undefined) lines.push(`backing file format: ${info['backing-filename-format']}`);
  }
  lines.push(...snapshotLines(info));
  if (info['format-specific'] !== undefined) {
    lines.push('Format specific information:', ...specificLines(info['format-specific'].data, '    '));
  }
  if (info['dirty-flag'] === true) lines.push('dirty flag: true');
  return lines.join('\n') + '\n';
}

export async function runInfo(image: string, opts: InfoOptions, io: Io): Promise<number> {
  await using dev = await openImage(image, opts.format !== undefined ? { format: opts.format } : {});
  const infos = opts.backingChain ? await imageInfoChain(dev) : [await imageInfo(dev)];
  // qemu-img prints the name the user gave for the top image.
  (infos[0] as ImageInfo).filename = image;
  for (const i of infos.slice(1)) i.filename = i.filename.length > 0 ? i.filename : basename(i.filename);
  if (opts.output === 'json') {
    await io.out(JSON.stringify(opts.backingChain ? infos : infos[0], null, 4) + '\n');
  } else {
    await io.out(infos.map(humanInfo).join('\n'));
  }
  return 0;
}
