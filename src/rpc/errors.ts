/**
 * JSON-RPC error codes: the spec's five, and the one mapping from a
 * BlockError kind to an application code (-32000 down, in ERROR_KINDS order),
 * with `data` = {kind, context}.
 */
import { BlockError, ERROR_KINDS, type ErrorKind } from '../block/errors.js';

export const PARSE_ERROR = -32700;
export const INVALID_REQUEST = -32600;
export const METHOD_NOT_FOUND = -32601;
export const INVALID_PARAMS = -32602;
export const INTERNAL_ERROR = -32603;

/** io -32000, invalid-argument -32001, out-of-bounds -32002, read-only -32003, ... */
export const KIND_CODES: Readonly<Record<ErrorKind, number>> = Object.fromEntries(ERROR_KINDS.map((k, i) => [k, -32000 - i])) as Record<
  ErrorKind,
  number
>;

export interface RpcErrorObject {
  code: number;
  message: string;
  data?: unknown;
}

/** An error the dispatcher answers with as is (spec codes). */
export class RpcError extends Error {
  constructor(
    readonly code: number,
    message: string,
    readonly data?: unknown,
  ) {
    super(message);
    this.name = 'RpcError';
  }
}

/** Any thrown value as a JSON-RPC error object. */
export function toErrorObject(e: unknown): RpcErrorObject {
  if (e instanceof RpcError)
    return e.data === undefined ? { code: e.code, message: e.message } : { code: e.code, message: e.message, data: e.data };
  if (e instanceof BlockError) return { code: KIND_CODES[e.kind], message: e.message, data: { kind: e.kind, context: e.context } };
  return { code: INTERNAL_ERROR, message: `internal error: ${e instanceof Error ? e.message : String(e)}` };
}
