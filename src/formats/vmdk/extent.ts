/**
 * One extent of a VMDK disk (spec digest §1.3): a guest byte range backed by
 * a flat file, a hosted sparse file, or nothing (ZERO). Extents answer in
 * guest coordinates; the layer (image.ts) finds the extent for each range.
 * Flat and zero extents live here; sparse ones in sparse.ts.
 */
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import type { LayerRun } from '../layer.js';
import type { ExtentLine } from './descriptor.js';

/** A run of the layer's mapping, tagged with the extent that answers for it. */
export interface VmdkRun extends LayerRun {
  extent: number;
  /** Compressed runs: guest offset of the grain start and byte offset of its grain marker. */
  grainStart?: number;
  grainHost?: number;
}

/** One entry of qemu's format-specific `extents` list (field names as qemu-img info prints them). */
export interface VmdkExtentInfo {
  compressed?: boolean;
  'virtual-size': number;
  filename: string;
  'cluster-size'?: number;
  format: string;
}

export interface VmdkExtent {
  readonly kind: 'flat' | 'sparse' | 'zero' | 'noaccess';
  /** Index in the descriptor's extent list. */
  readonly index: number;
  /** The descriptor line, or null for a sparse file opened directly (monolithicSparse, streamOptimized). */
  readonly line: ExtentLine | null;
  /** Guest byte range [start, start + length). */
  readonly start: number;
  readonly length: number;
  /** The host file holding the extent's data, if any. */
  readonly file: HostFile | null;
  /** Runs covering [offset, offset + length), guest coordinates, inside this extent. */
  map(offset: number, length: number): Promise<VmdkRun[]>;
  /** Read bytes of a data or compressed run, from guest `offset`. */
  read(buf: Uint8Array, run: VmdkRun, offset: number): Promise<void>;
  info(): VmdkExtentInfo;
  close(): Promise<void>;
}

/** FLAT and VMFS extents (§5): raw bytes at OFFSET sectors in the file. */
export class FlatExtent implements VmdkExtent {
  readonly kind = 'flat';
  constructor(
    readonly index: number,
    readonly line: ExtentLine,
    readonly start: number,
    readonly length: number,
    readonly file: HostFile,
    /** Byte offset of the extent's first byte in the file. */
    readonly base: number,
  ) {}

  async map(offset: number, length: number): Promise<VmdkRun[]> {
    return [{ offset, length, kind: 'data', hostOffset: this.base + (offset - this.start), file: this.file.path, extent: this.index }];
  }

  /** Bytes past the end of a short flat file read as zeros (as QEMU reads them). */
  read(buf: Uint8Array, _run: VmdkRun, offset: number): Promise<void> {
    return this.file.readAt(buf, this.base + (offset - this.start));
  }

  info(): VmdkExtentInfo {
    return { 'virtual-size': this.length, filename: this.file.path, format: this.line.type };
  }

  close(): Promise<void> {
    return this.file.close();
  }

  get path(): string {
    return this.file.path;
  }
}

/** ZERO extents (§1.3): no file, reads zeros. QEMU skips these lines; rblock honours them. */
export class ZeroExtent implements VmdkExtent {
  readonly kind = 'zero';
  readonly file = null;
  constructor(
    readonly index: number,
    readonly line: ExtentLine,
    readonly start: number,
    readonly length: number,
  ) {}

  async map(offset: number, length: number): Promise<VmdkRun[]> {
    return [{ offset, length, kind: 'zero', extent: this.index }];
  }

  async read(buf: Uint8Array): Promise<void> {
    buf.fill(0);
  }

  info(): VmdkExtentInfo {
    return { 'virtual-size': this.length, filename: '', format: 'ZERO' };
  }

  async close(): Promise<void> {}
}

/** NOACCESS extents (§1.3): part of the disk that may not be read. Reading it fails clearly. */
export class NoAccessExtent implements VmdkExtent {
  readonly kind = 'noaccess';
  readonly file = null;
  constructor(
    readonly index: number,
    readonly line: ExtentLine,
    readonly start: number,
    readonly length: number,
    private readonly path: string,
  ) {}

  async map(offset: number, length: number): Promise<VmdkRun[]> {
    return [{ offset, length, kind: 'data', extent: this.index }];
  }

  async read(_buf: Uint8Array, _run: VmdkRun, offset: number): Promise<void> {
    throw new BlockError(
      'unsupported-feature',
      `${this.path}: guest offset ${offset} is in VMDK extent ${this.index} ("${this.line.file ?? ''}", descriptor line ${this.line.line}), which is marked NOACCESS`,
      { path: this.path, structure: 'VMDK extent', offset, op: 'read' },
    );
  }

  info(): VmdkExtentInfo {
    return { 'virtual-size': this.length, filename: this.line.file ?? '', format: this.line.type };
  }

  async close(): Promise<void> {}
}
