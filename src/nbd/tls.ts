/**
 * TLS for NBD (NBD_OPT_STARTTLS): credentials, and the upgrade of an
 * accepted (or connected) plain socket to TLS once STARTTLS was ACKed.
 *
 * Two kinds of credentials, as qemu-nbd and nbdkit offer:
 * - X.509: a certificate and key (PEM), and optionally a CA that client
 *   certificates must be signed by (then clients must present one);
 * - PSK: a psktool file, one `username:hexkey` per line (the format
 *   nbdkit --tls-psk and qemu's tls-creds-psk read).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { isIP, type Socket } from 'node:net';
import { TLSSocket, connect as tlsConnect, createSecureContext, type SecureContext } from 'node:tls';
import { BlockError } from '../block/errors.js';

/** `required`: nothing but STARTTLS/ABORT before TLS (FORCEDTLS). `optional`: clients choose. */
export type TlsMode = 'required' | 'optional';

export interface ServerTlsOptions {
  cert?: string;
  key?: string;
  ca?: string;
  psk?: string;
  mode?: TlsMode;
}

/** What a server needs to run STARTTLS. */
export interface ServerTls {
  readonly mode: TlsMode;
  readonly kind: 'x509' | 'psk';
  readonly context: SecureContext;
  readonly psk?: ReadonlyMap<string, Buffer>;
  readonly requestCert: boolean;
}

/**
 * PSK ciphers GnuTLS clients (libnbd, qemu) offer with their default
 * NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK priority, for TLS 1.2; TLS 1.3 uses its
 * own suites (the PSK is then bound to SHA-256).
 */
export const PSK_CIPHERS = [
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
  'ECDHE-PSK-CHACHA20-POLY1305',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
  'PSK-CHACHA20-POLY1305',
].join(':');

/** The longest PSK identity OpenSSL hands over is 128 bytes; keys are bounded too. */
const MAX_PSK_IDENTITY = 128;

/** Parse a psktool file: `username:hexkey` per line; blank lines and `#` comments skipped. */
export function parsePskFile(text: string, path: string): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  text.split(/\r?\n/).forEach((line, i) => {
    const l = line.trim();
    if (l === '' || l.startsWith('#')) return;
    const c = l.lastIndexOf(':');
    const user = c < 0 ? '' : l.slice(0, c);
    const hex = c < 0 ? '' : l.slice(c + 1);
    if (user === '' || Buffer.byteLength(user) > MAX_PSK_IDENTITY || !/^(?:[0-9a-fA-F]{2})+$/.test(hex) || hex.length > 1024) {
      throw new BlockError('invalid-argument', `${path}:${i + 1}: not a psktool line (username:hexkey)`, { path });
    }
    out.set(user, Buffer.from(hex, 'hex'));
  });
  if (out.size === 0) throw new BlockError('invalid-argument', `${path}: no username:hexkey line`, { path });
  return out;
}

async function readCred(path: string, what: string): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (e) {
    throw new BlockError('invalid-argument', `cannot read the TLS ${what} ${path}: ${(e as Error).message}`, { path }, e);
  }
}

/** Load server credentials: X.509 (cert + key [+ ca]) or PSK, not both. */
export async function loadServerTls(o: ServerTlsOptions): Promise<ServerTls | null> {
  const x509 = o.cert !== undefined || o.key !== undefined || o.ca !== undefined;
  if (!x509 && o.psk === undefined) {
    if (o.mode !== undefined) throw new BlockError('invalid-argument', '--tls needs credentials: --tls-cert/--tls-key or --tls-psk');
    return null;
  }
  const mode = o.mode ?? 'required';
  if (x509 && o.psk !== undefined) throw new BlockError('invalid-argument', 'give X.509 credentials or a PSK file, not both');
  if (o.psk !== undefined) {
    const psk = parsePskFile((await readCred(o.psk, 'PSK file')).toString('utf8'), o.psk);
    const context = createSecureContext({ ciphers: PSK_CIPHERS, minVersion: 'TLSv1.2' });
    return { mode, kind: 'psk', context, psk, requestCert: false };
  }
  if (o.cert === undefined || o.key === undefined)
    throw new BlockError('invalid-argument', 'X.509 TLS needs both --tls-cert and --tls-key');
  const cert = await readCred(o.cert, 'certificate');
  const key = await readCred(o.key, 'key');
  const ca = o.ca !== undefined ? await readCred(o.ca, 'CA certificate') : undefined;
  let context: SecureContext;
  try {
    context = createSecureContext(ca !== undefined ? { cert, key, ca, minVersion: 'TLSv1.2' } : { cert, key, minVersion: 'TLSv1.2' });
  } catch (e) {
    throw new BlockError('invalid-argument', `bad TLS credentials: ${(e as Error).message}`, {}, e);
  }
  return { mode, kind: 'x509', context, requestCert: ca !== undefined };
}

/** Run the server side of a TLS handshake over an accepted socket (after STARTTLS's ACK). */
export function upgradeServer(sock: Socket, tls: ServerTls): Promise<TLSSocket> {
  const psk = tls.psk;
  const t = new TLSSocket(sock, {
    isServer: true,
    secureContext: tls.context,
    requestCert: tls.requestCert,
    rejectUnauthorized: tls.requestCert,
    ...(psk !== undefined ? { pskCallback: (_s: TLSSocket, identity: string) => psk.get(identity) ?? null } : {}),
  });
  return secured(t, 'secure');
}

/** The verification error of a peer certificate (server side, with requestCert), or null. */
function tlsAuthError(t: TLSSocket): Error | null {
  const e = (t as TLSSocket & { authorizationError?: Error | null }).authorizationError;
  return e ?? null;
}

function secured(t: TLSSocket, event: 'secure' | 'secureConnect'): Promise<TLSSocket> {
  return new Promise((resolve, reject) => {
    const fail = (e: Error): void => {
      t.destroy();
      reject(new BlockError('protocol', `TLS handshake failed: ${e.message.trim().replace(/:$/, '')}`, { op: 'nbd' }, e));
    };
    t.once('error', fail);
    t.once('close', () => fail(new Error('the connection closed during the TLS handshake')));
    t.once(event, () => {
      t.off('error', fail);
      t.removeAllListeners('close');
      if (event === 'secure' && tlsAuthError(t) !== null) {
        fail(new Error(String(tlsAuthError(t))));
        return;
      }
      resolve(t);
    });
  });
}

export interface ClientTlsOptions {
  /** psktool file and the identity to use (default: the first line's). */
  pskFile?: string;
  username?: string;
  /** libnbd style: a directory with ca-cert.pem [client-cert.pem client-key.pem]. */
  certificates?: string;
  hostname?: string;
  verifyPeer?: boolean;
}

async function optionalFile(path: string): Promise<Buffer | undefined> {
  try {
    return await readFile(path);
  } catch {
    return undefined;
  }
}

/** Run the client side of a TLS handshake (after our STARTTLS was ACKed). */
export async function upgradeClient(sock: Socket, o: ClientTlsOptions): Promise<TLSSocket> {
  if (o.pskFile !== undefined) {
    const keys = parsePskFile((await readCred(o.pskFile, 'PSK file')).toString('utf8'), o.pskFile);
    const identity = o.username ?? (keys.keys().next().value as string);
    const key = keys.get(identity);
    if (key === undefined) throw new BlockError('invalid-argument', `${o.pskFile}: no key for user '${identity}'`);
    const t = tlsConnect({
      socket: sock,
      ciphers: PSK_CIPHERS,
      minVersion: 'TLSv1.2',
      checkServerIdentity: () => undefined,
      pskCallback: () => ({ identity, psk: key }),
    });
    return secured(t, 'secureConnect');
  }
  const dir = o.certificates;
  const ca = dir !== undefined ? await optionalFile(join(dir, 'ca-cert.pem')) : undefined;
  const cert = dir !== undefined ? await optionalFile(join(dir, 'client-cert.pem')) : undefined;
  const key = dir !== undefined ? await optionalFile(join(dir, 'client-key.pem')) : undefined;
  const verify = o.verifyPeer ?? true;
  const t = tlsConnect({
    socket: sock,
    minVersion: 'TLSv1.2',
    rejectUnauthorized: verify,
    // The name checked against the certificate; SNI only for DNS names (RFC 6066).
    ...(o.hostname !== undefined ? { host: o.hostname } : {}),
    ...(o.hostname !== undefined && isIP(o.hostname) === 0 ? { servername: o.hostname } : {}),
    ...(ca !== undefined ? { ca } : {}),
    ...(cert !== undefined && key !== undefined ? { cert, key } : {}),
    ...(verify && o.hostname === undefined ? { checkServerIdentity: () => undefined } : {}),
  });
  return secured(t, 'secureConnect');
}
