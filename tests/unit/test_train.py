"""Training: determinism, exact resume (including a real kill -9), plan and progress."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lorapipe.config import load_config, load_yaml, resolve_run

REPO = Path(__file__).resolve().parents[2]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def make_latents(d: Path, demo_images: Path, tiny_model: Path) -> list[str]:
    """Two latent shards made in ``d`` by the real stage functions from the demo images."""
    from lorapipe.captions import CaptionSettings, caption_shard
    from lorapipe.latents import encode_shard
    from lorapipe.manifest import ScanSettings, list_images, scan_shard, shard_files
    from lorapipe.shards import ShardSettings, write_shard

    files = list_images(demo_images)
    out = []
    for k in range(2):
        m, c = d / f"m{k}.jsonl", d / f"c{k}.jsonl"
        scan = ScanSettings(64, 0.5, 10**8, "#ffffff")
        scan_shard(demo_images, shard_files(files, 2, k), scan, m)
        captions = CaptionSettings("template", "a {trigger}", "thing")
        caption_shard(demo_images, m, captions, d / "cc", c)
        write_shard(demo_images, m, c, ShardSettings(64, 16, True, 10**8, "#ffffff"),
                    d / f"s{k}.tar", d / f"s{k}.jsonl")
        encode_shard(d / f"s{k}.tar", tiny_model, d / f"l{k}.tar")
        out.append(str(d / f"l{k}.tar"))
    return out


@pytest.fixture(scope="module")
def latents(tmp_path_factory, demo_images, tiny_model) -> list[str]:
    """Two latent shards made by the real stage functions from the demo images."""
    return make_latents(tmp_path_factory.mktemp("stages"), demo_images, tiny_model)


def run_config(**over):
    cfg = load_yaml(REPO / "config" / "config.yaml")
    cfg["runs"]["demo"].update({"epochs": 3, "save_steps": 4, "batch_size": 2, **over})
    load_config(cfg, check_files=False)
    return resolve_run(cfg, "demo")


def test_plan_counts_buckets_and_accumulation(latents):
    from lorapipe.latents import load_latent_shards
    from lorapipe.train import epoch_batches, make_plan

    samples = load_latent_shards(latents)
    run = run_config(gradient_accumulation=2)
    plan = make_plan(samples, run)
    batches = epoch_batches(samples, run.batch_size, run.seed, 0)
    assert len(batches) == plan.batches_per_epoch
    assert plan.steps_per_epoch == -(-plan.batches_per_epoch // 2)
    assert plan.total_steps == 3 * plan.steps_per_epoch
    # every sample exactly once per epoch, and a batch never mixes bucket sizes
    seen = sorted(i for b in batches for i in b)
    assert seen == list(range(len(samples)))
    for b in batches:
        assert len({tuple(samples[i]["meta"]["size"]) for i in b}) == 1
    # order is a function of (seed, epoch): same epoch same order, next epoch another order
    assert epoch_batches(samples, 2, 0, 0) == batches
    assert epoch_batches(samples, 2, 0, 1) != batches


def test_same_config_same_bytes_and_lora_changes_unet(latents, tiny_model, tmp_path):
    from lorapipe.train import train

    run = run_config()
    s1 = train(run, latents, str(tiny_model), tmp_path / "a", tmp_path / "ca", "f" * 64)
    train(run, latents, str(tiny_model), tmp_path / "b", tmp_path / "cb", "f" * 64)
    fa = tmp_path / "a" / "pytorch_lora_weights.safetensors"
    assert sha(fa) == sha(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    metrics = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, s1["steps"] + 1))
    # a different seed gives different bytes (the test above could not pass by accident)
    train(run_config(seed=1), latents, str(tiny_model), tmp_path / "c", tmp_path / "cc", "e" * 64)
    assert sha(fa) != sha(tmp_path / "c" / "pytorch_lora_weights.safetensors")


def test_resume_is_bit_exact_and_counts_stay_right(latents, tiny_model, tmp_path):
    """Stop twice at different steps, resume each time: same bytes, same step/epoch record."""
    from lorapipe.train import train

    run = run_config()
    ref = train(run, latents, str(tiny_model), tmp_path / "ref", tmp_path / "cref", "a" * 64)
    ck = tmp_path / "ck"
    assert train(run, latents, str(tiny_model), tmp_path / "x", ck, "a" * 64, stop_after=5) == {
        "stopped_at": 5
    }
    # checkpoint at step 4 only (save_steps=4); step 5 is lost work and must be redone
    assert sorted(p.name for p in (ck / ("a" * 16)).glob("step-*")) == ["step-000004"]
    assert sorted(p.name for p in (ck / ("a" * 16) / "exports").iterdir()) == ["step-000004"]
    train(run, latents, str(tiny_model), tmp_path / "x", ck, "a" * 64, stop_after=10)
    out = train(run, latents, str(tiny_model), tmp_path / "x", ck, "a" * 64)
    assert out["steps"] == ref["steps"] and out["epochs"] == ref["epochs"]
    got = tmp_path / "x" / "pytorch_lora_weights.safetensors"
    assert sha(got) == sha(tmp_path / "ref" / "pytorch_lora_weights.safetensors")
    mx = [json.loads(x) for x in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    mr = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["epoch"], m["loss"]) for m in mx] == [
        (m["step"], m["epoch"], m["loss"]) for m in mr
    ]


def test_a_kill_between_checkpoint_and_its_exports_loses_no_export(latents, tiny_model, tmp_path):
    """Killed after step 4's checkpoint but before its exports were written (its export folder
    absent): the resumed run writes step 4's exports from the restored weights, the same tensors
    an uninterrupted run exported (the per-step sample grids are drawn from them)."""
    from safetensors.torch import load_file

    from lorapipe.train import train

    run = run_config()
    train(run, latents, str(tiny_model), tmp_path / "ref", tmp_path / "cref", "a" * 64)
    ck = tmp_path / "ck"
    train(run, latents, str(tiny_model), tmp_path / "x", ck, "a" * 64, stop_after=5)
    exports = ck / ("a" * 16) / "exports"
    shutil.rmtree(exports / "step-000004")  # as if killed between the two writes
    train(run, latents, str(tiny_model), tmp_path / "x", ck, "a" * 64)
    f = "step-000004/pytorch_lora_weights.safetensors"
    got, want = load_file(exports / f), load_file(tmp_path / "cref" / ("a" * 16) / "exports" / f)
    assert sorted(got) == sorted(want) and len(got) > 0
    assert all(got[k].equal(want[k]) for k in want)


def test_other_fingerprint_never_resumes(latents, tiny_model, tmp_path):
    from lorapipe.train import train

    run = run_config()
    train(run, latents, str(tiny_model), tmp_path / "x", tmp_path / "ck", "a" * 64, stop_after=8)
    # same checkpoint root, other fingerprint (e.g. learning rate changed): starts from step 0
    other = run_config(learning_rate=5e-4)
    train(other, latents, str(tiny_model), tmp_path / "y", tmp_path / "ck", "b" * 64)
    train(other, latents, str(tiny_model), tmp_path / "z", tmp_path / "ck2", "b" * 64)
    assert sha(tmp_path / "y" / "pytorch_lora_weights.safetensors") == sha(
        tmp_path / "z" / "pytorch_lora_weights.safetensors"
    )


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, logging
    sys.path.insert(0, {src!r})
    logging.basicConfig(level=logging.INFO)
    from lorapipe.config import RunConfig
    from lorapipe.train import train
    import json
    run = RunConfig.from_dict(json.loads({run!r}))
    train(run, {latents!r}, {model!r}, sys.argv[1], sys.argv[2], "k" * 64)
    """
)


@pytest.mark.slow
def test_kill_9_then_rerun_gives_identical_lora(latents, tiny_model, tmp_path):
    """A real training process is SIGKILLed twice after checkpoints appear; reruns finish it."""
    from lorapipe.train import train

    run = run_config(epochs=6, save_steps=3)
    script = tmp_path / "t.py"
    script.write_text(
        KILL_SCRIPT.format(
            src=str(REPO / "src"), run=json.dumps(run.to_dict()), latents=latents,
            model=str(tiny_model),
        )
    )
    ck, out = tmp_path / "ck", tmp_path / "out"
    env = dict(os.environ)
    for kill_after_ckpts in (1, 3):
        proc = subprocess.Popen([sys.executable, str(script), str(out), str(ck)], env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            n = len(list((ck / ("k" * 16)).glob("step-*"))) if ck.exists() else 0
            steps = [int(p.name[5:]) for p in (ck / ("k" * 16)).glob("step-*")] if n else []
            if steps and max(steps) >= 3 * kill_after_ckpts:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not (out / "pytorch_lora_weights.safetensors").exists()
    subprocess.run([sys.executable, str(script), str(out), str(ck)], env=env, check=True)
    train(run, latents, str(tiny_model), tmp_path / "ref", tmp_path / "ckref", "k" * 64)
    assert sha(out / "pytorch_lora_weights.safetensors") == sha(
        tmp_path / "ref" / "pytorch_lora_weights.safetensors"
    )
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))


def test_progress_line_and_nonfinite_loss(latents, tiny_model, tmp_path, caplog):
    import logging

    from lorapipe.train import train

    caplog.set_level(logging.INFO, logger="lorapipe.train")
    train(run_config(epochs=1), latents, str(tiny_model), tmp_path / "a", tmp_path / "ca", "c" * 64)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Epoch ")]
    assert lines and " | Step 1/" in lines[0] and "| Loss " in lines[0] and "| ETA " in lines[-1]
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1 \(samples: \["):
        train(run_config(learning_rate=1e30, max_grad_norm=0, noise_offset=1e38), latents,
              str(tiny_model), tmp_path / "b", tmp_path / "cb", "d" * 64)


def test_fp16_on_cpu_is_a_config_error(latents, tiny_model, tmp_path):
    from lorapipe.train import train

    with pytest.raises(ValueError, match="mixed_precision: fp16 needs a GPU"):
        train(run_config(mixed_precision="fp16"), latents, str(tiny_model), tmp_path, tmp_path,
              "0" * 64)  # fmt: skip


def test_bf16_autocast_trains_on_cpu(latents, tiny_model, tmp_path):
    from lorapipe.train import train

    s = train(run_config(mixed_precision="bf16", epochs=1), latents, str(tiny_model),
              tmp_path / "o", tmp_path / "c", "1" * 64)  # fmt: skip
    assert s["precision"] == "bf16"
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "o" / "pytorch_lora_weights.safetensors")
    assert all(v.dtype.is_floating_point and v.dtype.itemsize == 4 for v in sd.values())


def read_st(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_live_mlflow_resume_run_id_and_checkpoint_exports(latents, tiny_model, tmp_path):
    """Stopped early, then resumed, with live tracking into a sqlite store: one MLflow run that
    has every step once; its id is in the exported files; each checkpoint exported in both
    layouts, loadable by diffusers."""
    from mlflow import MlflowClient

    from lorapipe.live_tracking import LiveTracker
    from lorapipe.train import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fp = "9" * 64

    def tracker():
        return LiveTracker(uri, "t", "demo", fp, params={"run": {"lora_rank": 4}}, every_s=0.5)

    run = run_config()
    meta = {"lorapipe_run": "demo", "ss_resolution": "(64, 64)"}
    out, ck = tmp_path / "out", tmp_path / "ck"
    first = tracker()
    assert train(run, latents, str(tiny_model), out, ck, fp, stop_after=6, tracker=first,
                 export_meta=meta) == {"stopped_at": 6}  # fmt: skip
    client = MlflowClient(uri)
    run_id = first.run_id
    assert client.get_run(run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5, 6]

    s = train(run, latents, str(tiny_model), out, ck, fp, tracker=tracker(), export_meta=meta)
    assert s["mlflow_run_id"] == run_id
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.data.params["run.lora_rank"] == "4"
    assert info.data.tags["lorapipe.resumed_at_step"] == "4"
    jsonl = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, s["steps"] + 1))  # 5, 6 not twice
    assert [m.value for m in history] == pytest.approx([m["loss"] for m in jsonl])
    tensors, md = read_st(out / "pytorch_lora_weights.safetensors")
    assert md["lorapipe_mlflow_run_id"] == run_id and md["lorapipe_fingerprint"] == fp
    assert md["lorapipe_run"] == "demo" and "ss_resolution" not in md  # kohya fields: kohya only
    assert "lora_adapter_metadata" in md

    exports = ck / fp[:16] / "exports"
    saved = list(range(4, s["steps"], 4))
    assert sorted(p.name for p in exports.iterdir()) == [f"step-{n:06d}" for n in saved]
    last = exports / f"step-{saved[-1]:06d}"
    kohya_name = f"demo-step{saved[-1]:06d}.safetensors"
    assert sorted(p.name for p in last.iterdir()) == sorted(
        [kohya_name, "pytorch_lora_weights.safetensors"]
    )
    dt, dmeta = read_st(last / "pytorch_lora_weights.safetensors")
    assert set(dt) == set(tensors) and dmeta["lorapipe_mlflow_run_id"] == run_id
    kt, kmeta = read_st(last / kohya_name)
    assert all(k.startswith("lora_unet_") for k in kt) and len(kt) == len(dt) // 2 * 3
    assert kmeta["ss_steps"] == str(saved[-1]) and kmeta["ss_output_name"] == kohya_name[:-12]
    assert kmeta["ss_network_alpha"] == "8" and kmeta["ss_network_dim"] == "4"
    assert kmeta["ss_resolution"] == "(64, 64)" and kmeta["lorapipe_mlflow_run_id"] == run_id
    tag_freq = json.loads(kmeta["ss_tag_frequency"])
    assert list(tag_freq) == ["demo"] and sum(tag_freq["demo"].values()) >= s["samples"]

    # One quick check that diffusers loads both layouts of a checkpoint, to the same image.
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image():
        g = torch.Generator().manual_seed(0)
        return pipe("a thing", num_inference_steps=2, height=64, width=64, generator=g,
                    output_type="np").images[0]  # fmt: skip

    base = image()
    pipe.load_lora_weights(str(last), adapter_name="d")
    with_diffusers = image()
    pipe.load_lora_weights(str(last), weight_name=kohya_name, adapter_name="k")
    pipe.set_adapters(["k"])
    with_kohya = image()
    assert abs(with_diffusers - base).max() > 1e-4
    assert abs(with_kohya - with_diffusers).max() < 1e-4


def test_unreachable_mlflow_never_stops_training(latents, tiny_model, tmp_path):
    from lorapipe.live_tracking import LiveTracker
    from lorapipe.train import train

    t = LiveTracker("http://127.0.0.1:9", "t", "demo", "b" * 64, every_steps=1, every_s=0.05)
    s = train(run_config(epochs=1), latents, str(tiny_model), tmp_path / "o", tmp_path / "c",
              "b" * 64, tracker=t)  # fmt: skip
    assert s["mlflow_run_id"] is None and t.failures >= 1
    lines = (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines]
    assert steps == list(range(1, s["steps"] + 1))
    _, md = read_st(tmp_path / "o" / "pytorch_lora_weights.safetensors")
    assert "lorapipe_mlflow_run_id" not in md and md["lorapipe_fingerprint"] == "b" * 64


def test_failed_training_marks_the_mlflow_run_failed(latents, tiny_model, tmp_path):
    from mlflow import MlflowClient

    from lorapipe.live_tracking import LiveTracker
    from lorapipe.train import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = LiveTracker(uri, "t", "demo", "d" * 64)
    with pytest.raises(FloatingPointError):
        train(run_config(learning_rate=1e30, max_grad_norm=0, noise_offset=1e38), latents,
              str(tiny_model), tmp_path / "b", tmp_path / "cb", "d" * 64, tracker=t)  # fmt: skip
    assert MlflowClient(uri).get_run(t.run_id).info.status == "FAILED"


def test_unknown_prediction_type_is_refused_by_name(latents, tiny_model, tmp_path):
    import shutil

    from lorapipe.train import train

    model = tmp_path / "tiny-sample"
    shutil.copytree(tiny_model, model)
    f = model / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "prediction_type": "sample"}))
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        train(run_config(max_steps=1), latents, str(model), tmp_path / "o", tmp_path / "c",
              "2" * 64)  # fmt: skip


class BrokenCompile:
    """Stands in for torch.compile: the wrapped UNet's forward works, but the backward of call
    number ``fail_on`` raises, as an Inductor failure in the first backward does."""

    def __init__(self, fail_on: int):
        self.fail_on, self.calls = fail_on, 0

    def __call__(self, module, **kw):
        import torch

        outer = self

        class Fail(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                raise RuntimeError("simulated compile failure in the backward")

        def forward(*args, **kwargs):
            outer.calls += 1
            out = module(*args, **kwargs)
            return (Fail.apply(out[0]),) if outer.calls == outer.fail_on else out

        return forward


def test_compile_failure_in_first_backward_redoes_the_step_eagerly(
    latents, tiny_model, tmp_path, monkeypatch, caplog
):
    """The second micro-batch's backward fails after the first one left gradients: the step is
    redone eagerly from zeroed gradients, so the LoRA is the one an eager run writes."""
    import logging

    import torch

    from lorapipe import train as train_mod

    caplog.set_level(logging.WARNING, logger="lorapipe.train")
    eager = run_config(max_steps=3, gradient_accumulation=2)
    train_mod.train(eager, latents, str(tiny_model), tmp_path / "e", tmp_path / "ce", "3" * 64)
    broken = BrokenCompile(fail_on=2)
    monkeypatch.setattr(torch, "compile", broken)
    import lorapipe.training.compiling as compiling

    monkeypatch.setattr(compiling, "warmup_shapes", lambda *a, **k: [])
    s = train_mod.train(run_config(max_steps=3, gradient_accumulation=2, compile=True), latents,
                        str(tiny_model), tmp_path / "b", tmp_path / "cb", "3" * 64)  # fmt: skip
    assert broken.calls == 2 and s["compiled"] is False and s["compile_s"] == 0.0
    assert any("torch.compile failed" in r.getMessage() for r in caplog.records)
    assert sha(tmp_path / "b" / "pytorch_lora_weights.safetensors") == sha(
        tmp_path / "e" / "pytorch_lora_weights.safetensors"
    )
    # the same failure in the warm-up (which runs every batch shape first): eager from step 1
    monkeypatch.undo()
    monkeypatch.setattr(torch, "compile", BrokenCompile(fail_on=1))
    s = train_mod.train(run_config(max_steps=3, gradient_accumulation=2, compile=True), latents,
                        str(tiny_model), tmp_path / "w", tmp_path / "cw", "3" * 64)  # fmt: skip
    assert s["compiled"] is False and s["warmup_shapes"] >= 1 and s["recompiles"] == 0
    assert any("failed during warm-up" in r.getMessage() for r in caplog.records)
    assert sha(tmp_path / "w" / "pytorch_lora_weights.safetensors") == sha(
        tmp_path / "e" / "pytorch_lora_weights.safetensors"
    )


def test_adamw8bit_without_bitsandbytes_or_cuda_fails_early(latents, tiny_model, tmp_path):
    from lorapipe.train import train

    with pytest.raises(ValueError, match=r"^runs\.demo\.optimizer: adamw8bit needs ") as e:
        train(run_config(optimizer="adamw8bit"), latents, str(tiny_model), tmp_path / "o",
              tmp_path / "c", "4" * 64)  # fmt: skip
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_deterministic_key_is_accepted_on_cpu_and_changes_nothing(latents, tiny_model, tmp_path):
    from lorapipe.train import train

    for name, det in (("a", False), ("b", True)):
        s = train(run_config(max_steps=2, deterministic=det), latents, str(tiny_model),
                  tmp_path / name, tmp_path / f"c{name}", "5" * 64)  # fmt: skip
        assert s["steps"] == 2
    assert sha(tmp_path / "a" / "pytorch_lora_weights.safetensors") == sha(
        tmp_path / "b" / "pytorch_lora_weights.safetensors"
    )


def test_resume_with_lora_dropout_is_bit_exact(latents, tiny_model, tmp_path):
    """LoRA dropout draws from global RNG, which checkpoints do not hold: it is seeded per step."""
    from lorapipe.train import train

    run = run_config(max_steps=4, save_steps=2, lora_dropout=0.5)
    train(run, latents, str(tiny_model), tmp_path / "ref", tmp_path / "cref", "8" * 64)
    ck = tmp_path / "ck"
    train(run, latents, str(tiny_model), tmp_path / "x", ck, "8" * 64, stop_after=3)
    train(run, latents, str(tiny_model), tmp_path / "x", ck, "8" * 64)
    assert sha(tmp_path / "x" / "pytorch_lora_weights.safetensors") == sha(
        tmp_path / "ref" / "pytorch_lora_weights.safetensors"
    )


def test_disk_full_at_a_checkpoint_keeps_the_last_good_one_and_a_rerun_finishes(
    latents, tiny_model, tmp_path, monkeypatch
):
    """ENOSPC from the kernel (every atomic write's temporary file is /dev/full) while training
    saves a checkpoint: a clear error, the previous checkpoint intact and nothing half-written
    taken for one; after space is freed, a rerun resumes to the bytes of an uninterrupted run."""
    import errno

    import lorapipe.io as lio
    from lorapipe.train import train

    run = run_config()
    train(run, latents, str(tiny_model), tmp_path / "ref", tmp_path / "cref", "b" * 64)
    ck = tmp_path / "ck"
    train(run, latents, str(tiny_model), tmp_path / "x", ck, "b" * 64, stop_after=4)
    real = lio._make_temp

    def full(path):
        tmp = real(path)
        tmp.unlink()
        tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(lio, "_make_temp", full)
    with pytest.raises(OSError) as info:
        train(run, latents, str(tiny_model), tmp_path / "x", ck, "b" * 64)
    assert info.value.errno == errno.ENOSPC and "free some space" in str(info.value)
    assert sorted(p.name for p in (ck / ("b" * 16)).glob("step-*")) == ["step-000004"]
    assert not (tmp_path / "x" / "pytorch_lora_weights.safetensors").exists()
    monkeypatch.setattr(lio, "_make_temp", real)
    train(run, latents, str(tiny_model), tmp_path / "x", ck, "b" * 64)
    got = tmp_path / "x" / "pytorch_lora_weights.safetensors"
    assert sha(got) == sha(tmp_path / "ref" / "pytorch_lora_weights.safetensors")
