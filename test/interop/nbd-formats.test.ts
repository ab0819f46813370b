/**
 * Image formats over NBD: a qcow2, VHD or VMDK file served as it is on disk
 * (`nbdkit file dir=DIR`, one export per file) opens as that format, as
 * `qemu-img info nbd://...` does, with `-f raw` giving the export's bytes.
 * What rblock reads, maps and reports over NBD must equal what it and
 * qemu-img get from the local file: sha256 of the guest content, the whole
 * map JSON, format and virtual size. A qcow2's relative backing file is
 * looked up beside it on the same server (qemu-img refuses relative names on
 * NBD with "Cannot generate a base directory"; rblock resolves them like a
 * URL). Writes land inside the clusters the image already has; a write that
 * needs a new cluster fails with no-space (an export cannot grow), and the
 * image stays clean for qemu-img check.
 */
import test, { type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { BlockError } from '../../src/block/errors.js';
import { openImage } from '../../src/formats/registry.js';
import { needTools, rblock, run, scratchDir, sha256File, waitForSocket } from '../helpers/tools.js';

const MiB = 1 << 20;
const T = { timeout: 60000 };

async function serveDir(t: TestContext, dir: string): Promise<string> {
  const sock = join(dir, 'nbdkit.sock');
  const proc = spawn('nbdkit', ['-f', '-U', sock, 'file', `dir=${dir}`], { stdio: 'ignore' });
  t.after(() => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
  });
  await waitForSocket(sock);
  return sock;
}

test('qcow2 (with a backing file), VHD and VMDK files served by nbdkit read as on disk', T, async (t) => {
  if (!needTools(t, 'nbdkit', 'qemu-img', 'qemu-io')) return;
  using s = scratchDir('rblock-nbdfmt-');
  const at = (f: string): string => join(s.dir, f);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', at('base.qcow2'), '8M']);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x41 0 1M', '-c', 'write -z 6M 64k', at('base.qcow2')]);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', at('top.qcow2')]);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 512k 1M', '-c', 'write -P 0x43 5M 100k', at('top.qcow2')]);
  run('qemu-img', ['convert', '-O', 'vpc', at('top.qcow2'), at('v.vhd')]);
  run('qemu-img', ['convert', '-O', 'vmdk', at('top.qcow2'), at('k.vmdk')]);
  const sock = await serveDir(t, s.dir);
  const uri = (name: string): string => `nbd+unix:///${name}?socket=${sock}`;

  for (const [name, format] of [
    ['top.qcow2', 'qcow2'],
    ['v.vhd', 'vpc'],
    ['k.vmdk', 'vmdk'],
  ] as const) {
    const info = JSON.parse(rblock(['info', '--output', 'json', uri(name)]).stdout) as Record<string, unknown>;
    const local = JSON.parse(run('qemu-img', ['info', '--output', 'json', '-f', format, at(name)]).stdout) as Record<string, unknown>;
    assert.equal(info['format'], format, name);
    assert.equal(info['virtual-size'], local['virtual-size'], name);

    const out = at(`${name}.out`);
    const want = at(`${name}.want`);
    assert.equal(rblock(['read', uri(name), '--output', out]).status, 0, name);
    run('qemu-img', ['convert', '-f', format, '-O', 'raw', at(name), want]);
    assert.equal(await sha256File(out), await sha256File(want), `${name}: guest content over NBD`);

    const mapNbd = rblock(['map', '--output', 'json', uri(name)]);
    assert.equal(mapNbd.status, 0, mapNbd.stderr);
    assert.equal(mapNbd.stdout, rblock(['map', '--output', 'json', at(name)]).stdout, `${name}: map over NBD equals the local map`);

    const raw = JSON.parse(rblock(['info', '-f', 'raw', '--output', 'json', uri(name)]).stdout) as Record<string, unknown>;
    assert.equal(raw['format'], 'raw');
    assert.equal(raw['virtual-size'], fileSize(at(name)), `${name}: -f raw gives the file's bytes`);
  }
  const top = JSON.parse(rblock(['info', '--output', 'json', uri('top.qcow2')]).stdout) as Record<string, unknown>;
  assert.equal(top['full-backing-filename'], uri('base.qcow2'), 'the backing file is found beside the image on the server');
});

test('writes into a qcow2 over NBD: inside allocated clusters they land; a new cluster is no-space', T, async (t) => {
  if (!needTools(t, 'nbdkit', 'qemu-img', 'qemu-io')) return;
  using s = scratchDir('rblock-nbdfmt-');
  const img = join(s.dir, 'w.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M']);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x61 0 1M', img]);
  const sock = await serveDir(t, s.dir);
  {
    await using dev = await openImage(`nbd+unix:///w.qcow2?socket=${sock}`, { readOnly: false });
    assert.equal(dev.format, 'qcow2');
    await dev.pwrite(Buffer.alloc(64 * 1024, 0x62), 256 * 1024);
    await assert.rejects(dev.pwrite(Buffer.alloc(4096, 0x63), 4 * MiB), (e: unknown) => e instanceof BlockError && e.kind === 'no-space');
    await dev.flush();
  }
  const io = run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x61 0 256k', '-c', 'read -P 0x62 256k 64k', '-c', 'read -P 0 4M 4k', img]);
  assert.doesNotMatch(io.stdout + io.stderr, /fail|mismatch/i);
  const check = run('qemu-img', ['check', img], { check: false });
  assert.ok(check.status === 0, `qemu-img check: ${check.stdout}${check.stderr}`);
});

function fileSize(p: string): number {
  return Number(run('stat', ['-c', '%s', p]).stdout.trim());
}
