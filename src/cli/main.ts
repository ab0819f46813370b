/**
 * The rblock command line: a thin adapter over the library. Option names
 * follow qemu-img where it has them (-f, --output, --backing-chain).
 */
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { BlockError } from '../block/errors.js';
import { parseSize } from '../util/size.js';
import { rblockVersion } from '../util/version.js';
import { reportError } from './errors.js';
import { processIo, type Io } from './io.js';

function sizeArg(what: string) {
  return (v: string): number => {
    try {
      return parseSize(v, what);
    } catch (e) {
      throw new InvalidArgumentError(e instanceof Error ? e.message : String(e));
    }
  };
}

const outputOption = () => new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human');

type Register = (program: Command, io: Io, setExit: (code: number) => void) => void;

/**
 * Commands whose modules pull in a server, a checker or a comparer: loaded
 * only when that command runs (or for the full help), so `rblock info` does
 * not pay node's module loading for all of rblock (startup is most of a small
 * command's time).
 */
const LAZY_COMMANDS: Record<string, () => Promise<Register>> = {
  serve: async () => (await import('./serve.js')).registerServe,
  check: async () => (await import('./check.js')).registerCheck,
  compare: async () => (await import('./compare.js')).registerCompare,
  delta: async () => (await import('./delta.js')).registerDelta,
  rpc: async () => (await import('./rpc.js')).registerRpc,
};

/** The program with every command, or (given `only`) the inline ones plus that lazy one. */
export async function buildProgram(io: Io, setExit: (code: number) => void, only?: string): Promise<Command> {
  const program = buildInlineCommands(io, setExit);
  for (const [name, load] of Object.entries(LAZY_COMMANDS)) {
    if (only === undefined || only === name) (await load())(program, io, setExit);
  }
  return program;
}

function buildInlineCommands(io: Io, setExit: (code: number) => void): Command {
  const program = new Command();
  program
    .name('rblock')
    .description(
      'Virtual disk images and block devices: qcow2, raw, VHD and VMDK images, inspected, converted, checked, compared and served over NBD.',
    )
    .version(rblockVersion(), '-V, --version')
    .option('--debug', 'print stack traces with errors')
    .showHelpAfterError('(run with --help for usage)')
    .configureOutput({ writeOut: (s) => void io.out(s), writeErr: (s) => io.err(s) })
    .exitOverride();

  program
    .command('info')
    .description('Show what an image is: format, sizes, backing file, qcow2 features, snapshots, bitmaps (like qemu-img info).')
    .argument('<image>', 'image file')
    .option('-f, --format <fmt>', 'image format (default: probe)')
    .addOption(outputOption())
    .option('--backing-chain', 'also show every image of the backing chain')
    .addHelpText('after', '\nExamples:\n  rblock info disk.qcow2\n  rblock info --output json --backing-chain overlay.qcow2\n')
    .action(async (image: string, o: { format?: string; output: 'human' | 'json'; backingChain?: boolean }) => {
      setExit(await (await import('./info.js')).runInfo(image, o, io));
    });

  program
    .command('map')
    .description('Show which guest ranges hold data, zeros or nothing, and where they live (like qemu-img map).')
    .argument('<image>', 'image file')
    .option('-f, --format <fmt>', 'image format (default: probe)')
    .addOption(outputOption())
    .addHelpText('after', '\nJSON entries: {start, length, depth, present, zero, data[, offset]}, as qemu-img map --output=json.\n')
    .action(async (image: string, o: { format?: string; output: 'human' | 'json' }) => {
      setExit(await (await import('./map.js')).runMap(image, o, io));
    });

  program
    .command('inspect')
    .description(
      'Decode the on-disk structures: qcow2 header fields with offsets, extensions, L1/L2 entries, refcounts; VHD footer/header/BAT; VMDK header/descriptor/grain tables.',
    )
    .argument('<image>', 'qcow2 image file')
    .option('-f, --format <fmt>', 'image format (default: probe)')
    .option('--l1', 'list the allocated L1 entries')
    .option('--l2 <index>', 'decode the L2 table of this L1 index, entry by entry', (v) => {
      const n = Number(v);
      if (!Number.isSafeInteger(n) || n < 0) throw new InvalidArgumentError('expected an L1 index (a whole number)');
      return n;
    })
    .option('--refcounts', 'show the refcount table and a summary of each refcount block')
    .option('--block <n>', 'VHD: decode the sector bitmap of this block (a BAT index)', (v) => {
      const n = Number(v);
      if (!Number.isSafeInteger(n) || n < 0) throw new InvalidArgumentError('expected a block number (a whole number)');
      return n;
    })
    .option('--gt <n>', 'VMDK: decode grain table N (numbered across the sparse extents), entry by entry', (v) => {
      const n = Number(v);
      if (!Number.isSafeInteger(n) || n < 0) throw new InvalidArgumentError('expected a grain table number (a whole number)');
      return n;
    })
    .addOption(outputOption())
    .addHelpText('after', '\nExamples:\n  rblock inspect disk.qcow2 --l1\n  rblock inspect disk.qcow2 --l2 0 --output json\n')
    .action(
      async (
        image: string,
        o: { format?: string; l1?: boolean; l2?: number; refcounts?: boolean; block?: number; gt?: number; output: 'human' | 'json' },
      ) => {
        setExit(await (await import('./inspect.js')).runInspect(image, o, io));
      },
    );

  program
    .command('read')
    .description('Read guest bytes: the whole disk (flatten to raw) or a range, to a file, stdout or a hexdump.')
    .argument('<image>', 'image file')
    .option('-f, --format <fmt>', 'image format (default: probe)')
    .option('--offset <n>', 'guest offset (K, M, G, T suffixes)', sizeArg('offset'))
    .option('--length <n>', 'number of bytes (default: to the end)', sizeArg('length'))
    .option('--output <file>', 'write to this file (sparse: zero runs become holes)')
    .option('--hexdump', 'print in the hexdump -C layout, with guest offsets')
    .addHelpText(
      'after',
      '\nExamples:\n  rblock read disk.qcow2 --output disk.raw\n  rblock read disk.qcow2 --offset 1M --length 512 --hexdump\n',
    )
    .action(async (image: string, o: { format?: string; offset?: number; length?: number; output?: string; hexdump?: boolean }) => {
      setExit(await (await import('./read.js')).runRead(image, o, io));
    });

  program
    .command('create')
    .description('Create a new image (like qemu-img create).')
    .argument('<image>', 'the image file to create')
    .argument('[size]', "virtual size (K, M, G, T suffixes); defaults to the backing file's", sizeArg('size'))
    .option('-f, --format <fmt>', 'image format: qcow2, raw, vpc (VHD) or vmdk', 'raw')
    .option(
      '-o, --options <list>',
      'format options: cluster_size=, refcount_bits=, compat=0.10|1.1, extended_l2=on|off, compression_type=zlib|zstd, lazy_refcounts=on|off, preallocation=off|metadata|full, data_file=, data_file_raw=on|off',
      (v: string, prev: string[] = []) => [...prev, v],
    )
    .option('-b, --backing <file>', 'backing file (name stored as given, relative to the new image)')
    .option('-F, --backing-format <fmt>', 'format of the backing file')
    .option('-u, --unsafe', 'do not open the backing file (a size must then be given)')
    .option('-q, --quiet', 'print nothing')
    .addHelpText(
      'after',
      '\nExamples:\n  rblock create -f qcow2 disk.qcow2 20G\n  rblock create -f qcow2 -o cluster_size=2M,compression_type=zstd big.qcow2 1T\n  rblock create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2\n',
    )
    .action(
      async (
        image: string,
        size: number | undefined,
        o: { format: string; options?: string[]; backing?: string; backingFormat?: string; unsafe?: boolean; quiet?: boolean },
      ) => {
        setExit(await (await import('./create.js')).runCreate(image, size, o, io));
      },
    );

  program
    .command('convert')
    .description(
      'Copy an image (any format rblock reads, chains flattened) into a new qcow2, raw, vpc (VHD) or vmdk image, sparsely (like qemu-img convert).',
    )
    .argument('<source>', 'source image')
    .argument('<target>', 'target image')
    .option('-f, --format <fmt>', 'source format (default: probe)')
    .requiredOption('-O, --output-format <fmt>', 'target format: qcow2, raw, vpc or vmdk')
    .option('-c, --compress', 'compress data clusters (qcow2; zlib, or zstd with -o compression_type=zstd)')
    .option('-o, --options <list>', 'target creation options, as for create', (v: string, prev: string[] = []) => [...prev, v])
    .option('-B, --backing <file>', 'backing file of the target')
    .option('-F, --backing-format <fmt>', 'format of the backing file')
    .option('-p, --progress', 'show a progress bar (on a terminal)')
    .option('-n, --no-create', 'do not create the target: it exists already')
    .option('--target-is-zero', 'with -n: the target reads as zeros, so zero runs are skipped')
    .option(
      '--preset <name>',
      'azure: with -O vpc, a fixed VHD of a whole number of MiB, as Azure requires; esxi: with -O vmdk, a streamOptimized VMDK (lsilogic) as ESXi imports it',
    )
    .addHelpText(
      'after',
      '\nExamples:\n  rblock convert -O qcow2 disk.raw disk.qcow2\n  rblock convert -c -O qcow2 -o compression_type=zstd disk.qcow2 small.qcow2\n  rblock convert -O raw overlay.qcow2 flat.raw\n',
    )
    .action(
      async (
        source: string,
        target: string,
        o: {
          format?: string;
          outputFormat: string;
          compress?: boolean;
          options?: string[];
          backing?: string;
          backingFormat?: string;
          progress?: boolean;
          create: boolean;
          targetIsZero?: boolean;
        },
      ) => {
        setExit(await (await import('./convert.js')).runConvert(source, target, { ...o, noCreate: !o.create }, io));
      },
    );

  program
    .command('commit')
    .description("Write an overlay's clusters into its backing file, then empty the overlay (like qemu-img commit).")
    .argument('<image>', 'the overlay (qcow2)')
    .option('-f, --format <fmt>', 'image format (default: probe)')
    .option('-q, --quiet', 'print nothing')
    .action(async (image: string, o: { format?: string; quiet?: boolean }) => {
      setExit(await (await import('./chain-ops.js')).runCommit(image, o, io));
    });

  program
    .command('rebase')
    .description('Change the backing file of an image; safe mode keeps the guest content (like qemu-img rebase).')
    .argument('<image>', 'the image (qcow2) to rebase')
    .requiredOption('-b, --backing <file>', 'new backing file (relative to the image; "" for none)')
    .option('-F, --backing-format <fmt>', 'format of the new backing file (default: probe)')
    .option('-f, --format <fmt>', 'image format (default: probe)')
    .option('-u, --unsafe', 'only rewrite the backing file name; copy nothing')
    .addHelpText(
      'after',
      '\nExamples:\n  rblock rebase -b new-base.qcow2 -F qcow2 overlay.qcow2\n  rblock rebase -u -b moved/base.qcow2 overlay.qcow2\n',
    )
    .action(async (image: string, o: { backing: string; backingFormat?: string; format?: string; unsafe?: boolean }) => {
      setExit(await (await import('./chain-ops.js')).runRebase(image, o, io));
    });

  program
    .command('resize')
    .description('Change the virtual size of a qcow2 or raw image (like qemu-img resize).')
    .argument('<image>', 'image file')
    .argument('<size>', 'new size, or +SIZE / -SIZE relative to the current one (K, M, G, T)')
    .option('-f, --format <fmt>', 'image format (default: probe)')
    .option('--shrink', 'allow shrinking (refused if anything allocated would be cut)')
    .option('-q, --quiet', 'print nothing')
    .action(async (image: string, size: string, o: { format?: string; shrink?: boolean; quiet?: boolean }) => {
      setExit(await (await import('./chain-ops.js')).runResize(image, size, o, io));
    });

  return program;
}

const INLINE = new Set(['info', 'map', 'inspect', 'read', 'create', 'convert', 'commit', 'rebase', 'resize']);
function isInline(name: string): boolean {
  return INLINE.has(name);
}

/** Whether `name` is a command (bin/rblock.cjs keeps a code cache per command). */
export function isCommand(name: string): boolean {
  return isInline(name) || Object.hasOwn(LAZY_COMMANDS, name);
}

/** Run the CLI with these arguments; resolves to the exit code. */
export async function main(argv: string[], io: Io = processIo): Promise<number> {
  let code = 0;
  // Only the command being run is loaded; anything else (help, a typo) gets them all.
  const first = argv.find((a) => !a.startsWith('-'));
  // `--version` alone needs no command at all (help, on the other hand, lists every command).
  const versionOnly =
    first === undefined && argv.some((a) => a === '-V' || a === '--version') && !argv.some((a) => a === '-h' || a === '--help');
  const only =
    first !== undefined && first in LAZY_COMMANDS ? first : (first !== undefined && isInline(first)) || versionOnly ? '' : undefined;
  const program = await buildProgram(io, (c) => (code = c), only);
  const debug = argv.includes('--debug');
  if (argv.length === 0) {
    program.outputHelp();
    return 0;
  }
  try {
    await program.parseAsync(argv, { from: 'user' });
    return code;
  } catch (e) {
    if (e instanceof CommanderError) return e.exitCode === 0 ? 0 : 1;
    if ((e as NodeJS.ErrnoException)?.code === 'EPIPE') return 0;
    return reportError(e instanceof Error || e instanceof BlockError ? e : new Error(String(e)), debug, io.err);
  }
}
