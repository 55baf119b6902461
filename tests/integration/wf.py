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
TEST_PLUGINS = Path(sys.prefix) / "test-plugins"  # tools/bootstrap.sh; tests/conftest.py
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


def small_config(
    experiment: str = "it", shards: int = 3, max_steps: int = 4, runs: dict | None = None
) -> dict:
    """A workflow config on the tiny model and a folder dataset ``data/mine`` of small images."""
    return {
        "mlflow": {"experiment": experiment},
        "datasets": {
            "mine": {
                "path": "data/mine",
                "resolution": 64,
                "bucket_step": 16,
                "shards": shards,
                "captioner": "template",
                "caption_template": "a {trigger}",
                "trigger": "thing",
            },
        },
        "base_models": {"tiny-sd": {"path": "results/models/tiny-sd", "tiny": {"seed": 0}}},
        "defaults": {
            "max_steps": max_steps,
            "save_steps": 2,
            "batch_size": 4,
            "lora_rank": 4,
            "validation_prompts": ["a thing"],
            "validation_steps": 2,
        },
        "runs": runs or {"r1": {"dataset": "mine", "base_model": "tiny-sd"}},
    }


def snakemake(
    workdir: Path, *args: str, code: Path | None = None, check: bool = True, plugins: bool = False,
    python: tuple[str, ...] = (),
):  # fmt: skip
    """Run snakemake on ``workdir`` with its cfg.yaml; returns the CompletedProcess.
    ``plugins``: with Snakemake's SLURM and S3 plugins (tools/bootstrap.sh's test-plugins).
    ``python``: interpreter options (``("-X", "importtime")``), run as ``python -m snakemake``."""
    code = code or REPO
    cmd = [
        *([sys.executable, *python, "-m", "snakemake"] if python else [SNAKEMAKE]),
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
    if plugins:
        env["PYTHONPATH"] = str(TEST_PLUGINS)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def planned_jobs(
    workdir: Path,
    code: Path | None = None,
    *targets: str,
    args: tuple[str, ...] = (),
    plugins: bool = False,
) -> dict[str, int]:
    """Jobs a dry run would execute, as {rule: count} (empty when nothing is to be done)."""
    out = snakemake(workdir, *targets, "-n", "--quiet", "rules", *args, code=code,
                    plugins=plugins)  # fmt: skip
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


class S3Server:
    """A real S3 API server on 127.0.0.1 (moto's, in its own process) with one bucket, for
    Snakemake's s3 storage plugin: object storage without a network."""

    def __init__(self, root: Path, bucket: str = "lorapipe"):
        import socket
        import time

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        self.log = root / "moto.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                break
            except OSError as e:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = self.log.read_text()[-2000:]
                    raise RuntimeError(f"moto server did not start: {tail}") from e
                time.sleep(0.2)
        self.client().create_bucket(Bucket=bucket)

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id="test", aws_secret_access_key="test",
            region_name="us-east-1",
        )  # fmt: skip

    def args(self, prefix: str) -> list[str]:
        """Snakemake options that put every declared input and output under s3://bucket/prefix."""
        return [
            "--default-storage-provider", "s3",
            "--default-storage-prefix", f"s3://{self.bucket}/{prefix}",
            "--storage-s3-endpoint-url", self.url,
            "--storage-s3-access-key", "test",
            "--storage-s3-secret-key", "test",
        ]  # fmt: skip

    def keys(self, prefix: str = "") -> dict[str, bytes]:
        """{key: bytes} of the bucket's objects under prefix."""
        c = self.client()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = c.get_object(Bucket=self.bucket, Key=o["Key"])["Body"].read()
        return out

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
