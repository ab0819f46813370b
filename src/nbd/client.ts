/**
 * An NBD client: fixed newstyle handshake (STARTTLS when asked, extended
 * headers when the server has them, else structured replies, the
 * base:allocation context, NBD_OPT_GO with an NBD_OPT_EXPORT_NAME fallback),
 * then transmission with many requests in flight, matched to replies by
 * cookie. Built on the same codec as the server.
 */
import { connect as netConnect, type Socket } from 'node:net';
import { BlockError, type ErrorKind } from '../block/errors.js';
import {
  decodeChunkPayload,
  decodeGreeting,
  decodeInfoReply,
  decodeOptionReplyHeader,
  decodeRepMetaContext,
  decodeReplyHeader,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  replyHeaderSize,
  type StatusDescriptor,
} from './codec.js';
import {
  CONTEXT_BASE_ALLOCATION,
  Chunk,
  Cmd,
  CmdFlag,
  Errno,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  Info,
  MAX_PAYLOAD,
  OPTION_REPLY_HEADER_SIZE,
  Opt,
  REPLY_FLAG_DONE,
  Rep,
  TFlag,
  cmdName,
  errnoName,
  isRepError,
  optName,
} from './protocol.js';
import { onreadOptions } from './socket-onread.js';
import { StreamClosed, StreamReader, StreamWriter, type BorrowedSource } from './stream.js';
import { upgradeClient, type ClientTlsOptions } from './tls.js';

export interface NbdClientOptions {
  target: { host: string; port: number } | { path: string };
  exportName?: string;
  /** Negotiate TLS; `required` fails when the server cannot, else plain is accepted. */
  tls?: ClientTlsOptions & { required: boolean };
  /** Try NBD_OPT_EXTENDED_HEADERS (default true). */
  extendedHeaders?: boolean;
  /** Requests in flight at once (default 32). */
  maxInFlight?: number;
  /** For messages. */
  name?: string;
  connectTimeoutMs?: number;
}

/** NBD error numbers back to rblock's error kinds. */
const KIND_OF_ERRNO: Record<number, ErrorKind> = {
  [Errno.EPERM]: 'read-only',
  [Errno.EINVAL]: 'invalid-argument',
  [Errno.ENOSPC]: 'no-space',
  [Errno.ENOTSUP]: 'not-supported',
  [Errno.EOVERFLOW]: 'invalid-argument',
};

interface Pending {
  type: number;
  offset: number;
  length: number;
  /** READ: where the data goes. */
  buf?: Uint8Array;
  descriptors?: StatusDescriptor[];
  error?: BlockError;
  resolve(): void;
  reject(e: Error): void;
}

/** Bytes received ahead of the reply loop before the socket is paused. */
const READ_HIGH_WATER = 8 << 20;

/** Option replies larger than this are refused (a LIST of many exports stays far below). */
const MAX_OPTION_REPLY = 16 << 20;

export class NbdClient {
  size = 0;
  flags = 0;
  mode: 'simple' | 'structured' | 'extended' = 'simple';
  /** Context id of base:allocation, when the server agreed to it. */
  allocationContext: number | null = null;
  /** The server's largest payload (NBD_INFO_BLOCK_SIZE maximum, else 32 MiB). */
  maxPayload = MAX_PAYLOAD;
  preferredBlock = 4096;
  tls = false;
  private reader: StreamReader;
  private writer: StreamWriter;
  private nextCookie = 1n;
  private readonly pending = new Map<bigint, Pending>();
  private inflight = 0;
  private readonly waiters: Array<() => void> = [];
  private dead: BlockError | null = null;
  private loop: Promise<void> = Promise.resolve();
  private readonly name: string;

  private constructor(
    private sock: Socket,
    private readonly opts: NbdClientOptions,
    source: BorrowedSource | null = null,
  ) {
    this.reader = new StreamReader(sock, READ_HIGH_WATER, source);
    this.writer = new StreamWriter(sock);
    const t = opts.target;
    this.name =
      opts.name ??
      ('path' in t ? `nbd+unix:///${opts.exportName ?? ''}?socket=${t.path}` : `nbd://${t.host}:${t.port}/${opts.exportName ?? ''}`);
  }

  get readOnly(): boolean {
    return (this.flags & TFlag.READ_ONLY) !== 0;
  }

  has(flag: number): boolean {
    return (this.flags & flag) !== 0;
  }

  static async connect(opts: NbdClientOptions): Promise<NbdClient> {
    const t = opts.target;
    const where = 'path' in t ? t.path : `${t.host}:${t.port}`;
    const source: BorrowedSource | null = opts.tls === undefined ? { sink: null, early: [] } : null;
    const sock = await new Promise<Socket>((resolve, reject) => {
      // One reused read buffer (socket-onread.ts); a TLS layer reads for itself.
      const onread = source !== null ? { onread: onreadOptions(source) } : {};
      const s = 'path' in t ? netConnect({ path: t.path, ...onread }) : netConnect({ port: t.port, host: t.host, ...onread });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new BlockError('io', `cannot connect to ${where}: timed out`, { path: where, op: 'open' }));
      }, opts.connectTimeoutMs ?? 10_000);
      s.once('connect', () => {
        clearTimeout(timer);
        resolve(s);
      });
      s.once('error', (e) => {
        clearTimeout(timer);
        reject(new BlockError('io', `cannot connect to NBD server ${where}: ${e.message}`, { path: where, op: 'open' }, e));
      });
    });
    sock.on('error', () => undefined);
    sock.setNoDelay(true);
    const c = new NbdClient(sock, opts, source);
    try {
      await c.handshake();
    } catch (e) {
      sock.destroy();
      if (e instanceof StreamClosed) throw c.err('protocol', 'the server closed the connection during the handshake');
      throw e;
    }
    c.loop = c.replyLoop();
    return c;
  }

  private err(kind: ErrorKind, message: string, cause?: unknown): BlockError {
    return new BlockError(kind, `${this.name}: ${message}`, { path: this.name, op: 'nbd' }, cause);
  }

  // ------------------------------------------------------------- handshake

  private async option(option: number, data?: Uint8Array): Promise<Array<{ type: number; data: Buffer }>> {
    await this.writer.send([encodeOption(option, data)]);
    const out: Array<{ type: number; data: Buffer }> = [];
    for (let n = 0; n < 100_000; n++) {
      const h = decodeOptionReplyHeader(await this.reader.read(OPTION_REPLY_HEADER_SIZE));
      if (h.option !== option) throw this.err('protocol', `reply to ${optName(h.option)} while waiting for ${optName(option)}`);
      if (h.length > MAX_OPTION_REPLY) throw this.err('protocol', `option reply of ${h.length} bytes`);
      const r = { type: h.type, data: Buffer.from(await this.reader.read(h.length)) };
      out.push(r);
      if (r.type === Rep.ACK || isRepError(r.type)) return out;
    }
    throw this.err('protocol', `endless replies to ${optName(option)}`);
  }

  private async handshake(): Promise<void> {
    const g = decodeGreeting(await this.reader.read(18));
    if ((g.handshakeFlags & FLAG_FIXED_NEWSTYLE) === 0) throw this.err('protocol', 'the server does not speak fixed newstyle NBD');
    const noZeroes = (g.handshakeFlags & FLAG_NO_ZEROES) !== 0;
    await this.writer.send([encodeClientFlags(FLAG_C_FIXED_NEWSTYLE | (noZeroes ? FLAG_C_NO_ZEROES : 0))]);
    const tls = this.opts.tls;
    if (tls !== undefined) {
      const r = (await this.option(Opt.STARTTLS)).at(-1)!;
      if (r.type === Rep.ACK) {
        if (this.reader.buffered > 0) throw this.err('protocol', 'the server sent data after acknowledging STARTTLS');
        this.reader.detach();
        const t = this.opts.target;
        const hostname = tls.hostname ?? ('host' in t ? t.host : undefined);
        const secure = await upgradeClient(this.sock, hostname !== undefined ? { ...tls, hostname } : tls);
        secure.on('error', () => undefined);
        this.sock = secure as unknown as Socket;
        this.reader = new StreamReader(secure, READ_HIGH_WATER);
        this.writer = new StreamWriter(secure);
        this.tls = true;
      } else if (tls.required) {
        throw this.err('protocol', `the server refused TLS (${repName(r.type)}${r.data.length > 0 ? `: ${r.data.toString('utf8')}` : ''})`);
      }
    }
    if (this.opts.extendedHeaders !== false && (await this.option(Opt.EXTENDED_HEADERS)).at(-1)!.type === Rep.ACK) {
      this.mode = 'extended';
    } else if ((await this.option(Opt.STRUCTURED_REPLY)).at(-1)!.type === Rep.ACK) {
      this.mode = 'structured';
    }
    const name = this.opts.exportName ?? '';
    if (this.mode !== 'simple') {
      const replies = await this.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest(name, [CONTEXT_BASE_ALLOCATION]));
      for (const r of replies) {
        if (r.type !== Rep.META_CONTEXT) continue;
        const m = decodeRepMetaContext(r.data);
        if (m.name === CONTEXT_BASE_ALLOCATION) this.allocationContext = m.id;
      }
    }
    const replies = await this.option(Opt.GO, encodeInfoRequest(name, [Info.BLOCK_SIZE]));
    const last = replies.at(-1)!;
    if (last.type === Rep.ERR_UNSUP) {
      await this.exportNameFallback(name, noZeroes);
      return;
    }
    if (last.type !== Rep.ACK) {
      const msg = last.data.length > 0 ? `: ${last.data.toString('utf8')}` : '';
      if (last.type === Rep.ERR_UNKNOWN) throw this.err('not-found', `no export '${name}' on the server${msg}`);
      if (last.type === Rep.ERR_TLS_REQD) throw this.err('protocol', `the server requires TLS (use nbds://)${msg}`);
      throw this.err('protocol', `the server refused export '${name}' (${repName(last.type)}${msg})`);
    }
    let gotExport = false;
    for (const r of replies) {
      if (r.type !== Rep.INFO) continue;
      const info = decodeInfoReply(r.data);
      if (info.type === Info.EXPORT && 'size' in info) {
        this.setExport(info.size, info.flags);
        gotExport = true;
      } else if (info.type === Info.BLOCK_SIZE && 'maximum' in info) {
        if (info.maximum >= 512) this.maxPayload = Math.min(info.maximum, MAX_PAYLOAD);
        this.preferredBlock = info.preferred;
      }
    }
    if (!gotExport) throw this.err('protocol', 'the server did not send NBD_INFO_EXPORT');
  }

  private async exportNameFallback(name: string, noZeroes: boolean): Promise<void> {
    if (this.mode === 'extended') throw this.err('protocol', 'the server negotiated extended headers but not NBD_OPT_GO');
    await this.writer.send([encodeOption(Opt.EXPORT_NAME, Buffer.from(name, 'utf8'))]);
    const b = await this.reader.read(10);
    this.setExport(b.readBigUInt64BE(0), b.readUInt16BE(8));
    if (!noZeroes) await this.reader.read(124);
  }

  private setExport(size: bigint, flags: number): void {
    if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw this.err('unsupported-feature', `export size ${size} is too large`);
    this.size = Number(size);
    this.flags = flags;
  }

  // ---------------------------------------------------------- transmission

  private async slot(): Promise<void> {
    const max = this.opts.maxInFlight ?? 32;
    while (this.inflight >= max) await new Promise<void>((r) => this.waiters.push(r));
    this.inflight++;
  }

  private release(): void {
    this.inflight--;
    this.waiters.shift()?.();
  }

  /** Send one request and wait for its whole reply. */
  private async request(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Uint8Array,
    buf?: Uint8Array,
  ): Promise<Pending> {
    if (this.dead !== null) throw this.dead;
    await this.slot();
    try {
      if (this.dead !== null) throw this.dead;
      const cookie = this.nextCookie++;
      let p!: Pending;
      const done = new Promise<void>((resolve, reject) => {
        p = { type, offset, length, resolve, reject };
        if (buf !== undefined) p.buf = buf;
      });
      this.pending.set(cookie, p);
      const hdr = encodeRequest({ flags, type, cookie, offset: BigInt(offset), length: BigInt(length) }, this.mode === 'extended');
      await this.writer.send(payload !== undefined ? [hdr, payload] : [hdr]);
      await done;
      if (p.error !== undefined) throw p.error;
      return p;
    } finally {
      this.release();
    }
  }

  private replyError(p: Pending, errno: number, message: string): BlockError {
    const what = `${cmdName(p.type)} at ${p.offset} length ${p.length} failed: ${errnoName(errno)}${message !== '' ? ` (${message})` : ''}`;
    return this.err(KIND_OF_ERRNO[errno] ?? 'io', what);
  }

  private async replyLoop(): Promise<void> {
    try {
      for (;;) {
        const magic = await this.reader.read(4);
        const size = replyHeaderSize(magic.readUInt32BE(0));
        if (size === 0) throw this.err('protocol', `bad reply magic 0x${magic.readUInt32BE(0).toString(16)}`);
        const h = decodeReplyHeader(Buffer.concat([magic, await this.reader.read(size - 4)]));
        const p = this.pending.get(h.cookie);
        if (p === undefined) throw this.err('protocol', `reply for unknown cookie ${h.cookie}`);
        if (h.kind === 'simple') {
          this.pending.delete(h.cookie);
          if (h.error !== 0) p.error = this.replyError(p, h.error, '');
          else if (p.type === Cmd.READ && p.buf !== undefined) await this.reader.readInto(p.buf);
          p.resolve();
          continue;
        }
        if (h.length > this.maxPayload + 4096 && h.length > 16 << 20) throw this.err('protocol', `reply chunk of ${h.length} bytes`);
        if (h.type === Chunk.OFFSET_DATA && p.type === Cmd.READ && p.buf !== undefined && h.length > 8) {
          // The data goes straight from the socket into the caller's buffer.
          const off = (await this.reader.read(8)).readBigUInt64BE(0);
          const rel = this.inRange(p, off, h.length - 8);
          await this.reader.readInto(p.buf.subarray(rel, rel + h.length - 8));
        } else {
          this.onChunk(p, decodeChunkPayload(h.type, await this.reader.read(h.length)));
        }
        if ((h.flags & REPLY_FLAG_DONE) !== 0) {
          this.pending.delete(h.cookie);
          p.resolve();
        }
      }
    } catch (e) {
      const dead =
        e instanceof BlockError && !(e instanceof StreamClosed)
          ? e
          : this.err('io', `connection lost${e instanceof Error ? `: ${e.message}` : ''}`);
      this.dead ??= dead;
      for (const p of this.pending.values()) p.reject(this.dead);
      this.pending.clear();
      this.sock.destroy();
    }
  }

  /** Where a reply chunk's bytes go in the request's buffer; outside the request is a protocol error. */
  private inRange(p: Pending, off: bigint, len: number): number {
    const rel = Number(off) - p.offset;
    if (off > BigInt(Number.MAX_SAFE_INTEGER) || rel < 0 || rel + len > p.length) {
      throw this.err('protocol', `${cmdName(p.type)} reply chunk at ${off}+${len} outside the request`);
    }
    return rel;
  }

  private onChunk(p: Pending, c: ReturnType<typeof decodeChunkPayload>): void {
    if ('error' in c) {
      p.error ??= this.replyError(p, c.error, c.message);
      return;
    }
    const inRange = (off: bigint, len: number): number => this.inRange(p, off, len);
    if (c.type === Chunk.OFFSET_DATA && 'data' in c) {
      if (p.type !== Cmd.READ || p.buf === undefined) throw this.err('protocol', 'data chunk for a request that is not a read');
      p.buf.set(c.data, inRange(c.offset, c.data.length));
    } else if (c.type === Chunk.OFFSET_HOLE && 'length' in c) {
      if (p.type !== Cmd.READ || p.buf === undefined) throw this.err('protocol', 'hole chunk for a request that is not a read');
      const rel = inRange(c.offset, c.length);
      p.buf.fill(0, rel, rel + c.length);
    } else if ((c.type === Chunk.BLOCK_STATUS || c.type === Chunk.BLOCK_STATUS_EXT) && 'descriptors' in c) {
      if (c.contextId === this.allocationContext) p.descriptors = c.descriptors;
    } else if (c.type !== Chunk.NONE) {
      throw this.err('protocol', `unexpected reply chunk type ${c.type}`);
    }
  }

  // -------------------------------------------------------------- commands

  /** Read buf.length bytes (at most maxPayload) at offset. */
  async read(buf: Uint8Array, offset: number): Promise<void> {
    await this.request(Cmd.READ, 0, offset, buf.length, undefined, buf);
  }

  async write(buf: Uint8Array, offset: number, fua = false): Promise<void> {
    await this.request(Cmd.WRITE, fua ? CmdFlag.FUA : 0, offset, buf.length, buf);
  }

  async flush(): Promise<void> {
    await this.request(Cmd.FLUSH, 0, 0, 0);
  }

  /** Lengths above what a compact header holds are split. */
  private async ranged(type: number, flags: number, offset: number, length: number): Promise<void> {
    const step = this.mode === 'extended' ? 1 << 30 : 1 << 30;
    const parts: Promise<Pending>[] = [];
    for (let done = 0; done < length; done += step) parts.push(this.request(type, flags, offset + done, Math.min(step, length - done)));
    await Promise.all(parts);
  }

  async trim(offset: number, length: number, fua = false): Promise<void> {
    await this.ranged(Cmd.TRIM, fua ? CmdFlag.FUA : 0, offset, length);
  }

  async writeZeroes(offset: number, length: number, o: { fua?: boolean; noHole?: boolean } = {}): Promise<void> {
    await this.ranged(Cmd.WRITE_ZEROES, (o.fua === true ? CmdFlag.FUA : 0) | (o.noHole === true ? CmdFlag.NO_HOLE : 0), offset, length);
  }

  /** base:allocation descriptors from offset (the server may answer for less, never for none). */
  async blockStatus(offset: number, length: number): Promise<StatusDescriptor[]> {
    if (this.allocationContext === null) throw this.err('not-supported', 'the server offers no base:allocation context');
    const p = await this.request(Cmd.BLOCK_STATUS, 0, offset, Math.min(length, 1 << 30));
    const d = (p.descriptors ?? []).filter((x) => x.length > 0);
    if (d.length === 0) throw this.err('protocol', `block status at ${offset} returned no extent`);
    return d;
  }

  /** NBD_CMD_DISC after the requests in flight, then close. */
  async close(): Promise<void> {
    if (this.dead === null) {
      while (this.inflight > 0) await new Promise<void>((r) => this.waiters.push(r));
      this.dead = this.err('invalid-argument', 'the connection is closed');
      await this.writer.send([encodeRequest({ flags: 0, type: Cmd.DISC, cookie: 0n, offset: 0n, length: 0n }, this.mode === 'extended')]);
      await this.writer.end();
    }
    this.sock.destroy();
    await this.loop;
  }
}

function repName(type: number): string {
  const e = Object.entries(Rep).find(([, v]) => v === type);
  return e !== undefined ? `NBD_REP_${e[0]}` : `reply type 0x${type.toString(16)}`;
}
