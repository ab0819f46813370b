/**
 * Listening on TCP or a Unix socket, shared by the NBD and JSON-RPC servers:
 * one clear error for an address in use, and a stale socket file (left by a
 * server that died) replaced while a live one is never taken over.
 */
import { lstat, unlink } from 'node:fs/promises';
import { connect, type Server } from 'node:net';
import { BlockError } from '../block/errors.js';

export function listenOn(srv: Server, start: () => void, where: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (e: NodeJS.ErrnoException): void => {
      const why =
        e.code === 'EADDRINUSE'
          ? 'address already in use (another server? choose another port or socket)'
          : e.code === 'EACCES'
            ? 'permission denied (ports below 1024 need privileges)'
            : e.message;
      reject(new BlockError('invalid-argument', `cannot listen on ${where}: ${why}`, { op: 'listen' }, e));
    };
    srv.once('error', onError);
    srv.once('listening', () => {
      srv.off('error', onError);
      resolve();
    });
    start();
  });
}

/** A socket file nobody listens on any more is replaced; a live one or another file is an error. */
export async function removeStaleSocket(path: string): Promise<void> {
  let isSocket: boolean;
  try {
    isSocket = (await lstat(path)).isSocket();
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw e;
  }
  if (!isSocket) throw new BlockError('invalid-argument', `${path}: exists and is not a socket; not replacing it`, { path });
  const live = await new Promise<boolean>((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
  if (live) throw new BlockError('invalid-argument', `${path}: another server is listening on this socket`, { path });
  await unlink(path);
}
