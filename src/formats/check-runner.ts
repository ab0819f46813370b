/**
 * The check/repair cycle qemu-img follows for every format: check (repairing
 * what is safe when asked), and if anything was fixed, check again and report
 * the second result with the counts of what the first pass fixed.
 */
import { BlockError } from '../block/errors.js';
import type { CheckOutcome, ImageCheck, RepairMode } from './qcow2/check.js';

export interface CheckPass {
  check: ImageCheck;
  fixedCorruptions: number;
  fixedLeaks: number;
}

export type CheckPassFn = (path: string, repair: RepairMode | undefined, log: (l: string) => void) => Promise<CheckPass>;

export async function runCheck(
  pass: CheckPassFn,
  path: string,
  repair: RepairMode | undefined,
  log: (l: string) => void,
): Promise<CheckOutcome> {
  try {
    const first = await pass(path, repair, log);
    if (repair === undefined || (first.fixedCorruptions === 0 && first.fixedLeaks === 0)) {
      return { check: first.check, repaired: null, failure: null };
    }
    const again = await pass(path, undefined, () => {});
    again.check.corruptionsFixed = first.fixedCorruptions;
    again.check.leaksFixed = first.fixedLeaks;
    return { check: again.check, repaired: { leaks: first.fixedLeaks, corruptions: first.fixedCorruptions }, failure: null };
  } catch (e) {
    if (e instanceof BlockError) return { check: null, repaired: null, failure: e.message };
    throw e;
  }
}
