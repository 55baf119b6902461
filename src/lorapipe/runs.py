"""A run's identity on disk: the resolved config.yaml with its fingerprints, and what reads it.

config.yaml holds everything needed to reproduce a run: its settings (defaults applied), the
dataset and base-model blocks (paths included), library versions, and fingerprints of the config,
the dataset manifest, the base model files and the code. The run fingerprint names its checkpoint
folder, so a changed run never resumes a checkpoint of another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from .config import RunConfig
from .fingerprint import REPO_ROOT_GUESS, digest, file_digest, git_state, tree_digest
from .io import atomic_write_text


def write_run_config(
    run: dict, context: dict, code: str, manifest: str, model_path: str, out: str | os.PathLike
) -> str:
    """Write config.yaml; returns the run fingerprint."""
    fps = {
        "config": digest({"run": run, **{k: v for k, v in context.items() if k != "libraries"}}),
        "dataset_manifest": file_digest([manifest]),
        "base_model": tree_digest(model_path),
        "code": code,
        "libraries": digest(context["libraries"]),
    }
    fps["run"] = digest(fps)
    doc = {"run": run, **context, "fingerprints": fps, "git": git_state(REPO_ROOT_GUESS)}
    atomic_write_text(out, yaml.safe_dump(doc, sort_keys=True, allow_unicode=True))
    return fps["run"]


def read_run_config(path: str | os.PathLike, context: bool = False):
    """(RunConfig, run fingerprint) from a run's config.yaml; the whole document if ``context``."""
    with open(path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    if context:
        return doc
    return RunConfig.from_dict(doc["run"]), doc["fingerprints"]["run"]


def trace_metadata(doc: dict) -> dict[str, str]:
    """lorapipe's own safetensors metadata: where an exported file came from."""
    fps = doc["fingerprints"]
    return {
        "lorapipe_run": doc["run"]["name"],
        "lorapipe_fingerprint": fps["run"],
        "lorapipe_config_hash": fps["config"],
        "lorapipe_dataset_manifest_hash": fps["dataset_manifest"],
        "lorapipe_base_model_hash": fps["base_model"],
        "lorapipe_code_version": fps["code"],
        "lorapipe_git_commit": str(doc.get("git", {}).get("commit", "unknown")),
    }


def file_metadata(doc: dict) -> dict[str, str]:
    """Metadata every exported LoRA file of a run carries: the trace fields, plus the run-level
    ``ss_*`` fields WebUI/ComfyUI display."""
    extra = trace_metadata(doc)
    extra.update(
        {
            "ss_resolution": f"({doc['dataset']['resolution']}, {doc['dataset']['resolution']})",
            "ss_enable_bucket": str(doc["dataset"]["buckets"]),
            "ss_sd_model_name": Path(doc["base_model"]["path"]).name,
        }
    )
    return extra


def export_metadata(config_yaml: str, summary_json: str) -> tuple[dict, dict[str, str]]:
    """(run settings, metadata) of the final kohya file: `file_metadata`, the step counts and
    the MLflow run id the train stage logged to (when it reached the store)."""
    doc = read_run_config(config_yaml, context=True)
    summary = json.loads(Path(summary_json).read_text())
    extra = file_metadata(doc)
    extra.update(
        {
            "ss_steps": str(summary["steps"]),
            "ss_epoch": str(summary["epochs"]),
            "ss_num_epochs": str(summary["epochs"]),
        }
    )
    if summary.get("mlflow_run_id"):
        extra["lorapipe_mlflow_run_id"] = summary["mlflow_run_id"]
    return doc["run"], extra


def run_tags(doc: dict) -> dict[str, str]:
    """MLflow tags of a run: fingerprints (``lorapipe.fingerprint`` finds the run) and git."""
    tags = {f"lorapipe.{k}": v for k, v in trace_metadata(doc).items() if k != "lorapipe_run"}
    tags = {k.replace("lorapipe.lorapipe_", "lorapipe."): v for k, v in tags.items()}
    tags["mlflow.source.git.commit"] = str(doc.get("git", {}).get("commit", "unknown"))
    tags["lorapipe.git_dirty"] = str(doc.get("git", {}).get("dirty", False))
    return tags


def run_params(doc: dict) -> dict:
    """What becomes the MLflow params of a run: config.yaml without fingerprints and git."""
    return {k: v for k, v in doc.items() if k not in ("fingerprints", "git")}


def train_run(
    config_yaml: str,
    latents: list[str],
    model_path: str,
    out_dir: str,
    checkpoints: str,
    mlflow: dict | None = None,
) -> dict:
    """The train stage: train the run of ``config_yaml``; exported files carry
    `file_metadata`. Live MLflow metrics when ``mlflow`` (``uri``, ``experiment``, ``live``,
    ``live_every_steps``, ``live_every_s``: the `mlflow:` config block) has ``live`` on.
    """
    from .live_tracking import LiveTracker
    from .mlflow_store import tracking_uri
    from .train import train

    doc = read_run_config(config_yaml, context=True)
    run, fingerprint = read_run_config(config_yaml)
    tracker = None
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun, one process talks to MLflow
    if mlflow and mlflow.get("live", True) and rank0:
        tracker = LiveTracker(
            tracking_uri(mlflow.get("uri"), os.getcwd()),
            mlflow["experiment"],
            run.name,
            fingerprint,
            tags=run_tags(doc),
            params=run_params(doc),
            every_steps=mlflow.get("live_every_steps", 20),
            every_s=mlflow.get("live_every_s", 10.0),
        )
    return train(
        run, latents, model_path, out_dir, checkpoints, fingerprint,
        tracker=tracker, export_meta=file_metadata(doc),
        original_config=doc["base_model"].get("original_config"),
    )  # fmt: skip


def track_run(inputs, uri: str | None, experiment: str, out_json: str) -> str:
    """Log a finished run (the track rule's inputs) to MLflow."""
    from .mlflow_store import tracking_uri
    from .tracking import dataset_input, log_run

    doc = read_run_config(inputs.config, context=True)
    summary = json.loads(Path(inputs.summary).read_text())
    tags = run_tags(doc)
    tags.update({f"summary.{k}": str(v) for k, v in summary.items()})
    artifacts = [
        inputs.config, inputs.lora, inputs.kohya, inputs.samples, inputs.loss, inputs.metrics
    ]  # fmt: skip
    dataset = dataset_input(
        doc["dataset"], doc["fingerprints"]["dataset_manifest"], summary.get("samples")
    )
    return log_run(
        run_name=doc["run"]["name"], experiment=experiment,
        uri=tracking_uri(uri, os.getcwd()), config=run_params(doc), metrics_jsonl=inputs.metrics,
        artifacts=[str(a) for a in artifacts], tags=tags, out_json=out_json,
        run_id=summary.get("mlflow_run_id"), dataset=dataset,
        artifact_dirs={"samples": str(inputs.step_samples)} if "step_samples" in inputs.keys()
        else None,  # the sample grid of each saved step (rule sample_steps)
    )  # fmt: skip
