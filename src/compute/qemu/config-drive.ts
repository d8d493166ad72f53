// cloud-init NoCloud config drives: an ISO 9660 image with volume label `cidata` holding
// `meta-data` (instance-id, local-hostname), `user-data` and optionally `network-config`.
// cloud-init reads it, and so does the sample guest of scripts/vm/build-vm.sh --guest (see
// docs/vm-images.md), which takes the host name and machine id from meta-data and runs a
// user-data that starts with "#!" in the background.

import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { stringify as toYaml } from 'yaml';

import { ComputeError, missingTool } from './errors.js';

const execFileP = promisify(execFile);

export interface ConfigDriveSpec {
  /** cloud-init's instance-id: a new one tells cloud-init this is a new instance (a clone). */
  instanceId: string;
  /** The guest's host name (RFC 1123). */
  hostname: string;
  /** user-data: "#cloud-config ..." for cloud-init, or a script starting with "#!". */
  userData?: string | Buffer;
  /** network-config (version 1 or 2): YAML text, or an object written as YAML. */
  networkConfig?: string | Record<string, unknown>;
}

const INSTANCE_ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;
const HOST_LABEL = /^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/;

/** Throws SPW_ERR_CONFIG_DRIVE when the spec cannot be written as NoCloud meta-data. */
export function validateConfigDrive(spec: ConfigDriveSpec): void {
  if (!INSTANCE_ID.test(spec.instanceId)) {
    throw new ComputeError('SPW_ERR_CONFIG_DRIVE', `config drive: instance-id ${JSON.stringify(spec.instanceId)} must be 1-128 of [A-Za-z0-9._:-], starting with a letter or digit`);
  }
  const h = spec.hostname;
  if (h.length === 0 || h.length > 253 || !h.split('.').every((l) => HOST_LABEL.test(l))) {
    throw new ComputeError('SPW_ERR_CONFIG_DRIVE', `config drive: host name ${JSON.stringify(h)} is not a valid RFC 1123 host name (labels of letters, digits and inner hyphens, dot-separated)`);
  }
}

/** The meta-data file: plain `key: value` lines (valid YAML, and what the sample guest parses). */
export function renderMetaData(spec: ConfigDriveSpec): string {
  validateConfigDrive(spec);
  return `instance-id: ${spec.instanceId}\nlocal-hostname: ${spec.hostname}\n`;
}

/**
 * The machine id the sample guest derives from an instance-id: the instance-id itself when it is
 * already 32 lowercase hex digits, else the md5 (hex) of its UTF-8 bytes.
 */
export function machineIdFor(instanceId: string): string {
  return /^[0-9a-f]{32}$/.test(instanceId) ? instanceId : createHash('md5').update(instanceId, 'utf8').digest('hex');
}

/**
 * Write a NoCloud ISO to `output` (atomically: a temporary file renamed into place) with
 * `genisoimage -volid cidata -joliet -rock`. Returns `output`.
 */
export async function buildConfigDrive(output: string, spec: ConfigDriveSpec, opts: { signal?: AbortSignal } = {}): Promise<string> {
  const metaData = renderMetaData(spec);
  const dir = path.dirname(path.resolve(output));
  const stage = await mkdtemp(path.join(dir, '.cidata-'));
  const tmp = path.join(stage, 'cidata.iso');
  try {
    const files = path.join(stage, 'files');
    await mkdir(files);
    await writeFile(path.join(files, 'meta-data'), metaData);
    await writeFile(path.join(files, 'user-data'), spec.userData ?? '#cloud-config\n', { mode: 0o644 });
    if (spec.networkConfig !== undefined) {
      const text = typeof spec.networkConfig === 'string' ? spec.networkConfig : toYaml(spec.networkConfig);
      await writeFile(path.join(files, 'network-config'), text);
    }
    try {
      await execFileP('genisoimage', ['-quiet', '-output', tmp, '-volid', 'cidata', '-joliet', '-rock', files], {
        ...(opts.signal ? { signal: opts.signal } : {}),
        maxBuffer: 1024 * 1024,
      });
    } catch (e) {
      const err = e as NodeJS.ErrnoException & { stderr?: string };
      if (err.code === 'ENOENT') throw missingTool('genisoimage', 'genisoimage', e);
      throw new ComputeError('SPW_ERR_CONFIG_DRIVE', `config drive: genisoimage failed: ${err.stderr?.trim() || err.message}`, { cause: e });
    }
    await rename(tmp, output);
    return output;
  } finally {
    await rm(stage, { recursive: true, force: true });
  }
}
