/**
 * JSON-RPC 2.0 message handling: one parsed JSON value in, the reply out
 * (or nothing, for notifications and all-notification batches). Requests
 * are checked against the method table (schema.ts): unknown methods -32601,
 * params by name with their types -32602 naming the param and why, and
 * library failures mapped by errors.ts.
 */
import { BlockError } from '../block/errors.js';
import { INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR, RpcError, toErrorObject, type RpcErrorObject } from './errors.js';
import { METHOD_TABLE, paramsOf, type MethodContext, type MethodSpec, type Params, type RpcExport, type RpcLimits } from './schema.js';

export type RpcId = string | number | null;

export type RpcResponse = { jsonrpc: '2.0'; id: RpcId; result: unknown } | { jsonrpc: '2.0'; id: RpcId; error: RpcErrorObject };

export interface DispatchEnv {
  exports: readonly RpcExport[];
  limits: RpcLimits;
  /** One line per failed request worth telling an operator. */
  log?: (msg: string) => void;
}

/** Batches larger than this are refused as a whole (-32600). */
export const MAX_BATCH = 1000;

export function errorResponse(id: RpcId, e: unknown): RpcResponse {
  return { jsonrpc: '2.0', id, error: toErrorObject(e) };
}

export function parseErrorResponse(message: string): RpcResponse {
  return errorResponse(null, new RpcError(PARSE_ERROR, `parse error: ${message}`));
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function validId(v: unknown): v is RpcId {
  return v === null || typeof v === 'string' || (typeof v === 'number' && Number.isFinite(v));
}

/** Check params by name against the table; fills defaults. Throws -32602 naming the param. */
export function checkParams(m: MethodSpec, raw: unknown): Params {
  if (raw !== undefined && !isObject(raw)) {
    if (Array.isArray(raw) && raw.length === 0) raw = {};
    else
      throw new RpcError(
        INVALID_PARAMS,
        `invalid params: ${m.name} takes its params by name (an object), not ${Array.isArray(raw) ? 'an array' : typeof raw}`,
      );
  }
  const given = (raw ?? {}) as Record<string, unknown>;
  const specs = paramsOf(m);
  const out: Params = {};
  for (const key of Object.keys(given)) {
    if (!specs.some((s) => s.name === key)) {
      const known = specs.map((s) => s.name).join(', ');
      throw new RpcError(
        INVALID_PARAMS,
        `invalid params: ${m.name} has no param '${key}' (${known === '' ? 'it takes none' : `it takes: ${known}`})`,
        { param: key },
      );
    }
  }
  for (const s of specs) {
    const v = given[s.name];
    if (v === undefined) {
      if (s.required === true) throw new RpcError(INVALID_PARAMS, `invalid params: '${s.name}' is required (${s.doc})`, { param: s.name });
      out[s.name] = s.default;
      continue;
    }
    const bad = (why: string): RpcError => new RpcError(INVALID_PARAMS, `invalid params: '${s.name}' ${why}`, { param: s.name });
    if (s.type === 'integer') {
      if (typeof v !== 'number' || !Number.isSafeInteger(v)) throw bad(`must be a whole number, got ${JSON.stringify(v)}`);
      const min = s.min ?? 0;
      if (v < min) throw bad(`must be at least ${min}, got ${v}`);
    } else if (s.type === 'string') {
      if (typeof v !== 'string') throw bad(`must be a string, got ${JSON.stringify(v)}`);
      if (s.choices !== undefined && !s.choices.includes(v)) throw bad(`must be one of ${s.choices.join(', ')}, got ${JSON.stringify(v)}`);
    } else if (typeof v !== 'boolean') throw bad(`must be true or false, got ${JSON.stringify(v)}`);
    out[s.name] = v as string | number | boolean;
  }
  return out;
}

async function runOne(msg: unknown, env: DispatchEnv): Promise<RpcResponse | null> {
  if (!isObject(msg)) return errorResponse(null, new RpcError(INVALID_REQUEST, 'invalid request: expected a request object'));
  const hasId = 'id' in msg;
  const id: RpcId = hasId && validId(msg['id']) ? msg['id'] : null;
  const invalid = (why: string): RpcResponse => errorResponse(id, new RpcError(INVALID_REQUEST, `invalid request: ${why}`));
  if (msg['jsonrpc'] !== '2.0') return invalid('"jsonrpc" must be "2.0"');
  if (typeof msg['method'] !== 'string') return invalid('"method" must be a string');
  if (hasId && !validId(msg['id'])) return invalid('"id" must be a string, a number or null');
  for (const k of Object.keys(msg)) {
    if (k !== 'jsonrpc' && k !== 'method' && k !== 'params' && k !== 'id') return invalid(`unknown member "${k}"`);
  }
  const notification = !hasId;
  const method = msg['method'];
  const reply = (r: RpcResponse): RpcResponse | null => (notification ? null : r);
  const m = METHOD_TABLE.get(method);
  if (m === undefined) return reply(errorResponse(id, new RpcError(METHOD_NOT_FOUND, `method not found: ${method}`)));
  try {
    const p = checkParams(m, msg['params']);
    let exp: RpcExport | undefined = env.exports[0];
    if (m.image) {
      exp = env.exports.find((e) => e.name === p['export']);
      if (exp === undefined) {
        throw new RpcError(INVALID_PARAMS, `invalid params: 'export' names no export: ${JSON.stringify(p['export'])} (see list_exports)`, {
          param: 'export',
        });
      }
      if (m.writes === true && (exp.readOnly || exp.device.caps.readOnly)) {
        const path = exp.device.path ?? exp.device.format;
        throw new BlockError('read-only', `${path}: ${m.name} refused: the image is served read-only`, { path, op: m.name });
      }
    }
    const ctx: MethodContext = { exports: env.exports, exp: exp as RpcExport, limits: env.limits };
    const result = await m.run(ctx, p);
    return reply({ jsonrpc: '2.0', id, result: result === undefined ? null : result });
  } catch (e) {
    if (!(e instanceof RpcError) && !(e instanceof BlockError))
      env.log?.(`${method} failed: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    return reply(errorResponse(id, e));
  }
}

/** Answer one parsed JSON value: a request, a notification or a batch. Null when nothing is to be sent. */
export async function dispatch(msg: unknown, env: DispatchEnv): Promise<RpcResponse | RpcResponse[] | null> {
  if (Array.isArray(msg)) {
    if (msg.length === 0) return errorResponse(null, new RpcError(INVALID_REQUEST, 'invalid request: empty batch'));
    if (msg.length > MAX_BATCH)
      return errorResponse(null, new RpcError(INVALID_REQUEST, `invalid request: batch of ${msg.length} requests (at most ${MAX_BATCH})`));
    const out = await Promise.all(msg.map((m) => runOne(m, env)));
    const replies = out.filter((r): r is RpcResponse => r !== null);
    return replies.length === 0 ? null : replies;
  }
  return runOne(msg, env);
}
