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
    # the Snakemake plugins jobs need on a cluster or with object storage (cluster extras)
    for r in project["optional-dependencies"]["cluster"]:
        name, spec = _split(r)
        if name.startswith("snakemake-"):
            wanted[name] = spec
    for name, spec in wanted.items():
        conda = CONDA_NAMES.get(name, name)
        assert conda in env, f"envs/lorapipe.yaml lacks {conda} ({name}{spec} in pyproject.toml)"
        assert env[conda] == spec, f"{conda}: {env[conda]} in envs/, {spec} in pyproject.toml"
    assert "python" in env


def test_the_tests_get_the_plugins_the_cluster_extras_pin():
    """tools/bootstrap.sh installs pyproject's cluster extras, and the jobstep plugin the SLURM
    one runs jobs with, apart for the tests (TEST_PLUGINS): the same pins."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    cluster = dict(_split(r) for r in project["optional-dependencies"]["cluster"])
    line = re.search(r'^TEST_PLUGINS="([^"]*)"', (REPO / "tools" / "bootstrap.sh").read_text(),
                     re.M)  # fmt: skip
    assert line, "tools/bootstrap.sh: no TEST_PLUGINS line"
    pins = dict(_split(r) for r in line.group(1).split())
    assert {k: pins.get(k) for k in cluster} == cluster
    assert set(pins) - set(cluster) == {"snakemake-executor-plugin-slurm-jobstep"}
