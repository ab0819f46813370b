/**
 * `rblock rpc [--connect HOST:PORT | --socket PATH] METHOD [key=value ...]`:
 * a JSON-RPC client for scripts and for people without nc and jq. Values are
 * typed by the method table (integers take K/M/G suffixes); the result is
 * printed as JSON, an error as one line on stderr (exit 1).
 */
import { connect, type Socket } from 'node:net';
import type { Command } from 'commander';
import { BlockError } from '../block/errors.js';
import { parseRpcAddress } from '../rpc/server.js';
import { METHOD_TABLE, methodsHelp, paramsOf } from '../rpc/schema.js';
import { parseSize } from '../util/size.js';
import type { Io } from './io.js';

export interface RpcCliOptions {
  connect?: string;
  socket?: string;
  timeout?: string;
}

export const DEFAULT_RPC_ADDRESS = '127.0.0.1:1234';

/** key=value pairs to params, typed by the method's table entry (unknown keys and methods: JSON, else a string). */
export function cliParams(method: string, pairs: string[]): Record<string, unknown> {
  const spec = METHOD_TABLE.get(method);
  const specs = spec === undefined ? [] : paramsOf(spec);
  const out: Record<string, unknown> = {};
  for (const pair of pairs) {
    const i = pair.indexOf('=');
    if (i <= 0) throw new BlockError('invalid-argument', `invalid param '${pair}': use key=value`);
    const key = pair.slice(0, i);
    const text = pair.slice(i + 1);
    const type = specs.find((s) => s.name === key)?.type;
    if (type === 'integer') out[key] = parseSize(text, key);
    else if (type === 'boolean') {
      if (text !== 'true' && text !== 'false') throw new BlockError('invalid-argument', `invalid param '${pair}': ${key} is true or false`);
      out[key] = text === 'true';
    } else if (type === 'string') out[key] = text;
    else {
      try {
        out[key] = JSON.parse(text) as unknown;
      } catch {
        out[key] = text;
      }
    }
  }
  return out;
}

function open(o: RpcCliOptions): Socket {
  if (o.socket !== undefined && o.connect !== undefined)
    throw new BlockError('invalid-argument', 'use either --connect or --socket, not both');
  if (o.socket !== undefined) return connect(o.socket);
  const a = parseRpcAddress(o.connect ?? DEFAULT_RPC_ADDRESS);
  return connect(a.port, a.host);
}

/** Send one request and resolve with the first reply line, parsed. */
export function call(o: RpcCliOptions, method: string, params: Record<string, unknown>, timeoutMs = 60_000): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const where = o.socket ?? o.connect ?? DEFAULT_RPC_ADDRESS;
    const sock = open(o);
    let buf = '';
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new BlockError('io', `no reply from ${where} within ${timeoutMs} ms`));
    }, timeoutMs);
    sock.setEncoding('utf8');
    sock.on('connect', () => sock.write(JSON.stringify({ jsonrpc: '2.0', method, params, id: 1 }) + '\n'));
    sock.on('data', (s: string) => {
      buf += s;
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      sock.end();
      try {
        resolve(JSON.parse(buf.slice(0, nl)) as unknown);
      } catch (e) {
        reject(new BlockError('protocol', `${where}: the reply is not JSON: ${e instanceof Error ? e.message : String(e)}`));
      }
    });
    sock.on('error', (e) => {
      clearTimeout(timer);
      reject(new BlockError('io', `cannot talk to the JSON-RPC server at ${where}: ${e.message}`, { op: 'rpc' }, e));
    });
    sock.on('close', () => {
      clearTimeout(timer);
      reject(new BlockError('protocol', `${where} closed the connection without a reply`));
    });
  });
}

export async function runRpc(method: string, pairs: string[], o: RpcCliOptions, io: Io): Promise<number> {
  const timeout = o.timeout === undefined ? 60_000 : Number(o.timeout) * 1000;
  if (!Number.isFinite(timeout) || timeout <= 0) throw new BlockError('invalid-argument', `invalid --timeout '${o.timeout}': seconds, > 0`);
  const reply = (await call(o, method, cliParams(method, pairs), timeout)) as {
    result?: unknown;
    error?: { code: number; message: string };
  };
  if (reply.error !== undefined) {
    io.err(`rblock: ${reply.error.message} (JSON-RPC error ${reply.error.code})\n`);
    return 1;
  }
  await io.out(JSON.stringify(reply.result, null, 2) + '\n');
  return 0;
}

/** Add `rpc` to the program (main.ts calls this). */
export function registerRpc(program: Command, io: Io, setExit: (code: number) => void): void {
  program
    .command('rpc')
    .description('Call a method of a JSON-RPC server started by `rblock serve --rpc` and print the result as JSON.')
    .argument('<method>', 'method name (see below)')
    .argument('[params...]', 'params as key=value (integers take K, M, G suffixes)')
    .option('-c, --connect <host:port>', `TCP address of the server (default ${DEFAULT_RPC_ADDRESS})`)
    .option('-s, --socket <path>', 'Unix socket of the server')
    .option('--timeout <seconds>', 'give up waiting for the reply after this long (default 60)')
    .addHelpText(
      'after',
      '\n' +
        methodsHelp() +
        '\nExamples:\n  rblock rpc --connect 127.0.0.1:1234 read_guest_cluster cluster=2\n' +
        '  rblock rpc --socket /tmp/rpc.sock read offset=1M length=512 encoding=hex\n',
    )
    .action(async (method: string, params: string[], o: RpcCliOptions) => {
      setExit(await runRpc(method, params, o, io));
    });
}
