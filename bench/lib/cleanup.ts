// Everything a bench starts or creates registers an undo step here, so that a normal end, an
// exception, Ctrl-C or SIGTERM all leave no process and no temp file behind.
//
// Each step has an async form (used on a normal end and on signals: stop politely, wait) and a
// sync form (used from the 'exit' event, where nothing async can run: SIGKILL, rmSync).

export interface CleanupStep {
  /** What the step undoes, for error messages. */
  label: string;
  async: () => Promise<void>;
  sync: () => void;
}

const steps = new Set<CleanupStep>();
let installed = false;
let running: Promise<void> | null = null;

/** Register an undo step; returns a function that unregisters it (call it once undone). */
export function onCleanup(step: CleanupStep): () => void {
  steps.add(step);
  return () => {
    steps.delete(step);
  };
}

/** Run every registered step, newest first. Errors are reported, not thrown: all steps run. */
export function runCleanups(): Promise<void> {
  if (running) return running;
  running = (async () => {
    for (const step of [...steps].reverse()) {
      steps.delete(step);
      try {
        await step.async();
      } catch (e) {
        console.error(`cleanup: ${step.label}: ${(e as Error).message}`);
      }
    }
  })().finally(() => {
    running = null;
  });
  return running;
}

function runCleanupsSync(): void {
  for (const step of [...steps].reverse()) {
    steps.delete(step);
    try {
      step.sync();
    } catch {
      // Last resort on exit: nothing more can be done.
    }
  }
}

const SIGNAL_NUMBERS: Partial<Record<NodeJS.Signals, number>> = { SIGHUP: 1, SIGINT: 2, SIGTERM: 15 };

/**
 * On SIGINT/SIGTERM/SIGHUP: run the cleanups and exit 128+signal. On process exit (including
 * after an uncaught exception): run whatever is left synchronously. Call once, early.
 */
export function installCleanupHandlers(): void {
  if (installed) return;
  installed = true;
  for (const [signal, num] of Object.entries(SIGNAL_NUMBERS) as [NodeJS.Signals, number][]) {
    process.once(signal, () => {
      console.error(`\n${signal}: stopping servers and removing temp files…`);
      // A second signal while cleaning up kills the processes outright.
      process.once(signal, () => {
        runCleanupsSync();
        process.exit(128 + num);
      });
      void runCleanups().finally(() => process.exit(128 + num));
    });
  }
  process.on('exit', runCleanupsSync);
}

/** A bench script's entry point: run `main`, report a failure as `NAME: message` with exit code 1,
 *  and always run the registered cleanups. */
export function runBench(name: string, main: () => Promise<void>): void {
  main()
    .catch((e: unknown) => {
      console.error(`${name}: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
      process.exitCode = 1;
    })
    .finally(() => runCleanups());
}
