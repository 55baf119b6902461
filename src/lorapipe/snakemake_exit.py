"""A quicker exit for Snakemake's main process (#17). Stdlib only: the Snakefile imports it.

Measured on a run with nothing to do or a few jobs (bench/README.md, "Snakemake's exit"), the
main process spent 0.4-0.7 s after its last line and, after a run with jobs, up to 1 s more:

- Interpreter shutdown runs the cyclic garbage collector over every object of every module
  Snakemake imported (pandas, sqlalchemy, boto3 through its plugins). `freeze_at_exit` moves them
  to the collector's permanent generation first, so shutdown does not traverse them again. Nothing
  else changes: objects are still released by reference counting, log handlers are still closed
  by logging's own exit handler, and no file of the run is written by a finalizer.
- Snakemake's scheduler arms a non-daemon `threading.Timer` (its job rate limiter's timespan,
  1 s by default) on every pass of its loop, and the interpreter waits for the pending ones
  before it exits. `cancel_scheduler_timers` cancels them once the run has ended (the Snakefile's
  ``onsuccess``/``onerror``), when nothing is left for them to wake.
"""

import atexit
import gc
import threading


def freeze_at_exit() -> None:
    """Freeze the garbage collector's objects when the process exits (see the module doc)."""
    atexit.register(gc.freeze)


def cancel_scheduler_timers() -> int:
    """Cancel the pending wake-up timers of Snakemake's job scheduler; how many there were.
    Only call it after the scheduler's loop has ended."""
    cancelled = 0
    for thread in threading.enumerate():
        function = getattr(thread, "function", None)
        # Snakemake's spelling: JobScheduler._schedule_reevalutation.<locals>.<lambda>
        if isinstance(thread, threading.Timer) and "_schedule_reeval" in getattr(
            function, "__qualname__", ""
        ):
            thread.cancel()
            cancelled += 1
    return cancelled
