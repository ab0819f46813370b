/**
 * Shared test helpers: finding the real peer tools, running them and the
 * rblock CLI, scratch directories.
 *
 * RBLOCK_REQUIRE_TOOLS=1 (set by .ci/run) turns every "tool missing" skip
 * into a failure, so CI can never pass by skipping.
 */
import { spawnSync, type SpawnSyncOptions } from 'node:child_process';
import { connect } from 'node:net';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { TestContext } from 'node:test';
import { hostIo } from '../../src/block/hostio.js';

/** The repository root (tests run from dist/test/...). */
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
export const RBLOCK = join(ROOT, 'bin', 'rblock.cjs');
/** ../shared beside the checkout (CI has it; a bare clone may not). */
export const SHARED = resolve(ROOT, '..', 'shared');

export const REQUIRE_TOOLS = process.env['RBLOCK_REQUIRE_TOOLS'] === '1';

export function hasTool(name: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' }).status === 0;
}

/**
 * True when all tools are present. Otherwise skips the test with a visible
 * message, or throws when RBLOCK_REQUIRE_TOOLS=1.
 */
export function needTools(t: TestContext, ...names: string[]): boolean {
  const missing = names.filter((n) => !hasTool(n));
  if (missing.length === 0) return true;
  const msg = `missing tool(s): ${missing.join(', ')}`;
  if (REQUIRE_TOOLS) throw new Error(`${msg} (RBLOCK_REQUIRE_TOOLS=1 forbids skipping)`);
  t.skip(msg);
  return false;
}

/**
 * The native helper (dist/native/rblock-hostio.node, scripts/build-native.mjs)
 * is built; else skip with `what` it is needed for (a failure under
 * RBLOCK_REQUIRE_TOOLS=1).
 */
export function needNative(t: TestContext, what: string): boolean {
  if (hostIo !== null) return true;
  const msg = `native helper not built (dist/native/rblock-hostio.node, see scripts/build-native.mjs): ${what}`;
  if (REQUIRE_TOOLS) throw new Error(`${msg} (RBLOCK_REQUIRE_TOOLS=1 forbids skipping)`);
  t.skip(msg);
  return false;
}

/** Same as needTools, for data that lives in ../shared. */
export function needShared(t: TestContext, rel: string): string | null {
  const p = join(SHARED, rel);
  if (existsSync(p)) return p;
  const msg = `${p} not present: skipping (clone without ../shared)`;
  if (REQUIRE_TOOLS) throw new Error(`${msg}; RBLOCK_REQUIRE_TOOLS=1 forbids skipping`);
  t.skip(msg);
  return null;
}

export interface RunResult {
  status: number;
  stdout: string;
  stderr: string;
}

/** Run a command; throws with its stderr when it fails and `check` is set (default). */
export function run(cmd: string, args: string[], opts: SpawnSyncOptions & { check?: boolean } = {}): RunResult {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 256 << 20, ...opts });
  const res = { status: r.status ?? -1, stdout: String(r.stdout ?? ''), stderr: String(r.stderr ?? '') };
  if ((opts.check ?? true) && res.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} exited ${res.status}: ${res.stderr.trim()}`);
  }
  return res;
}

/** Run the rblock CLI (bin/rblock.cjs) as a user would; never throws on exit status. */
export function rblock(args: string[], opts: SpawnSyncOptions = {}): RunResult {
  return run(process.execPath, [RBLOCK, ...args], { ...opts, check: false });
}

export function scratchDir(prefix = 'rblock-test-'): { dir: string; [Symbol.dispose](): void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, [Symbol.dispose]: () => rmSync(dir, { recursive: true, force: true }) };
}

export function sha256File(path: string): Promise<string> {
  return new Promise((res, rej) => {
    const h = createHash('sha256');
    createReadStream(path)
      .on('data', (d) => h.update(d))
      .on('end', () => res(h.digest('hex')))
      .on('error', rej);
  });
}

/** Resolves once something accepts connections on this Unix socket (a server started in the background). */
export async function waitForSocket(path: string, ms = 10000): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect(path);
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on ${path}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
