// Which host an instance goes to: hard filters first (state, site, capacity, licences,
// compliance tags, HA), then a weighted score over what is left. Every decision is explained:
// each rejected host says why, each candidate shows its score's parts. Pure and deterministic
// (ties go to the name that sorts first), so the same inventory always gives the same answer.

import type { Host, Site } from './types.js';

export interface PlacementNeed {
  vcpus: number;
  ramMiB: number;
  iops: number;
  licences: string[];
  tags: string[];
  ha: boolean;
  /** only hosts of this site (else: any cloud site). */
  site?: string;
  /** only this host (it still has to pass the filters). */
  host?: string;
  /** the instance's volume family: hosts already running it share its cache and chunks. */
  family?: string;
}

/** What is already placed on a host. */
export interface HostUsage {
  vcpus: number;
  ramMiB: number;
  iops: number;
  /** families of the instances running there. */
  families: string[];
}

export interface Weights {
  cost: number;
  headroom: number;
  load: number;
  affinity: number;
  ha: number;
}

/** Cost first, then room left after placing, then I/O load, then cache affinity. */
export const DEFAULT_WEIGHTS: Weights = { cost: 0.35, headroom: 0.25, load: 0.2, affinity: 0.15, ha: 0.05 };

export interface Candidate {
  host: string;
  score: number;
  parts: Weights;
}

export interface Placement {
  chosen: string | null;
  candidates: Candidate[];
  rejected: Array<{ host: string; reasons: string[] }>;
  /** one sentence for logs, events and the CLI. */
  explanation: string;
}

function missing(need: string[], have: string[]): string[] {
  const h = new Set(have);
  return need.filter((x) => !h.has(x));
}

export function chooseHost(need: PlacementNeed, hosts: Host[], sites: Site[], usage: Map<string, HostUsage>, weights: Weights = DEFAULT_WEIGHTS): Placement {
  const siteOf = new Map(sites.map((s) => [s.name, s]));
  const rejected: Placement['rejected'] = [];
  const fit: Host[] = [];
  for (const h of [...hosts].sort((a, b) => a.name.localeCompare(b.name))) {
    const reasons: string[] = [];
    const site = siteOf.get(h.site);
    const used = usage.get(h.name) ?? { vcpus: 0, ramMiB: 0, iops: 0, families: [] };
    if (need.host !== undefined && h.name !== need.host) reasons.push(`not the requested host ${need.host}`);
    if (h.state !== 'up') reasons.push(`host is ${h.state}`);
    if (!site) reasons.push(`its site ${h.site} is not in the inventory`);
    else if (need.site !== undefined ? h.site !== need.site : site.kind !== 'cloud') reasons.push(need.site !== undefined ? `in site ${h.site}, not ${need.site}` : `site ${h.site} is not a cloud site`);
    if (h.vcpus - used.vcpus < need.vcpus) reasons.push(`${h.vcpus - used.vcpus} vCPUs free, needs ${need.vcpus}`);
    if (h.ramMiB - used.ramMiB < need.ramMiB) reasons.push(`${h.ramMiB - used.ramMiB} MiB RAM free, needs ${need.ramMiB}`);
    if (h.iops - used.iops < need.iops) reasons.push(`${h.iops - used.iops} IOPS free, needs ${need.iops}`);
    const lic = missing(need.licences, h.licences);
    if (lic.length > 0) reasons.push(`no licence for ${lic.join(', ')}`);
    const tags = missing(need.tags, [...h.tags, ...(site?.tags ?? [])]);
    if (tags.length > 0) reasons.push(`not compliant with ${tags.join(', ')}`);
    if (need.ha && !h.ha) reasons.push('no HA support');
    if (reasons.length > 0) rejected.push({ host: h.name, reasons });
    else fit.push(h);
  }
  if (fit.length === 0) {
    const why = rejected.map((r) => `${r.host}: ${r.reasons.join('; ')}`).join(' | ');
    return { chosen: null, candidates: [], rejected, explanation: hosts.length === 0 ? 'no host in the inventory' : `no host fits (${why})` };
  }
  const prices = fit.map((h) => h.pricePerHour);
  const lo = Math.min(...prices);
  const hi = Math.max(...prices);
  const candidates = fit.map((h): Candidate => {
    const used = usage.get(h.name) ?? { vcpus: 0, ramMiB: 0, iops: 0, families: [] };
    const parts: Weights = {
      cost: hi === lo ? 1 : (hi - h.pricePerHour) / (hi - lo),
      headroom: Math.min((h.vcpus - used.vcpus - need.vcpus) / h.vcpus, (h.ramMiB - used.ramMiB - need.ramMiB) / h.ramMiB),
      load: h.iops > 0 ? 1 - (used.iops + need.iops) / h.iops : 0,
      affinity: need.family !== undefined && used.families.includes(need.family) ? 1 : 0,
      ha: h.ha ? 1 : 0,
    };
    const score = weights.cost * parts.cost + weights.headroom * parts.headroom + weights.load * parts.load + weights.affinity * parts.affinity + weights.ha * parts.ha;
    return { host: h.name, score: Math.round(score * 1e6) / 1e6, parts };
  });
  candidates.sort((a, b) => b.score - a.score || a.host.localeCompare(b.host));
  const best = candidates[0]!;
  const top = (Object.keys(best.parts) as Array<keyof Weights>).sort((a, b) => weights[b] * best.parts[b] - weights[a] * best.parts[a])[0]!;
  const others = candidates.length > 1 ? `, ahead of ${candidates[1]!.host} (${candidates[1]!.score.toFixed(3)})` : '';
  return {
    chosen: best.host,
    candidates,
    rejected,
    explanation: `${best.host} scores ${best.score.toFixed(3)}${others}; it wins mostly on ${top}; ${rejected.length} host(s) filtered out`,
  };
}
