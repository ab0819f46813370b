/** `hexdump -C` layout, streamed from a device: repeated lines fold into '*'. */
import type { BlockDevice } from '../block/device.js';

function line(addr: number, bytes: Uint8Array): string {
  let hexPart = '';
  for (let i = 0; i < 16; i++) {
    if (i === 8) hexPart += ' ';
    hexPart += i < bytes.length ? ' ' + (bytes[i] as number).toString(16).padStart(2, '0') : '   ';
  }
  let text = '';
  for (const b of bytes) text += b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '.';
  return `${addr.toString(16).padStart(8, '0')} ${hexPart}  |${text}|`;
}

export async function* hexdumpLines(dev: BlockDevice, offset: number, length: number): AsyncGenerator<string> {
  const chunk = 1 << 20;
  let prev: Buffer | null = null;
  let starred = false;
  for (let pos = offset; pos < offset + length; pos += chunk) {
    const n = Math.min(chunk, offset + length - pos);
    const buf = Buffer.alloc(n);
    await dev.pread(buf, pos);
    for (let i = 0; i < n; i += 16) {
      const row = buf.subarray(i, Math.min(i + 16, n));
      const addr = pos + i;
      if (prev !== null && row.length === 16 && prev.equals(row)) {
        if (!starred) yield '*';
        starred = true;
        continue;
      }
      starred = false;
      prev = Buffer.from(row);
      yield line(addr, row);
    }
  }
  yield (offset + length).toString(16).padStart(8, '0');
}
