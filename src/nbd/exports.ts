/**
 * What a server serves: named exports over block devices, and the facts the
 * protocol layers derive from them (transmission flags, the chain of layers
 * that qemu:allocation-depth counts, meta contexts on offer).
 */
import type { BlockDevice } from '../block/device.js';
import { layerOf } from '../formats/chain.js';
import { CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION, MAX_STRING, TFlag, type ReplyMode } from './protocol.js';

/** One export as the library user describes it. */
export interface NbdExport {
  /** Export name ("" is the default export). */
  name: string;
  device: BlockDevice;
  /** Human-readable description (NBD_INFO_DESCRIPTION, NBD_OPT_LIST). */
  description?: string;
  /** Serve read-only even if the device is writable. Default: the device's own caps.readOnly. */
  readOnly?: boolean;
}

/** An export as the server holds it. */
export interface ServedExport {
  readonly name: string;
  readonly description: string;
  readonly device: BlockDevice;
  readonly readOnly: boolean;
  /**
   * Advertise NBD_FLAG_CAN_MULTI_CONN whenever several clients may connect
   * (nbd.md transmission flags: a flush or FUA on one connection must cover
   * writes completed on every connection). Every connection of an export
   * works on the one device object of this process, so completed writes of
   * any connection are in that device (its tables and the host file), and
   * its flush makes all of them durable: the guarantee holds for writable
   * exports too, as qemu-nbd assumes with --shared > 1.
   */
  readonly multiConn: boolean;
  /** The device and its backing devices, top first (for qemu:allocation-depth). */
  readonly chain: readonly BlockDevice[];
}

/** The meta contexts this server implements, with qemu's context ids. */
export type ContextKind = 'allocation' | 'depth';

export interface MetaContext {
  readonly id: number;
  readonly name: string;
  readonly kind: ContextKind;
}

export const META_CONTEXTS: readonly MetaContext[] = [
  { id: 0, name: CONTEXT_BASE_ALLOCATION, kind: 'allocation' },
  { id: 1, name: CONTEXT_ALLOCATION_DEPTH, kind: 'depth' },
];

/**
 * The contexts a query selects. LIST accepts the namespace wildcards `base:`
 * and `qemu:`; SET only full names. Unknown queries select nothing (no error).
 */
export function matchContexts(query: string, list: boolean): MetaContext[] {
  return META_CONTEXTS.filter((c) => c.name === query || (list && query.endsWith(':') && c.name.startsWith(query)));
}

function chainOf(dev: BlockDevice): BlockDevice[] {
  const out: BlockDevice[] = [dev];
  for (let d: BlockDevice | null | undefined = dev; out.length < 1000;) {
    d = layerOf(d)?.backing;
    if (d === null || d === undefined) break;
    out.push(d);
  }
  return out;
}

export class ExportTable {
  private readonly byName = new Map<string, ServedExport>();
  readonly list: readonly ServedExport[];

  constructor(exports: readonly NbdExport[], maxConnections: number) {
    const list: ServedExport[] = [];
    for (const e of exports) {
      if (this.byName.has(e.name)) throw new Error(`export name '${e.name}' is used twice`);
      if (Buffer.byteLength(e.name) > MAX_STRING)
        throw new Error(`export name '${e.name.slice(0, 40)}...' is longer than ${MAX_STRING} bytes`);
      const readOnly = e.readOnly === true || e.device.caps.readOnly;
      const s: ServedExport = {
        name: e.name,
        description: e.description ?? '',
        device: e.device,
        readOnly,
        multiConn: maxConnections > 1,
        chain: chainOf(e.device),
      };
      this.byName.set(e.name, s);
      list.push(s);
    }
    if (list.length === 0) throw new Error('an NBD server needs at least one export');
    this.list = list;
  }

  /** The export of this name; "" falls back to the first export when none is named "". */
  find(name: string): ServedExport | undefined {
    return this.byName.get(name) ?? (name === '' ? this.list[0] : undefined);
  }
}

/** Transmission flags of an export, for a connection in this reply mode. */
export function transmissionFlags(e: ServedExport, mode: ReplyMode): number {
  let f = TFlag.HAS_FLAGS | TFlag.SEND_FLUSH | TFlag.SEND_FUA | TFlag.SEND_CACHE;
  if (mode !== 'simple') f |= TFlag.SEND_DF;
  if (e.readOnly) f |= TFlag.READ_ONLY;
  else f |= TFlag.SEND_TRIM | TFlag.SEND_WRITE_ZEROES | TFlag.SEND_FAST_ZERO;
  if (e.multiConn) f |= TFlag.CAN_MULTI_CONN;
  return f;
}
