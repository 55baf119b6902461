"""Every file the stages write gets the mode a plain ``open()`` gives under the caller's umask,
and every folder mkdir's (issue 14, item 4): results, caches, both LoRA files, checkpoints and
their step exports, and the MLflow artifacts copied from them. Checked under umask 002 (a
group-shared folder) and 022."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_train import run_config


@pytest.fixture(params=[0o002, 0o022], ids=["umask002", "umask022"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def wrong_modes(root: Path, umask: int) -> dict[str, str]:
    """Files and folders under ``root`` whose mode is not what open() / mkdir() give."""
    bad = {}
    for p in [root, *root.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        got = stat.S_IMODE(p.lstat().st_mode)
        if got != want:
            bad[str(p.relative_to(root))] = f"{got:o} (want {want:o})"
    return bad


def test_stage_outputs_caches_loras_and_checkpoints(umask, tmp_path, demo_images):
    """The stage functions in a row, as the workflow runs them, on 4 images: the tiny model,
    manifest, captions (and their cache), shards, latents, 2 training steps with a checkpoint
    and its exports, the final LoRA, metrics, loss plot, summary and the kohya file."""
    from lorapipe.captions import CaptionSettings, caption_shard
    from lorapipe.export import export_kohya
    from lorapipe.latents import encode_shard
    from lorapipe.manifest import ScanSettings, list_images, scan_shard
    from lorapipe.shards import ShardSettings, write_shard
    from lorapipe.tiny import build_tiny_model
    from lorapipe.train import train

    r = tmp_path / "results"
    tiny_model = build_tiny_model(r / "models" / "tiny-sd", seed=0)
    files = list_images(demo_images)[:4]
    scan_shard(demo_images, files, ScanSettings(64, 0.5, 10**8, "#ffffff"), r / "m.jsonl",
               checksum=True)  # fmt: skip
    caption_shard(demo_images, r / "m.jsonl", CaptionSettings("template", "a {trigger}", "x"),
                  r / "cache" / "captions", r / "c.jsonl", checksum=True)  # fmt: skip
    shard = ShardSettings(64, 16, True, 10**8, "#ffffff")
    write_shard(demo_images, r / "m.jsonl", r / "c.jsonl", shard, r / "s.tar", r / "s.jsonl",
                checksum=True)  # fmt: skip
    encode_shard(r / "s.tar", tiny_model, r / "latents" / "l.tar", checksum=True)
    run = run_config(max_steps=2, save_steps=1, epochs=1)
    out, ck = r / "runs" / "demo", r / "checkpoints" / "demo"
    train(run, [str(r / "latents" / "l.tar")], str(tiny_model), out, ck, "a" * 64)
    export_kohya(out / "pytorch_lora_weights.safetensors", out / "demo.safetensors",
                 run.to_dict(), {}, [str(r / "c.jsonl")], "demo")  # fmt: skip
    written = {p.relative_to(r).as_posix() for p in r.rglob("*") if p.is_file()}
    for f in (
        "m.jsonl.sha256",
        "c.jsonl",
        "s.tar",
        "latents/l.tar.sha256",
        "runs/demo/loss.png",
        "runs/demo/demo.safetensors",
        "runs/demo/train_summary.json",
        "checkpoints/demo/" + "a" * 16 + "/step-000001/optimizer.pt",
        "checkpoints/demo/" + "a" * 16 + "/exports/step-000001/demo-step000001.safetensors",
    ):
        assert f in written, f  # fmt: skip
    assert any(f.startswith("cache/captions/") for f in written)
    assert "models/tiny-sd/unet/config.json" in written
    assert wrong_modes(r, umask) == {}


def test_tiny_model_files(umask, tmp_path):
    """The tiny model's weights too (safetensors 0.8's save_file writes 0600: the builder gives
    the tree open()'s modes before renaming it into place)."""
    from lorapipe.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "results" / "models" / "tiny-sd", seed=0)
    assert wrong_modes(model, umask) == {}


def test_mlflow_artifacts_keep_the_files_modes(tmp_path, monkeypatch):
    """MLflow's local artifact store copies each artifact with its mode (copystat): a file
    written under umask 002 is group-readable and -writable there too."""
    from lorapipe.io import atomic_write_text
    from lorapipe.tracking import log_run

    monkeypatch.chdir(tmp_path)  # the store's artifact root is ./mlruns
    old = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "config.yaml", "run: demo\n")
        atomic_write_text(tmp_path / "metrics.jsonl", '{"step": 1, "loss": 0.5}\n')
        log_run(run_name="demo", experiment="modes", uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                config={"run": {"name": "demo"}}, metrics_jsonl=tmp_path / "metrics.jsonl",
                artifacts=[str(tmp_path / "config.yaml")], tags={"lorapipe.fingerprint": "f"},
                out_json=tmp_path / "mlflow.json")  # fmt: skip
    finally:
        os.umask(old)
    (copy,) = [p for p in (tmp_path / "mlruns").rglob("config.yaml")]
    assert stat.S_IMODE(copy.stat().st_mode) == 0o664
