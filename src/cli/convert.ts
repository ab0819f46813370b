/** `rblock convert`: copy an image into a new qcow2, raw, VHD or VMDK image (like qemu-img convert). */
import { SingleBar } from 'cli-progress';
import { BlockError } from '../block/errors.js';
import { convert } from '../copy/convert.js';
import { parseOptionList } from '../formats/create.js';
import { openImage } from '../formats/registry.js';
import type { Io } from './io.js';

export interface ConvertCliOptions {
  format?: string;
  outputFormat: string;
  compress?: boolean;
  options?: string[];
  backing?: string;
  backingFormat?: string;
  progress?: boolean;
  noCreate?: boolean;
  targetIsZero?: boolean;
  /** `azure`: a fixed VHD (force_size) whose virtual size is rounded up to a whole MiB. */
  preset?: string;
}

export async function runConvert(srcPath: string, dstPath: string, o: ConvertCliOptions, io: Io): Promise<number> {
  // A batch command: synchronous host I/O (HostFile.useSyncIo), nothing else waits on the event loop.
  await using src = await openImage(srcPath, { syncIo: true, ...(o.format !== undefined ? { format: o.format } : {}) });
  const options: Record<string, string> = {};
  for (const list of o.options ?? []) Object.assign(options, parseOptionList(list));
  let size: number | undefined;
  if (o.preset === 'esxi') {
    if (o.outputFormat !== 'vmdk') throw new BlockError('invalid-argument', '--preset esxi: needs -O vmdk');
    // ESXi imports VMware's canonical stream (version 3, footer, GD at the end) with a SCSI adapter.
    options['subformat'] = 'streamOptimized';
    options['adapter_type'] ??= 'lsilogic';
  } else if (o.preset !== undefined) {
    if (o.preset !== 'azure' || o.outputFormat !== 'vpc') {
      throw new BlockError('invalid-argument', `--preset ${o.preset}: the presets are azure (with -O vpc) and esxi (with -O vmdk)`);
    }
    // Azure takes fixed VHDs whose virtual size is a whole number of MiB, stated exactly (force_size).
    Object.assign(options, { subformat: 'fixed', force_size: 'on' });
    size = Math.ceil(src.size / 2 ** 20) * 2 ** 20;
  }
  let bar: SingleBar | null = null;
  if (o.progress && process.stderr.isTTY) {
    bar = new SingleBar({
      format: '{bar} {percentage}% | {value}/{total} MiB | {speed} MiB/s | ETA {eta_formatted}',
      stream: process.stderr,
      hideCursor: true,
    });
    bar.start(Math.ceil(src.size / 2 ** 20), 0, { speed: '0' });
  }
  const started = Date.now();
  try {
    await convert(src, dstPath, {
      format: o.outputFormat,
      options,
      syncIo: true,
      ...(o.compress ? { compress: true } : {}),
      ...(o.backing !== undefined ? { backing: o.backing } : {}),
      ...(o.backingFormat !== undefined ? { backingFormat: o.backingFormat } : {}),
      ...(o.noCreate ? { noCreate: true } : {}),
      ...(o.targetIsZero ? { targetIsZero: true } : {}),
      ...(size !== undefined ? { size } : {}),
      onProgress: (done) => {
        if (bar === null) return;
        const secs = Math.max(0.001, (Date.now() - started) / 1000);
        bar.update(Math.floor(done / 2 ** 20), { speed: (done / 2 ** 20 / secs).toFixed(0) });
      },
    });
  } finally {
    bar?.stop();
  }
  void io;
  return 0;
}
