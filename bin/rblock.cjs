#!/usr/bin/env node
// Thin launcher. The CLI is built by `npm ci`/`npm run build` into one
// CommonJS file, dist/bundle/cli.cjs (see scripts/bundle.mjs); tsc's
// unbundled output in dist/src/ is the fallback when only tsc ran.
//
// Startup is most of a short command's time, and compiling the CLI's code
// was a large part of it. So the bundle is compiled here with node:vm and a
// V8 code cache, one per command (each caches what that command compiled),
// kept in dist/cache/ and written after the first run of a command. The
// cache is an optimisation only: a missing, stale (another build or node) or
// unwritable one (a read-only install) just means a normal compile.
//
// The launcher itself is CommonJS: an ES module entry starts node's ESM
// loader, and its `import ... from 'node:fs'` builds an ESM facade of fs that
// touches every lazy getter (loading streams and fs/promises). Both cost
// 10-13 ms of every run (measured: `--version` 62 -> 50 ms, `check` 96 -> 83 ms).
'use strict';
const { mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } = require('node:fs');
const { createRequire } = require('node:module');
const { dirname, join } = require('node:path');
const vm = require('node:vm');

const root = join(__dirname, '..');
const bundle = join(root, 'dist', 'bundle', 'cli.cjs');
const argv = process.argv.slice(2);

let source;
try {
  source = readFileSync(bundle, 'latin1'); // the build makes it ASCII: no UTF-8 decoding
} catch (e) {
  if (e?.code !== 'ENOENT') throw e;
}

async function run() {
  if (source === undefined) {
    const cli = await import('../dist/src/cli/main.js');
    process.exitCode = await cli.main(argv);
  } else {
    // The build id on the bundle's first line (V8 checks a cache only against the source's length).
    const build = /^\/\* rblock-build ([0-9a-f]{16}) \*\//.exec(source)?.[1];
    // The command word, as main.ts finds it; anything odd gets no cache of its own.
    const word = argv.find((a) => !a.startsWith('-')) ?? 'none';
    const command = /^[a-z]{1,16}$/.test(word) ? word : null;
    const cacheFile = build !== undefined && command !== null ? join(root, 'dist', 'cache', `${command}-${build}.v8`) : null;
    let cachedData;
    if (cacheFile !== null) {
      try {
        cachedData = readFileSync(cacheFile);
      } catch {
        // none yet (or unreadable): compile normally
      }
    }
    const script = new vm.Script(`(function (exports, require, module, __filename, __dirname) {${source}\n})`, {
      filename: bundle,
      ...(cachedData !== undefined ? { cachedData } : {}),
    });
    const module = { exports: {} };
    script.runInThisContext()(module.exports, createRequire(bundle), module, bundle, dirname(bundle));
    const cli = module.exports;
    process.exitCode = await cli.main(argv);
    // Cache what this run compiled, for the next run of the same command: only for a real command
    // (or none: help, version), and only when there was no usable cache.
    if (cacheFile !== null && (cachedData === undefined || script.cachedDataRejected) && (word === 'none' || cli.isCommand(word))) {
      const tmp = `${cacheFile}.${process.pid}.tmp`;
      try {
        mkdirSync(dirname(cacheFile), { recursive: true });
        writeFileSync(tmp, script.createCachedData());
        renameSync(tmp, cacheFile); // atomic: a concurrent run reads the old file or the new one, never half of one
      } catch {
        // read-only install, full disk, no directory: run without a cache
        try {
          rmSync(tmp, { force: true });
        } catch {
          // nothing was written
        }
      }
    }
  }
}
run();
