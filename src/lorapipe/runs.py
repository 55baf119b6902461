"""A run's identity on disk: the resolved config.yaml with its fingerprints, and what reads it.

config.yaml holds everything needed to reproduce a run: its settings (defaults applied), the
dataset and base-model blocks (paths included), library versions, and fingerprints of the config,
the dataset manifest, the base model files and the code. The run fingerprint names its checkpoint
folder, so a changed run never resumes a checkpoint of another.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from .config import RunConfig
from .fingerprint import REPO_ROOT_GUESS, digest, file_digest, git_state, tree_digest
from .io import atomic_write_text


def write_run_config(
    run: dict, context: dict, code: str, manifest: str, model_path: str, out: str | os.PathLike,
    val_manifest: str | None = None, vae: str | None = None,
) -> str:
    """Write config.yaml; returns the run fingerprint. ``val_manifest``: the manifest of the
    dataset's validation_dataset (in the fingerprint, and counted in ``validation``). ``vae``:
    the base model's VAE override folder: its digest is fingerprint ``vae`` and
    ``base_model.vae_sha256`` (an MLflow param)."""
    from .holdout import config_block
    from .models import check_vae_folder

    fps = {
        "config": digest({"run": run, **{k: v for k, v in context.items() if k != "libraries"}}),
        "dataset_manifest": file_digest([manifest]),
        "base_model": tree_digest(model_path),
        "code": code,
        "libraries": digest(context["libraries"]),
    }
    if val_manifest:
        fps["validation_manifest"] = file_digest([val_manifest])
    if vae:
        fps["vae"] = tree_digest(check_vae_folder(vae))
    fps["run"] = digest(fps)
    doc = {"run": run, **context, "fingerprints": fps, "git": git_state(REPO_ROOT_GUESS)}
    if vae:
        doc["base_model"] = {**context["base_model"], "vae_sha256": fps["vae"]}
    block = config_block(context["dataset"], manifest, val_manifest)  # images on each side
    if block:
        doc["validation"] = block
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


def model_configs(path: str | os.PathLike, original_config: str | None = None) -> dict:
    """``{"unet": unet/config.json, "scheduler": scheduler/scheduler_config.json}`` of a base
    model (of its ``original_config`` folder for a single file), as dicts; a part whose config
    cannot be read (a path not on this machine) is left out."""
    p = Path(path)
    folder = Path(original_config) if p.suffix == ".safetensors" and original_config else p
    out = {}
    for part, name in (("unet", "config.json"), ("scheduler", "scheduler_config.json")):
        try:
            out[part] = json.loads((folder / part / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    return out


def base_model_hashes(path: str | os.PathLike) -> dict[str, str]:
    """sd-scripts' ``ss_sd_model_hash`` (WebUI's old hash: sha256 of 64 KiB at 1 MiB, 8 hex) and
    ``ss_new_sd_model_hash`` (sha256 of the file) of a single-file base model; none for a
    diffusers folder (sd-scripts would write "IsADirectory") or a file not on this machine."""
    from .fingerprint import cached_sha256

    p = Path(path)
    if not p.is_file():
        return {}
    with open(p, "rb") as fh:
        fh.seek(0x100000)
        legacy = hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
    return {"ss_sd_model_hash": legacy, "ss_new_sd_model_hash": cached_sha256(p)}


def _dataset_fields(ds: dict) -> dict[str, str]:
    """The kohya fields of a dataset's settings: caption variants, buckets, resolution."""
    from .images import make_buckets

    res = int(ds["resolution"])
    variants = int(ds.get("caption_variants") or 0)
    shuffle = bool(variants and ds.get("shuffle_captions"))
    out = {
        "ss_resolution": f"({res}, {res})",
        "ss_enable_bucket": str(ds["buckets"]),
        "ss_shuffle_caption": str(shuffle),
        "ss_keep_tokens": str(int(ds.get("keep_tokens") or 0) if shuffle else 0),
        "ss_caption_tag_dropout_rate": str(float(ds.get("tag_dropout") or 0) if variants else 0.0),
        "ss_flip_aug": "False",
        "ss_color_aug": "False",
        "ss_random_crop": "False",  # centre crop into the bucket
        "ss_bucket_no_upscale": "False",
        "modelspec.resolution": f"{res}x{res}",
    }
    if ds["buckets"]:
        buckets = make_buckets(res, int(ds.get("bucket_step") or 64))
        sides = [x for b in buckets for x in (b.width, b.height)]
        out["ss_min_bucket_reso"], out["ss_max_bucket_reso"] = str(min(sides)), str(max(sides))
    if ds.get("trigger"):
        out["modelspec.trigger_phrase"] = str(ds["trigger"])
    return out


def file_metadata(
    doc: dict, model_path: str | None = None, architecture: dict | None = None
) -> dict[str, str]:
    """Metadata every exported LoRA file of a run carries: the trace fields, plus the run-level
    ``ss_*`` / ``modelspec.*`` fields of its dataset and base model.

    ``model_path``: where this job sees the base model (default: its path in config.yaml);
    ``architecture``: `export.architecture_metadata` of it, when known already (otherwise it is
    read from the model's configs, and left out when they are not on this machine). No
    absolute path of this machine is written unless the run sets ``metadata_paths: true``:
    ``ss_sd_model_name`` and the dataset key (``lorapipe_dataset``, the key of
    ``ss_dataset_dirs``) are the model folder's and the dataset's names.
    """
    from .export import architecture_metadata

    ds, bm, run = doc["dataset"], doc["base_model"], doc.get("run", {})
    paths = bool(run.get("metadata_paths"))
    path = model_path or bm["path"]
    extra = trace_metadata(doc)
    extra.update(_dataset_fields(ds))
    extra["ss_sd_model_name"] = os.path.abspath(bm["path"]) if paths else Path(bm["path"]).name
    if bm.get("vae"):  # a vae: override, as sd-scripts names its --vae
        extra["ss_vae_name"] = os.path.abspath(bm["vae"]) if paths else Path(bm["vae"]).name
    extra["lorapipe_dataset"] = (
        os.path.abspath(ds["path"]) if paths and ds.get("path") else str(ds.get("name", ""))
    )
    # sd-scripts draws a random session id (0..2**32); one run's files (each step, the final)
    # share this one, drawn from the run fingerprint
    fp = str(doc["fingerprints"]["run"]).encode()
    extra["ss_session_id"] = str(int(hashlib.sha256(fp).hexdigest()[:8], 16))
    if architecture is None:
        cfgs = model_configs(path, bm.get("original_config"))
        architecture = architecture_metadata(cfgs.get("unet") or {}, cfgs.get("scheduler") or {})
    extra.update(architecture)
    extra.update(base_model_hashes(path))
    return extra


def train_facts(summary: dict, metrics_jsonl=None, shard_indexes=()) -> dict:
    """What `export.train_metadata` needs, from train_summary.json; where it lacks a fact, from
    the stage's other files: the finish time from the last step's time in ``metrics_jsonl``
    (the start: that less ``wall_s``), the buckets from the shards' index files, the planned
    steps from the steps done (a finished run did them all)."""
    from .export import bucket_info

    facts = dict(summary)
    facts.setdefault("max_steps", summary.get("steps"))
    if facts.get("finished_at") is None and metrics_jsonl and Path(metrics_jsonl).is_file():
        lines = [x for x in Path(metrics_jsonl).read_text().splitlines() if x.strip()]
        if lines and "time" in json.loads(lines[-1]):
            facts["finished_at"] = json.loads(lines[-1])["time"]
            if facts.get("started_at") is None and summary.get("wall_s") is not None:
                facts["started_at"] = facts["finished_at"] - float(summary["wall_s"])
    if not facts.get("bucket_info"):
        rows = [
            json.loads(x)
            for f in shard_indexes
            if Path(f).is_file()
            for x in Path(f).read_text(encoding="utf-8").splitlines()
            if x.strip()
        ]
        if rows:
            facts["bucket_info"] = bucket_info(rows)
    return facts


def export_metadata(
    config_yaml: str, summary_json: str, metrics_jsonl=None, shard_indexes=()
) -> tuple[dict, dict[str, str]]:
    """(run settings, metadata) of the final kohya file: `file_metadata`, what training did
    (`train_facts`, `export.train_metadata`: steps, precision used, times, buckets, images) and
    the MLflow run id the train stage logged to (when it reached the store)."""
    from .export import train_metadata

    doc = read_run_config(config_yaml, context=True)
    summary = json.loads(Path(summary_json).read_text())
    extra = file_metadata(doc, architecture=summary.get("architecture"))
    facts = train_facts(summary, metrics_jsonl, shard_indexes)
    extra.update(train_metadata(facts, doc["run"]))
    if summary.get("mlflow_run_id"):
        extra["lorapipe_mlflow_run_id"] = summary["mlflow_run_id"]
    return doc["run"], extra


def run_tags(doc: dict) -> dict[str, str]:
    """MLflow tags of a run: fingerprints (``lorapipe.fingerprint`` finds the run) and git."""
    tags = {f"lorapipe.{k}": v for k, v in trace_metadata(doc).items() if k != "lorapipe_run"}
    tags = {k.replace("lorapipe.lorapipe_", "lorapipe."): v for k, v in tags.items()}
    tags["mlflow.source.git.commit"] = str(doc.get("git", {}).get("commit", "unknown"))
    tags["lorapipe.git_dirty"] = str(doc.get("git", {}).get("dirty", False))
    if doc["fingerprints"].get("vae"):  # a base model's vae: override (its folder's digest)
        tags["lorapipe.vae_hash"] = str(doc["fingerprints"]["vae"])
    if doc.get("sweep"):  # the runs of a sweep share it (filter: tags.lorapipe.sweep = '…')
        tags["lorapipe.sweep"] = str(doc["sweep"])
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
    val_latents: list[str] = (),
    vae: str | None = None,
) -> dict:
    """The train stage: train the run of ``config_yaml``; exported files carry
    `file_metadata`. Live MLflow metrics when ``mlflow`` (``uri``, ``experiment``, ``live``,
    ``live_every_steps``, ``live_every_s``: the `mlflow:` config block) has ``live`` on.
    ``val_latents``: the latent shards of the dataset's validation_dataset, if it has one.
    ``vae``: where this job sees the base model's VAE override folder (default: config.yaml's).
    """
    from .holdout import train_spec
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
        tracker=tracker, export_meta=file_metadata(doc, model_path),
        original_config=doc["base_model"].get("original_config"),
        validation=train_spec(doc, val_latents),
        vae=vae or doc["base_model"].get("vae"),
    )  # fmt: skip


def export_run(
    config_yaml: str, lora: str, summary_json: str, captions: list[str], out: str, dataset: str
) -> int:
    """The kohya-layout file of a finished run (``out``), written by the train stage's job
    right after training: ``lora`` (the diffusers-layout file) in kohya keys with ``ss_*`` and
    ``modelspec.*`` metadata (`export_metadata`; facts train_summary.json lacks come from the
    stage's metrics.jsonl and the shards' index files, where they sit beside ``captions``).
    kohya's SDXL names follow the UNet's block layout, read from the base model's UNet config.
    The number of tensors written."""
    from .export import export_kohya

    metrics = Path(summary_json).with_name("metrics.jsonl")
    indexes = [c.replace("/captions/", "/shards/") for c in captions]
    run_cfg, extra = export_metadata(config_yaml, summary_json, metrics, indexes)
    bm = read_run_config(config_yaml, context=True)["base_model"]
    unet_config = model_configs(bm["path"], bm.get("original_config")).get("unet")
    return export_kohya(lora, out, run_cfg, extra, list(captions), dataset, unet_config=unet_config)


def track_run(inputs, uri: str | None, experiment: str, out_json: str) -> str:
    """Log a finished run (the track rule's inputs) to MLflow."""
    from .mlflow_store import tracking_uri
    from .tracking import dataset_input, log_run

    doc = read_run_config(inputs.config, context=True)
    summary = json.loads(Path(inputs.summary).read_text())
    tags = run_tags(doc)
    tags.update({f"summary.{k}": str(v) for k, v in summary.items()})
    best = {k: summary[k] for k in ("best_step", "best_val_loss") if summary.get(k) is not None}
    tags.update({f"lorapipe.{k}": str(v) for k, v in best.items()})
    grid = [inputs.samples] if "samples" in inputs.keys() else []  # none: no sample grids
    artifacts = [
        inputs.config, inputs.lora, inputs.kohya, *grid, inputs.loss, inputs.metrics
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
        else None,  # the sample grid of each saved step (rule sample)
        summary_metrics=(best, summary.get("steps")) if best else None,
    )  # fmt: skip
