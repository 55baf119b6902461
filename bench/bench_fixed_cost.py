"""The fixed cost around training (issue #17): the shipped demo, fresh, after a changed
``learning_rate``, and with nothing changed; wall time, jobs and where each job's time went.

Each tree is a whole workflow checkout: a git revision (``git archive`` of this repository into
``bench/out/fixed_cost/``) or a folder. Per round and tree, in a fresh copy of it (the demo runs
in the workflow folder, as ``make demo`` does, with its own MLflow store and sha256 cache):

1. ``fresh``: ``snakemake --cores N`` (the shipped demo: tiny model, 40 synthetic images);
2. ``lr``: the demo with ``runs.demo.learning_rate`` changed (a second config file);
3. ``noop``: the same command again (expect no job);
4. ``user``: the job count of a dry run of the README's "your own config" command on a folder
   dataset (``--user-cmd``; ``config/config.yaml mine.yaml`` is what the README said before).

Trees alternate within a round (ABAB…, the order reversed every other round), so load from other
processes on this shared machine hits them alike. Per-job times come from Snakemake's own
records (``.snakemake/metadata``: start and end of every job), so the table shows which rules ran,
how many jobs each and their summed wall seconds. ``interpreter+torch`` is the wall time of a
fresh ``python -c "import torch, diffusers"``, the floor each job that touches a model pays.

    python bench/bench_fixed_cost.py --tree before=7cf4ced --tree after=HEAD [--rounds 2]
    python bench/bench_fixed_cost.py --tree mine=/path/to/checkout --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    load_average,
    median,
    out_dir,
    stop_warm_workers,
    table,
    write_result,
)  # fmt: skip

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SCENARIOS = ("fresh", "lr", "noop")
LR_YAML = "runs:\n  demo:\n    learning_rate: 5.0e-4\n"
MINE_YAML = """\
datasets:
  mine:
    path: data/mine
    resolution: 64
    bucket_step: 16
    shards: 4
    caption_template: "a picture in {trigger} style"
    trigger: mine
base_models:
  tiny-sd:
    path: results/models/tiny-sd
    tiny: {seed: 0}
runs:
  mine:
    dataset: mine
    base_model: tiny-sd
    epochs: 2
    validation_prompts: ["a picture in mine style"]
"""


def materialise(label: str, spec: str, root: Path) -> Path:
    """The workflow source of a tree: a folder as it is, or ``git archive <rev>`` unpacked."""
    if Path(spec).is_dir():
        return Path(spec).resolve()
    dest = root / f"src-{label}"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", spec], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def fresh_copy(src: Path, dest: Path) -> Path:
    """The workflow files of ``src`` in an empty ``dest`` (no results, logs or store)."""
    if dest.exists():
        shutil.rmtree(dest)
    skip = shutil.ignore_patterns(
        "results", "logs", "benchmarks", ".snakemake", "mlflow.db", "mlruns", "data", ".venv",
        "__pycache__", "bench", "tests", "docs", ".git",
    )  # fmt: skip
    shutil.copytree(src, dest, ignore=skip)
    (dest / "lr.yaml").write_text(LR_YAML)
    (dest / "mine.yaml").write_text(MINE_YAML)
    return dest


def env_for(work: Path) -> dict[str, str]:
    """A job environment of its own: no PYTHONPATH or tracking URI from outside, and a sha256
    cache in the work folder (so "first use" of the model is measured as first use)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env["LORAPIPE_CACHE"] = str(work / ".lorapipe-cache")
    return env


def job_stats(text: str) -> dict[str, int]:
    """{rule: jobs} from Snakemake's "Job stats" table (the first one of the output)."""
    m = re.search(r"Job stats:\n(.*?)\n\s*total\s+\d+", text, re.S)
    if not m:
        return {}
    out = {}
    for line in m.group(1).splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def job_spans(work: Path, since: float) -> list[tuple[str, float, float]]:
    """(rule, start, end) of each job that started after ``since``, from Snakemake's per-output
    records: a job's outputs share its ``job_hash``; it started when its first output's
    incomplete marker was made and ended when its last output was written. In start order."""
    folder = work / ".snakemake" / "metadata"
    jobs: dict[tuple, list[float]] = {}
    for f in folder.iterdir() if folder.is_dir() else ():
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        start, end = rec.get("starttime"), rec.get("endtime")
        if start is None or end is None or start < since:
            continue
        span = jobs.setdefault((rec.get("job_hash"), rec["rule"]), [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
    return sorted(((rule, a, b) for (_, rule), (a, b) in jobs.items()), key=lambda j: j[1])


def job_times(spans: list[tuple[str, float, float]]) -> dict[str, list[float]]:
    """{rule: [wall seconds of each job]} of `job_spans`."""
    out: dict[str, list[float]] = defaultdict(list)
    for rule, start, end in spans:
        out[rule].append(end - start)
    return dict(out)


def benchmark_times(work: Path, since: float) -> dict[str, list[float]]:
    """{stage: [seconds of each job]} from Snakemake's ``benchmark:`` files written after
    ``since`` (``benchmarks/<stage>/...tsv``, column ``s``): the job's own process from its start
    to its exit. `job_spans` takes a job's start from the moment Snakemake marked it started and
    its end from its last output's mtime; the two agreed to 0.05 s on a tiny run at stop 25 but
    not on one sd15 run at stop 24 (run_config: 14.6 s there, 4.8 s in its benchmark file), so
    both are kept."""
    out: dict[str, list[float]] = defaultdict(list)
    root = work / "benchmarks"
    for f in sorted(root.rglob("*.tsv")) if root.is_dir() else ():
        try:
            if f.stat().st_mtime < since:
                continue
            header, row = (line.split("\t") for line in f.read_text().splitlines()[:2])
            out[f.relative_to(root).parts[0]].append(float(row[header.index("s")]))
        except (OSError, ValueError):
            continue
    return dict(out)


def timeline(spans: list[tuple[str, float, float]], t0: float) -> list[list]:
    """[rule, start, end] of each of `job_spans`, in seconds from ``t0``: where a run's wall
    time goes (what runs side by side, and the gaps before the first job and after the last)."""
    return [[rule, round(a - t0, 2), round(b - t0, 2)] for rule, a, b in spans]


def run(work: Path, args: list[str], cores: int) -> dict:
    """One Snakemake invocation in ``work``: wall time, planned jobs, per-rule job times."""
    cmd = [SNAKEMAKE, "--cores", str(cores), *args]
    load0 = load_average()
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=work, env=env_for(work), capture_output=True, text=True)
    wall = time.time() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {work} failed:\n{text[-6000:]}")
    jobs = {} if "Nothing to be done" in text else job_stats(text)
    spans = job_spans(work, t0)
    return {
        "wall_s": wall,
        "jobs": sum(n for r, n in jobs.items() if r != "all"),
        "planned": jobs,
        "times": job_times(spans),
        "benchmark_s": benchmark_times(work, t0),
        "timeline": timeline(spans, t0),
        "load": [load0, load_average()],
    }


def dry_jobs(work: Path, args: list[str]) -> int:
    """Jobs (not counting ``all``) a dry run plans."""
    proc = subprocess.run(
        [SNAKEMAKE, "--cores", "2", "-n", *args], cwd=work, env=env_for(work),
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"dry run {args} in {work} failed:\n{tail}")
    stats = job_stats(proc.stdout + proc.stderr)
    return sum(n for r, n in stats.items() if r != "all")


def torch_floor() -> float:
    """Wall seconds of a fresh interpreter importing torch and diffusers."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, diffusers"], check=True)
    return time.perf_counter() - t0


def one_round(label: str, src: Path, root: Path, k: int, cores: int, user_cmds: dict) -> dict:
    """fresh, lr and noop on a fresh copy of ``src``; then the dry-run job counts of ``user``."""
    from lorapipe.demo import make_demo_dataset

    work = fresh_copy(src, root / f"{label}-r{k}")
    make_demo_dataset(work / "data" / "mine", images=40, seed=1)
    out = {"tree": label, "round": k, "torch_import_s": torch_floor()}
    # before anything is built: what a user's own config costs, demo or not
    out["user"] = {" ".join(a): dry_jobs(work, a) for a in user_cmds.get(label, [])}
    stop_warm_workers()  # fresh: it starts its own warm worker; lr and noop find it warm
    out["fresh"] = run(work, [], cores)
    out["lr"] = run(work, ["--configfile", "config/config.yaml", "lr.yaml"], cores)
    out["noop"] = run(work, ["--configfile", "config/config.yaml", "lr.yaml"], cores)
    return out


def summarise(results: list[dict], labels: list[str]) -> tuple[list[dict], list[dict]]:
    """(wall/jobs per tree and scenario, per-rule job count and seconds of fresh and lr)."""
    rows, rules = [], []
    for label in labels:
        mine = [r for r in results if r["tree"] == label]
        for sc in SCENARIOS:
            walls = [r[sc]["wall_s"] for r in mine]
            rows.append({
                "tree": label, "scenario": sc, "wall s (median)": median(walls),
                "min": min(walls), "max": max(walls), "jobs": mine[0][sc]["jobs"],
                "rounds": len(walls),
            })  # fmt: skip
        for sc in ("fresh", "lr"):
            names = sorted({n for r in mine for n in r[sc]["times"]})
            for name in names:
                per = [sum(r[sc]["times"].get(name, [])) for r in mine]
                rules.append({
                    "tree": label, "scenario": sc, "rule": name,
                    "jobs": len(mine[0][sc]["times"].get(name, [])), "job s (median)": median(per),
                })  # fmt: skip
    return rows, rules


def parse_trees(specs: list[str]) -> dict[str, str]:
    trees = {}
    for spec in specs:
        label, sep, where = spec.partition("=")
        if not sep or not label or not where:
            raise SystemExit(f"--tree {spec!r}: expected LABEL=REV or LABEL=FOLDER")
        trees[label] = where
    return trees


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], metavar="LABEL=REV|FOLDER")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument(
        "--user-cmd", action="append", default=[], metavar="LABEL=ARGS",
        help="dry-run args of the own-config command for a tree (repeatable), e.g. "
        "'before=--configfile config/config.yaml mine.yaml'",
    )  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the work folders")
    args = ap.parse_args()
    trees = parse_trees(args.tree or ["current=HEAD"])
    user_cmds: dict[str, list[list[str]]] = defaultdict(list)
    for spec in args.user_cmd:
        label, _, cmd = spec.partition("=")
        user_cmds[label].append(cmd.split())
    root = out_dir() / "fixed_cost"
    root.mkdir(parents=True, exist_ok=True)
    srcs = {label: materialise(label, where, root) for label, where in trees.items()}
    labels = list(trees)
    results = []
    for k in range(args.rounds):
        order = labels if k % 2 == 0 else labels[::-1]
        for label in order:
            print(f"round {k + 1}/{args.rounds}: {label} ({trees[label]})", flush=True)
            r = one_round(label, srcs[label], root, k, args.cores, user_cmds)
            results.append(r)
            print("  " + ", ".join(f"{sc} {r[sc]['wall_s']:.1f} s / {r[sc]['jobs']} jobs"
                                   for sc in SCENARIOS) + f"; user {r['user']}", flush=True)
            if not args.keep:
                shutil.rmtree(root / f"{label}-r{k}", ignore_errors=True)
    rows, rules = summarise(results, labels)
    print(table(rows))
    print()
    print(table(rules))
    users = [{"tree": r["tree"], "round": r["round"], **r["user"]} for r in results if r["user"]]
    if users:
        print()
        print(table(users))
    write_result("fixed_cost", {"trees": trees, "cores": args.cores, "summary": rows,
                                "rules": rules, "rounds": results})  # fmt: skip


if __name__ == "__main__":
    main()
