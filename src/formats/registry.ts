/**
 * The format registry: probe scores, open. Adding a format is one folder
 * under src/formats plus one entry in FORMATS below.
 *
 * Probing looks at the first 4 KiB and the last 512 bytes of the file, so a
 * fixed VHD (footer only at the end) and a VMDK text descriptor can be told
 * apart from raw data.
 */
import type { BlockDevice } from '../block/device.js';
import { BlockError, fromSystemError } from '../block/errors.js';
import { deviceAsFile } from '../block/device-file.js';
import { HostFile } from '../block/file.js';
import { isNbdUri } from '../nbd/uri.js';
import { enterChain, type ChainState } from './chain.js';
import { qcow2Format } from './qcow2/index.js';
import { rawFormat } from './raw/index.js';
import { RECOGNISED_ONLY } from './recognised.js';
import { vhdFormat } from './vhd/index.js';
import { vmdkFormat } from './vmdk/index.js';

export interface ProbeInput {
  /** The first bytes of the file (up to 4 KiB; shorter for small files). */
  head: Uint8Array;
  /** The last 512 bytes (or the whole file if shorter). */
  tail: Uint8Array;
  size: number;
  path: string;
}

export interface OpenOptions {
  /** Skip probing: open as this format. */
  format?: string;
  /**
   * 'unsafe': flushes of the image file do nothing (qemu's cache=unsafe, the
   * default for qemu-img convert's target). Ordering between writes is kept,
   * durability is not: use only for an image that is rebuilt after a crash.
   */
  cache?: 'writeback' | 'unsafe';
  /** Synchronous host file I/O (HostFile.useSyncIo), for batch commands only; backing files too. */
  syncIo?: boolean;
  /** Writes on the event loop's thread while they are quick (HostFile.useQuickWrites): for servers. */
  quickWrites?: boolean;
  /** Default true: tools that only look must not be able to change anything. */
  readOnly?: boolean;
  /**
   * Override the backing file named in the image: a path (relative to the
   * working directory), or null to open the image without its backing file.
   */
  backing?: string | null;
  /** Format of the backing override. */
  backingFormat?: string;
  /**
   * VHD only (qemu's vpc force_size_calc): size the disk from the CHS geometry
   * or from the footer's current_size instead of deciding by creator application.
   */
  forceSizeCalc?: 'chs' | 'current_size';
}

/** Everything a driver needs to open an image and, through it, its backing chain. */
export interface OpenContext {
  path: string;
  readOnly: boolean;
  options: OpenOptions;
  chain: ChainState;
  /** Open another image of the same chain (a backing file), one level deeper. */
  openBacking(path: string, format: string | undefined, referrer: string): Promise<BlockDevice>;
}

export interface FormatDriver {
  /** qemu's name for the format: raw, qcow2, vpc, vmdk. */
  readonly name: string;
  /** 0 = not this format; higher wins. raw answers 1 for anything. */
  probe(p: ProbeInput): number;
  open(file: HostFile, ctx: OpenContext): Promise<BlockDevice>;
}

/** Formats recognised only to refuse them clearly instead of reading them as raw. */
export interface RecognisedFormat {
  readonly name: string;
  readonly description: string;
  probe(p: ProbeInput): number;
}

export const FORMATS: readonly FormatDriver[] = [qcow2Format, vhdFormat, vmdkFormat, rawFormat];

export function formatNames(): string[] {
  return FORMATS.map((f) => f.name);
}

const PROBE_HEAD = 4096;
const PROBE_TAIL = 512;

async function probeInput(file: HostFile): Promise<ProbeInput> {
  const head = new Uint8Array(Math.min(PROBE_HEAD, file.size));
  await file.readAt(head, 0);
  const tailLen = Math.min(PROBE_TAIL, file.size);
  const tail = new Uint8Array(tailLen);
  await file.readAt(tail, file.size - tailLen);
  return { head, tail, size: file.size, path: file.path };
}

/** The best-scoring format for this input, or a clear refusal for known-but-unsupported ones. */
export function probeFormat(p: ProbeInput): FormatDriver {
  let best: FormatDriver | null = null;
  let bestScore = 0;
  for (const f of FORMATS) {
    const s = f.probe(p);
    if (s > bestScore) {
      best = f;
      bestScore = s;
    }
  }
  for (const r of RECOGNISED_ONLY) {
    const s = r.probe(p);
    if (s > bestScore) {
      throw new BlockError(
        'unsupported-feature',
        `${p.path}: this is a ${r.description} image; rblock does not support the ${r.name} format`,
        { path: p.path, structure: 'format probe', op: 'open' },
      );
    }
  }
  if (best === null) throw new BlockError('invalid-image', `${p.path}: unknown image format`, { path: p.path });
  return best;
}

function driverByName(name: string, path: string): FormatDriver {
  const f = FORMATS.find((d) => d.name === name);
  if (f !== undefined) return f;
  const r = RECOGNISED_ONLY.find((d) => d.name === name);
  if (r !== undefined) {
    throw new BlockError('unsupported-feature', `${path}: rblock does not support the ${name} format (${r.description})`, {
      path,
      op: 'open',
    });
  }
  throw new BlockError('invalid-argument', `${path}: unknown format '${name}' (known: ${formatNames().join(', ')})`, {
    path,
    op: 'open',
  });
}

async function openInChain(path: string, format: string | undefined, options: OpenOptions, chain: ChainState): Promise<BlockDevice> {
  const readOnly = options.readOnly ?? true;
  let file: HostFile;
  let export_: BlockDevice | null = null;
  if (isNbdUri(path)) {
    // nbd://, nbds://, nbd+unix://, nbds+unix://: the export's bytes, probed
    // like a file (as qemu-img does), so a qcow2/VHD/VMDK file served as it
    // is on disk (nbdkit file, qemu-nbd -f raw) opens as that format. The
    // client is loaded on demand.
    const { openNbd } = await import('../nbd/client-device.js');
    export_ = await openNbd(path, { readOnly });
    if (format === 'raw') return export_;
    file = deviceAsFile(export_, path);
  } else {
    file = await HostFile.open(path, readOnly);
    if (options.cache === 'unsafe') file.unsafe = true;
    if (options.syncIo === true) file.useSyncIo();
    else if (options.quickWrites === true && !readOnly) file.useQuickWrites();
  }
  try {
    const driver = format !== undefined ? driverByName(format, path) : probeFormat(await probeInput(file));
    // Raw bytes of an export: the NBD device itself (its block status and request limits).
    if (export_ !== null && driver === rawFormat) return export_;
    const ctx: OpenContext = {
      path,
      readOnly,
      options,
      chain,
      openBacking: async (bpath, bformat, referrer) => {
        const next = await enterChain(chain, bpath, referrer);
        // Backing files are only read: writes go to the top image.
        return openInChain(bpath, bformat, { readOnly: true, ...(options.syncIo === true ? { syncIo: true } : {}) }, next);
      },
    };
    return await driver.open(file, ctx);
  } catch (e) {
    await file.close();
    throw fromSystemError(e, path, 'open');
  }
}

/** Open an image file (or raw file) as a block device, with its backing chain. */
export async function openImage(path: string, options: OpenOptions = {}): Promise<BlockDevice> {
  const chain = await enterChain({ depth: 0, seen: [] }, path);
  return openInChain(path, options.format, options, chain);
}
