// Bundles the CLI into dist/bundle/ after `tsc` (run by `npm run build`).
//
// Why: node's ESM loader spends about 1 ms per module file (resolve, stat,
// read, compile); the CLI's path for one command touches ~50 of our files,
// which made startup the largest part of short commands (`info`, `check`) and
// a fifth of `read` on 2 GiB (docs/benchmarks.md). One file per command
// (code splitting keeps the lazily loaded commands lazy) cuts that to a few
// ms. npm packages stay external: they load from node_modules as usual.
// The library entry (dist/src/index.js) is tsc's output and is not bundled.
import { build } from 'esbuild';
import { rmSync } from 'node:fs';
import process from 'node:process';
import { URL, fileURLToPath } from 'node:url';

// Paths below are relative to the repository root, wherever this is run from.
const root = fileURLToPath(new URL('..', import.meta.url));
process.chdir(root);

const outdir = 'dist/bundle';
rmSync(outdir, { recursive: true, force: true });
await build({
  absWorkingDir: root,
  // zstd-worker runs in a worker thread, started from zstd-pool by a URL
  // relative to the module that starts it: an entry of its own, named so
  // that the URL still resolves inside dist/bundle/.
  entryPoints: ['src/cli/main.ts', 'src/formats/qcow2/zstd-worker.ts'],
  entryNames: '[name]',
  outdir,
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  // commander is bundled too: as a CommonJS package loaded from ESM it cost
  // more startup (cjs-module-lexer, one file at a time) than all our code.
  // zstd-wasm stays external (it loads its .wasm file beside its own code).
  external: ['@bokuweb/zstd-wasm', 'cli-progress'],
  // Bundled CommonJS calls require() for node's built-ins; ESM has none.
  banner: {
    js: "import { createRequire as __rblockCreateRequire } from 'node:module'; const require = __rblockCreateRequire(import.meta.url);",
  },
  sourcemap: 'linked',
  logLevel: 'warning',
});
