/**
 * `create`: make a new image of a format, with qemu-img's option names
 * (-o key=value,...). The backing file, when given, is checked by opening it
 * (relative to the new image's directory) and gives the default size.
 */
import { open } from 'node:fs/promises';
import { BlockError, fromSystemError } from '../block/errors.js';
import { parseSize } from '../util/size.js';
import { resolveRelative } from './chain.js';
import { createQcow2, type Qcow2CreateOptions } from './qcow2/create.js';
import { createVmdkImage } from './vmdk/create.js';
import { openImage } from './registry.js';
import { createVpc } from './vhd/create.js';

export interface CreateRequest {
  format: string;
  path: string;
  /** Bytes; defaults to the backing file's size. */
  size?: number;
  options?: Record<string, string>;
  backingFile?: string;
  backingFormat?: string;
  /** Do not open the backing file (qemu-img create -u). */
  unsafe?: boolean;
}

/** Parse qemu's `-o a=b,c=d` (a doubled comma escapes a comma). */
export function parseOptionList(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  const ESC = '\u{e000}'; // a private-use character stands in for an escaped comma
  for (const part of text.split(',,').join(ESC).split(',')) {
    if (part.trim() === '') continue;
    const eq = part.indexOf('=');
    const k = (eq < 0 ? part : part.slice(0, eq)).trim();
    out[k] = (eq < 0 ? 'on' : part.slice(eq + 1)).split(ESC).join(',');
  }
  return out;
}

function onOff(v: string | undefined, key: string): boolean | undefined {
  if (v === undefined) return undefined;
  if (['on', 'true', 'yes', '1'].includes(v)) return true;
  if (['off', 'false', 'no', '0'].includes(v)) return false;
  throw new BlockError('invalid-argument', `option ${key}: expected on or off, got '${v}'`);
}

const QCOW2_KEYS = [
  'cluster_size',
  'refcount_bits',
  'compat',
  'extended_l2',
  'compression_type',
  'lazy_refcounts',
  'preallocation',
  'data_file',
  'data_file_raw',
  'backing_file',
  'backing_fmt',
  'size',
];

export async function createImage(req: CreateRequest): Promise<{ size: number; summary: string }> {
  const o = { ...(req.options ?? {}) };
  const backingFile = req.backingFile ?? o['backing_file'];
  let backingFormat = req.backingFormat ?? o['backing_fmt'];
  let size = req.size ?? (o['size'] !== undefined ? parseSize(o['size']) : undefined);
  if (backingFile !== undefined && !req.unsafe) {
    // The name is stored as given and resolved relative to the new image, as qemu does.
    await using b = await openImage(resolveRelative(req.path, backingFile), backingFormat !== undefined ? { format: backingFormat } : {});
    size ??= b.size;
    backingFormat ??= b.format;
  }
  if (size === undefined)
    throw new BlockError('invalid-argument', `${req.path}: no size given (and no backing file to take it from)`, { path: req.path });
  // qemu-img rounds every new image up to whole 512-byte sectors; so do we, so both tools see the same size.
  size = Math.ceil(size / 512) * 512;
  if (req.format === 'raw') {
    for (const k of Object.keys(o))
      if (k !== 'preallocation' && k !== 'size') throw new BlockError('invalid-argument', `raw images have no option '${k}'`);
    if (backingFile !== undefined) throw new BlockError('invalid-argument', 'raw images cannot have a backing file');
    await createRaw(req.path, size, o['preallocation'] === 'full');
    return { size, summary: `fmt=raw size=${size}` };
  }
  if (req.format === 'vmdk') return createVmdkImage(req, o, size, backingFile, backingFormat);
  if (req.format === 'vpc') return createVpc(req.path, size, o, req.size ?? size, backingFile, backingFormat);
  if (req.format !== 'qcow2') {
    throw new BlockError('not-supported', `${req.path}: creating ${req.format} images is not supported (qcow2, raw, vpc and vmdk are)`, {
      path: req.path,
    });
  }
  for (const k of Object.keys(o)) {
    if (!QCOW2_KEYS.includes(k)) throw new BlockError('invalid-argument', `qcow2 has no option '${k}' (known: ${QCOW2_KEYS.join(', ')})`);
  }
  const compat = o['compat'];
  const c: Qcow2CreateOptions = { size };
  if (o['cluster_size'] !== undefined) c.clusterSize = parseSize(o['cluster_size'], 'cluster_size');
  if (o['refcount_bits'] !== undefined) c.refcountBits = Number(o['refcount_bits']);
  if (compat !== undefined) {
    if (compat === '0.10' || compat === 'v2') c.compat = '0.10';
    else if (compat === '1.1' || compat === 'v3') c.compat = '1.1';
    else throw new BlockError('invalid-argument', `compat must be 0.10 or 1.1, not '${compat}'`);
  }
  const extL2 = onOff(o['extended_l2'], 'extended_l2');
  if (extL2 !== undefined) c.extendedL2 = extL2;
  const ct = o['compression_type'];
  if (ct !== undefined) {
    if (ct !== 'zlib' && ct !== 'zstd') throw new BlockError('invalid-argument', `compression_type must be zlib or zstd, not '${ct}'`);
    c.compressionType = ct;
  }
  const lazy = onOff(o['lazy_refcounts'], 'lazy_refcounts');
  if (lazy !== undefined) c.lazyRefcounts = lazy;
  const pre = o['preallocation'];
  if (pre !== undefined) {
    if (pre !== 'off' && pre !== 'metadata' && pre !== 'full' && pre !== 'falloc') {
      throw new BlockError('invalid-argument', `preallocation must be off, metadata or full, not '${pre}'`);
    }
    c.preallocation = pre === 'falloc' ? 'full' : pre;
  }
  if (o['data_file'] !== undefined) c.dataFile = o['data_file'];
  const raw = onOff(o['data_file_raw'], 'data_file_raw');
  if (raw !== undefined) c.dataFileRaw = raw;
  if (backingFile !== undefined) c.backingFile = backingFile;
  if (backingFormat !== undefined) c.backingFormat = backingFormat;
  await createQcow2(req.path, c);
  if (c.dataFile !== undefined) await createRaw(resolveRelative(req.path, c.dataFile), size, c.preallocation === 'full', true);
  const parts = [
    'fmt=qcow2',
    `cluster_size=${c.clusterSize ?? 65536}`,
    `extended_l2=${c.extendedL2 ? 'on' : 'off'}`,
    `compression_type=${c.compressionType ?? 'zlib'}`,
    `size=${size}`,
  ];
  if (backingFile !== undefined) parts.push(`backing_file=${backingFile}`);
  if (backingFormat !== undefined) parts.push(`backing_fmt=${backingFormat}`);
  if (c.dataFile !== undefined) parts.push(`data_file=${c.dataFile}`);
  parts.push(`lazy_refcounts=${c.lazyRefcounts ? 'on' : 'off'}`, `refcount_bits=${c.refcountBits ?? 16}`);
  return { size, summary: parts.join(' ') };
}

/** A raw file of `size` bytes: sparse, or written with zeros for preallocation=full. */
async function createRaw(path: string, size: number, full: boolean, keepExisting = false): Promise<void> {
  let fh;
  try {
    fh = await open(path, keepExisting ? 'a+' : 'w');
  } catch (e) {
    throw fromSystemError(e, path, 'create');
  }
  try {
    await fh.truncate(size);
    if (full) {
      const z = new Uint8Array(Math.min(8 << 20, Math.max(size, 1)));
      for (let p = 0; p < size; p += z.length) await fh.write(z, 0, Math.min(z.length, size - p), p);
    }
  } finally {
    await fh.close();
  }
}
