"""Config values that used to pass the check and fail later (or never): each is now a one-line
error before any job, naming the key, or the file, line and column."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest

from lorapipe.config import (
    ConfigError,
    check_yaml_files,
    load_config,
    load_yaml,
    read_yaml,
    resolve_run,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def cfg() -> dict:
    return load_yaml(REPO / "config" / "config.yaml")


def fails(cfg: dict, pattern: str, workdir: Path | str = ".", check_files: bool = False) -> str:
    """Assert load_config raises one one-line ConfigError matching ``pattern``; return it."""
    with pytest.raises(ConfigError, match=pattern) as e:
        load_config(cfg, workdir=workdir, check_files=check_files)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


# --- numbers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    ("block", "key"),
    [
        ("runs.demo", "learning_rate"),
        ("runs.demo", "lora_alpha"),
        ("defaults", "max_grad_norm"),
        ("datasets.demo", "min_size"),
        ("mlflow", "live_every_s"),
    ],
)
def test_non_finite_numbers_are_rejected_naming_the_key(cfg, block, key, value):
    """YAML's .nan / .inf pass a `type: number` schema (and its minimum): not any more."""
    node = cfg
    for part in block.split("."):
        node = node[part]
    node[key] = value
    fails(cfg, re.escape(f"{block}.{key}: must be a finite number"))


def test_whole_floats_are_not_integers(cfg):
    """`lora_rank: 8.0` passed jsonschema (8.0 counts as an integer there) and broke peft."""
    cfg["runs"]["demo"]["lora_rank"] = 8.0
    fails(cfg, r"runs\.demo\.lora_rank: 8\.0 is not of type 'integer' \(write 8, not 8\.0\)")


def test_exponent_without_a_dot_is_text_in_yaml_and_says_so(cfg, tmp_path):
    """PyYAML reads `1e-4` (no dot) as a string: the message says why and what to write."""
    (tmp_path / "c.yaml").write_text("runs:\n  demo:\n    learning_rate: 1e-4\n")
    merged = load_yaml(REPO / "config" / "config.yaml", tmp_path / "c.yaml")
    fails(merged, r"runs\.demo\.learning_rate: '1e-4' is not of type 'number' \(YAML reads 1e-4 as")


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("adam_beta1", 1.0, r"runs\.demo\.adam_beta1: 1\.0 is greater than or equal to"),
        ("adam_beta2", 1, r"runs\.demo\.adam_beta2: 1 is greater than or equal to"),
        ("lora_dropout", 1.0, r"runs\.demo\.lora_dropout: 1\.0 is greater than or equal to"),
        ("seed", -1, r"runs\.demo\.seed: -1 is less than the minimum of 0"),
        ("seed", 2**64, r"runs\.demo\.seed: \d+ is greater than the maximum"),
        ("target_modules", ["to_q", "to_q"], r"runs\.demo\.target_modules: .* non-unique"),
        ("target_modules", ["to q"], r"runs\.demo\.target_modules\.0: 'to q' does not match"),
        ("target_modules", [""], r"runs\.demo\.target_modules\.0: '' does not match"),
        ("dataset", "", r"runs\.demo\.dataset: '' should be non-empty"),
        ("lr_scheduler", "Cosine", r"lr_scheduler: 'Cosine' is not one of .*did you mean 'cosine'"),
        ("deterministic", "yes", r"runs\.demo\.deterministic: 'yes' is not of type 'boolean'"),
    ],
)
def test_ranges_types_enums_and_empty_strings(cfg, key, value, pattern):
    """Values torch, peft or the file system would refuse later are refused up front."""
    cfg["runs"]["demo"][key] = value
    fails(cfg, pattern)


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("bucket_step", 12, r"datasets\.demo\.bucket_step: 12 is not a multiple of 8"),
        ("blip_model", "", r"datasets\.demo\.blip_model: '' should be non-empty"),
        ("trigger", True, r"datasets\.demo\.trigger: True is not of type 'string' \(YAML reads"),
        ("synthetic", {"images": 4, "seed": -3}, r"datasets\.demo\.synthetic\.seed: -3 is less"),
    ],
)
def test_dataset_values(cfg, key, value, pattern):
    cfg["datasets"]["demo"][key] = value
    fails(cfg, pattern)


def test_unquoted_no_is_read_as_no_for_mixed_precision(cfg, tmp_path):
    """`mixed_precision: no` unquoted is YAML's false; it means "no", so it is taken as "no"."""
    (tmp_path / "c.yaml").write_text("runs:\n  demo:\n    mixed_precision: no\n")
    merged = load_yaml(REPO / "config" / "config.yaml", tmp_path / "c.yaml")
    load_config(merged, check_files=False)
    assert resolve_run(merged, "demo").mixed_precision == "no"


def test_an_empty_block_says_so(cfg):
    """`defaults:` with nothing under it is null: the message says what that means."""
    cfg["defaults"] = None
    fails(cfg, r"defaults: None is not of type 'object' \(an empty block")


# --- constraints between keys ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (
            {"resolution": 32, "bucket_step": 64},
            r"datasets\.demo\.resolution: 32 is below bucket_step 64: no bucket fits",
        ),
        (
            {"resolution": 100, "buckets": False},
            r"datasets\.demo\.resolution: 100 with buckets: false must be a multiple of 8",
        ),
        (
            {"min_size": 256, "resolution": 512},
            r"datasets\.demo\.min_size: 256 x resolution 512 .* every image would be rejected",
        ),
        (
            {"max_pixels": 100, "resolution": 64, "min_size": 0.5},
            r"datasets\.demo\.min_size: .* needs more than max_pixels 100",
        ),
        (
            {"shuffle_captions": True},
            r"datasets\.demo\.shuffle_captions: has no effect with caption_variants 0",
        ),
        ({"tag_dropout": 0.2}, r"datasets\.demo\.tag_dropout: has no effect with caption_var"),
        ({"captioner": "blip"}, r"datasets\.demo\.blip_model: required with captioner blip"),
    ],
)
def test_dataset_constraints_between_keys(cfg, edit, pattern):
    """resolution < bucket_step was a ZeroDivisionError in a shard job; the others silently did
    nothing or rejected every image."""
    cfg["datasets"]["demo"].update(edit)
    fails(cfg, pattern)


def test_buckets_false_with_a_multiple_of_8_and_variants_with_shuffle_are_fine(cfg):
    cfg["datasets"]["demo"].update(
        resolution=48, buckets=False, caption_variants=2, shuffle_captions=True, tag_dropout=0.1
    )
    load_config(cfg, check_files=False)


@pytest.mark.parametrize(
    ("edit", "where", "pattern"),
    [
        (
            {"warmup_steps": 50, "max_steps": 10},
            "runs",
            r"runs\.demo\.warmup_steps: 50 is more than max_steps 10",
        ),
        (
            {"warmup_steps": 5, "lr_scheduler": "constant"},
            "runs",
            r"runs\.demo\.warmup_steps: 5 has no effect with lr_scheduler 'constant'",
        ),
        (
            {"warmup_steps": 50, "max_steps": 10},
            "defaults",
            r"defaults\.warmup_steps \(run demo\): 50 is more than max_steps 10",
        ),
    ],
)
def test_run_constraints_between_keys_name_where_the_setting_is(cfg, edit, where, pattern):
    """A warmup longer than the run (the LR never reaches learning_rate), or one the scheduler
    ignores: named at the block that holds it."""
    if where == "defaults":
        cfg["runs"].pop("demo-xl")  # one run under the defaults: one problem, one line
        cfg["runs"]["demo"].pop("warmup_steps", None)
        cfg["defaults"].update(edit)
    else:
        cfg["runs"]["demo"].update(edit)
    fails(cfg, pattern)


@pytest.mark.parametrize(
    ("template", "pattern"),
    [
        ("a photo of {subject}", r"unknown placeholder \{subject\} \(the only one is \{trigger"),
        ("a photo of {}", r"unknown placeholder \{\} "),
        ("a photo of {0}", r"unknown placeholder \{0\} "),
        ("a {trigger", r"expected '\}' before end of string \(write \{\{ and \}\} for literal"),
        ("a } b", r"Single '\}' encountered"),
        ("{trigger.upper}", r"unknown placeholder \{trigger\.upper\}"),
        ("{trigger:d}", r"cannot be filled in: Unknown format code 'd'"),
    ],
)
def test_caption_template_is_checked_at_load_naming_the_dataset(cfg, template, pattern):
    """Placeholders used to fail only inside the caption job, as a bare KeyError."""
    cfg["datasets"]["demo"]["caption_template"] = template
    fails(cfg, r"datasets\.demo\.caption_template: " + pattern)


def test_template_captioner_that_writes_empty_captions_is_refused(cfg):
    cfg["datasets"]["demo"].update(caption_template="{trigger}", trigger="")
    fails(cfg, r"datasets\.demo\.caption_template: the template captioner would write empty")
    cfg["datasets"]["demo"]["caption_prefix"] = "sks, "
    load_config(cfg, check_files=False)


def test_literal_braces_in_a_template_are_fine(cfg):
    cfg["datasets"]["demo"]["caption_template"] = "{{style}} {trigger}"
    load_config(cfg, check_files=False)


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "pattern"),
    [
        ("datasets", "../etc", r"datasets\.\.\./etc: not a usable name: .*no path separators"),
        ("datasets", "a/b", r"datasets\.a/b: not a usable name"),
        ("datasets", "..", r"datasets\.\.\.: not a usable name"),
        ("datasets", "x" * 129, r"datasets\.x+: name too long \(129 characters, at most 128\)"),
        ("datasets", "runs", r"datasets\.runs: reserved: results/runs/ holds the workflow's own"),
        ("datasets", "cache", r"datasets\.cache: reserved"),
        ("datasets", "trailing.", r"datasets\.trailing\.: a name cannot end with '\.'"),
        ("datasets", "NUL", r"datasets\.NUL: 'NUL' is a reserved device name"),
        ("datasets", "con.v2", r"datasets\.con\.v2: 'con\.v2' is a reserved device name"),
        ("base_models", "sd 15", r"base_models\.sd 15: not a usable name"),
        ("runs", "r" * 201, r"runs\.r+: name too long \(201 characters, at most 200\)"),
        ("runs", 2024, r"runs\.2024: a name must be text, not int .*put it in quotes"),
        ("runs", True, r"runs\.True: a name must be text, not bool"),
    ],
)
def test_names_that_would_break_the_file_system_are_refused(cfg, kind, name, pattern):
    """Names become folders and files: separators, '..', long, reserved or non-text names."""
    entry = next(iter(cfg[kind].values()))
    cfg[kind][name] = copy.deepcopy(entry)
    fails(cfg, pattern)


def test_names_that_differ_only_in_case_are_refused(cfg):
    """`Demo` and `demo` are one folder on macOS and Windows file systems."""
    cfg["runs"]["Demo"] = copy.deepcopy(cfg["runs"]["demo"])
    fails(cfg, r"runs\.Demo: differs from runs\.demo only in case")


def test_non_text_keys_inside_blocks_are_named(cfg):
    cfg["runs"]["demo"][1] = 2
    fails(cfg, r"runs\.demo\.1: a key must be text, not int")


def test_unknown_key_suggests_the_close_one(cfg):
    cfg["runs"]["demo"]["lora_rnak"] = 4
    fails(cfg, r"runs\.demo\.lora_rnak: unknown key \(did you mean 'lora_rank'\?\) \(allowed:")


def test_unknown_dataset_suggests_the_close_one(cfg):
    cfg["runs"]["demo"]["dataset"] = "Demo"
    with pytest.raises(ConfigError, match=r"unknown dataset 'Demo' \(did you mean 'demo'\?\)"):
        load_config(cfg, check_files=False)


# --- things that name files --------------------------------------------------------------------


def folder_dataset(cfg: dict, tmp_path: Path, **settings) -> dict:
    """The shipped config with dataset `demo` as a folder dataset under ``tmp_path``."""
    (tmp_path / "data" / "imgs").mkdir(parents=True, exist_ok=True)
    cfg["datasets"]["demo"].pop("synthetic")
    cfg["datasets"]["demo"].update(path="data/imgs", **settings)
    return cfg


def test_blip_model_folder_is_checked_before_any_job(cfg, tmp_path):
    """A missing BLIP folder failed only in the caption job, naming `datasets.*`."""
    folder_dataset(cfg, tmp_path, captioner="blip", blip_model="models/blip")
    fails(copy.deepcopy(cfg), r"datasets\.demo\.blip_model: BLIP model folder not found: .*"
          r"models/blip \(lorapipe loads models from local paths only", tmp_path, True)
    (tmp_path / "models" / "blip").mkdir(parents=True)
    fails(copy.deepcopy(cfg), r"datasets\.demo\.blip_model: .*blip is not a model folder "
          r"\(no config\.json\)", tmp_path, True)
    (tmp_path / "models" / "blip" / "config.json").write_text("{}")
    load_config(cfg, workdir=tmp_path)


def test_target_modules_are_checked_against_the_unet_on_disk(cfg, tmp_path, tiny_model):
    """A target the UNet does not have failed inside peft in the train job; now it is named with
    its run and base model (the UNet's safetensors header is read: no torch)."""
    cfg["base_models"]["tiny-sd"] = {"path": str(tiny_model)}
    cfg["runs"]["demo"]["target_modules"] = ["to_q", "to_qq"]
    fails(copy.deepcopy(cfg), r"runs\.demo\.target_modules: 'to_qq' matches no module of the "
          r"UNet \(did you mean 'to_q'\?\) of base model tiny-sd", tmp_path, True)
    cfg["runs"]["demo"]["target_modules"] = ["to_q", "attn2.to_k", "ff.net.0.proj", "proj_in"]
    load_config(cfg, workdir=tmp_path)


def test_dataset_folder_that_holds_the_results_is_refused(cfg, tmp_path):
    """`path: .` would train on the workflow's own sample grids and plots."""
    cfg["datasets"]["demo"]["path"] = "."
    fails(copy.deepcopy(cfg), r"datasets\.demo\.path: .* holds the workflow's results/ folder",
          tmp_path, True)


def test_dataset_path_that_is_a_file_says_so(cfg, tmp_path):
    folder_dataset(cfg, tmp_path)
    (tmp_path / "data" / "pics.zip").write_bytes(b"PK")
    cfg["datasets"]["demo"]["path"] = "data/pics.zip"
    fails(cfg, r"datasets\.demo\.path: .*pics\.zip is a file, not a folder", tmp_path, True)


def test_home_folder_in_a_path_is_expanded(cfg, tmp_path, monkeypatch):
    """`path: ~/data/cats` is the home folder's, as in a shell (it was a folder named '~')."""
    monkeypatch.setenv("HOME", str(tmp_path))
    folder_dataset(cfg, tmp_path)
    cfg["datasets"]["demo"]["path"] = "~/data/imgs"
    load_config(cfg, workdir="/")
    assert cfg["datasets"]["demo"]["path"] == f"{tmp_path}/data/imgs"


# --- sweep tables ------------------------------------------------------------------------------


def sweep(cfg: dict, tmp_path: Path, text: str | bytes) -> dict:
    p = tmp_path / "s.tsv"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    cfg["sweeps"] = {"rk": {"table": "s.tsv", "base": {"dataset": "demo", "base_model": "tiny-sd"}}}
    return cfg


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        # one extra cell used to shift the columns silently (a run with learning_rate 8)
        ("lora_rank\tlearning_rate\n4\t0.001\n8\t8\t0.001\n",
         r"s\.tsv:3: 3 cells, 1 cell\(s\) more than the header \(2: lora_rank, learning_rate\)"),
        ("lora_rank\tlearning_rate\n4\t0.001\n8\n",
         r"s\.tsv:3: 1 cells, 1 cell\(s\) fewer than the header"),
        # a blank cell used to become a run named ...~NA that failed in torch
        ("lora_rank\tlearning_rate\n4\t\n", r"s\.tsv:2: column 'learning_rate': the cell is empty"),
        ("lora_rank\tlearning_rate\n4\tNA\n",
         r"s\.tsv:2: column 'learning_rate': the cell is 'NA', which reads as missing"),
        ("lora_rank\t\n4\t0.1\n", r"s\.tsv:1: column 2: empty column name"),
        ("lora_rank\tlora_rank\n4\t8\n", r"s\.tsv:1: column 2: column 'lora_rank' appears twice"),
        ("target_modules\nto_q\n", r"s\.tsv:1: column 1: 'target_modules' is a list"),
        ("lora_rank\nfour\n", r"s\.tsv:2: column 'lora_rank': 'four' is not of type 'integer'"),
        ("lora_rank\n4.5\n", r"s\.tsv:2: column 'lora_rank': 4\.5 is not of type 'integer'"),
        ("learning_rate\ninf\n", r"s\.tsv:2: column 'learning_rate': must be a finite number"),
        ("lr_scheduler\ncosine\ncosine\n", r"s\.tsv:3: the same run as line 2"),
        ("dataset\nmy data\n", r"s\.tsv:2: the run name 'rk_dataset~my data' of this row: not"),
        ("lora_rank\n", r"s\.tsv has no rows"),
        ("", r"s\.tsv is empty"),
        (b"lora_rank\n\xff\n", r"s\.tsv: not UTF-8 text"),
    ],
)
def test_sweep_table_problems_name_file_line_and_column(cfg, tmp_path, text, pattern):
    fails(sweep(cfg, tmp_path, text), pattern, tmp_path)


def test_sweep_table_blank_lines_crlf_and_bom_are_fine(cfg, tmp_path):
    """Line numbers count blank lines; Windows line ends and a BOM change nothing."""
    sweep(cfg, tmp_path, "\ufefflora_rank\tlearning_rate\r\n\r\n4\t0.001\r\n16\t 0.0005 \r\n")
    load_config(cfg, workdir=tmp_path, check_files=False)
    names = sorted(n for n in cfg["runs"] if n.startswith("rk_"))
    assert names == ["rk_lora_rank~16_learning_rate~0.0005", "rk_lora_rank~4_learning_rate~0.001"]


# --- YAML files --------------------------------------------------------------------------------


def test_duplicate_key_names_file_line_and_key(tmp_path):
    """PyYAML keeps the last of two equal keys without a word; Snakemake does too."""
    p = tmp_path / "mine.yaml"
    p.write_text("runs:\n  r1:\n    lora_rank: 4\n    epochs: 3\n    lora_rank: 16\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml:5: duplicate key 'lora_rank' \(first on "
                       r"line 3\)"):
        load_yaml(p)
    with pytest.raises(ConfigError, match=r"mine\.yaml:5: duplicate key"):
        check_yaml_files([p])


def test_merge_keys_are_not_duplicates(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("base: &b {lora_rank: 4, epochs: 2}\nruns:\n  r1:\n    <<: *b\n    lora_rank: 8\n")
    assert read_yaml(p)["runs"]["r1"] == {"lora_rank": 8, "epochs": 2}


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("runs:\n  r1: [1, 2\n  r2: 3\n", r"bad\.yaml:3:\d+: not valid YAML"),
        ("a: 1\n\tb: 2\n", r"bad\.yaml:2:1: not valid YAML"),
        ("- a\n- b\n", r"bad\.yaml: the top level must be a mapping"),
    ],
)
def test_yaml_syntax_error_names_file_and_line(tmp_path, text, pattern):
    """Snakemake says only "Config file is not valid JSON or YAML"; `lorapipe check-config`
    and load_yaml name the file and the line."""
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        read_yaml(p)


def test_non_utf8_config_file_is_named(tmp_path):
    p = tmp_path / "latin.yaml"
    p.write_bytes("datasets: {caf\xe9: {path: x}}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.yaml: not UTF-8 text"):
        read_yaml(p)


def test_json_config_reads_and_its_duplicates_are_found(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"runs": {"r": {"epochs": 2}}}))
    assert read_yaml(p) == {"runs": {"r": {"epochs": 2}}}
    p.write_text('{"runs": {"r": {"epochs": 2, "epochs": 3}}}')
    with pytest.raises(ConfigError, match=r"c\.json:1: duplicate key 'epochs'"):
        read_yaml(p)


def test_check_config_command(tmp_path, capsys):
    """`lorapipe check-config A B`: the config as the workflow will see it, before a run."""
    from lorapipe.cli import main

    assert main(["check-config", str(REPO / "config" / "config.yaml"), "--no-files"]) == 0
    assert "ok: 1 dataset(s)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs:\n  demo:\n    learning_rate: .nan\n")
    assert main(["check-config", str(REPO / "config" / "config.yaml"), str(bad), "--no-files"]) == 1
    assert "runs.demo.learning_rate: must be a finite number" in capsys.readouterr().err


def test_braces_in_paths_snakemake_would_read_as_wildcards_are_refused(cfg):
    """A generated dataset's or a base model's path becomes a Snakemake output or input."""
    cfg["base_models"]["tiny-sd"]["path"] = "results/models/{tiny}"
    fails(cfg, r"base_models\.tiny-sd\.path: 'results/models/\{tiny\}' holds a brace")


def test_relative_path_not_found_says_where_it_looked(cfg, tmp_path):
    folder_dataset(cfg, tmp_path)
    cfg["datasets"]["demo"]["path"] = "data/typo"
    fails(cfg, r"folder not found: data/typo \(relative to the folder Snakemake runs in: /",
          check_files=True)
