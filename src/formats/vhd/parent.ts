/**
 * The parent of a differencing disk (spec digest §6): found through the
 * parent locators, opened as one more level of the chain, and checked: its
 * footer's unique id must be the parent_unique_id the child recorded.
 */
import { stat } from 'node:fs/promises';
import type { BlockDevice } from '../../block/device.js';
import { BlockError } from '../../block/errors.js';
import type { HostFile } from '../../block/file.js';
import type { OpenContext } from '../registry.js';
import { formatUuid } from './constants.js';
import type { DynamicHeader } from './header.js';
import { decodeLocator, parentCandidates, type DecodedLocator, type ParentCandidate } from './locator.js';

export interface ParentLink {
  /** The name as the child spells it (backing-filename). */
  name: string;
  /** The host path (full-backing-filename). */
  path: string;
  from: string;
  /** Whether the parent was opened (not with `backing: null`). */
  opened: boolean;
}

export interface OpenedParent {
  device: BlockDevice | null;
  /** The parent used, or the best candidate when it was not opened; null when the child names none. */
  link: ParentLink | null;
  decoded: DecodedLocator[];
  candidates: ParentCandidate[];
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * Find and open the parent. `uniqueIdOf` reads the unique id of an opened
 * VHD (null when the device is not a VHD). `backing: null` in the options
 * opens the child alone; a `backing` path overrides the locators (and, being
 * the user's choice, skips the unique id check).
 */
export async function openParent(
  file: HostFile,
  header: DynamicHeader,
  ctx: OpenContext,
  uniqueIdOf: (dev: BlockDevice) => Uint8Array | null,
): Promise<OpenedParent> {
  const child = file.path;
  const decoded: DecodedLocator[] = [];
  for (const e of header.locators) decoded.push(await decodeLocator(file, e));
  const candidates = parentCandidates(child, header, decoded);
  const override = ctx.options.backing;
  if (typeof override === 'string') {
    const device = await ctx.openBacking(override, ctx.options.backingFormat, child);
    return { device, link: { name: override, path: override, from: 'backing override', opened: true }, decoded, candidates };
  }
  const first = candidates[0];
  if (override === null) return { device: null, link: first === undefined ? null : { ...first, opened: false }, decoded, candidates };
  if (first === undefined) {
    const problems = decoded.map((d) => `locator ${d.entry.index} (${d.entry.platform}): ${d.problem ?? 'no path'}`);
    throw new BlockError(
      'invalid-image',
      `${child}: differencing VHD names no usable parent (no readable parent locator and no parent name${problems.length > 0 ? '; ' + problems.join('; ') : ''})`,
      { path: child, structure: 'parent locator' },
    );
  }

  let found: ParentCandidate | undefined;
  for (const c of candidates) {
    if (await exists(c.path)) {
      found = c;
      break;
    }
  }
  if (found === undefined) {
    const tried = candidates.map((c) => `${c.path} (${c.from})`).join(', ');
    throw new BlockError(
      'not-found',
      `${child}: parent disk of this differencing VHD not found (from its parent locator and parent name); looked for ${tried}`,
      {
        path: child,
        structure: 'parent locator',
      },
    );
  }
  let device: BlockDevice;
  try {
    device = await ctx.openBacking(found.path, 'vpc', child);
  } catch (e) {
    if (e instanceof BlockError && e.context.path !== child) {
      throw new BlockError(
        e.kind,
        `${child}: cannot open the parent disk ${found.path} (from ${found.from}): ${e.message}`,
        { path: child, structure: 'parent disk' },
        e,
      );
    }
    throw e;
  }
  const id = uniqueIdOf(device);
  if (id === null || Buffer.compare(Buffer.from(id), Buffer.from(header.parentUuid)) !== 0) {
    await device.close();
    const has = id === null ? 'is not a VHD' : `has unique id ${formatUuid(id)}`;
    throw new BlockError(
      'invalid-image',
      `${child}: parent disk ${found.path} (from ${found.from}) ${has}, but this differencing disk expects ${formatUuid(header.parentUuid)} (parent_unique_id in the dynamic disk header); the parent was replaced or modified, and reading through it would give wrong data`,
      { path: child, structure: 'VHD dynamic disk header', field: 'parent_unique_id' },
    );
  }
  return { device, link: { ...found, opened: true }, decoded, candidates };
}
