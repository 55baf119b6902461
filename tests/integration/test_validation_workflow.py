"""Validation and sweeps in the real workflow: `snakemake sweep_<name>` ranks its runs in a table
with their best steps, MLflow has the curve and the sweep's tag, and choosing the split reruns
training only."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from wf import copy_workflow, planned_jobs, small_config, snakemake, write_config

pytestmark = pytest.mark.slow
DATA_STAGES = {"manifest", "merge_manifest", "caption", "shard", "encode"}


def config(split) -> dict:
    cfg = small_config(max_steps=4)
    cfg["datasets"]["mine"]["validation_split"] = split
    cfg["sweeps"] = {"s": {"table": "sweep.tsv", "base": {"dataset": "mine",
                                                          "base_model": "tiny-sd"}}}  # fmt: skip
    return cfg


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    """A workflow copy; `snakemake sweep_s` done on a 12-image dataset holding out 3 images."""
    from lorapipe.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("val")
    code = copy_workflow(root / "code")
    work = root / "work"
    make_demo_dataset(work / "data" / "mine", images=12, seed=3)
    (work / "sweep.tsv").write_text("lora_rank\n2\n4\n")
    write_config(work / "cfg.yaml", config(3))
    snakemake(work, "sweep_s", code=code)
    return code, work


def test_sweep_table_best_steps_and_mlflow(wf):
    import mlflow

    _, work = wf
    runs = ["s_lora_rank~2", "s_lora_rank~4"]
    rows = list(csv.DictReader((work / "results/sweeps/s/runs.csv").open()))
    assert sorted(r["run"] for r in rows) == runs and [r["rank"] for r in rows] == ["1", "2"]
    assert float(rows[0]["best_val_loss"]) <= float(rows[1]["best_val_loss"])
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    for row in rows:
        d = work / "results" / "runs" / row["run"]
        s = json.loads((d / "train_summary.json").read_text())
        assert (s["train_images"], s["validation_images"]) == (9, 3)  # 12 valid images
        doc = yaml.safe_load((d / "config.yaml").read_text())
        assert doc["validation"]["train_images"] == 9 and doc["sweep"] == "s"
        assert float(row["best_val_loss"]) == pytest.approx(s["best_val_loss"], rel=1e-5)
        assert int(row["best_step"]) == s["best_step"] and row["lora_rank"] == row["run"][-1]
        val = {m["step"]: m["val_loss"] for m in map(json.loads, (d / "metrics.jsonl")
               .read_text().splitlines()) if "val_loss" in m}  # fmt: skip
        assert sorted(val) == [2, 4]  # at each save (save_steps 2) and the last step
        assert s["best_val_loss"] == min(val.values())
        best = json.loads((d / "best" / "best.json").read_text())
        assert best["step"] == s["best_step"] and (d / "best" / best["files"][0]).is_file()
        run = client.get_run(row["mlflow_run_id"])
        assert run.data.tags["lorapipe.sweep"] == "s"
        assert run.data.tags["lorapipe.best_step"] == str(s["best_step"])
        assert run.data.metrics["best_val_loss"] == pytest.approx(s["best_val_loss"])
        history = client.get_metric_history(row["mlflow_run_id"], "val_loss")
        assert {m.step: m.value for m in history} == pytest.approx(val)
    assert "<table>" in (work / "results/sweeps/s/runs.html").read_text()


def test_choosing_the_split_reruns_training_not_data(wf):
    code, work = wf
    try:
        write_config(work / "cfg.yaml", config(0.5))
        jobs = planned_jobs(work, code, "sweep_s")
        assert jobs and not DATA_STAGES & set(jobs) and jobs["train"] == 2, jobs
        write_config(work / "cfg.yaml", config(13))  # 13 listed files (one is truncated)
        out = snakemake(work, "sweep_s", "-n", code=code, check=False)
        assert out.returncode != 0
        assert "datasets.mine.validation_split: 13 leaves no training image" in out.stdout + \
            out.stderr  # fmt: skip
    finally:
        write_config(work / "cfg.yaml", config(3))
    assert planned_jobs(work, code, "sweep_s") == {}
