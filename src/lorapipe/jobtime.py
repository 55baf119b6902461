"""Where a job's wall time goes (#17): interpreter start, imports, model load, work.

A stage script calls `start` on its first line (after Snakemake's preamble); at exit the
job's phases are written as ``<log>.times.json`` beside its log. That file is no target and no
input of anything, so writing it restales nothing. Phases, in seconds:

- ``interpreter``: from the process's start (``/proc/self/stat``) to `start`: Python starting,
  site-packages, and Snakemake's script preamble (which imports snakemake to unpickle the job);
- ``imports``: the time spent executing modules imported after `start` (outermost imports
  only, timed around their loader; those made while loading a model count here, not there);
- ``model``: time inside `phase` ("model") blocks (loading a base model's parts or pipeline),
  imports excluded;
- ``work``: the rest, to exit.

Also ``warm``: whether the job ran in the warm worker (`lorapipe.warm`; its libraries imported
already, ``interpreter`` then counts the client's start and the hand-over).

Also ``heavy``: which of torch, diffusers, transformers, peft, mlflow the job had imported;
``slowest_imports``: its five slowest outermost imports, [module, seconds]; ``cpu_s`` and
``max_rss_mb``: its process's CPU time and peak memory (a warm job's own).
Stdlib only, and cheap: one meta-path finder that wraps loaders, a few clock reads.
"""

from __future__ import annotations

import atexit
import importlib.abc
import json
import os
import sys
import time
from contextlib import contextmanager

HEAVY = ("torch", "diffusers", "transformers", "peft", "mlflow", "safetensors", "PIL")

_state: dict = {"imports": 0.0, "model": 0.0, "model_imports": 0.0, "depth": 0, "in_model": 0,
          "outer": []}  # fmt: skip


def process_start() -> float | None:
    """Unix time this job's process started, or None.

    From ``/proc/self/stat`` (its start in clock ticks since boot) against the boot clock now;
    ``btime`` of ``/proc/stat`` is whole seconds and would add up to a second. A job run in the
    warm worker (`lorapipe.warm`) counts from its own client process's start."""
    handed = os.environ.get("LORAPIPE_JOB_START")
    if handed and os.environ.get("LORAPIPE_WARM_CHILD"):
        try:
            return float(handed)
        except ValueError:
            pass
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat; 20th after the command's ")"
        since = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - since
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class _Timed(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        outer = _state["depth"] == 0
        name = getattr(module, "__name__", "?")
        _state["depth"] += 1
        t = time.perf_counter()
        try:
            self._loader.exec_module(module)
        finally:
            _state["depth"] -= 1
            if outer:
                dt = time.perf_counter() - t
                _state["imports"] += dt
                _state["outer"].append((dt, name))
                if _state["in_model"]:
                    _state["model_imports"] += dt

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if _state["depth"]:  # nested import: its outermost import is timed already
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Timed(spec.loader)
                return spec
        return None


def start(log_path: str | os.PathLike) -> None:
    """Start timing this job; its phases go to ``<log_path>.times.json`` at exit."""
    if "t0" in _state:
        return
    _state["t0"], _state["wall0"] = time.perf_counter(), time.time()
    sys.meta_path.insert(0, _Finder())
    atexit.register(_write, f"{os.fspath(log_path)}.times.json")


@contextmanager
def phase(name: str = "model"):
    """Time a block as model loading (imports inside it still count as imports)."""
    t = time.perf_counter()
    _state["in_model"] += 1
    try:
        yield
    finally:
        _state["in_model"] -= 1
        if not _state["in_model"]:
            _state[name] = _state.get(name, 0.0) + time.perf_counter() - t


def phases() -> dict:
    """The phases so far (see the module docstring)."""
    total = time.perf_counter() - _state["t0"]
    proc = process_start()
    interp = max(0.0, _state["wall0"] - proc) if proc is not None else None
    model = max(0.0, _state["model"] - _state["model_imports"])
    return {
        "started": proc if proc is not None else _state["wall0"],
        "interpreter": interp,
        "imports": _state["imports"],
        "model": model,
        "work": max(0.0, total - _state["imports"] - model),
        "heavy": [m for m in HEAVY if m in sys.modules],
        "warm": bool(os.environ.get("LORAPIPE_WARM_CHILD")),
        "slowest_imports": [[n, round(dt, 3)] for dt, n in sorted(_state["outer"])[::-1][:5]],
        **_usage(),
    }


def _usage() -> dict:
    """This process's CPU seconds (user + system) and peak resident memory in MiB: in the warm
    worker, the job's own child's, which Snakemake's benchmark files cannot see (they measure
    the waiting client). A forked child's peak starts from what it shares with the worker, as a
    cold job's includes its own imports."""
    try:
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF)
    except (ImportError, OSError):
        return {}
    rss_mb = ru.ru_maxrss / 2**20 if sys.platform == "darwin" else ru.ru_maxrss / 1024
    return {"cpu_s": round(ru.ru_utime + ru.ru_stime, 3), "max_rss_mb": round(rss_mb, 1)}


def _write(path: str) -> None:
    try:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(phases(), f)
        os.replace(tmp, path)
    except OSError:
        pass  # a measurement: never fail the job for it
