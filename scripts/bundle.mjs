// Bundles the CLI into dist/bundle/ after `tsc` (run by `npm run build`).
//
// Why: startup is most of a short command's time (`info`, `check`, even
// `check` of an 8 GiB image). node's ESM loader spends about 1 ms per module
// file, and compiling our code and commander's was ~20-40 ms of every run.
// So the CLI is one CommonJS file, dist/bundle/cli.cjs, which bin/rblock.cjs
// compiles with node:vm and a V8 code cache (see there): a cached run skips
// the compile of everything the command used the first time. The lazily
// loaded commands stay lazy inside the file (esbuild runs a module's top
// level only when its dynamic import() is reached; V8 compiles functions
// only when first called). npm packages stay external but commander, whose
// CommonJS files cost more startup than all our code when loaded one by one.
// The library entry (dist/src/index.js) is tsc's output and is not bundled.
import { build } from 'esbuild';
import { createHash } from 'node:crypto';
import { rmSync, writeFileSync, mkdirSync } from 'node:fs';
import process from 'node:process';
import { URL, fileURLToPath } from 'node:url';

// Paths below are relative to the repository root, wherever this is run from.
const root = fileURLToPath(new URL('..', import.meta.url));
process.chdir(root);

const outdir = 'dist/bundle';
rmSync(outdir, { recursive: true, force: true });
// Code caches written by bin/rblock.cjs at run time belong to the bundle they were made from.
rmSync('dist/cache', { recursive: true, force: true });

// The first line of cli.cjs names the build: bin/rblock.cjs keys its code caches on it (V8 itself
// only checks a cache against the source's length). Filled in below, in place: same length, so
// the source map's lines and columns still hold.
const BUILD_ID_PLACEHOLDER = '0'.repeat(16);

const common = {
  absWorkingDir: root,
  bundle: true,
  platform: 'node',
  target: 'node20',
  // commander is bundled too; zstd-wasm loads its .wasm file beside its own code, cli-progress only for -p.
  external: ['@bokuweb/zstd-wasm', 'cli-progress'],
  sourcemap: 'linked',
  logLevel: 'warning',
};

// commander requires node:child_process (for executable subcommands, which rblock has none of) at
// load time, and with it net, dgram and their bindings: ~15 built-in modules on every run. Its
// copy loads the real module on first use instead.
const lazyChildProcess = {
  name: 'lazy-child-process',
  setup(b) {
    b.onResolve({ filter: /^(node:)?child_process$/ }, (args) =>
      /[\\/]node_modules[\\/]commander[\\/]/.test(args.importer) ? { path: 'child_process', namespace: 'rblock-lazy' } : undefined,
    );
    b.onLoad({ filter: /.*/, namespace: 'rblock-lazy' }, () => ({
      contents: "let cp; module.exports = new Proxy({}, { get: (_t, k) => (cp ??= require('node:child_process'))[k] });",
      loader: 'js',
    }));
  },
};

const cli = await build({
  ...common,
  entryPoints: ['src/cli/main.ts'],
  outfile: `${outdir}/cli.cjs`,
  plugins: [lazyChildProcess],
  format: 'cjs',
  // import.meta has no CommonJS equivalent: our modules use import.meta.url to find package.json,
  // the native helper and the zstd worker, all relative to this file, as they were for the ESM bundle.
  inject: ['scripts/import-meta-url.mjs'],
  define: { 'import.meta.url': 'importMetaUrl' },
  // No import() in the bundle: a script compiled by node:vm cannot run one without an experimental
  // flag or warning. The one external import() (zstd-wasm, whose main is CommonJS) becomes a require.
  supported: { 'dynamic-import': false },
  // A comment only: "use strict" must stay the first statement.
  banner: { js: `/* rblock-build ${BUILD_ID_PLACEHOLDER} */` },
  write: false,
});
mkdirSync(outdir, { recursive: true });
for (const f of cli.outputFiles) {
  let text = f.text;
  if (f.path.endsWith('.cjs')) {
    // ASCII only, so that bin/rblock.cjs can read it as latin1 (a plain copy, ~2 ms less than
    // decoding UTF-8). esbuild escapes non-ASCII in code (its default charset); what is left is in
    // comments (a '§'): one '?' per UTF-16 unit keeps every column of the source map.
    text = text.replace(/[\u0080-\uffff]/g, '?');
    const id = createHash('sha256').update(text).digest('hex').slice(0, BUILD_ID_PLACEHOLDER.length);
    text = text.replace(BUILD_ID_PLACEHOLDER, id);
  }
  writeFileSync(f.path, text);
}

// zstd-worker runs in a worker thread, started from zstd-pool by a URL
// relative to cli.cjs: an ESM entry of its own beside it.
await build({
  ...common,
  entryPoints: ['src/formats/qcow2/zstd-worker.ts'],
  outfile: `${outdir}/zstd-worker.js`,
  format: 'esm',
  // Bundled CommonJS calls require() for node's built-ins; ESM has none.
  banner: {
    js: "import { createRequire as __rblockCreateRequire } from 'node:module'; const require = __rblockCreateRequire(import.meta.url);",
  },
});
