/** `rblock delta`: a qcow2 overlay of BASE holding exactly the clusters where TARGET differs. */
import { Option, type Command } from 'commander';
import { createDelta } from '../copy/delta.js';
import { parseOptionList } from '../formats/create.js';
import { openImage } from '../formats/registry.js';
import type { Io } from './io.js';

export interface DeltaCliOptions {
  base: string;
  target: string;
  output: string;
  baseFormat?: string;
  targetFormat?: string;
  backingPath?: string;
  options?: string[];
  report: 'human' | 'json';
  quiet?: boolean;
}

export async function runDelta(o: DeltaCliOptions, io: Io): Promise<number> {
  // A batch command: synchronous host I/O (HostFile.useSyncIo), nothing else waits on the event loop.
  await using base = await openImage(o.base, { syncIo: true, ...(o.baseFormat !== undefined ? { format: o.baseFormat } : {}) });
  await using target = await openImage(o.target, { syncIo: true, ...(o.targetFormat !== undefined ? { format: o.targetFormat } : {}) });
  const options: Record<string, string> = {};
  for (const list of o.options ?? []) Object.assign(options, parseOptionList(list));
  const r = await createDelta(base, target, o.output, {
    options,
    ...(o.backingPath !== undefined ? { backingPath: o.backingPath } : {}),
  });
  if (o.quiet) return 0;
  if (o.report === 'json') {
    const out = {
      delta: r.path,
      size: r.size,
      clusterSize: r.clusterSize,
      clusters: r.clusters,
      bytes: r.bytes,
      backingFile: r.backingFile,
      backingFormat: r.backingFormat,
    };
    await io.out(JSON.stringify(out, null, 2) + '\n');
  } else {
    const n = r.clusters;
    await io.out(
      `${r.path}: ${n} cluster${n === 1 ? '' : 's'} of ${r.clusterSize} bytes (${r.bytes} bytes) differ from ${o.base}; ` +
        `backing file ${r.backingFile} (${r.backingFormat})\n`,
    );
  }
  return 0;
}

/** Register `delta` on the program. */
export function registerDelta(program: Command, io: Io, setExit: (code: number) => void): void {
  program
    .command('delta')
    .description('Write a qcow2 overlay of BASE that allocates exactly the clusters where TARGET differs, so it reads as TARGET.')
    .requiredOption('--base <image>', 'the image the delta applies to (its backing file)')
    .requiredOption('--target <image>', 'the image the delta must read as')
    .requiredOption('-o, --output <delta>', 'the qcow2 delta to create')
    .option('--backing-path <name>', "backing file name to store (default: BASE's path relative to the delta's directory)")
    .option(
      '-O, --options <list>',
      'qcow2 creation options: cluster_size=, compat=, refcount_bits=, extended_l2=, ...',
      (v: string, prev: string[] = []) => [...prev, v],
    )
    .option('--base-format <fmt>', 'format of BASE (default: probe)')
    .option('--target-format <fmt>', 'format of TARGET (default: probe)')
    .addOption(new Option('--report <fmt>', 'report format').choices(['human', 'json']).default('human'))
    .option('-q, --quiet', 'print nothing')
    .addHelpText(
      'after',
      '\nJSON report: {delta, size, clusterSize, clusters, bytes, backingFile, backingFormat}\n' +
        '\nExamples:\n  rblock delta --base v1.raw --target v2.raw -o v1-to-v2.qcow2\n' +
        '  rblock delta --base v1.qcow2 --target v2.qcow2 -o d.qcow2 -O cluster_size=4K --backing-path /images/v1.qcow2 --report json\n',
    )
    .action(async (o: DeltaCliOptions) => {
      setExit(await runDelta(o, io));
    });
}
