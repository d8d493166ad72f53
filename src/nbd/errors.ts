// The one mapping from the data path's errno vocabulary to NBD wire error numbers, and back.

import type { BlockErrno } from '../block/device.js';
import { NBD_ERR } from './protocol.js';

export function nbdErrorOf(errno: BlockErrno): number {
  switch (errno) {
    case 'EPERM':
      return NBD_ERR.EPERM;
    case 'EIO':
      return NBD_ERR.EIO;
    case 'ENOMEM':
      return NBD_ERR.ENOMEM;
    case 'EINVAL':
      return NBD_ERR.EINVAL;
    case 'ENOSPC':
      return NBD_ERR.ENOSPC;
    case 'EOVERFLOW':
      return NBD_ERR.EOVERFLOW;
    case 'ENOTSUP':
      return NBD_ERR.ENOTSUP;
    case 'ESHUTDOWN':
      return NBD_ERR.ESHUTDOWN;
  }
}

/** Unknown wire values become EINVAL, as the spec recommends for clients. */
export function errnoOfNbd(error: number): BlockErrno {
  switch (error) {
    case NBD_ERR.EPERM:
      return 'EPERM';
    case NBD_ERR.EIO:
      return 'EIO';
    case NBD_ERR.ENOMEM:
      return 'ENOMEM';
    case NBD_ERR.ENOSPC:
      return 'ENOSPC';
    case NBD_ERR.EOVERFLOW:
      return 'EOVERFLOW';
    case NBD_ERR.ENOTSUP:
      return 'ENOTSUP';
    case NBD_ERR.ESHUTDOWN:
      return 'ESHUTDOWN';
    default:
      return 'EINVAL';
  }
}
