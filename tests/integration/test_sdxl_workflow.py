"""The whole workflow on the tiny SDXL model, for real: outputs in both layouts that load in
StableDiffusionXLPipeline, a no-op rerun, and one added image restaling one shard."""

from __future__ import annotations

import json

import pytest
from wf import copy_workflow, planned_jobs, small_config, snakemake, write_config

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
    make_demo_dataset(work / "data" / "mine", images=8, seed=5)
    write_config(work / "cfg.yaml", config())
    snakemake(work, code=code)
    return code, work


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
