"""Snakemake at scale: DAG build, job count, no-op rerun and one-image staleness at 10k images.

In a fresh temporary workdir: ``--images`` tiny PNGs (16x16, written straight with PIL) in
data/bench, and a config shaped like config/config.yaml (one real-folder dataset with 64 shards,
the tiny-sd base model, one run). Then, against the real Snakefile:

1. ``snakemake -n`` (whole DAG): wall time (median of ``--repeats``) and the jobs it plans;
2. a real run of the manifest stage (target results/bench/manifest.jsonl, ``--cores 2``): wall
   time and what that means per job;
3. the no-op dry run of that target afterwards (expect "Nothing to be done") and the whole-DAG dry
   run (the manifest jobs must be gone from it);
4. one image added: which jobs a dry run plans (expect 1 manifest + merge, not 64);
5. per-job start-up: ``python -c "import lorapipe.manifest"`` vs ``"import torch, diffusers"``
   (and a bare interpreter, and the import a ``script:`` job's preamble does);
6. the cost of assigning images to shards with one pass over the dataset per shard (what
   rules/common.smk's shard_relpaths did, five times per shard, before commit 06ff572) vs one
   pass for all shards (what it does since).

    python bench/bench_dag.py [--images 10000] [--shards 64] [--repeats 3] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, median, out_dir, table, write_result  # noqa: E402

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
DATASET = "bench"


def write_images(root: Path, n: int, start: int = 0) -> list[str]:
    """``n`` distinct 16x16 PNGs in 100 sub-folders (like a real photo tree); relative paths."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(start)
    rels = []
    for i in range(start, start + n):
        rel = f"d{i % 100:02d}/img_{i:06d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            root / rel, format="PNG", compress_level=1
        )
        rels.append(rel)
    return rels


def write_config(path: Path, shards: int) -> None:
    """Shaped like config/config.yaml: one folder dataset (no `synthetic`), tiny-sd, one run."""
    import yaml

    cfg = {
        "mlflow": {"tracking_uri": None, "experiment": "bench"},
        "datasets": {
            DATASET: {
                "path": f"data/{DATASET}",
                "resolution": 32,  # min_size 0.5 x 32 = 16: the 16x16 images are accepted
                "bucket_step": 16,
                "shards": shards,
                "captioner": "template",
                "caption_template": "a picture in {trigger} style",
                "trigger": "lorapipe",
            }
        },
        "base_models": {"tiny-sd": {"path": "results/models/tiny-sd", "tiny": {"seed": 0}}},
        "defaults": {
            "lora_rank": 8,
            "lora_alpha": 8,
            "learning_rate": 2.0e-4,
            "batch_size": 4,
            "epochs": 1,
            "warmup_steps": 0,
            "mixed_precision": "auto",
            "compile": "auto",
            "seed": 0,
        },
        "runs": {"bench": {"dataset": DATASET, "base_model": "tiny-sd"}},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def snakemake(workdir: Path, *args: str) -> tuple[float, str]:
    """Run snakemake on ``workdir``; returns (wall seconds, stdout+stderr)."""
    cmd = [
        SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(workdir / "cfg.yaml"), *args,
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    env.pop("PYTHONPATH", None)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    return wall, out


def job_stats(text: str) -> dict[str, int]:
    """{rule: count} from the "Job stats" table of a dry run ({} for "Nothing to be done")."""
    m = re.search(r"Job stats:\n(.*?)\n\s*total\s+(\d+)", text, re.S)
    if not m:
        if "Nothing to be done" in text:
            return {}
        raise RuntimeError(f"no job stats in:\n{text[-3000:]}")
    jobs = {}
    for line in m.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            jobs[parts[0]] = int(parts[1])
    assert sum(jobs.values()) == int(m.group(2)), (jobs, m.group(2))
    return jobs


def dry_runs(workdir: Path, repeats: int, *target: str) -> tuple[list[float], dict[str, int]]:
    times, jobs = [], {}
    for _ in range(repeats):
        wall, out = snakemake(workdir, "-n", *target)
        times.append(wall)
        jobs = job_stats(out)
    return times, jobs


def import_times(repeats: int) -> dict[str, float]:
    """Median wall seconds of a fresh interpreter doing each import (what every job pays)."""
    snippets = {
        "python -c pass": "pass",
        "import lorapipe.manifest": "import lorapipe.manifest",
        "script: preamble (import snakemake.script)": "import snakemake.script",
        "import torch, diffusers": "import torch, diffusers",
        "from diffusers import UNet2DConditionModel": "from diffusers import UNet2DConditionModel",
    }
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = {}
    for name, code in snippets.items():
        ts = []
        heavy = "torch" in code or "diffusers" in code  # seconds each: one repeat fewer
        for _ in range(max(1, repeats - 1) if heavy else repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
            ts.append(time.perf_counter() - t)
        out[name] = median(ts)
    return out


def assignment_cost(rels: list[str], shards: int) -> dict[str, float]:
    """Seconds to find every shard's files with one full pass per shard (common.smk before
    06ff572, five times per shard) vs one pass over the dataset (common.smk since)."""
    sys.path.insert(0, str(REPO / "src"))
    from lorapipe.manifest import shard_files, shard_of

    t = time.perf_counter()
    per_shard = [shard_files(rels, shards, s) for s in range(shards)]
    a = time.perf_counter() - t
    t = time.perf_counter()
    groups: dict[int, list[str]] = {}
    for p in rels:
        groups.setdefault(shard_of(p, shards), []).append(p)
    b = time.perf_counter() - t
    assert all(per_shard[s] == groups.get(s, []) for s in range(shards))
    return {"per_shard_pass_s": a, "single_pass_s": b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="dry runs / imports per measurement")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument("--skip-imports", action="store_true")
    args = ap.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-dag-", dir=out_dir()))
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "data" / DATASET
    res: dict = {"images": args.images, "shards": args.shards, "cores": args.cores}
    try:
        t = time.perf_counter()
        rels = write_images(root, args.images)
        res["generate_s"] = time.perf_counter() - t
        write_config(workdir / "cfg.yaml", args.shards)
        print(f"workdir {workdir}: {args.images} images in {res['generate_s']:.1f} s", flush=True)

        times, jobs = dry_runs(workdir, args.repeats)
        res["dag_dry_run_s"], res["dag_jobs"] = times, jobs
        total = sum(jobs.values())
        print(f"dry run (whole DAG): {median(times):.2f} s median, {total} jobs {jobs}", flush=True)

        target = f"results/{DATASET}/manifest.jsonl"
        wall, out = snakemake(workdir, "--cores", str(args.cores), target)
        done = re.findall(r"(\d+) of (\d+) steps \(100%\) done", out)
        res["manifest_stage"] = {"wall_s": wall, "jobs": int(done[-1][1]) if done else None}
        n_jobs = res["manifest_stage"]["jobs"] or args.shards + 1
        print(
            f"manifest stage run: {wall:.1f} s for {n_jobs} jobs "
            f"(wall x cores / jobs: {wall * args.cores / n_jobs:.2f} s)",
            flush=True,
        )

        times, noop = dry_runs(workdir, args.repeats, target)
        res["noop_dry_run_s"], res["noop_jobs"] = times, noop
        print(
            f"no-op dry run of {target}: {median(times):.2f} s, jobs {noop or 'none'}", flush=True
        )
        times, after = dry_runs(workdir, 1)
        res["dag_after_manifest_jobs"] = after
        print(f"whole-DAG dry run after the manifest stage: {after}", flush=True)

        added = write_images(root, 1, start=args.images)[0]
        times, stale = dry_runs(workdir, args.repeats, target)
        res["added_image"] = added
        res["one_image_dry_run_s"], res["one_image_jobs"] = times, stale
        _, stale_all = dry_runs(workdir, 1)
        res["one_image_dag_jobs"] = stale_all
        print(
            f"one image added ({added}): dry run of {target} plans {stale} "
            f"(whole DAG: manifest {stale_all.get('manifest', 0)} of {args.shards})",
            flush=True,
        )

        res["shard_assignment"] = assignment_cost(rels + [added], args.shards)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if not args.skip_imports:
        res["import_s"] = import_times(args.repeats)

    rows = [
        {"measure": "dry run, whole DAG (s)", "value": median(res["dag_dry_run_s"])},
        {"measure": "jobs in the DAG", "value": sum(res["dag_jobs"].values())},
        {"measure": "manifest stage run (s)", "value": res["manifest_stage"]["wall_s"]},
        {"measure": "manifest stage jobs", "value": n_jobs},
        {
            "measure": "manifest stage images/s",
            "value": args.images / res["manifest_stage"]["wall_s"],
        },
        {"measure": "no-op dry run (s)", "value": median(res["noop_dry_run_s"])},
        {"measure": "no-op jobs planned", "value": sum(res["noop_jobs"].values())},
        {"measure": "+1 image: dry run (s)", "value": median(res["one_image_dry_run_s"])},
        {"measure": "+1 image: jobs planned", "value": str(res["one_image_jobs"])},
        {
            "measure": "+1 image: manifest jobs in whole DAG",
            "value": res["one_image_dag_jobs"].get("manifest", 0),
        },
        {
            "measure": "shard assignment, pass per shard (s)",
            "value": res["shard_assignment"]["per_shard_pass_s"],
        },
        {
            "measure": "shard assignment, one pass (s)",
            "value": res["shard_assignment"]["single_pass_s"],
        },
    ]
    rows += [
        {"measure": f"start-up: {k} (s)", "value": v} for k, v in res.get("import_s", {}).items()
    ]
    print()
    print(table(rows))
    write_result(f"bench_dag{'' if args.images == 10000 else f'_{args.images}'}", res)


if __name__ == "__main__":
    main()
