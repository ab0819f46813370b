/** Sizes with suffixes, as qemu-img accepts them: 512, 64K, 1.5G, 2T (powers of 1024). */
import { BlockError } from '../block/errors.js';

const UNITS: Record<string, number> = { '': 1, B: 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50, E: 2 ** 60 };

export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bBkKmMgGtTpPeE]?)(?:i?[bB])?\s*$/.exec(text);
  if (m === null) throw new BlockError('invalid-argument', `invalid ${what} '${text}': use a number with an optional K, M, G or T suffix`);
  const unit = UNITS[(m[2] as string).toUpperCase()] as number;
  const n = Number(m[1]) * unit;
  if (!Number.isSafeInteger(n))
    throw new BlockError('invalid-argument', `invalid ${what} '${text}': not a whole number of bytes, or too large`);
  return n;
}

/** qemu-img's human size: "1 MiB", "1.5 GiB", "324 KiB", "0 B". */
export function humanSize(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  // Like qemu's size_to_str(): the next unit from 1000 of the current one ("0.977 MiB", not
  // "1000 KiB"), then %0.3g: 3 significant digits, trailing zeros of the fraction dropped.
  let i = 0;
  while (n >= 1000 * 1024 ** i && i < units.length - 1) i++;
  if (i === 0) return `${n} B`;
  const v = n / 1024 ** i;
  const s = v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v >= 1 ? v.toFixed(2) : v.toFixed(3);
  return `${s.includes('.') ? s.replace(/\.?0+$/, '') : s} ${units[i]}`;
}
