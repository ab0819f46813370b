/**
 * The transmission phase: read a request, validate it, dispatch it to the
 * device, reply. Requests run concurrently and reply as they complete; the
 * reader stops taking requests while too many requests or bytes are in
 * flight, which stops reading the socket (back-pressure to the client).
 *
 * Every request is validated here before it reaches the device, with the
 * protocol's errno values; failures of the device map to errno through the
 * one table ERRNO_OF_KIND. A peer that breaks the framing (bad magic, a
 * payload beyond 32 MiB) loses its connection; everything else is an error
 * reply and the connection goes on.
 */
import type { BlockDevice, Extent, ReadNowOpts, ReadRuns } from '../block/device.js';
import { BlockError, type ErrorKind } from '../block/errors.js';
import { isZero } from '../block/zero.js';
import {
  decodeRequest,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHole,
  encodeSimpleReply,
  requestSize,
  type Request,
  type StatusDescriptor,
} from './codec.js';
import type { ContextKind, ServedExport } from './exports.js';
import type { Session } from './handshake.js';
import {
  Cmd,
  CmdFlag,
  Errno,
  MAX_PAYLOAD,
  REPLY_FLAG_DONE,
  STATE_HOLE,
  STATE_ZERO,
  cmdName,
  errnoName,
  type NbdErrno,
} from './protocol.js';
import type { FileSpan } from '../block/hostio.js';
import { BufferPool, StreamClosed, type StreamReader, type StreamWriter } from './stream.js';

/** The one mapping from BlockError kinds to NBD errors. */
export const ERRNO_OF_KIND: Readonly<Record<ErrorKind, NbdErrno>> = {
  io: Errno.EIO,
  'invalid-argument': Errno.EINVAL,
  'out-of-bounds': Errno.EINVAL,
  'read-only': Errno.EPERM,
  'no-space': Errno.ENOSPC,
  'not-supported': Errno.ENOTSUP,
  'invalid-image': Errno.EIO,
  'corrupt-image': Errno.EIO,
  'unsupported-feature': Errno.EIO,
  'not-found': Errno.EIO,
  protocol: Errno.EINVAL,
};

/** A request refused with this errno (validation, or a device failure). */
export class RequestError extends Error {
  constructor(
    readonly errno: NbdErrno,
    message: string,
  ) {
    super(message);
    this.name = 'RequestError';
  }
}

export function errnoOf(e: unknown): NbdErrno {
  if (e instanceof RequestError) return e.errno;
  if (e instanceof BlockError) return ERRNO_OF_KIND[e.kind];
  const code = (e as NodeJS.ErrnoException | null)?.code;
  if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'EFBIG') return Errno.ENOSPC;
  if (code === 'EROFS' || code === 'EPERM' || code === 'EACCES') return Errno.EPERM;
  return Errno.EIO;
}

export interface TransmissionLimits {
  /** Requests being processed at once on one connection. */
  maxInFlightRequests: number;
  /** Bytes of request payloads and read buffers held at once on one connection. */
  maxInFlightBytes: number;
}

/**
 * Per connection. nbdcopy keeps 64 requests of 256 KiB in flight on each of
 * its 4 connections; admitting 32 requests or 4 MiB at a time per connection
 * was as fast here as 64 / 64 MiB (nbdcopy of the 2 GiB qcow2 over a Unix
 * socket: 1.47 vs 1.46 s) and cut the server's peak RSS from 118 to 88-92
 * MiB (8 MiB: 100 MiB, same speed). qemu-nbd admits 16 requests per
 * connection. A request larger than the byte bound is still taken when
 * nothing else is in flight.
 */
export const DEFAULT_TRANSMISSION_LIMITS: TransmissionLimits = { maxInFlightRequests: 32, maxInFlightBytes: 4 << 20 };

/** How the connection ended. */
export type TransmissionEnd = 'disc' | 'closed' | 'protocol-error' | 'stopped';

/** Write payloads from this size on are read into pooled buffers (the pool's smallest class). */
const POOLED_PAYLOAD = 64 << 10;

/**
 * Structured READs up to this length are read whole, without asking for
 * block status first (nbdkit's file plugin never does; qemu-nbd always does).
 */
const SMALL_READ = 64 << 10;

/** readNow for a reply that sends holes as hole chunks (their bytes are never looked at), and for one that sends bytes. */
const SEND_HOLES: ReadNowOpts = { holes: true, zeroFill: false };
const NO_HOLES: ReadNowOpts = { holes: false };

/** Block status answers examine at most this many device extents per request. */
const MAX_STATUS_EXTENTS = 16384;
/** ... in device calls of at most this span, so a huge request cannot make one call huge. */
const STATUS_WINDOW = 1 << 30;

/** A request that passed validation: numbers are safe integers inside the export. */
interface Valid {
  req: Request;
  offset: number;
  length: number;
}

export class Transmission {
  private inflight = 0;
  private inflightBytes = 0;
  private budgetWaiter: (() => void) | null = null;
  private stopping = false;
  private readonly exp: ServedExport;
  private readonly dev: BlockDevice;
  private readonly extended: boolean;
  private readonly structured: boolean;
  /** Large READs go out as spliced file spans (spliceRead); decided once per connection. */
  private readonly splice: boolean;

  constructor(
    private readonly reader: StreamReader,
    private readonly writer: StreamWriter,
    private readonly session: Session,
    private readonly limits: TransmissionLimits,
    private readonly log: (msg: string) => void,
    private readonly pool: BufferPool = new BufferPool(),
  ) {
    this.exp = session.export;
    this.dev = session.export.device;
    this.extended = session.mode === 'extended';
    this.structured = session.mode !== 'simple';
    writer.coalesce = true;
    // Only where nothing writes the device while a reply's pages are on their way: a spliced page
    // is read by the client when it gets there, so a later write (or a cluster freed and reused)
    // would show through an earlier READ's reply.
    this.splice = this.exp.readOnly && this.dev.spansNow !== undefined && writer.canSplice;
  }

  /** Stop taking requests (server shutdown); run() resolves once those in flight have replied. */
  stop(): void {
    this.stopping = true;
    this.reader.abort(new StreamClosed('the server is shutting down'));
    this.wakeBudget();
  }

  async run(): Promise<TransmissionEnd> {
    let end: TransmissionEnd = 'closed';
    const hsize = requestSize(this.extended);
    try {
      for (;;) {
        await this.waitBudget();
        if (this.stopping) {
          end = 'stopped';
          break;
        }
        const req = decodeRequest(await this.reader.read(hsize), this.extended);
        if (req.type === Cmd.DISC) {
          end = 'disc';
          break;
        }
        const payloadLen = this.payloadLength(req);
        if (payloadLen > MAX_PAYLOAD) {
          throw new BlockError('protocol', `${cmdName(req.type)} with a payload of ${payloadLen} bytes (at most ${MAX_PAYLOAD})`);
        }
        let payload: Buffer | null = null;
        let held: Buffer | null = null;
        if (payloadLen >= POOLED_PAYLOAD) {
          // Large payloads span several socket chunks and must be copied out
          // of them anyway: into a reused buffer, not a fresh one per request
          // (GC is about a tenth of the server's time under nbdcopy writes,
          // mostly the socket's own 64 KiB chunks, which this cannot avoid).
          held = this.pool.get(payloadLen);
          payload = held.subarray(0, payloadLen);
          await this.reader.readInto(payload);
        } else if (payloadLen > 0) payload = await this.reader.read(payloadLen);
        const cost = payloadLen + (req.type === Cmd.READ ? Math.min(Number(req.length), MAX_PAYLOAD) : 0);
        this.start(req, payload, cost, held);
      }
    } catch (e) {
      if (this.stopping) end = 'stopped';
      else if (e instanceof StreamClosed) end = 'closed';
      else if (e instanceof BlockError && e.kind === 'protocol') {
        this.log(`protocol error, dropping the client: ${e.message}`);
        end = 'protocol-error';
      } else throw e;
    }
    await this.drain();
    return end;
  }

  /** Wait until every request in flight has replied. */
  async drain(): Promise<void> {
    while (this.inflight > 0) await new Promise<void>((r) => (this.budgetWaiter = r));
  }

  /** Bytes that follow the header: WRITE data, or any payload announced with PAYLOAD_LEN. */
  private payloadLength(req: Request): number {
    const has = req.type === Cmd.WRITE || (this.extended && (req.flags & CmdFlag.PAYLOAD_LEN) !== 0);
    if (!has) return 0;
    return req.length > BigInt(MAX_PAYLOAD) ? Number.POSITIVE_INFINITY : Number(req.length);
  }

  private start(req: Request, payload: Buffer | null, cost: number, pooled: Buffer | null): void {
    if (req.type === Cmd.READ) {
      if (this.splice && req.length > BigInt(SMALL_READ) && this.spliceRead(req, cost)) return;
      if (this.dev.readNow !== undefined && this.readNow(req, cost)) return;
    }
    this.inflight++;
    this.inflightBytes += cost;
    const done = (): void => this.finished(cost);
    this.handle(req, payload, pooled).then(done, done);
  }

  /** A request has replied (or never will): its share of the budget is free. */
  private finished(cost: number): void {
    this.inflight--;
    this.inflightBytes -= cost;
    this.wakeBudget();
  }

  /**
   * A READ answered at once when the device has everything in memory
   * (BlockDevice.readNow: cached metadata, data in the page cache): no
   * promise chain through the device, only the send. False: not possible
   * (or not valid: the asynchronous path then replies with the error).
   */
  private readNow(req: Request, cost: number): boolean {
    const v = this.validRead(req);
    if (v === null) return false;
    const held = this.pool.get(v.length);
    const buf = held.subarray(0, v.length);
    // Holes matter only where readReply sends them as hole chunks: structured, no DF, not small
    // (a small read's zeros are found in its bytes; see read()).
    const holes = this.structured && (req.flags & CmdFlag.DF) === 0 && v.length > SMALL_READ;
    const runs = (this.dev.readNow as NonNullable<BlockDevice['readNow']>).call(this.dev, buf, v.offset, holes ? SEND_HOLES : NO_HOLES);
    if (runs === null) {
      this.pool.put(held);
      return false;
    }
    this.inflight++;
    this.inflightBytes += cost;
    this.writer.sendThen(this.readReply(v, buf, runs), () => {
      this.pool.put(held);
      this.finished(cost);
    });
    return true;
  }

  /**
   * A large READ on a read-only export answered with the page cache's own
   * pages (BlockDevice.spansNow, StreamWriter file spans): no copy into a
   * buffer, and for a Unix socket none into the socket either. A 2 GiB
   * nbdcopy over a Unix socket cost the server 530-720 ms of system time
   * with preadv2 + sendmsg and 210-260 ms this way. False: not possible now.
   */
  private spliceRead(req: Request, cost: number): boolean {
    const v = this.validRead(req);
    if (v === null) return false;
    const spans = (this.dev.spansNow as NonNullable<BlockDevice['spansNow']>).call(this.dev, v.offset, v.length);
    if (spans === null) return false;
    const holes = this.structured && (req.flags & CmdFlag.DF) === 0;
    const out: Array<Uint8Array | FileSpan> = [];
    if (holes) {
      const last = spans.length - 1;
      spans.forEach((s, i) => {
        const flags = i === last ? REPLY_FLAG_DONE : 0;
        if (s.zero) out.push(encodeOffsetHole(this.extended, flags, req.cookie, req.offset, s.offset, s.length));
        else {
          out.push(encodeOffsetDataHeader(this.extended, flags, req.cookie, req.offset, s.offset, s.length));
          out.push({ fd: s.fd, offset: s.hostOffset, length: s.length });
        }
      });
    } else {
      // One data chunk (DF) or a simple reply: every byte goes out, so zeros must be bytes.
      if (spans.some((s) => s.zero)) return false;
      out.push(
        this.structured
          ? encodeOffsetDataHeader(this.extended, REPLY_FLAG_DONE, req.cookie, req.offset, v.offset, v.length)
          : encodeSimpleReply(0, req.cookie),
      );
      for (const s of spans) out.push({ fd: s.fd, offset: s.hostOffset, length: s.length });
    }
    this.inflight++;
    this.inflightBytes += cost;
    this.writer.sendThen(out, () => this.finished(cost));
    return true;
  }

  /** A READ that passes validation, or null: the asynchronous path then replies with the error. */
  private validRead(req: Request): Valid | null {
    try {
      return this.validate(req, null);
    } catch {
      return null;
    }
  }

  private async waitBudget(): Promise<void> {
    while (!this.stopping && (this.inflight >= this.limits.maxInFlightRequests || this.inflightBytes >= this.limits.maxInFlightBytes)) {
      await new Promise<void>((r) => (this.budgetWaiter = r));
    }
  }

  private wakeBudget(): void {
    const w = this.budgetWaiter;
    this.budgetWaiter = null;
    w?.();
  }

  private async handle(req: Request, payload: Buffer | null, pooled: Buffer | null): Promise<void> {
    let out: Uint8Array[];
    const held: Buffer[] = pooled === null ? [] : [pooled];
    try {
      out = await this.dispatch(this.validate(req, payload), payload, held);
    } catch (e) {
      const errno = errnoOf(e);
      const msg = e instanceof Error ? e.message : String(e);
      if (!(e instanceof RequestError))
        this.log(`${cmdName(req.type)} at ${req.offset} length ${req.length} failed (${errnoName(errno)}): ${msg}`);
      out = [this.errorReply(req, errno, msg)];
    }
    await new Promise<void>((resolve) => this.writer.sendThen(out, resolve));
    // Sent (or never will be): the read buffers can serve another request.
    for (const b of held) this.pool.put(b);
  }

  // ------------------------------------------------------------ validation

  private validate(req: Request, payload: Buffer | null): Valid {
    const { type, flags } = req;
    const name = cmdName(type);
    const isWrite = type === Cmd.WRITE || type === Cmd.TRIM || type === Cmd.WRITE_ZEROES;
    if (type > Cmd.BLOCK_STATUS) throw new RequestError(Errno.EINVAL, `unsupported command ${type}`);
    if (isWrite && this.exp.readOnly) throw new RequestError(Errno.EPERM, `${name} on a read-only export`);

    let valid: number = CmdFlag.FUA;
    if (type === Cmd.READ && this.structured) valid |= CmdFlag.DF;
    if (type === Cmd.WRITE && this.extended) valid |= CmdFlag.PAYLOAD_LEN;
    if (type === Cmd.WRITE_ZEROES) valid |= CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO;
    if (type === Cmd.BLOCK_STATUS) valid |= CmdFlag.REQ_ONE;
    if ((flags & ~valid) !== 0) throw new RequestError(Errno.EINVAL, `${name}: unsupported flags 0x${flags.toString(16)}`);
    if (payload !== null && type !== Cmd.WRITE) throw new RequestError(Errno.EINVAL, `${name} does not take a payload`);

    if (type === Cmd.FLUSH) {
      if (req.offset !== 0n || req.length !== 0n) throw new RequestError(Errno.EINVAL, `${name} with a nonzero offset or length`);
      return { req, offset: 0, length: 0 };
    }
    if (req.length === 0n) throw new RequestError(Errno.EINVAL, `${name} of zero bytes`);
    if (type === Cmd.READ && req.length > BigInt(MAX_PAYLOAD)) {
      throw new RequestError(Errno.EOVERFLOW, `${name} of ${req.length} bytes is larger than the maximum ${MAX_PAYLOAD}`);
    }
    const size = BigInt(this.dev.size);
    if (req.offset > size || req.length > size - req.offset) {
      const errno = type === Cmd.WRITE || type === Cmd.WRITE_ZEROES ? Errno.ENOSPC : Errno.EINVAL;
      throw new RequestError(errno, `${name} past the end of the export: offset ${req.offset} length ${req.length}, size ${size}`);
    }
    if (type === Cmd.BLOCK_STATUS && this.session.contexts.length === 0) {
      throw new RequestError(Errno.EINVAL, `${name} without a meta context negotiated`);
    }
    if (type === Cmd.WRITE_ZEROES && (flags & CmdFlag.FAST_ZERO) !== 0 && !this.dev.caps.zero) {
      throw new RequestError(Errno.ENOTSUP, `${name}: fast zeroing is not possible on this export`);
    }
    return { req, offset: Number(req.offset), length: Number(req.length) };
  }

  // -------------------------------------------------------------- dispatch

  /** Run a valid request; buffers that the reply uses go to `held` until it is sent. */
  private async dispatch(v: Valid, payload: Buffer | null, held: Buffer[]): Promise<Uint8Array[]> {
    const { req, offset, length } = v;
    const fua = (req.flags & CmdFlag.FUA) !== 0;
    switch (req.type) {
      case Cmd.READ: {
        const buf = this.pool.get(length);
        held.push(buf);
        return this.read(v, buf.subarray(0, length));
      }
      case Cmd.WRITE:
        await this.dev.pwrite(payload as Buffer, offset, { fua });
        return this.okReply(req);
      case Cmd.FLUSH:
        if (!this.exp.readOnly) await this.dev.flush();
        return this.okReply(req);
      case Cmd.TRIM:
        await this.dev.discard(offset, length, { fua });
        return this.okReply(req);
      case Cmd.CACHE:
        // A hint with no effect on contents; the range was checked.
        return this.okReply(req);
      case Cmd.WRITE_ZEROES:
        await this.dev.writeZeroes(offset, length, { fua, mayTrim: (req.flags & CmdFlag.NO_HOLE) === 0 });
        return this.okReply(req);
      case Cmd.BLOCK_STATUS:
        return this.blockStatus(v);
      default:
        throw new RequestError(Errno.EINVAL, `unsupported command ${req.type}`);
    }
  }

  private okReply(req: Request): Uint8Array[] {
    if (this.extended) return [encodeNoneChunk(true, REPLY_FLAG_DONE, req.cookie, req.offset)];
    return [encodeSimpleReply(0, req.cookie)];
  }

  private errorReply(req: Request, errno: number, message: string): Uint8Array {
    if (!this.structured) return encodeSimpleReply(errno, req.cookie);
    return encodeErrorChunk(this.extended, REPLY_FLAG_DONE, req.cookie, req.offset, errno, message);
  }

  /**
   * READ: with structured replies, holes (runs that read as zeros) become
   * OFFSET_HOLE chunks and are not read at all, unless DF asks for one chunk.
   * Everything is read before the first byte is sent, so an error is always
   * one clean error reply.
   */
  private async read(v: Valid, buf: Buffer): Promise<Uint8Array[]> {
    const { req, offset, length } = v;
    if (!this.structured || (req.flags & CmdFlag.DF) !== 0 || length <= SMALL_READ) {
      // Small reads skip block status: reading a hole costs the host little (the
      // kernel's zeros, a qcow2 memset), asking for it cost more than the read (two
      // lseek calls a request for a sparse raw file were a quarter of the server's
      // time under fio 4 KiB random reads). readReply still sends zeros as a hole.
      await this.dev.pread(buf, offset);
      return this.readReply(v, buf, [{ offset, length, zero: false }]);
    }
    let runs: ReadRuns;
    if (!this.dev.caps.blockStatus) runs = [{ offset, length, zero: false }];
    else runs = mergeZeroRuns(await collectExtents(this.dev, offset, length));
    await Promise.all(
      runs.filter((r) => !r.zero).map((r) => this.dev.pread(buf.subarray(r.offset - offset, r.offset - offset + r.length), r.offset)),
    );
    return this.readReply(v, buf, runs);
  }

  /**
   * The reply to a READ whose data is in buf, `runs` saying which parts read
   * as zeros: with structured replies those become OFFSET_HOLE chunks (a
   * small read that is all zeros: one hole), unless DF asks for one chunk.
   */
  private readReply(v: Valid, buf: Buffer, runs: ReadRuns): Uint8Array[] {
    const { req, offset, length } = v;
    if (!this.structured) return [encodeSimpleReply(0, req.cookie), buf];
    const df = (req.flags & CmdFlag.DF) !== 0;
    if (df || length <= SMALL_READ) {
      if (!df && (runs.every((r) => r.zero) || isZero(buf)))
        return [encodeOffsetHole(this.extended, REPLY_FLAG_DONE, req.cookie, req.offset, offset, length)];
      return [encodeOffsetDataHeader(this.extended, REPLY_FLAG_DONE, req.cookie, req.offset, offset, length), buf];
    }
    const merged = mergeZeroRuns(runs);
    const out: Uint8Array[] = [];
    merged.forEach((r, i) => {
      const flags = i === merged.length - 1 ? REPLY_FLAG_DONE : 0;
      if (r.zero) out.push(encodeOffsetHole(this.extended, flags, req.cookie, req.offset, r.offset, r.length));
      else {
        out.push(encodeOffsetDataHeader(this.extended, flags, req.cookie, req.offset, r.offset, r.length));
        out.push(buf.subarray(r.offset - offset, r.offset - offset + r.length));
      }
    });
    return out;
  }

  /** BLOCK_STATUS: one chunk per selected context, from the same device extents. */
  private async blockStatus(v: Valid): Promise<Uint8Array[]> {
    const { req, offset, length } = v;
    const reqOne = (req.flags & CmdFlag.REQ_ONE) !== 0;
    const extents = await collectExtents(this.dev, offset, length, reqOne ? { maxCalls: 1 } : { maxExtents: MAX_STATUS_EXTENTS });
    const contexts = this.session.contexts;
    return contexts.map((ctx, i) => {
      const status = statusFunction(ctx.kind, this.exp.chain);
      let desc = mergeDescriptors(extents, status);
      if (reqOne) desc = desc.slice(0, 1);
      const flags = i === contexts.length - 1 ? REPLY_FLAG_DONE : 0;
      return encodeBlockStatusChunk(this.extended, flags, req.cookie, req.offset, ctx.id, desc);
    });
  }
}

/**
 * Device extents covering a prefix of [offset, offset+length), clipped to the
 * range: all of it, unless maxCalls device calls or maxExtents stop early.
 */
export async function collectExtents(
  dev: BlockDevice,
  offset: number,
  length: number,
  limits: { maxCalls?: number; maxExtents?: number } = {},
): Promise<Extent[]> {
  const maxCalls = limits.maxCalls ?? Number.POSITIVE_INFINITY;
  const maxExtents = limits.maxExtents ?? Number.POSITIVE_INFINITY;
  const out: Extent[] = [];
  const end = offset + length;
  let pos = offset;
  for (let calls = 0; pos < end && calls < maxCalls && out.length < maxExtents; calls++) {
    const ext = await dev.blockStatus(pos, Math.min(end - pos, STATUS_WINDOW));
    const before = pos;
    for (const e of ext) {
      const s = Math.max(e.offset, pos);
      const t = Math.min(e.offset + e.length, end);
      if (s !== pos || t <= s) break;
      out.push(s === e.offset && t === e.offset + e.length ? e : { ...e, offset: s, length: t - s });
      pos = t;
    }
    if (pos === before) throw new BlockError('io', `block status made no progress at offset ${pos}`, { op: 'block-status' });
  }
  return out;
}

/** Adjacent runs that both read as zeros or both not, as one. */
function mergeZeroRuns(runs: ReadonlyArray<{ offset: number; length: number; zero: boolean }>): ReadRuns {
  const out: ReadRuns = [];
  for (const r of runs) {
    const last = out[out.length - 1];
    if (last !== undefined && last.zero === r.zero) last.length += r.length;
    else out.push({ offset: r.offset, length: r.length, zero: r.zero });
  }
  return out;
}

function mergeDescriptors(extents: readonly Extent[], status: (e: Extent) => number): StatusDescriptor[] {
  const out: StatusDescriptor[] = [];
  for (const e of extents) {
    const s = status(e);
    const last = out[out.length - 1];
    if (last !== undefined && last.status === s) last.length += e.length;
    else out.push({ length: e.length, status: s });
  }
  return out;
}

function statusFunction(kind: ContextKind, chain: readonly BlockDevice[]): (e: Extent) => number {
  if (kind === 'allocation') return (e) => (e.hole ? STATE_HOLE : 0) | (e.zero ? STATE_ZERO : 0);
  return (e) => allocationDepth(e, chain);
}

/**
 * qemu:allocation-depth of an extent: 0 when no layer allocates it, else the
 * 1-based layer that does (1 = the top image).
 *
 * Extent.depth counts from 0 at the top. For an unallocated extent, chain.ts
 * reports the layer where the lookup stopped: either the bottom of the chain
 * (no backing file: qemu says 0) or a layer whose backing file is shorter
 * than the offset. qemu counts the zeros it synthesizes past the end of a
 * short backing file as allocated in that backing file, so the depth is
 * then the backing file's: (layer + 1) + 1.
 */
export function allocationDepth(e: Extent, chain: readonly BlockDevice[]): number {
  const depth = e.depth ?? 0;
  if (e.allocated ?? !e.hole) return depth + 1;
  return chain[depth + 1] !== undefined ? depth + 2 : 0;
}
