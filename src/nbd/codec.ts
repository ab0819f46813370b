/**
 * Encoding and decoding of every NBD message, both directions (the server
 * uses half, a client or a test the other half). Pure functions over
 * Buffers: no sockets, no state. Decoders of peer input never assert: a
 * malformed message throws BlockError('protocol'), whose message says what
 * was wrong; option-data decoders throw OptionDataError, which the handshake
 * answers with NBD_REP_ERR_INVALID instead of dropping the connection.
 */
import { BlockError } from '../block/errors.js';
import {
  Chunk,
  EXTENDED_REPLY_HEADER_SIZE,
  EXTENDED_REPLY_MAGIC,
  EXTENDED_REQUEST_MAGIC,
  EXTENDED_REQUEST_SIZE,
  IHAVEOPT,
  Info,
  MAX_STRING,
  NBDMAGIC,
  OPTION_REPLY_MAGIC,
  REQUEST_MAGIC,
  REQUEST_SIZE,
  SIMPLE_REPLY_MAGIC,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_HEADER_SIZE,
  STRUCTURED_REPLY_MAGIC,
  isChunkError,
} from './protocol.js';

/** Malformed option data: answered with NBD_REP_ERR_INVALID, the connection goes on. */
export class OptionDataError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'OptionDataError';
  }
}

function protocolError(message: string): BlockError {
  return new BlockError('protocol', message, { op: 'nbd' });
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** A UTF-8 string from the wire: no NUL, valid UTF-8, at most 4096 bytes. */
export function decodeString(b: Uint8Array, what: string): string {
  if (b.length > MAX_STRING) throw new OptionDataError(`${what} is ${b.length} bytes long (at most ${MAX_STRING})`);
  if (b.includes(0)) throw new OptionDataError(`${what} contains a NUL byte`);
  try {
    return utf8.decode(b);
  } catch {
    throw new OptionDataError(`${what} is not valid UTF-8`);
  }
}

function u32(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

// ---------------------------------------------------------------- handshake

/** Newstyle greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags (18 bytes). */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export function decodeGreeting(b: Uint8Array): { handshakeFlags: number } {
  const v = view(b);
  if (b.length < 18 || v.getBigUint64(0) !== NBDMAGIC) throw protocolError('not an NBD server (no NBDMAGIC)');
  if (v.getBigUint64(8) !== IHAVEOPT) throw protocolError('the server does not speak newstyle NBD');
  return { handshakeFlags: v.getUint16(16) };
}

export function encodeClientFlags(flags: number): Buffer {
  return u32(flags);
}

export function decodeClientFlags(b: Uint8Array): number {
  return view(b).getUint32(0);
}

/** IHAVEOPT, u32 option, u32 length, data. */
export function encodeOption(option: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(16 + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(data.length, 12);
  b.set(data, 16);
  return b;
}

export interface OptionHeader {
  option: number;
  length: number;
}

/** The 16-byte option header; a wrong magic means the peer is not speaking NBD. */
export function decodeOptionHeader(b: Uint8Array): OptionHeader {
  const v = view(b);
  if (v.getBigUint64(0) !== IHAVEOPT) throw protocolError('option request without the IHAVEOPT magic');
  return { option: v.getUint32(8), length: v.getUint32(12) };
}

/** Option reply: magic, u32 option, u32 reply type, u32 length, data. */
export function encodeOptionReply(option: number, type: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(20 + data.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  b.set(data, 20);
  return b;
}

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function decodeOptionReplyHeader(b: Uint8Array): OptionReplyHeader {
  const v = view(b);
  if (v.getBigUint64(0) !== OPTION_REPLY_MAGIC) throw protocolError('option reply without the option reply magic');
  return { option: v.getUint32(8), type: v.getUint32(12), length: v.getUint32(16) };
}

/** NBD_REP_SERVER data: u32 name length, name, description. */
export function encodeRepServer(name: string, description = ''): Buffer {
  const n = Buffer.from(name, 'utf8');
  return Buffer.concat([u32(n.length), n, Buffer.from(description, 'utf8')]);
}

export function decodeRepServer(b: Uint8Array): { name: string; description: string } {
  if (b.length < 4) throw protocolError('NBD_REP_SERVER shorter than 4 bytes');
  const len = view(b).getUint32(0);
  if (len > b.length - 4) throw protocolError('NBD_REP_SERVER name runs past the reply');
  return { name: decodeString(b.subarray(4, 4 + len), 'export name'), description: decodeString(b.subarray(4 + len), 'description') };
}

/** NBD_INFO_EXPORT: u16 0, u64 size, u16 transmission flags. */
export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(Info.EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

export function encodeInfoString(type: typeof Info.NAME | typeof Info.DESCRIPTION, s: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  const out = Buffer.allocUnsafe(2 + b.length);
  out.writeUInt16BE(type, 0);
  out.set(b, 2);
  return out;
}

export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(Info.BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}

export type InfoReply =
  | { type: typeof Info.EXPORT; size: bigint; flags: number }
  | { type: typeof Info.NAME; name: string }
  | { type: typeof Info.DESCRIPTION; description: string }
  | { type: typeof Info.BLOCK_SIZE; minimum: number; preferred: number; maximum: number }
  | { type: number };

export function decodeInfoReply(b: Uint8Array): InfoReply {
  if (b.length < 2) throw protocolError('NBD_REP_INFO shorter than 2 bytes');
  const v = view(b);
  const type = v.getUint16(0);
  switch (type) {
    case Info.EXPORT:
      if (b.length !== 12) throw protocolError(`NBD_INFO_EXPORT is ${b.length} bytes (expected 12)`);
      return { type, size: v.getBigUint64(2), flags: v.getUint16(10) };
    case Info.NAME:
      return { type, name: decodeString(b.subarray(2), 'export name') };
    case Info.DESCRIPTION:
      return { type, description: decodeString(b.subarray(2), 'description') };
    case Info.BLOCK_SIZE:
      if (b.length !== 14) throw protocolError(`NBD_INFO_BLOCK_SIZE is ${b.length} bytes (expected 14)`);
      return { type, minimum: v.getUint32(2), preferred: v.getUint32(6), maximum: v.getUint32(10) };
    default:
      return { type };
  }
}

/** NBD_OPT_INFO / NBD_OPT_GO data: u32 name length, name, u16 count, count x u16 info codes. */
export function encodeInfoRequest(name: string, infos: readonly number[] = []): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  b.set(n, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((c, i) => b.writeUInt16BE(c, 6 + n.length + 2 * i));
  return b;
}

export interface InfoRequest {
  name: string;
  infos: number[];
}

export function decodeInfoRequest(b: Uint8Array): InfoRequest {
  if (b.length < 6) throw new OptionDataError(`option data is ${b.length} bytes (at least 6 needed)`);
  const v = view(b);
  const len = v.getUint32(0);
  if (len > b.length - 6) throw new OptionDataError(`export name length ${len} runs past the option data`);
  const name = decodeString(b.subarray(4, 4 + len), 'export name');
  const count = v.getUint16(4 + len);
  if (b.length !== 6 + len + 2 * count) {
    throw new OptionDataError(`option data is ${b.length} bytes, but ${count} information requests need ${6 + len + 2 * count}`);
  }
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(v.getUint16(6 + len + 2 * i));
  return { name, infos };
}

/** LIST/SET_META_CONTEXT data: u32 export name length, name, u32 count, count x (u32 length, query). */
export function encodeMetaContextRequest(exportName: string, queries: readonly string[]): Buffer {
  const parts: Buffer[] = [];
  const n = Buffer.from(exportName, 'utf8');
  parts.push(u32(n.length), n, u32(queries.length));
  for (const q of queries) {
    const qb = Buffer.from(q, 'utf8');
    parts.push(u32(qb.length), qb);
  }
  return Buffer.concat(parts);
}

export interface MetaContextRequest {
  exportName: string;
  queries: string[];
}

export function decodeMetaContextRequest(b: Uint8Array): MetaContextRequest {
  const v = view(b);
  if (b.length < 8) throw new OptionDataError(`option data is ${b.length} bytes (at least 8 needed)`);
  const len = v.getUint32(0);
  if (len > b.length - 8) throw new OptionDataError(`export name length ${len} runs past the option data`);
  const exportName = decodeString(b.subarray(4, 4 + len), 'export name');
  let pos = 4 + len;
  const count = v.getUint32(pos);
  pos += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (pos + 4 > b.length) throw new OptionDataError(`query ${i + 1} of ${count} runs past the option data`);
    const qlen = v.getUint32(pos);
    pos += 4;
    if (qlen > b.length - pos) throw new OptionDataError(`query ${i + 1} of ${count} runs past the option data`);
    queries.push(decodeString(b.subarray(pos, pos + qlen), 'meta context query'));
    pos += qlen;
  }
  if (pos !== b.length) throw new OptionDataError(`${b.length - pos} bytes of option data after the last query`);
  return { exportName, queries };
}

/** NBD_REP_META_CONTEXT data: u32 id, name. */
export function encodeRepMetaContext(id: number, name: string): Buffer {
  return Buffer.concat([u32(id), Buffer.from(name, 'utf8')]);
}

export function decodeRepMetaContext(b: Uint8Array): { id: number; name: string } {
  if (b.length < 4) throw protocolError('NBD_REP_META_CONTEXT shorter than 4 bytes');
  return { id: view(b).getUint32(0), name: decodeString(b.subarray(4), 'meta context name') };
}

/** The reply to NBD_OPT_EXPORT_NAME: u64 size, u16 flags, then 124 zeros unless NO_ZEROES. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

// ------------------------------------------------------------- transmission

/** One request as the wire carries it (64-bit fields as bigint: the peer may send anything). */
export interface Request {
  flags: number;
  type: number;
  cookie: bigint;
  offset: bigint;
  length: bigint;
}

export function requestSize(extended: boolean): number {
  return extended ? EXTENDED_REQUEST_SIZE : REQUEST_SIZE;
}

export function encodeRequest(r: Request, extended: boolean): Buffer {
  const b = Buffer.allocUnsafe(requestSize(extended));
  b.writeUInt32BE(extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.cookie, 8);
  b.writeBigUInt64BE(r.offset, 16);
  if (extended) b.writeBigUInt64BE(r.length, 24);
  else b.writeUInt32BE(Number(r.length), 24);
  return b;
}

/** A request header; a wrong magic (garbage, or the wrong header size) is a protocol error. */
export function decodeRequest(b: Uint8Array, extended: boolean): Request {
  const v = view(b);
  const magic = v.getUint32(0);
  const want = extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC;
  if (magic !== want) {
    const what =
      magic === (extended ? REQUEST_MAGIC : EXTENDED_REQUEST_MAGIC)
        ? `a ${extended ? 'compact' : 'extended'} request header when ${extended ? 'extended' : 'compact'} headers were negotiated`
        : `bad request magic 0x${magic.toString(16).padStart(8, '0')}`;
    throw protocolError(`client sent ${what}`);
  }
  return {
    flags: v.getUint16(4),
    type: v.getUint16(6),
    cookie: v.getBigUint64(8),
    offset: v.getBigUint64(16),
    length: extended ? v.getBigUint64(24) : BigInt(v.getUint32(24)),
  };
}

/** Simple reply header: magic, u32 error, u64 cookie (READ data follows on success). */
export function encodeSimpleReply(error: number, cookie: bigint): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error >>> 0, 4);
  b.writeBigUInt64BE(cookie, 8);
  return b;
}

/**
 * A structured (20-byte) or extended (32-byte) chunk header, with `extra`
 * bytes of room after it for the start of the payload (filled by the caller).
 */
export function encodeChunkHeader(
  extended: boolean,
  flags: number,
  type: number,
  cookie: bigint,
  requestOffset: bigint,
  payloadLength: number,
  extra = 0,
): Buffer {
  const hs = extended ? EXTENDED_REPLY_HEADER_SIZE : STRUCTURED_REPLY_HEADER_SIZE;
  const b = Buffer.allocUnsafe(hs + extra);
  b.writeUInt32BE(extended ? EXTENDED_REPLY_MAGIC : STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  if (extended) {
    b.writeBigUInt64BE(requestOffset, 16);
    b.writeBigUInt64BE(BigInt(payloadLength), 24);
  } else {
    b.writeUInt32BE(payloadLength, 16);
  }
  return b;
}

/** The header of an OFFSET_DATA chunk including its u64 offset; the data follows separately. */
export function encodeOffsetDataHeader(
  extended: boolean,
  flags: number,
  cookie: bigint,
  requestOffset: bigint,
  offset: number,
  dataLength: number,
): Buffer {
  const b = encodeChunkHeader(extended, flags, Chunk.OFFSET_DATA, cookie, requestOffset, 8 + dataLength, 8);
  b.writeBigUInt64BE(BigInt(offset), b.length - 8);
  return b;
}

/** A whole OFFSET_HOLE chunk: u64 offset, u32 size. */
export function encodeOffsetHole(
  extended: boolean,
  flags: number,
  cookie: bigint,
  requestOffset: bigint,
  offset: number,
  length: number,
): Buffer {
  const b = encodeChunkHeader(extended, flags, Chunk.OFFSET_HOLE, cookie, requestOffset, 12, 12);
  b.writeBigUInt64BE(BigInt(offset), b.length - 12);
  b.writeUInt32BE(length, b.length - 4);
  return b;
}

/** A whole NONE chunk (always final). */
export function encodeNoneChunk(extended: boolean, flags: number, cookie: bigint, requestOffset: bigint): Buffer {
  return encodeChunkHeader(extended, flags, Chunk.NONE, cookie, requestOffset, 0);
}

/** Error messages in chunks are bounded: the u16 length field, and a line is plenty. */
const MAX_ERROR_MESSAGE = 1024;

function errorMessageBytes(message: string): Buffer {
  let m = Buffer.from(message, 'utf8');
  if (m.length > MAX_ERROR_MESSAGE) {
    // Cut on a character boundary.
    m = Buffer.from(
      m
        .subarray(0, MAX_ERROR_MESSAGE)
        .toString('utf8')
        .replace(/\uFFFD$/, ''),
      'utf8',
    );
  }
  return m;
}

/** A whole ERROR chunk (or ERROR_OFFSET when errorOffset is given). */
export function encodeErrorChunk(
  extended: boolean,
  flags: number,
  cookie: bigint,
  requestOffset: bigint,
  error: number,
  message: string,
  errorOffset?: number,
): Buffer {
  const m = errorMessageBytes(message);
  const withOffset = errorOffset !== undefined;
  const payload = 6 + m.length + (withOffset ? 8 : 0);
  const b = encodeChunkHeader(extended, flags, withOffset ? Chunk.ERROR_OFFSET : Chunk.ERROR, cookie, requestOffset, payload, payload);
  let p = b.length - payload;
  b.writeUInt32BE(error >>> 0, p);
  b.writeUInt16BE(m.length, p + 4);
  b.set(m, p + 6);
  p += 6 + m.length;
  if (withOffset) b.writeBigUInt64BE(BigInt(errorOffset), p);
  return b;
}

/** One block status descriptor: a length and the context's status value. */
export interface StatusDescriptor {
  length: number;
  status: number;
}

/** A whole BLOCK_STATUS (compact: u32 pairs) or BLOCK_STATUS_EXT (u64 pairs) chunk for one context. */
export function encodeBlockStatusChunk(
  extended: boolean,
  flags: number,
  cookie: bigint,
  requestOffset: bigint,
  contextId: number,
  descriptors: readonly StatusDescriptor[],
): Buffer {
  if (extended) {
    const payload = 8 + 16 * descriptors.length;
    const b = encodeChunkHeader(true, flags, Chunk.BLOCK_STATUS_EXT, cookie, requestOffset, payload, payload);
    let p = EXTENDED_REPLY_HEADER_SIZE;
    b.writeUInt32BE(contextId >>> 0, p);
    b.writeUInt32BE(descriptors.length, p + 4);
    p += 8;
    for (const d of descriptors) {
      b.writeBigUInt64BE(BigInt(d.length), p);
      b.writeBigUInt64BE(BigInt(d.status >>> 0), p + 8);
      p += 16;
    }
    return b;
  }
  const payload = 4 + 8 * descriptors.length;
  const b = encodeChunkHeader(false, flags, Chunk.BLOCK_STATUS, cookie, requestOffset, payload, payload);
  let p = STRUCTURED_REPLY_HEADER_SIZE;
  b.writeUInt32BE(contextId >>> 0, p);
  p += 4;
  for (const d of descriptors) {
    b.writeUInt32BE(d.length, p);
    b.writeUInt32BE(d.status >>> 0, p + 4);
    p += 8;
  }
  return b;
}

// ------------------------------------------------- replies, as a client reads them

/** Size of the reply header that starts with this magic (the first 4 bytes); 0 if unknown. */
export function replyHeaderSize(magic: number): number {
  switch (magic) {
    case SIMPLE_REPLY_MAGIC:
      return SIMPLE_REPLY_SIZE;
    case STRUCTURED_REPLY_MAGIC:
      return STRUCTURED_REPLY_HEADER_SIZE;
    case EXTENDED_REPLY_MAGIC:
      return EXTENDED_REPLY_HEADER_SIZE;
    default:
      return 0;
  }
}

export type ReplyHeader =
  | { kind: 'simple'; error: number; cookie: bigint }
  | { kind: 'structured' | 'extended'; flags: number; type: number; cookie: bigint; offset: bigint; length: number };

/** Decode a whole reply header (16, 20 or 32 bytes, by its magic). */
export function decodeReplyHeader(b: Uint8Array): ReplyHeader {
  const v = view(b);
  const magic = v.getUint32(0);
  const size = replyHeaderSize(magic);
  if (size === 0) throw protocolError(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`);
  if (b.length < size) throw protocolError(`reply header is ${b.length} bytes (expected ${size})`);
  if (magic === SIMPLE_REPLY_MAGIC) return { kind: 'simple', error: v.getUint32(4), cookie: v.getBigUint64(8) };
  const flags = v.getUint16(4);
  const type = v.getUint16(6);
  const cookie = v.getBigUint64(8);
  if (magic === STRUCTURED_REPLY_MAGIC) return { kind: 'structured', flags, type, cookie, offset: 0n, length: v.getUint32(16) };
  const length = v.getBigUint64(24);
  if (length > BigInt(Number.MAX_SAFE_INTEGER)) throw protocolError(`reply payload length ${length} is too large`);
  return { kind: 'extended', flags, type, cookie, offset: v.getBigUint64(16), length: Number(length) };
}

export type ChunkPayload =
  | { type: typeof Chunk.NONE }
  | { type: typeof Chunk.OFFSET_DATA; offset: bigint; data: Uint8Array }
  | { type: typeof Chunk.OFFSET_HOLE; offset: bigint; length: number }
  | { type: typeof Chunk.BLOCK_STATUS | typeof Chunk.BLOCK_STATUS_EXT; contextId: number; descriptors: StatusDescriptor[] }
  | { type: number; error: number; message: string; errorOffset?: bigint }
  | { type: number; unknown: true };

/** Decode a chunk's payload by its type. */
export function decodeChunkPayload(type: number, p: Uint8Array): ChunkPayload {
  const v = view(p);
  switch (type) {
    case Chunk.NONE:
      if (p.length !== 0) throw protocolError('NONE chunk with a payload');
      return { type };
    case Chunk.OFFSET_DATA:
      if (p.length < 9) throw protocolError('OFFSET_DATA chunk shorter than 9 bytes');
      return { type, offset: v.getBigUint64(0), data: p.subarray(8) };
    case Chunk.OFFSET_HOLE:
      if (p.length !== 12) throw protocolError(`OFFSET_HOLE chunk of ${p.length} bytes (expected 12)`);
      return { type, offset: v.getBigUint64(0), length: v.getUint32(8) };
    case Chunk.BLOCK_STATUS: {
      if (p.length < 12 || (p.length - 4) % 8 !== 0) throw protocolError(`BLOCK_STATUS chunk of ${p.length} bytes`);
      const descriptors: StatusDescriptor[] = [];
      for (let i = 4; i < p.length; i += 8) descriptors.push({ length: v.getUint32(i), status: v.getUint32(i + 4) });
      return { type, contextId: v.getUint32(0), descriptors };
    }
    case Chunk.BLOCK_STATUS_EXT: {
      if (p.length < 24 || (p.length - 8) % 16 !== 0) throw protocolError(`BLOCK_STATUS_EXT chunk of ${p.length} bytes`);
      const count = v.getUint32(4);
      if (count !== (p.length - 8) / 16) throw protocolError(`BLOCK_STATUS_EXT chunk says ${count} descriptors`);
      const descriptors: StatusDescriptor[] = [];
      for (let i = 8; i < p.length; i += 16) {
        const length = v.getBigUint64(i);
        const status = v.getBigUint64(i + 8);
        if (length > BigInt(Number.MAX_SAFE_INTEGER) || status > 0xffffffffn)
          throw protocolError('BLOCK_STATUS_EXT descriptor out of range');
        descriptors.push({ length: Number(length), status: Number(status) });
      }
      return { type, contextId: v.getUint32(0), descriptors };
    }
    default: {
      if (!isChunkError(type)) return { type, unknown: true };
      if (p.length < 6) throw protocolError('error chunk shorter than 6 bytes');
      const mlen = v.getUint16(4);
      if (mlen > p.length - 6) throw protocolError('error chunk message runs past the chunk');
      const message = Buffer.from(p.subarray(6, 6 + mlen)).toString('utf8');
      const out: { type: number; error: number; message: string; errorOffset?: bigint } = { type, error: v.getUint32(0), message };
      if (type === Chunk.ERROR_OFFSET) {
        if (p.length !== 6 + mlen + 8) throw protocolError('ERROR_OFFSET chunk has no offset');
        out.errorOffset = v.getBigUint64(6 + mlen);
      }
      return out;
    }
  }
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}
