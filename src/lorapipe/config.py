"""The typed lorapipe configuration: schema validation, defaults, and per-run resolution.

The JSON schema (schemas/config.schema.yaml) is the single source of keys, types and defaults.
`load_config` validates a raw dict against it (filling defaults), then checks what a schema cannot:
names that would break the file system, numbers that are not finite, constraints between keys (a
`resolution` below `bucket_step`, a warmup longer than the run), caption templates, a run naming a
dataset that does not exist, a base model or BLIP folder that is missing, `target_modules` the
UNet does not have, and sweep tables cell by cell. Every error is one line that names the offending
key, e.g. ``runs.demo.lora_rank: 'eight' is not of type 'integer'``, or the file, line and column.

YAML files read here (`load_yaml`, `check_yaml_files`) are read strictly: a duplicate key or a
syntax error names the file and the line.
"""

from __future__ import annotations

import copy
import csv
import difflib
import functools
import hashlib
import io
import json
import math
import os
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .fingerprint import read_cached_json, write_cached_json
from .holdout import settings_problems as holdout_problems

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "schemas" / "config.schema.yaml"

# Longest names: a run's files are named after it (`<run>.safetensors`, written through a
# hidden temporary `.<run>.safetensors.XXXXXXXX.tmp`), and a file name has at most 255 bytes.
NAME_MAX = {"datasets": 128, "base_models": 128, "runs": 200, "sweeps": 64}
NAME_PATTERN = {
    "datasets": r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    "base_models": r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    "runs": r"[A-Za-z0-9][A-Za-z0-9_.~-]*",
    "sweeps": r"[A-Za-z0-9][A-Za-z0-9.-]*",
}
NAME_CHARS = {
    "datasets": "letters, digits, _ . -",
    "base_models": "letters, digits, _ . -",
    "runs": "letters, digits, _ . - ~",
    "sweeps": "letters, digits, . -",
}
# results/<dataset>/ sits beside these folders of the workflow's own.
RESULTS_FOLDERS = frozenset({"runs", "cache", "models", "checkpoints"})
# Names Windows (and SMB shares) cannot hold as files or folders, with any extension.
DEVICE_NAMES = frozenset(
    {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}
)
# Run settings a sweep table cannot hold (a cell is one value, not a list).
LIST_SETTINGS = ("target_modules", "validation_prompts")
# Cells pandas reads as missing (NaN): never a value, always an error naming the cell.
NA_CELLS = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
)  # fmt: skip
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted path of the key at fault."""


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    """The parsed schema (read once per process; never modified)."""
    with open(SCHEMA_PATH, encoding="utf-8") as fh:  # libyaml's parser when there: 0.05 s a plan
        return yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _is_integer(_checker, instance) -> bool:
    """JSON schema's integer, without floats that happen to be whole (8.0 is not a rank)."""
    return isinstance(instance, int) and not isinstance(instance, bool)


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

    checker = Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer)
    return validators.extend(
        Draft202012Validator, {"properties": set_defaults}, type_checker=checker
    )


def _plain_validator(schema: dict):
    """A validator for one setting's schema (sweep cells), with the same integer rule."""
    from jsonschema import Draft202012Validator, validators

    checker = Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer)
    return validators.extend(Draft202012Validator, type_checker=checker)(schema)


# --- messages ----------------------------------------------------------------------------------


def _suggest(word: Any, choices: Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` for a close choice (case-insensitive first), else ""."""
    if not isinstance(word, str):
        return ""
    options = [c for c in choices if isinstance(c, str)]
    for c in options:
        if c.lower() == word.lower():
            return f" (did you mean {c!r}?)"
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _hint(error) -> str:
    """What YAML made of a value, when that explains a type error."""
    if error.validator != "type":
        return ""
    want = error.validator_value if isinstance(error.validator_value, list) else [
        error.validator_value
    ]
    inst = error.instance
    if isinstance(inst, str) and _FLOAT_TEXT.match(inst.strip()) and (
        "number" in want or "integer" in want
    ):
        return f" (YAML reads {inst} as text: write a number such as 1.0e-4, with a dot)"
    if isinstance(inst, float) and inst.is_integer() and "integer" in want:
        return f" (write {int(inst)}, not {inst})"
    if inst is None and "object" in want:
        return " (an empty block: give it keys or remove it; an empty block in a later "\
            "--configfile replaces the earlier one)"
    if "string" in want and not isinstance(inst, str | dict | list) and inst is not None:
        return " (YAML reads an unquoted yes/no/on/off/true/false, a number or a date as such: " \
            "put the value in quotes)"
    return ""


def _key_path(error) -> str:
    """One line naming the key of a schema error and what is wrong with it."""
    parts = [str(p) for p in error.absolute_path]
    inst = error.instance
    # "additionalProperties" errors point at the parent; name the unexpected key itself.
    if error.validator == "additionalProperties" and isinstance(inst, dict):
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted((k for k in inst if k not in allowed), key=str)
        if extra:
            parts.append(str(extra[0]))
            return (
                ".".join(parts)
                + f": unknown key{_suggest(extra[0], allowed)} (allowed: {', '.join(allowed)})"
            )
    if error.validator == "required" and isinstance(inst, dict):
        missing = [k for k in error.validator_value if k not in inst]
        if missing:
            return ".".join(parts + [missing[0]]) + ": required"
    msg = error.message
    if error.validator == "enum":
        msg += _suggest(inst, error.validator_value)
    return (".".join(parts) or "<top>") + f": {msg}{_hint(error)}"


def _raise(problems: list[str]) -> None:
    """Raise one ConfigError holding every problem: one line for one, one line each for more."""
    if not problems:
        return
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    raise ConfigError(
        f"invalid config ({len(problems)} problems):\n  " + "\n  ".join(problems)
    )


# --- names, keys and values the schema cannot judge --------------------------------------------


def name_problem(kind: str, name: Any) -> str | None:
    """Why ``name`` cannot name an entry of ``kind`` (datasets, base_models, runs, sweeps).

    Names become folder and file names (``results/<dataset>/``, ``results/runs/<run>/<run>…``),
    rule names and MLflow run names, so they are kept to what every file system holds.
    """
    if not isinstance(name, str):
        return (
            f"a name must be text, not {type(name).__name__} {name!r} (YAML reads an unquoted "
            "yes/no/true/false as a boolean and 2024 as a number: put it in quotes)"
        )
    if not re.fullmatch(NAME_PATTERN[kind], name):
        return (
            f"not a usable name: use only {NAME_CHARS[kind]}, starting with a letter or digit "
            "(no path separators, spaces or '..')"
        )
    if len(name) > NAME_MAX[kind]:
        return f"name too long ({len(name)} characters, at most {NAME_MAX[kind]})"
    if name.endswith("."):
        return "a name cannot end with '.' (Windows and SMB shares drop it)"
    stem = name.split(".", 1)[0].lower()
    if stem in DEVICE_NAMES:
        return f"{name!r} is a reserved device name on Windows and SMB shares"
    if kind == "datasets" and name in RESULTS_FOLDERS:
        return f"reserved: results/{name}/ holds the workflow's own {name}"
    return None


def _name_problems(config: Mapping) -> list[str]:
    """Names of datasets, base models, runs and sweeps: usable, and distinct ignoring case."""
    out = []
    for kind in NAME_MAX:
        block = config.get(kind)
        if not isinstance(block, Mapping):
            continue
        seen: dict[str, str] = {}
        for name in block:
            problem = name_problem(kind, name)
            if problem:
                out.append(f"{kind}.{name}: {problem}")
                continue
            other = seen.setdefault(name.lower(), name)
            if other != name:
                out.append(
                    f"{kind}.{name}: differs from {kind}.{other} only in case (one folder on "
                    "macOS and Windows file systems)"
                )
    return out


def _key_problems(node: Any, path: str) -> list[str]:
    """Mapping keys anywhere in the config must be text (YAML makes `1:` or `yes:` other types)."""
    out = []
    if isinstance(node, Mapping):
        for k, v in node.items():
            if not isinstance(k, str):
                if path in NAME_MAX:
                    continue  # a name: reported by _name_problems
                out.append(
                    f"{path + '.' if path else ''}{k}: a key must be text, not "
                    f"{type(k).__name__} (put it in quotes)"
                )
                continue
            out += _key_problems(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _key_problems(v, f"{path}[{i}]")
    return out


def _non_finite(node: Any, path: str) -> list[str]:
    """Every float of the config must be finite (YAML's .nan and .inf pass a number schema)."""
    if isinstance(node, float) and not math.isfinite(node):
        return [f"{path}: must be a finite number (got {node})"]
    out = []
    if isinstance(node, Mapping):
        for k, v in node.items():
            out += _non_finite(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _non_finite(v, f"{path}.{i}")
    return out


_PATH_KEYS = {
    "datasets": ("path", "blip_model"),
    "base_models": ("path", "original_config", "vae"),
    "sweeps": ("table",),
}


def _run_blocks(config: Mapping) -> Iterable[dict]:
    """Every block of run settings: defaults, each run, each sweep's base."""
    if isinstance(config.get("defaults"), dict):
        yield config["defaults"]
    runs = config.get("runs")
    for block in runs.values() if isinstance(runs, dict) else ():
        if isinstance(block, dict):
            yield block
    sweeps = config.get("sweeps")
    for sw in sweeps.values() if isinstance(sweeps, dict) else ():
        if isinstance(sw, dict) and isinstance(sw.get("base"), dict):
            yield sw["base"]


def _normalise(config: dict) -> None:
    """Read what a person meant where YAML read something else (in place).

    ``mixed_precision: no`` unquoted is YAML's false: it means "no". A path starting with ``~``
    is the home folder, as in a shell.
    """
    for block in _run_blocks(config):
        if block.get("mixed_precision") is False:
            block["mixed_precision"] = "no"
    for kind, keys in _PATH_KEYS.items():
        entries = config.get(kind)
        for entry in entries.values() if isinstance(entries, dict) else ():
            if not isinstance(entry, dict):
                continue
            for k in keys:
                if isinstance(entry.get(k), str) and entry[k].startswith("~"):
                    entry[k] = os.path.expanduser(entry[k])


# SDXL's bucket area (about 1024² pixels, as SDXL was trained and kohya's SDXL recipes bucket;
# kohya's 64-pixel steps are bucket_step's default already)
SDXL_RESOLUTION = 1024


def _family_of_block(bm: Any) -> str | None:
    """The family name of a base_models block (a tiny model's ``tiny.family``, else what the
    model on disk is); None when it cannot be told here."""
    if not isinstance(bm, dict):
        return None
    if isinstance(bm.get("tiny"), dict):
        return str(bm["tiny"].get("family", "sd"))
    if not isinstance(bm.get("path"), str):
        return None
    from .families import family_of  # stdlib-only

    try:
        return family_of(bm["path"], bm.get("original_config")).name
    except (ValueError, TypeError, OSError):
        return None


def _family_defaults(config: dict) -> None:
    """Defaults that depend on the model family (in place, before the schema's): a dataset that
    does not set ``resolution`` and whose every run trains an SDXL model gets SDXL's 1024."""
    datasets, models, runs = (config.get(k) for k in ("datasets", "base_models", "runs"))
    if not all(isinstance(x, dict) for x in (datasets, models, runs)):
        return
    defaults = config.get("defaults") if isinstance(config.get("defaults"), dict) else {}
    families: dict[Any, set] = {}
    for run in runs.values():
        if isinstance(run, dict):
            ds, bm = (run.get(k, defaults.get(k)) for k in ("dataset", "base_model"))
            if isinstance(ds, str) and isinstance(bm, str):
                families.setdefault(ds, set()).add(_family_of_block(models.get(bm)))
    for name, ds in datasets.items():
        if isinstance(ds, dict) and "resolution" not in ds and families.get(name) == {"sdxl"}:
            ds["resolution"] = SDXL_RESOLUTION


def validate(config: dict) -> dict:
    """Validate ``config`` in place against the schema, filling defaults.

    Raises:
        ConfigError: naming every offending key, one line each (one line in all for one).
    """
    if not isinstance(config, dict):
        raise ConfigError(
            f"invalid config: the top level must be a mapping (datasets:, runs:, …), "
            f"not {type(config).__name__}"
        )
    problems = _name_problems(config) + _key_problems(config, "")
    if problems:
        _raise(problems)
    _normalise(config)
    _family_defaults(config)  # reads model files: before the stored result's key is taken
    ident = _checked_ident(config)
    stored = read_cached_json(_CHECKED, ident) if ident else None
    if isinstance(stored, dict):
        config.clear()
        config.update(stored)
        return config
    cls = _validator_with_defaults(config)
    errors = sorted(
        cls(_schema()).iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]
    )
    non_finite = _non_finite(config, "")
    flagged = {p.split(": ", 1)[0] for p in non_finite}
    first: dict[str, Any] = {}  # one problem per key: its type first, then the first listed
    for e in errors:
        # names are judged by _name_problems, with a better message than the schema's pattern;
        # a non-finite number by _non_finite, not also by a minimum it cannot be compared with
        where = ".".join(str(p) for p in e.absolute_path)
        if "propertyNames" in e.absolute_schema_path or where in flagged:
            continue
        if e.validator in ("additionalProperties", "required"):
            where += f"\0{e.validator}\0{e.message}"  # each unknown or missing key of a block
        if where not in first or (e.validator == "type" and first[where].validator != "type"):
            first[where] = e
    _raise([_key_path(e) for e in first.values()] + non_finite)
    if ident:
        write_cached_json(_CHECKED, ident, config)
    # Defaults inside `defaults:` apply to runs, which are resolved per run below.
    return config


# -- the schema check, remembered by content ------------------------------------------------------
#
# Importing jsonschema, parsing the schema and checking a config cost every Snakemake plan
# ~0.17 s of a ~2 s rerun that has nothing to do (#17). A config that passed is stored with the
# defaults the schema filled in, keyed by the sha256 of everything the outcome depends on: the
# config as it stands before the check (after the model-dependent defaults, which read files),
# this module's source, the schema's bytes and jsonschema's version. So an entry cannot be
# stale; only passes are stored (a failing config is checked, and explained, every time); a
# config that JSON cannot hold exactly (a date, a non-string key, NaN, one mapping reached by two
# YAML aliases) is checked every time too. One small file each under
# ``$LORAPIPE_CACHE/config-checked/``, written atomically; a missing, unreadable or unwritable
# cache only costs the check.
_CHECKED_VERSION = 1
_CHECKED = "config-checked"


def _plain_json(obj, seen: set[int]) -> bool:
    """Whether JSON holds ``obj`` exactly: str keys, JSON scalars, finite floats, no container
    reached twice (a YAML alias: filling one would fill the other)."""
    if isinstance(obj, dict | list):
        if id(obj) in seen:
            return False
        seen.add(id(obj))
        if isinstance(obj, dict):
            return all(isinstance(k, str) and _plain_json(v, seen) for k, v in obj.items())
        return all(_plain_json(v, seen) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return obj is None or isinstance(obj, str | int | bool)


def _checked_ident(config: dict) -> str | None:
    """The name of a pass of ``config`` in the cache; None when it cannot be keyed exactly."""
    if not _plain_json(config, set()):
        return None
    from importlib import metadata

    try:
        h = hashlib.sha256(f"{_CHECKED_VERSION}\0{metadata.version('jsonschema')}\0".encode())
        for part in (Path(__file__), SCHEMA_PATH):
            data = part.read_bytes()
            h.update(f"{len(data)}\0".encode() + data)
    except (OSError, metadata.PackageNotFoundError):
        return None
    h.update(json.dumps(config, allow_nan=False).encode())
    return h.hexdigest()


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
    text_encoder_2_lr: float | None
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
    latent_cache_ram_mb: float
    prefetch: str | bool
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
    val_every_steps: int | None
    metadata_paths: bool

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
            f"runs.{name}.dataset: unknown dataset {merged['dataset']!r}"
            f"{_suggest(merged['dataset'], config['datasets'])} "
            f"(have: {', '.join(config['datasets'])})"
        )
    if merged["base_model"] not in config["base_models"]:
        raise ConfigError(
            f"runs.{name}.base_model: unknown base model {merged['base_model']!r}"
            f"{_suggest(merged['base_model'], config['base_models'])} "
            f"(have: {', '.join(config['base_models'])})"
        )
    return RunConfig.from_dict({"name": name, **merged})


# --- constraints between keys ------------------------------------------------------------------


def template_problem(template: str, trigger: str = "") -> str | None:
    """Why ``template`` is not a usable caption template (only ``{trigger}`` may be filled in)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"{e} (write {{{{ and }}}} for literal braces)"
    for _text, field, spec, _conversion in parsed:
        if field is None:
            continue
        if field != "trigger":
            shown = "{" + field + "}" if field else "{}"
            return f"unknown placeholder {shown} (the only one is {{trigger}})"
        if "{" in (spec or ""):
            return "a placeholder inside a format spec (only {trigger} may be filled in)"
    try:
        template.format(trigger=trigger)
    except (ValueError, TypeError) as e:
        return f"cannot be filled in: {e}"
    return None


def _dataset_problems(name: str, ds: Mapping[str, Any]) -> list[str]:
    """Constraints between the keys of one dataset block (defaults filled)."""
    key = f"datasets.{name}"
    out = []
    res, step = ds["resolution"], ds["bucket_step"]
    if ds["buckets"] and res < step:
        out.append(
            f"{key}.resolution: {res} is below bucket_step {step}: no bucket fits "
            "(raise resolution or lower bucket_step)"
        )
    if not ds["buckets"] and res % 8:
        out.append(
            f"{key}.resolution: {res} with buckets: false must be a multiple of 8 "
            "(the VAE's downsampling factor)"
        )
    floor = ds["min_size"] * res
    if floor * floor > ds["max_pixels"]:
        out.append(
            f"{key}.min_size: {ds['min_size']} x resolution {res} = a short side of {floor:g} px "
            f"needs more than max_pixels {ds['max_pixels']} pixels: every image would be "
            "rejected (min_size is a share of resolution, not pixels)"
        )
    if ds["caption_variants"] == 0:
        for k, off in (("shuffle_captions", False), ("tag_dropout", 0)):
            if ds[k] != off:
                out.append(
                    f"{key}.{k}: has no effect with caption_variants 0 (variants are what it "
                    "changes: set caption_variants to 1 or more)"
                )
    problem = template_problem(ds["caption_template"], ds["trigger"])
    if problem:
        out.append(f"{key}.caption_template: {problem}")
    elif ds["captioner"] == "template":
        text = ds["caption_prefix"] + ds["caption_template"].format(trigger=ds["trigger"])
        if not text.strip():
            out.append(
                f"{key}.caption_template: the template captioner would write empty captions "
                f"(template {ds['caption_template']!r}, trigger {ds['trigger']!r})"
            )
    if ds["captioner"] == "blip" and not ds["blip_model"]:
        out.append(f"{key}.blip_model: required with captioner blip (a local BLIP model folder)")
    return out


def _origin(config: Mapping, run: str, key: str) -> str:
    """The dotted key a run's setting comes from: its own block, else `defaults`."""
    if key in (config["runs"].get(run) or {}) or key not in (config.get("defaults") or {}):
        return f"runs.{run}.{key}"
    return f"defaults.{key} (run {run})"


def _run_problems(config: Mapping, r: RunConfig) -> list[str]:
    """Constraints between the settings of one resolved run."""
    out = []
    if r.max_steps is not None and r.warmup_steps > r.max_steps:
        out.append(
            f"{_origin(config, r.name, 'warmup_steps')}: {r.warmup_steps} is more than max_steps "
            f"{r.max_steps}: the learning rate would never reach learning_rate"
        )
    if r.lr_scheduler == "constant" and r.warmup_steps > 0:
        out.append(
            f"{_origin(config, r.name, 'warmup_steps')}: {r.warmup_steps} has no effect with "
            "lr_scheduler 'constant' (use constant_with_warmup)"
        )
    return out


def _pattern_problems(config: Mapping[str, Any]) -> list[str]:
    """Paths that become Snakemake inputs or outputs (a generated dataset, a base model) must
    hold no braces: Snakemake would read ``{x}`` in them as a wildcard."""
    named = [(f"datasets.{n}.path", ds["path"]) for n, ds in config["datasets"].items()
             if "synthetic" in ds]  # fmt: skip
    for n, bm in config["base_models"].items():
        named += [(f"base_models.{n}.{k}", bm.get(k)) for k in ("path", "original_config")]
    return [
        f"{key}: {value!r} holds a brace, which Snakemake reads as a wildcard (rename the folder)"
        for key, value in named
        if value and ("{" in value or "}" in value)
    ]


def check_settings(config: Mapping[str, Any]) -> None:
    """Constraints between keys, per dataset and per resolved run (config validated first)."""
    problems = _pattern_problems(config)
    for name, ds in config["datasets"].items():
        problems += _dataset_problems(name, ds)
    problems += holdout_problems(config)
    for name in config["runs"]:
        problems += _run_problems(config, resolve_run(config, name))
    _raise(problems)


# --- files that must exist before any job runs -------------------------------------------------


def _shown(p: Path) -> str:
    """A path as configured, and where a relative one leads (the folder Snakemake runs in)."""
    if p.is_absolute():
        return str(p)
    return f"{p} (relative to the folder Snakemake runs in: {p.resolve()})"


def _dataset_path_problem(name: str, ds: Mapping, root: Path) -> str | None:
    """Why a dataset folder cannot be scanned, or would scan the workflow's own outputs."""
    p = root / ds["path"]
    results = (root / "results").resolve()
    if p.resolve() == results or p.resolve() in results.parents:
        return (
            f"datasets.{name}.path: {p} holds the workflow's results/ folder: its sample grids "
            "and plots would become training images (point it at the image folder itself)"
        )
    if "synthetic" in ds:
        return None
    if p.is_file():
        return f"datasets.{name}.path: {p} is a file, not a folder of images"
    if not p.is_dir():
        return f"datasets.{name}.path: folder not found: {_shown(p)}"
    if not os.access(p, os.R_OK | os.X_OK):
        return f"datasets.{name}.path: folder not readable: {p}"
    return None


def _blip_problem(name: str, ds: Mapping, root: Path) -> str | None:
    """A BLIP captioner's model folder must exist locally and be a model folder."""
    if ds["captioner"] != "blip" or not ds["blip_model"]:
        return None
    p = root / ds["blip_model"]
    if not p.is_dir():
        return (
            f"datasets.{name}.blip_model: BLIP model folder not found: {_shown(p)} (lorapipe loads "
            "models from local paths only: download e.g. Salesforce/blip-image-captioning-base "
            "to a folder)"
        )
    if not (p / "config.json").is_file():
        return f"datasets.{name}.blip_model: {p} is not a model folder (no config.json)"
    return None


def _model_problem(name: str, bm: Mapping, root: Path) -> str | None:
    """A base model path must exist (unless built) and be a complete diffusers folder or file."""
    if "tiny" in bm:
        return None
    p = root / bm["path"]
    if not p.exists():
        return (
            f"base_models.{name}.path: not found: {_shown(p)} (lorapipe loads models from local "
            "paths only: download the model folder first)"
        )
    if p.is_dir():
        from .models import model_parts_of  # stdlib-only at import time

        missing = [c for c in model_parts_of(p) if not (p / c).is_dir()]
        if missing:
            return (
                f"base_models.{name}.path: {p} is not a complete diffusers folder "
                f"(missing: {', '.join(missing)})"
            )
        return None
    if p.suffix != ".safetensors":
        return f"base_models.{name}.path: {p}: expected a diffusers folder or a .safetensors file"
    from .models import check_config_folder  # stdlib-only at import time

    oc = bm.get("original_config")
    try:
        check_config_folder(p, root / oc if oc else None)
    except (ValueError, FileNotFoundError) as e:
        return f"base_models.{name}.original_config: {e}"
    return None


def _vae_problem(name: str, bm: Mapping, root: Path) -> str | None:
    """A ``vae:`` override must be a local diffusers VAE folder (`models.check_vae_folder`)."""
    if not bm.get("vae"):
        return None
    from .models import check_vae_folder  # stdlib-only at import time

    try:
        check_vae_folder(root / bm["vae"])
    except FileNotFoundError as e:
        return f"base_models.{name}.vae: {e}"
    return None


@functools.lru_cache(maxsize=16)
def _safetensors_modules(path: str, _size: int, _mtime_ns: int) -> frozenset[str] | None:
    """Module names of a safetensors file's tensors (``a.b.weight`` → ``a.b``), from its header
    alone (no torch); None when the file is not readable as safetensors."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= 100 * 2**20:
                return None
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return None
    return frozenset(k.rsplit(".", 1)[0] for k in header if k != "__metadata__" and "." in k)


def unet_modules(model_path: str | os.PathLike) -> frozenset[str] | None:
    """Names of the UNet's modules that hold weights, when the model is a diffusers folder with
    a safetensors UNet; None when that cannot be known without loading the model."""
    f = Path(model_path) / "unet" / "diffusion_pytorch_model.safetensors"
    try:
        st = f.stat()
    except OSError:
        return None
    return _safetensors_modules(str(f), st.st_size, st.st_mtime_ns)


def target_module_problem(target: str, modules: Iterable[str]) -> str | None:
    """Why peft would find no module for ``target`` (it matches a name or a name's ``.``-suffix)."""
    modules = list(modules)
    if any(m == target or m.endswith("." + target) for m in modules):
        return None
    tails = {".".join(m.split(".")[-k:]) for m in modules for k in (1, 2)}
    return f"{target!r} matches no module of the UNet{_suggest(target, sorted(tails))}"


def _target_problems(config: Mapping, root: Path) -> list[str]:
    """Each run's target_modules against its base model's UNet, where the UNet is on disk."""
    out = []
    for name in config["runs"]:
        r = resolve_run(config, name)
        modules = unet_modules(root / config["base_models"][r.base_model]["path"])
        if not modules:
            continue
        for t in r.target_modules:
            problem = target_module_problem(t, modules)
            if problem:
                out.append(
                    f"{_origin(config, name, 'target_modules')}: {problem} of base model "
                    f"{r.base_model}"
                )
    return out


def check_paths(config: Mapping[str, Any], workdir: str | os.PathLike = ".") -> None:
    """Fail early on inputs that must exist before any job runs.

    A dataset folder must exist unless the workflow generates it (`synthetic`) and must not hold
    the workflow's results; a BLIP captioner's model folder must exist; a base model path must
    exist unless the workflow builds it (`tiny`), and a diffusers folder must hold its parts;
    each run's `target_modules` must name modules of its UNet (when the UNet is on disk).
    """
    root = Path(workdir)
    problems = []
    for name, ds in config["datasets"].items():
        problems += [
            p for p in (_dataset_path_problem(name, ds, root), _blip_problem(name, ds, root)) if p
        ]
    for name, bm in config["base_models"].items():
        problems += [x for x in (_model_problem(name, bm, root), _vae_problem(name, bm, root)) if x]
    _raise(problems or _target_problems(config, root))


MODEL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


# --- sweep tables ------------------------------------------------------------------------------


def _read_table(table: Path, label: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and (line number, cells) rows of a tab-separated table, cells stripped.

    Raises:
        ConfigError: naming the file, and the line and column where a row does not fit.
    """
    try:
        text = table.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label}: {table}: not UTF-8 text ({e.reason} at byte {e.start})") \
            from None
    rows = []
    for cells in csv.reader(io.StringIO(text, newline=""), delimiter="\t"):
        rows.append(cells)
    numbered = []
    line = 1
    for cells in rows:
        numbered.append((line, [c.strip() for c in cells]))
        line += 1 + sum(c.count("\n") for c in cells)
    numbered = [(n, cells) for n, cells in numbered if any(cells)]
    if not numbered:
        raise ConfigError(f"{label}: {table} is empty (a header line of run settings is needed)")
    (_, header), body = numbered[0], numbered[1:]
    return header, body


def _check_header(header: list[str], table: Path) -> None:
    """Every column names a run setting (a single value), once."""
    props = _schema()["$defs"]["run_settings"]["properties"]
    problems = []
    for i, col in enumerate(header, 1):
        where = f"{table}:1: column {i}"
        if not col:
            problems.append(f"{where}: empty column name")
        elif col in header[: i - 1]:
            problems.append(f"{where}: column {col!r} appears twice")
        elif col not in props:
            problems.append(
                f"{where}: {col!r} is not a run setting{_suggest(col, props)} "
                "(see config/README.md)"
            )
        elif col in LIST_SETTINGS:
            problems.append(f"{where}: {col!r} is a list: set it in the sweep's base, not a column")
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "\n  ".join(problems))


def _check_rows(header: list[str], body: list[tuple[int, list[str]]], table: Path) -> None:
    """Every row has one non-empty cell per column."""
    if not body:
        raise ConfigError(f"{table} has no rows (one row per run, under the header)")
    for line, cells in body:
        if len(cells) != len(header):
            more = len(cells) - len(header)
            what = f"{abs(more)} cell(s) {'more' if more > 0 else 'fewer'} than the header"
            raise ConfigError(
                f"{table}:{line}: {len(cells)} cells, {what} ({len(header)}: "
                f"{', '.join(header)}); cells are separated by one tab"
            )
        for col, cell in zip(header, cells, strict=True):
            if cell in NA_CELLS:
                shown = "empty" if not cell else f"{cell!r}, which reads as missing"
                raise ConfigError(
                    f"{table}:{line}: column {col!r}: the cell is {shown}: give every run a "
                    "value (or move the setting to the sweep's base)"
                )


def _cell_problem(col: str, value: Any) -> str | None:
    """Why a table value is not valid for run setting ``col``."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number (got {value})"
    schema = _schema()["$defs"]["run_settings"]["properties"][col]
    err = next(iter(_plain_validator(schema).iter_errors(value)), None)
    return err.message if err is not None else None


def _sweep_rows(name: str, table: Path) -> list[tuple[int, str, dict]]:
    """(line, run name, values) of each row of sweep ``name``'s table, every cell checked."""
    import pandas as pd
    from snakemake.utils import Paramspace

    header, body = _read_table(table, f"sweeps.{name}.table")
    _check_header(header, table)
    _check_rows(header, body, table)
    buf = io.StringIO()
    csv.writer(buf, delimiter="\t", lineterminator="\n").writerows(
        [header] + [cells for _, cells in body]
    )
    df = pd.read_csv(io.StringIO(buf.getvalue()), sep="\t")
    space = Paramspace(df, filename_params="*", param_sep="~", filename_sep="_")
    out = []
    records = space.dataframe.to_dict("records")
    for (line, _), pattern, row in zip(body, space.instance_patterns, records, strict=True):
        values = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}
        for col, v in values.items():
            problem = _cell_problem(col, v)
            if problem:
                raise ConfigError(f"{table}:{line}: column {col!r}: {problem}")
        out.append((line, f"{name}_{pattern}", values))
    return out


def expand_sweeps(config: dict, workdir: str | os.PathLike = ".") -> dict:
    """Add one run per row of each sweep table to ``config["runs"]`` (in place).

    Names come from snakemake.utils.Paramspace (``<sweep>_lora_rank~8_learning_rate~0.0001``), so a
    sweep's runs are ordinary runs: each is one target, all share the dataset and latent caches.
    The table is checked first: a row with a cell more or less than the header, a blank or NA
    cell, an unknown column, a value of the wrong type, or two rows making one run name the file
    and the line (and the column).
    """
    sweeps = config.get("sweeps") or {}
    for name, sw in sweeps.items():
        table = Path(workdir) / sw["table"]
        if not table.is_file():
            raise ConfigError(f"sweeps.{name}.table: file not found: {_shown(table)}")
        made: dict[str, int] = {}
        for line, run, values in _sweep_rows(name, table):
            problem = name_problem("runs", run)
            if problem:
                raise ConfigError(f"{table}:{line}: the run name {run!r} of this row: {problem}")
            if run in made:
                raise ConfigError(f"{table}:{line}: the same run as line {made[run]} ({run})")
            if run in config["runs"]:
                raise ConfigError(
                    f"sweeps.{name}: generated run {run!r} ({table}:{line}) already exists in runs"
                )
            made[run] = line
            config["runs"][run] = {**copy.deepcopy(sw.get("base") or {}), **values}
    return config


def load_config(config: dict, workdir: str | os.PathLike = ".", check_files: bool = True) -> dict:
    """Validate, fill defaults, expand sweeps, resolve every run once, check constraints between
    keys, then (``check_files``) the files named."""
    validate(config)
    if config.get("sweeps"):
        expand_sweeps(config, workdir)
        validate(config)
    for name in config["runs"]:
        resolve_run(config, name)
    check_settings(config)
    if check_files:
        check_paths(config, workdir)
    return config


# --- YAML files --------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (naming the line),
    not a silent "the last one wins"."""

    def construct_mapping(self, node, deep=False):
        """Construct a mapping; raise on a duplicate key (merge keys ``<<`` aside)."""
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: SafeLoader reports it
                if first is None:
                    seen[key] = key_node.start_mark.line + 1
                else:
                    raise ConfigError(
                        f"{key_node.start_mark.name}:{key_node.start_mark.line + 1}: duplicate "
                        f"key {key!r} (first on line {first}); a later key would silently win"
                    )
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict:
    """One config file, strictly: a mapping at the top, no duplicate key, valid YAML (or JSON).

    Raises:
        ConfigError: naming the file, and the line (and column) where it is known.
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        loader = _StrictLoader(text)
        loader.name = str(p)
        try:
            doc = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(
            f"{p}: the top level must be a mapping (datasets:, runs:, …), not {type(doc).__name__}"
        )
    return doc


def check_yaml_files(paths: Iterable[str | os.PathLike]) -> None:
    """Read each config file strictly (see :func:`read_yaml`), for files another tool loaded
    leniently (Snakemake's ``--configfile``)."""
    for p in paths:
        read_yaml(p)


def load_yaml(*paths: str | os.PathLike) -> dict:
    """Load and deep-merge YAML files in order (later wins), as Snakemake's --configfile does.

    Each file is read strictly (:func:`read_yaml`): a duplicate key is an error, not a silent
    override.
    """
    out: dict = {}
    for p in paths:
        _deep_update(out, read_yaml(p))
    return out


def _deep_update(dst: dict, src: Mapping) -> None:
    """Merge ``src`` into ``dst``: mappings key by key, anything else replaced (a copy)."""
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
