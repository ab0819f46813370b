/** The CLI's one mapping from errors to an exit code and a one-line message. */
import { BlockError, fromSystemError } from '../block/errors.js';

/** Every failure exits 1 (qemu-img's convention); `check` has its own codes. */
export const EXIT_ERROR = 1;

export function errorLine(e: unknown): string {
  if (e instanceof BlockError) return e.message;
  if (e instanceof Error && 'code' in e && typeof (e as NodeJS.ErrnoException).path === 'string') {
    return fromSystemError(e, (e as NodeJS.ErrnoException).path as string, 'open').message;
  }
  return e instanceof Error ? e.message : String(e);
}

export function reportError(e: unknown, debug: boolean, stderr: (s: string) => void): number {
  stderr(`rblock: ${errorLine(e).split('\n')[0]}\n`);
  if (debug && e instanceof Error && e.stack) stderr(`${e.stack}\n`);
  return EXIT_ERROR;
}
