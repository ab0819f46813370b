/**
 * Recognising a VMDK from its first bytes: the "KDMV" (hosted sparse, §2) or
 * "COWD" (ESX vmfsSparse, §6, refused at open) magic at offset 0, or a text
 * descriptor (§1.1). Like QEMU's vmdk_probe, a descriptor is comment and
 * blank lines followed by `version=N`; a first line "# Disk DescriptorFile"
 * is accepted too. A descriptor naming a flat extent is therefore vmdk, never
 * raw (raw scores 1).
 */
import { COWD, KDMV } from './constants.js';

export const PROBE_SCORE = 100;

export function probeVmdk(head: Uint8Array): number {
  if (head.length < 4) return 0;
  const magic = String.fromCharCode(head[0]!, head[1]!, head[2]!, head[3]!);
  if (magic === KDMV || magic === COWD) return PROBE_SCORE;
  // Text: stop at the first NUL (QEMU pads a rewritten descriptor with NULs) and refuse binary bytes.
  const nul = head.indexOf(0);
  const text = head.subarray(0, nul < 0 ? head.length : nul);
  for (const b of text) if (b < 0x20 && b !== 0x09 && b !== 0x0a && b !== 0x0d) return 0;
  const lines = Buffer.from(text).toString('latin1').split(/\r?\n/);
  if (/^#\s*Disk\s+DescriptorFile\s*$/i.test(lines[0]?.trim() ?? '')) return PROBE_SCORE;
  for (const raw of lines) {
    const l = raw.trim();
    if (l === '' || l.startsWith('#')) continue;
    return /^version\s*=\s*[1-3]$/.test(l) ? PROBE_SCORE : 0;
  }
  return 0;
}
