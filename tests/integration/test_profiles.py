"""Snakemake profiles: they parse, and a dry run with `--profile profiles/slurm` (the real
snakemake-executor-plugin-slurm, no sbatch) plans every job of the demo workflow with the threads,
mem_mb, runtime and gpu each rule needs, and the plugin's partition selection sends GPU jobs to
the GPU partition. `--profile profiles/local` plans the same jobs."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from wf import REPO, copy_workflow, snakemake

PROFILES = REPO / "profiles"
GPU_RULES = {"train", "sample", "sample_base"}
# rules whose names are made in a loop (one per configured model/dataset) get default-resources,
# but for the encode jobs (one per dataset), which set theirs in rules/encode.smk
LOOP_RULES = ("tiny_model_", "demo_data_", "encode_")
ENCODE = {"mem_mb": 16000, "runtime": 60, "gpu": 1, "threads": 4}


def gpu_rule(rule: str) -> bool:
    return rule in GPU_RULES or rule.startswith("encode_")


def static_rules() -> set[str]:
    files = [REPO / "Snakefile", *(REPO / "rules").glob("*.smk")]
    return set(re.findall(r"^rule (\w+):", "".join(p.read_text() for p in files), re.M))


def test_profiles_parse_and_every_rule_has_its_resources():
    default = yaml.safe_load((PROFILES / "default" / "config.yaml").read_text())
    slurm = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    local = yaml.safe_load((PROFILES / "local" / "config.yaml").read_text())
    assert slurm["executor"] == "slurm" and local["executor"] == "local"
    assert (PROFILES / "slurm" / slurm["slurm-partition-config"]).is_file()
    # the workflow profile wins per top-level key: the cluster profile must not set the keys it
    # sets (they would be silently ignored)
    assert not set(slurm) & set(default) - {"rerun-triggers", "printshellcmds"}, set(slurm)
    assert not set(local) & set(default)
    for rule in static_rules() - {"all"}:
        res = default["set-resources"].get(rule)
        # train's mem_mb (and threads) follow its run's num_processes, in rules/train.smk
        need = {"runtime"} if rule == "train" else {"mem_mb", "runtime"}
        assert res and need <= set(res), f"{rule}: no mem_mb/runtime"
        assert bool(res.get("gpu", 0)) == (rule in GPU_RULES), rule
    assert "train" not in default["set-threads"]
    assert {"mem_mb", "runtime", "slurm_account"} <= set(slurm["default-resources"])
    assert "mlflow_db=1" in default["resources"]


def planned(text: str) -> dict[str, list[dict]]:
    """{rule: [{resource: value, "threads": n}, ...]} from a dry run's job blocks."""
    jobs: dict[str, list[dict]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"^(?:local)?rule (\S+):$", line):
            current = {"threads": 1}
            jobs.setdefault(m.group(1), []).append(current)
        elif current is not None and (m := re.match(r"^\s+threads: (\d+)$", line)):
            current["threads"] = int(m.group(1))
        elif current is not None and (m := re.match(r"^\s+resources: (.*)$", line)):
            for item in m.group(1).split(", "):
                k, _, v = item.partition("=")
                current[k] = int(v) if v.isdigit() else v
    return jobs


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the workflow and a folder with the shipped demo config (a synthetic dataset and
    the tiny model, both made by the workflow: nothing needs to exist for a dry run)."""
    root = tmp_path_factory.mktemp("profiles")
    code = copy_workflow(root / "code")
    work = root / "work"
    work.mkdir()
    shutil.copy(REPO / "config" / "config.yaml", work / "cfg.yaml")
    return code, work


def dry_run(code: Path, work: Path, profile: str, *args: str) -> str:
    out = snakemake(
        work, "-n", "--profile", str(code / "profiles" / profile),
        "--workflow-profile", str(code / "profiles" / "default"), *args, code=code, plugins=True,
    )  # fmt: skip
    return out.stdout + out.stderr


def test_slurm_dry_run_plans_every_job_with_its_resources(demo_workdir):
    code, work = demo_workdir
    # --cores caps threads (a dry run defaults to 1); on the cluster each job gets its own
    text = dry_run(code, work, "slurm", "--cores", "64")
    assert "This was a dry-run" in text, text[-3000:]
    jobs = planned(text)
    for rule in ("manifest", "caption", "shard"):
        assert len(jobs[rule]) == 4, rule  # per shard: spread over nodes
    assert len(jobs["encode_demo"]) == 2  # one job per latent folder (demo on tiny-sd, demo-xl on
    # tiny-sdxl): torch imported once per folder, not per shard
    assert {r for r in jobs if not r.startswith(LOOP_RULES)} == static_rules(), sorted(jobs)
    want = yaml.safe_load((PROFILES / "default" / "config.yaml").read_text())
    threads = want["set-threads"]
    for rule, blocks in jobs.items():
        if rule == "all":
            continue
        expect = want["set-resources"].get(rule, {"mem_mb": 4000, "runtime": 30})
        if rule.startswith("encode_"):
            expect = ENCODE
        for job in blocks:
            assert job["slurm_account"] == "myaccount", (rule, job)
            assert job["mem_mb"] > 0, (rule, job)
            for key in ("mem_mb", "runtime"):
                assert job[key] == expect.get(key, job[key]), (rule, key, job)
            if rule != "train":
                assert job.get("gpu", 0) == expect.get("gpu", 0), (rule, job)
                assert job["threads"] == threads.get(rule, expect.get("threads", 1)), (rule, job)
    train = jobs["train"][0]
    assert (train["gpu"], train["threads"], train["runtime"]) == (1, 2, 720), train
    assert jobs["track"][0]["mlflow_db"] == 1

    # the plugin's own partition selection with profiles/slurm/partitions.yaml
    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file

    partitions = read_partition_file(PROFILES / "slurm" / "partitions.yaml")
    log = logging.getLogger("slurm-test")
    for rule, blocks in jobs.items():
        if rule == "all":
            continue
        job = SimpleNamespace(name=rule, threads=blocks[0]["threads"], resources=blocks[0])
        got = get_best_partition(partitions, job, log)
        assert got == ("gpu" if gpu_rule(rule) else "cpu"), (rule, got)


def test_slurm_gives_a_multi_process_run_one_gpu_per_process(demo_workdir, tmp_path):
    code, work = demo_workdir
    cfg = yaml.safe_load((work / "cfg.yaml").read_text())
    cfg["runs"]["demo"]["num_processes"] = 2
    two = tmp_path / "work2"
    two.mkdir()
    (two / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train = planned(dry_run(code, two, "slurm", "--cores", "64", "results/runs/demo/mlflow.json"))
    assert (train["train"][0]["gpu"], train["train"][0]["threads"]) == (2, 4), train["train"]


def test_local_profile_plans_the_same_jobs(demo_workdir):
    code, work = demo_workdir
    text = dry_run(code, work, "local")
    assert "This was a dry-run" in text, text[-3000:]
    jobs = planned(text)
    assert {r for r in jobs if not r.startswith(LOOP_RULES)} == static_rules()
    assert "slurm_account" not in jobs["train"][0]
    assert jobs["train"][0]["gpu"] == 1 and jobs["encode_demo"][0]["mem_mb"] == 16000
