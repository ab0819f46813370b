/**
 * The NBD server: TCP and Unix socket listeners, the life of each connection
 * (handshake, then transmission), a bound on clients served at once, and a
 * graceful close (stop accepting, let requests in flight reply, flush).
 *
 * The server does not open or close devices: whoever made the exports owns
 * them (the CLI opens images, serves them, and closes them after close()).
 *
 *   const server = new NbdServer({ exports: [{ name: '', device }] });
 *   const addr = await server.listen({ path: '/tmp/nbd.sock' });
 *   // nbdinfo nbd+unix:///?socket=/tmp/nbd.sock
 *   await server.close();
 */
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { BlockError } from '../block/errors.js';
import { ExportTable, type NbdExport } from './exports.js';
import { DEFAULT_HANDSHAKE_LIMITS, HandshakeEnd, handshake, type HandshakeLimits } from './handshake.js';
import { DEFAULT_PORT } from './protocol.js';
import { listenOn, removeStaleSocket } from '../util/listen.js';
import { reopenWithOnread, UNIX_SEND_BUFFER } from './socket-onread.js';
import { BufferPool, StreamClosed, StreamReader, StreamWriter, type BorrowedSource } from './stream.js';
import { upgradeServer, type ServerTls } from './tls.js';
import { DEFAULT_TRANSMISSION_LIMITS, Transmission, type TransmissionLimits } from './transmission.js';

export interface NbdServerOptions {
  exports: readonly NbdExport[];
  /**
   * Clients served at once (qemu-nbd's --shared). Further clients wait,
   * unanswered, until one leaves, like qemu-nbd's listen backlog. Default 16.
   */
  maxConnections?: number;
  /** Clients waiting for a slot before further ones are refused. Default 64. */
  maxWaiting?: number;
  /** A client that has not finished the handshake by then is dropped (ms; 0 = never). Default 10 s, as qemu. */
  handshakeTimeoutMs?: number;
  handshake?: Partial<HandshakeLimits>;
  transmission?: Partial<TransmissionLimits>;
  /** One line per event worth telling an operator (protocol errors, failed requests). */
  log?: (msg: string) => void;
  /** After a client's connection has fully closed: how many clients remain (served and waiting). */
  onClientGone?: (remaining: number) => void;
  /** STARTTLS credentials and policy (see tls.ts loadServerTls); without them STARTTLS gets ERR_POLICY. */
  tls?: ServerTls;
}

export type ListenAddress = { host?: string; port?: number } | { path: string };

/** Where a listener ended up (port 0 picks a free port). */
export type BoundAddress = { host: string; port: number } | { path: string };

/** The NBD URI of an export at a bound address (doc/uri.md). */
export function nbdUri(addr: BoundAddress, exportName = ''): string {
  const name = encodeURIComponent(exportName).replace(/%2F/gi, '/');
  if ('path' in addr) return `nbd+unix:///${name}?socket=${encodeURI(addr.path)}`;
  const host = addr.host.includes(':') ? `[${addr.host}]` : addr.host;
  return `nbd://${host}:${addr.port}/${name}`;
}

/** At shutdown, replies still unsent after this long are abandoned. */
const SHUTDOWN_GRACE_MS = 5000;

class Connection {
  private transmission: Transmission | null = null;
  private stopRequested = false;
  private reader: StreamReader;
  private writer: StreamWriter;

  constructor(
    readonly id: number,
    private sock: Socket,
    private readonly server: NbdServer,
    private readonly opts: Required<Pick<NbdServerOptions, 'handshakeTimeoutMs' | 'log'>> & {
      tls: ServerTls | undefined;
      handshake: HandshakeLimits;
      transmission: TransmissionLimits;
      pool: BufferPool;
    },
    source: BorrowedSource | null = null,
    fd = -1,
  ) {
    this.reader = new StreamReader(sock, undefined, source);
    this.writer = new StreamWriter(sock, fd);
  }

  private log(msg: string): void {
    this.opts.log(`client ${this.id}: ${msg}`);
  }

  /** Server shutdown: a client still haggling is dropped; one in transmission finishes what it sent. */
  stop(): void {
    this.stopRequested = true;
    if (this.transmission === null) {
      this.sock.destroy();
      return;
    }
    this.transmission.stop();
    // A client that stopped reading its replies must not hold the shutdown up for ever.
    setTimeout(() => this.sock.destroy(), SHUTDOWN_GRACE_MS).unref();
  }

  async run(): Promise<void> {
    const timer =
      this.opts.handshakeTimeoutMs > 0
        ? setTimeout(() => {
            this.log(`no export chosen within ${this.opts.handshakeTimeoutMs} ms; dropping the client`);
            this.sock.destroy();
          }, this.opts.handshakeTimeoutMs)
        : null;
    let session;
    const tls = this.opts.tls;
    const hsTls =
      tls === undefined
        ? undefined
        : {
            required: tls.mode === 'required',
            upgrade: async (): Promise<{ reader: StreamReader; writer: StreamWriter }> => {
              if (this.reader.buffered > 0) throw new Error('client sent data before the TLS handshake');
              this.reader.detach();
              const t = await upgradeServer(this.sock, tls);
              t.on('error', () => undefined);
              this.sock = t as unknown as Socket;
              return { reader: new StreamReader(t), writer: new StreamWriter(t) };
            },
          };
    try {
      session = await handshake(
        this.reader,
        this.writer,
        this.server.exports,
        this.opts.handshake,
        () => this.server.closing,
        hsTls,
        (io) => {
          this.reader = io.reader;
          this.writer = io.writer;
        },
      );
    } catch (e) {
      if (e instanceof HandshakeEnd) {
        if (!e.clean) this.log(`${e.message}; dropping the client`);
        await this.writer.end();
      } else if (!(e instanceof StreamClosed)) {
        this.log(`handshake failed: ${e instanceof Error ? e.message : String(e)}`);
      }
      this.sock.destroy();
      return;
    } finally {
      if (timer !== null) clearTimeout(timer);
    }
    const t = new Transmission(this.reader, this.writer, session, this.opts.transmission, (m) => this.log(m), this.opts.pool);
    this.transmission = t;
    if (this.stopRequested) t.stop();
    const end = await t.run();
    if (!session.export.readOnly) {
      // Durable when the client is gone, however it left.
      await session.export.device.flush().catch((e: unknown) => this.log(`flush failed: ${e instanceof Error ? e.message : String(e)}`));
    }
    if (end !== 'protocol-error') await this.writer.end();
    this.sock.destroy();
  }
}

export class NbdServer {
  readonly exports: ExportTable;
  private readonly listeners: Server[] = [];
  private readonly active = new Map<Connection, Promise<void>>();
  private readonly waiting: Socket[] = [];
  private nextId = 1;
  private closingFlag = false;
  private readonly maxConnections: number;
  private readonly maxWaiting: number;
  private readonly connOpts: ConstructorParameters<typeof Connection>[3];

  constructor(private readonly opts: NbdServerOptions) {
    this.maxConnections = opts.maxConnections ?? 16;
    if (!Number.isSafeInteger(this.maxConnections) || this.maxConnections < 1) {
      throw new BlockError('invalid-argument', `maxConnections must be a whole number >= 1 (got ${opts.maxConnections})`);
    }
    this.maxWaiting = opts.maxWaiting ?? 64;
    this.exports = new ExportTable(opts.exports, this.maxConnections);
    this.connOpts = {
      handshakeTimeoutMs: opts.handshakeTimeoutMs ?? 10_000,
      tls: opts.tls,
      log: opts.log ?? (() => undefined),
      handshake: { ...DEFAULT_HANDSHAKE_LIMITS, ...opts.handshake },
      transmission: { ...DEFAULT_TRANSMISSION_LIMITS, ...opts.transmission },
      pool: new BufferPool(32 << 20),
    };
  }

  get closing(): boolean {
    return this.closingFlag;
  }

  /** Clients being served plus clients waiting for a slot. */
  get clientCount(): number {
    return this.active.size + this.waiting.length;
  }

  /** Listen on TCP (default 127.0.0.1:10809) or a Unix socket (a stale socket file is replaced). */
  async listen(addr: ListenAddress = {}): Promise<BoundAddress> {
    if (this.closingFlag) throw new BlockError('invalid-argument', 'the server is closed');
    // Paused: nothing is read from a socket before it is served (and maybe re-opened, see serve()).
    const srv = createServer({ pauseOnConnect: true }, (s) => this.accept(s));
    if ('path' in addr) {
      await removeStaleSocket(addr.path);
      await listenOn(srv, () => srv.listen(addr.path), addr.path);
      this.listeners.push(srv);
      return { path: addr.path };
    }
    const host = addr.host ?? '127.0.0.1';
    await listenOn(srv, () => srv.listen(addr.port ?? DEFAULT_PORT, host), `${host}:${addr.port ?? DEFAULT_PORT}`);
    this.listeners.push(srv);
    const a = srv.address() as AddressInfo;
    return { host, port: a.port };
  }

  private accept(sock: Socket): void {
    sock.on('error', () => undefined);
    if (this.closingFlag) {
      sock.destroy();
      return;
    }
    sock.setNoDelay(true);
    if (this.active.size < this.maxConnections) {
      this.serve(sock);
    } else if (this.waiting.length < this.maxWaiting) {
      this.waiting.push(sock);
      sock.once('close', () => {
        const i = this.waiting.indexOf(sock);
        if (i >= 0) this.waiting.splice(i, 1);
      });
    } else {
      this.connOpts.log(`too many clients (${this.active.size} served, ${this.waiting.length} waiting); refusing one`);
      sock.destroy();
    }
  }

  private serve(accepted: Socket): void {
    // Without TLS, read through one reused buffer (socket-onread.ts); a TLS layer reads for itself.
    // A Unix socket (no remote address family) also gets a bigger send buffer (socket-onread.ts).
    const unix = accepted.remoteFamily === undefined;
    const re = this.connOpts.tls === undefined ? reopenWithOnread(accepted, unix ? UNIX_SEND_BUFFER : 0) : null;
    const sock = re?.sock ?? accepted;
    if (re !== null) sock.on('error', () => undefined);
    const c = new Connection(this.nextId++, sock, this, this.connOpts, re?.source ?? null, re?.fd ?? -1);
    const done = c
      .run()
      .catch((e: unknown) => this.connOpts.log(`client ${c.id}: ${e instanceof Error ? e.message : String(e)}`))
      .finally(() => {
        this.active.delete(c);
        sock.destroy();
        if (!this.closingFlag) {
          const next = this.waiting.shift();
          if (next !== undefined) this.serve(next);
        }
        this.opts.onClientGone?.(this.clientCount);
      });
    this.active.set(c, done);
  }

  /**
   * Stop accepting, drop clients still in the handshake or waiting, let
   * requests in flight reply, flush writable exports. Devices stay open.
   */
  async close(): Promise<void> {
    if (this.closingFlag) return;
    this.closingFlag = true;
    const closed = this.listeners.map((l) => new Promise<void>((r) => l.close(() => r())));
    for (const s of this.waiting.splice(0)) s.destroy();
    for (const c of this.active.keys()) c.stop();
    await Promise.all(this.active.values());
    await Promise.all(closed);
    for (const e of this.exports.list) {
      if (!e.readOnly) await e.device.flush();
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
