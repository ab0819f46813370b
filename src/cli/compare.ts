/**
 * `rblock compare`: where two images differ (like qemu-img compare, plus the
 * full list of differing ranges). Exit codes are qemu-img compare's: 0
 * identical, 1 different, 2 an image could not be opened, 3 block status
 * failed, 4 a read failed.
 */
import { Option, type Command } from 'commander';
import {
  compareExitCode,
  CompareError,
  compareImages,
  qemuStyleSummary,
  SECTOR,
  type ByteRange,
  type CompareResult,
  type MismatchKind,
} from '../copy/compare.js';
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
  const listing = o.quiet ? null : new RangeListing(o, io);
  let r: CompareResult;
  try {
    r = await compareFiles(pathA, pathB, o, listing);
  } catch (e) {
    io.err(`rblock: ${errorLine(e).split('\n')[0]}\n`);
    if (debug && e instanceof Error && e.stack) io.err(`${e.stack}\n`);
    return compareExitCode(e);
  }
  if (listing !== null) await listing.finish(r);
  return r.identical ? 0 : 1;
}

/**
 * The output of compare, written as the ranges come (memory stays bounded
 * however many there are: each window's are written before the next window
 * is compared). The first lines need only where the images first differ and
 * why, which is known before the first range is emitted.
 */
class RangeListing {
  private pending: string[] = [];
  private count = 0;
  /** Image sizes, set once both are open. */
  sizes = { sizeA: 0, sizeB: 0 };

  constructor(
    private readonly o: CompareCliOptions,
    private readonly io: Io,
  ) {}

  private get json(): boolean {
    return this.o.output === 'json';
  }

  /** The text before the first range, from what is known at that point. */
  private head(firstMismatch: number | null, reason: MismatchKind | null, identical: boolean): string {
    if (this.json) {
      const keys = { identical, firstMismatch, reason, unit: this.o.sectors ? 'sectors' : 'bytes' };
      return `{\n${Object.entries(keys)
        .map(([k, v]) => `  ${JSON.stringify(k)}: ${JSON.stringify(v)},\n`)
        .join('')}  "ranges": [`;
    }
    return qemuStyleSummary({ ...this.sizes, strict: this.o.strict ?? false, firstMismatch, reason }).join('\n') + '\n';
  }

  range(x: ByteRange, first: { offset: number; reason: MismatchKind }): void {
    if (this.count === 0) {
      this.pending.push(this.head(first.offset, first.reason, false));
      if (!this.json) this.pending.push(`${(this.o.sectors ? 'Sector' : 'Offset').padEnd(16)}${this.o.sectors ? 'Count' : 'Length'}\n`);
    }
    const start = this.o.sectors ? x.start / SECTOR : x.start;
    const length = this.o.sectors ? Math.ceil(x.length / SECTOR) : x.length;
    // JSON: one range per line, a long list stays readable and compact.
    this.pending.push(
      this.json ? `${this.count === 0 ? '' : ','}\n    ${JSON.stringify({ start, length })}` : `${String(start).padEnd(16)}${length}\n`,
    );
    this.count++;
  }

  async flush(): Promise<void> {
    if (this.pending.length === 0) return;
    const text = this.pending.join('');
    this.pending = [];
    await this.io.out(text);
  }

  async finish(r: CompareResult): Promise<void> {
    const n = this.count;
    if (n === 0) this.pending.push(this.head(r.firstMismatch, r.reason, r.identical));
    if (this.json) {
      const tail = {
        changedSectors: r.changedSectors,
        changedBytes: r.changedBytes,
        sizeA: r.sizeA,
        sizeB: r.sizeB,
        sizeMismatch: r.sizeMismatch,
        strict: r.strict,
      };
      this.pending.push(n === 0 ? '],\n' : '\n  ],\n');
      this.pending.push(
        `${Object.entries(tail)
          .map(([k, v]) => `  ${JSON.stringify(k)}: ${JSON.stringify(v)}`)
          .join(',\n')}\n}\n`,
      );
    } else if (n > 0) {
      this.pending.push(
        `${n} differing range${n === 1 ? '' : 's'}, ${r.changedSectors} changed sector${r.changedSectors === 1 ? '' : 's'} (${r.changedBytes} bytes)\n`,
      );
    }
    await this.flush();
  }
}

async function compareFiles(pathA: string, pathB: string, o: CompareCliOptions, listing: RangeListing | null): Promise<CompareResult> {
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
  if (listing !== null) listing.sizes = { sizeA: a.size, sizeB: b.size };
  // Local images read synchronously: no read-ahead, bigger windows (see CompareOptions.readAhead).
  const local = !isNbdUri(pathA) && !isNbdUri(pathB);
  // -q prints nothing but the verdict: stop at the first difference, like qemu-img compare.
  return await compareImages(a, b, {
    strict: o.strict ?? false,
    stopAtFirst: o.quiet ?? false,
    ...(local ? { readAhead: 0, window: 4 << 20 } : {}),
    ...(listing !== null
      ? { collectRanges: false, onRange: (x, first) => listing.range(x, first), afterWindow: () => listing.flush() }
      : {}),
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
