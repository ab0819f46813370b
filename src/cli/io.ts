/** Output helpers shared by the commands: stdout writes that respect back-pressure and EPIPE. */
import { once } from 'node:events';

export interface Io {
  out(s: string | Uint8Array): Promise<void>;
  err(s: string): void;
}

export const processIo: Io = {
  async out(s) {
    if (!process.stdout.write(s)) await once(process.stdout, 'drain');
  },
  err(s) {
    process.stderr.write(s);
  },
};
