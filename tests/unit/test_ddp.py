"""Data-parallel training on CPU: 2 real processes (gloo) against 1 with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorapipe.config import load_config, load_yaml, resolve_run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def latents(tmp_path_factory, demo_images, tiny_model) -> list[str]:
    """One latent shard made by the real stage functions from the demo images."""
    from lorapipe.captions import CaptionSettings, caption_shard
    from lorapipe.latents import encode_shard
    from lorapipe.manifest import ScanSettings, list_images, scan_shard
    from lorapipe.shards import ShardSettings, write_shard

    d = tmp_path_factory.mktemp("ddp-stages")
    m, c = d / "m.jsonl", d / "c.jsonl"
    scan_shard(demo_images, list_images(demo_images), ScanSettings(64, 0.5, 10**8, "#ffffff"), m)
    caption_shard(demo_images, m, CaptionSettings("template", "a {trigger}", "thing"), d / "cc", c)
    write_shard(demo_images, m, c, ShardSettings(64, 16, True, 10**8, "#ffffff"),
                d / "s.tar", d / "s.jsonl")  # fmt: skip
    encode_shard(d / "s.tar", tiny_model, d / "l.tar")
    return [str(d / "l.tar")]


def run_config(**over):
    cfg = load_yaml(REPO / "config" / "config.yaml")
    cfg["runs"]["demo"].update(
        {"max_steps": 4, "save_steps": 2, "mixed_precision": "no", "compile": False, **over}
    )
    load_config(cfg, check_files=False)
    return resolve_run(cfg, "demo")


def lora(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "pytorch_lora_weights.safetensors")


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_the_same_global_batch(latents, tiny_model, tmp_path):
    import torch

    from lorapipe.latents import load_latent_shards
    from lorapipe.train import epoch_batches, make_plan, train

    # Adam's update is about lr * sign(g) for a gradient far below adam_epsilon's scale, so a
    # last-bit difference in a near-zero gradient (summation order: 2 x 2 images vs 4) becomes
    # an lr-sized difference in that weight (measured: 1e-5 after 4 steps at eps 1e-8). A larger
    # epsilon keeps such updates linear in the gradient: then the LoRA shows the arithmetic.
    one = run_config(batch_size=4, adam_epsilon=1e-6)
    two = run_config(batch_size=2, num_processes=2, adam_epsilon=1e-6)
    samples = load_latent_shards(latents)
    assert make_plan(samples, one) == make_plan(samples, two, world=2)
    # some global batch is split unevenly or not at all: the slices still add up
    assert any(len(b) % 2 for b in epoch_batches(samples, 4, 0, 0))

    s1 = train(one, latents, str(tiny_model), tmp_path / "one", tmp_path / "c1", "6" * 64)
    s2 = train(two, latents, str(tiny_model), tmp_path / "two", tmp_path / "c2", "6" * 64)
    assert s2["processes"] == 2 and s1["processes"] == 1 and s2["steps"] == s1["steps"] == 4
    a, b = lora(tmp_path / "one"), lora(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5), k
    # the LoRA moved (up = lora_B starts at zero), so the comparison above is not between two inits
    assert any(k.endswith("lora.up.weight") and a[k].abs().max() > 1e-4 for k in a)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    # rank 0 alone writes: its checkpoints in a folder of their own (other steps than 1 process)
    assert [p.name for p in (tmp_path / "c2").iterdir()] == ["6" * 16 + "-x2"]
    assert sorted(p.name for p in (tmp_path / "c2" / ("6" * 16 + "-x2")).glob("step-*")) == [
        "step-000002"
    ]
    # the per-step sample grids (rule sample_steps) find this run's step exports through the
    # layout its summary names (they looked in "<fingerprint>/" and drew none for -x2 runs)
    from lorapipe.sampling import render_samples, render_step_grids
    from lorapipe.training.checkpoints import Layout

    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    exports = Layout.of_summary(tmp_path / "c2", "6" * 64, summary).exports
    assert exports == tmp_path / "c2" / ("6" * 16 + "-x2") / "exports"
    final = tmp_path / "two" / "samples.png"
    render_samples(str(tiny_model), tmp_path / "two", ["a thing"], final, steps=2, size=64)
    pngs = render_step_grids(str(tiny_model), exports, ["a thing"], tmp_path / "grids", final,
                             s2["steps"], steps=2, size=64)  # fmt: skip
    assert [p.name for p in pngs] == ["step-000002.png", "step-000004.png"]


def test_two_processes_resume_from_a_checkpoint(latents, tiny_model, tmp_path):
    import torch

    from lorapipe.train import train

    run = run_config(batch_size=2, num_processes=2)
    ck = tmp_path / "ck"
    assert train(run, latents, str(tiny_model), tmp_path / "x", ck, "7" * 64, stop_after=3) == {
        "stopped_at": 3
    }
    assert not (tmp_path / "x" / "pytorch_lora_weights.safetensors").exists()
    s = train(run, latents, str(tiny_model), tmp_path / "x", ck, "7" * 64)  # resumes at step 2
    train(run, latents, str(tiny_model), tmp_path / "ref", tmp_path / "ckref", "7" * 64)
    assert s["steps"] == 4
    lines = (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]  # step 3 redone, not twice
    a, b = lora(tmp_path / "x"), lora(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "x") == losses(tmp_path / "ref")


KILL_SCRIPT = """
import sys, json
sys.path.insert(0, {src!r})
from lorapipe.config import RunConfig
from lorapipe.train import train
run = RunConfig.from_dict(json.loads({run!r}))
train(run, {latents!r}, {model!r}, sys.argv[1], sys.argv[2], "k" * 64)
"""


@pytest.mark.slow
def test_kill_9_of_rank_0_ends_the_other_rank_and_a_rerun_resumes(latents, tiny_model, tmp_path):
    import hashlib
    import os
    import signal
    import subprocess
    import sys
    import time

    from lorapipe.train import train

    run = run_config(batch_size=2, num_processes=2, max_steps=12, save_steps=3)
    script = tmp_path / "t.py"
    script.write_text(KILL_SCRIPT.format(src=str(REPO / "src"), run=json.dumps(run.to_dict()),
                                         latents=latents, model=str(tiny_model)))  # fmt: skip
    out, ck = tmp_path / "out", tmp_path / "ck"
    ckpt = ck / ("k" * 16 + "-x2") / "step-000003"
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(ck)])
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert ckpt.exists()
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert pids  # rank 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "rank 1 outlived its rank 0"
    subprocess.run([sys.executable, str(script), str(out), str(ck)], check=True)
    train(run, latents, str(tiny_model), tmp_path / "ref", tmp_path / "ckref", "k" * 64)

    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert sha(out / "pytorch_lora_weights.safetensors") == sha(
        tmp_path / "ref" / "pytorch_lora_weights.safetensors"
    )
    assert losses(out) == losses(tmp_path / "ref")
    assert os.path.exists(out / "train_summary.json")


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
