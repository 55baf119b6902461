"""tracking: URI precedence, config flattening, metrics.jsonl reading (no MLflow needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lorapipe.tracking import _key, flatten, read_metrics, tracking_uri


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking_uri("http://configured:5000", tmp_path) == "http://configured:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking_uri("http://configured:5000", tmp_path) == "http://env:5000"
    assert tracking_uri(None, tmp_path) == "http://env:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # empty means unset
    assert tracking_uri("http://configured:5000", tmp_path) == "http://configured:5000"


def test_default_uri_is_absolute(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking_uri(None)
    assert uri.startswith("sqlite:////") and Path(uri.removeprefix("sqlite:///")).is_absolute()


def test_flatten():
    cfg = {
        "run": {"name": "demo", "lora_rank": 4, "lora_alpha": 8.0, "targets": ["to_q", "to_k"]},
        "dataset": {"buckets": True, "synthetic": {"seed": 0}, "max": None},
        "top": (1, 2),
    }
    assert flatten(cfg) == {
        "run.name": "demo",
        "run.lora_rank": "4",
        "run.lora_alpha": "8.0",
        "run.targets": '["to_q", "to_k"]',
        "dataset.buckets": "True",
        "dataset.synthetic.seed": "0",
        "dataset.max": "None",
        "top": "[1, 2]",
    }
    assert flatten({}) == {}


def test_keys_are_made_valid():
    assert _key("run.lora_rank") == "run.lora_rank"
    assert _key("datasets.my@set+v2") == "datasets.my_set_v2"
    assert len(_key("k" * 400)) == 250


def write(tmp_path: Path, lines: list) -> Path:
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


def test_read_metrics(tmp_path):
    p = write(tmp_path, [
        {"step": 1, "epoch": 1, "loss": 0.5, "lr": 1e-3, "skipped": False, "time": 100.5},
        "",
        {"step": 2, "epoch": 1, "loss": float("nan"), "lr": 1e-3, "skipped": True, "time": 101},
        {"step": 3, "loss": float("inf"), "note": "x", "flag": True, "time": None},
        {"step": 1, "epoch": 1, "loss": 0.25, "lr": 1e-3, "time": 102},  # a step again: last wins
    ])  # fmt: skip
    points, nonfinite = read_metrics(p)
    assert nonfinite == 2
    assert set(points) == {
        ("epoch", 1), ("loss", 1), ("lr", 1), ("epoch", 2), ("loss", 2), ("lr", 2), ("loss", 3)
    }  # fmt: skip
    assert points[("loss", 1)] == (0.25, 102_000)
    assert math.isnan(points[("loss", 2)][0]) and points[("loss", 2)][1] == 101_000
    value, ts = points[("loss", 3)]
    assert math.isnan(value) and ts > 1_700_000_000_000  # no time: now, not 1970


def test_read_metrics_names_a_bad_line(tmp_path):
    p = write(tmp_path, [{"step": 1, "loss": 1.0}, {"loss": 2.0}])
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(p)
