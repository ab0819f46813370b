// Builds native/hostio.c (lseek with SEEK_DATA/SEEK_HOLE, preadv2 with RWF_NOWAIT) into
// dist/native/rblock-hostio.node with the machine's C compiler against node's
// own headers: nothing is downloaded. Optional by design: when there is no
// compiler or no headers this prints why and exits 0, and rblock falls back
// to reporting raw files as all data (src/block/hostio.ts). CI sets
// RBLOCK_REQUIRE_TOOLS=1, under which a test fails if the helper is missing.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import console from 'node:console';
import process from 'node:process';
import { URL, fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const out = join(root, 'dist', 'native', 'rblock-hostio.node');

function nodeIncludeDir() {
  const candidates = [];
  try {
    const nodedir = execFileSync('npm', ['config', 'get', 'nodedir'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    if (nodedir && nodedir !== 'undefined' && nodedir !== 'null') candidates.push(join(nodedir, 'include', 'node'));
  } catch {
    // npm not on PATH: try the prefix node runs from
  }
  candidates.push(join(dirname(dirname(process.execPath)), 'include', 'node'), '/usr/include/node', '/usr/local/include/node');
  return candidates.find((d) => existsSync(join(d, 'node_api.h')));
}

const include = nodeIncludeDir();
if (include === undefined) {
  console.warn('rblock: node_api.h not found: raw files will report all data (no SEEK_DATA helper)');
  process.exit(0);
}
mkdirSync(dirname(out), { recursive: true });
for (const cc of [process.env.CC, 'cc', 'gcc', 'clang'].filter(Boolean)) {
  try {
    execFileSync(cc, ['-O2', '-shared', '-fPIC', '-Wall', '-I', include, '-o', out, join(root, 'native', 'hostio.c')], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    process.exit(0);
  } catch {
    // next compiler
  }
}
console.warn('rblock: could not compile native/hostio.c: raw files will report all data (no SEEK_DATA helper)');
