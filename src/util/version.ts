/**
 * rblock's own version, from its package.json. The module runs from tsc's
 * output (dist/src/util/) or from the CLI bundle (dist/bundle/), so the
 * package root is two or three levels up: take the first package.json named
 * rblock.
 */
import { readFileSync } from 'node:fs';

let cached: string | undefined;

export function rblockVersion(): string {
  if (cached !== undefined) return cached;
  cached = 'unknown';
  for (const rel of ['../../package.json', '../../../package.json']) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(rel, import.meta.url), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'rblock' && typeof pkg.version === 'string') {
        cached = pkg.version;
        break;
      }
    } catch {
      // not at this level: try the next
    }
  }
  return cached;
}
