/** `rblock map`: the allocation map, as `qemu-img map` prints it. */
import { relative } from 'node:path';
import { mapEntryHuman, mapEntryJson, mapImage } from '../copy/map.js';
import { openImage } from '../formats/registry.js';
import type { Io } from './io.js';

export interface MapOptions {
  format?: string;
  output: 'human' | 'json';
}

export async function runMap(image: string, opts: MapOptions, io: Io): Promise<number> {
  await using dev = await openImage(image, opts.format !== undefined ? { format: opts.format } : {});
  if (opts.output === 'json') {
    let first = true;
    for await (const m of mapImage(dev)) {
      await io.out((first ? '[' : ',\n') + mapEntryJson(m));
      first = false;
    }
    await io.out(first ? '[]\n' : ']\n');
    return 0;
  }
  await io.out(`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`);
  const name = (p: string): string => {
    const r = relative(process.cwd(), p);
    return r.startsWith('..') ? p : r;
  };
  for await (const m of mapImage(dev)) {
    const line = mapEntryHuman(m, name);
    if (line !== null) await io.out(line + '\n');
  }
  return 0;
}
