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
 */
import { closeSync } from 'node:fs';
import { Socket, type OnReadOpts, type SocketConstructorOpts } from 'node:net';
import { hostIo } from '../block/hostio.js';
import type { BorrowedSource } from './stream.js';

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
 * or null when that is not possible: then use the original.
 */
export function reopenWithOnread(accepted: Socket): { sock: Socket; source: BorrowedSource } | null {
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
  return { sock, source };
}
