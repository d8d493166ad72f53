// The QEMU compute driver: QMP client, serial console, VM lifecycle, config drives, providers.
// See docs/vm-images.md for the sample guest these are tested with.

export * from './errors.js';
export * from './qmp.js';
export * from './console.js';
export * from './config-drive.js';
export * from './vm.js';
export * from './provider.js';
