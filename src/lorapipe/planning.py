"""What the workflow plans before any job runs: image lists, shard assignment, param stamps,
caption edits per shard, base model file lists and the per-run paths the rules name.

``rules/common.smk`` builds one :class:`Planner` from the loaded config and its input functions
delegate to it. This runs at every Snakemake plan (and in every cluster job), so it imports only
the stdlib and cheap lorapipe modules: no torch, no diffusers.

Images of a folder dataset are not declared inputs: Snakemake 9 checks every declared input of
every ready job on each scheduling round (55 of 76 s at 10k images). A per-shard stamp param
(path, size, mtime_ns of its images) restales exactly the shard whose images were added, removed
or changed. A synthetic dataset's files are made by a rule, so they stay inputs. Which of the two
a dataset is gets decided once, in :func:`make_dataset`.

A file the plan cannot stat (a link that points nowhere or in a circle) or whose name is not valid
UTF-8 never stops the plan: it gets a stable marker in the stamp and a shard like any other file,
and the manifest stage names it in rejected.tsv.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from snakemake.exceptions import WorkflowError

from .captions import SIDECAR_EXTENSIONS, read_overrides
from .config import resolve_run
from .demo import demo_files
from .families import Family, family_named, family_of
from .holdout import Holdout, listing_problem
from .images import IMAGE_EXTENSIONS
from .manifest import list_images, shard_of
from .models import check_vae_folder

# Weights in the `original_config` folder of a single-file checkpoint are never read.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt")


def name_bytes(rel: str) -> bytes:
    """The bytes of a relative path as the file system holds them, also for a name that is not
    valid UTF-8 (``os.walk`` gives those as surrogate escapes); plain UTF-8 for every other."""
    return rel.encode("utf-8", "surrogateescape")


# `shards: auto`: one shard per this many images (rounded up), at most AUTO_SHARDS_MAX.
AUTO_IMAGES_PER_SHARD = 250
AUTO_SHARDS_MAX = 256


def auto_shard_count(images: int) -> int:
    """The shard count `shards: auto` chooses for a dataset of ``images`` images: one shard per
    `AUTO_IMAGES_PER_SHARD` images, rounded up (1 for up to 250 images, 4 for 1,000, 256 from
    64,000 on): few jobs for a small set, enough per-shard jobs to spread a large one."""
    return max(1, min(AUTO_SHARDS_MAX, -(-images // AUTO_IMAGES_PER_SHARD)))


def chosen_shard_count(record: Path, images) -> int:
    """The shard count of a `shards: auto` dataset: the one recorded in ``record`` (JSON,
    ``results/<dataset>/shards.json``) when there is one, else `auto_shard_count` of
    ``images()`` (called only then), recorded there. Kept once chosen, so adding images later
    restales one shard, not all of them; delete the file to choose again."""
    from .io import atomic_write_text

    try:
        n = json.loads(record.read_text(encoding="utf-8"))["shards"]
        if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
            return n
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        pass  # unreadable or damaged: chosen again (below) and rewritten
    count = len(images())
    n = auto_shard_count(count)
    record.parent.mkdir(parents=True, exist_ok=True)
    doc = {"shards": n, "images_when_chosen": count, "rule": f"ceil(images / "
           f"{AUTO_IMAGES_PER_SHARD}), at most {AUTO_SHARDS_MAX}"}  # fmt: skip
    atomic_write_text(record, json.dumps(doc, indent=1) + "\n")
    return n


def shard_index(rel: str, shards: int) -> int:
    """The shard of an image: :func:`lorapipe.manifest.shard_of`, also for a non-UTF-8 name.

    ``shard_of`` hashes ``relpath.encode("utf-8")``, which raises on such a name; it then gets the
    same hash of its raw bytes (what ``shard_of`` gives once it encodes with surrogateescape).
    """
    try:
        return shard_of(rel, shards)
    except UnicodeEncodeError:
        digest = hashlib.sha1(name_bytes(rel)).digest()
        return int.from_bytes(digest[:8], "big") % shards


def file_stamp(root: str | os.PathLike, rels: Sequence[str]) -> str:
    """Digest of (relative path, size, mtime_ns) of each file: changes when any of them does.

    A file that cannot be stat'ed (a dangling or circular link) adds a stable marker naming the
    error instead, so the plan goes on and the stamp changes once the file can be read.
    """
    h = hashlib.sha256()
    for rel in rels:
        try:
            st = os.stat(Path(root) / rel)
            tail = f"\0{st.st_size}\0{st.st_mtime_ns}\n"
        except OSError as e:
            tail = f"\0unreadable\0{errno.errorcode.get(e.errno, e.errno)}\n"
        h.update(name_bytes(rel) + tail.encode())
    return f"{len(rels)}:{h.hexdigest()[:32]}"


class Dataset:
    """A configured dataset: a folder of images (:class:`FolderDataset`) or one the workflow
    generates (:class:`GeneratedDataset`). The rest of the plan never asks which."""

    generated = False

    def __init__(self, key: str, settings: Mapping[str, Any]):
        self.key = key
        self.settings = settings
        self.root = Path(settings["path"])

    def list_images(self) -> list[str]:
        """Relative paths of the dataset's images, sorted."""
        raise NotImplementedError

    def has_file(self, rel: str) -> bool:
        """Whether the dataset has the file ``rel`` (relative to its folder)."""
        return (self.root / rel).is_file()

    def inputs(self, rels: Sequence[str]) -> list[str]:
        """The files of ``rels`` that a job declares as inputs (those a rule makes)."""
        return [str(self.root / rel) for rel in rels] if self.generated else []

    def stamp(self, rels: Sequence[str]) -> str:
        """The param that restales a job when files of ``rels`` change (see the module doc)."""
        return "generated" if self.generated else file_stamp(self.root, rels)


class FolderDataset(Dataset):
    """Images in a folder the user provides; they are read in place and stamped, not declared."""

    def list_images(self) -> list[str]:
        """Every image file under the folder (see :func:`lorapipe.manifest.list_images`)."""
        return list_images(self.root)


class GeneratedDataset(Dataset):
    """A synthetic dataset made by rule demo_data: its files are known without generating it."""

    generated = True

    def __init__(self, key: str, settings: Mapping[str, Any]):
        super().__init__(key, settings)
        self.files = demo_files(settings["synthetic"]["images"])
        self._file_set = set(self.files)

    def list_images(self) -> list[str]:
        """The images rule demo_data writes."""
        return sorted(f for f in self.files if Path(f).suffix.lower() in IMAGE_EXTENSIONS)

    def has_file(self, rel: str) -> bool:
        """A file the rule writes, or one a person added to the folder since."""
        return rel in self._file_set or super().has_file(rel)


def make_dataset(key: str, settings: Mapping[str, Any]) -> Dataset:
    """The one place that tells a generated dataset (``synthetic:``) from a folder."""
    cls = GeneratedDataset if "synthetic" in settings else FolderDataset
    return cls(key, settings)


def sidecar_of(rel: str, has_file) -> str | None:
    """The sidecar caption of image ``rel`` that ``has_file`` finds (``.txt`` before
    ``.caption``), as a relative path, or None."""
    stem = rel.rsplit(".", 1)[0]
    for ext in SIDECAR_EXTENSIONS:
        if has_file(stem + ext):
            return stem + ext
    return None


class Planner:
    """The plan of one loaded config. Listings, shard assignment and caption edits are read once
    per dataset and kept, so every job of a plan sees the same files (and pays for them once).

    Args:
        config: the config as :func:`lorapipe.config.load_config` left it (defaults filled).
    """

    def __init__(self, config: Mapping[str, Any]):
        self.config = config
        self.datasets = {k: make_dataset(k, ds) for k, ds in config["datasets"].items()}
        self.models = config["base_models"]
        self.runs = {name: resolve_run(config, name) for name in config["runs"]}
        self._images: dict[str, list[str]] = {}
        self._by_shard: dict[str, dict[int, list[str]]] = {}
        self._overrides: dict[str, dict[str, str]] = {}
        self._model_files: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        self._sweeps: dict[str, list[tuple[str, dict]]] | None = None
        self._shard_counts: dict[str, int] = {}

    # Datasets and shards

    def dataset_settings(self, dataset: str) -> Mapping[str, Any]:
        """The dataset's block of the config (defaults filled)."""
        return self.datasets[dataset].settings

    def root(self, dataset: str) -> str:
        """The dataset's folder, as configured."""
        return self.dataset_settings(dataset)["path"]

    def shard_count(self, dataset: str) -> int:
        """The dataset's shard count: its ``shards``, or for ``auto`` the count chosen once and
        kept in ``results/<dataset>/shards.json`` (`chosen_shard_count`)."""
        n = self.dataset_settings(dataset)["shards"]
        if n != "auto":
            return n
        if dataset not in self._shard_counts:
            record = Path("results") / dataset / "shards.json"
            self._shard_counts[dataset] = chosen_shard_count(record, lambda: self.images(dataset))
        return self._shard_counts[dataset]

    def shard_ids(self, dataset: str) -> list[str]:
        """The shard wildcards of a dataset: ``00000`` … (known without listing its images,
        unless ``shards: auto`` has not chosen its count yet)."""
        return [f"{i:05d}" for i in range(self.shard_count(dataset))]

    def images(self, dataset: str) -> list[str]:
        """Relative paths of the dataset's images (known without generating synthetic data).

        Raises:
            WorkflowError: the dataset has no images, naming the dataset and its folder.
        """
        if dataset not in self._images:
            ds = self.datasets[dataset]
            files = ds.list_images()
            if not files:
                root = ds.root if ds.root.is_absolute() else f"{ds.root} ({ds.root.resolve()})"
                raise WorkflowError(
                    f"datasets.{dataset}.path: no images in {root} (hidden files and folders "
                    f"are skipped): add image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) or "
                    "fix the path"
                )
            self._images[dataset] = files
        return self._images[dataset]

    def shard_relpaths(self, dataset: str, shard: str | int) -> list[str]:
        """Images of one shard; all shards are assigned in one pass (not one pass per shard)."""
        if dataset not in self._by_shard:
            n = self.shard_count(dataset)
            groups: dict[int, list[str]] = {i: [] for i in range(n)}
            for rel in self.images(dataset):
                groups[shard_index(rel, n)].append(rel)
            self._by_shard[dataset] = groups
        return self._by_shard[dataset][int(shard)]

    def shard_inputs(self, dataset: str, shard: str) -> list[str]:
        """Images of a shard as declared inputs: those a rule generates; none of a folder's.

        The shard is assigned either way, so an empty folder fails the plan here.
        """
        return self.datasets[dataset].inputs(self.shard_relpaths(dataset, shard))

    def shard_stamp(self, dataset: str, shard: str) -> str:
        """Stamp of a folder dataset shard's images; "generated" for synthetic data."""
        return self.datasets[dataset].stamp(self.shard_relpaths(dataset, shard))

    def shard_sidecars(self, dataset: str, shard: str) -> list[str]:
        """Relative paths of the sidecar captions of a shard's images that exist."""
        ds = self.datasets[dataset]
        found = (sidecar_of(rel, ds.has_file) for rel in self.shard_relpaths(dataset, shard))
        return [s for s in found if s is not None]

    def sidecar_inputs(self, dataset: str, shard: str) -> list[str]:
        """Sidecars made by a rule (synthetic datasets) as inputs; a folder's are in the stamp."""
        return self.datasets[dataset].inputs(self.shard_sidecars(dataset, shard))

    def sidecar_stamp(self, dataset: str, shard: str) -> str:
        """A new, edited or removed sidecar restales only its shard's captions."""
        return self.datasets[dataset].stamp(self.shard_sidecars(dataset, shard))

    def shard_overrides(self, dataset: str, shard: str) -> dict[str, str]:
        """A person's caption edits (captions.csv) for this shard only: a param, so editing one
        row restales only the shard holding that image."""
        if dataset not in self._overrides:
            path = self.datasets[dataset].root / "captions.csv"
            self._overrides[dataset] = read_overrides(path) if path.is_file() else {}
        mine = set(self.shard_relpaths(dataset, shard))
        return {k: v for k, v in sorted(self._overrides[dataset].items()) if k in mine}

    def dataset_manifests(self, dataset: str) -> list[str]:
        """The per-shard manifests merge_manifest reads."""
        return [f"results/{dataset}/manifest/{s}.jsonl" for s in self.shard_ids(dataset)]

    def shard_tars(self, dataset: str, suffix: str = "") -> list[str]:
        """The dataset's image shards (``suffix=".sha256"``: their checksum sidecars)."""
        return [f"results/{dataset}/shards/{s}.tar{suffix}" for s in self.shard_ids(dataset)]

    def latent_tars(self, dataset: str, suffix: str = "") -> list[str]:
        """The latent shards of one of the dataset's latent folders, the folder left as the
        wildcards ``{model}-{res}-{dtype}``: what one encode job (`rules/encode.smk`) writes."""
        folder = f"results/{dataset}/latents/{{model}}-{{res}}-{{dtype}}"
        return [f"{folder}/{s}.tar{suffix}" for s in self.shard_ids(dataset)]

    def encode_runtime(self, dataset: str) -> int:
        """Minutes to ask for one job encoding all of a dataset's shards (SLURM's --time): an
        hour, and 10 minutes a shard beyond six."""
        return max(60, 10 * len(self.shard_ids(dataset)))

    def _pick(self, dataset: str, keys: Sequence[str]) -> dict[str, Any]:
        ds = self.dataset_settings(dataset)
        return {k: ds[k] for k in keys}

    def scan_settings(self, dataset: str) -> dict[str, Any]:
        """What decides whether an image is accepted (rule manifest)."""
        return self._pick(dataset, ("resolution", "min_size", "max_pixels", "background"))

    def caption_settings(self, dataset: str) -> dict[str, Any]:
        """The captioner and its settings (rule caption)."""
        ds = self.dataset_settings(dataset)
        return {
            "captioner": ds["captioner"],
            "template": ds["caption_template"],
            "trigger": ds["trigger"],
            "prefix": ds["caption_prefix"],
            "blip_model": ds["blip_model"],
        }

    def variant_settings(self, dataset: str) -> dict[str, Any]:
        """How caption variants are made for the text-encoder cache (rule encode)."""
        keys = ("caption_variants", "shuffle_captions", "keep_tokens", "tag_dropout")
        return self._pick(dataset, keys)

    def shard_settings(self, dataset: str) -> dict[str, Any]:
        """Bucketing, resizing and padding of a WebDataset shard (rule shard)."""
        keys = ("resolution", "bucket_step", "buckets", "max_pixels", "background")
        return self._pick(dataset, keys)

    # Base models

    def model_built(self, model: str) -> bool:
        """Whether the workflow builds the model (``tiny``) rather than reading it in place."""
        return "tiny" in self.models[model]

    def model_path(self, model: str) -> str:
        """The model's configured path (a diffusers folder or a single .safetensors file)."""
        return self.models[model]["path"]

    def original_config(self, model: str) -> str | None:
        """For a single-file base model: the local diffusers folder that describes it."""
        return self.models[model].get("original_config")

    def family(self, model: str) -> Family:
        """The model family of a base model: recognised from the model itself; a built (tiny)
        model's from its ``tiny.family`` (default ``sd``), as it does not exist yet."""
        if self.model_built(model):
            return family_named(self.models[model]["tiny"].get("family", "sd"))
        return family_of(self.model_path(model), self.original_config(model))

    def vae(self, model: str) -> str | None:
        """The model's ``vae:`` override folder, as configured; None: the model's own VAE."""
        return self.models[model].get("vae")

    def read_parts(self, model: str, parts: Sequence[str] | None = None) -> tuple[str, ...]:
        """The parts of ``parts`` (default: all of the model's) a job reads from the model
        itself: without ``vae`` when the model has a ``vae:`` override (read from there)."""
        parts = tuple(parts if parts is not None else self.model_parts(model))
        return tuple(p for p in parts if p != "vae") if self.vae(model) else parts

    def vae_files(self, model: str) -> list[str]:
        """Every file of the model's ``vae:`` override folder (its ``vae/`` when it is a model
        folder): inputs of the jobs that read it, so new weights restale exactly those. None
        without an override, or when the folder is missing (the config check names it)."""
        vae = self.vae(model)
        if not vae:
            return []
        try:
            folder = check_vae_folder(vae)
        except FileNotFoundError:
            return []
        return sorted(str(p) for p in folder.rglob("*") if p.is_file())

    def model_parts(self, model: str) -> tuple[str, ...]:
        """Every part of a base model (what training, sampling and the run config read)."""
        return self.family(model).parts

    def latent_parts(self, model: str) -> tuple[str, ...]:
        """The parts the latent stage reads (VAE and text parts)."""
        return self.family(model).latent_parts

    def model_files(self, model: str, parts: Sequence[str] | None = None) -> list[str]:
        """Files of a base model a rule reads (so a changed model restales exactly its users).

        ``parts`` default: all of the model's. A built model's files are known from its family's
        ``tiny_files``; a diffusers folder's are every
        file of the asked parts (plus model_index.json); a single file's are the file plus its
        `original_config` folder without weights.
        """
        key = (model, tuple(parts if parts is not None else self.model_parts(model)))
        parts = key[1]
        if key not in self._model_files:
            self._model_files[key] = self._list_model_files(model, parts)
        return list(self._model_files[key])

    def _list_model_files(self, model: str, parts: Sequence[str]) -> list[str]:
        path = Path(self.model_path(model))
        if path.suffix == ".safetensors":
            conf = Path(self.models[model]["original_config"])
            return [str(path)] + sorted(
                str(p) for p in conf.rglob("*") if p.is_file() and p.suffix not in WEIGHT_SUFFIXES
            )
        built = self.model_built(model)
        out = ["model_index.json"] if built or (path / "model_index.json").exists() else []
        for part in parts:
            if built:
                out += [f"{part}/{f}" for f in self.family(model).tiny_files[part]]
            else:
                out += sorted(
                    str(p.relative_to(path)) for p in (path / part).rglob("*") if p.is_file()
                )
        return [str(path / f) for f in out]

    # Runs

    def latent_dtype(self, run: str, dataset: str | None = None) -> str:
        """Stored dtype of a run's latent cache (of ``dataset``, default the run's): bf16 when
        the run trains in bf16 (or the dataset asks for a dtype)."""
        r = self.runs[run]
        want = self.dataset_settings(dataset or r.dataset)["latent_dtype"]
        if want != "auto":
            return want
        return "bfloat16" if r.mixed_precision == "bf16" else "float32"

    def latent_dir(self, run: str, dataset: str | None = None) -> str:
        """The latent cache a run reads (of ``dataset``, default the run's): shared by every
        run of one model, resolution, dtype."""
        r = self.runs[run]
        ds = dataset or r.dataset
        res = self.dataset_settings(ds)["resolution"]
        return f"results/{ds}/latents/{r.base_model}-{res}-{self.latent_dtype(run, ds)}"

    def run_dataset(self, run: str) -> str:
        """The dataset a run trains on."""
        return self.runs[run].dataset

    def run_model_path(self, run: str) -> str:
        """The path of a run's base model."""
        return self.model_path(self.runs[run].base_model)

    def run_latents(self, run: str) -> list[str]:
        """The latent shards a run trains on."""
        ds = self.runs[run].dataset
        return [f"{self.latent_dir(run)}/{s}.tar" for s in self.shard_ids(ds)]

    def run_latent_sidecars(self, run: str) -> list[str]:
        """The latent shards' checksum sidecars: training verifies each shard against its own."""
        return [f"{tar}.sha256" for tar in self.run_latents(run)]

    def run_captions(self, run: str) -> list[str]:
        """The caption files of a run's dataset (rule train's kohya file counts their tags)."""
        ds = self.runs[run].dataset
        return [f"results/{ds}/captions/{s}.jsonl" for s in self.shard_ids(ds)]

    def run_manifest(self, run: str) -> str:
        """The merged manifest of a run's dataset."""
        return f"results/{self.runs[run].dataset}/manifest.jsonl"

    def run_settings(self, run: str) -> dict[str, Any]:
        """A run's resolved settings."""
        return self.runs[run].to_dict()

    def run_context(self, run: str, libraries: Mapping[str, Any]) -> dict[str, Any]:
        """What a run's config.yaml records besides its own settings."""
        r = self.runs[run]
        out = {
            "dataset": {
                "name": r.dataset,
                **self.dataset_settings(r.dataset),
                "shards": self.shard_count(r.dataset),
            },  # auto: the count chosen
            "base_model": {"name": r.base_model, **self.models[r.base_model]},
            "libraries": dict(libraries),
        }
        sweep = self.run_sweep(run)
        if sweep is not None:  # MLflow tag lorapipe.sweep (live and tracked)
            out["sweep"] = sweep
        return out

    # Validation (lorapipe.holdout) and sweeps (lorapipe.sweeps)

    def holdout(self, run: str) -> Holdout:
        """A run's validation images: its dataset's validation_split or validation_dataset."""
        ds = self.runs[run].dataset
        return Holdout.of(ds, self.dataset_settings(ds))

    def run_val_latents(self, run: str) -> list[str]:
        """The validation dataset's latent shards (the run's model and dtype); none for a split
        (its images are in the run's own latent shards)."""
        val = self.holdout(run).dataset
        if val is None:
            return []
        return [f"{self.latent_dir(run, val)}/{s}.tar" for s in self.shard_ids(val)]

    def run_val_latent_sidecars(self, run: str) -> list[str]:
        return [f"{tar}.sha256" for tar in self.run_val_latents(run)]

    def run_val_manifest(self, run: str) -> list[str]:
        """The validation dataset's merged manifest (in the run's fingerprint), or none."""
        val = self.holdout(run).dataset
        return [f"results/{val}/manifest.jsonl"] if val is not None else []

    def holdout_problems(self) -> list[str]:
        """Splits that hold out every listed image of a dataset some run trains on."""
        out = []
        for ds in dict.fromkeys(r.dataset for r in self.runs.values()):
            h = Holdout.of(ds, self.dataset_settings(ds))
            problem = listing_problem(h, self.images(ds)) if h.split is not None else None
            if problem:
                out.append(problem)
        return out

    def sweeps(self) -> dict[str, list[tuple[str, dict]]]:
        """``{sweep: [(run, swept values)]}``, in table order."""
        if self._sweeps is None:
            from .sweeps import sweep_runs

            self._sweeps = sweep_runs(self.config)
        return self._sweeps

    def run_sweep(self, run: str) -> str | None:
        """The sweep a run was made by, or None."""
        return next((s for s, rows in self.sweeps().items() if run in dict(rows)), None)

    def train_processes(self, run: str) -> int:
        """num_processes as an int; `auto` (one per GPU the job gets) counts as 1 at plan time."""
        n = self.runs[run].num_processes
        return n if isinstance(n, int) else 1

    def train_gpus(self, run: str) -> int:
        """GPUs to reserve: num_processes when > 1 (data-parallel on GPUs), else 0."""
        n = self.train_processes(run)
        return n if n > 1 else 0

    # Samples

    def sample_grids(self, run: str) -> bool:
        """Whether a run gets sample grids: `sample_grids` is on and it has validation prompts.
        Neither is in the run's fingerprint: switching them never restales training."""
        on = self.config.get("sample_grids", True)
        return bool(on and self.runs[run].validation_prompts)

    def sample_outputs(self, run: str) -> list[str]:
        """The final sample grid of a run, when it has one (rule sample)."""
        return [f"results/runs/{run}/samples.png"] if self.sample_grids(run) else []

    def sample_base_settings(self, run: str) -> dict[str, Any]:
        """What a run's base row of sample images depends on besides its base model: prompts,
        sampling steps, image size (the dataset's resolution) and seed."""
        r = self.runs[run]
        return {
            "prompts": list(r.validation_prompts),
            "steps": r.validation_steps,
            "size": self.dataset_settings(r.dataset)["resolution"],
            "seed": r.seed,
        }

    def sample_base(self, run: str) -> str:
        """The base model's row of a run's sample grids (rule sample_base), named by its base
        model and a digest of `sample_base_settings`: every run that draws the same row (a
        changed learning rate, the runs of a sweep) shares one file."""
        settings = json.dumps(self.sample_base_settings(run), sort_keys=True)
        key = hashlib.sha256(settings.encode()).hexdigest()[:16]
        return f"results/samples/{self.runs[run].base_model}/base-{key}.png"

    def sample_base_of(self, model: str, key: str) -> dict[str, Any]:
        """The settings of base row ``key`` of ``model`` (a run of this config that draws it)."""
        want = f"results/samples/{model}/base-{key}.png"
        for run in self.runs:
            if self.sample_grids(run) and self.sample_base(run) == want:
                return self.sample_base_settings(run)
        raise WorkflowError(f"{want}: no run of this config draws that base row")

    def track_inputs(self, run: str) -> dict[str, str]:
        """What rule track logs to MLflow: the run's files, and its sample grids when it has
        them (a run without them is tracked without waiting for a sample job)."""
        d = f"results/runs/{run}"
        out = {
            "config": f"{d}/config.yaml",
            "metrics": f"{d}/metrics.jsonl",
            "lora": f"{d}/pytorch_lora_weights.safetensors",
            "kohya": f"{d}/{run}.safetensors",
            "loss": f"{d}/loss.png",
            "summary": f"{d}/train_summary.json",
        }
        if self.sample_grids(run):
            out.update(samples=f"{d}/samples.png", step_samples=f"{d}/samples")
        return out

    def final_outputs(self) -> list[str]:
        """What `snakemake` with no target builds: every run's files and its dataset's views."""
        out = []
        for run in self.runs:
            out += [
                f"results/runs/{run}/pytorch_lora_weights.safetensors",
                f"results/runs/{run}/{run}.safetensors",
                *self.sample_outputs(run),
                f"results/runs/{run}/mlflow.json",
            ]
            if self.holdout(run).active:
                out.append(f"results/runs/{run}/best")
        out += [f"results/sweeps/{s}/runs.csv" for s in self.sweeps()]
        for ds in dict.fromkeys(r.dataset for r in self.runs.values()):
            out += [f"results/{ds}/manifest.jsonl", f"results/{ds}/rejected.tsv"]
        return out
