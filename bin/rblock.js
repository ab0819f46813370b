#!/usr/bin/env node
// Thin launcher. The CLI is built by `npm ci`/`npm run build` into
// dist/bundle/ (one file per command: fast startup, see scripts/bundle.mjs);
// tsc's unbundled output in dist/src/ is the fallback when only tsc ran.
let cli;
try {
  cli = await import('../dist/bundle/main.js');
} catch (e) {
  if (e?.code !== 'ERR_MODULE_NOT_FOUND' || !String(e.message).includes('dist/bundle/main.js')) throw e;
  cli = await import('../dist/src/cli/main.js');
}
process.exitCode = await cli.main(process.argv.slice(2));
