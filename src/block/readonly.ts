// ReadOnlyDevice: a filter that makes the stack below it read-only. Capabilities say so (the
// server then advertises a read-only export) and every write path fails with EPERM.

import {
  BlockError,
  FilterDevice,
  type BlockCapabilities,
  type BlockDevice,
  type IoOptions,
  type ZeroOptions,
} from './device.js';

export class ReadOnlyDevice extends FilterDevice {
  private readonly caps: BlockCapabilities;

  constructor(inner: BlockDevice) {
    super(inner);
    this.caps = { ...inner.capabilities, writable: false, fua: false, trim: false, zero: false, fastZero: false };
  }

  override get capabilities(): BlockCapabilities {
    return this.caps;
  }

  get description(): string {
    return `readonly(${this.inner.description})`;
  }

  override write(offset: number, _data: Buffer, _opts?: IoOptions): Promise<void> {
    return refuse('write', offset);
  }

  override trim(offset: number, _length: number, _opts?: IoOptions): Promise<void> {
    return refuse('trim', offset);
  }

  override writeZeroes(offset: number, _length: number, _opts?: ZeroOptions): Promise<void> {
    return refuse('writeZeroes', offset);
  }
}

function refuse(op: string, offset: number): Promise<never> {
  return Promise.reject(new BlockError('EPERM', `${op} at ${offset} refused: the device is read-only`));
}
