/**
 * `rblock check [-r leaks|all]` for VHD (qemu-img has no check for vpc). It
 * reads the file's structures directly (opening would stop at the first
 * problem) and reports, with qemu-img check's counters and exit codes:
 *
 * - corruptions: a footer or dynamic header checksum that does not add up, a
 *   missing or differing footer copy at offset 0, a missing trailing footer,
 *   BAT entries whose block ends past the footer, overlaps the header, BAT or
 *   parent locator data, or overlaps another block, a bad block size, a
 *   differencing disk whose parent is missing or has another unique id;
 * - leaks: space between the metadata and the trailing footer that no block
 *   uses (what a write killed before its BAT update leaves).
 *
 * Repairs are the safe ones only: checksums recomputed when the structure's
 * cookie and fields are otherwise sane, the footer copy rewritten from the
 * trailing footer (or the trailing footer from an intact copy), and, for
 * leaks at the end of the file, the footer moved down and the file cut.
 * Nothing that points at data (the BAT) is ever changed.
 */
import { BlockError } from '../../block/errors.js';
import { HostFile } from '../../block/file.js';
import { hex } from '../../util/bytes.js';
import { emptyCounts, type CheckOutcome, type ImageCheck, type RepairMode } from '../qcow2/check.js';
import { openImage } from '../registry.js';
import {
  BAT_UNUSED,
  DISK_DIFFERENCING,
  DISK_DYNAMIC,
  DISK_FIXED,
  DYN_HEADER_COOKIE,
  DYN_HEADER_SIZE,
  FOOTER_COOKIE,
  FOOTER_SIZE,
  MAX_TABLE_ENTRIES,
  SECTOR,
  vhdChecksum,
} from './constants.js';
import { fixChecksum } from './create.js';
import { decodeFooter, footerValid, type VhdFooter } from './footer.js';
import { decideSize } from './geometry.js';
import { runCheck, type CheckPass } from '../check-runner.js';

export interface VhdCheckOptions {
  repair?: RepairMode;
  log?: (line: string) => void;
}

/** One pass: the report and the repairs made in it (only when repairing). */
type Pass = CheckPass;

const dv = (b: Uint8Array): DataView => new DataView(b.buffer, b.byteOffset, b.byteLength);

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0;
}

async function pass(path: string, repair: RepairMode | undefined, log: (l: string) => void): Promise<Pass> {
  const file = await HostFile.open(path, repair === undefined);
  const c: ImageCheck = {
    filename: path,
    format: 'vpc',
    ...emptyCounts(),
  };
  let fixedCorruptions = 0;
  let fixedLeaks = 0;
  const fixAll = repair === 'all';
  const corrupt = (msg: string): void => {
    c.corruptions++;
    log(`ERROR ${msg}`);
  };
  const fixed = (what: string): void => {
    fixedCorruptions++;
    c.corruptionsFixed++;
    log(`Repairing ${what}`);
  };
  try {
    if (file.size < FOOTER_SIZE) throw new BlockError('invalid-image', `${path}: file is ${file.size} bytes, too small for a VHD`);
    const tailAt = file.size - FOOTER_SIZE;
    const tailBytes = new Uint8Array(FOOTER_SIZE);
    await file.readAt(tailBytes, tailAt);
    const headBytes = new Uint8Array(FOOTER_SIZE);
    await file.readAt(headBytes, 0);
    const tail = decodeFooter(tailBytes, tailAt, 'trailing');
    const head = decodeFooter(headBytes, 0, 'copy at offset 0');
    const tailCookie = tail.cookie === FOOTER_COOKIE;
    const headCookie = head.cookie === FOOTER_COOKIE;
    const sparseType = (f: VhdFooter): boolean => f.diskType === DISK_DYNAMIC || f.diskType === DISK_DIFFERENCING;

    // 1. The footer and its copy.
    let footer: VhdFooter;
    let footerBytes: Uint8Array;
    let trailingOk = true;
    if (tailCookie && footerValid(tail)) {
      footer = tail;
      footerBytes = tailBytes;
    } else if (headCookie && footerValid(head) && sparseType(head)) {
      footer = head;
      footerBytes = headBytes;
      trailingOk = false;
      corrupt(
        tailCookie
          ? `footer at offset ${tailAt}: checksum ${hex(tail.checksum, 8)} but the bytes add up to ${hex(tail.computedChecksum, 8)} (the copy at offset 0 is intact)`
          : `footer: there is no footer at the end of the file (offset ${tailAt}); the copy at offset 0 is intact`,
      );
    } else if (tailCookie && (tail.diskType === DISK_FIXED || sparseType(tail))) {
      // Cookie and a known type, but the checksum is wrong, and no intact copy: the checksum is what is off.
      corrupt(`footer at offset ${tailAt}: checksum ${hex(tail.checksum, 8)} but the bytes add up to ${hex(tail.computedChecksum, 8)}`);
      if (fixAll) {
        fixChecksum(tailBytes, 64);
        await file.writeAt(tailBytes, tailAt);
        fixed('the footer checksum');
      }
      footer = decodeFooter(tailBytes, tailAt, 'trailing');
      footerBytes = tailBytes;
    } else {
      throw new BlockError('invalid-image', `${path}: no usable VHD footer at offset 0 or at the end of the file`);
    }

    if (footer.diskType === DISK_FIXED) {
      const size = decideSize(footer).size;
      c.imageEndOffset = file.size;
      if (size > footer.offset) {
        corrupt(`footer: the disk is ${size} bytes but the file holds only ${footer.offset} bytes of data before its footer`);
      }
      return { check: c, fixedCorruptions, fixedLeaks };
    }
    if (!sparseType(footer)) throw new BlockError('invalid-image', `${path}: VHD disk type ${footer.diskType} is not supported`);

    if (!trailingOk && fixAll) {
      // The trailing footer is damaged (rewrite it in place) or missing (append one: the file end).
      const at = tailCookie ? tailAt : Math.ceil(file.size / SECTOR) * SECTOR;
      await file.writeAt(footerBytes, at);
      fixed(tailCookie ? 'the trailing footer (from the copy at offset 0)' : 'the missing trailing footer (from the copy at offset 0)');
      trailingOk = true;
    }
    const footerAt = trailingOk ? file.size - FOOTER_SIZE : file.size;
    if (!(headCookie && sameBytes(headBytes, footerBytes))) {
      corrupt(
        !headCookie
          ? 'footer copy at offset 0: missing'
          : !footerValid(head)
            ? `footer copy at offset 0: bad checksum (${hex(head.checksum, 8)}, the bytes add up to ${hex(head.computedChecksum, 8)})`
            : 'footer copy at offset 0: differs from the trailing footer',
      );
      if (fixAll) {
        await file.writeAt(footerBytes, 0);
        fixed('the footer copy at offset 0');
      }
    }

    // 2. The dynamic disk header.
    const hAt = Number(footer.dataOffset);
    if (!Number.isSafeInteger(hAt) || hAt + DYN_HEADER_SIZE > footerAt || hAt < FOOTER_SIZE) {
      throw new BlockError('invalid-image', `${path}: footer data_offset ${footer.dataOffset} does not point at a dynamic disk header`);
    }
    const h = new Uint8Array(DYN_HEADER_SIZE);
    await file.readAt(h, hAt);
    const hv = dv(h);
    if (String.fromCharCode(...h.subarray(0, 8)) !== DYN_HEADER_COOKIE) {
      throw new BlockError('invalid-image', `${path}: no dynamic disk header cookie '${DYN_HEADER_COOKIE}' at offset ${hAt}`);
    }
    const tableOffset = Number(hv.getBigUint64(16));
    const entries = hv.getUint32(28);
    const blockSize = hv.getUint32(32);
    const sizeOk = blockSize >= SECTOR && (blockSize & (blockSize - 1)) === 0;
    if (!sizeOk) corrupt(`dynamic disk header: block_size ${blockSize} is not a power of two of at least 512`);
    const batOk = entries <= MAX_TABLE_ENTRIES && Number.isSafeInteger(tableOffset) && tableOffset + entries * 4 <= footerAt;
    if (!batOk) corrupt(`dynamic disk header: the BAT (${entries} entries at offset ${tableOffset}) does not fit in the file`);
    const virtualSize = decideSize(footer).size;
    if (sizeOk && entries * blockSize < virtualSize) {
      corrupt(`dynamic disk header: ${entries} blocks of ${blockSize} bytes do not cover the virtual size (${virtualSize} bytes)`);
    }
    const sum = hv.getUint32(36);
    const want = vhdChecksum(h, 36);
    if (sum !== want) {
      corrupt(`dynamic disk header at offset ${hAt}: checksum ${hex(sum, 8)} but the bytes add up to ${hex(want, 8)}`);
      if (fixAll && sizeOk && batOk) {
        fixChecksum(h, 36);
        await file.writeAt(h, hAt);
        fixed('the dynamic disk header checksum');
      }
    }
    if (!sizeOk || !batOk) return { check: c, fixedCorruptions, fixedLeaks };

    // 3. Metadata regions, then every allocated block against them, the file end and each other.
    const bitmapSize = Math.ceil(Math.ceil(blockSize / SECTOR / 8) / SECTOR) * SECTOR;
    const blockBytes = bitmapSize + blockSize;
    const meta: [number, number, string][] = [
      [0, FOOTER_SIZE, 'the footer copy'],
      [hAt, hAt + DYN_HEADER_SIZE, 'the dynamic disk header'],
      [tableOffset, tableOffset + Math.ceil((entries * 4) / SECTOR) * SECTOR, 'the BAT'],
    ];
    for (let i = 0; i < 8; i++) {
      const at = 576 + i * 24;
      const code = hv.getUint32(at);
      const len = hv.getUint32(at + 8);
      const off = Number(hv.getBigUint64(at + 16));
      if (code !== 0 && len > 0 && Number.isSafeInteger(off)) meta.push([off, off + len, `parent locator ${i}'s data`]);
    }
    let metaEnd = 0;
    for (const m of meta) metaEnd = Math.max(metaEnd, m[1]);
    const bat = new Uint8Array(entries * 4);
    await file.readAt(bat, tableOffset);
    const bv = dv(bat);
    const blocks: { index: number; start: number; end: number }[] = [];
    c.totalClusters = entries;
    let prevEnd = -1;
    for (let i = 0; i < entries; i++) {
      const raw = bv.getUint32(i * 4);
      if (raw === BAT_UNUSED) continue;
      c.allocatedClusters++;
      const start = raw * SECTOR;
      const end = start + blockBytes;
      if (prevEnd >= 0 && start !== prevEnd) c.fragmentedClusters++;
      prevEnd = end;
      const where = `BAT entry ${i} (guest offset ${i * blockSize}) -> sector ${hex(raw, 8)}`;
      if (end > footerAt) {
        corrupt(`${where}: the block [${start}, ${end}) ends past the trailing footer (offset ${footerAt})`);
        continue;
      }
      const hit = meta.find((m) => start < m[1] && end > m[0]);
      if (hit !== undefined) {
        corrupt(`${where}: the block [${start}, ${end}) overlaps ${hit[2]} [${hit[0]}, ${hit[1]})`);
        continue;
      }
      blocks.push({ index: i, start, end });
    }
    blocks.sort((a, b) => a.start - b.start);
    for (let k = 1; k < blocks.length; k++) {
      const a = blocks[k - 1] as (typeof blocks)[number];
      const b = blocks[k] as (typeof blocks)[number];
      if (b.start < a.end) corrupt(`BAT entry ${b.index}: its block [${b.start}, ${b.end}) overlaps the block of BAT entry ${a.index}`);
    }

    // 4. Leaks: space between the metadata and the footer that no block uses.
    let pos = Math.ceil(metaEnd / SECTOR) * SECTOR;
    let leaked = 0;
    for (const b of blocks) {
      if (b.start > pos) leaked += b.start - pos;
      pos = Math.max(pos, b.end);
    }
    const tailLeak = Math.max(0, footerAt - pos);
    leaked += tailLeak;
    if (leaked > 0) {
      const n = Math.ceil(leaked / blockBytes);
      c.leaks += n;
      log(`Leaked space: ${leaked} bytes between the metadata and the footer that no BAT entry uses (${n} block-sized units)`);
      if (repair !== undefined && tailLeak > 0 && trailingOk && c.corruptions === c.corruptionsFixed) {
        // The file end: the footer moves down to just after the last block, then the file is cut.
        await file.writeAt(footerBytes, pos);
        await file.sync();
        await file.truncate(pos + FOOTER_SIZE);
        log(`Repairing the file end: the footer moved from ${footerAt} to ${pos}`);
        if (tailLeak === leaked) {
          c.leaksFixed += n;
          fixedLeaks += n;
        }
      }
    }
    c.imageEndOffset = file.size;

    // 5. The parent of a differencing disk: opening the chain finds it and checks its unique id.
    if (footer.diskType === DISK_DIFFERENCING) {
      try {
        const dev = await openImage(path, { format: 'vpc' });
        await dev.close();
      } catch (e) {
        if (!(e instanceof BlockError)) throw e;
        if (e.kind === 'not-found' || /parent|locator/.test(e.message)) corrupt(`parent: ${e.message}`);
        else throw e;
      }
    }
    if (repair !== undefined) await file.sync();
    return { check: c, fixedCorruptions, fixedLeaks };
  } finally {
    await file.close();
  }
}

/** Check (and with `repair`, fix what is safe, then check again, as qemu-img does). */
export function checkVhd(path: string, o: VhdCheckOptions = {}): Promise<CheckOutcome> {
  return runCheck(pass, path, o.repair, o.log ?? ((): void => {}));
}
