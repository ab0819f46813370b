/**
 * NBD protocol constants (NetworkBlockDevice/nbd doc/proto.md, with the
 * EXTENDED_HEADERS extension). Names follow the spec without the NBD_ prefix
 * where the grouping object already says it.
 */

/** "NBDMAGIC": the first 8 bytes the server sends. */
export const NBDMAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": newstyle magic, also the prefix of every option request. */
export const IHAVEOPT = 0x49484156454f5054n;
/** Prefix of every option reply. */
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;

export const REQUEST_MAGIC = 0x25609513;
export const EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const EXTENDED_REPLY_MAGIC = 0x6e8a278c;

export const DEFAULT_PORT = 10809;

/** Handshake flags (server, u16). */
export const FLAG_FIXED_NEWSTYLE = 0x1;
export const FLAG_NO_ZEROES = 0x2;

/** Client flags (u32). */
export const FLAG_C_FIXED_NEWSTYLE = 0x1;
export const FLAG_C_NO_ZEROES = 0x2;

/** Option codes. */
export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const OPT_NAMES: Record<number, string> = Object.fromEntries(Object.entries(Opt).map(([k, v]) => [v, `NBD_OPT_${k}`]));

export function optName(code: number): string {
  return OPT_NAMES[code] ?? `option ${code}`;
}

/** Option reply types. Errors have bit 31 set. */
export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
  ERR_EXT_HEADER_REQD: 0x8000000a,
} as const;

export function isRepError(type: number): boolean {
  return (type & 0x80000000) !== 0;
}

/** NBD_INFO_* codes (in NBD_REP_INFO replies and INFO/GO requests). */
export const Info = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/** Transmission flags (u16, sent with the export size). */
export const TFlag = {
  HAS_FLAGS: 0x0001,
  READ_ONLY: 0x0002,
  SEND_FLUSH: 0x0004,
  SEND_FUA: 0x0008,
  ROTATIONAL: 0x0010,
  SEND_TRIM: 0x0020,
  SEND_WRITE_ZEROES: 0x0040,
  SEND_DF: 0x0080,
  CAN_MULTI_CONN: 0x0100,
  SEND_RESIZE: 0x0200,
  SEND_CACHE: 0x0400,
  SEND_FAST_ZERO: 0x0800,
  BLOCK_STATUS_PAYLOAD: 0x1000,
} as const;

/** Commands. */
export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

const CMD_NAMES: Record<number, string> = Object.fromEntries(Object.entries(Cmd).map(([k, v]) => [v, `NBD_CMD_${k}`]));

export function cmdName(type: number): string {
  return CMD_NAMES[type] ?? `command ${type}`;
}

/** Command flags (u16). */
export const CmdFlag = {
  FUA: 0x01,
  NO_HOLE: 0x02,
  DF: 0x04,
  REQ_ONE: 0x08,
  FAST_ZERO: 0x10,
  PAYLOAD_LEN: 0x20,
} as const;

/** Structured reply flags. */
export const REPLY_FLAG_DONE = 0x1;

/** Structured / extended reply chunk types. */
export const Chunk = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  BLOCK_STATUS_EXT: 6,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const;

export function isChunkError(type: number): boolean {
  return (type & 0x8000) !== 0;
}

/** Error values carried in replies (not the host's errno numbers). */
export const Errno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export type NbdErrno = (typeof Errno)[keyof typeof Errno];

const ERRNO_NAMES: Record<number, string> = Object.fromEntries(Object.entries(Errno).map(([k, v]) => [v, k]));

export function errnoName(e: number): string {
  return ERRNO_NAMES[e] ?? `error ${e}`;
}

/** base:allocation status bits. */
export const STATE_HOLE = 0x1;
export const STATE_ZERO = 0x2;

/** Meta contexts this server offers. */
export const CONTEXT_BASE_ALLOCATION = 'base:allocation';
export const CONTEXT_ALLOCATION_DEPTH = 'qemu:allocation-depth';

/** The largest payload either side sends (WRITE data, READ data): 32 MiB, as qemu and nbdkit. */
export const MAX_PAYLOAD = 32 << 20;
/** Names, descriptions, queries: the spec's MUST bound. */
export const MAX_STRING = 4096;

/** Sizes of the fixed headers. */
export const OPTION_HEADER_SIZE = 16;
export const OPTION_REPLY_HEADER_SIZE = 20;
export const REQUEST_SIZE = 28;
export const EXTENDED_REQUEST_SIZE = 32;
export const SIMPLE_REPLY_SIZE = 16;
export const STRUCTURED_REPLY_HEADER_SIZE = 20;
export const EXTENDED_REPLY_HEADER_SIZE = 32;

/** Which reply headers a connection uses: simple only, structured chunks, or extended (64-bit) headers. */
export type ReplyMode = 'simple' | 'structured' | 'extended';
