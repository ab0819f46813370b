// Injected into the CommonJS CLI bundle (scripts/bundle.mjs): import.meta.url
// there means the bundle file's own URL, as it did in the ESM bundle.
/* global __filename */
import { pathToFileURL } from 'node:url';

export const importMetaUrl = pathToFileURL(__filename).href;
