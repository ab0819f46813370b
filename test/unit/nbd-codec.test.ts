/**
 * The NBD codec (every message both ways), the pure pieces of the server
 * (errno table, flags, contexts, allocation depth), and the server itself in
 * process over a Unix socket with the tiny client: handshake rules, request
 * validation with the protocol's errno values, simple/structured/extended
 * replies. No external tools needed; test/interop/nbd-server.test.ts drives
 * the real peers.
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import type { BlockDevice, Extent } from '../../src/block/device.js';
import { ERROR_KINDS } from '../../src/block/errors.js';
import { GenericDevice, type Driver } from '../../src/block/generic.js';
import { memoryDevice } from '../../src/block/memory.js';
import { isZero } from '../../src/block/zero.js';
import {
  OptionDataError,
  decodeChunkPayload,
  decodeInfoReply,
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  decodeOptionReplyHeader,
  decodeRepMetaContext,
  decodeRepServer,
  decodeReplyHeader,
  decodeRequest,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHole,
  encodeOption,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
  encodeRequest,
  encodeSimpleReply,
  type ChunkPayload,
} from '../../src/nbd/codec.js';
import { ExportTable, matchContexts, transmissionFlags } from '../../src/nbd/exports.js';
import { Chunk, Cmd, CmdFlag, Errno, Info, Opt, REPLY_FLAG_DONE, Rep, TFlag } from '../../src/nbd/protocol.js';
import { NbdServer } from '../../src/nbd/server.js';
import { ERRNO_OF_KIND, allocationDepth } from '../../src/nbd/transmission.js';
import { TinyClient } from '../helpers/nbd-tiny-client.js';
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { openImage } from '../../src/formats/registry.js';
import { pseudoRandom } from '../helpers/rng.js';
import { needNative, scratchDir } from '../helpers/tools.js';

const T = { timeout: 10000 };

// ------------------------------------------------------------------ codec

test('codec: option request and reply round-trip', () => {
  const o = encodeOption(Opt.GO, Buffer.from('abc'));
  assert.deepEqual(decodeOptionHeader(o.subarray(0, 16)), { option: Opt.GO, length: 3 });
  assert.equal(o.subarray(16).toString(), 'abc');
  const r = encodeOptionReply(Opt.LIST, Rep.ERR_UNSUP, Buffer.from('no'));
  assert.deepEqual(decodeOptionReplyHeader(r), { option: Opt.LIST, type: Rep.ERR_UNSUP, length: 2 });
  const bad = Buffer.from(o);
  bad[0] = 0;
  assert.throws(() => decodeOptionHeader(bad), { name: 'BlockError', message: /IHAVEOPT/ });
});

test('codec: INFO/GO data, including malformed lengths', () => {
  const d = encodeInfoRequest('disk', [Info.NAME, Info.BLOCK_SIZE]);
  assert.deepEqual(decodeInfoRequest(d), { name: 'disk', infos: [Info.NAME, Info.BLOCK_SIZE] });
  assert.deepEqual(decodeInfoRequest(encodeInfoRequest('')), { name: '', infos: [] });
  // Name length past the data, truncated request list, trailing bytes, NUL in name.
  const long = Buffer.from(d);
  long.writeUInt32BE(100, 0);
  assert.throws(() => decodeInfoRequest(long), OptionDataError);
  assert.throws(() => decodeInfoRequest(d.subarray(0, d.length - 1)), OptionDataError);
  assert.throws(() => decodeInfoRequest(Buffer.concat([d, Buffer.from([0])])), OptionDataError);
  assert.throws(() => decodeInfoRequest(encodeInfoRequest('a\0b')), /NUL/);
  assert.throws(() => decodeInfoRequest(Buffer.from([0, 0])), OptionDataError);
});

test('codec: meta context data, including malformed lengths', () => {
  const d = encodeMetaContextRequest('x', ['base:allocation', 'qemu:']);
  assert.deepEqual(decodeMetaContextRequest(d), { exportName: 'x', queries: ['base:allocation', 'qemu:'] });
  assert.deepEqual(decodeMetaContextRequest(encodeMetaContextRequest('', [])), { exportName: '', queries: [] });
  const over = Buffer.from(d);
  over.writeUInt32BE(1000, 9); // first query length
  assert.throws(() => decodeMetaContextRequest(over), /runs past/);
  const many = Buffer.from(d);
  many.writeUInt32BE(3, 5); // says 3 queries, has 2
  assert.throws(() => decodeMetaContextRequest(many), OptionDataError);
  assert.throws(() => decodeMetaContextRequest(Buffer.concat([d, Buffer.from([1])])), /after the last query/);
});

test('codec: option reply payloads', () => {
  assert.deepEqual(decodeRepServer(encodeRepServer('disk', 'my disk')), { name: 'disk', description: 'my disk' });
  assert.deepEqual(decodeRepMetaContext(encodeRepMetaContext(7, 'base:allocation')), { id: 7, name: 'base:allocation' });
  assert.deepEqual(decodeInfoReply(encodeInfoExport(1 << 30, 0x0ced)), { type: Info.EXPORT, size: 1n << 30n, flags: 0x0ced });
  assert.deepEqual(decodeInfoReply(encodeInfoBlockSize(1, 4096, 32 << 20)), {
    type: Info.BLOCK_SIZE,
    minimum: 1,
    preferred: 4096,
    maximum: 32 << 20,
  });
  assert.deepEqual(decodeInfoReply(Buffer.from([0, 9, 1])), { type: 9 });
});

test('codec: compact and extended requests', () => {
  const r = { flags: CmdFlag.FUA, type: Cmd.WRITE, cookie: 0x1122334455667788n, offset: 1n << 40n, length: 4096n };
  const c = encodeRequest(r, false);
  assert.equal(c.length, 28);
  assert.deepEqual(decodeRequest(c, false), r);
  const big = { ...r, length: 1n << 33n };
  const e = encodeRequest(big, true);
  assert.equal(e.length, 32);
  assert.deepEqual(decodeRequest(e, true), big);
  assert.throws(() => decodeRequest(e, false), /bad request magic|extended request header/);
  assert.throws(() => decodeRequest(c.subarray(0, 28), true) /* compact magic in extended mode */, /compact request header/);
  assert.throws(() => decodeRequest(Buffer.alloc(28, 0xee), false), /bad request magic 0xeeeeeeee/);
});

test('codec: simple, structured and extended reply headers and chunks', () => {
  const s = decodeReplyHeader(encodeSimpleReply(Errno.EPERM, 5n));
  assert.deepEqual(s, { kind: 'simple', error: 1, cookie: 5n });

  for (const extended of [false, true]) {
    const h = encodeOffsetDataHeader(extended, 0, 9n, 4096n, 8192, 100);
    const hd = decodeReplyHeader(h);
    if (hd.kind === 'simple') throw new Error('unreachable');
    assert.equal(hd.kind, extended ? 'extended' : 'structured');
    assert.equal(hd.type, Chunk.OFFSET_DATA);
    assert.equal(hd.length, 108);
    assert.equal(hd.offset, extended ? 4096n : 0n);
    const payload = Buffer.concat([h.subarray(h.length - 8), Buffer.alloc(100, 7)]);
    const c = decodeChunkPayload(Chunk.OFFSET_DATA, payload) as Extract<ChunkPayload, { data: Uint8Array }>;
    assert.equal(c.offset, 8192n);
    assert.equal(c.data.length, 100);

    const hole = encodeOffsetHole(extended, REPLY_FLAG_DONE, 9n, 0n, 512, 65536);
    const holeHeader = decodeReplyHeader(hole);
    const hs = hole.length - 12;
    assert.deepEqual(decodeChunkPayload(Chunk.OFFSET_HOLE, hole.subarray(hs)), { type: Chunk.OFFSET_HOLE, offset: 512n, length: 65536 });
    assert.equal(holeHeader.kind === 'simple' ? 0 : holeHeader.flags, REPLY_FLAG_DONE);

    const err = encodeErrorChunk(extended, REPLY_FLAG_DONE, 3n, 0n, Errno.EINVAL, 'bad thing', 4096);
    const eh = decodeReplyHeader(err);
    if (eh.kind === 'simple') throw new Error('unreachable');
    assert.equal(eh.type, Chunk.ERROR_OFFSET);
    assert.deepEqual(decodeChunkPayload(eh.type, err.subarray(err.length - eh.length)), {
      type: Chunk.ERROR_OFFSET,
      error: Errno.EINVAL,
      message: 'bad thing',
      errorOffset: 4096n,
    });
    // Long messages are cut, never overflow the u16 length.
    const long = encodeErrorChunk(extended, REPLY_FLAG_DONE, 3n, 0n, Errno.EIO, 'é'.repeat(5000));
    const lh = decodeReplyHeader(long);
    if (lh.kind === 'simple') throw new Error('unreachable');
    const lp = decodeChunkPayload(lh.type, long.subarray(long.length - lh.length)) as { message: string };
    assert.ok(lp.message.length > 100 && lp.message.length <= 1024 && /^é+$/.test(lp.message));

    const none = encodeNoneChunk(extended, REPLY_FLAG_DONE, 1n, 0n);
    assert.equal(none.length, extended ? 32 : 20);

    const desc = [
      { length: 65536, status: 0 },
      { length: 512, status: 3 },
    ];
    const bs = encodeBlockStatusChunk(extended, REPLY_FLAG_DONE, 1n, 0n, 1, desc);
    const bh = decodeReplyHeader(bs);
    if (bh.kind === 'simple') throw new Error('unreachable');
    assert.equal(bh.type, extended ? Chunk.BLOCK_STATUS_EXT : Chunk.BLOCK_STATUS);
    assert.deepEqual(decodeChunkPayload(bh.type, bs.subarray(bs.length - bh.length)), { type: bh.type, contextId: 1, descriptors: desc });
  }
  assert.throws(() => decodeReplyHeader(Buffer.alloc(16)), /bad reply magic/);
});

// ------------------------------------------------------- pure server parts

test('errno table covers every BlockError kind with a protocol errno', () => {
  const allowed = new Set<number>(Object.values(Errno));
  for (const k of ERROR_KINDS) assert.ok(allowed.has(ERRNO_OF_KIND[k]), k);
  assert.equal(ERRNO_OF_KIND['read-only'], Errno.EPERM);
  assert.equal(ERRNO_OF_KIND['no-space'], Errno.ENOSPC);
  assert.equal(ERRNO_OF_KIND['io'], Errno.EIO);
});

test('meta contexts: full names on SET, namespace wildcards on LIST only', () => {
  assert.deepEqual(
    matchContexts('base:allocation', false).map((c) => c.name),
    ['base:allocation'],
  );
  assert.deepEqual(matchContexts('base:', false), []);
  assert.deepEqual(
    matchContexts('base:', true).map((c) => c.name),
    ['base:allocation'],
  );
  assert.deepEqual(
    matchContexts('qemu:', true).map((c) => c.name),
    ['qemu:allocation-depth'],
  );
  assert.deepEqual(matchContexts('qemu:dirty-bitmap:x', true), []);
  assert.deepEqual(matchContexts('nosuch:thing', true), []);
});

test('transmission flags: read-only vs writable, DF only with structured replies, multi-conn whenever shared', () => {
  const dev = memoryDevice(4096);
  const rw = new ExportTable([{ name: '', device: dev }], 4).list[0]!;
  const ro = new ExportTable([{ name: '', device: dev, readOnly: true }], 4).list[0]!;
  const ro1 = new ExportTable([{ name: '', device: dev, readOnly: true }], 1).list[0]!;
  const rw1 = new ExportTable([{ name: '', device: dev }], 1).list[0]!;
  const f = transmissionFlags(rw, 'simple');
  assert.equal(f & TFlag.READ_ONLY, 0);
  assert.equal(f & TFlag.SEND_DF, 0);
  assert.ok(f & TFlag.SEND_WRITE_ZEROES && f & TFlag.SEND_FAST_ZERO && f & TFlag.SEND_TRIM);
  // One device object serves every connection: a flush covers all their writes, so writable exports get multi-conn too.
  assert.ok(f & TFlag.CAN_MULTI_CONN);
  assert.equal(transmissionFlags(rw1, 'simple') & TFlag.CAN_MULTI_CONN, 0);
  assert.ok(transmissionFlags(rw, 'structured') & TFlag.SEND_DF);
  const g = transmissionFlags(ro, 'structured');
  assert.ok(g & TFlag.READ_ONLY && g & TFlag.CAN_MULTI_CONN);
  assert.equal(g & (TFlag.SEND_TRIM | TFlag.SEND_WRITE_ZEROES | TFlag.SEND_FAST_ZERO), 0);
  assert.equal(transmissionFlags(ro1, 'structured') & TFlag.CAN_MULTI_CONN, 0);
});

test('allocation depth follows qemu: 0 absent, 1 top, past a short backing file = that file', () => {
  const top = memoryDevice(1);
  const base = memoryDevice(1);
  const chain2: BlockDevice[] = [top, base];
  const e = (x: Partial<Extent>): Extent => ({ offset: 0, length: 512, zero: false, hole: false, ...x });
  assert.equal(allocationDepth(e({ depth: 0 }), chain2), 1);
  assert.equal(allocationDepth(e({ depth: 1 }), chain2), 2);
  assert.equal(allocationDepth(e({ zero: true, hole: true, allocated: true, depth: 0 }), chain2), 1);
  // Unallocated down to the base (which has no backing): absent.
  assert.equal(allocationDepth(e({ zero: true, hole: true, allocated: false, depth: 1 }), chain2), 0);
  // Unallocated in the top, past the end of the (shorter) base: qemu says the base.
  assert.equal(allocationDepth(e({ zero: true, hole: true, allocated: false, depth: 0 }), chain2), 2);
  assert.equal(allocationDepth(e({ zero: true, hole: true, allocated: false, depth: 0 }), [top]), 0);
});

// --------------------------------------------------- the server in process

/** A memory device whose block status reports 64 KiB blocks of zeros as holes. */
function sparseDevice(data: Uint8Array): BlockDevice {
  const driver: Driver = {
    format: 'sparse-memory',
    size: data.length,
    readOnly: false,
    caps: { zero: false, blockStatus: true },
    async pread(buf, offset) {
      buf.set(data.subarray(offset, offset + buf.length));
    },
    async pwrite(buf, offset) {
      data.set(buf, offset);
    },
    async blockStatus(offset, length) {
      const out: Extent[] = [];
      for (let pos = offset; pos < offset + length;) {
        const end = Math.min(offset + length, (Math.floor(pos / 65536) + 1) * 65536);
        const z = isZero(data.subarray(pos, end));
        out.push({ offset: pos, length: end - pos, zero: z, hole: z, allocated: !z, depth: 0 });
        pos = end;
      }
      return out;
    },
    async close() {},
  };
  return new GenericDevice(driver);
}

async function withServer(
  devices: Array<{ name: string; device: BlockDevice; readOnly?: boolean; description?: string }>,
  body: (sock: string, server: NbdServer) => Promise<void>,
): Promise<void> {
  using s = scratchDir('rblock-nbd-');
  const sock = join(s.dir, 'nbd.sock');
  const logs: string[] = [];
  const server = new NbdServer({ exports: devices, maxConnections: 4, log: (m) => logs.push(m) });
  await server.listen({ path: sock });
  try {
    await body(sock, server);
  } finally {
    await server.close();
  }
}

async function go(c: TinyClient, name = '', opts: { structured?: boolean; extended?: boolean; contexts?: string[] } = {}): Promise<number> {
  await c.start();
  if (opts.extended) assert.equal((await c.negotiateExtended()).at(-1)?.type, Rep.ACK);
  else if (opts.structured) assert.equal((await c.option(Opt.STRUCTURED_REPLY)).at(-1)?.type, Rep.ACK);
  if (opts.contexts !== undefined) {
    const r = await c.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest(name, opts.contexts));
    assert.equal(r.at(-1)?.type, Rep.ACK);
  }
  const r = await c.option(Opt.GO, encodeInfoRequest(name, [Info.NAME]));
  assert.equal(r.at(-1)?.type, Rep.ACK, `GO failed: ${r.at(-1)?.data.toString()}`);
  for (const x of r) {
    if (x.type !== Rep.INFO) continue;
    const info = decodeInfoReply(x.data);
    if ('flags' in info) return info.flags;
  }
  throw new Error('no NBD_INFO_EXPORT before ACK');
}

test('handshake: greeting, unknown option, STARTTLS, data on LIST, LIST, INFO of unknown export, ABORT', T, async () => {
  const dev = memoryDevice(1 << 20);
  await withServer(
    [
      { name: 'a', device: dev, description: 'first' },
      { name: 'b', device: dev },
    ],
    async (sock) => {
      const c = await TinyClient.connect(sock);
      assert.equal(await c.start(), 0x3);
      const unk = await c.option(99);
      assert.equal(unk[0]!.type, Rep.ERR_UNSUP);
      assert.match(unk[0]!.data.toString(), /unsupported option 99/);
      assert.equal((await c.option(Opt.STARTTLS))[0]!.type, Rep.ERR_POLICY);
      assert.equal((await c.option(Opt.LIST, Buffer.from('x')))[0]!.type, Rep.ERR_INVALID);
      const list = await c.option(Opt.LIST);
      assert.deepEqual(
        list.filter((r) => r.type === Rep.SERVER).map((r) => decodeRepServer(r.data)),
        [
          { name: 'a', description: 'first' },
          { name: 'b', description: '' },
        ],
      );
      assert.equal((await c.option(Opt.INFO, encodeInfoRequest('nosuch')))[0]!.type, Rep.ERR_UNKNOWN);
      assert.equal((await c.option(Opt.INFO, Buffer.from([0, 0, 0, 9])))[0]!.type, Rep.ERR_INVALID);
      // SET_META_CONTEXT needs structured replies first.
      assert.equal((await c.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest('a', ['base:allocation'])))[0]!.type, Rep.ERR_INVALID);
      const info = await c.option(Opt.INFO, encodeInfoRequest('a', [Info.NAME, Info.DESCRIPTION]));
      const infos = info.filter((r) => r.type === Rep.INFO).map((r) => decodeInfoReply(r.data));
      assert.deepEqual(
        infos.map((i) => i.type),
        [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE, Info.EXPORT],
      );
      assert.deepEqual(infos[1], { type: Info.DESCRIPTION, description: 'first' });
      assert.equal((await c.option(Opt.ABORT))[0]!.type, Rep.ACK);
      await c.closed();
    },
  );
});

test('handshake: bad client flags and non-NBD bytes drop the client; LIST_META_CONTEXT lists both contexts', T, async () => {
  await withServer([{ name: '', device: memoryDevice(65536) }], async (sock) => {
    const bad = await TinyClient.connect(sock);
    await bad.start(0x1 | 0x80);
    await bad.closed();
    const junk = await TinyClient.connect(sock);
    await junk.start();
    await junk.writer.send([Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')]);
    await junk.closed();
    const c = await TinyClient.connect(sock);
    await c.start();
    await c.option(Opt.STRUCTURED_REPLY);
    const r = await c.option(Opt.LIST_META_CONTEXT, encodeMetaContextRequest('', []));
    assert.deepEqual(
      r.filter((x) => x.type === Rep.META_CONTEXT).map((x) => decodeRepMetaContext(x.data).name),
      ['base:allocation', 'qemu:allocation-depth'],
    );
    assert.equal((await c.option(Opt.STRUCTURED_REPLY))[0]!.type, Rep.ERR_INVALID);
    c.destroy();
  });
});

test('transmission, simple replies: read, write, errno values for bad requests', T, async () => {
  const data = new Uint8Array(1 << 20);
  data.fill(0xab, 0, 4096);
  await withServer([{ name: '', device: sparseDevice(data) }], async (sock) => {
    const c = await TinyClient.connect(sock);
    const flags = await go(c);
    assert.equal(flags & TFlag.SEND_DF, 0);
    const cookie = await c.send({ type: Cmd.READ, offset: 0n, length: 8192n });
    const r = await c.reply(8192);
    assert.deepEqual(r.header, { kind: 'simple', error: 0, cookie });
    assert.equal(r.data[0], 0xab);
    assert.equal(r.data[8191], 0);

    await c.send({ type: Cmd.WRITE, offset: 4096n, length: 4n }, Buffer.from([1, 2, 3, 4]));
    assert.deepEqual((await c.reply()).header, { kind: 'simple', error: 0, cookie: 2n });
    assert.deepEqual([...data.subarray(4096, 4100)], [1, 2, 3, 4]);

    const cases: Array<[string, Parameters<TinyClient['send']>[0], number, Buffer?]> = [
      ['read past the end', { type: Cmd.READ, offset: BigInt(1 << 20), length: 1n }, Errno.EINVAL],
      ['write past the end', { type: Cmd.WRITE, offset: BigInt((1 << 20) - 2), length: 4n }, Errno.ENOSPC, Buffer.alloc(4)],
      ['zero-length read', { type: Cmd.READ, offset: 0n, length: 0n }, Errno.EINVAL],
      ['read over 32 MiB', { type: Cmd.READ, offset: 0n, length: BigInt(64 << 20) }, Errno.EOVERFLOW],
      ['unknown command', { type: 42, offset: 0n, length: 512n }, Errno.EINVAL],
      ['DF without structured replies', { type: Cmd.READ, flags: CmdFlag.DF, offset: 0n, length: 512n }, Errno.EINVAL],
      ['unknown flag', { type: Cmd.WRITE_ZEROES, flags: 0x80, offset: 0n, length: 512n }, Errno.EINVAL],
      ['block status without contexts', { type: Cmd.BLOCK_STATUS, offset: 0n, length: 512n }, Errno.EINVAL],
      [
        'fast zero on a device without efficient zeroing',
        { type: Cmd.WRITE_ZEROES, flags: CmdFlag.FAST_ZERO, offset: 0n, length: 512n },
        Errno.ENOTSUP,
      ],
      ['flush with a length', { type: Cmd.FLUSH, offset: 0n, length: 1n }, Errno.EINVAL],
    ];
    for (const [what, req, errno, payload] of cases) {
      const ck = await c.send(req, payload);
      const rep = await c.reply();
      assert.deepEqual(rep.header, { kind: 'simple', error: errno, cookie: ck }, what);
    }
    // The connection is still in sync: a good read after the refusals.
    await c.send({ type: Cmd.READ, offset: 4096n, length: 4n });
    assert.deepEqual([...(await c.reply(4)).data], [1, 2, 3, 4]);
    await c.send({ type: Cmd.DISC });
    await c.closed();
  });
});

test('transmission: read-only export answers EPERM to every write command', T, async () => {
  await withServer([{ name: '', device: memoryDevice(65536), readOnly: true }], async (sock) => {
    const c = await TinyClient.connect(sock);
    const flags = await go(c, '', { structured: true });
    assert.ok(flags & TFlag.READ_ONLY);
    for (const type of [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES]) {
      await c.send({ type, offset: 0n, length: 512n }, type === Cmd.WRITE ? Buffer.alloc(512) : undefined);
      const [r] = await c.chunks();
      assert.equal(r!.header.kind, 'structured');
      assert.equal((r!.chunk as { error: number }).error, Errno.EPERM);
    }
    c.destroy();
  });
});

test('transmission, structured replies: holes as OFFSET_HOLE, DF as one data chunk, block status', T, async () => {
  const data = new Uint8Array(4 << 16);
  data.fill(0x11, 0, 65536); // data, hole, data, hole
  data.fill(0x22, 2 * 65536, 3 * 65536);
  await withServer([{ name: '', device: sparseDevice(data) }], async (sock) => {
    const c = await TinyClient.connect(sock);
    const flags = await go(c, '', { structured: true, contexts: ['base:allocation', 'qemu:allocation-depth', 'nosuch:x'] });
    assert.ok(flags & TFlag.SEND_DF);
    await c.send({ type: Cmd.READ, offset: 1000n, length: BigInt(3 * 65536) });
    const chunks = await c.chunks();
    assert.deepEqual(
      chunks.map((x) => {
        const p = x.chunk as { type: number; offset: bigint; length?: number; data?: Uint8Array };
        return [p.type, Number(p.offset), p.data?.length ?? p.length];
      }),
      [
        [Chunk.OFFSET_DATA, 1000, 65536 - 1000],
        [Chunk.OFFSET_HOLE, 65536, 65536],
        [Chunk.OFFSET_DATA, 2 * 65536, 65536],
        [Chunk.OFFSET_HOLE, 3 * 65536, 1000],
      ],
    );
    await c.send({ type: Cmd.READ, flags: CmdFlag.DF, offset: 0n, length: BigInt(2 * 65536) });
    const df = await c.chunks();
    assert.equal(df.length, 1);
    assert.equal((df[0]!.chunk as { data: Uint8Array }).data.length, 2 * 65536);

    await c.send({ type: Cmd.BLOCK_STATUS, offset: 0n, length: BigInt(data.length) });
    const bs = await c.chunks();
    const byId = new Map(bs.map((x) => [(x.chunk as { contextId: number }).contextId, (x.chunk as { descriptors: unknown }).descriptors]));
    assert.deepEqual(byId.get(0), [
      { length: 65536, status: 0 },
      { length: 65536, status: 3 },
      { length: 65536, status: 0 },
      { length: 65536, status: 3 },
    ]);
    assert.deepEqual(byId.get(1), [
      { length: 65536, status: 1 },
      { length: 65536, status: 0 },
      { length: 65536, status: 1 },
      { length: 65536, status: 0 },
    ]);
    await c.send({ type: Cmd.BLOCK_STATUS, flags: CmdFlag.REQ_ONE, offset: 100n, length: 200n });
    for (const x of await c.chunks()) assert.equal((x.chunk as { descriptors: unknown[] }).descriptors.length, 1);
    // Errors arrive as ERROR chunks.
    await c.send({ type: Cmd.READ, offset: BigInt(data.length), length: 1n });
    const [e] = await c.chunks();
    assert.equal(e!.chunk!.type, Chunk.ERROR);
    assert.equal((e!.chunk as { error: number }).error, Errno.EINVAL);
    c.destroy();
  });
});

test('transmission, extended headers: 64-bit lengths, NONE/ERROR chunks, BLOCK_STATUS_EXT, WRITE with PAYLOAD_LEN', T, async () => {
  const data = new Uint8Array(1 << 20);
  await withServer([{ name: 'x', device: sparseDevice(data) }], async (sock) => {
    const c = await TinyClient.connect(sock);
    await c.start();
    await c.option(Opt.STRUCTURED_REPLY);
    assert.equal((await c.negotiateExtended()).at(-1)?.type, Rep.ACK);
    // Structured replies cannot be asked for once extended headers are on.
    assert.equal((await c.option(Opt.STRUCTURED_REPLY))[0]!.type, Rep.ERR_EXT_HEADER_REQD);
    assert.equal((await c.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest('x', ['base:allocation'])))[0]!.type, Rep.META_CONTEXT);
    const r = await c.option(Opt.GO, encodeInfoRequest('x'));
    assert.equal(r.at(-1)?.type, Rep.ACK);

    await c.send({ type: Cmd.WRITE, flags: CmdFlag.PAYLOAD_LEN | CmdFlag.FUA, offset: 512n, length: 3n }, Buffer.from('abc'));
    const [w] = await c.chunks();
    assert.equal(w!.header.kind, 'extended');
    assert.equal(w!.chunk!.type, Chunk.NONE);
    await c.send({ type: Cmd.READ, offset: 0n, length: 1024n });
    const rd = await c.chunks();
    assert.equal(rd[0]!.header.kind, 'extended');
    assert.equal(Buffer.from((rd[0]!.chunk as { data: Uint8Array }).data.subarray(512, 515)).toString(), 'abc');
    // A 64-bit effect length: past the end is EINVAL, not a disconnect.
    await c.send({ type: Cmd.BLOCK_STATUS, offset: 0n, length: 1n << 40n });
    const [be] = await c.chunks();
    assert.equal((be!.chunk as { error: number }).error, Errno.EINVAL);
    await c.send({ type: Cmd.BLOCK_STATUS, offset: 0n, length: BigInt(data.length) });
    const [bs] = await c.chunks();
    assert.equal(bs!.chunk!.type, Chunk.BLOCK_STATUS_EXT);
    assert.deepEqual((bs!.chunk as { descriptors: unknown }).descriptors, [
      { length: 65536, status: 0 },
      { length: data.length - 65536, status: 3 },
    ]);
    // A compact header on an extended connection is garbage: the client is dropped.
    await c.writer.send([encodeRequest({ flags: 0, type: Cmd.READ, cookie: 1n, offset: 0n, length: 512n }, false), Buffer.alloc(4)]);
    await c.closed();
  });
});

test('transmission: a write payload over 32 MiB drops the client, others go on', T, async () => {
  await withServer([{ name: '', device: memoryDevice(1 << 20) }], async (sock) => {
    const other = await TinyClient.connect(sock);
    await go(other);
    const c = await TinyClient.connect(sock);
    await go(c);
    await c.send({ type: Cmd.WRITE, offset: 0n, length: BigInt(64 << 20) });
    await c.closed();
    await other.send({ type: Cmd.READ, offset: 0n, length: 512n });
    assert.equal((await other.reply(512)).data.length, 512);
    other.destroy();
  });
});

test('server: many requests in flight reply out of order by cookie; close() waits for them', T, async () => {
  const data = new Uint8Array(8 << 20);
  for (let i = 0; i < data.length; i += 4096) data[i] = (i / 4096) & 0xff;
  await withServer([{ name: '', device: memoryDevice(data) }], async (sock) => {
    const c = await TinyClient.connect(sock);
    await go(c, '', { structured: true });
    const want = new Map<bigint, number>();
    for (let i = 0; i < 200; i++) {
      const off = (i * 37) % 2048;
      want.set(await c.send({ type: Cmd.READ, flags: CmdFlag.DF, offset: BigInt(off * 4096), length: 4096n }), off & 0xff);
    }
    for (let i = 0; i < 200; i++) {
      const [r] = await c.chunks();
      assert.ok(r !== undefined && r.header.kind !== 'simple');
      const exp = want.get(r.header.cookie);
      assert.notEqual(exp, undefined);
      assert.equal((r.chunk as { data: Uint8Array }).data[0], exp);
      want.delete(r.header.cookie);
    }
    assert.equal(want.size, 0);
    c.destroy();
  });
});

test('server: close() lets requests in flight reply, then closes the connection', T, async () => {
  const driver: Driver = {
    format: 'slow-memory',
    size: 1 << 20,
    readOnly: true,
    async pread(buf) {
      await new Promise((r) => setTimeout(r, 150));
      buf.fill(0x42);
    },
    async close() {},
  };
  using s = scratchDir('rblock-nbd-');
  const sock = join(s.dir, 'nbd.sock');
  const server = new NbdServer({ exports: [{ name: '', device: new GenericDevice(driver) }] });
  await server.listen({ path: sock });
  const c = await TinyClient.connect(sock);
  await go(c);
  const cookies: bigint[] = [];
  for (let i = 0; i < 5; i++) cookies.push(await c.send({ type: Cmd.READ, offset: BigInt(i * 4096), length: 4096n }));
  await new Promise((r) => setTimeout(r, 50));
  const closing = server.close();
  const got: bigint[] = [];
  for (let i = 0; i < 5; i++) {
    const r = await c.reply(4096);
    assert.equal(r.header.kind === 'simple' ? r.header.error : -1, 0);
    assert.ok(r.data.every((b) => b === 0x42));
    got.push(r.header.cookie);
  }
  assert.deepEqual(got.sort(), cookies.sort());
  await c.closed();
  await closing;
  assert.equal(server.clientCount, 0);
});

test('limits: bytes in flight bound the requests handed to the device; the handshake is bounded in time, count and size', T, async () => {
  let running = 0;
  let peak = 0;
  const driver: Driver = {
    format: 'slow-memory',
    size: 16 << 20,
    readOnly: false,
    async pread(buf) {
      buf.fill(0);
    },
    async pwrite() {
      running++;
      peak = Math.max(peak, running);
      await new Promise((r) => setTimeout(r, 5));
      running--;
    },
    async close() {},
  };
  using s = scratchDir('rblock-nbd-');
  const sock = join(s.dir, 'nbd.sock');
  const server = new NbdServer({
    exports: [{ name: '', device: new GenericDevice(driver) }],
    transmission: { maxInFlightBytes: 1 << 20, maxInFlightRequests: 64 },
    handshake: { maxOptions: 5, maxOptionLength: 1024 },
    handshakeTimeoutMs: 300,
  });
  await server.listen({ path: sock });
  try {
    const c = await TinyClient.connect(sock);
    await go(c);
    const chunk = Buffer.alloc(256 << 10, 1);
    for (let i = 0; i < 40; i++) await c.send({ type: Cmd.WRITE, offset: BigInt(i * chunk.length), length: BigInt(chunk.length) }, chunk);
    for (let i = 0; i < 40; i++) assert.equal((await c.reply()).header.kind, 'simple');
    assert.ok(peak >= 2 && peak <= 5, `peak concurrent writes ${peak} (1 MiB budget / 256 KiB writes)`);
    c.destroy();

    const tooBig = await TinyClient.connect(sock);
    await tooBig.start();
    assert.equal((await tooBig.option(99, Buffer.alloc(4096)))[0]!.type, Rep.ERR_TOO_BIG);
    assert.equal((await tooBig.option(Opt.LIST)).at(-1)!.type, Rep.ACK);
    for (let i = 0; i < 3; i++) await tooBig.option(99);
    // The sixth option is one too many.
    await tooBig.writer.send([encodeOption(Opt.LIST)]);
    await tooBig.closed();

    const huge = await TinyClient.connect(sock);
    await huge.start();
    await huge.writer.send([encodeOption(99, Buffer.alloc(0)).subarray(0, 12), Buffer.from([0x10, 0, 0, 0])]);
    await huge.closed();

    const idle = await TinyClient.connect(sock);
    await idle.start();
    const t0 = Date.now();
    await idle.closed();
    assert.ok(Date.now() - t0 < 3000);
  } finally {
    await server.close();
  }
});

test('transmission, read-only file export: large reads sent by splice equal the file (simple, DF, structured with holes)', T, async (t) => {
  if (!needNative(t, 'large reads of a read-only export are spliced through it')) return;
  using s = scratchDir('rblock-nbd-');
  const path = join(s.dir, 'sparse.raw');
  const KiB = 1024;
  // data [0, 1 MiB), hole [1 MiB, 2 MiB), data [2 MiB, 2 MiB + 300 KiB), hole to 4 MiB
  const a = pseudoRandom(1024 * KiB, 31);
  const b = pseudoRandom(300 * KiB, 32);
  const fd = openSync(path, 'w');
  ftruncateSync(fd, 4096 * KiB);
  writeSync(fd, a, 0, a.length, 0);
  writeSync(fd, b, 0, b.length, 2048 * KiB);
  closeSync(fd);
  const want = new Uint8Array(4096 * KiB);
  want.set(a, 0);
  want.set(b, 2048 * KiB);
  await using dev = await openImage(path, { format: 'raw', readOnly: true });
  await withServer([{ name: '', device: dev, readOnly: true }], async (sock) => {
    // Simple replies: every byte goes out (a read over a hole takes the copying path, same bytes).
    const simple = await TinyClient.connect(sock);
    await go(simple);
    for (const [off, len] of [
      [100 * KiB, 700 * KiB],
      [900 * KiB, 300 * KiB],
    ] as const) {
      await simple.send({ type: Cmd.READ, offset: BigInt(off), length: BigInt(len) });
      assert.deepEqual((await simple.reply(len)).data, Buffer.from(want.subarray(off, off + len)), `simple read at ${off}`);
    }
    simple.destroy();

    const c = await TinyClient.connect(sock);
    await go(c, '', { structured: true });
    // DF: one data chunk, spliced when no hole is inside.
    await c.send({ type: Cmd.READ, flags: CmdFlag.DF, offset: BigInt(2048 * KiB + 4 * KiB), length: BigInt(256 * KiB) });
    const df = await c.chunks();
    assert.equal(df.length, 1);
    assert.deepEqual((df[0]!.chunk as { data: Uint8Array }).data, Buffer.from(want.subarray(2052 * KiB, 2308 * KiB)));
    // Holes as OFFSET_HOLE, data as spliced OFFSET_DATA.
    await c.send({ type: Cmd.READ, offset: BigInt(768 * KiB), length: BigInt(1600 * KiB) });
    const chunks = (await c.chunks()).map((x) => x.chunk as { type: number; offset: bigint; length?: number; data?: Uint8Array });
    assert.deepEqual(
      chunks.map((x) => [x.type, Number(x.offset), x.data?.length ?? x.length]),
      [
        [Chunk.OFFSET_DATA, 768 * KiB, 256 * KiB],
        [Chunk.OFFSET_HOLE, 1024 * KiB, 1024 * KiB],
        [Chunk.OFFSET_DATA, 2048 * KiB, 300 * KiB],
        [Chunk.OFFSET_HOLE, 2348 * KiB, 20 * KiB],
      ],
    );
    assert.deepEqual(chunks[0]!.data, Buffer.from(want.subarray(768 * KiB, 1024 * KiB)));
    assert.deepEqual(chunks[2]!.data, Buffer.from(want.subarray(2048 * KiB, 2348 * KiB)));
    c.destroy();
  });
});
