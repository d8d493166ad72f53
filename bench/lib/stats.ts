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
