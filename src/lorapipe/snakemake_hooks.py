"""What the Snakefile asks of Snakemake's main process beyond rules (#17). Stdlib only: the
Snakefile imports it.

`will_run_jobs_here`: whether this invocation is a plain local run, known while the Snakefile is
parsed, so that the warm worker (lorapipe.warm) can start importing before Snakemake plans.

A quicker exit:

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
import sys
import threading

# Snakemake CLI options that make an invocation do something other than run jobs (snakemake/cli.py,
# args_to_api: each picks another branch than execute_workflow, or a pseudo-executor).
_NOT_A_RUN = (
    "dryrun", "touch", "lint", "list_target_rules", "list_rules", "print_compilation", "reporter",
    "report", "generate_unit_tests", "dag", "rulegraph", "filegraph", "d3dag", "unlock",
    "cleanup_metadata", "conda_cleanup_envs", "conda_create_envs_only", "list_conda_envs",
    "cleanup_shadow", "container_cleanup_images", "list_changes", "list_input_changes",
    "list_params_changes", "list_untracked", "summary", "detailed_summary", "archive",
    "delete_all_output", "delete_temp_output", "edit_notebook",
)  # fmt: skip


def will_run_jobs_here() -> bool:
    """True when this process is Snakemake's command line running jobs with the local executor:
    read from the parsed options of Snakemake's ``args_to_api`` up the call stack (the API gives
    a Snakefile no way to know its executor before planning). False when unsure: not called
    from Snakemake's command line (the API, another version), a dry run, a report, ``--lint``,
    another executor, or any option of `_NOT_A_RUN`."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "args_to_api" and code.co_filename.endswith("snakemake/cli.py"):
            args = frame.f_locals.get("args")
            break
        frame = frame.f_back
    else:
        return False
    if args is None or getattr(args, "executor", None) not in (None, "local"):
        return False
    if getattr(args, "containerize", None) is not None:
        return False
    return not any(getattr(args, name, None) for name in _NOT_A_RUN)


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
