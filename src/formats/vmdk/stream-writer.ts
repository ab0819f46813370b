/**
 * The streamOptimized writer (spec digest §4.1-§4.3): VMware's canonical
 * stream, produced in one forward pass over a sequential sink (a file, a
 * pipe, stdout), never seeking back:
 *
 *   sector 0     header: version 3, flags 0x30001 (newline test, compressed,
 *                markers), compressAlgorithm 1 (zlib streams), gdOffset =
 *                GD_AT_END, no redundant directory
 *   sector 1..20 the descriptor (createType="streamOptimized")
 *   overHead..   grain markers (lba, size, zlib data, padded to a sector) in
 *                increasing LBA; after the grains of each grain table's range,
 *                a GT marker and the table (only tables with grains; the others
 *                stay 0 in the directory)
 *   then         GD marker + GD, footer marker + footer (the header with the
 *                real gdOffset), end-of-stream marker
 *
 * This is the layout ESXi, ovftool and VirtualBox import (QEMU's own
 * streamOptimized, which seeks back to fill preallocated tables, is not
 * produced in one pass). All-zero grains are left out (GTE 0).
 */
import { open, type FileHandle } from 'node:fs/promises';
import { basename } from 'node:path';
import type { BlockDevice } from '../../block/device.js';
import type { ConvertStats } from '../../copy/convert.js';
import { BlockError, fromSystemError } from '../../block/errors.js';
import { isZero } from '../../block/zero.js';
import { dataView } from '../../util/bytes.js';
import { zlibCalls } from '../../util/zlib.js';
import * as C from './constants.js';
import { DEFAULT_GRAIN_SECTORS, descriptorTemplate, EMBEDDED_DESCRIPTOR_SECTORS, randomCid, sparseHeaderBytes } from './create.js';
import { extentsOf } from '../../copy/map.js';

/** Where the stream goes: bytes in order, nothing else. */
export interface SequentialSink {
  write(bytes: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

/** A sink over a path opened for writing (regular file, FIFO, /dev/stdout), buffered, written with no positions. */
export async function pathSink(path: string, bufferBytes = 1 << 20): Promise<SequentialSink> {
  if (path === '-' || path === '/dev/stdout') return stdoutSink();
  let fh: FileHandle;
  try {
    fh = await open(path, 'w');
  } catch (e) {
    throw fromSystemError(e, path, 'create');
  }
  let buf = new Uint8Array(bufferBytes);
  let used = 0;
  const drain = async (b: Uint8Array): Promise<void> => {
    let done = 0;
    while (done < b.length) {
      try {
        const { bytesWritten } = await fh.write(b, done, b.length - done, null);
        done += bytesWritten;
      } catch (e) {
        throw fromSystemError(e, path, 'write');
      }
    }
  };
  return {
    async write(bytes: Uint8Array): Promise<void> {
      if (used + bytes.length > buf.length) {
        await drain(buf.subarray(0, used));
        used = 0;
        if (bytes.length > buf.length) {
          await drain(bytes);
          return;
        }
        buf = new Uint8Array(bufferBytes);
      }
      buf.set(bytes, used);
      used += bytes.length;
    },
    async close(): Promise<void> {
      try {
        if (used > 0) await drain(buf.subarray(0, used));
      } finally {
        await fh.close();
      }
    },
  };
}

/**
 * Standard output (a pipe, a socket, a terminal, a file): through
 * process.stdout, waiting for it to drain; it is not closed.
 */
function stdoutSink(): SequentialSink {
  const out = process.stdout;
  let failed: Error | null = null;
  const onError = (e: Error): void => {
    failed = e;
  };
  out.on('error', onError);
  const check = (): void => {
    if (failed !== null) throw fromSystemError(failed, '/dev/stdout', 'write');
  };
  return {
    async write(bytes: Uint8Array): Promise<void> {
      check();
      if (!out.write(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength))) {
        await new Promise<void>((res) => {
          const done = (): void => {
            out.off('drain', done).off('error', done).off('close', done);
            res();
          };
          out.on('drain', done).on('error', done).on('close', done);
        });
        check();
      }
    },
    async close(): Promise<void> {
      await new Promise<void>((res) => out.write(new Uint8Array(0), () => res()));
      out.off('error', onError);
      check();
    },
  };
}

export interface StreamWriterOptions {
  /** Disk size in bytes (a multiple of 512). */
  size: number;
  /** The embedded descriptor text. */
  descriptor: string;
  grainSectors?: number;
}

const GTES = 512;

function marker(val: number | bigint, size: number, type: number): Uint8Array {
  const m = new Uint8Array(C.SECTOR);
  const dv = dataView(m);
  dv.setBigUint64(0, BigInt(val), true);
  dv.setUint32(8, size, true);
  dv.setUint32(12, type, true);
  return m;
}

const pad = (n: number): number => Math.ceil(n / C.SECTOR) * C.SECTOR;

function padTo(b: Uint8Array, n: number): Uint8Array {
  const out = new Uint8Array(n);
  out.set(b);
  return out;
}

export class StreamOptimizedWriter {
  private pos = 0;
  private readonly grainBytes: number;
  private readonly grainSectors: number;
  private readonly capacity: number;
  private readonly gd: Uint32Array;
  private gt = new Uint32Array(GTES);
  private gtIndex = -1;
  private gtUsed = false;
  private lastGrain = -1;
  private readonly header: (gdOffset: bigint) => Uint8Array;
  private state: 'new' | 'open' | 'done' = 'new';

  constructor(
    private readonly sink: SequentialSink,
    private readonly o: StreamWriterOptions,
  ) {
    this.grainSectors = o.grainSectors ?? DEFAULT_GRAIN_SECTORS;
    this.grainBytes = this.grainSectors * C.SECTOR;
    this.capacity = Math.ceil(o.size / C.SECTOR);
    this.gd = new Uint32Array(Math.ceil(this.capacity / (GTES * this.grainSectors)));
    const overhead = Math.ceil((1 + EMBEDDED_DESCRIPTOR_SECTORS) / this.grainSectors) * this.grainSectors;
    this.header = (gdOffset) =>
      sparseHeaderBytes({
        version: 3,
        flags: C.FLAG_NL_DETECT | C.FLAG_COMPRESSED | C.FLAG_MARKERS,
        capacity: this.capacity,
        grainSectors: this.grainSectors,
        descriptorOffset: 1,
        descriptorSize: EMBEDDED_DESCRIPTOR_SECTORS,
        gtes: GTES,
        rgdOffset: 0,
        gdOffset,
        overhead,
        compress: true,
      });
  }

  get grainSize(): number {
    return this.grainBytes;
  }

  /** Bytes written so far. */
  get offset(): number {
    return this.pos;
  }

  private async put(b: Uint8Array): Promise<void> {
    await this.sink.write(b);
    this.pos += b.length;
  }

  /** Header, descriptor, padding up to the first grain. */
  async begin(): Promise<void> {
    if (this.state !== 'new') throw new Error('StreamOptimizedWriter.begin called twice');
    this.state = 'open';
    const desc = new TextEncoder().encode(this.o.descriptor);
    if (desc.length > EMBEDDED_DESCRIPTOR_SECTORS * C.SECTOR)
      throw new BlockError('invalid-argument', 'the VMDK descriptor is too long to embed');
    const overhead = Math.ceil((1 + EMBEDDED_DESCRIPTOR_SECTORS) / this.grainSectors) * this.grainSectors;
    const head = new Uint8Array(overhead * C.SECTOR);
    head.set(this.header(C.GD_AT_END), 0);
    head.set(desc, C.SECTOR);
    await this.put(head);
  }

  /** Compress one grain (zlib stream, RFC 1950, as QEMU and VMware read it). Runs in the libuv pool. */
  static async compress(grain: Uint8Array): Promise<Uint8Array> {
    return (await zlibCalls()).deflate(grain);
  }

  /** Append grain number `index` (strictly increasing), already compressed. */
  async addGrain(index: number, compressed: Uint8Array): Promise<void> {
    if (this.state !== 'open') throw new Error('StreamOptimizedWriter: begin first');
    if (index <= this.lastGrain) throw new Error(`StreamOptimizedWriter: grain ${index} after grain ${this.lastGrain}`);
    if (index * this.grainSectors >= this.capacity) throw new Error(`StreamOptimizedWriter: grain ${index} is past the end`);
    this.lastGrain = index;
    const gdi = Math.floor(index / GTES);
    if (gdi !== this.gtIndex) await this.endTable(gdi);
    const m = new Uint8Array(pad(C.GRAIN_MARKER_HEADER + compressed.length));
    const dv = dataView(m);
    dv.setBigUint64(0, BigInt(index * this.grainSectors), true);
    dv.setUint32(8, compressed.length, true);
    m.set(compressed, C.GRAIN_MARKER_HEADER);
    this.gt[index % GTES] = this.pos / C.SECTOR;
    this.gtUsed = true;
    await this.put(m);
  }

  /** Write the grain table being filled (if it has grains) and start table `next`. */
  private async endTable(next: number): Promise<void> {
    if (this.gtUsed) {
      await this.put(marker(Math.ceil((GTES * 4) / C.SECTOR), 0, C.MARKER_GT));
      this.gd[this.gtIndex] = this.pos / C.SECTOR;
      const b = new Uint8Array(pad(GTES * 4));
      const dv = dataView(b);
      for (let i = 0; i < GTES; i++) dv.setUint32(i * 4, this.gt[i] as number, true);
      await this.put(b);
      this.gt = new Uint32Array(GTES);
    }
    this.gtIndex = next;
    this.gtUsed = false;
  }

  /** The last grain table, the grain directory, the footer and the end-of-stream marker; closes the sink. */
  async finish(): Promise<void> {
    if (this.state !== 'open') throw new Error('StreamOptimizedWriter: begin first');
    this.state = 'done';
    try {
      await this.endTable(-1);
      const gdBytes = pad(this.gd.length * 4);
      await this.put(marker(gdBytes / C.SECTOR, 0, C.MARKER_GD));
      const gdSector = this.pos / C.SECTOR;
      const b = new Uint8Array(gdBytes);
      const dv = dataView(b);
      for (let i = 0; i < this.gd.length; i++) dv.setUint32(i * 4, this.gd[i] as number, true);
      await this.put(b);
      await this.put(marker(1, 0, C.MARKER_FOOTER));
      await this.put(this.header(BigInt(gdSector)));
      await this.put(marker(0, 0, C.MARKER_EOS));
    } finally {
      await this.sink.close();
    }
  }
}

/** The options of `convert -O vmdk -o subformat=streamOptimized` (as for create). */
const STREAM_KEYS = ['subformat', 'adapter_type', 'hwversion', 'toolsversion', 'compat6', 'size'];

/** The embedded descriptor of a new stream. */
export function streamDescriptor(path: string, size: number, o: Record<string, string>): string {
  for (const k of Object.keys(o)) {
    if (!STREAM_KEYS.includes(k)) {
      throw new BlockError(
        'invalid-argument',
        `a streamOptimized VMDK written by convert has no option '${k}' (known: ${STREAM_KEYS.join(', ')})`,
      );
    }
  }
  const adapterType = o['adapter_type'] ?? 'ide';
  if (!['ide', 'buslogic', 'lsilogic', 'legacyESX'].includes(adapterType)) {
    throw new BlockError('invalid-argument', `Unknown adapter type: '${adapterType}'`);
  }
  const compat6 = o['compat6'] !== undefined && ['on', 'true', 'yes', '1'].includes(o['compat6']);
  return descriptorTemplate({
    cid: randomCid(),
    parentCid: 0xffff_ffff,
    createType: 'streamOptimized',
    extentLines: [`RW ${Math.ceil(size / C.SECTOR)} SPARSE "${basename(path)}"`],
    sizeBytes: size,
    adapterType,
    hwversion: o['hwversion'] ?? (compat6 ? '6' : '4'),
    toolsVersion: o['toolsversion'] ?? '2147483647',
  });
}

/** The same counts as convert reports. */
export type StreamConvertStats = ConvertStats;

/**
 * `convert -O vmdk -o subformat=streamOptimized`: the source read in order,
 * windows read and compressed ahead (zlib in the libuv pool: every core
 * works) while the stream is written strictly forward into `dstPath`, which
 * may be a pipe.
 */
export async function convertToStreamOptimized(
  src: BlockDevice,
  dstPath: string,
  o: { options?: Record<string, string>; window?: number; onProgress?: (done: number, total: number) => void },
): Promise<StreamConvertStats> {
  const size = Math.ceil(src.size / C.SECTOR) * C.SECTOR;
  const descriptor = streamDescriptor(dstPath, size, o.options ?? {});
  const sink = await pathSink(dstPath);
  const w = new StreamOptimizedWriter(sink, { size, descriptor });
  const gb = w.grainSize;
  const win = Math.max(gb, Math.floor((o.window ?? 4 << 20) / gb) * gb);
  const stats: StreamConvertStats = { bytesRead: 0, bytesWritten: 0, zeroBytes: 0, compressedClusters: 0 };
  type Packed = { index: number; data: Uint8Array }[];
  const prepare = async (offset: number): Promise<Packed> => {
    const length = Math.min(win, src.size - offset);
    const ext = await extentsOf(src, offset, length);
    if (ext.every((e) => e.zero)) {
      stats.zeroBytes += length;
      return [];
    }
    const data = new Uint8Array(length);
    await src.pread(data, offset);
    stats.bytesRead += length;
    const jobs: Promise<{ index: number; data: Uint8Array } | null>[] = [];
    for (let p = 0; p < length; p += gb) {
      const chunk = data.subarray(p, Math.min(p + gb, length));
      if (isZero(chunk)) {
        stats.zeroBytes += chunk.length;
        continue;
      }
      const index = (offset + p) / gb;
      // A last grain of a source that is not whole sectors: padded to the sector (the disk is).
      const whole = chunk.length % C.SECTOR === 0 ? chunk : padTo(chunk, Math.ceil(chunk.length / C.SECTOR) * C.SECTOR);
      jobs.push(StreamOptimizedWriter.compress(whole).then((c) => ({ index, data: c })));
    }
    return (await Promise.all(jobs)).filter((x) => x !== null);
  };
  let failed = true;
  try {
    await w.begin();
    const depth = 3;
    const pending: Promise<Packed>[] = [];
    let next = 0;
    const fill = (): void => {
      while (pending.length < depth && next < src.size) {
        const p = prepare(next);
        p.catch(() => {}); // surfaced when awaited below
        pending.push(p);
        next += win;
      }
    };
    fill();
    let done = 0;
    while (pending.length > 0) {
      const grains = await (pending.shift() as Promise<Packed>);
      fill();
      for (const g of grains) {
        await w.addGrain(g.index, g.data);
        stats.compressedClusters++;
        stats.bytesWritten += g.data.length;
      }
      done = Math.min(done + win, src.size);
      o.onProgress?.(done, src.size);
    }
    await w.finish();
    failed = false;
  } finally {
    if (failed) await sink.close().catch(() => {});
  }
  return stats;
}
