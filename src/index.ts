/** rblock's library entry point: `import { openImage } from 'rblock'`. */
export type { BlockDevice, Capabilities, Extent, IoOpts } from './block/device.js';
export { BlockError, isBlockError, type ErrorKind, type ErrorContext } from './block/errors.js';
export { GenericDevice, type Driver } from './block/generic.js';
export { memoryDevice } from './block/memory.js';
export { offsetFilter } from './filters/offset.js';
export { readOnlyFilter } from './filters/readonly.js';
export { openImage, probeFormat, formatNames, type OpenOptions, type FormatDriver } from './formats/registry.js';
export { layerOf } from './formats/chain.js';
export type { ImageInfo, Layer, LayerRun } from './formats/layer.js';
export { mapImage, type MapEntry } from './copy/map.js';
export { imageInfo, imageInfoChain } from './formats/info.js';
export { readToFile, type ReadToFileOptions } from './copy/read.js';
