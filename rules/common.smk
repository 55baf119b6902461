# Helpers shared by all rules. Cheap on purpose: this file runs for every job (and every cluster
# job), so it imports no torch or diffusers; the lorapipe modules it uses are stdlib + PyYAML.
import hashlib
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
from lorapipe.fingerprint import code_version, versions
from lorapipe.images import IMAGE_EXTENSIONS, pil_identity
from lorapipe.manifest import list_images, shard_of

try:
    lpconfig.load_config(config)
except lpconfig.ConfigError as e:
    raise WorkflowError(str(e)) from None

NAME = "[A-Za-z0-9][A-Za-z0-9_.-]*"


wildcard_constraints:
    dataset=NAME,
    run="[A-Za-z0-9][A-Za-z0-9_.~-]*",
    model=NAME,
    shard=r"\d{5}",
    res=r"\d+",
    dtype="float32|bfloat16",


DATASETS = config["datasets"]
MODELS = config["base_models"]
RUNS = {name: lpconfig.resolve_run(config, name) for name in config["runs"]}
ENV = "../envs/lorapipe.yaml"
# Which versions of numeric libraries made a file is part of its identity (DESIGN.md, principle 6).
LIBS_IMAGE = pil_identity()
LIBS_TORCH = versions("torch", "diffusers", "transformers", "peft")
MODEL_FILES = {
    "unet": ["config.json", "diffusion_pytorch_model.safetensors"],
    "vae": ["config.json", "diffusion_pytorch_model.safetensors"],
    "text_encoder": ["config.json", "model.safetensors"],
    "tokenizer": ["tokenizer.json", "tokenizer_config.json"],
    "scheduler": ["scheduler_config.json"],
}


def shard_ids(dataset):
    return [f"{i:05d}" for i in range(DATASETS[dataset]["shards"])]


_listing = {}


def dataset_images(dataset):
    """Relative paths of the dataset's images (known without generating synthetic data)."""
    if dataset not in _listing:
        ds = DATASETS[dataset]
        if "synthetic" in ds:
            files = demo_files(ds["synthetic"]["images"])
            _listing[dataset] = sorted(
                f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS
            )
        else:
            _listing[dataset] = list_images(ds["path"])
    return _listing[dataset]


_by_shard = {}


def shard_relpaths(dataset, shard):
    """Images of one shard; all shards are assigned in one pass (not one pass per shard)."""
    if dataset not in _by_shard:
        n = DATASETS[dataset]["shards"]
        groups = {i: [] for i in range(n)}
        for p in dataset_images(dataset):
            groups[shard_of(p, n)].append(p)
        _by_shard[dataset] = groups
    return _by_shard[dataset][int(shard)]


def _stamp(root, rels):
    """Digest of (relative path, size, mtime_ns) of each file: changes when any of them does."""
    h = hashlib.sha256()
    for rel in rels:
        st = os.stat(Path(root) / rel)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{len(rels)}:{h.hexdigest()[:32]}"


# Images of a folder dataset are not declared inputs: Snakemake 9 checks every declared input of
# every ready job on each scheduling round (55 of 76 s at 10k images). A per-shard stamp param
# (path, size, mtime_ns of its images) restales exactly the shard whose images were added,
# removed or changed. A synthetic dataset's files are made by a rule, so they stay inputs.


def get_shard_generated_images(wildcards):
    """Images of a shard when a rule generates them (synthetic datasets); none otherwise."""
    if "synthetic" not in DATASETS[wildcards.dataset]:
        return []
    root = Path(DATASETS[wildcards.dataset]["path"])
    return [str(root / p) for p in shard_relpaths(wildcards.dataset, wildcards.shard)]


def get_shard_stamp(wildcards):
    """Stamp of a folder dataset shard's images (see above); "generated" for synthetic data."""
    ds = DATASETS[wildcards.dataset]
    if "synthetic" in ds:
        return "generated"
    return _stamp(ds["path"], shard_relpaths(wildcards.dataset, wildcards.shard))


def _shard_sidecars(dataset, shard):
    """Relative paths of the sidecar captions of a shard's images that exist (.txt first)."""
    ds = DATASETS[dataset]
    root = Path(ds["path"])
    synthetic = (
        set(demo_files(ds["synthetic"]["images"])) if "synthetic" in ds else None
    )
    out = []
    for rel in shard_relpaths(dataset, shard):
        stem = rel.rsplit(".", 1)[0]
        for ext in (".txt", ".caption"):
            cand = stem + ext
            if (synthetic is not None and cand in synthetic) or (root / cand).is_file():
                out.append(cand)
                break
    return out


def get_shard_sidecars(wildcards):
    """Sidecars made by a rule (synthetic datasets) as inputs; a folder's are in the stamp."""
    if "synthetic" not in DATASETS[wildcards.dataset]:
        return []
    root = Path(DATASETS[wildcards.dataset]["path"])
    return [str(root / p) for p in _shard_sidecars(wildcards.dataset, wildcards.shard)]


def get_shard_sidecar_stamp(wildcards):
    """A new, edited or removed sidecar restales only its shard's captions."""
    ds = DATASETS[wildcards.dataset]
    if "synthetic" in ds:
        return "generated"
    return _stamp(ds["path"], _shard_sidecars(wildcards.dataset, wildcards.shard))


_overrides = {}


def get_shard_overrides(wildcards):
    """A person's caption edits (captions.csv) for this shard only: a param, so editing one row
    restales only the shard holding that image."""
    ds = wildcards.dataset
    if ds not in _overrides:
        path = Path(DATASETS[ds]["path"]) / "captions.csv"
        if path.is_file():
            from lorapipe.captions import read_overrides

            _overrides[ds] = read_overrides(path)
        else:
            _overrides[ds] = {}
    mine = set(shard_relpaths(ds, wildcards.shard))
    return {k: v for k, v in sorted(_overrides[ds].items()) if k in mine}


def model_files(model, parts):
    """Files of a base model a rule reads (so a changed model restales exactly its users).

    A model the workflow builds (``tiny``) is a result like any other; a model given by path is
    read in place, also when results live in object storage (``local()``).
    """
    files = _model_files(model, parts)
    return files if "tiny" in MODELS[model] else [local(f) for f in files]


def _model_files(model, parts):
    path = Path(MODELS[model]["path"])
    if path.suffix == ".safetensors":
        # The weights, plus the config folder that describes them (its weights are not read).
        conf = Path(MODELS[model]["original_config"])
        return [str(path)] + sorted(
            str(p)
            for p in conf.rglob("*")
            if p.is_file() and p.suffix not in (".safetensors", ".bin", ".ckpt")
        )
    out = (
        ["model_index.json"]
        if "tiny" in MODELS[model] or (path / "model_index.json").exists()
        else []
    )
    for part in parts:
        if "tiny" in MODELS[model]:
            out += [f"{part}/{f}" for f in MODEL_FILES[part]]
        else:
            out += sorted(
                str(p.relative_to(path))
                for p in (path / part).rglob("*")
                if p.is_file()
            )
    return [str(path / f) for f in out]


def latent_dtype(run):
    """Stored dtype of a run's latent cache: bf16 when the run trains in bf16 (or when asked)."""
    r = RUNS[run]
    want = DATASETS[r.dataset]["latent_dtype"]
    if want != "auto":
        return want
    return "bfloat16" if r.mixed_precision == "bf16" else "float32"


def latent_dir(run):
    """The latent cache a run reads: shared by every run of one model, resolution and dtype."""
    r = RUNS[run]
    res = DATASETS[r.dataset]["resolution"]
    return f"results/{r.dataset}/latents/{r.base_model}-{res}-{latent_dtype(run)}"


def get_run_latents(wildcards):
    r = RUNS[wildcards.run]
    return [f"{latent_dir(wildcards.run)}/{s}.tar" for s in shard_ids(r.dataset)]


def get_run_captions(wildcards):
    r = RUNS[wildcards.run]
    return [f"results/{r.dataset}/captions/{s}.jsonl" for s in shard_ids(r.dataset)]


def get_run_model_files(wildcards):
    return model_files(RUNS[wildcards.run].base_model, list(MODEL_FILES))


def get_run_manifest(wildcards):
    return f"results/{RUNS[wildcards.run].dataset}/manifest.jsonl"


def get_run_settings(wildcards):
    return RUNS[wildcards.run].to_dict()


def get_run_context(wildcards):
    """What a run's config.yaml records besides its own settings."""
    r = RUNS[wildcards.run]
    return {
        "dataset": {"name": r.dataset, **DATASETS[r.dataset]},
        "base_model": {"name": r.base_model, **MODELS[r.base_model]},
        "libraries": {**LIBS_TORCH, "pil": LIBS_IMAGE},
    }


def get_final_outputs():
    out = []
    for run in RUNS:
        out += [
            f"results/runs/{run}/pytorch_lora_weights.safetensors",
            f"results/runs/{run}/{run}.safetensors",
            f"results/runs/{run}/samples.png",
            f"results/runs/{run}/mlflow.json",
        ]
    for ds in {r.dataset for r in RUNS.values()}:
        out += [f"results/{ds}/manifest.jsonl", f"results/{ds}/rejected.tsv"]
    return out


def first_output_dir(wildcards, output):
    """Folder of a rule's first output (a generated model or dataset folder)."""
    return str(Path(output[0]).parent)


def get_root(wildcards):
    return DATASETS[wildcards.dataset]["path"]


def get_shard_relpaths(wildcards):
    return shard_relpaths(wildcards.dataset, wildcards.shard)


def get_scan_settings(wildcards):
    ds = DATASETS[wildcards.dataset]
    return {k: ds[k] for k in ("resolution", "min_size", "max_pixels", "background")}


def get_caption_settings(wildcards):
    ds = DATASETS[wildcards.dataset]
    return {
        "captioner": ds["captioner"],
        "template": ds["caption_template"],
        "trigger": ds["trigger"],
        "prefix": ds["caption_prefix"],
        "blip_model": ds["blip_model"],
    }


def get_variant_settings(wildcards):
    ds = DATASETS[wildcards.dataset]
    return {
        k: ds[k]
        for k in ("caption_variants", "shuffle_captions", "keep_tokens", "tag_dropout")
    }


def get_shard_settings(wildcards):
    ds = DATASETS[wildcards.dataset]
    return {
        k: ds[k]
        for k in ("resolution", "bucket_step", "buckets", "max_pixels", "background")
    }


def get_dataset_manifests(wildcards):
    return expand(
        "results/{dataset}/manifest/{shard}.jsonl",
        dataset=wildcards.dataset,
        shard=shard_ids(wildcards.dataset),
    )


def get_encode_model_files(wildcards):
    return model_files(wildcards.model, ["vae", "text_encoder", "tokenizer"])


def get_model_path(wildcards):
    return MODELS[wildcards.model]["path"]


def get_original_config(wildcards):
    """For a single-file base model: the local diffusers folder that describes it."""
    return MODELS[wildcards.model].get("original_config")


def get_run_model_path(wildcards):
    return MODELS[RUNS[wildcards.run].base_model]["path"]


def get_run_dataset(wildcards):
    return RUNS[wildcards.run].dataset


def get_mlflow_uri(wildcards):
    return config["mlflow"]["tracking_uri"]


# Training (rules/train.smk): checksum sidecars of the latents, and what num_processes asks for.
def get_run_latent_sidecars(wildcards):
    """The latent shards' checksum sidecars: training verifies each shard against its own."""
    return [f"{tar}.sha256" for tar in get_run_latents(wildcards)]


def train_processes(wildcards):
    """num_processes as an int; `auto` (one per GPU the job gets) counts as 1 at parse time."""
    n = RUNS[wildcards.run].num_processes
    return n if isinstance(n, int) else 1


def get_train_threads(wildcards):
    return 2 * train_processes(wildcards)


def get_train_mem_mb(wildcards):
    return 8000 * train_processes(wildcards)


def get_train_gpus(wildcards):
    """GPUs to reserve: num_processes when > 1 (data-parallel on GPUs), else 0. The workflow
    profile's `set-resources: train: gpu` wins over this: set N there (and for `auto`).
    """
    n = train_processes(wildcards)
    return n if n > 1 else 0
