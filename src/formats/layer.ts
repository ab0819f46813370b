/**
 * What a format driver provides: its own layer's mapping as data, plus a way
 * to read the runs it stores. chain.ts turns a layer and its backing device
 * into a full device (reads falling through, extents with depth), the way
 * QEMU's block/io.c does the generic work over each BlockDriver.
 */
import type { BlockDevice } from '../block/device.js';

/** data@host | zero | unallocated | compressed@host */
export type RunKind = 'data' | 'zero' | 'unallocated' | 'compressed';

export interface LayerRun {
  /** Guest offset. */
  offset: number;
  length: number;
  kind: RunKind;
  /**
   * For data: where the first byte lives in `file`. Zero and unallocated runs
   * carry it too when the format still has host space for them (a qcow2
   * preallocated zero cluster, an unallocated subcluster of an allocated
   * cluster): qemu-img map reports that offset.
   */
  hostOffset?: number;
  /** The host file holding the data (the image itself or an external data file). */
  file?: string;
}

/** Facts shown by `rblock info`; field names follow `qemu-img info --output=json`. */
export interface ImageInfo {
  'virtual-size': number;
  filename: string;
  format: string;
  'actual-size'?: number;
  'cluster-size'?: number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'dirty-flag'?: boolean;
  snapshots?: SnapshotInfo[];
  'format-specific'?: { type: string; data: Record<string, unknown> };
}

export interface SnapshotInfo {
  id: string;
  name: string;
  'vm-state-size': number;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number;
  'vm-clock-nsec': number;
  icount?: number;
}

export interface Layer {
  readonly size: number;
  readonly format: string;
  readonly path: string;
  readonly readOnly: boolean;
  /** The image below this one, or null. Owned by the layer: closed with it. */
  readonly backing: BlockDevice | null;
  /** Runs covering [offset, offset + length) contiguously, for this layer only. */
  map(offset: number, length: number): Promise<LayerRun[]>;
  /**
   * Read the bytes of a 'data' or 'compressed' run (as returned by map) into
   * buf, starting at guest offset `offset` inside the run.
   */
  readRun(buf: Uint8Array, run: LayerRun, offset: number): Promise<void>;
  /** map from what is in memory now, or null (see BlockDevice.readNow). */
  mapNow?(offset: number, length: number): LayerRun[] | null;
  /** readRun at once from the host's page cache, or false. */
  readRunNow?(buf: Uint8Array, run: LayerRun, offset: number): boolean;
  /**
   * The host file bytes that [offset, offset + length) of a 'data' run are,
   * when they are in the page cache now (see BlockDevice.spansNow), or null.
   */
  spanRunNow?(run: LayerRun, offset: number, length: number): { fd: number; hostOffset: number } | null;
  info(): Promise<ImageInfo>;
  close(): Promise<void>;

  /** Writable layers (opened with readOnly: false) implement these. */
  write?(buf: Uint8Array, offset: number): Promise<void>;
  writeZeroes?(offset: number, length: number, mayTrim: boolean): Promise<void>;
  discard?(offset: number, length: number): Promise<void>;
  flush?(): Promise<void>;
}
