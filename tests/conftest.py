"""Shared fixtures: a tiny seeded SD model and small generated datasets, built once per session."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
# Snakemake's SLURM and S3 plugins, which tools/bootstrap.sh installs apart from the venv (a plain
# set-up has none: Snakemake imports every installed plugin at each start, #17). Tests that need
# them run Snakemake with this folder on its path (tests/integration/wf.py, plugins=True).
TEST_PLUGINS = Path(sys.prefix) / "test-plugins"
if TEST_PLUGINS.is_dir():
    sys.path.append(str(TEST_PLUGINS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The file-hash cache (lorapipe.fingerprint.cached_sha256) of this test session, not the user's.
os.environ.setdefault("LORAPIPE_CACHE", tempfile.mkdtemp(prefix="lorapipe-test-cache-"))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _stop_warm_worker():
    """The workflows run by the tests share one warm worker (lorapipe.warm, default idle time):
    stop it when the session ends rather than leave it idling."""
    yield
    from lorapipe import warm

    warm.stop(idle_s=600.0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny SD-1.x-shaped diffusers folder, built from code with seed 0."""
    from lorapipe.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL-shaped diffusers folder, built from code with seed 0."""
    from lorapipe.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> Path:
    """16 synthetic images (plus sidecars and one truncated JPEG)."""
    from lorapipe.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("data") / "demo"
    make_demo_dataset(root, images=16, seed=0)
    return root


@pytest.fixture()
def repo() -> Path:
    return REPO


@pytest.fixture()
def loaded_parts(monkeypatch) -> list[set]:
    """The parts each ``lorapipe.models.load_parts`` call asks for, in call order (the real
    loader still runs): which model components a stage really loads."""
    import lorapipe.models

    calls: list[set] = []
    real = lorapipe.models.load_parts

    def spy(path, parts=None, original_config=None, **kw):
        calls.append(set(parts) if parts is not None else {'all'})
        return real(path, parts, original_config, **kw)

    monkeypatch.setattr(lorapipe.models, "load_parts", spy)
    return calls
