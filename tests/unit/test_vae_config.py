"""A base model's ``vae:`` override (#12) in the config and the plan: the schema takes it (also
with ``tiny``), its path resolves as the other path keys do, a missing folder is one error naming
the key before any job (also from `lorapipe check-config`), and its files replace the model's own
VAE files among the inputs of the jobs that read it."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from lorapipe.cli import main
from lorapipe.config import ConfigError, load_config
from lorapipe.planning import Planner


def write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def vae_folder(path: Path) -> Path:
    """A stand-in diffusers VAE folder (what `models.check_vae_folder` asks for)."""
    write(path / "config.json", b'{"_class_name": "AutoencoderKL"}')
    write(path / "diffusion_pytorch_model.safetensors")
    return path


def config(tmp_path: Path, **model) -> dict:
    (tmp_path / "mine").mkdir(exist_ok=True)
    return {
        "datasets": {"mine": {"path": str(tmp_path / "mine"), "shards": 2}},
        "base_models": {
            "tiny-sd": {"path": "results/models/tiny-sd", "tiny": {"seed": 0}, **model}
        },
        "runs": {"r1": {"dataset": "mine", "base_model": "tiny-sd"}},
    }


def test_schema_default_and_tiny_models_take_it(tmp_path):
    vae = vae_folder(tmp_path / "my-vae")
    cfg = load_config(config(tmp_path, vae=str(vae)), workdir=tmp_path)
    assert cfg["base_models"]["tiny-sd"]["vae"] == str(vae)
    plain = load_config(config(tmp_path), workdir=tmp_path)
    assert plain["base_models"]["tiny-sd"]["vae"] is None
    with pytest.raises(ConfigError, match=r"base_models\.tiny-sd\.vae"):
        load_config(config(tmp_path, vae=""), workdir=tmp_path, check_files=False)


def test_home_folder_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    vae_folder(tmp_path / "vaes" / "fix")
    cfg = load_config(config(tmp_path, vae="~/vaes/fix"), workdir=tmp_path)
    assert cfg["base_models"]["tiny-sd"]["vae"] == str(tmp_path / "vaes" / "fix")


def test_relative_path_resolves_against_the_workdir(tmp_path):
    vae_folder(tmp_path / "vaes" / "fix")
    load_config(config(tmp_path, vae="vaes/fix"), workdir=tmp_path)  # found from the workdir
    with pytest.raises(ConfigError, match=r"base_models\.tiny-sd\.vae: vae override not found"):
        load_config(config(tmp_path, vae="vaes/fix"), workdir=tmp_path / "mine")


def test_missing_folder_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(config(tmp_path, vae=str(tmp_path / "nope")), workdir=tmp_path)
    assert "base_models.tiny-sd.vae: vae override not found" in str(e.value)
    no_config = tmp_path / "empty-vae"
    no_config.mkdir()
    with pytest.raises(ConfigError, match=r"base_models\.tiny-sd\.vae: .*no config\.json"):
        load_config(config(tmp_path, vae=str(no_config)), workdir=tmp_path)


def test_check_config_command_names_the_key(tmp_path, capsys):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump(config(tmp_path, vae="nope")))
    assert main(["check-config", str(cfg), "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "base_models.tiny-sd.vae: vae override not found" in err and "\n" not in err
    vae_folder(tmp_path / "nope")
    assert main(["check-config", str(cfg), "--workdir", str(tmp_path)]) == 0


def test_planner_reads_the_override_instead_of_the_models_vae(tmp_path):
    vae = vae_folder(tmp_path / "my-vae")
    write(vae / "sub" / "notes.txt")
    plan = Planner(load_config(config(tmp_path, vae=str(vae)), workdir=tmp_path))
    assert plan.vae("tiny-sd") == str(vae)
    files = ("config.json", "diffusion_pytorch_model.safetensors", "sub/notes.txt")
    assert plan.vae_files("tiny-sd") == [str(vae / f) for f in files]
    assert plan.read_parts("tiny-sd", plan.latent_parts("tiny-sd")) == ("text_encoder", "tokenizer")
    assert "vae" not in plan.read_parts("tiny-sd") and "unet" in plan.read_parts("tiny-sd")
    # what the tiny model's rule writes is still the whole model, its own VAE included
    assert any("/vae/" in f for f in plan.model_files("tiny-sd"))
    assert not any("/vae/" in f for f in plan.model_files("tiny-sd", plan.read_parts("tiny-sd")))


def test_planner_override_as_a_model_folder_and_none(tmp_path):
    other = tmp_path / "other-model"
    vae_folder(other / "vae")
    write(other / "unet" / "config.json")
    plan = Planner(load_config(config(tmp_path, vae=str(other)), workdir=tmp_path))
    assert plan.vae_files("tiny-sd") == [
        str(other / "vae" / f) for f in ("config.json", "diffusion_pytorch_model.safetensors")
    ]
    plain = Planner(load_config(config(tmp_path), workdir=tmp_path))
    assert plain.vae("tiny-sd") is None and plain.vae_files("tiny-sd") == []
    assert plain.read_parts("tiny-sd") == plain.model_parts("tiny-sd")


def test_run_context_records_the_override(tmp_path):
    vae = vae_folder(tmp_path / "my-vae")
    plan = Planner(load_config(copy.deepcopy(config(tmp_path, vae=str(vae))), workdir=tmp_path))
    assert plan.run_context("r1", {})["base_model"]["vae"] == str(vae)
    assert os.path.isabs(plan.vae("tiny-sd"))


def test_run_doc_fingerprint_and_mlflow_params_carry_the_vae_digest(tmp_path):
    from lorapipe.fingerprint import tree_digest
    from lorapipe.runs import (
        file_metadata,
        read_run_config,
        run_params,
        run_tags,
        write_run_config,
    )

    vae = vae_folder(tmp_path / "my-vae")
    model = write(tmp_path / "model" / "unet" / "config.json").parent.parent
    manifest = write(tmp_path / "manifest.jsonl", b"{}\n")
    context = {
        "dataset": {"name": "mine", "resolution": 64, "buckets": False},
        "base_model": {"name": "m", "path": str(model), "vae": str(vae)},
        "libraries": {},
    }
    out = tmp_path / "config.yaml"
    fp = write_run_config({"name": "r1"}, context, "code", manifest, model, out, vae=str(vae))
    doc = read_run_config(out, context=True)
    assert doc["fingerprints"]["vae"] == tree_digest(vae) == doc["base_model"]["vae_sha256"]
    assert run_params(doc)["base_model"]["vae_sha256"] == tree_digest(vae)
    assert run_tags(doc)["lorapipe.vae_hash"] == tree_digest(vae)
    assert file_metadata(doc, architecture={})["ss_vae_name"] == "my-vae"  # exported files
    write(vae / "diffusion_pytorch_model.safetensors", b"other weights")
    fp2 = write_run_config({"name": "r1"}, context, "code", manifest, model, out, vae=str(vae))
    assert fp2 != fp  # new VAE weights: another run (never resumes the old checkpoints)
    plain = {**context, "base_model": {"name": "m", "path": str(model), "vae": None}}
    write_run_config({"name": "r1"}, plain, "code", manifest, model, out)
    doc = read_run_config(out, context=True)
    assert "vae" not in doc["fingerprints"]
    assert "ss_vae_name" not in file_metadata(doc, architecture={})
