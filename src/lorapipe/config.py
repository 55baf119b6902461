"""The typed lorapipe configuration: schema validation, defaults, and per-run resolution.

The JSON schema (schemas/config.schema.yaml) is the single source of keys, types and defaults.
`load_config` validates a raw dict against it (filling defaults), then checks what a schema cannot
(a run naming a dataset that does not exist, a base model folder that is missing). Every error names
the offending key, e.g. ``runs.demo.lora_rank: 'eight' is not of type 'integer'``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted path of the key at fault."""


def _schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _validator_with_defaults(config: dict):
    """A Draft 2020-12 validator that also fills `default` values.

    Run settings get their defaults in the `defaults:` block only, never in a `runs.<name>` block:
    a filled-in run block would override what the user put in `defaults:`. (This is why we do not
    use snakemake.utils.validate(set_default=True), which fills every block it meets.)
    """
    from jsonschema import Draft202012Validator, validators

    base_props = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        is_run_block = "lora_rank" in properties and instance is not config.get("defaults")
        if isinstance(instance, dict) and not is_run_block:
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from base_props(validator, properties, instance, schema)

    return validators.extend(Draft202012Validator, {"properties": set_defaults})


def _key_path(error) -> str:
    parts = [str(p) for p in error.absolute_path]
    # "additionalProperties" errors point at the parent; name the unexpected key itself.
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        if extra:
            parts.append(extra[0])
            return ".".join(parts) + f": unknown key (allowed: {', '.join(sorted(allowed))})"
    return (".".join(parts) or "<top>") + f": {error.message}"


def validate(config: dict) -> dict:
    """Validate ``config`` in place against the schema, filling defaults.

    Raises:
        ConfigError: naming the first offending key (all problems are listed, one per line).
    """
    schema = _schema()
    cls = _validator_with_defaults(config)
    errors = sorted(cls(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_key_path(e) for e in errors))
    # Defaults inside `defaults:` apply to runs, which are resolved per run below.
    return config


@dataclass(frozen=True)
class RunConfig:
    """Settings of one training run: the `defaults` block overlaid with the run's own block.

    Field defaults live in the schema only; build one with `resolve_run`.
    """

    name: str
    dataset: str
    base_model: str
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    target_modules: tuple[str, ...]
    learning_rate: float
    train_text_encoder: bool
    text_encoder_lr: float | None
    lr_scheduler: str
    warmup_steps: int
    batch_size: int
    gradient_accumulation: int
    epochs: int
    max_steps: int | None
    save_steps: int | None
    mixed_precision: str
    compile: str | bool
    optimizer: str
    deterministic: bool
    num_processes: int | str
    gradient_checkpointing: bool
    max_grad_norm: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    min_snr_gamma: float | None
    noise_offset: float
    caption_dropout: float
    seed: int
    validation_prompts: tuple[str, ...]
    validation_steps: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Build from a plain dict (e.g. Snakemake params); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"runs.{d.get('name', '?')}.{unknown[0]}: unknown key")
        kw = dict(d)
        for k in ("target_modules", "validation_prompts"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def resolve_run(config: Mapping[str, Any], name: str) -> RunConfig:
    """The effective settings of run ``name``: schema defaults < `defaults:` < `runs.<name>`."""
    if name not in config["runs"]:
        raise ConfigError(f"runs.{name}: no such run (have: {', '.join(config['runs'])})")
    merged: dict[str, Any] = {}
    for block in (config.get("defaults") or {}, config["runs"][name] or {}):
        merged.update(block)
    for key in ("dataset", "base_model"):
        if key not in merged:
            raise ConfigError(f"runs.{name}.{key}: required (in the run or in defaults)")
    if merged["dataset"] not in config["datasets"]:
        raise ConfigError(
            f"runs.{name}.dataset: unknown dataset {merged['dataset']!r} "
            f"(have: {', '.join(config['datasets'])})"
        )
    if merged["base_model"] not in config["base_models"]:
        raise ConfigError(
            f"runs.{name}.base_model: unknown base model {merged['base_model']!r} "
            f"(have: {', '.join(config['base_models'])})"
        )
    return RunConfig.from_dict({"name": name, **merged})


def check_paths(config: Mapping[str, Any], workdir: str | os.PathLike = ".") -> None:
    """Fail early on inputs that must exist before any job runs.

    A dataset folder must exist unless the workflow generates it (`synthetic`); a base model path
    must exist unless the workflow builds it (`tiny`), and a diffusers folder must hold its parts.
    """
    root = Path(workdir)
    for name, ds in config["datasets"].items():
        p = root / ds["path"]
        if "synthetic" in ds:
            continue
        if not p.is_dir():
            raise ConfigError(f"datasets.{name}.path: folder not found: {p}")
        if not os.access(p, os.R_OK | os.X_OK):
            raise ConfigError(f"datasets.{name}.path: folder not readable: {p}")
    for name, bm in config["base_models"].items():
        if "tiny" in bm:
            continue
        p = root / bm["path"]
        if not p.exists():
            raise ConfigError(
                f"base_models.{name}.path: not found: {p} (lorapipe loads models from local "
                "paths only: download the model folder first)"
            )
        if p.is_dir():
            missing = [c for c in MODEL_PARTS if not (p / c).is_dir()]
            if missing:
                raise ConfigError(
                    f"base_models.{name}.path: {p} is not a complete diffusers folder "
                    f"(missing: {', '.join(missing)})"
                )
        elif p.suffix != ".safetensors":
            raise ConfigError(
                f"base_models.{name}.path: {p}: expected a diffusers folder or a .safetensors file"
            )
        else:
            from .models import check_config_folder  # stdlib-only at import time

            oc = bm.get("original_config")
            try:
                check_config_folder(p, root / oc if oc else None)
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"base_models.{name}.original_config: {e}") from None


MODEL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def expand_sweeps(config: dict, workdir: str | os.PathLike = ".") -> dict:
    """Add one run per row of each sweep table to ``config["runs"]`` (in place).

    Names come from snakemake.utils.Paramspace (``<sweep>_lora_rank~8_learning_rate~0.0001``), so a
    sweep's runs are ordinary runs: each is one target, all share the dataset and latent caches.
    """
    sweeps = config.get("sweeps") or {}
    if not sweeps:
        return config
    import pandas as pd
    from snakemake.utils import Paramspace

    for name, sw in sweeps.items():
        table = Path(workdir) / sw["table"]
        if not table.is_file():
            raise ConfigError(f"sweeps.{name}.table: file not found: {table}")
        df = pd.read_csv(table, sep="\t")
        if df.empty:
            raise ConfigError(f"sweeps.{name}.table: {table} has no rows")
        space = Paramspace(df, filename_params="*", param_sep="~", filename_sep="_")
        rows = space.dataframe.to_dict("records")
        for pattern, row in zip(space.instance_patterns, rows, strict=True):
            run = f"{name}_{pattern}"
            if run in config["runs"]:
                raise ConfigError(f"sweeps.{name}: generated run {run!r} already exists in runs")
            values = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}
            config["runs"][run] = {**copy.deepcopy(sw.get("base") or {}), **values}
    return config


def load_config(config: dict, workdir: str | os.PathLike = ".", check_files: bool = True) -> dict:
    """Validate, fill defaults, expand sweeps, resolve every run once, check paths."""
    validate(config)
    if config.get("sweeps"):
        expand_sweeps(config, workdir)
        validate(config)
    for name in config["runs"]:
        resolve_run(config, name)
    if check_files:
        check_paths(config, workdir)
    return config


def load_yaml(*paths: str | os.PathLike) -> dict:
    """Load and deep-merge YAML files in order (later wins), as Snakemake's --configfile does."""
    out: dict = {}
    for p in paths:
        with open(p, encoding="utf-8") as fh:
            _deep_update(out, yaml.safe_load(fh) or {})
    return out


def _deep_update(dst: dict, src: Mapping) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
