// The workflow engine (see engine.ts and docs/control-db.md).
export { ACTIVE_STATES, Engine, RESTING_STATES, type EngineOptions } from './engine.js';
export { ProgressThrottle, type ProgressNote } from './progress.js';
