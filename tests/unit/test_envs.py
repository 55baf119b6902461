"""envs/lorapipe.yaml (the conda environment of `--software-deployment-method conda`) pins what
pyproject.toml pins: a job run under conda computes with the library versions a local run uses."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
CONDA_NAMES = {"torch": "pytorch"}  # conda-forge's name for a PyPI distribution


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)$", req)
    assert m, req
    return m.group(1).lower(), m.group(3).replace(" ", "")


def _env() -> dict[str, str]:
    doc = yaml.safe_load((REPO / "envs" / "lorapipe.yaml").read_text())
    out = {}
    for dep in doc["dependencies"]:
        for req in dep["pip"] if isinstance(dep, dict) else [dep]:
            name, spec = _split(req.replace("=", "==", 1) if re.match(r"^[\w.-]+=[^=]", req)
                                else req)  # fmt: skip
            out[name] = spec
    return out


def test_conda_env_pins_what_pyproject_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = _env()
    wanted = dict(_split(r) for r in project["dependencies"])
    # the Snakemake plugins jobs need on a cluster or with object storage (dev extras)
    for r in project["optional-dependencies"]["dev"]:
        name, spec = _split(r)
        if name.startswith("snakemake-"):
            wanted[name] = spec
    for name, spec in wanted.items():
        conda = CONDA_NAMES.get(name, name)
        assert conda in env, f"envs/lorapipe.yaml lacks {conda} ({name}{spec} in pyproject.toml)"
        assert env[conda] == spec, f"{conda}: {env[conda]} in envs/, {spec} in pyproject.toml"
    assert "python" in env
