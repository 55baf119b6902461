"""The whole workflow on the tiny SDXL model, for real: outputs in both layouts that load in
StableDiffusionXLPipeline, a no-op rerun, one added image restaling one shard, and kill -9 in
the middle of training recovering the uninterrupted run's bytes."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from wf import copy_workflow, planned_jobs, small_config, snakemake, write_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import chaos  # noqa: E402

pytestmark = pytest.mark.slow


def config() -> dict:
    cfg = small_config(shards=2, runs={"x1": {"dataset": "mine", "base_model": "tiny-sdxl"}})
    cfg["base_models"] = {
        "tiny-sdxl": {"path": "results/models/tiny-sdxl", "tiny": {"seed": 0, "family": "sdxl"}}
    }
    return cfg


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    """A workflow copy and a finished first run on an 8-image dataset."""
    from lorapipe.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("wf-xl")
    code = copy_workflow(root / "code")
    work = root / "work"
    make_demo_dataset(root / "data", images=8, seed=5)
    shutil.copytree(root / "data", work / "data" / "mine")  # same bytes and mtimes
    write_config(work / "cfg.yaml", config())
    snakemake(work, code=code)
    REFERENCE[work] = (root / "data", chaos.output_hashes(work))  # before any test edits it
    return code, work


REFERENCE: dict = {}


def test_sdxl_run_outputs_load_in_the_sdxl_pipeline(wf):
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    _, work = wf
    d = work / "results" / "runs" / "x1"
    for name in ("pytorch_lora_weights.safetensors", "x1.safetensors", "samples.png",
                 "metrics.jsonl", "train_summary.json", "config.yaml"):  # fmt: skip
        assert (d / name).is_file(), name
    with safe_open(str(d / "x1.safetensors"), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert any(k.startswith("lora_unet_input_blocks_") and k.endswith(".alpha") for k in keys)
    assert not any("down_blocks" in k for k in keys)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_resolution"] == "(64, 64)"
    assert json.loads((d / "train_summary.json").read_text())["steps"] == 4
    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(work / "results" / "models" / "tiny-sdxl"), local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)

    def image():
        g = torch.Generator().manual_seed(0)
        return pipe("a thing", num_inference_steps=2, height=64, width=64, generator=g,
                    output_type="np").images[0]  # fmt: skip

    base = image()
    out = {}
    for name in ("pytorch_lora_weights.safetensors", "x1.safetensors"):
        pipe.load_lora_weights(str(d), weight_name=name)
        out[name] = image()
        pipe.unload_lora_weights()
    assert not np.array_equal(out["x1.safetensors"], base)
    np.testing.assert_allclose(out["x1.safetensors"], out["pytorch_lora_weights.safetensors"],
                               atol=2e-5)  # fmt: skip


def test_sdxl_rerun_is_a_noop_and_an_added_image_restales_one_shard(wf):
    from PIL import Image

    code, work = wf
    assert planned_jobs(work, code) == {}
    Image.new("RGB", (96, 64), (10, 200, 30)).save(work / "data" / "mine" / "added.png")
    planned = planned_jobs(work, code)
    assert planned.get("manifest") == 1 and planned.get("shard") == 1, planned
    assert planned.get("train") == 1 and "tiny_model_tiny-sdxl" not in planned, planned


def test_sdxl_kill9_mid_training_then_rerun_gives_the_uninterrupted_bytes(wf, tmp_path):
    """kill -9 of the whole Snakemake process group once training has saved a checkpoint (step 2
    of 4); `--unlock`, then `--rerun-incomplete`: training resumes from that checkpoint, and every
    compared output (both LoRA files, samples, latents, shards, tiny model) has the
    uninterrupted run's sha256."""
    code, work = wf
    data, ref = REFERENCE[work]
    cfg = config()
    assert cfg["defaults"]["save_steps"] == 2 and cfg["defaults"]["max_steps"] == 4
    again = chaos.make_workdir(tmp_path / "w", data, cfg)
    run = chaos.start(code, again)
    assert run.wait_for_rule("train", timeout=600), run.output[-4000:]
    end = time.monotonic() + 300
    ckpts = again / "results" / "checkpoints"
    while not any(ckpts.glob("x1/*/step-000002/state.json")) and time.monotonic() < end:
        assert run.proc.poll() is None, run.output[-4000:]
        time.sleep(0.05)
    assert any(ckpts.glob("x1/*/step-000002/state.json")), run.output[-4000:]
    assert run.running() == ["train"], run.running()
    run.kill()
    assert not (again / "results/runs/x1/pytorch_lora_weights.safetensors").exists()
    assert chaos.snakemake(code, again, "--unlock").returncode == 0
    resumed = chaos.start(code, again, "--rerun-incomplete")
    assert resumed.wait() == 0, resumed.output[-4000:]
    log = (again / "logs" / "train" / "x1.log").read_text()
    assert "resumed from" in log and "(step 2/4)" in log, log[-3000:]
    hashes = chaos.output_hashes(again)
    differ = sorted(k for k in ref if hashes.get(k) != ref[k])
    assert differ == [], (differ, log[-3000:])
    assert "results/runs/x1/x1.safetensors" in ref and len(ref) > 20
    assert planned_jobs(again, code) == {}
