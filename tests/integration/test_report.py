"""One tiny run through the real workflow, then `snakemake --report`: the report holds the loss
plot and sample grid; MLflow has the live run (params, metrics, dataset input) and every exported
file names it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from wf import snakemake, write_config

pytestmark = pytest.mark.slow


def config() -> dict:
    return {
        "mlflow": {"experiment": "report-it", "live_every_s": 1},
        "datasets": {
            "mine": {"path": "data/mine", "resolution": 64, "bucket_step": 16, "shards": 1,
                     "captioner": "template", "caption_template": "a {trigger}",
                     "trigger": "thing"},
        },
        "base_models": {"tiny-sd": {"path": "results/models/tiny-sd", "tiny": {"seed": 0}}},
        "runs": {"r1": {"dataset": "mine", "base_model": "tiny-sd", "max_steps": 4,
                        "save_steps": 2, "batch_size": 4, "lora_rank": 4,
                        "validation_prompts": ["a thing"], "validation_steps": 2}},
    }  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    from lorapipe.demo import make_demo_dataset

    work = tmp_path_factory.mktemp("report")
    make_demo_dataset(work / "data" / "mine", images=8, seed=5)
    write_config(work / "cfg.yaml", config())
    snakemake(work)
    return work


def metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_report_has_loss_and_samples(work):
    snakemake(work, "--report", "results/report.html")
    html = (work / "results" / "report.html").read_text(errors="replace")
    assert len(html) > 10_000
    for name in ("loss.png", "samples.png"):
        assert name in html, name
    assert re.search(r"Training loss of run", html)  # the caption, rendered for the run


def test_live_run_is_the_tracked_run_and_the_files_name_it(work):
    from mlflow import MlflowClient

    d = work / "results" / "runs" / "r1"
    tracked = json.loads((d / "mlflow.json").read_text())
    run_id = tracked["run_id"]
    summary = json.loads((d / "train_summary.json").read_text())
    assert summary["mlflow_run_id"] == run_id  # the train stage's live run, reused by track
    for f in (d / "pytorch_lora_weights.safetensors", d / "r1.safetensors"):
        assert metadata(f)["lorapipe_mlflow_run_id"] == run_id, f.name

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert run.data.params["run.lora_rank"] == "4"
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "mine" and ds.dataset.source_type == "local"
    doc_fp = metadata(d / "r1.safetensors")["lorapipe_dataset_manifest_hash"]
    assert ds.dataset.digest == doc_fp[:32]

    (ckpt,) = (work / "results" / "checkpoints" / "r1").iterdir()
    exports = ckpt / "exports"
    assert sorted(p.name for p in exports.iterdir()) == ["step-000002"]
    files = sorted(p.name for p in (exports / "step-000002").iterdir())
    assert files == ["pytorch_lora_weights.safetensors", "r1-step000002.safetensors"]
    assert metadata(exports / "step-000002" / "r1-step000002.safetensors")["ss_steps"] == "2"
