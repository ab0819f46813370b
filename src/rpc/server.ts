/**
 * The JSON-RPC server: TCP and Unix socket listeners over the exports it is
 * given (the caller opens and closes the devices, so one open image can be
 * served over NBD and JSON-RPC at once), with the limits of RpcLimits.
 *
 *   const rpc = new RpcServer({ exports: [{ name: '', device, readOnly: false }] });
 *   await rpc.listen({ host: '127.0.0.1', port: 1234 });
 *   // echo -n '{"jsonrpc":"2.0","method":"info","id":1}' | nc localhost 1234
 *   await rpc.close();
 *
 * Per connection, requests are answered in the order they arrive, one line
 * each; a batch is answered as one line (its requests run concurrently).
 */
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { BlockError } from '../block/errors.js';
import { listenOn, removeStaleSocket } from '../util/listen.js';
import { parseSize } from '../util/size.js';
import { dispatch, errorResponse, parseErrorResponse, type RpcResponse } from './dispatcher.js';
import { INTERNAL_ERROR, INVALID_REQUEST, RpcError } from './errors.js';
import { DEFAULT_RPC_LIMITS, type RpcExport, type RpcLimits } from './schema.js';
import { JsonSplitter, parseValue, stringifyReply, type SplitEvent } from './transport.js';

export type RpcListenAddress = { host?: string; port: number } | { path: string };
export type RpcBoundAddress = { host: string; port: number } | { path: string };

export interface RpcServerOptions {
  exports: readonly RpcExport[];
  limits?: Partial<RpcLimits>;
  log?: (msg: string) => void;
}

/** Replies queued on one connection before it stops reading (back-pressure). */
const MAX_QUEUED = 32;

class RpcConnection {
  private chain: Promise<void> = Promise.resolve();
  private queued = 0;
  /** Half-sent message idle (idleTimeoutMs), or nothing to do at all (idleCloseMs). */
  private idle: NodeJS.Timeout | null = null;
  private closed = false;
  /** No more input will be handled (too large, idle, EOF): finish the queue, then end. */
  private finishing = false;
  private readonly splitter: JsonSplitter;
  readonly done: Promise<void>;

  constructor(
    private readonly sock: Socket,
    private readonly server: RpcServer,
  ) {
    const limits = server.limits;
    this.splitter = new JsonSplitter(limits.maxMessageBytes, limits.maxDepth);
    this.done = new Promise((resolve) => sock.once('close', () => resolve()));
    sock.on('close', () => {
      this.closed = true;
      this.clearIdle();
    });
    sock.on('data', (chunk: Buffer) => {
      if (this.finishing) return; // finishing: input is read and dropped, so the peer's close is seen
      this.clearIdle();
      for (const ev of this.splitter.push(chunk)) this.enqueue(ev);
      this.armIdle();
    });
    sock.on('end', () => {
      if (this.finishing) return;
      for (const ev of this.splitter.end()) this.enqueue(ev);
      this.finish();
    });
    this.armIdle();
  }

  private clearIdle(): void {
    if (this.idle !== null) clearTimeout(this.idle);
    this.idle = null;
  }

  /**
   * A half-sent message gets idleTimeoutMs for its next byte. A connection with
   * nothing in progress is closed after idleCloseMs, so that `echo -n ... | nc`
   * (which keeps its side open after stdin ends) returns.
   */
  private armIdle(): void {
    this.clearIdle();
    if (this.finishing || this.closed) return;
    const limits = this.server.limits;
    if (this.splitter.partial) {
      if (limits.idleTimeoutMs === 0) return;
      this.idle = setTimeout(() => {
        if (this.finishing) return;
        this.send(parseErrorResponse(`the message was not completed within ${limits.idleTimeoutMs} ms; closing`));
        this.finish();
      }, limits.idleTimeoutMs);
    } else if (this.queued === 0 && limits.idleCloseMs > 0) {
      this.idle = setTimeout(() => this.finish(), limits.idleCloseMs);
    }
  }

  private enqueue(ev: SplitEvent): void {
    if (this.finishing) return;
    if (ev.kind === 'too-large') {
      this.send(errorResponse(null, new RpcError(INVALID_REQUEST, `invalid request: message larger than ${ev.limit} bytes; closing`)));
      this.finish();
      return;
    }
    if (ev.kind === 'too-deep') {
      this.send(parseErrorResponse(`nesting deeper than ${this.server.limits.maxDepth} levels`));
      return;
    }
    let msg: unknown;
    try {
      msg = parseValue(ev.bytes);
    } catch (e) {
      this.send(parseErrorResponse(e instanceof Error ? e.message : String(e)));
      return;
    }
    this.queued++;
    if (this.queued >= MAX_QUEUED) this.sock.pause();
    this.chain = this.chain.then(async () => {
      let reply: RpcResponse | RpcResponse[] | null;
      try {
        reply = await dispatch(msg, this.server.env);
      } catch (e) {
        reply = errorResponse(null, new RpcError(INTERNAL_ERROR, `internal error: ${e instanceof Error ? e.message : String(e)}`));
      }
      if (reply !== null) await this.write(reply);
      this.queued--;
      if (this.queued < MAX_QUEUED / 2 && !this.closed) this.sock.resume();
      if (this.queued === 0 && this.idle === null) this.armIdle();
    });
  }

  /** Queue a reply after those already queued. */
  private send(r: RpcResponse): void {
    this.chain = this.chain.then(() => this.write(r));
  }

  private async write(r: RpcResponse | RpcResponse[]): Promise<void> {
    if (this.closed || this.sock.destroyed) return;
    let line: string;
    try {
      line = stringifyReply(r) + '\n';
    } catch (e) {
      line =
        stringifyReply(errorResponse(null, new RpcError(INTERNAL_ERROR, `internal error: ${e instanceof Error ? e.message : String(e)}`))) +
        '\n';
    }
    if (!this.sock.write(line)) {
      await new Promise<void>((resolve) => {
        const done = (): void => {
          this.sock.off('drain', done);
          this.sock.off('close', done);
          resolve();
        };
        this.sock.once('drain', done);
        this.sock.once('close', done);
      });
    }
  }

  /** Stop handling input; when every queued reply is written, end the connection. */
  finish(): void {
    if (this.finishing) return;
    this.finishing = true;
    this.clearIdle();
    this.sock.resume();
    void this.chain.then(() => {
      if (!this.sock.destroyed) this.sock.end();
      // A peer that never closes its side is cut off.
      const t = setTimeout(() => this.sock.destroy(), 2000);
      this.sock.once('close', () => clearTimeout(t));
    });
  }
}

export class RpcServer {
  readonly limits: RpcLimits;
  readonly env: { exports: readonly RpcExport[]; limits: RpcLimits; log: (msg: string) => void };
  private readonly listeners: Server[] = [];
  private readonly conns = new Set<RpcConnection>();
  private closing = false;

  constructor(opts: RpcServerOptions) {
    this.limits = { ...DEFAULT_RPC_LIMITS, ...opts.limits };
    for (const [k, v] of Object.entries(this.limits)) {
      if (!Number.isSafeInteger(v) || v < 0 || (k !== 'idleTimeoutMs' && k !== 'idleCloseMs' && v < 1)) {
        throw new BlockError('invalid-argument', `JSON-RPC limit ${k} must be a whole number >= 1 (got ${v})`);
      }
    }
    if (opts.exports.length === 0) throw new BlockError('invalid-argument', 'the JSON-RPC server needs at least one export');
    this.env = { exports: opts.exports, limits: this.limits, log: opts.log ?? (() => undefined) };
  }

  get connectionCount(): number {
    return this.conns.size;
  }

  async listen(addr: RpcListenAddress): Promise<RpcBoundAddress> {
    if (this.closing) throw new BlockError('invalid-argument', 'the JSON-RPC server is closed');
    const srv = createServer({ allowHalfOpen: true }, (s) => this.accept(s));
    if ('path' in addr) {
      await removeStaleSocket(addr.path);
      await listenOn(srv, () => srv.listen(addr.path), addr.path);
      this.listeners.push(srv);
      return { path: addr.path };
    }
    const host = addr.host ?? '127.0.0.1';
    await listenOn(srv, () => srv.listen(addr.port, host), `${host}:${addr.port}`);
    this.listeners.push(srv);
    return { host, port: (srv.address() as AddressInfo).port };
  }

  private accept(sock: Socket): void {
    sock.on('error', () => undefined);
    if (this.closing) {
      sock.destroy();
      return;
    }
    if (this.conns.size >= this.limits.maxConnections) {
      this.env.log(`too many JSON-RPC clients (${this.conns.size}); refusing one`);
      const r = errorResponse(
        null,
        new RpcError(INTERNAL_ERROR, `server busy: ${this.conns.size} connections already (the limit); try again later`),
      );
      sock.end(stringifyReply(r) + '\n');
      // Read and drop what it sends, so its close is seen; cut it off if it never closes.
      sock.resume();
      const t = setTimeout(() => sock.destroy(), 2000);
      sock.once('close', () => clearTimeout(t));
      return;
    }
    sock.setNoDelay(true);
    const c = new RpcConnection(sock, this);
    this.conns.add(c);
    void c.done.then(() => this.conns.delete(c));
  }

  /** Stop accepting; let each connection write what it has queued, then close it. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const closed = this.listeners.map((l) => new Promise<void>((r) => l.close(() => r())));
    const conns = [...this.conns];
    for (const c of conns) c.finish();
    await Promise.all(conns.map((c) => c.done));
    await Promise.all(closed);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** `[HOST:]PORT` or `[IPv6]:PORT` for --rpc; the host defaults to 127.0.0.1. */
export function parseRpcAddress(text: string): { host: string; port: number } {
  const m = /^(?:(\[[^\]]+\]|[^:]*):)?(\d+)$/.exec(text.trim());
  const port = m === null ? NaN : Number(m[2]);
  if (m === null || !Number.isSafeInteger(port) || port > 65535) {
    throw new BlockError('invalid-argument', `invalid --rpc address '${text}': use [HOST:]PORT, e.g. 127.0.0.1:1234 or 1234`);
  }
  const host = m[1] === undefined || m[1] === '' ? '127.0.0.1' : m[1].replace(/^\[(.*)\]$/, '$1');
  return { host, port };
}

const LIMIT_KEYS: Record<string, keyof RpcLimits> = {
  'max-message': 'maxMessageBytes',
  'max-read': 'maxReadBytes',
  'idle-timeout': 'idleTimeoutMs',
  'idle-close': 'idleCloseMs',
  'max-connections': 'maxConnections',
  'max-depth': 'maxDepth',
};

/** `max-message=64M,max-read=32M,idle-timeout=30000,idle-close=2000,max-connections=128,max-depth=64` (sizes take K/M/G; times in ms). */
export function parseRpcLimits(text: string): Partial<RpcLimits> {
  const out: Partial<RpcLimits> = {};
  for (const item of text.split(',').filter((s) => s.trim() !== '')) {
    const [k, v] = item.split('=', 2).map((s) => s.trim());
    const key = LIMIT_KEYS[k ?? ''];
    if (key === undefined || v === undefined || v === '') {
      throw new BlockError(
        'invalid-argument',
        `invalid --rpc-limits item '${item}': use KEY=VALUE with KEY one of ${Object.keys(LIMIT_KEYS).join(', ')}`,
      );
    }
    out[key] = key === 'maxMessageBytes' || key === 'maxReadBytes' ? parseSize(v, k) : Number(v);
    if (!Number.isSafeInteger(out[key]))
      throw new BlockError('invalid-argument', `invalid --rpc-limits value '${item}': expected a whole number`);
  }
  return out;
}

/** What `rblock serve` asks for: --rpc [HOST:]PORT, --rpc-socket PATH, --rpc-limits LIST. */
export interface ServeRpcOptions {
  rpc?: string;
  rpcSocket?: string;
  rpcLimits?: string;
}

export function rpcWanted(o: ServeRpcOptions): boolean {
  return o.rpc !== undefined || o.rpcSocket !== undefined;
}

/**
 * The hook `rblock serve` calls once its images are open: start JSON-RPC on
 * the same devices (or nothing, without --rpc/--rpc-socket). Resolves to the
 * stop function.
 */
export async function startServeRpc(
  o: ServeRpcOptions,
  exports: readonly (Omit<RpcExport, 'readOnly'> & { readOnly?: boolean })[],
  log: (line: string) => void,
): Promise<() => Promise<void>> {
  if (!rpcWanted(o)) return async () => undefined;
  const server = new RpcServer({
    exports: exports.map((e) => ({ ...e, readOnly: e.readOnly ?? e.device.caps.readOnly })),
    limits: o.rpcLimits !== undefined ? parseRpcLimits(o.rpcLimits) : {},
    log: (m) => log(`rblock serve: JSON-RPC: ${m}\n`),
  });
  try {
    if (o.rpc !== undefined) {
      const a = (await server.listen(parseRpcAddress(o.rpc))) as { host: string; port: number };
      log(`rblock serve: JSON-RPC listening on ${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}\n`);
    }
    if (o.rpcSocket !== undefined) {
      await server.listen({ path: o.rpcSocket });
      log(`rblock serve: JSON-RPC listening on unix:${o.rpcSocket}\n`);
    }
  } catch (e) {
    await server.close();
    throw e;
  }
  return () => server.close();
}
