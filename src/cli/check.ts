/**
 * `rblock check [-r leaks|all] [--output human|json] [-f FMT] IMAGE`: the
 * consistency check of `qemu-img check`, with its output and exit codes:
 * 0 clean, 1 the check could not complete, 2 corruptions, 3 leaks only,
 * 63 the format has no check. Findings per cluster go to stderr, the summary
 * to stdout.
 */
import { Option, type Command } from 'commander';
import { BlockError } from '../block/errors.js';
import { HostFile } from '../block/file.js';
import { checkQcow2, type CheckOutcome, type ImageCheck, type RepairMode } from '../formats/qcow2/check.js';
import { formatNames, openImage, probeFormat } from '../formats/registry.js';
import type { Io } from './io.js';

export interface CheckCliOptions {
  format?: string;
  output: 'human' | 'json';
  repair?: RepairMode;
  quiet?: boolean;
}

export const EXIT_CLEAN = 0;
export const EXIT_FAILED = 1;
export const EXIT_CORRUPT = 2;
export const EXIT_LEAKS = 3;
export const EXIT_NOT_SUPPORTED = 63;

/** C's "%0.2f": like toFixed(2), but an exact tie rounds to even (glibc) instead of up. */
export function fixed2(x: number): string {
  const exact = x.toFixed(100); // the double's exact decimal expansion
  const dot = exact.indexOf('.');
  if (/^50*$/.test(exact.slice(dot + 3))) {
    const down = exact.slice(0, dot + 3);
    if (Number(down[down.length - 1]) % 2 === 0) return down;
  }
  return x.toFixed(2);
}

/** qemu-img's dump_human_image_check. */
export function humanCheck(c: ImageCheck): string {
  let out = '';
  if (c.corruptions === 0 && c.leaks === 0 && c.checkErrors === 0) {
    out += 'No errors were found on the image.\n';
  } else {
    if (c.corruptions > 0) {
      out += `\n${c.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    }
    if (c.leaks > 0) {
      out += `\n${c.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    }
    if (c.checkErrors > 0) out += `\n${c.checkErrors} internal errors have occurred during the check.\n`;
  }
  if (c.totalClusters !== 0 && c.allocatedClusters !== 0) {
    out +=
      `${c.allocatedClusters}/${c.totalClusters} = ${fixed2((c.allocatedClusters * 100) / c.totalClusters)}% allocated, ` +
      `${fixed2((c.fragmentedClusters * 100) / c.allocatedClusters)}% fragmented, ` +
      `${fixed2((c.compressedClusters * 100) / c.allocatedClusters)}% compressed clusters\n`;
  }
  if (c.imageEndOffset !== 0) out += `Image end offset: ${c.imageEndOffset}\n`;
  return out;
}

/**
 * qemu-img check --output=json: the ImageCheck object with optional members
 * only when non-zero, in the order qemu's QDict hash table yields them.
 */
export function jsonCheck(c: ImageCheck): string {
  const o: Record<string, string | number> = {};
  const opt = (k: string, v: number): void => {
    if (v !== 0) o[k] = v;
  };
  opt('image-end-offset', c.imageEndOffset);
  opt('compressed-clusters', c.compressedClusters);
  opt('total-clusters', c.totalClusters);
  opt('corruptions', c.corruptions);
  opt('corruptions-fixed', c.corruptionsFixed);
  o['check-errors'] = c.checkErrors;
  opt('leaks', c.leaks);
  opt('leaks-fixed', c.leaksFixed);
  opt('allocated-clusters', c.allocatedClusters);
  o['filename'] = c.filename;
  o['format'] = c.format;
  opt('fragmented-clusters', c.fragmentedClusters);
  return JSON.stringify(o, null, 4) + '\n';
}

export function repairedMessage(r: { leaks: number; corruptions: number }): string {
  return (
    'The following inconsistencies were found and repaired:\n\n' +
    `    ${r.leaks} leaked clusters\n` +
    `    ${r.corruptions} corruptions\n\n` +
    'Double checking the fixed image now...\n'
  );
}

/** The format name of an image, probed like every other command does. */
async function probe(image: string): Promise<string> {
  const file = await HostFile.open(image, true);
  file.useSyncIo(); // two small reads of a one-shot command
  try {
    const head = new Uint8Array(Math.min(4096, file.size));
    await file.readAt(head, 0);
    const tail = new Uint8Array(Math.min(512, file.size));
    await file.readAt(tail, file.size - tail.length);
    return probeFormat({ head, tail, size: file.size, path: image }).name;
  } finally {
    await file.close();
  }
}

export async function runCheck(image: string, o: CheckCliOptions, io: Io): Promise<number> {
  const format = o.format ?? (await probe(image));
  if (format !== 'qcow2' && format !== 'vpc' && format !== 'vmdk') {
    if (!formatNames().includes(format)) {
      throw new BlockError('invalid-argument', `${image}: unknown format '${format}' (known: ${formatNames().join(', ')})`, {
        path: image,
      });
    }
    // Like qemu-img: the image must open before the format is found to have no check.
    const dev = await openImage(image, { format });
    await dev.close();
    io.err('rblock: This image format does not support checks\n');
    return EXIT_NOT_SUPPORTED;
  }
  const quiet = o.quiet === true;
  const opts = { ...(o.repair !== undefined ? { repair: o.repair } : {}), log: (line: string) => io.err(line + '\n') };
  let outcome: CheckOutcome;
  // The VHD and VMDK checkers load only for their formats: startup is a large part of a check.
  if (format === 'vpc') outcome = await (await import('../formats/vhd/check.js')).checkVhd(image, opts);
  else if (format === 'vmdk') outcome = await (await import('../formats/vmdk/check.js')).checkVmdk(image, opts);
  // A batch command: synchronous host I/O (HostFile.useSyncIo), nothing else waits on the event loop.
  else outcome = await checkQcow2(image, { ...opts, syncIo: true });
  if (outcome.repaired !== null && o.output === 'human' && !quiet) await io.out(repairedMessage(outcome.repaired));
  const c = outcome.check;
  if (c === null) {
    io.err(`rblock: Check failed: ${outcome.failure ?? 'unknown error'}\n`);
    return EXIT_FAILED;
  }
  if (!quiet) await io.out(o.output === 'json' ? jsonCheck(c) : humanCheck(c));
  if (c.checkErrors > 0) {
    io.err('rblock: Check failed\n');
    return EXIT_FAILED;
  }
  return c.corruptions > 0 ? EXIT_CORRUPT : c.leaks > 0 ? EXIT_LEAKS : EXIT_CLEAN;
}

/** Add `check` to the program (main.ts calls this). */
export function registerCheck(program: Command, io: Io, setExit: (code: number) => void): void {
  program
    .command('check')
    .description('Check a qcow2 image for consistency: leaked clusters, wrong refcounts, COPIED flags (like qemu-img check).')
    .argument('<image>', 'image file')
    .option('-f, --format <fmt>', 'image format (default: probe)')
    .addOption(new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human'))
    .addOption(
      new Option('-r, --repair <what>', 'repair: leaks (leaked clusters only) or all (also corruptions)').choices(['leaks', 'all']),
    )
    .option('-q, --quiet', 'print nothing but the per-cluster findings')
    .addHelpText(
      'after',
      '\nExit codes: 0 clean, 1 check failed, 2 corruptions, 3 leaked clusters only, 63 format has no check.\n' +
        '\nExamples:\n  rblock check disk.qcow2\n  rblock check --output json disk.qcow2\n  rblock check -r all disk.qcow2\n',
    )
    .action(async (image: string, o: CheckCliOptions) => {
      setExit(await runCheck(image, o, io));
    });
}
