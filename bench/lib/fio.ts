// fio's `--output-format=json` reduced to the figures benches report. Only the fields used are
// typed; everything is checked as it is read, so a format change fails loudly, not as NaN.

export interface LatencySummary {
  /** Number of samples. */
  n: number;
  meanUs: number;
  p50Us: number | null;
  p99Us: number | null;
  p999Us: number | null;
}

export interface DirectionStats {
  /** Completed I/Os of this direction. */
  ios: number;
  iops: number;
  bytesPerSec: number;
  /** Completion latency (submission to completion): the figure fio's percentiles are on. */
  clat: LatencySummary;
}

export interface FioJob {
  name: string;
  read: DirectionStats;
  write: DirectionStats;
  /** Sync (flush/fsync) requests fio issued, with their latency; null when fio reports none. */
  sync: { ios: number; lat: LatencySummary | null } | null;
  /** Seconds the job ran. */
  runtimeSec: number;
}

/** fio's percentile keys look like "99.000000"; the list is set with --percentile_list. */
export const FIO_PERCENTILE_ARGS = ['--percentile_list=50:99:99.9'];

type Json = Record<string, unknown>;

function obj(v: unknown, where: string): Json {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error(`fio JSON: ${where} is not an object`);
  return v as Json;
}

function num(v: unknown, where: string): number {
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new Error(`fio JSON: ${where} is not a number`);
  return v;
}

function percentile(pct: Json | undefined, key: string): number | null {
  const v = pct?.[key];
  return typeof v === 'number' ? v / 1000 : null;
}

function latency(v: unknown, where: string): LatencySummary {
  const o = obj(v, where);
  const pct = o['percentile'] === undefined ? undefined : obj(o['percentile'], `${where}.percentile`);
  return {
    n: num(o['N'] ?? 0, `${where}.N`),
    meanUs: num(o['mean'], `${where}.mean`) / 1000,
    p50Us: percentile(pct, '50.000000'),
    p99Us: percentile(pct, '99.000000'),
    p999Us: percentile(pct, '99.900000'),
  };
}

function direction(v: unknown, where: string): DirectionStats {
  const o = obj(v, where);
  return {
    ios: num(o['total_ios'], `${where}.total_ios`),
    iops: num(o['iops'], `${where}.iops`),
    bytesPerSec: num(o['bw_bytes'], `${where}.bw_bytes`),
    clat: latency(o['clat_ns'], `${where}.clat_ns`),
  };
}

/**
 * Parse fio's stdout. Some engines print a line before the JSON (the nbd engine prints
 * "fio: connected to NBD server"), so parsing starts at the first line that opens an object.
 * Throws when a job reports an error.
 */
export function parseFioJson(stdout: string): FioJob[] {
  const start = stdout.search(/^\{/m);
  if (start < 0) throw new Error(`fio printed no JSON:\n${stdout.slice(0, 2000)}`);
  const root = obj(JSON.parse(stdout.slice(start)) as unknown, 'root');
  const jobs = root['jobs'];
  if (!Array.isArray(jobs) || jobs.length === 0) throw new Error('fio JSON: no jobs');
  return jobs.map((j: unknown, i) => {
    const job = obj(j, `jobs[${i}]`);
    const name = String(job['jobname'] ?? `job${i}`);
    const error = num(job['error'] ?? 0, `jobs[${i}].error`);
    if (error !== 0) throw new Error(`fio job ${name} failed with error ${error}`);
    let sync: FioJob['sync'] = null;
    if (job['sync'] !== undefined) {
      const s = obj(job['sync'], `jobs[${i}].sync`);
      const ios = num(s['total_ios'] ?? 0, `jobs[${i}].sync.total_ios`);
      sync = { ios, lat: ios > 0 && s['lat_ns'] !== undefined ? latency(s['lat_ns'], `jobs[${i}].sync.lat_ns`) : null };
    }
    return {
      name,
      read: direction(job['read'], `jobs[${i}].read`),
      write: direction(job['write'], `jobs[${i}].write`),
      sync,
      runtimeSec: num(job['job_runtime'], `jobs[${i}].job_runtime`) / 1000,
    };
  });
}
