/**
 * TLS (NBD_OPT_STARTTLS) in `rblock serve`: nbdinfo and nbdcopy (GnuTLS,
 * through libnbd) with a psktool PSK file and with X.509 certificates made
 * here by openssl; plain clients refused when TLS is required (nothing but
 * STARTTLS/ABORT answered); TLS optional; rblock's own client over both.
 */
import test, { type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect as netConnect } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { memoryDevice } from '../../src/block/memory.js';
import {
  decodeOptionReplyHeader,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
} from '../../src/nbd/codec.js';
import { NbdServer } from '../../src/nbd/server.js';
import { StreamReader, StreamWriter } from '../../src/nbd/stream.js';
import { PSK_CIPHERS, loadServerTls } from '../../src/nbd/tls.js';
import { openImage } from '../../src/formats/registry.js';
import { Opt, Rep } from '../../src/nbd/protocol.js';
import { TinyClient } from '../helpers/nbd-tiny-client.js';
import { RBLOCK, needTools, run, scratchDir } from '../helpers/tools.js';
import { createQcow2, qemuIo } from './qemu.js';

const T = { timeout: 30000 };
const MiB = 1 << 20;
const RUN = { timeout: 15000 };

interface Served {
  proc: ChildProcess;
  uri: string;
  stderr(): string;
}

async function serve(t: TestContext, args: string[]): Promise<Served> {
  const proc = spawn(process.execPath, [RBLOCK, 'serve', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  t.after(() => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
  });
  let err = '';
  proc.stderr?.setEncoding('utf8');
  proc.stderr?.on('data', (s: string) => (err += s));
  const uri = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`rblock serve did not start: ${err}`)), 10000);
    proc.stderr?.on('data', () => {
      const m = /listening on (\S+)/.exec(err);
      if (m !== null) {
        clearTimeout(timer);
        resolve(m[1] as string);
      }
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`rblock serve exited (${code}): ${err}`));
    });
  });
  return { proc, uri, stderr: () => err };
}

/** An 8 MiB qcow2: 1 MiB of 0x11 at 1 MiB, the rest unallocated. */
function makeDisk(dir: string): string {
  createQcow2(dir, 'disk.qcow2', '8M');
  qemuIo(dir, 'disk.qcow2', 'write -P 0x11 1M 1M');
  return join(dir, 'disk.qcow2');
}

function checkContent(raw: string): void {
  const b = readFileSync(raw);
  assert.equal(b.length, 8 * MiB);
  assert.ok(b.subarray(MiB, 2 * MiB).every((x) => x === 0x11));
  assert.ok(b.subarray(0, MiB).every((x) => x === 0) && b.subarray(2 * MiB).every((x) => x === 0));
}

/** A CA, and a server certificate for localhost / 127.0.0.1 signed by it (libnbd's file names). */
function makePki(dir: string): { cert: string; key: string; caDir: string } {
  const o = (...a: string[]): void => void run('openssl', a, { cwd: dir, ...RUN });
  o(
    'req',
    '-x509',
    '-newkey',
    'rsa:2048',
    '-nodes',
    '-keyout',
    'ca-key.pem',
    '-out',
    'ca-cert.pem',
    '-days',
    '2',
    '-subj',
    '/CN=rblock test CA',
  );
  o('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'server-key.pem', '-out', 'server.csr', '-subj', '/CN=localhost');
  writeFileSync(join(dir, 'ext.cnf'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  o(
    'x509',
    '-req',
    '-in',
    'server.csr',
    '-CA',
    'ca-cert.pem',
    '-CAkey',
    'ca-key.pem',
    '-CAcreateserial',
    '-out',
    'server-cert.pem',
    '-days',
    '2',
    '-extfile',
    'ext.cnf',
  );
  return { cert: join(dir, 'server-cert.pem'), key: join(dir, 'server-key.pem'), caDir: dir };
}

function portOf(uri: string): string {
  const m = /:(\d+)\//.exec(uri);
  assert.ok(m !== null, uri);
  return m[1] as string;
}

test('PSK: nbdinfo --map and nbdcopy over nbds+unix with a psktool file; plain clients get ERR_TLS_REQD', T, async (t) => {
  if (!needTools(t, 'nbdinfo', 'nbdcopy', 'qemu-img', 'qemu-io')) return;
  using s = scratchDir('rblock-tls-');
  const img = makeDisk(s.dir);
  const psk = join(s.dir, 'keys.psk');
  writeFileSync(psk, `# psktool format\nalice:${randomBytes(32).toString('hex')}\nbob:${randomBytes(16).toString('hex')}\n`);
  const sock = join(s.dir, 'p.sock');
  const served = await serve(t, ['-r', '-t', '-e', '4', '--tls-psk', psk, '-k', sock, img]);
  const tlsUri = `nbds+unix://alice@/?socket=${sock}&tls-psk-file=${psk}`;
  const map = run('nbdinfo', ['--map', tlsUri], RUN).stdout;
  assert.match(map, /1048576\s+1048576\s+0\s+data\n\s+2097152\s+6291456\s+3\s+hole,zero/);
  const out = join(s.dir, 'out.raw');
  run('nbdcopy', [tlsUri, out], RUN);
  checkContent(out);
  // bob too; a wrong key fails.
  assert.match(run('nbdinfo', ['--size', `nbds+unix://bob@/?socket=${sock}&tls-psk-file=${psk}`], RUN).stdout, /^8388608/);
  const wrong = join(s.dir, 'wrong.psk');
  writeFileSync(wrong, `alice:${randomBytes(32).toString('hex')}\n`);
  assert.notEqual(
    run('nbdinfo', ['--size', `nbds+unix://alice@/?socket=${sock}&tls-psk-file=${wrong}`], { ...RUN, check: false }).status,
    0,
  );
  // A plain client is refused.
  const plain = run('nbdinfo', ['--size', served.uri], { ...RUN, check: false });
  assert.notEqual(plain.status, 0);
  assert.match(plain.stderr, /TLS/);
  // Nothing but STARTTLS and ABORT is answered before TLS; EXPORT_NAME drops the client.
  const c = await TinyClient.connect(sock);
  await c.start();
  for (const [opt, data] of [
    [Opt.LIST, undefined],
    [Opt.INFO, encodeInfoRequest('')],
    [Opt.GO, encodeInfoRequest('')],
    [Opt.STRUCTURED_REPLY, undefined],
    [99, undefined],
  ] as const) {
    assert.deepEqual(
      (await c.option(opt, data)).map((r) => r.type),
      [Rep.ERR_TLS_REQD],
    );
  }
  assert.deepEqual(
    (await c.option(Opt.ABORT)).map((r) => r.type),
    [Rep.ACK],
  );
  await c.closed();
  const e = await TinyClient.connect(sock);
  await e.start();
  await e.writer.send([Buffer.concat([Buffer.from('IHAVEOPT'), Buffer.from([0, 0, 0, 1, 0, 0, 0, 0])])]);
  await e.closed();
  // rblock's own client over PSK, and the server is still fine.
  await using dev = await openImage(tlsUri);
  const b = Buffer.alloc(MiB);
  await dev.pread(b, MiB);
  assert.ok(b.every((x) => x === 0x11));
  assert.equal(served.proc.exitCode, null);
});

test(
  'X.509 (certificates made by openssl): nbdinfo and nbdcopy over nbds:// verify the server; --tls optional serves both',
  T,
  async (t) => {
    if (!needTools(t, 'nbdinfo', 'nbdcopy', 'openssl', 'qemu-img', 'qemu-io')) return;
    using s = scratchDir('rblock-tls-');
    const img = makeDisk(s.dir);
    const pki = makePki(s.dir);
    const served = await serve(t, ['-r', '-t', '-e', '4', '--tls-cert', pki.cert, '--tls-key', pki.key, '--nbd', '127.0.0.1:0', img]);
    const port = portOf(served.uri);
    const tlsUri = `nbds://localhost:${port}/?tls-certificates=${pki.caDir}`;
    assert.match(run('nbdinfo', ['--map', tlsUri], RUN).stdout, /1048576\s+1048576\s+0\s+data\n\s+2097152\s+6291456\s+3\s+hole,zero/);
    const json = run('nbdinfo', ['--json', tlsUri], RUN).stdout;
    assert.match(json, /"export-size": 8388608/);
    const out = join(s.dir, 'out.raw');
    run('nbdcopy', [tlsUri, out], RUN);
    checkContent(out);
    // The plain URI is refused; a client that does not trust our CA fails the handshake.
    assert.notEqual(run('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/`], { ...RUN, check: false }).status, 0);
    const other = join(s.dir, 'other');
    run('mkdir', [other]);
    run(
      'openssl',
      ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'k.pem', '-out', 'ca-cert.pem', '-days', '1', '-subj', '/CN=x'],
      {
        cwd: other,
        ...RUN,
      },
    );
    assert.notEqual(run('nbdinfo', ['--size', `nbds://localhost:${port}/?tls-certificates=${other}`], { ...RUN, check: false }).status, 0);
    // rblock's own client verifies the certificate too.
    await using dev = await openImage(tlsUri);
    assert.equal(dev.size, 8 * MiB);
    await assert.rejects(openImage(`nbds://localhost:${port}/?tls-certificates=${other}`), /TLS handshake failed/);
    assert.equal(served.proc.exitCode, null);

    // --tls-ca: clients must show a certificate signed by the CA (libnbd takes client-cert.pem from the directory).
    const caOnly = join(s.dir, 'ca-only');
    run('mkdir', [caOnly]);
    run('cp', [join(pki.caDir, 'ca-cert.pem'), caOnly]);
    const o = (...a: string[]): void => void run('openssl', a, { cwd: pki.caDir, ...RUN });
    o('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'client-key.pem', '-out', 'client.csr', '-subj', '/CN=client');
    writeFileSync(join(pki.caDir, 'cext.cnf'), 'extendedKeyUsage=clientAuth\n');
    o(
      'x509',
      '-req',
      '-in',
      'client.csr',
      '-CA',
      'ca-cert.pem',
      '-CAkey',
      'ca-key.pem',
      '-CAcreateserial',
      '-out',
      'client-cert.pem',
      '-days',
      '2',
      '-extfile',
      'cext.cnf',
    );
    const mutual = await serve(t, [
      '-r',
      '-t',
      '-e',
      '4',
      '--tls-cert',
      pki.cert,
      '--tls-key',
      pki.key,
      '--tls-ca',
      join(pki.caDir, 'ca-cert.pem'),
      '--nbd',
      '127.0.0.1:0',
      img,
    ]);
    const pm = portOf(mutual.uri);
    assert.match(run('nbdinfo', ['--size', `nbds://localhost:${pm}/?tls-certificates=${pki.caDir}`], RUN).stdout, /^8388608/);
    assert.notEqual(run('nbdinfo', ['--size', `nbds://localhost:${pm}/?tls-certificates=${caOnly}`], { ...RUN, check: false }).status, 0);
    await using viaClientCert = await openImage(`nbds://localhost:${pm}/?tls-certificates=${pki.caDir}`);
    assert.equal(viaClientCert.size, 8 * MiB);

    // --tls optional: plain and TLS clients both get the export.
    const opt = await serve(t, [
      '-r',
      '-t',
      '-e',
      '4',
      '--tls',
      'optional',
      '--tls-cert',
      pki.cert,
      '--tls-key',
      pki.key,
      '--nbd',
      '127.0.0.1:0',
      img,
    ]);
    const p2 = portOf(opt.uri);
    assert.match(run('nbdinfo', ['--size', `nbd://127.0.0.1:${p2}/`], RUN).stdout, /^8388608/);
    assert.match(run('nbdinfo', ['--size', `nbds://localhost:${p2}/?tls-certificates=${pki.caDir}`], RUN).stdout, /^8388608/);
  },
);

test('TLS options are checked: --tls without credentials, a bad PSK file', T, () => {
  using s = scratchDir('rblock-tls-');
  const img = join(s.dir, 'd.raw');
  writeFileSync(img, Buffer.alloc(MiB));
  const r1 = run(process.execPath, [RBLOCK, 'serve', '--tls', 'required', '-k', join(s.dir, 'a.sock'), img], { ...RUN, check: false });
  assert.notEqual(r1.status, 0);
  assert.match(r1.stderr, /--tls needs credentials/);
  const bad = join(s.dir, 'bad.psk');
  writeFileSync(bad, 'alice:not-hex\n');
  const r2 = run(process.execPath, [RBLOCK, 'serve', '--tls-psk', bad, '-k', join(s.dir, 'b.sock'), img], { ...RUN, check: false });
  assert.notEqual(r2.status, 0);
  assert.match(r2.stderr, /not a psktool line/);
});

test('STARTTLS in process (--tls optional): state negotiated in the clear is forgotten, a second STARTTLS is ERR_INVALID', T, async () => {
  using s = scratchDir('rblock-tls-');
  const key = randomBytes(32);
  const pskFile = join(s.dir, 'k.psk');
  writeFileSync(pskFile, `carol:${key.toString('hex')}\n`);
  const tls = await loadServerTls({ psk: pskFile, mode: 'optional' });
  assert.ok(tls !== null);
  const server = new NbdServer({ exports: [{ name: '', device: memoryDevice(MiB) }], tls });
  const sock = join(s.dir, 'i.sock');
  await server.listen({ path: sock });
  try {
    const raw = netConnect(sock);
    await new Promise((r) => raw.once('connect', r));
    let reader = new StreamReader(raw);
    let writer = new StreamWriter(raw);
    const opt = async (o: number, data?: Buffer): Promise<number[]> => {
      await writer.send([encodeOption(o, data)]);
      const types: number[] = [];
      for (;;) {
        const h = decodeOptionReplyHeader(await reader.read(20));
        await reader.read(h.length);
        types.push(h.type);
        if (h.type === Rep.ACK || h.type >= 0x80000000) return types;
      }
    };
    await reader.read(18);
    await writer.send([encodeClientFlags(3)]);
    assert.deepEqual(await opt(Opt.STRUCTURED_REPLY), [Rep.ACK]);
    assert.deepEqual(await opt(Opt.STARTTLS), [Rep.ACK]);
    reader.detach();
    const t = tlsConnect({
      socket: raw,
      ciphers: PSK_CIPHERS,
      checkServerIdentity: () => undefined,
      pskCallback: () => ({ identity: 'carol', psk: key }),
    });
    await new Promise((r) => t.once('secureConnect', r));
    reader = new StreamReader(t);
    writer = new StreamWriter(t);
    // Structured replies were negotiated before TLS: forgotten, so SET_META_CONTEXT is refused.
    assert.deepEqual(await opt(Opt.SET_META_CONTEXT, encodeMetaContextRequest('', ['base:allocation'])), [Rep.ERR_INVALID]);
    assert.deepEqual(await opt(Opt.STARTTLS), [Rep.ERR_INVALID]);
    assert.deepEqual(await opt(Opt.STRUCTURED_REPLY), [Rep.ACK]);
    assert.deepEqual(await opt(Opt.GO, encodeInfoRequest('')), [Rep.INFO, Rep.INFO, Rep.ACK]);
    t.destroy();
  } finally {
    await server.close();
  }
});
