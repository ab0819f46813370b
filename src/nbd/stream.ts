/**
 * The two halves of a connection's byte stream.
 *
 * StreamReader pulls exact byte counts out of a socket and applies
 * back-pressure: once `highWater` bytes sit unread (and no pending read needs
 * more), the socket is paused, so a client that sends faster than the server
 * works stops at TCP level instead of growing our memory.
 *
 * StreamWriter writes whole messages: every buffer of one send() goes out
 * contiguously, so replies of requests completing in any order never
 * interleave inside a chunk; a send resolves once its bytes are with the
 * kernel. In the server's coalescing mode a message may also hold spans of a
 * host file, spliced to the socket from the page cache (FileSpan), and a
 * turn's messages go out in one call of the native helper.
 */
import type { Duplex } from 'node:stream';
import { BlockError } from '../block/errors.js';
import { allocAligned } from '../block/file.js';
import { closeSync, readSync } from 'node:fs';
import { hostIo, type FileSpan } from '../block/hostio.js';

export class StreamClosed extends BlockError {
  constructor(message: string) {
    super('protocol', message, { op: 'nbd' });
    this.name = 'StreamClosed';
  }
}

/**
 * Where a socket opened with node's `onread` option (see socket-onread.ts)
 * delivers its bytes: a callback that receives node's one reused buffer and
 * must copy what it keeps before returning. The reader installs `sink`.
 */
export interface BorrowedSource {
  sink: ((n: number, buf: Buffer) => void) | null;
  /** Bytes that arrived before a reader installed `sink` (copies). */
  early: Buffer[];
}

export class StreamReader {
  /** Owned mode ('data' events): the socket's own chunks, taken without copying. */
  private chunks: Buffer[] = [];
  private head = 0;
  /**
   * Borrowed mode (`onread`): received bytes not yet read, copied out of
   * node's buffer into this one reused store at [sHead, sTail).
   */
  private spill: Buffer | null = null;
  private sHead = 0;
  private sTail = 0;
  /** A readInto waiting for bytes: in borrowed mode they are copied straight into it. */
  private dest: Uint8Array | null = null;
  private destDone = 0;
  private avail = 0;
  private want = 0;
  private wake: (() => void) | null = null;
  private end: Error | null = null;

  constructor(
    private readonly sock: Duplex,
    private readonly highWater = 1 << 20,
    private readonly source: BorrowedSource | null = null,
  ) {
    if (source !== null) {
      this.spill = Buffer.allocUnsafe(128 << 10);
      for (const b of source.early.splice(0)) this.append(b);
      source.sink = this.onBorrowed;
    } else sock.on('data', this.onData);
    sock.on('end', this.onEnd);
    sock.on('close', this.onClose);
    sock.on('error', this.onError);
  }

  private readonly onData = (b: Buffer): void => {
    this.chunks.push(b);
    this.avail += b.length;
    this.afterInput();
  };

  private readonly onBorrowed = (n: number, buf: Buffer): void => {
    let off = 0;
    const d = this.dest;
    // Straight into a waiting readInto, only when nothing older is queued (order).
    if (d !== null && this.avail === 0) {
      off = Math.min(n, d.length - this.destDone);
      d.set(buf.subarray(0, off), this.destDone);
      this.destDone += off;
    }
    if (off < n) this.append(buf.subarray(off, n));
    this.afterInput();
  };

  private afterInput(): void {
    if (this.avail >= this.highWater && this.avail >= this.want) this.sock.pause();
    this.notify();
  }

  /** Keep a copy of borrowed bytes; the store is compacted, or grown, when its end is reached. */
  private append(b: Buffer): void {
    let spill = this.spill as Buffer;
    if (this.sTail + b.length > spill.length) {
      const live = this.sTail - this.sHead;
      if (live + b.length > spill.length) {
        const bigger = Buffer.allocUnsafe(Math.max(spill.length * 2, live + b.length));
        spill.copy(bigger, 0, this.sHead, this.sTail);
        this.spill = spill = bigger;
      } else spill.copyWithin(0, this.sHead, this.sTail);
      this.sHead = 0;
      this.sTail = live;
    }
    b.copy(spill, this.sTail);
    this.sTail += b.length;
    this.avail += b.length;
  }

  private readonly onEnd = (): void => this.finish(new StreamClosed('the peer closed the connection'));
  private readonly onClose = (): void => this.finish(new StreamClosed('the connection is closed'));
  private readonly onError = (e: Error): void => this.finish(new StreamClosed(`connection error: ${e.message}`));

  /**
   * Stop listening to the socket (before STARTTLS hands it to a TLS layer);
   * the socket is left paused, and this reader fails any further read.
   */
  detach(): void {
    if (this.source !== null) this.source.sink = null;
    else this.sock.off('data', this.onData);
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
    this.head = 0;
    this.sHead = this.sTail = 0;
    this.avail = 0;
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

  private async waitInput(want: number): Promise<void> {
    if (this.end !== null) throw this.end;
    this.want = want;
    if (this.sock.isPaused()) this.sock.resume();
    await new Promise<void>((r) => (this.wake = r));
  }

  private resumeIfLow(): void {
    this.want = 0;
    if (this.avail < this.highWater && this.sock.isPaused() && this.end === null) this.sock.resume();
  }

  /** Exactly n bytes, or throw StreamClosed when the stream ends first. */
  async read(n: number): Promise<Buffer> {
    while (this.avail < n) await this.waitInput(n);
    let out: Buffer;
    const first = this.chunks[0];
    if (n === 0) out = Buffer.alloc(0);
    else if (first !== undefined && first.length - this.head >= n) {
      // Owned chunks: a view, no copy.
      out = first.subarray(this.head, this.head + n);
      this.consume(n);
    } else {
      out = Buffer.allocUnsafe(n);
      this.copyOut(out, 0);
    }
    this.resumeIfLow();
    return out;
  }

  /**
   * Fill dest exactly, copying bytes straight out of the socket's buffers as
   * they arrive (no intermediate buffer: write payloads, the client's reads).
   */
  async readInto(dest: Uint8Array): Promise<void> {
    let done = this.copyOut(dest, 0);
    while (done < dest.length) {
      this.dest = dest;
      this.destDone = done;
      try {
        await this.waitInput(1);
      } finally {
        this.dest = null;
      }
      done = this.copyOut(dest, this.destDone);
    }
    this.resumeIfLow();
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

  /** Copy queued bytes into dest from `done` on, as many as fit; returns the new fill. */
  private copyOut(dest: Uint8Array, done: number): number {
    while (done < dest.length && this.avail > 0) {
      let k: number;
      if (this.spill !== null) {
        k = Math.min(this.sTail - this.sHead, dest.length - done);
        dest.set(this.spill.subarray(this.sHead, this.sHead + k), done);
      } else {
        const c = this.chunks[0] as Buffer;
        k = Math.min(c.length - this.head, dest.length - done);
        dest.set(c.subarray(this.head, this.head + k), done);
      }
      this.consume(k);
      done += k;
    }
    return done;
  }

  private consume(k: number): void {
    this.avail -= k;
    if (this.spill !== null) {
      this.sHead += k;
      if (this.sHead === this.sTail) this.sHead = this.sTail = 0;
      return;
    }
    this.head += k;
    if (this.head === (this.chunks[0] as Buffer).length) {
      this.chunks.shift();
      this.head = 0;
    }
  }
}

/** What the coalescing writer sends: bytes, or a range of a host file (spliced). */
type Item = Uint8Array | FileSpan;

export class StreamWriter {
  private failed = false;
  private readonly closed: Promise<void>;
  /**
   * Coalescing (see `coalesce`): what is still to send, in order; the
   * callbacks of the messages in it, and for each the queue index just past
   * its last item.
   */
  private queue: Item[] = [];
  private waiters: Array<() => void> = [];
  private ends: number[] = [];
  private scheduled = false;
  /** A piece of the queue is with node's stream: the rest waits until it has gone out. */
  private blocked = false;
  /** The pipe file spans are spliced through: [read end, write end], opened on first use; null: none. */
  private pipe: [number, number] | null = null;
  /** Write callbacks of node's stream not called yet: all called at close. */
  private readonly viaNode = new Set<() => void>();
  /**
   * Hold messages until the event loop has run the current batch of
   * completions (setImmediate), then hand them to the kernel in one writev:
   * under load a server answers many requests per turn, and one syscall per
   * small reply (a 16-byte write ack, a 4 KiB read) costs more than the
   * reply. Off by default (the handshake and the client send one message
   * and wait for the answer).
   */
  coalesce = false;

  /**
   * `fd`: the socket's own descriptor, when the native helper may write to
   * it directly (a plain socket re-opened by socket-onread.ts), else -1.
   */
  constructor(
    private readonly sock: Duplex,
    private readonly fd = -1,
  ) {
    sock.on('error', () => (this.failed = true));
    this.closed = new Promise((resolve) =>
      sock.once('close', () => {
        this.failed = true;
        for (const fire of [...this.viaNode]) fire();
        this.closePipe();
        this.completeAll();
        resolve();
      }),
    );
  }

  /**
   * Whether sendThen takes file spans, sent by splice(2) without copying
   * their bytes (a plain socket with its descriptor, the native helper, and
   * a pipe). Opens the pipe on first use.
   */
  get canSplice(): boolean {
    if (this.pipe !== null) return true;
    if (this.fd < 0 || hostIo === null || !this.alive) return false;
    const p = hostIo.pipeOpen(PIPE_BYTES);
    if (typeof p === 'number') return false;
    this.pipe = [p[0], p[1]];
    return true;
  }

  private closePipe(): void {
    const p = this.pipe;
    this.pipe = null;
    if (p !== null) for (const fd of p) closeSync(fd);
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
    if (this.coalesce) return new Promise<void>((resolve) => this.sendThen(bufs, resolve));
    if (!this.alive) return;
    const parts = bufs.filter((b) => b.length > 0);
    if (parts.length === 0) return;
    const written = new Promise<void>((resolve) => {
      this.sock.cork();
      parts.forEach((b, i) => (i === parts.length - 1 ? this.sock.write(b, () => resolve()) : this.sock.write(b)));
      this.sock.uncork();
    });
    await Promise.race([written, this.closed]);
  }

  /**
   * send() for the coalescing mode without a promise: `done` runs once the
   * message is with the kernel or the connection is gone (at once when it
   * already is). The request loop of a busy server calls this thousands of
   * times a second; a promise and its reactions per reply were measurable.
   * File spans only from callers that asked canSplice.
   */
  sendThen(items: readonly Item[], done: () => void): void {
    if (!this.alive) {
      done();
      return;
    }
    for (const b of items) {
      if (b.length === 0) continue;
      this.queue.push(b);
    }
    this.waiters.push(done);
    this.ends.push(this.queue.length);
    this.schedule();
  }

  private schedule(): void {
    if (this.scheduled || this.blocked) return;
    this.scheduled = true;
    setImmediate(this.flush);
  }

  /**
   * The queue to the kernel. Straight through the native helper (sendmsg of
   * bytes, splice of file spans) when node's stream holds nothing of ours,
   * so order is kept: node's Writable costs several JavaScript calls, a
   * callback record and a write request per buffer, which for an NBD server
   * answering with 4 KiB or 256 KiB reads was a tenth of its CPU. When the
   * socket's buffer is full, a small head of what is left goes through
   * node's stream, which waits for the socket to drain; its callback resumes
   * the native path (spans stay uncopied). Without the helper or the
   * descriptor (TLS), everything goes through node's stream.
   */
  private readonly flush = (): void => {
    this.scheduled = false;
    if (this.blocked) return;
    if (!this.alive) {
      this.completeAll();
      return;
    }
    const native = this.fd >= 0 && hostIo !== null;
    if (native && this.queue.length > 0 && this.sock.writableLength > 0) {
      // Node's stream still holds bytes of ours (a handshake reply): a head behind them, then resume.
      this.viaNodeWrite(true);
    } else if (native && this.queue.length > 0) {
      // The pipe only matters for spans, which only callers that asked canSplice queue.
      const [pr, pw] = this.pipe ?? [-1, -1];
      const [k, into, rest, err] = (hostIo as NonNullable<typeof hostIo>).sendItems(this.fd, pr, pw, this.queue);
      if (err !== 0) {
        // The connection failed (or a spliced file could not be read, or the pipe could not be
        // emptied): nothing more can go out in order on it.
        this.sock.destroy(new Error(`sending replies failed (errno ${-2 - err})`));
        this.completeAll();
        return;
      }
      this.consume(k, into, rest);
      // The socket is full: a head of the rest through node's stream, which waits for it to drain.
      if (this.queue.length > 0) this.viaNodeWrite(true);
    } else if (this.queue.length > 0) this.viaNodeWrite(false);
    // Messages with nothing left to send (including empty ones) are done.
    for (const w of this.takeEnded(0)) w();
  };

  /** Items [0, k) were sent, and `into` bytes of item k; `rest`: bytes of item k read but not sent, to go first. */
  private consume(k: number, into: number, rest: Buffer | null): void {
    for (const w of this.takeEnded(k)) w();
    const q = this.queue.slice(k);
    const first = q[0];
    let shift = 0;
    if (first !== undefined && into > 0) {
      q[0] =
        first instanceof Uint8Array ? first.subarray(into) : { fd: first.fd, offset: first.offset + into, length: first.length - into };
      if (into === first.length) {
        q.shift();
        shift--;
      }
    }
    if (rest !== null) {
      q.unshift(rest);
      shift++;
    }
    this.queue = q;
    for (let i = 0; i < this.ends.length; i++) this.ends[i] = Math.max(0, (this.ends[i] as number) + shift);
  }

  /**
   * The first `n` items leave the queue: returns the callbacks of the
   * messages that end among them (in order), and renumbers the others.
   */
  private takeEnded(n: number): Array<() => void> {
    let m = 0;
    while (m < this.ends.length && (this.ends[m] as number) <= n) m++;
    this.ends.splice(0, m);
    for (let i = 0; i < this.ends.length; i++) this.ends[i] = Math.max(0, (this.ends[i] as number) - n);
    return this.waiters.splice(0, m);
  }

  private completeAll(): void {
    this.queue = [];
    this.ends = [];
    for (const w of this.waiters.splice(0)) w();
  }

  /**
   * Hand the queue to node's stream: all of it, or (`head`, the native path
   * being blocked by a full socket) only its first item, at most HEAD_BYTES
   * of a span, after which flush resumes.
   */
  private viaNodeWrite(head: boolean): void {
    let take: Item[];
    // Items wholly taken leave the queue; the messages they end are done when node has written them.
    let whole: number;
    if (!head) {
      take = this.queue;
      this.queue = [];
      whole = take.length;
    } else {
      const first = this.queue[0] as Item;
      if (!(first instanceof Uint8Array) && first.length > HEAD_BYTES) {
        take = [{ fd: first.fd, offset: first.offset, length: HEAD_BYTES }];
        this.queue[0] = { fd: first.fd, offset: first.offset + HEAD_BYTES, length: first.length - HEAD_BYTES };
        whole = 0;
      } else {
        take = [this.queue.shift() as Item];
        whole = 1;
      }
    }
    const done = this.takeEnded(whole);
    let bytes: Uint8Array[];
    try {
      bytes = take.map(bytesOf);
    } catch (e) {
      // A spliced file span that cannot be read now (the file is gone): the reply's header may be
      // out already, so the stream cannot go on; the client sees the connection drop.
      this.sock.destroy(e instanceof Error ? e : new Error(String(e)));
      for (const w of done) w();
      return;
    }
    let fired = false;
    const fire = (): void => {
      if (fired) return;
      fired = true;
      this.viaNode.delete(fire);
      if (head) this.blocked = false;
      for (const w of done) w();
      if (this.queue.length > 0 || this.waiters.length > 0) this.schedule();
    };
    if (head) this.blocked = true;
    this.viaNode.add(fire);
    this.sock.cork();
    bytes.forEach((b, i) => this.sock.write(b, i === bytes.length - 1 ? fire : undefined));
    this.sock.uncork();
  }

  /** Send what is queued, then close our side. */
  async end(): Promise<void> {
    if (!this.alive) return;
    await new Promise<void>((resolve) => {
      this.sock.end(() => resolve());
      this.sock.once('close', () => resolve());
    });
  }
}

/** How much of a span node's stream gets while the socket is full (copied; the rest stays a span). */
const HEAD_BYTES = 64 << 10;

/** The pipe for splicing file spans: 1 MiB, the kernel's default limit (/proc/sys/fs/pipe-max-size). */
const PIPE_BYTES = 1 << 20;

/**
 * A file span's bytes, for node's stream: only when the socket did not take
 * a whole flush (rare; the span was in the page cache a moment ago).
 */
function bytesOf(p: Uint8Array | FileSpan): Uint8Array {
  if (p instanceof Uint8Array) return p;
  const buf = Buffer.allocUnsafe(p.length);
  let done = 0;
  while (done < p.length) {
    const n = readSync(p.fd, buf, done, p.length - done, p.offset + done);
    if (n <= 0) break;
    done += n;
  }
  // Past a file that shrank meanwhile: zeros, as a read of a sparse end would give.
  buf.fill(0, done);
  return buf;
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
