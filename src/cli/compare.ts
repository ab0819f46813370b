/**
 * `rblock compare`: where two images differ (like qemu-img compare, plus the
 * full list of differing ranges). Exit codes are qemu-img compare's: 0
 * identical, 1 different, 2 an image could not be opened, 3 block status
 * failed, 4 a read failed.
 */
import { Option, type Command } from 'commander';
import { compareExitCode, CompareError, compareImages, qemuStyleSummary, SECTOR, type CompareResult } from '../copy/compare.js';
import { openImage } from '../formats/registry.js';
import { isNbdUri } from '../nbd/uri.js';
import { errorLine } from './errors.js';
import type { Io } from './io.js';

export interface CompareCliOptions {
  format?: string;
  secondFormat?: string;
  strict?: boolean;
  sectors?: boolean;
  quiet?: boolean;
  output: 'human' | 'json';
}

export async function runCompare(pathA: string, pathB: string, o: CompareCliOptions, io: Io, debug = false): Promise<number> {
  let r: CompareResult;
  try {
    r = await compareFiles(pathA, pathB, o);
  } catch (e) {
    io.err(`rblock: ${errorLine(e).split('\n')[0]}\n`);
    if (debug && e instanceof Error && e.stack) io.err(`${e.stack}\n`);
    return compareExitCode(e);
  }
  if (o.quiet) return r.identical ? 0 : 1;
  const unit = o.sectors ? SECTOR : 1;
  const ranges = r.ranges.map((x) => ({ start: x.start / unit, length: o.sectors ? Math.ceil(x.length / SECTOR) : x.length }));
  if (o.output === 'json') {
    const out = {
      identical: r.identical,
      firstMismatch: r.firstMismatch,
      reason: r.reason,
      unit: o.sectors ? 'sectors' : 'bytes',
      ranges,
      changedSectors: r.changedSectors,
      changedBytes: r.changedBytes,
      sizeA: r.sizeA,
      sizeB: r.sizeB,
      sizeMismatch: r.sizeMismatch,
      strict: r.strict,
    };
    // One range per line: a long list stays readable and compact.
    const text = JSON.stringify(out, null, 2).replace(/"ranges": \[[^\]]*\]/, () =>
      ranges.length === 0 ? '"ranges": []' : `"ranges": [\n${ranges.map((x) => `    ${JSON.stringify(x)}`).join(',\n')}\n  ]`,
    );
    await io.out(text + '\n');
  } else {
    let text = qemuStyleSummary(r).join('\n') + '\n';
    if (ranges.length > 0) {
      text += `${(o.sectors ? 'Sector' : 'Offset').padEnd(16)}${o.sectors ? 'Count' : 'Length'}\n`;
      await io.out(text);
      text = '';
      for (let i = 0; i < ranges.length; i += 4096) {
        const chunk = ranges.slice(i, i + 4096).map((x) => `${String(x.start).padEnd(16)}${x.length}\n`);
        await io.out(chunk.join(''));
      }
      const n = ranges.length;
      text += `${n} differing range${n === 1 ? '' : 's'}, ${r.changedSectors} changed sector${r.changedSectors === 1 ? '' : 's'} (${r.changedBytes} bytes)\n`;
    }
    await io.out(text);
  }
  return r.identical ? 0 : 1;
}

async function compareFiles(pathA: string, pathB: string, o: CompareCliOptions): Promise<CompareResult> {
  const open = async (p: string, format: string | undefined) => {
    try {
      // A batch command: synchronous host I/O (HostFile.useSyncIo), nothing else waits on the event loop.
      return await openImage(p, { syncIo: true, ...(format !== undefined ? { format } : {}) });
    } catch (e) {
      throw new CompareError('open', e);
    }
  };
  await using a = await open(pathA, o.format);
  await using b = await open(pathB, o.secondFormat);
  // Local images read synchronously: no read-ahead, bigger windows (see CompareOptions.readAhead).
  const local = !isNbdUri(pathA) && !isNbdUri(pathB);
  // -q prints nothing but the verdict: stop at the first difference, like qemu-img compare.
  return await compareImages(a, b, {
    strict: o.strict ?? false,
    stopAtFirst: o.quiet ?? false,
    ...(local ? { readAhead: 0, window: 4 << 20 } : {}),
  });
}

/** Register `compare` on the program. */
export function registerCompare(program: Command, io: Io, setExit: (code: number) => void): void {
  program
    .command('compare')
    .description(
      'List the ranges where two images differ (any formats, chains flattened); exit 0 identical, 1 different, 2 error (like qemu-img compare).',
    )
    .argument('<image1>', 'first image')
    .argument('<image2>', 'second image')
    .option('-f, --format <fmt>', 'format of the first image (default: probe)')
    .option('-F, --second-format <fmt>', 'format of the second image (default: probe)')
    .option('-s, --strict', 'strict: allocation differences and a size difference count too (like qemu-img compare -s)')
    .option('--sectors', 'list ranges as 512-byte sector numbers and counts instead of bytes')
    .option('-q, --quiet', 'print nothing: only the exit code')
    .addOption(new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human'))
    .addHelpText(
      'after',
      '\nExit codes (as qemu-img compare): 0 identical, 1 different, 2 an image could not be opened, 3 block status failed, 4 a read failed.\n' +
        'JSON: {identical, firstMismatch, reason, unit, ranges: [{start, length}], changedSectors, changedBytes, sizeA, sizeB, sizeMismatch, strict}\n' +
        '\nExamples:\n  rblock compare disk.raw disk.qcow2\n  rblock compare -s --output json --sectors a.qcow2 b.qcow2\n',
    )
    .action(async (a: string, b: string, o: CompareCliOptions, cmd: Command) => {
      const debug = (cmd.optsWithGlobals() as { debug?: boolean }).debug ?? false;
      setExit(await runCompare(a, b, o, io, debug));
    });
}
