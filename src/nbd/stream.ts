/**
 * The two halves of a connection's byte stream.
 *
 * StreamReader pulls exact byte counts out of a socket and applies
 * back-pressure: once `highWater` bytes sit unread (and no pending read needs
 * more), the socket is paused, so a client that sends faster than the server
 * works stops at TCP level instead of growing our memory.
 *
 * StreamWriter writes whole messages: every buffer of one send() goes out
 * contiguously (one corked writev), so replies of requests completing in any
 * order never interleave inside a chunk; a send resolves once its bytes are
 * with the kernel.
 */
import type { Duplex } from 'node:stream';
import { BlockError } from '../block/errors.js';
import { allocAligned } from '../block/file.js';

export class StreamClosed extends BlockError {
  constructor(message: string) {
    super('protocol', message, { op: 'nbd' });
    this.name = 'StreamClosed';
  }
}

export class StreamReader {
  private chunks: Buffer[] = [];
  private head = 0;
  private avail = 0;
  private want = 0;
  private wake: (() => void) | null = null;
  private end: Error | null = null;

  constructor(
    private readonly sock: Duplex,
    private readonly highWater = 1 << 20,
  ) {
    sock.on('data', this.onData);
    sock.on('end', this.onEnd);
    sock.on('close', this.onClose);
    sock.on('error', this.onError);
  }

  private readonly onData = (b: Buffer): void => {
    this.chunks.push(b);
    this.avail += b.length;
    if (this.avail >= this.highWater && this.avail >= this.want) this.sock.pause();
    this.notify();
  };
  private readonly onEnd = (): void => this.finish(new StreamClosed('the peer closed the connection'));
  private readonly onClose = (): void => this.finish(new StreamClosed('the connection is closed'));
  private readonly onError = (e: Error): void => this.finish(new StreamClosed(`connection error: ${e.message}`));

  /**
   * Stop listening to the socket (before STARTTLS hands it to a TLS layer);
   * the socket is left paused, and this reader fails any further read.
   */
  detach(): void {
    this.sock.off('data', this.onData);
    this.sock.off('end', this.onEnd);
    this.sock.off('close', this.onClose);
    this.sock.off('error', this.onError);
    this.sock.pause();
    this.abort(new StreamClosed('the stream moved to TLS'));
  }

  /** Bytes received and not yet read. */
  get buffered(): number {
    return this.avail;
  }

  /** Make pending and future reads fail with this error (e.g. on shutdown). */
  abort(e: Error): void {
    this.end = e;
    this.chunks = [];
    this.avail = 0;
    this.head = 0;
    this.notify();
  }

  private finish(e: Error): void {
    if (this.end === null) this.end = e;
    this.notify();
  }

  private notify(): void {
    const w = this.wake;
    if (w !== null) {
      this.wake = null;
      w();
    }
  }

  /** Exactly n bytes, or throw StreamClosed when the stream ends first. */
  async read(n: number): Promise<Buffer> {
    while (this.avail < n) {
      if (this.end !== null) throw this.end;
      this.want = n;
      if (this.sock.isPaused()) this.sock.resume();
      await new Promise<void>((r) => (this.wake = r));
    }
    this.want = 0;
    const out = this.take(n);
    if (this.avail < this.highWater && this.sock.isPaused() && this.end === null) this.sock.resume();
    return out;
  }

  /**
   * Fill dest exactly, copying bytes straight out of the socket's chunks as
   * they arrive (no intermediate buffer: the client's read path).
   */
  async readInto(dest: Uint8Array): Promise<void> {
    let done = 0;
    while (done < dest.length) {
      if (this.avail === 0) {
        if (this.end !== null) throw this.end;
        this.want = 1;
        if (this.sock.isPaused()) this.sock.resume();
        await new Promise<void>((r) => (this.wake = r));
        continue;
      }
      const c = this.chunks[0] as Buffer;
      const k = Math.min(c.length - this.head, dest.length - done);
      dest.set(c.subarray(this.head, this.head + k), done);
      done += k;
      this.head += k;
      this.avail -= k;
      if (this.head === c.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
    this.want = 0;
    if (this.avail < this.highWater && this.sock.isPaused() && this.end === null) this.sock.resume();
  }

  /** Read and drop n bytes (an unwanted option or payload), without holding them all. */
  async skip(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      const k = Math.min(left, this.highWater);
      await this.read(k);
      left -= k;
    }
  }

  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0] as Buffer;
    if (first.length - this.head >= n) {
      const out = first.subarray(this.head, this.head + n);
      this.head += n;
      this.avail -= n;
      if (this.head === first.length) {
        this.chunks.shift();
        this.head = 0;
      }
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let done = 0;
    while (done < n) {
      const c = this.chunks[0] as Buffer;
      const k = Math.min(c.length - this.head, n - done);
      c.copy(out, done, this.head, this.head + k);
      done += k;
      this.head += k;
      if (this.head === c.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
    this.avail -= n;
    return out;
  }
}

export class StreamWriter {
  private failed = false;
  private readonly closed: Promise<void>;
  private holding = false;
  /**
   * Hold messages until the event loop has run the current batch of
   * completions (setImmediate), then hand them to the kernel in one writev:
   * under load a server answers many requests per turn, and one syscall per
   * small reply (a 16-byte write ack, a 4 KiB read) costs more than the
   * reply. Off by default (the handshake and the client send one message
   * and wait for the answer).
   */
  coalesce = false;

  constructor(private readonly sock: Duplex) {
    sock.on('error', () => (this.failed = true));
    this.closed = new Promise((resolve) =>
      sock.once('close', () => {
        this.failed = true;
        resolve();
      }),
    );
  }

  /** False once the socket is gone: replies are then dropped silently. */
  get alive(): boolean {
    return !this.failed && !this.sock.destroyed && this.sock.writable;
  }

  /**
   * Write one message (all buffers contiguously, one corked writev). Resolves
   * once the socket has handed all of it to the kernel (or is gone): the
   * caller may then reuse the buffers, and a slow reader holds up its own
   * senders instead of growing our memory.
   */
  async send(bufs: readonly Uint8Array[]): Promise<void> {
    if (!this.alive) return;
    const parts = bufs.filter((b) => b.length > 0);
    if (parts.length === 0) return;
    if (this.coalesce && !this.holding) {
      this.holding = true;
      this.sock.cork();
      setImmediate(this.release);
    }
    const written = new Promise<void>((resolve) => {
      this.sock.cork();
      parts.forEach((b, i) => (i === parts.length - 1 ? this.sock.write(b, () => resolve()) : this.sock.write(b)));
      this.sock.uncork();
    });
    await Promise.race([written, this.closed]);
  }

  private readonly release = (): void => {
    this.holding = false;
    this.sock.uncork();
  };

  /** Send what is queued, then close our side. */
  async end(): Promise<void> {
    if (!this.alive) return;
    await new Promise<void>((resolve) => {
      this.sock.end(() => resolve());
      this.sock.once('close', () => resolve());
    });
  }
}

/**
 * Read buffers for replies, reused once a reply has been sent: page-aligned
 * (the kernel copies from the page cache several times faster into them),
 * in power-of-two size classes from 64 KiB, at most `maxPooled` bytes kept.
 */
export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooled = 0;

  constructor(private readonly maxPooled = 64 << 20) {}

  private static sizeClass(length: number): number {
    let c = 64 << 10;
    while (c < length) c *= 2;
    return c;
  }

  /** A buffer of at least `length` bytes (contents undefined); give it back with put(). */
  get(length: number): Buffer {
    const c = BufferPool.sizeClass(length);
    const b = this.free.get(c)?.pop();
    if (b !== undefined) {
      this.pooled -= c;
      return b;
    }
    return allocAligned(c);
  }

  put(b: Buffer): void {
    const c = b.length;
    if (c !== BufferPool.sizeClass(c) || this.pooled + c > this.maxPooled) return;
    let list = this.free.get(c);
    if (list === undefined) this.free.set(c, (list = []));
    list.push(b);
    this.pooled += c;
  }
}
