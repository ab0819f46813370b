/**
 * `rblock serve`: serve images over NBD, with qemu-nbd's option names.
 * Opens the images, listens, prints one line when ready, and runs until the
 * last client leaves (or forever with -t) or SIGINT/SIGTERM: then it stops
 * accepting, lets requests in flight finish, flushes, closes the images and
 * exits 0.
 */
import { InvalidArgumentError, type Command } from 'commander';
import type { BlockDevice } from '../block/device.js';
import { BlockError, isBlockError } from '../block/errors.js';
import { openImage } from '../formats/registry.js';
import type { NbdExport } from '../nbd/exports.js';
import { DEFAULT_PORT } from '../nbd/protocol.js';
import { NbdServer, nbdUri, type ListenAddress } from '../nbd/server.js';
import { loadServerTls, type TlsMode } from '../nbd/tls.js';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join as joinPath, resolve as resolvePath } from 'node:path';
import { createImage } from '../formats/create.js';
import { rpcWanted, startServeRpc, type ServeRpcOptions } from '../rpc/server.js';
import type { Io } from './io.js';

export interface ServeOptions extends ServeRpcOptions {
  nbd?: string;
  port?: string;
  bind?: string;
  socket?: string;
  readOnly?: boolean;
  exportName?: string;
  description?: string;
  format?: string;
  persistent?: boolean;
  shared?: number;
  export?: string[];
  snapshot?: boolean;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  tlsPsk?: string;
  tls?: string;
}

/** `[HOST:]PORT`, `[IPv6]:PORT`: where to listen. */
export function parseListenAddress(text: string): { host: string; port: number } {
  const m = /^(?:(\[[^\]]+\]|[^:]*):)?(\d+)$/.exec(text.trim());
  const port = m === null ? NaN : Number(m[2]);
  if (m === null || !Number.isSafeInteger(port) || port > 65535) {
    throw new BlockError('invalid-argument', `invalid --nbd address '${text}': use [HOST:]PORT, e.g. 127.0.0.1:10809 or 10809`);
  }
  const host = m[1] === undefined || m[1] === '' ? '127.0.0.1' : m[1].replace(/^\[(.*)\]$/, '$1');
  return { host, port };
}

function listenAddress(o: ServeOptions): ListenAddress {
  const tcp = o.nbd !== undefined || o.port !== undefined || o.bind !== undefined;
  if (o.socket !== undefined && tcp)
    throw new BlockError('invalid-argument', 'use either --socket or a TCP address (--nbd, --port, --bind), not both');
  if (o.socket !== undefined) return { path: o.socket };
  if (o.nbd !== undefined) {
    if (o.port !== undefined || o.bind !== undefined)
      throw new BlockError('invalid-argument', '--nbd already gives the address; drop --port/--bind');
    return parseListenAddress(o.nbd);
  }
  const port = o.port === undefined ? DEFAULT_PORT : parseListenAddress(o.port).port;
  return { host: o.bind ?? '127.0.0.1', port };
}

interface ExportPlan {
  name: string;
  image: string;
  description?: string;
}

function exportPlans(image: string | undefined, o: ServeOptions): ExportPlan[] {
  const plans: ExportPlan[] = [];
  if (image !== undefined) {
    const p: ExportPlan = { name: o.exportName ?? '', image };
    if (o.description !== undefined) p.description = o.description;
    plans.push(p);
  } else if (o.exportName !== undefined) {
    throw new BlockError('invalid-argument', '--export-name names the export of IMAGE; with --export only, give NAME=IMAGE');
  }
  for (const spec of o.export ?? []) {
    const i = spec.indexOf('=');
    if (i < 0 || i === spec.length - 1) throw new BlockError('invalid-argument', `invalid --export '${spec}': use NAME=IMAGE`);
    plans.push({ name: spec.slice(0, i), image: spec.slice(i + 1) });
  }
  if (plans.length === 0) throw new BlockError('invalid-argument', 'nothing to serve: give an IMAGE or --export NAME=IMAGE');
  const seen = new Set<string>();
  for (const p of plans) {
    if (seen.has(p.name)) throw new BlockError('invalid-argument', `export name '${p.name}' is given twice`);
    seen.add(p.name);
  }
  return plans;
}

/** Temporary overlay directories of --snapshot, removed at exit (even a hard one). */
const snapshotDirs = new Set<string>();
function removeSnapshotDirs(): void {
  for (const d of snapshotDirs) rmSync(d, { recursive: true, force: true });
  snapshotDirs.clear();
}

/** --snapshot: a temporary qcow2 overlay over the image takes the writes; the image is only read. */
async function openSnapshot(p: ExportPlan, o: ServeOptions): Promise<BlockDevice> {
  if (/^nbds?(\+unix)?:\/\//i.test(p.image))
    throw new BlockError('not-supported', `${p.image}: --snapshot of an NBD export is not supported`);
  if (snapshotDirs.size === 0) process.once('exit', removeSnapshotDirs);
  const dir = mkdtempSync(joinPath(tmpdir(), 'rblock-snapshot-'));
  snapshotDirs.add(dir);
  const overlay = joinPath(dir, 'overlay.qcow2');
  await createImage({
    format: 'qcow2',
    path: overlay,
    backingFile: resolvePath(p.image),
    ...(o.format !== undefined ? { backingFormat: o.format } : {}),
  });
  return openImage(overlay, { format: 'qcow2', readOnly: false, quickWrites: true });
}

async function openForServing(p: ExportPlan, o: ServeOptions): Promise<BlockDevice> {
  const readOnly = o.readOnly === true;
  if (o.snapshot === true && !readOnly) return openSnapshot(p, o);
  try {
    return await openImage(p.image, { ...(o.format !== undefined ? { format: o.format } : {}), readOnly, quickWrites: true });
  } catch (e) {
    if (!readOnly && isBlockError(e, 'not-supported')) {
      throw new BlockError('not-supported', `${e.message} (serve it read-only with -r)`, e.context, e);
    }
    throw e;
  }
}

export async function runServe(image: string | undefined, o: ServeOptions, io: Io): Promise<number> {
  const plans = exportPlans(image, o);
  const addr = listenAddress(o);
  // With --rpc or --rpc-socket alone, JSON-RPC is served without NBD (and until a signal).
  const nbdWanted = !rpcWanted(o) || o.nbd !== undefined || o.port !== undefined || o.bind !== undefined || o.socket !== undefined;
  const shared = o.shared ?? 1;
  const devices: BlockDevice[] = [];
  const closeDevices = async (): Promise<void> => {
    for (const d of devices.splice(0))
      await d.close().catch((e: unknown) => io.err(`rblock: closing ${d.path ?? d.format}: ${String(e)}\n`));
  };
  const exports: NbdExport[] = [];
  try {
    for (const p of plans) {
      const device = await openForServing(p, o);
      devices.push(device);
      const e: NbdExport = { name: p.name, device, readOnly: o.readOnly === true };
      if (p.description !== undefined) e.description = p.description;
      exports.push(e);
    }
    let stop: (why: string) => void = () => undefined;
    if (o.tls !== undefined && o.tls !== 'required' && o.tls !== 'optional')
      throw new BlockError('invalid-argument', `--tls must be required or optional, not '${o.tls}'`);
    const tls = await loadServerTls({
      ...(o.tlsCert !== undefined ? { cert: o.tlsCert } : {}),
      ...(o.tlsKey !== undefined ? { key: o.tlsKey } : {}),
      ...(o.tlsCa !== undefined ? { ca: o.tlsCa } : {}),
      ...(o.tlsPsk !== undefined ? { psk: o.tlsPsk } : {}),
      ...(o.tls !== undefined ? { mode: o.tls as TlsMode } : {}),
    });
    const server = new NbdServer({
      ...(tls !== null ? { tls } : {}),
      exports,
      maxConnections: shared,
      log: (m) => io.err(`rblock serve: ${m}\n`),
      onClientGone: (remaining) => {
        if (o.persistent !== true && !rpcWanted(o) && remaining === 0) stop('last client left');
      },
    });
    const done = new Promise<void>((resolve) => {
      let stopping = false;
      stop = () => {
        if (stopping) return;
        stopping = true;
        resolve();
      };
    });
    const onSignal = (): void => stop('signal');
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    let stopRpc: () => Promise<void> = async () => undefined;
    try {
      if (nbdWanted) {
        const bound = await server.listen(addr);
        const names = plans.length > 1 ? ` (exports: ${plans.map((p) => JSON.stringify(p.name)).join(', ')})` : '';
        io.err(`rblock serve: listening on ${nbdUri(bound, plans.length === 1 ? (plans[0] as ExportPlan).name : '')}${names}\n`);
      }
      stopRpc = await startServeRpc(o, exports, (line) => io.err(line));
      await done;
    } finally {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      await stopRpc();
      await server.close();
    }
  } finally {
    await closeDevices();
    removeSnapshotDirs();
  }
  return 0;
}

/** Add `serve` to the program (kept here so main.ts only needs one line). */
export function registerServe(program: Command, io: Io, setExit: (code: number) => void): void {
  program
    .command('serve')
    .description('Serve images over NBD (like qemu-nbd): to nbdinfo, nbdcopy, qemu-img, qemu-io, fio, the kernel client.')
    .argument('[image]', 'the image to serve as the default export (name: --export-name, default "")')
    .option('--nbd <[host:]port>', `listen on TCP (default 127.0.0.1:${DEFAULT_PORT}; port 0 picks a free one)`)
    .option('-p, --port <port>', 'TCP port (qemu-nbd style)')
    .option('-b, --bind <addr>', 'TCP address (qemu-nbd style)')
    .option('-k, --socket <path>', 'listen on this Unix socket instead of TCP')
    .option('-r, --read-only', 'refuse writes (EPERM)')
    .option('-x, --export-name <name>', 'name of the export of IMAGE')
    .option('-D, --description <text>', 'description of the export of IMAGE')
    .option('-f, --format <fmt>', 'image format (default: probe)')
    .option('-t, --persistent', 'keep running when the last client leaves')
    .option('-e, --shared <n>', 'clients served at once (default 1); more wait their turn', (v: string) => {
      const n = Number(v);
      if (!Number.isSafeInteger(n) || n < 1) throw new InvalidArgumentError('expected a whole number >= 1');
      return n;
    })
    .option('--rpc <[host:]port>', 'serve JSON-RPC 2.0 on TCP (host default 127.0.0.1), alone or beside NBD; see docs/json-rpc.md')
    .option('--rpc-socket <path>', 'serve JSON-RPC 2.0 on this Unix socket')
    .option(
      '--rpc-limits <list>',
      'JSON-RPC limits: max-message=64M,max-read=32M,idle-timeout=30000,idle-close=2000,max-connections=128,max-depth=64',
    )
    .option('--export <name=image>', 'one more export (repeatable)', (v: string, prev: string[] = []) => [...prev, v])
    .option('-s, --snapshot', 'writes go to a temporary qcow2 overlay, deleted at exit; the image is not changed')
    .option('--tls-cert <file>', 'TLS: X.509 server certificate (PEM)')
    .option('--tls-key <file>', 'TLS: the private key of --tls-cert (PEM)')
    .option('--tls-ca <file>', 'TLS: clients must present a certificate signed by this CA (PEM)')
    .option('--tls-psk <file>', 'TLS with pre-shared keys: a psktool file (username:hexkey lines)')
    .option('--tls <mode>', 'with TLS credentials: required (default; nothing but STARTTLS before TLS) or optional')
    .addHelpText(
      'after',
      '\nPrints "rblock serve: listening on URI" on stderr when ready. Without -t it exits after the last client leaves.\n' +
        'Examples:\n  rblock serve -r -t disk.qcow2\n  rblock serve -k /tmp/nbd.sock disk.raw &  nbdinfo "nbd+unix:///?socket=/tmp/nbd.sock"\n' +
        '  rblock serve -r -t --nbd 0.0.0.0:10809 --export a=a.qcow2 --export b=b.raw\n',
    )
    .action(async (image: string | undefined, o: ServeOptions) => {
      setExit(await runServe(image, o, io));
    });
}
