"""Where each job's wall time goes (issue #17): the shipped demo fresh, after a changed
``learning_rate`` and with nothing changed, each job split into interpreter start, imports,
model load and work.

The scenarios are bench_fixed_cost.py's (its copy of the workflow, environment and Snakemake
invocation are reused). Per job, two records the workflow writes itself:

- ``<log>.times.json`` (`lorapipe.jobtime`, written by every stage script at exit; no target):
  ``interpreter`` (process start to the script's first line: Python, site-packages and
  Snakemake's script preamble), ``imports`` (modules imported after it), ``model`` (loading a
  base model's parts or pipeline, imports excluded), ``work`` (the rest), and which heavy
  libraries the job imported;
- Snakemake's ``benchmark:`` file where the rule has one (``s``: the job's wall seconds as
  Snakemake timed it, ``max_rss``).

Printed: per scenario and rule the jobs and the median of each phase over them, and the sums.
The machine this runs on may be shared: read ratios, not absolute seconds.

    python bench/bench_overhead.py [--tree current=HEAD] [--cores 2] [--keep]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, out_dir, table, write_result  # noqa: E402
from bench_fixed_cost import SCENARIOS, fresh_copy, materialise, parse_trees, run  # noqa: E402

PHASES = ("interpreter", "imports", "model", "work")


def job_phases(work: Path, since: float) -> list[dict]:
    """Every ``*.times.json`` under ``work/logs`` of a job that started after ``since``, with
    its rule (the first folder under logs/) and the benchmark seconds of its rule if any."""
    out = []
    for f in sorted((work / "logs").rglob("*.times.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("started", 0) < since:
            continue
        rec["rule"] = f.relative_to(work / "logs").parts[0]
        rec["log"] = str(f.relative_to(work))
        out.append(rec)
    return out


def benchmarks(work: Path) -> dict[str, list[float]]:
    """{benchmark file: [s of each record]} of ``work/benchmarks``."""
    out = {}
    for f in sorted((work / "benchmarks").rglob("*.tsv")):
        with f.open() as fh:
            rows = csv.DictReader(fh, delimiter="\t")
            out[str(f.relative_to(work))] = [float(r["s"]) for r in rows]
    return out


def by_rule(jobs: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for j in jobs:
        groups[j["rule"]].append(j)
    rows = []
    for rule, js in sorted(groups.items()):
        row = {"rule": rule, "jobs": len(js)}
        for p in PHASES:
            vals = [j[p] for j in js if j.get(p) is not None]
            row[f"{p} s"] = round(median(vals), 2) if vals else None
        row["job s"] = round(median([sum(j[p] or 0.0 for p in PHASES) for j in js]), 2)
        row["heavy"] = " ".join(sorted({m for j in js for m in j["heavy"]}))
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default="current=HEAD", metavar="LABEL=REV|FOLDER")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    (label, where), = parse_trees([args.tree]).items()
    root = out_dir() / "overhead"
    root.mkdir(parents=True, exist_ok=True)
    work = fresh_copy(materialise(label, where, root), root / f"{label}-work")
    from lorapipe.demo import make_demo_dataset

    make_demo_dataset(work / "data" / "mine", images=40, seed=1)
    argv = {"fresh": [], "lr": ["--configfile", "config/config.yaml", "lr.yaml"]}
    argv["noop"] = argv["lr"]
    result = {"tree": where, "cores": args.cores, "scenarios": {}}
    for sc in SCENARIOS:
        import time

        since = time.time() - 0.5
        r = run(work, argv[sc], args.cores)
        jobs = job_phases(work, since)
        rows = by_rule(jobs)
        sums = {p: round(sum(j[p] or 0.0 for j in jobs), 2) for p in PHASES}
        result["scenarios"][sc] = {"wall_s": r["wall_s"], "jobs": r["jobs"], "load": r["load"],
                                   "rules": rows, "sums": sums, "per_job": jobs}  # fmt: skip
        print(f"\n{sc}: {r['wall_s']:.1f} s wall, {r['jobs']} jobs, load {r['load']}; "
              f"summed over jobs: {sums}", flush=True)  # fmt: skip
        if rows:
            print(table(rows), flush=True)
    result["benchmarks"] = benchmarks(work)
    write_result("overhead", result)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
