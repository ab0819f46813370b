/**
 * NBD URIs (the NBD project's doc/uri.md): `nbd://[user@]host[:port]/[export]`,
 * `nbds://...` (TLS mandatory), `nbd+unix:///[export]?socket=PATH`,
 * `nbds+unix://...`. The export name is the path minus its leading `/`,
 * percent-decoded. TLS query parameters as libnbd understands them:
 * `tls-psk-file`, `tls-username`, `tls-certificates` (a directory with
 * ca-cert.pem, client-cert.pem, client-key.pem), `tls-hostname`,
 * `tls-verify-peer`.
 */
import { BlockError } from '../block/errors.js';
import { DEFAULT_PORT } from './protocol.js';

export interface NbdUri {
  /** TCP address, or a Unix socket path. */
  target: { host: string; port: number } | { path: string };
  exportName: string;
  /** nbds / nbds+unix: TLS is mandatory. */
  tls: boolean;
  tlsPskFile?: string;
  tlsUsername?: string;
  tlsCertificates?: string;
  tlsHostname?: string;
  tlsVerifyPeer: boolean;
}

const SCHEME = /^(nbds?)(\+unix)?:\/\//i;

/** Does this image name look like an NBD URI? */
export function isNbdUri(s: string): boolean {
  return SCHEME.test(s);
}

function bad(uri: string, why: string): BlockError {
  return new BlockError('invalid-argument', `invalid NBD URI '${uri}': ${why}`, { path: uri, op: 'open' });
}

export function parseNbdUri(uri: string): NbdUri {
  const m = SCHEME.exec(uri);
  if (m === null) throw bad(uri, 'the scheme must be nbd, nbds, nbd+unix or nbds+unix');
  const tls = (m[1] as string).toLowerCase() === 'nbds';
  const unix = m[2] !== undefined;
  let u: URL;
  try {
    // URL does not know these schemes' authority rules; parse as http for the pieces.
    const rest = uri.slice(m[0].length);
    if (unix) {
      // The authority of a Unix socket URI is empty or just `user@`.
      const i = rest.search(/[/?]|$/);
      const at = rest.slice(0, i).lastIndexOf('@');
      u = new URL(`http://${at >= 0 ? rest.slice(0, at + 1) : ''}localhost${rest.slice(i)}`);
    } else u = new URL(`http://${rest}`);
  } catch {
    throw bad(uri, 'does not parse');
  }
  let exportName: string;
  try {
    exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  } catch {
    throw bad(uri, 'bad percent-encoding in the export name');
  }
  const q = u.searchParams;
  let target: NbdUri['target'];
  if (unix) {
    const socket = q.get('socket');
    if (socket === null || socket === '') throw bad(uri, 'nbd+unix needs ?socket=PATH');
    target = { path: socket };
  } else {
    const host = u.hostname.replace(/^\[(.*)\]$/, '$1');
    if (host === '') throw bad(uri, 'no host');
    const port = u.port === '' ? DEFAULT_PORT : Number(u.port);
    target = { host, port };
  }
  const out: NbdUri = { target, exportName, tls, tlsVerifyPeer: q.get('tls-verify-peer') !== '0' && q.get('tls-verify-peer') !== 'false' };
  const psk = q.get('tls-psk-file');
  if (psk !== null) out.tlsPskFile = psk;
  const user = q.get('tls-username') ?? (u.username !== '' ? decodeURIComponent(u.username) : null);
  if (user !== null) out.tlsUsername = user;
  const certs = q.get('tls-certificates');
  if (certs !== null) out.tlsCertificates = certs;
  const hn = q.get('tls-hostname');
  if (hn !== null) out.tlsHostname = hn;
  if ((psk !== null || certs !== null) && !tls) out.tls = true;
  return out;
}
