// Small statistics for repeated measurements.

/** Median of the values (mean of the middle two for an even count); NaN for none. */
export function median(values: readonly number[]): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  const hi = sorted[mid] as number;
  return sorted.length % 2 === 1 ? hi : ((sorted[mid - 1] as number) + hi) / 2;
}

/** ours / theirs, or null when either side is missing or theirs is zero. */
export function ratio(ours: number | null | undefined, theirs: number | null | undefined): number | null {
  if (ours === null || ours === undefined || theirs === null || theirs === undefined) return null;
  if (!Number.isFinite(ours) || !Number.isFinite(theirs) || theirs === 0) return null;
  return ours / theirs;
}

/** Spread of the runs as (max - min) / median, a quick noise indicator; null for fewer than 2. */
export function spread(values: readonly number[]): number | null {
  if (values.length < 2) return null;
  const m = median(values);
  if (!Number.isFinite(m) || m === 0) return null;
  return (Math.max(...values) - Math.min(...values)) / m;
}

/** after − before per key, rounded to `digits` decimals (counters sampled around a measurement). */
export function diff(after: Record<string, number>, before: Record<string, number>, digits = 2): Record<string, number> {
  const out: Record<string, number> = {};
  const f = 10 ** digits;
  for (const k of Object.keys(after)) out[k] = Math.round(((after[k] ?? 0) - (before[k] ?? 0)) * f) / f;
  return out;
}

export type Verdict = 'met' | 'missed' | 'n/a';

/** Whether a figure meets its target (n/a when there is no figure). */
export function verdict(value: number | null, target: number, higherIsBetter: boolean): Verdict {
  if (value === null || !Number.isFinite(value)) return 'n/a';
  return (higherIsBetter ? value >= target : value <= target) ? 'met' : 'missed';
}
