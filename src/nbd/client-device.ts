/**
 * A BlockDevice over an NBD connection: what openImage() returns for
 * `nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH` and their
 * `nbds` TLS variants. Reads and writes are split at the server's maximum
 * payload by GenericDevice; block status comes from base:allocation.
 */
import type { Extent, IoOpts } from '../block/device.js';
import { BlockError } from '../block/errors.js';
import { GenericDevice, type Driver } from '../block/generic.js';
import { NbdClient, type NbdClientOptions } from './client.js';
import { STATE_HOLE, STATE_ZERO, TFlag } from './protocol.js';
import { parseNbdUri } from './uri.js';

export interface NbdOpenOptions {
  /** Default true, as every openImage. */
  readOnly?: boolean;
  /** Only raw (the bytes of the export) is supported over NBD. */
  format?: string;
  extendedHeaders?: boolean;
}

/** Connect and wrap: the device's path is the URI. */
export async function openNbd(uri: string, o: NbdOpenOptions = {}): Promise<GenericDevice> {
  if (o.format !== undefined && o.format !== 'raw') {
    throw new BlockError('not-supported', `${uri}: only -f raw is supported on NBD exports (the export's bytes as they are)`, {
      path: uri,
      op: 'open',
    });
  }
  const u = parseNbdUri(uri);
  const co: NbdClientOptions = { target: u.target, exportName: u.exportName, name: uri };
  if (o.extendedHeaders !== undefined) co.extendedHeaders = o.extendedHeaders;
  if (u.tls) {
    co.tls = { required: true, verifyPeer: u.tlsVerifyPeer };
    if (u.tlsPskFile !== undefined) co.tls.pskFile = u.tlsPskFile;
    if (u.tlsUsername !== undefined) co.tls.username = u.tlsUsername;
    if (u.tlsCertificates !== undefined) co.tls.certificates = u.tlsCertificates;
    if (u.tlsHostname !== undefined) co.tls.hostname = u.tlsHostname;
  }
  const client = await NbdClient.connect(co);
  const wantWrite = o.readOnly === false;
  if (wantWrite && client.readOnly) {
    await client.close();
    throw new BlockError('read-only', `${uri}: the export is read-only`, { path: uri, op: 'open' });
  }
  return new GenericDevice(nbdDriver(client, uri, !wantWrite));
}

/** The Driver over a connected client. */
export function nbdDriver(c: NbdClient, uri: string, readOnly: boolean): Driver & { client: NbdClient } {
  const writable = !readOnly;
  const d: Driver & { client: NbdClient } = {
    client: c,
    size: c.size,
    format: 'raw',
    path: uri,
    readOnly,
    maxRequest: c.maxPayload,
    caps: {
      flush: c.has(TFlag.SEND_FLUSH),
      fua: c.has(TFlag.SEND_FUA),
      zero: writable && c.has(TFlag.SEND_WRITE_ZEROES),
      discard: writable && c.has(TFlag.SEND_TRIM),
      blockStatus: c.allocationContext !== null,
    },
    pread: (buf, offset) => c.read(buf, offset),
    // Writes are durable before we disconnect (servers flush at DISC too, but need not).
    close: async () => {
      if (writable && c.has(TFlag.SEND_FLUSH)) await c.flush().catch(() => undefined);
      await c.close();
    },
  };
  if (writable) {
    d.pwrite = (buf: Uint8Array, offset: number, opts: IoOpts) => c.write(buf, offset, opts.fua === true);
    if (c.has(TFlag.SEND_WRITE_ZEROES)) {
      d.writeZeroes = (offset: number, length: number, opts: IoOpts) =>
        c.writeZeroes(offset, length, { fua: opts.fua === true, noHole: opts.mayTrim !== true });
    }
    if (c.has(TFlag.SEND_TRIM)) d.discard = (offset: number, length: number) => c.trim(offset, length);
  }
  if (c.has(TFlag.SEND_FLUSH)) d.flush = () => (writable ? c.flush() : Promise.resolve());
  if (c.allocationContext !== null) {
    d.blockStatus = async (offset: number, length: number): Promise<Extent[]> => {
      const out: Extent[] = [];
      let pos = offset;
      for (const x of await c.blockStatus(offset, length)) {
        const hole = (x.status & STATE_HOLE) !== 0;
        // As qemu sees a protocol driver: everything present, mapped 1:1 to the export.
        out.push({ offset: pos, length: x.length, hole, zero: (x.status & STATE_ZERO) !== 0, allocated: true, hostOffset: pos, file: uri });
        pos += x.length;
      }
      return out;
    };
  }
  return d;
}
