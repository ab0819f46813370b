/** `rblock read`: guest bytes to a file (sparse), to stdout, or as a hexdump. */
import { readToFile, readToStream } from '../copy/read.js';
import { BlockError } from '../block/errors.js';
import { openImage } from '../formats/registry.js';
import { hexdumpLines } from '../util/hexdump.js';
import type { Io } from './io.js';

export interface ReadOptions {
  format?: string;
  offset?: number;
  length?: number;
  output?: string;
  hexdump?: boolean;
}

export async function runRead(image: string, opts: ReadOptions, io: Io): Promise<number> {
  // A batch command: synchronous host I/O (HostFile.useSyncIo), nothing else waits on the event loop.
  await using dev = await openImage(image, { syncIo: true, ...(opts.format !== undefined ? { format: opts.format } : {}) });
  const offset = opts.offset ?? 0;
  if (offset > dev.size) {
    throw new BlockError('out-of-bounds', `${image}: offset ${offset} is beyond the end of the image (${dev.size} bytes)`, { path: image });
  }
  const length = opts.length ?? dev.size - offset;
  if (offset + length > dev.size) {
    throw new BlockError(
      'out-of-bounds',
      `${image}: read of ${length} bytes at offset ${offset} goes beyond the end of the image (${dev.size} bytes)`,
      {
        path: image,
      },
    );
  }
  if (opts.output !== undefined) {
    await readToFile(dev, opts.output, { offset, length, syncIo: true });
  } else if (opts.hexdump) {
    for await (const line of hexdumpLines(dev, offset, length)) await io.out(line + '\n');
  } else {
    await readToStream(dev, (b) => io.out(b), offset, length);
  }
  return 0;
}
