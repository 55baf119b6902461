"""The tests that run torch.compile (70-100 s each on a 2-core CPU): compiled training works."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_train_sdxl

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

xl_latents = test_train_sdxl.xl_latents  # the fixture: SDXL latent shards of three buckets


def test_compiled_training_exports_clean_keys(tmp_path, demo_images, tiny_model):
    from safetensors import safe_open

    from lorapipe.captions import CaptionSettings, caption_shard
    from lorapipe.config import load_config, load_yaml, resolve_run
    from lorapipe.latents import encode_shard
    from lorapipe.manifest import ScanSettings, list_images, scan_shard
    from lorapipe.shards import ShardSettings, write_shard
    from lorapipe.train import train

    m, c = tmp_path / "m.jsonl", tmp_path / "c.jsonl"
    scan_shard(demo_images, list_images(demo_images), ScanSettings(64, 0.5, 10**8, "#ffffff"), m)
    caption_shard(
        demo_images, m, CaptionSettings("template", "a {trigger}", "x"), tmp_path / "cc", c
    )
    # square crops: one bucket
    write_shard(
        demo_images,
        m,
        c,
        ShardSettings(64, 16, False, 10**8, "#ffffff"),
        tmp_path / "s.tar",
        tmp_path / "s.jsonl",
    )
    encode_shard(tmp_path / "s.tar", tiny_model, tmp_path / "l.tar")
    cfg = load_yaml(REPO / "config" / "config.yaml")
    # 16 images in batches of 4: one shape. (batch_size 3 gives two shapes, and the second one
    # compiles a dynamic-shape graph in the warm-up: 11 min on 2 busy cores, measured)
    cfg["runs"]["demo"].update({"compile": True, "max_steps": 3, "save_steps": 2})
    load_config(cfg, check_files=False)
    summary = train(
        resolve_run(cfg, "demo"),
        [str(tmp_path / "l.tar")],
        str(tiny_model),
        tmp_path / "out",
        tmp_path / "ck",
        "c" * 64,
    )
    assert summary["compiled"] is True and summary["compile_s"] > 0
    # every batch shape was compiled before step 1: no recompiles while training
    assert summary["warmup_shapes"] == 1 and summary["warmup_graphs"] >= 1
    assert summary["warmup_s"] > 0 and summary["recompiles"] == 0
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("_orig_mod" in k for k in keys)
    assert all(k.startswith("unet.") for k in keys)


def test_sdxl_compiled_training_warms_up_every_bucket_and_matches_eager(
    tmp_path, xl_latents, tiny_sdxl, monkeypatch
):
    """SDXL (#12): the UNet also gets ``added_cond_kwargs`` (pooled text_embeds, time_ids);
    batch size 1 over the three buckets of ``xl_latents`` gives three batch shapes, all compiled
    in the warm-up: no recompile in the loop, and the LoRA of the eager run up to float noise.

    Dynamo (what guards and recompiles) runs as in training, but with the ``aot_eager`` backend
    (forward + backward graphs, no Inductor codegen): with Inductor this test took 9 min on 2
    busy cores (warm-up 530 s for the three shapes; recompiles 0, LoRA within 5e-6 of eager)."""
    import functools

    import torch
    from safetensors.torch import load_file
    from test_train import run_config

    from lorapipe.train import train

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    over = {"mixed_precision": "no", "batch_size": 1, "max_steps": 3, "save_steps": 100}
    out = {}
    for compiled in (False, True):
        run = run_config(**over, compile=compiled)
        d = tmp_path / str(compiled)
        s = train(run, xl_latents, str(tiny_sdxl), d / "o", d / "c", "x" * 64)
        out[compiled] = s, load_file(str(d / "o" / "pytorch_lora_weights.safetensors"))
    (eager, ref), (s, got) = out[False], out[True]
    assert eager["compiled"] is False and s["compiled"] is True
    assert s["warmup_shapes"] == 3 and s["warmup_graphs"] >= 1 and s["recompiles"] == 0
    assert got.keys() == ref.keys() and not any("_orig_mod" in k for k in got)
    for k, v in ref.items():
        assert torch.allclose(got[k].float(), v.float(), atol=1e-4, rtol=0), k
