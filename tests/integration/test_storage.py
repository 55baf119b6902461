"""Object storage: the whole workflow with its results on S3 through Snakemake's s3 storage
plugin, without a code change, against a real S3 API server (moto's) on 127.0.0.1. The dataset
folder, the caption cache, checkpoints and the MLflow store stay on the local disk (README,
"Scaling out")."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from wf import (
    REPO,
    S3Server,
    copy_workflow,
    planned_jobs,
    small_config,
    snakemake,
    write_config,
)

pytestmark = pytest.mark.slow

LOCAL_STATE = ("results/checkpoints", "results/cache")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    pytest.importorskip("snakemake_storage_plugin_s3")
    pytest.importorskip("moto")
    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


def config() -> dict:
    return small_config("s3", shards=2, max_steps=2)


def planned_paths(work: Path, code: Path, s3: S3Server, prefix: str) -> list[str]:
    out = snakemake(work, "-n", *s3.args(prefix), code=code, plugins=True)
    text = out.stdout + out.stderr
    assert "This was a dry-run" in text, text[-3000:]
    files = [
        line.split(": ", 1)[1]
        for line in text.splitlines()
        if line.strip().startswith(("input: ", "output: ", "log: "))
    ]
    return sorted({p for line in files for p in line.split(", ")})


def test_dry_run_maps_every_result_to_storage_and_reads_a_given_model_in_place(s3, tmp_path):
    import yaml

    from lorapipe.tiny import build_tiny_model

    code = copy_workflow(tmp_path / "code")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(REPO / "config" / "config.yaml", work / "cfg.yaml")
    paths = planned_paths(work, code, s3, "demo")
    assert len(paths) > 100
    outside = [p for p in paths if not p.startswith(f"s3://{s3.bucket}/demo/")]
    assert outside == [], outside[:5]
    assert s3.keys("demo/") == {}, "a dry run writes nothing to storage"
    # a base model given by path (not built by the workflow) stays where it is
    model = build_tiny_model(tmp_path / "sd", seed=0)
    cfg = yaml.safe_load((work / "cfg.yaml").read_text())
    cfg["base_models"]["tiny-sd"] = {"path": str(model)}  # tiny-sdxl: still built, in storage
    write_config(work / "cfg.yaml", cfg)
    paths = planned_paths(work, code, s3, "demo")
    local = [p for p in paths if not p.startswith(f"s3://{s3.bucket}/")]
    assert local and all(p.startswith(str(model)) for p in local), local[:5]
    assert any(p.endswith("diffusion_pytorch_model.safetensors") for p in local)
    assert len(paths) - len(local) > 100


def test_the_whole_workflow_runs_with_its_results_on_s3(s3, tmp_path):
    from safetensors import safe_open

    from lorapipe.demo import make_demo_dataset

    code = copy_workflow(tmp_path / "code")
    work = tmp_path / "work"
    make_demo_dataset(work / "data" / "mine", images=8, seed=3)
    write_config(work / "cfg.yaml", config())
    snakemake(work, *s3.args("wf"), code=code, plugins=True)

    objects = {k.removeprefix("wf/"): v for k, v in s3.keys("wf/").items()}
    run = "results/runs/r1/"
    want = {
        run + f
        for f in (
            "pytorch_lora_weights.safetensors",
            "r1.safetensors",
            "samples.png",
            "loss.png",
            "mlflow.json",
            "config.yaml",
        )
    }
    assert want <= set(objects), sorted(objects)
    assert any(k.startswith(run + "samples/step-") for k in objects)
    # every shard and latent tar arrived whole: its bytes have the digest its sidecar records
    tars = [k for k in objects if k.endswith(".tar")]
    assert len([k for k in tars if "/latents/" in k]) == 2 and len(tars) == 4
    for k in tars:
        assert hashlib.sha256(objects[k]).hexdigest() == objects[k + ".sha256"].split()[0].decode()
    # no result was left on the local disk, only the local state the README names
    local = [p.relative_to(work).as_posix() for p in (work / "results").rglob("*") if p.is_file()]
    assert [p for p in local if not p.startswith(LOCAL_STATE)] == []
    # the LoRA from the bucket is the trained one: kohya keys with their alpha
    kohya = tmp_path / "r1.safetensors"
    kohya.write_bytes(objects[run + "r1.safetensors"])
    with safe_open(kohya, "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_") and k.endswith(".alpha") for k in keys)

    # staleness works against storage: nothing to do; one added image, one shard's jobs
    assert planned_jobs(work, code, args=tuple(s3.args("wf")), plugins=True) == {}
    shutil.copy(work / "data" / "mine" / "img_001.png", work / "data" / "mine" / "zz_new.png")
    jobs = planned_jobs(work, code, args=tuple(s3.args("wf")), plugins=True)
    stages = ("manifest", "caption", "shard", "encode_mine")  # encode: one job per latent folder
    assert {r: jobs.get(r) for r in stages} == dict.fromkeys(stages, 1), jobs
