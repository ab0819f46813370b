/**
 * Formats we recognise only to refuse them with a clear message, so that a
 * VHDX or a Parallels image is never silently served as raw bytes. VHD (vpc)
 * and VMDK left this list when their drivers landed (issues 6 and 7).
 */
import type { ProbeInput, RecognisedFormat } from './registry.js';

function ascii(buf: Uint8Array, off: number, len: number): string {
  if (buf.length < off + len) return '';
  return String.fromCharCode(...buf.subarray(off, off + len));
}

function magic(name: string, description: string, test: (p: ProbeInput) => boolean, score = 100): RecognisedFormat {
  return { name, description, probe: (p) => (test(p) ? score : 0) };
}

export const RECOGNISED_ONLY: readonly RecognisedFormat[] = [
  magic('vhdx', 'VHDX (Hyper-V)', (p) => ascii(p.head, 0, 8) === 'vhdxfile'),
  magic('qed', 'QED', (p) => ascii(p.head, 0, 4) === 'QED\0'),
  magic(
    'vdi',
    'VDI (VirtualBox)',
    (p) => p.head.length >= 68 && p.head[64] === 0x7f && p.head[65] === 0x10 && p.head[66] === 0xda && p.head[67] === 0xbe,
  ),
  magic('parallels', 'Parallels', (p) => ascii(p.head, 0, 16) === 'WithoutFreeSpace' || ascii(p.head, 0, 16) === 'WithouFreSpacExt'),
  magic('bochs', 'Bochs', (p) => ascii(p.head, 0, 32).startsWith('Bochs Virtual HD Image')),
  magic('cloop', 'cloop (compressed loop)', (p) => ascii(p.head, 0, 160).includes('#!/bin/sh') && ascii(p.head, 0, 256).includes('cloop')),
  magic('dmg', 'DMG (Apple disk image)', (p) => ascii(p.tail, 0, 4) === 'koly'),
  magic('luks', 'LUKS (encrypted)', (p) => ascii(p.head, 0, 6) === 'LUKS\xba\xbe'),
  magic('qcow', 'QCOW version 1', (p) => ascii(p.head, 0, 4) === 'QFI\xfb' && p.head[7] === 1),
];
