"""tracking: config flattening, metrics.jsonl reading; mlflow_store: URI precedence (no MLflow
needed), the sqlite store created atomically (real MLflow, a real kill -9 while it is being
created)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorapipe.mlflow_store import ensure_sqlite_store, sqlite_file, tracking_uri
from lorapipe.tracking import _key, flatten, read_metrics


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


def test_sqlite_file():
    assert sqlite_file("sqlite:////abs/mlflow.db") == Path("/abs/mlflow.db")
    assert sqlite_file("sqlite:///rel/mlflow.db?timeout=5") == Path("rel/mlflow.db")
    assert sqlite_file("sqlite:///:memory:") is None
    assert sqlite_file("http://127.0.0.1:5000") is None
    assert sqlite_file("postgresql://u@h/db") is None


def creations(db: Path) -> list[Path]:
    return sorted(db.parent.glob(f".{db.name}.*.creating*"))


def use_store(uri: str) -> str:
    """Create an experiment and a run with a metric: what the track rule needs of a store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("after-kill"), run_name="r")
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    return client.get_run(run.info.run_id).info.run_name


def test_store_killed_while_being_created_leaves_nothing_that_breaks_the_next_run(
    tmp_path, monkeypatch
):
    """kill -9 while MLflow migrates a new store (which, done in place, leaves a half-migrated
    mlflow.db every later job fails on): no mlflow.db appears, only a temporary one, and the next
    call removes that leftover and creates a complete store that works."""
    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))  # no template: MLflow migrates
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    code = f"from lorapipe.mlflow_store import ensure_sqlite_store; ensure_sqlite_store({uri!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size > 0 for p in creations(db) if p.exists()):
            assert proc.poll() is None, "the creating process ended before it was killed"
            assert time.monotonic() < deadline, "no temporary store appeared"
            time.sleep(0.01)
        time.sleep(0.3)  # well inside the migrations (seconds), before the link
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not db.exists(), "a store killed midway must not be visible under its final name"
    left = creations(db)
    assert left, "the kill landed after the store was complete: nothing tested"

    assert ensure_sqlite_store(uri) is True
    assert creations(db) == [], "the dead process's temporary store is removed"
    assert use_store(uri) == "r"
    inode = db.stat().st_ino
    assert ensure_sqlite_store(uri) is False and db.stat().st_ino == inode  # used as it is


def test_leftover_temporary_stores_are_removed_only_when_dead_or_old(tmp_path):
    db = tmp_path / "mlflow.db"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    host = socket.gethostname()
    mine_dead = tmp_path / f".mlflow.db.{host}-{dead}.creating"
    journal = tmp_path / f".mlflow.db.{host}-{dead}.creating-journal"
    alive = tmp_path / f".mlflow.db.{host}-{os.getppid()}.creating"  # pytest's parent lives
    other_new = tmp_path / ".mlflow.db.node17-4242.creating"  # another host: by age only
    other_old = tmp_path / ".mlflow.db.node18-4242.creating"
    for p in (mine_dead, journal, alive, other_new, other_old):
        p.write_bytes(b"half a store")
    os.utime(other_old, (time.time() - 7200, time.time() - 7200))
    assert ensure_sqlite_store(f"sqlite:///{db}") is True
    assert creations(db) == sorted([alive, other_new])
    assert use_store(f"sqlite:///{db}") == "r"


def test_an_empty_store_file_is_replaced_and_other_stores_are_left_alone(tmp_path):
    db = tmp_path / "sub" / "mlflow.db"
    db.parent.mkdir()
    db.touch()
    assert ensure_sqlite_store(f"sqlite:///{db}") is True and db.stat().st_size > 0
    assert ensure_sqlite_store("http://127.0.0.1:9") is False


def _tables(db) -> dict:
    """The schema and every table's rows, the Default experiment's times left out. A statement's
    clauses are compared as a set: MLflow's own stores list a table's CHECK constraints in an
    order that changes from process to process (its migrations rebuild the tables)."""
    import sqlite3

    con = sqlite3.connect(db)
    try:
        out = {"schema": sorted(
            (kind, name, sorted(line.strip().rstrip(",") for line in (sql or "").split("\n")))
            for kind, name, sql in con.execute("SELECT type, name, sql FROM sqlite_master")
        )}  # fmt: skip
        for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            rows = con.execute(f'SELECT * FROM "{name}"').fetchall()
            if name == "experiments":
                rows = [r[:4] + r[6:] for r in rows]  # creation_time, last_update_time
            out[name] = sorted(map(repr, rows))
        return out
    finally:
        con.close()


def test_a_new_store_is_a_copy_of_the_template_and_the_same_as_mlflows_own(
    tmp_path, monkeypatch
):
    """The first store made with this MLflow is kept as a template (#17); a later one, in
    another folder, is a copy made without importing MLflow, and it is table for table what
    MLflow itself creates there (its Default experiment's artifact location follows the
    folder), and it works."""
    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert ensure_sqlite_store("sqlite:///mlflow.db") is True
    assert list((tmp_path / "cache" / "mlflow-store").glob("*.db"))
    code = (
        "import sys; from lorapipe.mlflow_store import ensure_sqlite_store; "
        "assert ensure_sqlite_store('sqlite:///mlflow.db'); "
        "assert 'mlflow' not in sys.modules, 'the copy imported MLflow'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "b", check=True)
    # MLflow's own store in a folder like b's: made without a template.
    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "other-cache"))
    monkeypatch.chdir(tmp_path / "c")
    assert ensure_sqlite_store("sqlite:///mlflow.db") is True
    copied, direct = _tables(tmp_path / "b" / "mlflow.db"), _tables(tmp_path / "c" / "mlflow.db")
    assert copied["experiments"] == [
        e.replace(str(tmp_path / "c"), str(tmp_path / "b")) for e in direct["experiments"]
    ]
    assert str(tmp_path / "b" / "mlruns" / "0") in copied["experiments"][0]
    assert {k: v for k, v in copied.items() if k != "experiments"} == {
        k: v for k, v in direct.items() if k != "experiments"
    }
    assert use_store(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}") == "r"


def test_a_broken_template_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert ensure_sqlite_store(f"sqlite:///{tmp_path / 'one.db'}") is True
    for t in (tmp_path / "cache" / "mlflow-store").glob("*.db"):
        t.write_bytes(b"not a database")
    assert ensure_sqlite_store(f"sqlite:///{tmp_path / 'two.db'}") is True
    assert use_store(f"sqlite:///{tmp_path / 'two.db'}") == "r"
    assert not list(tmp_path.glob(".two.db.*"))
