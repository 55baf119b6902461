"""The one test that runs torch.compile (70-100 s on a 2-core CPU): compiled training works."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


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
