"""The whole workflow, for real: outputs, no-op reruns, and which jobs a change restales."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from wf import copy_workflow, planned_jobs, small_config, snakemake, write_config

pytestmark = pytest.mark.slow

RUN_STAGES = {"run_config", "train", "sample", "track"}
DATA_STAGES = ("manifest", "caption", "shard", "encode_mine")  # encode: one job per latent folder


def config(lr: float = 1e-3) -> dict:
    return small_config(
        runs={
            "r1": {"dataset": "mine", "base_model": "tiny-sd", "learning_rate": lr},
            "r2": {"dataset": "mine", "base_model": "tiny-sd", "lora_rank": 2},
        }
    )



def planned_with(work, code, cfg: dict) -> dict[str, int]:
    """The jobs a dry run plans under ``cfg``; the shipped test config is written back after."""
    write_config(work / "cfg.yaml", cfg)
    try:
        return planned_jobs(work, code)
    finally:
        write_config(work / "cfg.yaml", config())

@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    """A workflow copy and a finished first run on a 12-image dataset."""
    from lorapipe.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("wf")
    code = copy_workflow(root / "code")
    work = root / "work"
    make_demo_dataset(work / "data" / "mine", images=12, seed=3)
    write_config(work / "cfg.yaml", config())
    snakemake(work, code=code)
    return code, work


def test_first_run_outputs(wf):
    code, work = wf
    for run in ("r1", "r2"):
        d = work / "results" / "runs" / run
        for name in (
            "pytorch_lora_weights.safetensors",
            f"{run}.safetensors",
            "config.yaml",
            "metrics.jsonl",
            "samples.png",
            "loss.png",
            "mlflow.json",
        ):
            assert (d / name).stat().st_size > 0, name
        steps = [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]
        # run_config takes no core of a local run: it yields the CPU to the encode job beside it
        log = (work / "logs" / "run_config" / f"{run}.log").read_text()
        assert "CPU priority lowered by 10" in log
    # r1 and r2 differ only in training settings: one base row of sample images for both, the
    # top row of each grid (rule sample_base)
    from PIL import Image

    (base,) = (work / "results" / "samples" / "tiny-sd").glob("base-*.png")
    row = Image.open(base).convert("RGB")
    for run in ("r1", "r2"):
        grid = Image.open(work / "results" / "runs" / run / "samples.png").convert("RGB")
        assert grid.crop((0, 0, *row.size)).tobytes() == row.tobytes()
    rejected = (work / "results" / "mine" / "rejected.tsv").read_text().splitlines()
    assert rejected[0] == "path\tcode\treason"
    assert rejected[1].startswith("broken/truncated.jpg\ttruncated\t")
    # the resolved config names the base model path and every default
    import yaml

    doc = yaml.safe_load((work / "results/runs/r1/config.yaml").read_text())
    assert doc["base_model"]["path"] == "results/models/tiny-sd"
    assert doc["run"]["learning_rate"] == 1e-3 and doc["run"]["lora_alpha"] == 8


def test_mlflow_store_has_the_runs(wf):
    import mlflow

    _, work = wf
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run_id = json.loads((work / "results/runs/r1/mlflow.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.run_name == "r1"
    assert run.data.params["run.learning_rate"] == "0.001"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"pytorch_lora_weights.safetensors", "r1.safetensors", "config.yaml"} <= names


def test_lora_loads_in_diffusers_and_changes_the_image(wf):
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    _, work = wf
    pipe = StableDiffusionPipeline.from_pretrained(
        str(work / "results/models/tiny-sd"), safety_checker=None
    )

    def image():
        g = torch.Generator().manual_seed(0)
        return pipe(
            "a thing", num_inference_steps=3, height=64, width=64, generator=g, output_type="np"
        ).images[0]

    base = image()
    pipe.load_lora_weights(str(work / "results/runs/r1"))
    assert np.abs(image() - base).max() > 1e-3


def test_second_run_does_nothing(wf):
    code, work = wf
    assert planned_jobs(work, code) == {}


def test_a_run_with_nothing_to_do_imports_no_pandas(wf):
    """Snakemake checks every job's params for changes, and imported pandas (installed for
    MLflow) to do it: 0.3-0.5 s of every invocation; common.smk's hook keeps it out (#17)."""
    code, work = wf
    proc = snakemake(work, "--quiet", code=code, python=("-X", "importtime"))
    assert "Nothing to be done" in proc.stdout + proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}  # fmt: skip
    assert {"snakemake.persistence", "lorapipe.snakemake_hooks"} <= imported
    assert "pandas" not in imported


def test_changing_a_training_parameter_reruns_only_that_run(wf):
    code, work = wf
    jobs = planned_with(work, code, config(lr=5e-4))
    assert set(jobs) - {"all"} == RUN_STAGES  # not sample_base: the base row is the same
    assert all(n == 1 for r, n in jobs.items())  # r1 only, not r2
    assert planned_jobs(work, code) == {}


def test_editing_training_code_restales_training_not_data(wf):
    code, work = wf
    src = code / "src" / "lorapipe" / "train.py"
    original = src.read_text()
    src.write_text(original + "\n# an edit\n")
    try:
        jobs = planned_jobs(work, code)
    finally:
        src.write_text(original)
    assert set(jobs) - {"all"} == RUN_STAGES and jobs["train"] == 2
    assert planned_jobs(work, code) == {}


def test_adding_one_image_reruns_one_shard(wf):
    code, work = wf
    from lorapipe.manifest import shard_of

    data = work / "data" / "mine"
    shards = work / "results" / "mine" / "shards"
    latents = work / "results" / "mine" / "latents" / "tiny-sd-64-float32"
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.tar")}
    latent_bytes = {p.name: p.read_bytes() for p in latents.glob("*.tar")}
    shutil.copy(data / "img_001.png", data / "zz_new.png")
    new_shard = f"{shard_of('zz_new.png', 3):05d}"
    jobs = planned_jobs(work, code)
    assert {k: jobs[k] for k in DATA_STAGES} == dict.fromkeys(DATA_STAGES, 1)
    assert jobs["merge_manifest"] == 1 and jobs["train"] == 2
    snakemake(work, code=code)
    after = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.tar")}
    changed = {n for n in after if after[n] != before[n]}
    assert changed == {f"{new_shard}.tar"}
    index = (shards / f"{new_shard}.jsonl").read_text()
    assert '"path": "zz_new.png"' in index
    # the folder's one encode job encoded that shard alone; the others came from the cache
    log = (work / "logs/encode/mine/tiny-sd-64-float32.log").read_text()
    assert "1 shards encoded, 2 from the cache" in log, log[-2000:]
    changed = {p.name for p in latents.glob("*.tar") if p.read_bytes() != latent_bytes[p.name]}
    assert changed == {f"{new_shard}.tar"}
    assert planned_jobs(work, code) == {}


def test_editing_a_sidecar_or_an_image_restales_only_its_shard(wf):
    import os

    code, work = wf
    data = work / "data" / "mine"
    for name, first in (("img_000.txt", "caption"), ("img_004.png", "manifest")):
        path = data / name
        blob, st = path.read_bytes(), path.stat()
        if name.endswith(".txt"):
            path.write_text("an edited caption")
        else:
            shutil.copy(data / "img_005.png", path)
        try:
            jobs = planned_jobs(work, code)
        finally:
            path.write_bytes(blob)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        want = dict.fromkeys(DATA_STAGES[DATA_STAGES.index(first) :], 1)
        assert {k: v for k, v in jobs.items() if k in DATA_STAGES} == want, (name, jobs)
        # same bytes, size and mtime again: nothing to do
        assert planned_jobs(work, code) == {}


def test_latent_cache_is_shared_per_model_resolution_and_dtype(wf):
    code, work = wf
    caches = sorted(p.name for p in (work / "results/mine/latents").iterdir())
    assert caches == ["tiny-sd-64-float32"]  # r1 and r2 (CPU, no bf16) share one cache
    cfg = config()
    cfg["runs"]["r2"]["mixed_precision"] = "bf16"
    jobs = planned_with(work, code, cfg)
    # a bf16 run gets its own bf16 cache (one job encodes its shards), nothing before encode
    assert jobs["encode_mine"] == 1 and jobs["train"] == 1
    assert not {"manifest", "caption", "shard"} & set(jobs)
    assert planned_jobs(work, code) == {}


def test_caption_variants_restale_encoding_and_training_only(wf):
    code, work = wf
    cfg = config()
    cfg["datasets"]["mine"].update(caption_variants=2, shuffle_captions=True)
    jobs = planned_with(work, code, cfg)
    assert jobs["encode_mine"] == 1 and jobs["train"] == 2
    assert not {"manifest", "caption", "shard"} & set(jobs)
    assert planned_jobs(work, code) == {}


def test_sample_grids_off_tracks_without_them_and_retrains_nothing(wf):
    code, work = wf
    cfg = config()
    cfg["sample_grids"] = False
    write_config(work / "cfg.yaml", cfg)
    try:
        # no sample job; track only (its inputs lost the grids), no training
        assert planned_jobs(work, code) == {"track": 2, "all": 1}
        tracked = {r: work / f"results/runs/{r}/mlflow.json" for r in ("r1", "r2")}
        done = {r: p.stat().st_mtime_ns for r, p in tracked.items()}
        snakemake(work, code=code)  # track succeeds without samples.png
        assert all(p.stat().st_mtime_ns > done[r] for r, p in tracked.items())
        cfg["runs"]["r3"] = {"dataset": "mine", "base_model": "tiny-sd", "lora_rank": 3}
        write_config(work / "cfg.yaml", cfg)
        jobs = planned_jobs(work, code)
        assert "sample" not in jobs and jobs["train"] == 1 and jobs["track"] == 1, jobs
    finally:
        write_config(work / "cfg.yaml", config())
    snakemake(work, code=code)  # grids on again: the grids made before are logged again
    assert planned_jobs(work, code) == {}


def test_the_demo_is_planned_only_without_a_config_naming_runs(tmp_path):
    """No config file: the shipped demo. A user's config: its runs alone; both on request."""
    import os
    import subprocess

    from wf import SNAKEMAKE

    from lorapipe.demo import make_demo_dataset

    code = copy_workflow(tmp_path / "code")
    write_config(code / "mine.yaml", small_config())
    make_demo_dataset(code / "data" / "mine", images=6, seed=1)

    def plan(*args: str) -> dict[str, int]:
        cmd = [SNAKEMAKE, "--snakefile", str(code / "Snakefile"), "--directory", str(code),
               "--cores", "2", "-n", "--quiet", "rules", *args]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        return {r: n for r, n in re.findall(r"^(\S+)\s+(\d+)$", out.stdout, re.M)}

    demo = plan()
    assert demo["demo_data_demo"] == "1" and demo["encode_demo"] == "2"  # tiny-sd, tiny-sdxl
    mine = plan("--configfile", "mine.yaml")
    assert "demo_data_demo" not in mine and mine["encode_mine"] == "1"
    both = plan("--configfile", "config/config.yaml", "mine.yaml")
    assert both["train"] == "3" and both["demo_data_demo"] == "1"  # demo, demo-xl, mine


def test_caption_review_file_and_editing_one_row_restales_one_shard(tmp_path):
    import csv

    from lorapipe.demo import make_demo_dataset
    from lorapipe.manifest import shard_of

    make_demo_dataset(tmp_path / "data" / "mine", images=8, seed=1)
    write_config(tmp_path / "cfg.yaml", config())
    snakemake(tmp_path, "captions_mine")  # captions only: no model, no shard, no training
    assert not (tmp_path / "results/mine/shards").exists()
    review = tmp_path / "results/mine/captions_review.csv"
    with open(review, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and {r["source"] for r in rows} == {"sidecar", "template"}
    edited = next(r for r in rows if r["source"] == "template")
    edited["caption"] = "a thing, hand-corrected"
    with open(tmp_path / "data/mine/captions.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "caption", "source"])
        w.writeheader()
        w.writerow(edited)  # only the changed row
    assert planned_jobs(tmp_path, None, "captions_mine") == {"caption": 1, "captions_mine": 1}
    snakemake(tmp_path, "captions_mine")
    shard = f"{shard_of(edited['path'], 3):05d}"
    lines = (tmp_path / f"results/mine/captions/{shard}.jsonl").read_text(encoding="utf-8")
    assert '"caption": "a thing, hand-corrected"' in lines and '"source": "edit"' in lines
    assert '"a thing, hand-corrected",edit' in review.read_text(encoding="utf-8")


def test_bad_config_fails_before_any_job_naming_the_key(tmp_path):
    cfg = config()
    cfg["runs"]["r1"]["lora_rnak"] = 4
    write_config(tmp_path / "cfg.yaml", cfg)
    (tmp_path / "data" / "mine").mkdir(parents=True)
    out = snakemake(tmp_path, "-n", check=False)
    assert out.returncode != 0
    assert "runs.r1.lora_rnak: unknown key" in out.stdout + out.stderr
    assert not (tmp_path / "results").exists()
