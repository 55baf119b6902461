"""Helpers shared by the benchmark scripts: output folder, timing, tables, JSON results.

Only the standard library: the resize benchmark runs part of itself in a second interpreter
that has nothing but Pillow installed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT = BENCH_DIR / "out"


def out_dir() -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    return OUT


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


LOAD_AT_START = load_average()


def machine() -> dict:
    """What the figures were measured on (timings here are noisy: shared CPUs).

    The 1-minute load average at start and at the end shows whether other processes competed:
    above the CPU count, torch steps here ran up to 9x slower than on a quiet machine.
    """
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_start": LOAD_AT_START,
        "load_average": load_average(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of ``rows`` (dicts), floats shown with 4 significant digits."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def write_result(name: str, result: dict) -> Path:
    """Write ``bench/out/<name>.json`` (with the command line and machine info) and say where.

    ``BENCH_SUFFIX`` in the environment is appended to the name (run_all --quick sets ``_quick``,
    so a smoke test does not overwrite the figures of a full run).
    """
    path = out_dir() / f"{name}{os.environ.get('BENCH_SUFFIX', '')}.json"
    payload = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        **result,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    print(f"\nresult: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return path


def stop_warm_workers(timeout: float = 30.0) -> None:
    """Stop this user's lorapipe warm workers (#17) and wait until they are gone, so that a
    "fresh" run pays for starting one, as a first run does."""
    import subprocess

    subprocess.run([sys.executable, "-m", "lorapipe.warm", "stop"], capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    folder = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"lorapipe-warm-{os.getuid()}"
    deadline = time.monotonic() + timeout
    while folder.is_dir() and any(folder.glob("*.sock")) and time.monotonic() < deadline:
        time.sleep(0.1)
