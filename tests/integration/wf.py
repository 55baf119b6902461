"""Helpers to run the real workflow in a temporary folder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
COPY = ("Snakefile", "rules", "scripts", "src", "schemas", "envs", "profiles", "config")


def copy_workflow(dest: Path) -> Path:
    """A private copy of the workflow code, so a test may edit the package source."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, code: Path | None = None, check: bool = True):
    """Run snakemake on ``workdir`` with its cfg.yaml; returns the CompletedProcess."""
    code = code or REPO
    cmd = [
        SNAKEMAKE,
        "--snakefile",
        str(code / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "cfg.yaml"),
        "--cores",
        "2",
        *args,
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def planned_jobs(workdir: Path, code: Path | None = None, *targets: str) -> dict[str, int]:
    """Jobs a dry run would execute, as {rule: count} (empty when nothing is to be done)."""
    out = snakemake(workdir, *targets, "-n", "--quiet", "rules", code=code)
    text = out.stdout + out.stderr
    if "Nothing to be done" in text:
        return {}
    m = re.search(r"Job stats:\n(.*?)\n\s*total\s+\d+", text, re.S)
    assert m, text[-3000:]
    jobs = {}
    for line in m.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            jobs[parts[0]] = int(parts[1])
    return jobs
