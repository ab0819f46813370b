/**
 * The one table of JSON-RPC methods: their params (name, type, whether
 * required, default, doc), what they return, and the code that runs them.
 * The dispatcher validates params against it, `rblock rpc --help` lists it,
 * and docs/json-rpc.md is generated from it (methodsMarkdown).
 */
import type { BlockDevice } from '../block/device.js';
import { BlockError } from '../block/errors.js';
import { jsonCheck } from '../cli/check.js';
import { extents, toMapEntry } from '../copy/map.js';
import { layerOf } from '../formats/chain.js';
import { imageInfo } from '../formats/info.js';
import { checkQcow2 } from '../formats/qcow2/check.js';
import { Qcow2Layer } from '../formats/qcow2/image.js';
import { inspectQcow2 } from '../formats/qcow2/inspect.js';
import { Refcounts } from '../formats/qcow2/refcount.js';
import { VhdLayer } from '../formats/vhd/image.js';
import { inspectVhd } from '../formats/vhd/inspect.js';
import { VmdkLayer } from '../formats/vmdk/image.js';
import { inspectVmdk } from '../formats/vmdk/inspect.js';
import { translate } from './translate.js';
import { rblockVersion } from '../util/version.js';

export type ParamType = 'integer' | 'string' | 'boolean';

export interface ParamSpec {
  name: string;
  type: ParamType;
  doc: string;
  /** Absent params take the default; required ones without it are an error (-32602). */
  required?: boolean;
  default?: string | number | boolean;
  /** Strings: the accepted values. */
  choices?: readonly string[];
  /** Integers: the smallest value accepted (default 0). */
  min?: number;
}

/** Params after validation: every declared param, with defaults filled in. */
export type Params = Record<string, string | number | boolean | undefined>;

/** One export as the RPC server holds it. */
export interface RpcExport {
  name: string;
  device: BlockDevice;
  readOnly: boolean;
  description?: string;
}

export interface RpcLimits {
  /** Largest JSON value accepted, in bytes; past it the server answers -32600 and closes. */
  maxMessageBytes: number;
  /** Largest `read` (and read_guest_cluster) in bytes. */
  maxReadBytes: number;
  /** A connection with a half-sent message and no new byte for this long is closed (ms). */
  idleTimeoutMs: number;
  /**
   * A connection with no request in progress and no new byte for this long is
   * closed (ms; 0 = never). `echo -n ... | nc` keeps its side open after
   * sending, and returns when the server closes. Clients that pause longer
   * between requests reconnect, or raise it.
   */
  idleCloseMs: number;
  /** Connections served at once; more are answered with an error and closed. */
  maxConnections: number;
  /** Deepest nesting of arrays and objects accepted. */
  maxDepth: number;
}

export const DEFAULT_RPC_LIMITS: RpcLimits = {
  maxMessageBytes: 64 << 20,
  maxReadBytes: 32 << 20,
  idleTimeoutMs: 30_000,
  idleCloseMs: 2_000,
  maxConnections: 128,
  maxDepth: 64,
};

export interface MethodContext {
  exports: readonly RpcExport[];
  /** The export named by the `export` param (image methods only). */
  exp: RpcExport;
  limits: RpcLimits;
}

export interface MethodSpec {
  name: string;
  doc: string;
  /** Acts on one export: gets the `export` param. */
  image: boolean;
  /** Changes the image: refused with the read-only error on read-only serving. */
  writes?: boolean;
  params: ParamSpec[];
  result: string;
  run(ctx: MethodContext, p: Params): Promise<unknown>;
}

export const PROTOCOL_VERSION = 1;

const offsetParam: ParamSpec = { name: 'offset', type: 'integer', required: true, doc: 'guest byte offset' };
const lengthParam: ParamSpec = { name: 'length', type: 'integer', required: true, min: 1, doc: 'number of bytes' };
const encodingParam: ParamSpec = {
  name: 'encoding',
  type: 'string',
  default: 'base64',
  choices: ['base64', 'hex'],
  doc: 'how data is encoded: base64 or hex',
};

function inspectJson(v: unknown): unknown {
  // Exactly what `rblock inspect --output json` prints: bigints as numbers (or hex when too large).
  return JSON.parse(
    JSON.stringify(v, (_k, x: unknown) =>
      typeof x === 'bigint' ? (x <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(x) : '0x' + x.toString(16)) : x,
    ),
  ) as unknown;
}

function qcow2Of(ctx: MethodContext, what: string): Qcow2Layer {
  const layer = layerOf(ctx.exp.device);
  if (layer instanceof Qcow2Layer) return layer;
  const path = ctx.exp.device.path ?? ctx.exp.device.format;
  throw new BlockError('not-supported', `${path}: ${what} is for qcow2 images; this image is ${ctx.exp.device.format}`, { path });
}

function checkRange(dev: BlockDevice, offset: number, length: number, op: string): void {
  if (offset + length > dev.size) {
    const path = dev.path ?? dev.format;
    throw new BlockError(
      'out-of-bounds',
      `${path}: ${op} of ${length} bytes at ${offset} goes past the end of the disk (${dev.size} bytes)`,
      {
        path,
        offset,
        op,
      },
    );
  }
}

function checkReadLength(length: number, limits: RpcLimits): void {
  if (length > limits.maxReadBytes) {
    throw new BlockError(
      'invalid-argument',
      `length ${length} is more than the ${limits.maxReadBytes} bytes one read may return; read in smaller pieces`,
      { op: 'read' },
    );
  }
}

function encode(buf: Uint8Array, encoding: string): string {
  return Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength).toString(encoding === 'hex' ? 'hex' : 'base64');
}

function decode(text: string, encoding: string): Buffer {
  const ok = encoding === 'hex' ? /^(?:[0-9a-fA-F]{2})*$/.test(text) : /^[A-Za-z0-9+/]*={0,2}$/.test(text) && text.length % 4 === 0;
  if (!ok) throw new BlockError('invalid-argument', `data is not valid ${encoding}`, { op: 'write' });
  return Buffer.from(text, encoding === 'hex' ? 'hex' : 'base64');
}

/** Cluster size used by read_guest_cluster: the format's cluster/block/grain, else 64 KiB. */
async function clusterSizeOf(dev: BlockDevice): Promise<number> {
  const info = await imageInfo(dev);
  return info['cluster-size'] ?? 65536;
}

/** Flush first when writable, so on-disk structures read by a fresh reader are current. */
async function settle(ctx: MethodContext): Promise<void> {
  if (!ctx.exp.readOnly && !ctx.exp.device.caps.readOnly) await ctx.exp.device.flush();
}

export const METHODS: readonly MethodSpec[] = [
  {
    name: 'get_version',
    doc: 'The rblock version and the protocol versions spoken.',
    image: false,
    params: [],
    result: '{rblock, jsonrpc: "2.0", protocol}',
    run: async () => ({ rblock: rblockVersion(), jsonrpc: '2.0', protocol: PROTOCOL_VERSION }),
  },
  {
    name: 'list_exports',
    doc: 'The images served.',
    image: false,
    params: [],
    result: '[{name, format, size, readOnly, file, description?}]',
    run: async (ctx) =>
      ctx.exports.map((e) => ({
        name: e.name,
        format: e.device.format,
        size: e.device.size,
        readOnly: e.readOnly,
        file: e.device.path ?? null,
        ...(e.description !== undefined ? { description: e.description } : {}),
      })),
  },
  {
    name: 'info',
    doc: 'What the image is, as `rblock info --output json` (qemu-img info).',
    image: true,
    params: [],
    result: 'the ImageInfo object',
    run: (ctx) => imageInfo(ctx.exp.device),
  },
  {
    name: 'header',
    doc: 'The decoded header with offsets, as `rblock inspect --output json` (qcow2, VHD, VMDK).',
    image: true,
    params: [],
    result: 'the inspect report',
    run: async (ctx) => {
      const layer = layerOf(ctx.exp.device);
      if (layer instanceof Qcow2Layer) return inspectJson(await inspectQcow2(layer, {}));
      if (layer instanceof VhdLayer) return inspectJson(await inspectVhd(layer, {}));
      if (layer instanceof VmdkLayer) return inspectJson(await inspectVmdk(layer, {}));
      const path = ctx.exp.device.path ?? ctx.exp.device.format;
      throw new BlockError(
        'not-supported',
        `${path}: header knows qcow2, VHD and VMDK structures; this image is ${ctx.exp.device.format}`,
        {
          path,
        },
      );
    },
  },
  {
    name: 'map',
    doc: 'Allocation of a guest range, merged as `qemu-img map --output=json` entries.',
    image: true,
    params: [
      { name: 'offset', type: 'integer', default: 0, doc: 'guest byte offset' },
      { name: 'length', type: 'integer', min: 1, doc: 'number of bytes (default: to the end of the disk)' },
    ],
    result: '[{start, length, depth, present, zero, data, offset?}]',
    run: async (ctx, p) => {
      const dev = ctx.exp.device;
      const offset = p['offset'] as number;
      if (offset > dev.size) checkRange(dev, offset, 0, 'map');
      const length = (p['length'] as number | undefined) ?? dev.size - offset;
      checkRange(dev, offset, length, 'map');
      if (length === 0) return [];
      const out = [];
      for await (const e of extents(dev, offset, length)) {
        const m = toMapEntry(e);
        delete m.file;
        out.push(m);
      }
      return out;
    },
  },
  {
    name: 'block_status',
    doc: "The device's own extents for a guest range (as NBD block status), not merged.",
    image: true,
    params: [offsetParam, lengthParam],
    result: '[{offset, length, zero, hole, allocated, depth, hostOffset?, compressed?}]',
    run: async (ctx, p) => {
      const dev = ctx.exp.device;
      checkRange(dev, p['offset'] as number, p['length'] as number, 'block_status');
      const ext = await dev.blockStatus(p['offset'] as number, p['length'] as number);
      return ext.map((e) => {
        const rest = { ...e };
        delete rest.file;
        return rest;
      });
    },
  },
  {
    name: 'read',
    doc: 'Read guest bytes.',
    image: true,
    params: [offsetParam, lengthParam, encodingParam],
    result: '{offset, length, encoding, data}',
    run: async (ctx, p) => {
      const [offset, length] = [p['offset'] as number, p['length'] as number];
      checkReadLength(length, ctx.limits);
      checkRange(ctx.exp.device, offset, length, 'read');
      const buf = new Uint8Array(length);
      await ctx.exp.device.pread(buf, offset);
      return { offset, length, encoding: p['encoding'], data: encode(buf, p['encoding'] as string) };
    },
  },
  {
    name: 'write',
    doc: 'Write guest bytes.',
    image: true,
    writes: true,
    params: [offsetParam, { name: 'data', type: 'string', required: true, doc: 'the bytes, encoded' }, encodingParam],
    result: '{offset, length}',
    run: async (ctx, p) => {
      const offset = p['offset'] as number;
      const data = decode(p['data'] as string, p['encoding'] as string);
      checkRange(ctx.exp.device, offset, data.length, 'write');
      if (data.length > 0) await ctx.exp.device.pwrite(data, offset);
      return { offset, length: data.length };
    },
  },
  {
    name: 'write_zeroes',
    doc: 'Make a guest range read as zeros.',
    image: true,
    writes: true,
    params: [
      offsetParam,
      lengthParam,
      { name: 'may_trim', type: 'boolean', default: false, doc: 'the range may be deallocated (if it then reads as zeros)' },
    ],
    result: 'null',
    run: async (ctx, p) => {
      checkRange(ctx.exp.device, p['offset'] as number, p['length'] as number, 'write_zeroes');
      await ctx.exp.device.writeZeroes(p['offset'] as number, p['length'] as number, { mayTrim: p['may_trim'] === true });
      return null;
    },
  },
  {
    name: 'discard',
    doc: 'Tell the image a guest range is no longer needed (it may read back as anything the format gives).',
    image: true,
    writes: true,
    params: [offsetParam, lengthParam],
    result: 'null',
    run: async (ctx, p) => {
      checkRange(ctx.exp.device, p['offset'] as number, p['length'] as number, 'discard');
      await ctx.exp.device.discard(p['offset'] as number, p['length'] as number);
      return null;
    },
  },
  {
    name: 'flush',
    doc: 'Make every write so far durable.',
    image: true,
    writes: true,
    params: [],
    result: 'null',
    run: async (ctx) => {
      await ctx.exp.device.flush();
      return null;
    },
  },
  {
    name: 'translate',
    doc: "Where a guest byte lives: the chain layer, host file and offset, and the path through the format's tables.",
    image: true,
    params: [offsetParam],
    result:
      '{guestOffset, depth, format, file, kind, hostFile, hostOffset, layers: [{depth, format, file, kind, hostFile, hostOffset, tables}]}',
    run: async (ctx, p) => {
      await settle(ctx);
      return translate(ctx.exp.device, p['offset'] as number);
    },
  },
  {
    name: 'read_guest_cluster',
    doc: "One guest cluster (the format's cluster, block or grain; 64 KiB for raw): its data and the translation of its first byte.",
    image: true,
    params: [{ name: 'cluster', type: 'integer', required: true, doc: 'guest cluster index' }, encodingParam],
    result: '{cluster, clusterSize, offset, length, encoding, data, translation}',
    run: async (ctx, p) => {
      const dev = ctx.exp.device;
      const cs = await clusterSizeOf(dev);
      const cluster = p['cluster'] as number;
      const offset = cluster * cs;
      if (!Number.isSafeInteger(offset) || offset >= dev.size) {
        const path = dev.path ?? dev.format;
        throw new BlockError(
          'out-of-bounds',
          `${path}: cluster ${cluster} is past the end of the disk (${Math.ceil(dev.size / cs)} clusters of ${cs} bytes)`,
          {
            path,
            op: 'read_guest_cluster',
          },
        );
      }
      const length = Math.min(cs, dev.size - offset);
      checkReadLength(length, ctx.limits);
      const buf = new Uint8Array(length);
      await dev.pread(buf, offset);
      await settle(ctx);
      const translation = await translate(dev, offset);
      return { cluster, clusterSize: cs, offset, length, encoding: p['encoding'], data: encode(buf, p['encoding'] as string), translation };
    },
  },
  {
    name: 'l1_table',
    doc: 'The allocated L1 entries of a qcow2 image, as `rblock inspect --l1 --output json` (its l1 member).',
    image: true,
    params: [],
    result: '{offset, entries, allocated, list: [{index, raw, l2Offset, copied, reserved}]}',
    run: async (ctx) => (inspectJson(await inspectQcow2(qcow2Of(ctx, 'l1_table'), { l1: true })) as { l1: unknown }).l1,
  },
  {
    name: 'l2_table',
    doc: 'One L2 table of a qcow2 image decoded entry by entry, as `rblock inspect --l2 N --output json` (its l2 member).',
    image: true,
    params: [{ name: 'index', type: 'integer', required: true, doc: 'L1 index of the table' }],
    result: '{l1Index, offset, guestStart, entries: [...]}',
    run: async (ctx, p) => (inspectJson(await inspectQcow2(qcow2Of(ctx, 'l2_table'), { l2: p['index'] as number })) as { l2: unknown }).l2,
  },
  {
    name: 'refcount',
    doc: 'The refcount of a host cluster of a qcow2 image.',
    image: true,
    params: [{ name: 'cluster', type: 'integer', required: true, doc: 'host cluster index (host offset / cluster size)' }],
    result: '{cluster, hostOffset, refcount, refcountBits}',
    run: async (ctx, p) => {
      const layer = qcow2Of(ctx, 'refcount');
      await settle(ctx);
      const rc = await Refcounts.load(layer.file, layer.header);
      const cluster = p['cluster'] as number;
      return { cluster, hostOffset: cluster * layer.header.clusterSize, refcount: await rc.get(cluster), refcountBits: rc.bits };
    },
  },
  {
    name: 'check',
    doc: 'Check a qcow2 image (read only): the report of `rblock check --output json`.',
    image: true,
    params: [],
    result: 'the ImageCheck object (qemu-img check --output=json)',
    run: async (ctx) => {
      const layer = qcow2Of(ctx, 'check');
      await settle(ctx);
      const out = await checkQcow2(layer.path);
      if (out.check === null) {
        throw new BlockError('corrupt-image', `${layer.path}: Check failed: ${out.failure ?? 'unknown error'}`, {
          path: layer.path,
          op: 'check',
        });
      }
      return JSON.parse(jsonCheck(out.check)) as unknown;
    },
  },
];

export const METHOD_TABLE: ReadonlyMap<string, MethodSpec> = new Map(METHODS.map((m) => [m.name, m]));

/** The `export` param every image method takes. */
export const EXPORT_PARAM: ParamSpec = { name: 'export', type: 'string', default: '', doc: 'export name (default "")' };

/** A method's params as the dispatcher checks them. */
export function paramsOf(m: MethodSpec): ParamSpec[] {
  return m.image ? [...m.params, EXPORT_PARAM] : m.params;
}

function paramText(p: ParamSpec): string {
  const t = p.choices !== undefined ? p.choices.join('|') : p.type;
  const d = p.required === true ? 'required' : p.default !== undefined ? `default ${JSON.stringify(p.default)}` : 'optional';
  return `${p.name}: ${t} (${d}) ${p.doc}`;
}

/** The method list for `rblock rpc --help`. */
export function methodsHelp(): string {
  const lines: string[] = ['Methods (params by name; image methods also take export=NAME):'];
  for (const m of METHODS) {
    lines.push(`  ${m.name}${m.writes === true ? ' [writes]' : ''}: ${m.doc}`);
    for (const p of m.params) lines.push(`      ${paramText(p)}`);
    lines.push(`      -> ${m.result}`);
  }
  return lines.join('\n') + '\n';
}

/** The methods section of docs/json-rpc.md. */
export function methodsMarkdown(): string {
  const out: string[] = [];
  for (const m of METHODS) {
    out.push(
      `### \`${m.name}\``,
      '',
      m.doc + (m.writes === true ? ' Refused with the read-only error (-32003) on read-only serving.' : ''),
      '',
    );
    const ps = paramsOf(m);
    if (ps.length === 0) out.push('Params: none.', '');
    else {
      out.push('| param | type | | meaning |', '|---|---|---|---|');
      for (const p of ps) {
        const t = p.choices !== undefined ? p.choices.join(' \\| ') : p.type;
        const d = p.required === true ? 'required' : p.default !== undefined ? `default \`${JSON.stringify(p.default)}\`` : 'optional';
        out.push(`| \`${p.name}\` | ${t} | ${d} | ${p.doc} |`);
      }
      out.push('');
    }
    out.push(`Result: \`${m.result}\``, '');
  }
  return out.join('\n');
}
