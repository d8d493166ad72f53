// The process-wide Prometheus registry every layer counts into (prom-client).
import { Registry } from 'prom-client';

export const registry = new Registry();
