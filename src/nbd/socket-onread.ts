/**
 * Sockets that read into one reused buffer (node's `onread` option) instead
 * of a fresh 64 KiB buffer for every read.
 *
 * Why: receiving 1 GiB over a Unix socket cost 570-600 ms of CPU with 'data'
 * events and 280 ms with `onread` (measured here, Node 20), and the fresh
 * buffers, counted as external memory, started a major GC about every 64
 * MiB: under `nbdcopy` writes into a served qcow2 that was a fifth of the
 * server's CPU. Node offers `onread` for sockets it creates from an fd or by
 * connect(), not for the ones a server accepts, so an accepted socket is
 * re-opened from a duplicate of its descriptor (dup(2) from the native
 * helper, native/hostio.c) and the original closed. Without the helper, or
 * when the descriptor is not reachable, the accepted socket is used as it is.
 *
 * Unix sockets also get a larger send buffer (UNIX_SEND_BUFFER): a Unix
 * stream socket holds only SO_SNDBUF bytes (212992 by default) that the peer
 * has not read yet, less than one 256 KiB nbdcopy reply, so every reply was
 * a ping-pong of wake-ups between server and client. With 4 MiB, nbdcopy of
 * the 2 GiB qcow2 over a Unix socket took 0.90 s instead of 1.23 s (qemu-nbd
 * 0.86 s; raw 0.84 s against 1.11 s, qemu-nbd 0.88 s). The kernel caps the
 * value at net.core.wmem_max (212992 on a default kernel, where this changes
 * nothing). TCP keeps the kernel's autotuning, which setting it would turn off.
 */
import { closeSync } from 'node:fs';
import { Socket, type OnReadOpts, type SocketConstructorOpts } from 'node:net';
import { hostIo } from '../block/hostio.js';
import type { BorrowedSource } from './stream.js';

/** SO_SNDBUF for served Unix sockets: as many bytes as a connection may have in flight (transmission.ts). */
export const UNIX_SEND_BUFFER = 4 << 20;

/** What node copies each socket read into; a reader copies out of it at once. */
const READ_BUFFER = 64 << 10;

/** `onread` options that hand every read to `source.sink`. */
export function onreadOptions(source: BorrowedSource): OnReadOpts {
  return {
    buffer: Buffer.allocUnsafe(READ_BUFFER),
    callback: (n: number, buf: Uint8Array): boolean => {
      if (source.sink !== null) source.sink(n, buf as Buffer);
      else source.early.push(Buffer.from(buf.subarray(0, n)));
      // Pausing is the reader's business (socket.pause()), never this callback's.
      return true;
    },
  };
}

/**
 * The accepted socket re-opened with `onread` (the original is destroyed),
 * and its descriptor (StreamWriter writes replies to it directly), or null
 * when that is not possible: then use the original. `sendBuffer`
 * (bytes, 0 to leave it) sets SO_SNDBUF on it.
 */
export function reopenWithOnread(accepted: Socket, sendBuffer = 0): { sock: Socket; source: BorrowedSource; fd: number } | null {
  if (hostIo === null) return null;
  const fd = (accepted as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) return null;
  const dup = hostIo.dupFd(fd);
  if (dup < 0) return null;
  const source: BorrowedSource = { sink: null, early: [] };
  let sock: Socket;
  try {
    // net.Socket takes `onread` with `fd` (lib/net.js); @types/node lists it only for connect().
    const opts: SocketConstructorOpts & { onread: OnReadOpts } = { fd: dup, readable: true, writable: true, onread: onreadOptions(source) };
    sock = new Socket(opts);
  } catch {
    closeSync(dup);
    return null;
  }
  // The duplicate keeps the connection open; closing the original only frees its descriptor.
  accepted.destroy();
  if (sendBuffer > 0) hostIo.setSendBuffer(dup, sendBuffer); // best effort: the kernel caps it

  return { sock, source, fd: dup };
}
