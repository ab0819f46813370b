/**
 * Parent locators (spec digest §3.1, §6): what each platform code's data
 * says, and the list of host paths to try for a differencing disk's parent,
 * best first. Relative names are resolved against the child's directory.
 */
import { basename, isAbsolute } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { HostFile } from '../../block/file.js';
import { resolveRelative } from '../chain.js';
import { MAX_LOCATOR_BYTES, PLATFORM_MAC, PLATFORM_MACX, PLATFORM_W2KU, PLATFORM_W2RU, PLATFORM_WI2K, PLATFORM_WI2R } from './constants.js';
import type { DynamicHeader, ParentLocatorEntry } from './header.js';

export interface DecodedLocator {
  entry: ParentLocatorEntry;
  /** The locator's text (a path or URL), or null when it has none we can read. */
  text: string | null;
  /** Why the text is null, or a problem with the entry. */
  problem?: string;
}

export interface ParentCandidate {
  /** The host path to try. */
  path: string;
  /** The name as the image spells it, converted to '/' separators (for `info`'s backing-filename). */
  name: string;
  /** Where the name came from, e.g. "W2ru locator 1". */
  from: string;
}

function stripNul(s: string): string {
  const i = s.indexOf('\0');
  return i < 0 ? s : s.slice(0, i);
}

/** Read and decode one locator's data, bounded; problems are reported, not thrown. */
export async function decodeLocator(file: HostFile, e: ParentLocatorEntry): Promise<DecodedLocator> {
  if (e.platformCode === PLATFORM_MAC) return { entry: e, text: null, problem: 'Mac OS alias blobs are not supported' };
  const known = [PLATFORM_W2KU, PLATFORM_W2RU, PLATFORM_WI2K, PLATFORM_WI2R, PLATFORM_MACX];
  if (!known.includes(e.platformCode)) return { entry: e, text: null, problem: `unknown platform code '${e.platform}'` };
  if (e.dataLength === 0) return { entry: e, text: null, problem: 'empty locator data' };
  if (e.dataLength > MAX_LOCATOR_BYTES) return { entry: e, text: null, problem: `locator data length ${e.dataLength} is too large` };
  if (e.dataOffset + e.dataLength > file.size) {
    return {
      entry: e,
      text: null,
      problem: `locator data at offset ${e.dataOffset} (${e.dataLength} bytes) is beyond the end of the file`,
    };
  }
  const data = Buffer.alloc(e.dataLength);
  await file.readAt(data, e.dataOffset);
  let text: string;
  if (e.platformCode === PLATFORM_W2KU || e.platformCode === PLATFORM_W2RU) {
    text = stripNul(data.subarray(0, data.length & ~1).toString('utf16le'));
  } else if (e.platformCode === PLATFORM_MACX) text = stripNul(data.toString('utf8'));
  else text = stripNul(data.toString('latin1'));
  return { entry: e, text };
}

/** Windows separators to '/', and a leading '.\' dropped. */
function posixName(s: string): string {
  return s.replace(/\\/g, '/').replace(/^(\.\/)+/, '');
}

const WINDOWS_ABSOLUTE = /^([a-zA-Z]:[\\/]|\\\\)/;

/** §3.1 MacX: a file URL (file://localhost/..., file:///...), to a path. */
function fileUrlPath(url: string): string | null {
  try {
    return fileURLToPath(url.replace(/^file:\/\/localhost\//i, 'file:///'));
  } catch {
    return null;
  }
}

/**
 * Host paths to try for the parent, best first: relative locators (W2ru,
 * Wi2r) against the child's directory, MacX URLs, absolute locators that are
 * host paths, then the header's parent name and the file names of Windows
 * absolute paths, in the child's directory. The parent's unique id is checked
 * after opening, so a wrong guess is caught.
 */
export function parentCandidates(childPath: string, header: DynamicHeader, decoded: DecodedLocator[]): ParentCandidate[] {
  const out: ParentCandidate[] = [];
  const add = (path: string, name: string, from: string): void => {
    if (!out.some((c) => c.path === path)) out.push({ path, name, from });
  };
  const by = (codes: number[]) => decoded.filter((d) => d.text !== null && d.text !== '' && codes.includes(d.entry.platformCode));
  const label = (d: DecodedLocator) => `${d.entry.platform.trim()} locator ${d.entry.index}`;
  for (const d of by([PLATFORM_W2RU, PLATFORM_WI2R])) {
    const t = d.text as string;
    if (WINDOWS_ABSOLUTE.test(t)) continue;
    const name = posixName(t);
    add(resolveRelative(childPath, name), name, label(d));
  }
  for (const d of by([PLATFORM_MACX])) {
    const p = fileUrlPath(d.text as string);
    if (p !== null) add(p, p, label(d));
  }
  for (const d of by([PLATFORM_W2KU, PLATFORM_WI2K])) {
    const t = d.text as string;
    if (!WINDOWS_ABSOLUTE.test(t) && isAbsolute(posixName(t))) add(posixName(t), posixName(t), label(d));
  }
  if (header.parentName !== '') {
    const n = header.parentName;
    const name = WINDOWS_ABSOLUTE.test(n) ? basename(posixName(n)) : posixName(n);
    add(resolveRelative(childPath, name), name, 'parent name in the dynamic disk header');
  }
  for (const d of by([PLATFORM_W2KU, PLATFORM_WI2K, PLATFORM_W2RU, PLATFORM_WI2R])) {
    const t = d.text as string;
    if (WINDOWS_ABSOLUTE.test(t)) {
      const name = basename(posixName(t));
      add(resolveRelative(childPath, name), name, `file name of ${label(d)}`);
    }
  }
  return out;
}
