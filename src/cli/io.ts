/** Output helpers shared by the commands: stdout writes that respect back-pressure and EPIPE. */
import { once } from 'node:events';

export interface Io {
  out(s: string | Uint8Array): Promise<void>;
  err(s: string): void;
}

// A reader that goes away (`rblock map x | head`) is not an error: stop quietly, as qemu-img does.
let epipeHandled = false;
function handleEpipe(): void {
  if (epipeHandled) return;
  epipeHandled = true;
  process.stdout.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(0);
    throw e;
  });
}

export const processIo: Io = {
  async out(s) {
    handleEpipe();
    if (!process.stdout.write(s)) await once(process.stdout, 'drain');
  },
  err(s) {
    process.stderr.write(s);
  },
};
