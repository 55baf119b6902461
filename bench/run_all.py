"""Run every benchmark with its small defaults (``make bench``); each writes bench/out/<name>.json.

    python bench/run_all.py [--only resize,shards] [--quick]

``--quick`` passes smaller sizes (a smoke test: ~3 min here) and writes its results as
bench/out/<name>_quick.json, leaving a full run's files alone. Extra options of a
single benchmark: run it directly (``python bench/bench_train_step.py --compile``). A failing
benchmark is reported and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_DIR, table, write_result  # noqa: E402

BENCHMARKS = {
    "resize": ([], ["--repeats", "5", "--rounds", "1"]),
    "shards": ([], ["--images", "100", "--repeats", "1", "--breakdown", "20"]),
    "train_step": ([], ["--steps", "2", "--precision", "fp32"]),
    "dag": ([], ["--images", "1000", "--repeats", "1", "--skip-imports"]),
    "datawait": ([], ["--quick"]),
    "fixed_cost": (["--rounds", "1"], ["--rounds", "1"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {list(BENCHMARKS)}")
    ap.add_argument("--quick", action="store_true", help="smaller sizes: a smoke test")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; have {list(BENCHMARKS)}")

    rows = []
    for name in names:
        default, quick = BENCHMARKS[name]
        cmd = [
            sys.executable,
            str(BENCH_DIR / f"bench_{name}.py"),
            *(quick if args.quick else default),
        ]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        env = {**os.environ, "BENCH_SUFFIX": "_quick"} if args.quick else None
        rc = subprocess.run(cmd, env=env).returncode
        rows.append({"benchmark": name, "exit": rc, "wall s": time.perf_counter() - t})
    print("\n=== summary")
    print(table(rows))
    write_result("run_all_quick" if args.quick else "run_all", {"quick": args.quick, "runs": rows})
    sys.exit(1 if any(r["exit"] for r in rows) else 0)


if __name__ == "__main__":
    main()
