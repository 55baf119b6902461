"""Held-out validation: a split stable under added images, config errors naming the key, a
validation loss that never touches the training bytes and that a resumed run reproduces, the
best step's files, and the sweep table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import latents, run_config, sha  # noqa: F401  (latents: the module's fixture)

from lorapipe.config import ConfigError, load_config, load_yaml
from lorapipe.holdout import Holdout, key_hash, settings_problems
from lorapipe.shards import sample_key

REPO = Path(__file__).resolve().parents[2]


def keys(n: int, start: int = 0) -> list[str]:
    return [sample_key(f"img/{i:05d}.png") for i in range(start, start + n)]


def test_fraction_split_never_moves_an_image_when_images_are_added():
    h = Holdout("ds", 0.2)
    before = keys(500)
    val = h.held_out(before)
    after = h.held_out(before + keys(300, start=500))
    assert after & set(before) == val  # the first 500 images: the same side as before
    assert 0.15 < len(after) / 800 < 0.25  # about the fraction asked for
    assert val == {k for k in before if key_hash(k) < 0.2}  # from each image's own key
    # the order of the listing plays no part
    assert h.held_out(list(reversed(before))) == val


def test_count_split_only_ever_moves_images_to_training():
    h = Holdout("ds", 10)
    before = keys(100)
    val = h.held_out(before)
    assert len(val) == 10
    added = keys(50, start=100)
    after = h.held_out(before + added)
    assert len(after) == 10
    # no training image became a validation image; each added image displaces at most one
    assert not (after - val) - set(added)
    assert len(val - after) <= len(set(added) & after)


def test_split_samples_keeps_order_and_reads_only_the_key():
    samples = [{"key": k} for k in sorted(keys(40))]
    train, val = Holdout("ds", 0.25).split_samples(samples)
    assert train + val != samples and sorted(train + val, key=lambda s: s["key"]) == samples
    assert [s["key"] for s in train] == sorted(s["key"] for s in train)
    assert not {s["key"] for s in train} & {s["key"] for s in val}


def config(**dataset) -> dict:
    cfg = load_yaml(REPO / "config" / "config.yaml")
    cfg["datasets"]["demo"].update(dataset)
    return cfg


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"validation_split": 1.5}, r"datasets\.demo\.validation_split: 1\.5: a fraction"),
        ({"validation_split": 0}, r"datasets\.demo\.validation_split: 0 is less than or equal"),
        ({"validation_split": None, "validation_dataset": "nope"},
         r"datasets\.demo\.validation_dataset: unknown dataset 'nope'"),
        ({"validation_split": None, "validation_dataset": "demo"},
         r"datasets\.demo\.validation_dataset: a dataset cannot validate on itself"),
        ({"validation_split": 0.1, "validation_dataset": "demo"},
         r"datasets\.demo\.validation_dataset: set either"),
    ],
)
def test_config_errors_name_the_key(dataset, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config(**dataset), check_files=False)


def test_a_split_leaving_no_training_image_is_a_config_error(latents, tiny_model, tmp_path):  # noqa: F811
    from lorapipe.planning import Planner
    from lorapipe.train import train

    cfg = load_config(config(validation_split=41), check_files=False)  # the demo lists 41 files
    assert Planner(cfg).holdout_problems() == [
        "datasets.demo.validation_split: 41 leaves no training image (the dataset has 41 listed "
        "image(s)): hold out fewer"
    ]
    assert Planner(load_config(config(validation_split=40), check_files=False)).holdout_problems() \
        == []  # fmt: skip
    assert settings_problems(load_config(config(), check_files=False)) == []
    # at training time (after rejects): the same error, before any model is loaded
    spec = {"owner": "demo", "split": 999, "dataset": None, "shards": []}
    with pytest.raises(ConfigError, match=r"datasets\.demo\.validation_split: 999 leaves no"):
        train(run_config(), latents, str(tiny_model), tmp_path / "o", tmp_path / "c", "f" * 64,
              validation=spec)  # fmt: skip


def test_fixed_draws_depend_on_the_key_only_and_spread_the_timesteps():
    from lorapipe.training.validation import VAL_TIMESTEPS, fixed_draws

    t1, n1 = fixed_draws("abc", (4, 8, 8), 1000)
    t2, n2 = fixed_draws("abc", (4, 8, 8), 1000)
    assert t1 == t2 and all((a == b).all() for a, b in zip(n1, n2, strict=True))
    assert len(t1) == VAL_TIMESTEPS
    for j, t in enumerate(t1):  # one timestep in each stratum of [0, 1000)
        assert j * 1000 // VAL_TIMESTEPS <= t < (j + 1) * 1000 // VAL_TIMESTEPS
    assert fixed_draws("abd", (4, 8, 8), 1000)[0] != t1


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


SPLIT = {"owner": "demo", "split": 0.25, "dataset": None, "shards": []}


def test_validation_never_touches_the_training_bytes(latents, tiny_model, tmp_path, monkeypatch):  # noqa: F811
    """Validation on (every step) and off: the same LoRA bytes and the same training losses."""
    import lorapipe.training.validation as validation
    from lorapipe.train import train

    def go(name, **kw):
        train(run, latents, str(tiny_model), tmp_path / name, tmp_path / f"c{name}", "f" * 64,
              **kw)  # fmt: skip
        return tmp_path / name

    run = run_config(max_steps=6, val_every_steps=1, lora_dropout=0.1)  # dropout: global RNG
    # a validation dataset: the training samples are the same with and without it
    off = go("off")
    on = go("on", validation={**SPLIT, "split": None, "dataset": "other", "shards": latents[1:]})
    lora = "pytorch_lora_weights.safetensors"
    assert sha(on / lora) == sha(off / lora)
    assert [m["loss"] for m in metrics(on)] == [m["loss"] for m in metrics(off)]
    assert all("val_loss" in m for m in metrics(on)) and not any("val_loss" in m
                                                                for m in metrics(off))  # fmt: skip
    # a split, evaluated every step, and the same split never evaluated
    split_on = go("split_on", validation=SPLIT)
    monkeypatch.setattr(validation, "evaluate", lambda st, samples: 0.0)
    split_off = go("split_off", validation=SPLIT)
    assert sha(split_on / lora) == sha(split_off / lora)
    assert sha(split_on / lora) != sha(off / lora)  # the held-out images did not train
    from lorapipe.latents import load_latent_shards

    summary = json.loads((split_on / "train_summary.json").read_text())
    n = len(load_latent_shards(latents))
    assert summary["train_images"] == summary["samples"] == n - summary["validation_images"]
    assert summary["validation_images"] > 0 and summary["best_step"] is not None


def test_resume_reports_the_validation_losses_of_an_uninterrupted_run(latents, tiny_model,  # noqa: F811
                                                                     tmp_path):  # fmt: skip
    from lorapipe.train import train

    run = run_config(max_steps=10, val_every_steps=3)  # save_steps 4: 3, 6, 9 are no checkpoints
    ref_out, out, ck = tmp_path / "ref", tmp_path / "x", tmp_path / "ck"
    ref = train(run, latents, str(tiny_model), ref_out, tmp_path / "cref", "a" * 64,
                validation=SPLIT)  # fmt: skip
    for stop in (5, 9):  # resumed from step 4, then from step 8
        assert train(run, latents, str(tiny_model), out, ck, "a" * 64, stop_after=stop,
                     validation=SPLIT) == {"stopped_at": stop}  # fmt: skip
    got = train(run, latents, str(tiny_model), out, ck, "a" * 64, validation=SPLIT)
    want = [(m["step"], m["val_loss"]) for m in metrics(ref_out) if "val_loss" in m]
    assert [(m["step"], m["val_loss"]) for m in metrics(out) if "val_loss" in m] == want
    steps = ref["steps"]
    assert [s for s, _ in want] == [s for s in range(1, steps + 1) if s % 3 == 0 or s == steps]
    for k in ("best_step", "best_val_loss", "val_loss", "best_export", "validation_images"):
        assert got[k] == ref[k], k
    best, loss = min(((s, v) for s, v in want), key=lambda sv: (sv[1], sv[0]))
    assert (ref["best_step"], ref["best_val_loss"]) == (best, loss)
    assert ref["val_loss"] == want[-1][1]
    # the best step's files exist: its export (written also when it is no checkpoint step)
    if best != steps:
        assert Path(ref["best_export"], "pytorch_lora_weights.safetensors").is_file()


def test_best_folder_links_the_best_step_or_the_final_files(tmp_path):
    from lorapipe.best import write_best

    export = tmp_path / "ck" / "exports" / "step-000004"
    export.mkdir(parents=True)
    (export / "pytorch_lora_weights.safetensors").write_bytes(b"step4")
    (export / "r-step000004.safetensors").write_bytes(b"kohya4")
    final, kohya = tmp_path / "final.safetensors", tmp_path / "r.safetensors"
    final.write_bytes(b"final")
    kohya.write_bytes(b"kohyafinal")
    summary = tmp_path / "s.json"
    summary.write_text(json.dumps({"steps": 9, "best_step": 4, "best_val_loss": 0.5,
                                   "val_loss": 0.7, "best_export": str(export)}))  # fmt: skip
    info = write_best(str(summary), "r", str(final), str(kohya), tmp_path / "best")
    assert (tmp_path / "best" / "pytorch_lora_weights.safetensors").read_bytes() == b"step4"
    assert (tmp_path / "best" / "r-step000004.safetensors").read_bytes() == b"kohya4"
    assert info["step"] == 4 and info["val_loss"] == 0.5 and not info["best_is_last"]
    assert json.loads((tmp_path / "best" / "best.json").read_text()) == info
    summary.write_text(json.dumps({"steps": 9, "best_step": 9, "best_val_loss": 0.4,
                                   "val_loss": 0.4, "best_export": None}))  # fmt: skip
    info = write_best(str(summary), "r", str(final), str(kohya), tmp_path / "best")
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [
        "best.json", "final.safetensors", "r.safetensors"
    ]
    assert info["best_is_last"] and info["step"] == 9


def fake_run(results: Path, name: str, best: float | None, losses: list[float]) -> None:
    d = results / "runs" / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "loss": x}) + "\n" for i, x in enumerate(losses))
    )
    s = {"steps": len(losses), "final_loss": losses[-1], "images_per_s_steady": 12.5,
         "wall_s": 3.0, "samples": 30}  # fmt: skip
    if best is not None:
        s.update(best_step=2, best_val_loss=best, val_loss=best + 0.1, validation_images=8,
                 train_images=30)  # fmt: skip
        (d / "best").mkdir()
    (d / "train_summary.json").write_text(json.dumps(s))
    (d / "mlflow.json").write_text(json.dumps({"run_id": f"id-{name}"}))
    (d / "pytorch_lora_weights.safetensors").write_bytes(b"x")


def test_sweep_table_lists_every_run_ranked_with_its_numbers(tmp_path):
    import csv

    from lorapipe.sweeps import sweep_runs, write_table

    cfg = load_yaml(REPO / "config" / "config.yaml")
    cfg["sweeps"] = {"rank-lr": {"table": "config/sweep.example.tsv",
                                 "base": {"dataset": "demo", "base_model": "tiny-sd"}}}  # fmt: skip
    load_config(cfg, workdir=REPO, check_files=False)
    runs = sweep_runs(cfg, REPO)["rank-lr"]
    assert [r for r, _ in runs] == [
        "rank-lr_lora_rank~4_learning_rate~0.001", "rank-lr_lora_rank~8_learning_rate~0.001",
        "rank-lr_lora_rank~8_learning_rate~0.0005",
    ]
    assert runs[0][1] == {"lora_rank": 4, "learning_rate": 0.001}
    results = tmp_path / "results"
    for (name, _), best in zip(runs, (0.30, 0.10, 0.20), strict=True):
        fake_run(results, name, best, [1.0, 0.8, best * 2])
    out = tmp_path / "results" / "sweeps" / "rank-lr"
    write_table("rank-lr", runs, out / "runs.csv", out / "runs.html", results)
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [r["run"] for r in rows] == [runs[1][0], runs[2][0], runs[0][0]]  # best val loss first
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    first = rows[0]
    assert (first["lora_rank"], first["learning_rate"]) == ("8", "0.001")
    assert (first["best_val_loss"], first["best_step"], first["steps"]) == ("0.1", "2", "3")
    assert (first["final_loss"], first["final_val_loss"], first["best_is_last"]) == \
        ("0.2", "0.2", "False")  # fmt: skip
    assert (first["images_per_s"], first["mlflow_run_id"]) == ("12.5", f"id-{runs[1][0]}")
    assert first["lora"].endswith(f"runs/{runs[1][0]}/pytorch_lora_weights.safetensors")
    assert first["best"].endswith(f"runs/{runs[1][0]}/best") and first["kohya"] == ""
    page = (out / "runs.html").read_text()
    assert all(name in page for name, _ in runs) and "<script>" in page
    assert f'href="../../runs/{runs[1][0]}/best"' in page


def test_planner_paths_of_a_validation_dataset_and_sweep_runs():
    from lorapipe.planning import Planner

    cfg = config(validation_split=None, validation_dataset="held")
    cfg["datasets"]["held"] = {"path": "data/held", "synthetic": {"images": 4}, "shards": 2,
                               "resolution": 32, "bucket_step": 16, "latent_dtype": "bfloat16"}
    cfg["sweeps"] = {"lr": {"table": "config/sweep.example.tsv",
                            "base": {"dataset": "demo", "base_model": "tiny-sd"}}}  # fmt: skip
    plan = Planner(load_config(cfg, workdir=REPO, check_files=False))
    assert plan.run_val_latents("demo") == [
        f"results/held/latents/tiny-sd-32-bfloat16/{s}.tar" for s in ("00000", "00001")
    ]
    assert plan.run_val_manifest("demo") == ["results/held/manifest.jsonl"]
    assert plan.run_latents("demo")[0].startswith("results/demo/latents/tiny-sd-64-float32/")
    assert "results/runs/demo/best" in plan.final_outputs()
    assert "results/sweeps/lr/runs.csv" in plan.final_outputs()
    run = "lr_lora_rank~8_learning_rate~0.001"
    assert plan.run_sweep(run) == "lr" and plan.run_sweep("demo") is None
    assert plan.run_context(run, {})["sweep"] == "lr" and "sweep" not in plan.run_context(
        "demo", {})  # fmt: skip
    assert plan.holdout(run).dataset == "held"
