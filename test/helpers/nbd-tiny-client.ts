/**
 * A tiny NBD client for tests: speaks exactly what a test tells it to, so
 * tests can send what real clients never do (extended headers, which the
 * Debian peers predate; bad flags; garbage) and look at the raw replies.
 * Built on the codec, so it also checks that encoders and decoders agree.
 */
import { connect, type Socket } from 'node:net';
import {
  decodeChunkPayload,
  decodeGreeting,
  decodeOptionReplyHeader,
  decodeReplyHeader,
  encodeClientFlags,
  encodeOption,
  encodeRequest,
  replyHeaderSize,
  type ChunkPayload,
  type ReplyHeader,
  type Request,
} from '../../src/nbd/codec.js';
import { FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, Opt, REPLY_FLAG_DONE, isRepError } from '../../src/nbd/protocol.js';
import { StreamReader, StreamWriter } from '../../src/nbd/stream.js';

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export interface Reply {
  header: ReplyHeader;
  /** Simple replies: the data that follows (READ), else empty. */
  data: Buffer;
  /** Structured/extended: the decoded payload. */
  chunk?: ChunkPayload;
}

export class TinyClient {
  readonly reader: StreamReader;
  readonly writer: StreamWriter;
  extended = false;
  private nextCookie = 1n;

  private constructor(readonly sock: Socket) {
    this.reader = new StreamReader(sock);
    this.writer = new StreamWriter(sock);
  }

  static async connect(path: string): Promise<TinyClient> {
    const sock = connect(path);
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', reject);
    });
    return new TinyClient(sock);
  }

  /** Read the greeting and answer with fixed newstyle + no zeroes. */
  async start(clientFlags = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES): Promise<number> {
    const g = decodeGreeting(await this.reader.read(18));
    await this.writer.send([encodeClientFlags(clientFlags)]);
    return g.handshakeFlags;
  }

  /** Send an option and collect its replies up to the final one (ACK or an error). */
  async option(option: number, data: Uint8Array = Buffer.alloc(0)): Promise<OptionReply[]> {
    await this.writer.send([encodeOption(option, data)]);
    const out: OptionReply[] = [];
    for (;;) {
      const h = decodeOptionReplyHeader(await this.reader.read(20));
      const r = { option: h.option, type: h.type, data: Buffer.from(await this.reader.read(h.length)) };
      out.push(r);
      if (r.type === 1 || isRepError(r.type)) return out;
    }
  }

  async negotiateExtended(): Promise<OptionReply[]> {
    const r = await this.option(Opt.EXTENDED_HEADERS);
    if (r[r.length - 1]?.type === 1) this.extended = true;
    return r;
  }

  cookie(): bigint {
    return this.nextCookie++;
  }

  /** Send one request (with a payload for WRITE). */
  async send(req: Partial<Request> & { type: number }, payload?: Uint8Array): Promise<bigint> {
    const full: Request = { flags: 0, cookie: this.cookie(), offset: 0n, length: 0n, ...req };
    await this.writer.send(payload === undefined ? [encodeRequest(full, this.extended)] : [encodeRequest(full, this.extended), payload]);
    return full.cookie;
  }

  /**
   * Read one reply message (a simple reply, or one chunk). A simple reply
   * with error 0 to a READ carries `readLength` bytes of data.
   */
  async reply(readLength = 0): Promise<Reply> {
    const magicBytes = await this.reader.read(4);
    const size = replyHeaderSize(magicBytes.readUInt32BE(0));
    const rest = size > 4 ? await this.reader.read(size - 4) : Buffer.alloc(0);
    const header = decodeReplyHeader(Buffer.concat([magicBytes, rest]));
    if (header.kind === 'simple') {
      const data = header.error === 0 && readLength > 0 ? Buffer.from(await this.reader.read(readLength)) : Buffer.alloc(0);
      return { header, data };
    }
    const payload = Buffer.from(await this.reader.read(header.length));
    return { header, data: payload, chunk: decodeChunkPayload(header.type, payload) };
  }

  /** All chunks of one structured reply, up to the one flagged DONE. */
  async chunks(): Promise<Reply[]> {
    const out: Reply[] = [];
    for (;;) {
      const r = await this.reply();
      out.push(r);
      if (r.header.kind === 'simple' || (r.header.flags & REPLY_FLAG_DONE) !== 0) return out;
    }
  }

  /** Resolves when the server has closed the connection. */
  closed(): Promise<void> {
    if (this.sock.destroyed || this.sock.readableEnded) return Promise.resolve();
    return new Promise((r) => this.sock.once('close', () => r()));
  }

  destroy(): void {
    this.sock.destroy();
  }
}
