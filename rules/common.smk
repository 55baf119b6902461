# Configuration, wildcard constraints and the functions the rules name. What the plan holds (image
# lists, shards, param stamps, model file lists) is lorapipe.planning, tested in tests/unit. Cheap
# on purpose: this file runs for every job (and every cluster job), so it imports no torch or
# diffusers; the lorapipe modules it uses are stdlib + PyYAML.
import os
import sys
from pathlib import Path

# Jobs import the lorapipe of this workflow checkout, not whichever one is installed.
_SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, _SRC)
# (This exports a variable to jobs; it reads none, so an `envvars:` assertion does not apply.)
os.environ.update(
    PYTHONPATH=os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH", "")) if p)
)

from lorapipe import config as lpconfig
from lorapipe.demo import demo_files
from lorapipe.fingerprint import script_code, versions
from lorapipe.images import pil_identity
from lorapipe.io import integrity_param
from lorapipe.manifest import rescan_token
from lorapipe.planning import Planner
from lorapipe.snakemake_hooks import (
    cancel_scheduler_timers,
    freeze_at_exit,
    probe_params_without_importing,
    will_run_jobs_here,
)

try:
    lpconfig.load_config(config)
except lpconfig.ConfigError as e:
    raise WorkflowError(str(e)) from None

# A plain local run: the warm worker starts importing now, while Snakemake plans (#17);
# `onstart` joins it (start_warm_worker).
if (
    workflow.is_main_process
    and config.get("warm_worker", True)
    and will_run_jobs_here()
):
    from lorapipe import warm

    warm.start_early(idle_s=60.0 * config.get("warm_worker_idle_minutes", 10))

# Exit as soon as the run is over (#17): no collector pass over Snakemake's imports at shutdown.
freeze_at_exit()
# No pandas import in this process to learn that no params are DataFrames (0.3-0.5 s, #17).
probe_params_without_importing()

NAME = "[A-Za-z0-9][A-Za-z0-9_.-]*"


wildcard_constraints:
    dataset=NAME,
    run="[A-Za-z0-9][A-Za-z0-9_.~-]*",
    model=NAME,
    shard=r"\d{5}",
    res=r"\d+",
    dtype="float32|bfloat16",
    key="[0-9a-f]{16}",


PLAN = Planner(config)
# A validation_split that holds out every listed image: a config error before any job.
if workflow.is_main_process and (_problems := PLAN.holdout_problems()):
    raise WorkflowError(f"invalid config: {'; '.join(_problems)}")
DATASETS = config["datasets"]
MODELS = config["base_models"]
RUNS = PLAN.runs
ENV = "../envs/lorapipe.yaml"
# Which versions of numeric libraries made a file is part of its identity (docs/ARCHITECTURE.md).
LIBS_IMAGE = pil_identity()
LIBS_TORCH = versions("torch", "diffusers", "transformers", "peft")


def start_warm_worker():
    """Local runs: start the warm worker the model stages' jobs are forked from (lorapipe.warm;
    off with `warm_worker: false`). Cluster jobs run where there is none and import for
    themselves."""
    if workflow.local_exec and config.get("warm_worker", True):
        from lorapipe import warm

        idle_s = 60.0 * config.get("warm_worker_idle_minutes", 10)
        warm.start("logs/warm_worker.log", idle_s=idle_s)


def shard_ids(dataset):
    return PLAN.shard_ids(dataset)


def model_files(model, parts):
    """A built model (``tiny``) is a result like any other; one given by path is read in place,
    also when results live in object storage (``local()``)."""
    files = PLAN.model_files(model, parts)
    return files if PLAN.model_built(model) else [local(f) for f in files]


def first_output_dir(wildcards, output):
    """Folder of a rule's first output (a generated model or dataset folder)."""
    return str(Path(output[0]).parent)


def get_final_outputs():
    return PLAN.final_outputs()


# A folder dataset's images and sidecars are params (stamps), not inputs: see lorapipe.planning.
def get_shard_generated_images(wildcards):
    return PLAN.shard_inputs(wildcards.dataset, wildcards.shard)


def get_shard_stamp(wildcards):
    return PLAN.shard_stamp(wildcards.dataset, wildcards.shard)


def get_shard_sidecars(wildcards):
    return PLAN.sidecar_inputs(wildcards.dataset, wildcards.shard)


def get_shard_sidecar_stamp(wildcards):
    return PLAN.sidecar_stamp(wildcards.dataset, wildcards.shard)


def get_shard_overrides(wildcards):
    return PLAN.shard_overrides(wildcards.dataset, wildcards.shard)


def get_shard_relpaths(wildcards):
    return PLAN.shard_relpaths(wildcards.dataset, wildcards.shard)


def get_root(wildcards):
    return PLAN.root(wildcards.dataset)


def get_dataset_manifests(wildcards):
    return PLAN.dataset_manifests(wildcards.dataset)


def get_scan_settings(wildcards):
    return PLAN.scan_settings(wildcards.dataset)


def get_caption_settings(wildcards):
    return PLAN.caption_settings(wildcards.dataset)


def get_variant_settings(wildcards):
    return PLAN.variant_settings(wildcards.dataset)


def get_shard_settings(wildcards):
    return PLAN.shard_settings(wildcards.dataset)


def get_encode_model_files(wildcards):
    m = wildcards.model
    return model_files(m, PLAN.read_parts(m, PLAN.latent_parts(m)))


# A base model's `vae:` override is read in place (never built): its files are inputs of the jobs
# that read it (encode, run_config, train, sample), the model's own VAE files then are not.
def vae_files(model):
    return [local(f) for f in PLAN.vae_files(model)]


def get_encode_vae_files(wildcards):
    return vae_files(wildcards.model)


def get_vae(wildcards):
    return PLAN.vae(wildcards.model)


def get_run_vae_files(wildcards):
    return vae_files(RUNS[wildcards.run].base_model)


def get_run_vae(wildcards):
    return PLAN.vae(RUNS[wildcards.run].base_model)


def latent_integrity(dataset):
    """The integrity param (lorapipe.io) of every latent shard one encode job writes."""
    checks = [integrity_param(tar, workflow) for tar in PLAN.latent_tars(dataset)]

    def integrity(wildcards):
        return [check(wildcards) for check in checks]

    return integrity


def get_model_path(wildcards):
    return PLAN.model_path(wildcards.model)


def get_original_config(wildcards):
    return PLAN.original_config(wildcards.model)


def get_run_model_files(wildcards):
    model = RUNS[wildcards.run].base_model
    return model_files(model, PLAN.read_parts(model))


def get_run_model_path(wildcards):
    return PLAN.run_model_path(wildcards.run)


def get_run_latents(wildcards):
    return PLAN.run_latents(wildcards.run)


def get_run_latent_sidecars(wildcards):
    return PLAN.run_latent_sidecars(wildcards.run)


def get_run_captions(wildcards):
    return PLAN.run_captions(wildcards.run)


def get_run_manifest(wildcards):
    return PLAN.run_manifest(wildcards.run)


def get_run_val_manifest(wildcards):
    return PLAN.run_val_manifest(wildcards.run)


def get_run_val_latents(wildcards):
    return PLAN.run_val_latents(wildcards.run)


def get_run_val_latent_sidecars(wildcards):
    return PLAN.run_val_latent_sidecars(wildcards.run)


def get_run_dataset(wildcards):
    return PLAN.run_dataset(wildcards.run)


def get_run_settings(wildcards):
    return PLAN.run_settings(wildcards.run)


def get_run_context(wildcards):
    return PLAN.run_context(wildcards.run, {**LIBS_TORCH, "pil": LIBS_IMAGE})


def get_run_sample_base(wildcards):
    return PLAN.sample_base(wildcards.run)


def get_sample_base_settings(wildcards):
    return PLAN.sample_base_of(wildcards.model, wildcards.key)


def get_sample_base_model_files(wildcards):
    m = wildcards.model
    return model_files(m, PLAN.read_parts(m))


def get_sample_base_vae_files(wildcards):
    return vae_files(wildcards.model)


def get_track_inputs(wildcards):
    return PLAN.track_inputs(wildcards.run)


def get_mlflow_uri(wildcards):
    return config["mlflow"]["tracking_uri"]


def get_light_threads(wildcards):
    """A job that mostly reads (run_config: a fingerprint, hashing a base model on first use)
    takes no core of a local run's --cores, so that it runs
    beside the encode or sample job that asks for all of a small machine's (#17); one core on a
    cluster, where threads are its CPU request.
    """
    return 0 if workflow.local_exec and not workflow.dryrun else 1


# Training resources: `auto` num_processes counts as 1 at plan time. The workflow profile's
# `set-threads` and `set-resources: train: gpu` win over these (set N there, also for `auto`).
def get_train_threads(wildcards):
    return 2 * PLAN.train_processes(wildcards.run)


def get_train_mem_mb(wildcards):
    return 8000 * PLAN.train_processes(wildcards.run)


def get_train_gpus(wildcards):
    return PLAN.train_gpus(wildcards.run)


SCAN_CACHE = "results/cache/scan/{dataset}/{shard}.jsonl"


def get_shard_rescan(wildcards):
    """Changes when an image of the shard was rewritten with its size and mtime kept (which
    the stamp cannot see): the manifest is rebuilt (lorapipe.manifest.rescan_token)."""
    if "synthetic" in DATASETS[wildcards.dataset]:
        return ""
    return rescan_token(
        get_root(wildcards),
        get_shard_relpaths(wildcards),
        SCAN_CACHE.format(**dict(wildcards.items())),
        record=workflow.is_main_process and not workflow.dryrun,
    )


def sweep_inputs(runs):
    """What a sweep's table reads: each run's summary, metrics, MLflow run and best files."""
    out = []
    for run, _values in runs:
        d = f"results/runs/{run}"
        out += [f"{d}/train_summary.json", f"{d}/metrics.jsonl", f"{d}/mlflow.json"]
        out += [f"{d}/best"] if PLAN.holdout(run).active else []
    return out
