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

A plan without pandas:

Snakemake's main process asks of every rule's params whether they are pandas, polars or numpy
objects, and imports those libraries to ask (snakemake 9: the script object of every script job,
`iocontainers.Snakemake._safely_store_params`; the params check of every plan,
`persistence.PersistenceBase._serialize_param`). pandas is installed (MLflow needs it), so every
invocation imported it: 0.3-0.5 s of a 1.8-2.5 s run with nothing to do (bench/README.md).
(numpy comes with Snakemake's own command line, through yte.) `probe_params_without_importing`
answers those two probes "not installed" for each of these libraries that nothing has imported
yet, which is exact: no value can be an instance of a type that was never imported. One that is
imported (a Snakefile that uses pandas, a plugin that imports it) is probed as before, and
anyone may still import any of them.
"""

import atexit
import contextlib
import functools
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


# What Snakemake's main process imports only to ask whether a value is one of their types.
PROBED = ("pandas", "polars", "numpy")


@contextlib.contextmanager
def _unimported_as_absent(names=PROBED):
    """While inside: each of ``names`` not imported yet is "not installed" (None in sys.modules:
    its import raises ModuleNotFoundError, importlib.util.find_spec gives None). For that
    moment it is so for every thread: an import of pandas on another thread right then would
    fail too (Snakemake's main process makes none beside these probes)."""
    marked = [n for n in names if n not in sys.modules]
    for n in marked:
        sys.modules[n] = None
    try:
        yield
    finally:
        for n in marked:
            if n in sys.modules and sys.modules[n] is None:
                del sys.modules[n]


def _guarded(fn):
    """``fn`` run inside `_unimported_as_absent`; ``fn`` itself when it is such a wrapper."""
    if getattr(fn, "_lorapipe_probe", False):
        return fn

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        with _unimported_as_absent():
            return fn(*args, **kwargs)

    guarded._lorapipe_probe = True
    return guarded


def probe_params_without_importing() -> list[str]:
    """Wrap Snakemake's two params type probes in `_unimported_as_absent` (see the module doc);
    the names of what is wrapped. Idempotent. Where this Snakemake has neither (another version),
    nothing is wrapped and they import as before (a test pins the wrapped ones)."""
    wrapped = []
    script_cls = getattr(sys.modules.get("snakemake.iocontainers"), "Snakemake", None)
    store = getattr(script_cls, "_safely_store_params", None)
    if store is not None:
        script_cls._safely_store_params = _guarded(store)
        wrapped.append("iocontainers.Snakemake._safely_store_params")
    persistence_cls = getattr(sys.modules.get("snakemake.persistence"), "PersistenceBase", None)
    prop = getattr(persistence_cls, "__dict__", {}).get("_serialize_param")
    if isinstance(prop, property) and prop.fget is not None:
        # (the chosen serializer stays cached per persistence by Snakemake's lru_cache)
        persistence_cls._serialize_param = property(_guarded(prop.fget))
        wrapped.append("persistence.PersistenceBase._serialize_param")
    return wrapped
