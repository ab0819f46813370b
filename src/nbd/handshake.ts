/**
 * The handshake phase: fixed newstyle only, one handler per option.
 *
 * The loop is bounded (number of options, option length); malformed option
 * data gets NBD_REP_ERR_INVALID and the haggling goes on, unknown options
 * NBD_REP_ERR_UNSUP; only a peer that is not speaking NBD (bad magic, bad
 * client flags, an oversized option) or EXPORT_NAME for an unknown export
 * loses the connection. The result is the Session transmission runs with.
 */
import {
  OptionDataError,
  decodeClientFlags,
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
} from './codec.js';
import { ExportTable, matchContexts, transmissionFlags, type MetaContext, type ServedExport } from './exports.js';
import {
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  Info,
  MAX_PAYLOAD,
  OPTION_HEADER_SIZE,
  Opt,
  Rep,
  optName,
  type ReplyMode,
} from './protocol.js';
import type { StreamReader, StreamWriter } from './stream.js';

/** What the handshake agreed on: the export and how to talk about it. */
export interface Session {
  readonly export: ServedExport;
  readonly mode: ReplyMode;
  /** Meta contexts selected by SET_META_CONTEXT for this export (empty: no BLOCK_STATUS). */
  readonly contexts: readonly MetaContext[];
  readonly transmissionFlags: number;
}

export interface HandshakeLimits {
  /** Options a client may send before it is dropped. */
  maxOptions: number;
  /** Longest option data read and answered; longer data is skipped (up to 1 MiB) or drops the client. */
  maxOptionLength: number;
}

export const DEFAULT_HANDSHAKE_LIMITS: HandshakeLimits = { maxOptions: 1000, maxOptionLength: 64 << 10 };

/** Option data longer than this is not even skipped: the peer is dropped. */
const MAX_SKIPPED_OPTION = 1 << 20;

/** Preferred block size advertised (NBD_INFO_BLOCK_SIZE): qemu's values. */
const BLOCK_MIN = 1;
const BLOCK_PREFERRED = 4096;

/** STARTTLS as the connection offers it. */
export interface HandshakeTls {
  /** FORCEDTLS: nothing but STARTTLS and ABORT before TLS. */
  required: boolean;
  /** After the ACK: run the TLS handshake and return the encrypted stream's halves. */
  upgrade(): Promise<{ reader: StreamReader; writer: StreamWriter }>;
}

interface State {
  /** TLS is up (STARTTLS succeeded). */
  tls: boolean;
  structured: boolean;
  extended: boolean;
  noZeroes: boolean;
  /** Contexts of the last SET_META_CONTEXT and the export they were set for. */
  contexts: MetaContext[];
  contextExport: ServedExport | null;
}

/** Why the handshake ended without a session. */
export class HandshakeEnd extends Error {
  constructor(
    message: string,
    readonly clean: boolean,
  ) {
    super(message);
    this.name = 'HandshakeEnd';
  }
}

type Outcome = Session | 'continue' | 'close';

interface Ctx {
  st: State;
  exports: ExportTable;
  writer: StreamWriter;
  /** The connection's current halves (replaced by STARTTLS). */
  io: { reader: StreamReader; writer: StreamWriter };
  tls: HandshakeTls | undefined;
  option: number;
  data: Buffer;
}

function mode(st: State): ReplyMode {
  return st.extended ? 'extended' : st.structured ? 'structured' : 'simple';
}

async function reply(c: Ctx, type: number, data?: Uint8Array): Promise<void> {
  await c.writer.send([encodeOptionReply(c.option, type, data)]);
}

async function replyError(c: Ctx, type: number, message: string): Promise<'continue'> {
  await reply(c, type, Buffer.from(message, 'utf8'));
  return 'continue';
}

/** Options that carry no data answer ERR_INVALID to any. */
async function refuseData(c: Ctx): Promise<boolean> {
  if (c.data.length === 0) return false;
  await replyError(c, Rep.ERR_INVALID, `${optName(c.option)} must not carry data`);
  return true;
}

function sessionFor(st: State, exp: ServedExport): Session {
  const m = mode(st);
  const contexts = st.contextExport === exp && m !== 'simple' ? st.contexts : [];
  return { export: exp, mode: m, contexts, transmissionFlags: transmissionFlags(exp, m) };
}

const handlers: Record<number, (c: Ctx) => Promise<Outcome>> = {
  async [Opt.EXPORT_NAME](c) {
    if (c.st.extended) throw new HandshakeEnd('NBD_OPT_EXPORT_NAME after extended headers were negotiated', false);
    let name: string;
    try {
      name = new TextDecoder('utf-8', { fatal: true }).decode(c.data);
    } catch {
      throw new HandshakeEnd('NBD_OPT_EXPORT_NAME with a name that is not UTF-8', false);
    }
    const exp = c.exports.find(name);
    // No error channel for this option: an unknown export can only be refused by disconnecting.
    if (exp === undefined) throw new HandshakeEnd(`NBD_OPT_EXPORT_NAME for unknown export '${name}'`, false);
    const s = sessionFor(c.st, exp);
    await c.writer.send([encodeExportNameReply(exp.device.size, s.transmissionFlags, c.st.noZeroes)]);
    return s;
  },

  async [Opt.ABORT](c) {
    await reply(c, Rep.ACK);
    return 'close';
  },

  async [Opt.LIST](c) {
    if (await refuseData(c)) return 'continue';
    for (const e of c.exports.list) await reply(c, Rep.SERVER, encodeRepServer(e.name, e.description));
    await reply(c, Rep.ACK);
    return 'continue';
  },

  async [Opt.STARTTLS](c) {
    if (await refuseData(c)) return 'continue';
    if (c.tls === undefined) return replyError(c, Rep.ERR_POLICY, 'TLS is not configured on this server');
    if (c.st.tls) return replyError(c, Rep.ERR_INVALID, 'TLS is already negotiated');
    await reply(c, Rep.ACK);
    try {
      c.io = await c.tls.upgrade();
    } catch (e) {
      throw new HandshakeEnd(e instanceof Error ? e.message : String(e), false);
    }
    // Everything negotiated in the clear is forgotten (the spec's MUST).
    Object.assign(c.st, { tls: true, structured: false, extended: false, contexts: [], contextExport: null });
    return 'continue';
  },

  [Opt.INFO]: (c) => infoOrGo(c, false),
  [Opt.GO]: (c) => infoOrGo(c, true),

  async [Opt.STRUCTURED_REPLY](c) {
    if (await refuseData(c)) return 'continue';
    if (c.st.extended) return replyError(c, Rep.ERR_EXT_HEADER_REQD, 'extended headers are already negotiated');
    if (c.st.structured) return replyError(c, Rep.ERR_INVALID, 'structured replies are already negotiated');
    c.st.structured = true;
    await reply(c, Rep.ACK);
    return 'continue';
  },

  async [Opt.EXTENDED_HEADERS](c) {
    if (await refuseData(c)) return 'continue';
    if (c.st.extended) return replyError(c, Rep.ERR_INVALID, 'extended headers are already negotiated');
    c.st.extended = true;
    c.st.structured = true;
    // Block status replies change shape: contexts must be negotiated again.
    c.st.contexts = [];
    c.st.contextExport = null;
    await reply(c, Rep.ACK);
    return 'continue';
  },

  [Opt.LIST_META_CONTEXT]: (c) => metaContext(c, true),
  [Opt.SET_META_CONTEXT]: (c) => metaContext(c, false),
};

async function infoOrGo(c: Ctx, go: boolean): Promise<Outcome> {
  const req = decodeInfoRequest(c.data);
  const exp = c.exports.find(req.name);
  if (exp === undefined) return replyError(c, Rep.ERR_UNKNOWN, `export '${req.name}' not present`);
  const s = sessionFor(c.st, exp);
  if (req.infos.includes(Info.NAME)) await reply(c, Rep.INFO, encodeInfoString(Info.NAME, exp.name));
  if (req.infos.includes(Info.DESCRIPTION) && exp.description !== '') {
    await reply(c, Rep.INFO, encodeInfoString(Info.DESCRIPTION, exp.description));
  }
  // Sent whether asked or not (allowed; qemu does the same): clients learn the 32 MiB limit.
  await reply(c, Rep.INFO, encodeInfoBlockSize(BLOCK_MIN, BLOCK_PREFERRED, MAX_PAYLOAD));
  await reply(c, Rep.INFO, encodeInfoExport(exp.device.size, s.transmissionFlags));
  await reply(c, Rep.ACK);
  return go ? s : 'continue';
}

async function metaContext(c: Ctx, list: boolean): Promise<Outcome> {
  if (!list) {
    // SET replaces the previous selection, even when it fails.
    c.st.contexts = [];
    c.st.contextExport = null;
    if (!c.st.structured) return replyError(c, Rep.ERR_INVALID, 'NBD_OPT_SET_META_CONTEXT needs structured replies first');
  }
  const req = decodeMetaContextRequest(c.data);
  const exp = c.exports.find(req.exportName);
  if (exp === undefined) return replyError(c, Rep.ERR_UNKNOWN, `export '${req.exportName}' not present`);
  const picked: MetaContext[] = [];
  const queries = list && req.queries.length === 0 ? ['base:', 'qemu:'] : req.queries;
  for (const q of queries) for (const m of matchContexts(q, list)) if (!picked.includes(m)) picked.push(m);
  for (const m of picked) await reply(c, Rep.META_CONTEXT, encodeRepMetaContext(list ? 0 : m.id, m.name));
  if (!list) {
    c.st.contexts = picked;
    c.st.contextExport = exp;
  }
  await reply(c, Rep.ACK);
  return 'continue';
}

/**
 * Run the handshake. Resolves to the negotiated session, or throws
 * HandshakeEnd (clean: the client aborted) or StreamClosed.
 */
export async function handshake(
  reader: StreamReader,
  writer: StreamWriter,
  exports: ExportTable,
  limits: HandshakeLimits,
  shuttingDown: () => boolean,
  tls?: HandshakeTls,
  /** Receives the halves TLS replaced, for the transmission phase. */
  onUpgrade?: (io: { reader: StreamReader; writer: StreamWriter }) => void,
): Promise<Session> {
  await writer.send([encodeGreeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)]);
  const clientFlags = decodeClientFlags(await reader.read(4));
  if ((clientFlags & FLAG_C_FIXED_NEWSTYLE) === 0)
    throw new HandshakeEnd('client does not speak fixed newstyle (the only style served)', false);
  if ((clientFlags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)) !== 0) {
    throw new HandshakeEnd(`client set unknown flags 0x${clientFlags.toString(16)}`, false);
  }
  const st: State = {
    tls: false,
    structured: false,
    extended: false,
    noZeroes: (clientFlags & FLAG_C_NO_ZEROES) !== 0,
    contexts: [],
    contextExport: null,
  };
  for (let n = 0; ; n++) {
    if (n >= limits.maxOptions) throw new HandshakeEnd(`client sent more than ${limits.maxOptions} options`, false);
    const h = decodeOptionHeader(await reader.read(OPTION_HEADER_SIZE));
    const c: Ctx = { st, exports, writer, io: { reader, writer }, tls, option: h.option, data: Buffer.alloc(0) };
    if (h.length > limits.maxOptionLength) {
      if (h.length > MAX_SKIPPED_OPTION) throw new HandshakeEnd(`${optName(h.option)} with ${h.length} bytes of data`, false);
      await reader.skip(h.length);
      await replyError(c, Rep.ERR_TOO_BIG, `option data of ${h.length} bytes is larger than ${limits.maxOptionLength}`);
      continue;
    }
    c.data = await reader.read(h.length);
    if (shuttingDown() && h.option !== Opt.ABORT) {
      await replyError(c, Rep.ERR_SHUTDOWN, 'the server is shutting down');
      throw new HandshakeEnd('server shutting down', true);
    }
    if (tls?.required === true && !st.tls && h.option !== Opt.STARTTLS && h.option !== Opt.ABORT) {
      // FORCEDTLS: EXPORT_NAME has no error channel, every other option gets ERR_TLS_REQD.
      if (h.option === Opt.EXPORT_NAME) throw new HandshakeEnd('NBD_OPT_EXPORT_NAME before TLS on a server that requires TLS', false);
      await replyError(c, Rep.ERR_TLS_REQD, `this server requires TLS: send NBD_OPT_STARTTLS first`);
      continue;
    }
    const handler = handlers[h.option];
    if (handler === undefined) {
      await replyError(c, Rep.ERR_UNSUP, `unsupported option ${h.option} (${optName(h.option)})`);
      continue;
    }
    let out: Outcome;
    try {
      out = await handler(c);
    } catch (e) {
      if (!(e instanceof OptionDataError)) throw e;
      await replyError(c, Rep.ERR_INVALID, `${optName(h.option)}: ${e.message}`);
      continue;
    }
    if (c.io.reader !== reader) {
      reader = c.io.reader;
      writer = c.io.writer;
      onUpgrade?.(c.io);
    }
    if (out === 'close') throw new HandshakeEnd('client aborted the handshake', true);
    if (out !== 'continue') return out;
  }
}
