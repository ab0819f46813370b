/**
 * The VMDK text descriptor (spec digest §1): parsing, and a serializer that
 * writes QEMU's layout back while keeping every ddb.* key and any header key
 * it does not know (for the write half).
 *
 * Syntax (§1.1): lines end with LF or CRLF; `#` starts a comment; header and
 * DDB lines are `key=value` or `key = "value"`; extent lines (§1.3) are
 * `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`. An embedded descriptor is padded
 * with NULs: the text ends at the first NUL.
 */
import { BlockError } from '../../block/errors.js';
import { MAX_EXTENTS, SECTOR } from './constants.js';

export type ExtentAccess = 'RW' | 'RDONLY' | 'NOACCESS';
/** §1.3 extent types. */
export const EXTENT_TYPES = ['FLAT', 'SPARSE', 'ZERO', 'VMFS', 'VMFSSPARSE', 'VMFSRDM', 'VMFSRAW', 'SESPARSE'] as const;
export type ExtentType = (typeof EXTENT_TYPES)[number];

export interface ExtentLine {
  access: ExtentAccess;
  /** Size of the extent in sectors. */
  sectors: number;
  type: ExtentType;
  /** File name as written (relative to the descriptor's directory), or null for ZERO. */
  file: string | null;
  /** Start sector inside the file (FLAT); absent otherwise. */
  offset?: number;
  /** 1-based line number in the descriptor. */
  line: number;
}

export interface DescriptorEntry {
  key: string;
  value: string;
  /** The value was written in double quotes. */
  quoted: boolean;
}

export interface VmdkDescriptor {
  /** The text as read (NUL padding removed). */
  text: string;
  lineEnding: '\n' | '\r\n';
  /** Header keys (§1.2) in file order, ddb.* keys excluded. */
  header: DescriptorEntry[];
  /** ddb.* keys (§1.5) in file order. */
  ddb: DescriptorEntry[];
  extents: ExtentLine[];
  version: number;
  /** Content id (§1.2); null when the descriptor has none. */
  cid: number | null;
  /** CID of the parent; 0xffffffff = no parent. */
  parentCid: number | null;
  createType: string | null;
  parentFileNameHint: string | null;
}

/** CID value meaning "no parent" (§1.2). */
export const NO_PARENT_CID = 0xffff_ffff;

/**
 * Bytes of a descriptor as text: cut at the first NUL (embedded descriptors
 * are NUL-padded), UTF-8 when valid, else Latin-1 (older VMware wrote
 * windows-1252 descriptors).
 */
export function descriptorText(bytes: Uint8Array): string {
  const end = bytes.indexOf(0);
  const b = end < 0 ? bytes : bytes.subarray(0, end);
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(b);
  } catch {
    return Buffer.from(b).toString('latin1');
  }
}

function bad(path: string, line: number, what: string, field?: string): BlockError {
  return new BlockError('invalid-image', `${path}: descriptor line ${line}: ${what}`, {
    path,
    structure: 'VMDK descriptor',
    ...(field !== undefined ? { field } : {}),
  });
}

const EXTENT_RE = /^(RW|RDONLY|NOACCESS)\s+(\S+)\s+(\S+)(?:\s+"([^"]*)"(?:\s+(\S+))?)?\s*$/;
const KEY_RE = /^([A-Za-z][A-Za-z0-9_.]*)\s*=\s*(.*)$/;

function parseCid(path: string, line: number, key: string, v: string): number {
  if (!/^[0-9a-fA-F]{1,8}$/.test(v)) throw bad(path, line, `${key} '${v}' is not a 32-bit hexadecimal number`, key);
  return parseInt(v, 16);
}

function parseSectors(path: string, line: number, what: string, v: string): number {
  if (!/^\d+$/.test(v)) throw bad(path, line, `${what} '${v}' is not a whole number of sectors`);
  const n = Number(v);
  if (!Number.isSafeInteger(n * SECTOR)) throw bad(path, line, `${what} ${v} sectors is too large`);
  return n;
}

/** Parse a descriptor (§1). Throws invalid-image naming the line for malformed extent or CID lines. */
export function parseDescriptor(text: string, path: string): VmdkDescriptor {
  const d: VmdkDescriptor = {
    text,
    lineEnding: text.includes('\r\n') ? '\r\n' : '\n',
    header: [],
    ddb: [],
    extents: [],
    version: 1,
    cid: null,
    parentCid: null,
    createType: null,
    parentFileNameHint: null,
  };
  const lines = text.split(/\r?\n|\r/);
  lines.forEach((raw, i) => {
    const n = i + 1;
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const ext = EXTENT_RE.exec(line);
    if (ext !== null) {
      const [, access, sectors, type, file, offset] = ext as unknown as [string, ExtentAccess, string, string, string?, string?];
      if (!(EXTENT_TYPES as readonly string[]).includes(type)) {
        throw bad(path, n, `unknown extent type '${type}' (known: ${EXTENT_TYPES.join(', ')})`);
      }
      const e: ExtentLine = {
        access,
        sectors: parseSectors(path, n, 'extent size', sectors),
        type: type as ExtentType,
        file: null,
        line: n,
      };
      if (e.sectors === 0) throw bad(path, n, 'extent has size 0');
      if (file !== undefined) e.file = file;
      else if (type !== 'ZERO') throw bad(path, n, `${type} extent names no file`);
      if (file === '') throw bad(path, n, `${type} extent has an empty file name`);
      if (offset !== undefined) e.offset = parseSectors(path, n, 'extent offset', offset);
      if (d.extents.length >= MAX_EXTENTS) throw bad(path, n, `more than ${MAX_EXTENTS} extents`);
      d.extents.push(e);
      return;
    }
    if (/^(RW|RDONLY|NOACCESS)\s/.test(line)) throw bad(path, n, `invalid extent line '${line}'`);
    const kv = KEY_RE.exec(line);
    if (kv === null) return; // Unknown free text: ignored, as VMware and QEMU do.
    const key = kv[1] as string;
    let value = (kv[2] as string).trim();
    const quoted = value.length >= 2 && value.startsWith('"') && value.endsWith('"');
    if (quoted) value = value.slice(1, -1);
    const entry = { key, value, quoted };
    if (key.startsWith('ddb.')) {
      d.ddb.push(entry);
      return;
    }
    d.header.push(entry);
    switch (key) {
      case 'version':
        if (!/^\d+$/.test(value)) throw bad(path, n, `version '${value}' is not a number`, 'version');
        d.version = Number(value);
        break;
      case 'CID':
        d.cid = parseCid(path, n, key, value);
        break;
      case 'parentCID':
        d.parentCid = parseCid(path, n, key, value);
        break;
      case 'createType':
        d.createType = value;
        break;
      case 'parentFileNameHint':
        d.parentFileNameHint = value;
        break;
    }
  });
  return d;
}

/** Guest size described by the extent lines, in bytes. */
export function descriptorSize(d: VmdkDescriptor): number {
  return d.extents.reduce((s, e) => s + e.sectors * SECTOR, 0);
}

/** CIDs as QEMU prints them (`%x`: no zero padding). */
const hex = (n: number): string => (n >>> 0).toString(16);

function extentLineText(e: ExtentLine): string {
  let s = `${e.access} ${e.sectors} ${e.type}`;
  if (e.file !== null) s += ` "${e.file}"`;
  if (e.offset !== undefined) s += ` ${e.offset}`;
  return s;
}

/**
 * The descriptor as QEMU writes it (§1.1): header keys (version, CID,
 * parentCID, createType, parentFileNameHint first, then any others kept in
 * their order), the extent lines, then the DDB with every ddb.* key kept.
 * Line endings follow the parsed text.
 */
export function serializeDescriptor(d: VmdkDescriptor): string {
  const out: string[] = ['# Disk DescriptorFile', `version=${d.version}`];
  out.push(`CID=${hex(d.cid ?? 0)}`, `parentCID=${hex(d.parentCid ?? NO_PARENT_CID)}`);
  if (d.createType !== null) out.push(`createType="${d.createType}"`);
  if (d.parentFileNameHint !== null) out.push(`parentFileNameHint="${d.parentFileNameHint}"`);
  const known = new Set(['version', 'CID', 'parentCID', 'createType', 'parentFileNameHint']);
  for (const h of d.header) if (!known.has(h.key)) out.push(`${h.key}=${h.quoted ? `"${h.value}"` : h.value}`);
  out.push('', '# Extent description', ...d.extents.map(extentLineText), '', '# The Disk Data Base', '#DDB', '');
  for (const e of d.ddb) out.push(`${e.key} = ${e.quoted ? `"${e.value}"` : e.value}`);
  return out.join(d.lineEnding) + d.lineEnding;
}

/** A ddb.* value, or undefined. */
export function ddbValue(d: VmdkDescriptor, key: string): string | undefined {
  return d.ddb.find((e) => e.key === key)?.value;
}
