/**
 * A block device seen as a host file, so that format drivers (which read
 * their metadata and data through HostFile) can open an image whose bytes
 * live on a device: an NBD export serving a qcow2, VHD or VMDK file as it is
 * on disk, as `qemu-img info -f qcow2 nbd://...` does. The device has a fixed
 * size, so a driver that needs to grow its file (appending clusters) gets a
 * no-space error, as qemu does with an NBD export.
 */
import type { BlockDevice } from './device.js';
import { BlockError } from './errors.js';
import { HostFile, type FileBackend } from './file.js';

export function deviceAsFile(dev: BlockDevice, path: string): HostFile {
  const backend: FileBackend = {
    async read(buf, offset, length, position) {
      const n = Math.max(0, Math.min(length, dev.size - position));
      if (n > 0) await dev.pread(buf.subarray(offset, offset + n), position);
      return { bytesRead: n };
    },
    async write(buf, offset, length, position) {
      if (position + length > dev.size) {
        throw new BlockError('no-space', `${path}: cannot grow the image past the device's ${dev.size} bytes`, {
          path,
          op: 'write',
          offset: position,
        });
      }
      await dev.pwrite(buf.subarray(offset, offset + length), position);
      return { bytesWritten: length };
    },
    async truncate(size) {
      if (size !== dev.size) {
        throw new BlockError('not-supported', `${path}: cannot resize the device under the image (${dev.size} -> ${size} bytes)`, {
          path,
          op: 'truncate',
        });
      }
    },
    datasync: () => dev.flush(),
    // A device has no host allocation to report; "disk size" is its size.
    stat: async () => ({ blocks: Math.ceil(dev.size / 512) }),
    close: () => dev.close(),
  };
  return HostFile.over(path, backend, dev.caps.readOnly, dev.size);
}
