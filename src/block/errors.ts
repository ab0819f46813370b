/**
 * The one error type of rblock. Every failure carries a small, closed set of
 * kinds so that each boundary (CLI exit code, NBD errno, JSON-RPC code) needs
 * exactly one mapping table, and a context that names the file and structure.
 */
export type ErrorKind =
  | 'io'
  | 'invalid-argument'
  | 'out-of-bounds'
  | 'read-only'
  | 'no-space'
  | 'not-supported'
  | 'invalid-image'
  | 'corrupt-image'
  | 'unsupported-feature'
  | 'not-found'
  | 'protocol';

export const ERROR_KINDS: readonly ErrorKind[] = [
  'io',
  'invalid-argument',
  'out-of-bounds',
  'read-only',
  'no-space',
  'not-supported',
  'invalid-image',
  'corrupt-image',
  'unsupported-feature',
  'not-found',
  'protocol',
];

export interface ErrorContext {
  /** The image or file the error is about. */
  path?: string;
  /** The on-disk structure, e.g. "qcow2 header", "L2 table". */
  structure?: string;
  /** The field inside the structure, e.g. "l1_size". */
  field?: string;
  /** A byte offset: in the file for structures, in the guest for I/O. */
  offset?: number;
  /** The operation that failed: read, write, open, ... */
  op?: string;
}

export class BlockError extends Error {
  readonly kind: ErrorKind;
  readonly context: ErrorContext;

  constructor(kind: ErrorKind, message: string, context: ErrorContext = {}, cause?: unknown) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'BlockError';
    this.kind = kind;
    this.context = context;
  }

  /** Same error with more context filled in (fields already set win). */
  withContext(extra: ErrorContext): BlockError {
    const e = new BlockError(this.kind, this.message, { ...extra, ...this.context }, this.cause);
    e.stack = this.stack;
    return e;
  }
}

export function isBlockError(e: unknown, kind?: ErrorKind): e is BlockError {
  return e instanceof BlockError && (kind === undefined || e.kind === kind);
}

/** Turn a Node system error (ENOENT, EACCES, ...) into a BlockError naming the file. */
export function fromSystemError(e: unknown, path: string, op: string): BlockError {
  if (e instanceof BlockError) return e.withContext({ path, op });
  const err = e as NodeJS.ErrnoException;
  const code = err?.code;
  if (code === 'ENOENT') return new BlockError('not-found', `${path}: no such file`, { path, op }, e);
  if (code === 'EACCES' || code === 'EPERM') return new BlockError('read-only', `${path}: permission denied`, { path, op }, e);
  if (code === 'ENOSPC') return new BlockError('no-space', `${path}: no space left on device`, { path, op }, e);
  if (code === 'EISDIR') return new BlockError('invalid-argument', `${path}: is a directory`, { path, op }, e);
  const msg = err instanceof Error ? err.message : String(e);
  return new BlockError('io', `${path}: ${op} failed: ${msg}`, { path, op }, e);
}
