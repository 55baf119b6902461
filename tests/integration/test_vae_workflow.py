"""A base model's ``vae:`` override through the real workflow (#12), on the tiny SD model: the
latents are encoded with the override (their records carry its digest, their bytes differ from
the model's own VAE's), the same override reruns nothing, new weights in its folder restale
encode, run_config, train and sample, and the run's config.yaml and MLflow params carry its
digest; the kohya file names it."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml
from wf import copy_workflow, planned_jobs, small_config, snakemake, write_config

pytestmark = pytest.mark.slow

LATENTS = "results/mine/latents/tiny-sd-64-float32"


def save_vae(folder: Path, seed: int) -> Path:
    """A tiny VAE of the tiny model's shape, other weights (seed), as a diffusers folder."""
    from lorapipe.tiny import _tiny_vae

    _tiny_vae(seed).save_pretrained(str(folder), safe_serialization=True)
    return folder


def latent_records(work: Path) -> tuple[dict[str, bytes], set[str]]:
    """The latent shard's members (name: bytes) and the ``vae`` digests its samples record."""
    members, digests = {}, set()
    with tarfile.open(work / LATENTS / "00000.tar") as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            members[m.name] = data
            if m.name.endswith(".json") and not m.name.startswith("__"):
                digests.add(json.loads(data)["vae"])
    return members, digests


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    """A finished run on the model's own VAE; then the same workflow with a ``vae:`` override."""
    from lorapipe.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("wf-vae")
    code = copy_workflow(root / "code")
    work = root / "work"
    make_demo_dataset(work / "data" / "mine", images=6, seed=3)
    cfg = small_config(experiment="vae", shards=1, max_steps=2)
    write_config(work / "cfg.yaml", cfg)
    snakemake(work, code=code)
    own = latent_records(work)
    save_vae(work / "vaes" / "fix", seed=11)
    cfg["base_models"]["tiny-sd"]["vae"] = "vaes/fix"  # relative: the workflow folder
    write_config(work / "cfg.yaml", cfg)
    return code, work, own


def test_override_encodes_the_latents_and_reaches_the_run(wf):
    import mlflow
    from safetensors import safe_open

    from lorapipe.fingerprint import tree_digest

    code, work, (own_members, own_digests) = wf
    jobs = planned_jobs(work, code)
    assert {"encode_mine", "run_config", "train", "sample", "track"} <= set(jobs), jobs
    assert "tiny_model_tiny-sd" not in jobs and "shard" not in jobs, jobs
    snakemake(work, code=code)
    digest = tree_digest(work / "vaes" / "fix")
    members, digests = latent_records(work)
    assert digests == {digest[:16]} != own_digests
    # every image's latents differ; the text encoder's outputs are the model's own still
    lat = [k for k in members if k.endswith(".latents.safetensors")]
    assert lat and all(members[k] != own_members[k] for k in lat)
    text = [k for k in members if k.startswith("__")]
    assert text and all(members[k] == own_members[k] for k in text)
    doc = yaml.safe_load((work / "results/runs/r1/config.yaml").read_text())
    assert doc["fingerprints"]["vae"] == doc["base_model"]["vae_sha256"] == digest
    assert doc["base_model"]["vae"] == "vaes/fix"
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run_id = json.loads((work / "results/runs/r1/mlflow.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.params["base_model.vae_sha256"] == digest
    assert run.data.tags["lorapipe.vae_hash"] == digest
    with safe_open(str(work / "results/runs/r1/r1.safetensors"), "pt") as f:
        assert f.metadata()["ss_vae_name"] == "fix"  # the kohya file names it, as sd-scripts
    assert planned_jobs(work, code) == {}  # the same override: nothing reruns


def test_new_weights_in_the_override_restale_encode_train_and_sample(wf):
    code, work, _ = wf
    if planned_jobs(work, code):
        snakemake(work, code=code)  # run alone: the override's run first
    tmp = work / "vaes" / "fix-new"
    save_vae(tmp, seed=12)
    shutil.copyfile(
        tmp / "diffusion_pytorch_model.safetensors",
        work / "vaes" / "fix" / "diffusion_pytorch_model.safetensors",
    )
    jobs = planned_jobs(work, code)
    assert {"encode_mine", "run_config", "train", "sample"} <= set(jobs), jobs
    assert not {"tiny_model_tiny-sd", "shard", "caption", "manifest"} & set(jobs), jobs
