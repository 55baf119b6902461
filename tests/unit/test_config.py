"""Config: schema validation naming the key, defaults precedence, sweeps, early path checks."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import tomllib
import yaml

from lorapipe.config import ConfigError, load_config, load_yaml, resolve_run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def cfg() -> dict:
    return load_yaml(REPO / "config" / "config.yaml")


def test_shipped_config_is_valid_and_complete(cfg):
    load_config(cfg, check_files=False)
    run = resolve_run(cfg, "demo")
    assert (
        run.lora_rank == 4
        and run.lora_alpha == 8
        and run.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    )
    assert cfg["mlflow"]["tracking_uri"] is None and cfg["mlflow"]["experiment"] == "lorapipe"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["runs"]["demo"].update(lora_rnak=4), r"runs\.demo\.lora_rnak: unknown key"),
        (
            lambda c: c["runs"]["demo"].update(lora_rank="8"),
            r"runs\.demo\.lora_rank: '8' is not of type 'integer'",
        ),
        (
            lambda c: c["datasets"]["demo"].update(shards=0),
            r"datasets\.demo\.shards: 0 is less than the minimum of 1",
        ),
        (
            lambda c: c["runs"]["demo"].update(mixed_precision="fp8"),
            r"runs\.demo\.mixed_precision: 'fp8' is not one of",
        ),
        (lambda c: c.update(extra=1), r"extra: unknown key"),
        (
            lambda c: c["runs"]["demo"].update(dataset="nope"),
            r"runs\.demo\.dataset: unknown dataset 'nope'",
        ),
        (
            lambda c: c["runs"]["demo"].update(base_model="sd15"),
            r"runs\.demo\.base_model: unknown base model 'sd15'",
        ),
        (
            lambda c: c["datasets"]["demo"].update(background="white"),
            r"datasets\.demo\.background: 'white' does not match",
        ),
    ],
)
def test_bad_values_name_the_key(cfg, edit, message):
    edit(cfg)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg, check_files=False)


def test_defaults_block_beats_schema_defaults_and_run_beats_defaults(cfg):
    cfg["defaults"]["lora_rank"] = 16
    cfg["defaults"]["epochs"] = 3
    del cfg["runs"]["demo"]["lora_rank"]
    cfg["runs"]["demo"]["epochs"] = 7
    load_config(cfg, check_files=False)
    run = resolve_run(cfg, "demo")
    assert (run.lora_rank, run.epochs) == (16, 7)
    assert "lora_rank" not in cfg["runs"]["demo"]  # run blocks are never filled in


def test_user_file_adds_runs_by_merge(cfg, tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        yaml.safe_dump(
            {"runs": {"mine": {"dataset": "demo", "base_model": "tiny-sd", "lora_rank": 16}}}
        )
    )
    merged = load_yaml(REPO / "config" / "config.yaml", mine)
    load_config(merged, check_files=False)
    assert set(merged["runs"]) == {"demo", "demo-xl", "mine"}
    assert resolve_run(merged, "mine").lora_rank == 16


def test_sweep_table_becomes_runs(cfg, tmp_path):
    (tmp_path / "s.tsv").write_text("lora_rank\tlearning_rate\n4\t0.001\n16\t0.0005\n")
    cfg["sweeps"] = {"rk": {"table": "s.tsv", "base": {"dataset": "demo", "base_model": "tiny-sd"}}}
    load_config(cfg, workdir=tmp_path, check_files=False)
    names = sorted(n for n in cfg["runs"] if n.startswith("rk_"))
    assert names == ["rk_lora_rank~16_learning_rate~0.0005", "rk_lora_rank~4_learning_rate~0.001"]
    run = resolve_run(cfg, names[0])
    assert (run.lora_rank, run.learning_rate, run.batch_size) == (16, 5e-4, 4)


def test_sweep_with_a_bad_column_names_it(cfg, tmp_path):
    (tmp_path / "s.tsv").write_text("lora_rnak\n4\n")
    cfg["sweeps"] = {"rk": {"table": "s.tsv", "base": {"dataset": "demo", "base_model": "tiny-sd"}}}
    with pytest.raises(ConfigError, match=r"s\.tsv:1: column 1: 'lora_rnak' is not a run setting "
                       r"\(did you mean 'lora_rank'\?\)"):
        load_config(copy.deepcopy(cfg), workdir=tmp_path, check_files=False)
    cfg["sweeps"]["rk"]["table"] = "missing.tsv"
    with pytest.raises(ConfigError, match=r"sweeps\.rk\.table: file not found"):
        load_config(copy.deepcopy(cfg), workdir=tmp_path, check_files=False)


def test_paths_are_checked_before_work(cfg, tmp_path):
    c = copy.deepcopy(cfg)
    c["datasets"]["demo"].pop("synthetic")
    with pytest.raises(ConfigError, match=r"datasets\.demo\.path: folder not found"):
        load_config(c, workdir=tmp_path)
    c = copy.deepcopy(cfg)
    c["base_models"]["tiny-sd"] = {"path": "models/sd15"}
    with pytest.raises(ConfigError, match=r"base_models\.tiny-sd\.path: not found: .*local paths"):
        load_config(c, workdir=tmp_path)
    (tmp_path / "models" / "sd15" / "unet").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"not a complete diffusers folder \(missing: vae, "):
        load_config(copy.deepcopy(c), workdir=tmp_path)


def test_conda_env_matches_pyproject_pins():
    """envs/lorapipe.yaml (for --software-deployment-method conda) pins what pyproject pins."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(re.match(r"([A-Za-z0-9_-]+)(.*)", d).groups() for d in deps)
    env = yaml.safe_load((REPO / "envs" / "lorapipe.yaml").read_text())
    flat = []
    for d in env["dependencies"]:
        flat += d["pip"] if isinstance(d, dict) else [d]
    conda = {}
    for d in flat:
        name, spec = re.match(r"([A-Za-z0-9_-]+)(.*)", d).groups()
        conda[{"pytorch": "torch"}.get(name, name)] = (
            spec.replace("=", "==") if spec.startswith("=") and not spec.startswith("==") else spec
        )
    for name, spec in pins.items():
        assert name in conda, f"{name} missing from envs/lorapipe.yaml"
        assert conda[name] == spec, f"{name}: pyproject {spec!r} vs conda env {conda[name]!r}"


def test_every_rule_has_log_and_conda(repo):
    text = "".join(p.read_text() for p in (repo / "rules").glob("*.smk"))
    rules = re.findall(r"^\s*rule(?: (\w+))?:", text, re.M)
    assert len(rules) >= 10
    assert text.count("log:") >= len(rules) and text.count("conda:") >= len(rules)


def test_config_reference_is_generated_from_the_schema(repo):
    """config/README.md lists every key with its default: regenerate it when the schema changes."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(repo / "tools" / "config_doc.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout


# -- the schema check, remembered by content (#17) -----------------------------------------------


@pytest.fixture()
def checked_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "config-checked"


def _no_schema_check(monkeypatch):
    """From here on, running the schema check fails the test."""
    from lorapipe import config as lpconfig

    def refuse(_config):
        raise AssertionError("the schema check ran")

    monkeypatch.setattr(lpconfig, "_validator_with_defaults", refuse)


def test_a_passed_config_is_not_checked_again_and_gets_the_same_defaults(
    cfg, checked_cache, monkeypatch
):
    first = load_config(copy.deepcopy(cfg), check_files=False)
    assert len(list(checked_cache.glob("*.json"))) == 1
    _no_schema_check(monkeypatch)
    again = load_config(copy.deepcopy(cfg), check_files=False)
    assert again == first and list(again) == list(first)  # same values, same key order
    assert again["mlflow"]["experiment"] == "lorapipe"  # a schema default, from the entry
    changed = copy.deepcopy(cfg)
    changed["runs"]["demo"]["lora_rank"] = 8
    with pytest.raises(AssertionError, match="schema check ran"):  # another config: checked
        load_config(changed, check_files=False)


def test_a_failing_config_is_never_stored_and_is_explained_each_time(cfg, checked_cache):
    cfg["runs"]["demo"]["lora_rnak"] = 4
    for _ in range(2):
        with pytest.raises(ConfigError, match=r"runs\.demo\.lora_rnak: unknown key"):
            load_config(copy.deepcopy(cfg), check_files=False)
    assert not checked_cache.exists() or not list(checked_cache.glob("*.json"))


def test_the_entry_follows_the_schema_and_model_defaults_and_survives_corruption(
    cfg, checked_cache, monkeypatch, tmp_path
):
    from lorapipe import config as lpconfig

    load_config(copy.deepcopy(cfg), check_files=False)
    # An edited schema is another key: checked again (here it fails, as the schema now says).
    strict = tmp_path / "schema.yaml"
    strict.write_text(lpconfig.SCHEMA_PATH.read_text() + "\nminProperties: 99\n")
    with monkeypatch.context() as m:
        m.setattr(lpconfig, "SCHEMA_PATH", strict)
        lpconfig._schema.cache_clear()
        try:
            with pytest.raises(ConfigError, match="99"):
                load_config(copy.deepcopy(cfg), check_files=False)
        finally:
            lpconfig._schema.cache_clear()
    # The key is taken after the defaults that read the model on disk: an SDXL model gives its
    # dataset 1024 px, and the same config over an SD model does not reuse that entry.
    del cfg["datasets"]["demo"]["resolution"]
    monkeypatch.setattr(lpconfig, "_family_of_block", lambda bm: "sdxl")
    sdxl = load_config(copy.deepcopy(cfg), check_files=False)["datasets"]["demo"]["resolution"]
    monkeypatch.setattr(lpconfig, "_family_of_block", lambda bm: "sd")
    sd = load_config(copy.deepcopy(cfg), check_files=False)["datasets"]["demo"]["resolution"]
    assert sdxl == 1024 and sd != 1024
    for entry in checked_cache.glob("*.json"):
        entry.write_text('{"truncated": ')
    _no_schema_check(monkeypatch)
    with pytest.raises(AssertionError, match="schema check ran"):  # unreadable: checked again
        load_config(copy.deepcopy(cfg), check_files=False)


def test_a_config_json_cannot_hold_exactly_is_checked_every_time(cfg, checked_cache):
    from lorapipe.config import _plain_json

    assert _plain_json(copy.deepcopy(cfg), set())
    assert not _plain_json({"a": float("nan")}, set()) and not _plain_json({1: 2}, set())
    assert not _plain_json({"when": __import__("datetime").date(2026, 1, 1)}, set())
    aliased = copy.deepcopy(cfg)
    aliased["datasets"]["again"] = aliased["datasets"]["demo"]  # a YAML alias: one mapping
    load_config(aliased, check_files=False)  # passes, but is not stored
    assert not checked_cache.exists() or not list(checked_cache.glob("*.json"))
