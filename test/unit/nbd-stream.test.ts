/**
 * StreamReader over sockets that read into one reused buffer (`onread`,
 * src/nbd/socket-onread.ts): the bytes a reader hands out, through read()
 * and readInto() of random sizes, must be exactly the bytes sent in random
 * pieces, both for a connect()ed socket and for an accepted socket re-opened
 * from a duplicate descriptor; and the owned ('data' events) path must give
 * the same.
 *
 * StreamWriter's coalescing sends, written straight to the descriptor by the
 * native helper or through node's stream: bursts larger than the socket's
 * send buffer against a slow reader arrive whole and in order, and every
 * callback runs, in order.
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { connect, createServer, type Socket } from 'node:net';
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { hostIo, type FileSpan } from '../../src/block/hostio.js';
import { onreadOptions, reopenWithOnread } from '../../src/nbd/socket-onread.js';
import { StreamClosed, StreamReader, StreamWriter, type BorrowedSource } from '../../src/nbd/stream.js';
import { pseudoRandom } from '../helpers/rng.js';
import { needNative, scratchDir } from '../helpers/tools.js';

const TOTAL = 8 << 20;
const MiB = 1 << 20;

/** A deterministic sequence of sizes in [1, max]. */
function sizes(seed: number, max: number): () => number {
  let x = seed >>> 0;
  return () => {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    // Mostly small (headers), sometimes large (payloads).
    return x % 4 === 0 ? 1 + (x % max) : 1 + (x % 64);
  };
}

/** Send `data` in random pieces (some write calls with several pieces), then end. */
async function sendPieces(sock: Socket, data: Buffer, seed: number): Promise<void> {
  const next = sizes(seed, 300_000);
  let pos = 0;
  while (pos < data.length) {
    const k = Math.min(next(), data.length - pos);
    if (!sock.write(data.subarray(pos, pos + k))) await new Promise((r) => sock.once('drain', r));
    pos += k;
  }
  sock.end();
}

/** Read everything through random read()/readInto() calls; the sha256 of what came out. */
async function drain(reader: StreamReader, total: number, seed: number): Promise<string> {
  const h = createHash('sha256');
  const next = sizes(seed, 600_000);
  let got = 0;
  let i = 0;
  while (got < total) {
    const k = Math.min(next(), total - got);
    if (i++ % 2 === 0) h.update(await reader.read(k));
    else {
      const dest = new Uint8Array(k);
      await reader.readInto(dest);
      h.update(dest);
    }
    got += k;
  }
  await assert.rejects(reader.read(1), StreamClosed);
  return h.digest('hex');
}

async function pair(path: string, mode: 'owned' | 'onread-connect' | 'onread-accepted'): Promise<{ reader: StreamReader; sender: Socket }> {
  const accepted = new Promise<Socket>((resolve) => {
    const srv = createServer({ pauseOnConnect: mode === 'onread-accepted' }, (s) => {
      srv.close();
      resolve(s);
    });
    srv.listen(path);
  });
  await new Promise((r) => setTimeout(r, 10));
  if (mode === 'onread-accepted') {
    const client = connect(path);
    const re = reopenWithOnread(await accepted);
    assert.ok(re !== null, 'an accepted socket re-opens with onread when the native helper is there');
    return { reader: new StreamReader(re.sock, 1 << 20, re.source), sender: client };
  }
  const source: BorrowedSource | null = mode === 'owned' ? null : { sink: null, early: [] };
  const client = connect(source !== null ? { path, onread: onreadOptions(source) } : { path });
  await new Promise((r) => client.once('connect', r));
  return { reader: new StreamReader(client, 1 << 20, source), sender: await accepted };
}

for (const mode of ['owned', 'onread-connect', 'onread-accepted'] as const) {
  test(`StreamReader (${mode}): random pieces in, random reads out, same bytes`, { timeout: 30000 }, async (t) => {
    if (mode === 'onread-accepted' && !needNative(t, 'accepted sockets are re-opened with its dupFd')) return;
    using s = scratchDir('rblock-stream-');
    const data = pseudoRandom(TOTAL, 7);
    const want = createHash('sha256').update(data).digest('hex');
    for (const seed of [1, 2]) {
      const { reader, sender } = await pair(join(s.dir, `s${seed}.sock`), mode);
      const [got] = await Promise.all([drain(reader, TOTAL, seed * 31), sendPieces(sender, data, seed)]);
      assert.equal(got, want);
      sender.destroy();
    }
  });
}

test('setSendBuffer: SO_SNDBUF on a Unix socket, as the kernel caps it', async (t) => {
  if (!needNative(t, 'served Unix sockets get their send buffer from it')) return;
  using s = scratchDir('rblock-stream-');
  const { reader, sender } = await pair(join(s.dir, 'b.sock'), 'onread-connect');
  const fd = (sender as unknown as { _handle: { fd: number } })._handle.fd;
  const wmemMax = Number(readFileSync('/proc/sys/net/core/wmem_max', 'utf8'));
  const want = 256 << 10;
  // Linux doubles the value for its bookkeeping and caps the request at wmem_max.
  assert.equal(hostIo!.setSendBuffer(fd, want), 2 * Math.min(want, wmemMax));
  assert.ok(hostIo!.setSendBuffer(-1, want) < -1, 'a bad descriptor is an error number, not a throw');
  sender.destroy();
  await assert.rejects(reader.read(1), StreamClosed);
});

for (const mode of ['native sendmsg', 'native splice', "node's stream"] as const) {
  test(`StreamWriter (${mode}): bursts beyond the send buffer arrive whole, in order`, { timeout: 30000 }, async (t) => {
    const direct = mode !== "node's stream";
    if (direct && !needNative(t, 'it writes replies straight to the socket')) return;
    using s = scratchDir('rblock-stream-');
    const path = join(s.dir, 'w.sock');
    const accepted = new Promise<Socket>((resolve) => {
      const srv = createServer({ pauseOnConnect: true }, (x) => {
        srv.close();
        resolve(x);
      });
      srv.listen(path);
    });
    await new Promise((r) => setTimeout(r, 10));
    const client = connect(path);
    let sock: Socket = await accepted;
    let fd = -1;
    if (direct) {
      const re = reopenWithOnread(sock);
      assert.ok(re !== null);
      sock = re.sock;
      fd = re.fd;
      // A small send buffer, so most bursts are only partly taken by sendmsg.
      assert.ok(hostIo!.setSendBuffer(fd, 32 << 10) > 0);
    } else sock.resume();
    const writer = new StreamWriter(sock, fd);
    writer.coalesce = true;
    // Splice: every other piece goes as a span of a file holding the same bytes.
    let file = -1;
    if (mode === 'native splice') {
      assert.ok(writer.canSplice, 'a re-opened socket with the helper can splice');
      file = openSync(join(s.dir, 'data'), 'w+');
      writeSync(file, pseudoRandom(TOTAL, 11));
    }

    // The peer reads slowly: pauses now and then while the server keeps sending.
    const h = createHash('sha256');
    let got = 0;
    client.on('data', (b: Buffer) => {
      h.update(b);
      got += b.length;
      if (got % 7 === 0) {
        client.pause();
        setTimeout(() => client.resume(), 2);
      }
    });
    const data = pseudoRandom(TOTAL, 11);
    const want = createHash('sha256').update(data).digest('hex');
    // Spans larger than the 1 MiB pipe are spliced in several rounds.
    const next = sizes(5, mode === 'native splice' ? 3_000_000 : 200_000);
    const order: number[] = [];
    let pos = 0;
    let msg = 0;
    let pending: Promise<void>[] = [];
    // Bytes already in node's stream (as a handshake reply would be): what follows queues behind them,
    // starting with a span larger than the piece of it node's stream gets meanwhile.
    sock.write(data.subarray(0, MiB));
    pos = MiB;
    if (file >= 0) {
      const id = msg++;
      pending.push(new Promise<void>((r) => writer.sendThen([{ fd: file, offset: pos, length: MiB }], () => (order.push(id), r()))));
      pos += MiB;
    }
    while (pos < data.length) {
      // A burst of messages in one turn (one coalesced flush), each of 1-3 buffers.
      for (let k = 0; k < 16 && pos < data.length; k++) {
        const parts: Array<Buffer | FileSpan> = [];
        for (let j = 0; j < 1 + (msg % 3) && pos < data.length; j++) {
          const n = Math.min(next(), data.length - pos);
          if (file >= 0 && (msg + j) % 2 === 0) parts.push({ fd: file, offset: pos, length: n });
          else parts.push(Buffer.from(data.subarray(pos, pos + n)));
          pos += n;
        }
        const id = msg++;
        // Once called back, a message's buffers are the caller's again (the server reuses them):
        // scribbling on them must not change what the peer gets.
        const scribble = (): void => parts.forEach((p) => p instanceof Buffer && p.fill(0xa5));
        pending.push(new Promise<void>((r) => writer.sendThen(parts, () => (order.push(id), scribble(), r()))));
      }
      if (pending.length >= 64) {
        await Promise.all(pending);
        pending = [];
      }
    }
    await Promise.all(pending);
    assert.deepEqual(order, [...Array(msg).keys()], 'callbacks run once each, in order');
    const ended = new Promise((r) => client.once('end', r));
    await writer.end();
    await ended;
    assert.equal(got, TOTAL);
    assert.equal(h.digest('hex'), want);

    // The connection is gone: a send calls back at once and writes nothing.
    let called = false;
    writer.sendThen([Buffer.from('late')], () => (called = true));
    assert.ok(called);
    client.destroy();
    if (file >= 0) closeSync(file);
  });
}
