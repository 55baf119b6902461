"""LiveTracker and log_run against real MLflow sqlite stores (no training, no server): batching,
resume without duplicates, a store that comes back, one that never answers, dataset inputs."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from lorapipe import live_tracking, mlflow_store, tracking
from lorapipe.live_tracking import LiveTracker
from lorapipe.tracking import log_run

FP = "0f" * 32
CONFIG = {"run": {"name": "demo", "lora_rank": 4}, "dataset": {"resolution": 64}}


def record(step: int, loss: float | None = None) -> dict:
    return {
        "step": step, "epoch": 1, "loss": 1.0 / step if loss is None else loss, "lr": 1e-3,
        "images_per_s": 5.0, "data_wait": 0.1, "skipped": False, "time": 1_760_000_000.0 + step,
    }  # fmt: skip


def tracker(uri: str, **kw) -> LiveTracker:
    kw.setdefault("every_steps", 4)
    kw.setdefault("every_s", 0.2)
    return LiveTracker(uri, "live-test", "demo", FP, tags={"lorapipe.code": "c0de"},
                       params=CONFIG, **kw)  # fmt: skip


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client(uri).get_metric_history(run_id, key))


def test_metrics_arrive_while_training_and_run_ends_finished(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = tracker(uri)
    t.start()
    for i in range(1, 9):
        t.log(record(i))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # sent by the worker, before any flush or close
        if t.run_id and steps(uri, t.run_id) == list(range(1, 9)):
            break
        time.sleep(0.2)
    else:
        pytest.fail("live metrics did not arrive")
    run = client(uri).get_run(t.run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "demo"
    assert run.data.tags["lorapipe.fingerprint"] == FP and run.data.tags["lorapipe.code"] == "c0de"
    assert run.data.params["run.lora_rank"] == "4"
    t.log(record(9))
    assert t.flush(30)
    assert t.close("FINISHED") == t.run_id
    run = client(uri).get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert steps(uri, t.run_id) == list(range(1, 10))
    assert steps(uri, t.run_id, "data_wait") == list(range(1, 10))
    assert steps(uri, t.run_id, "skipped") == []  # not a metric
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # restored


def test_training_does_not_wait_for_the_store_and_the_first_export_does(tmp_path, monkeypatch):
    """start() returns while the worker still opens the run (training goes on, #17); reached()
    waits for that first attempt, after which run_id names the run the exports record."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real, gate = live_tracking.open_run, threading.Event()

    def slow_open_run(*args, **kw):
        gate.wait(10)
        return real(*args, **kw)

    monkeypatch.setattr(live_tracking, "open_run", slow_open_run)
    t = tracker(uri)
    t.start()
    t.log(record(1))
    assert t.run_id is None and not t.reached(0.2)  # still opening: step 1 went on without it
    gate.set()
    assert t.reached(10) and t.run_id is not None
    assert t.close("FINISHED") == t.run_id and steps(uri, t.run_id) == [1]


def test_resume_continues_the_run_without_duplicate_points(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = tracker(uri)
    first.start()
    for i in range(1, 8):  # logged up to step 7, then "killed" (checkpoint was at step 4)
        first.log(record(i))
    assert first.flush(30)
    run_id = first.run_id
    # A kill -9 leaves the run RUNNING; an exception marks it FAILED.
    first.close("FAILED")
    assert client(uri).get_run(run_id).info.status == "FAILED"

    second = tracker(uri)
    second.start(backlog=[record(i) for i in range(1, 5)], resumed_step=4)
    for i in range(5, 11):  # steps 5..7 are recomputed: not logged twice
        second.log(record(i))
    assert second.close("FINISHED") == run_id
    run = client(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["lorapipe.resumed_at_step"] == "4"
    assert steps(uri, run_id) == list(range(1, 11))
    assert steps(uri, run_id, "lr") == list(range(1, 11))
    assert len(client(uri).search_runs([run.info.experiment_id])) == 1


def test_store_down_then_back_gets_everything_later(tmp_path):
    # The database's folder is a file: sqlite cannot open the store, it is "down".
    db_dir = tmp_path / "not-yet"
    db_dir.write_text("")
    uri = f"sqlite:///{db_dir / 'mlflow.db'}"
    t = tracker(uri, every_s=0.1, max_backoff_s=0.2)
    t.start()
    for i in range(1, 6):
        t.log(record(i))
    deadline = time.monotonic() + 30
    while t.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert t.failures >= 1 and t.run_id is None
    db_dir.unlink()  # the store is back
    for i in range(6, 9):
        t.log(record(i))
    assert t.close("FINISHED") is not None
    assert steps(uri, t.run_id) == list(range(1, 9))
    assert client(uri).get_run(t.run_id).info.status == "FINISHED"


def test_unreachable_server_never_blocks(caplog, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    t = tracker("http://127.0.0.1:9", every_steps=1, every_s=0.05, close_timeout_s=20)
    t.start()
    began = time.monotonic()
    for i in range(1, 201):
        t.log(record(i))
    assert time.monotonic() - began < 0.5  # log() only queues
    assert t.flush(20) is False  # tried now, nothing sent
    assert t.close("FINISHED") is None
    assert time.monotonic() - began < 20
    assert "MLflow (http://127.0.0.1:9) failed" in caplog.text
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_log_run_uses_the_live_run_and_logs_the_dataset_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the store's artifact root is ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = tracker(uri)
    t.start()
    for i in range(1, 4):
        t.log(record(i))
    live_id = t.close("FINISHED")
    # An orphan run of the same fingerprint, older than none but created later: the id recorded
    # in the run's files (summary) wins over the fingerprint search.
    c = client(uri)
    exp_id = c.get_experiment_by_name("live-test").experiment_id
    c.create_run(exp_id, run_name="demo", tags={"lorapipe.fingerprint": FP})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(record(i)) + "\n" for i in range(1, 6)))
    from lorapipe.tracking import dataset_input

    ds = {"name": "demo", "path": "data/demo", "shards": 4, "resolution": 64, "buckets": True}
    digest = "ab" * 32
    kw = dict(
        run_name="demo", experiment="live-test", uri=uri, config=CONFIG, metrics_jsonl=metrics,
        artifacts=[], tags={"lorapipe.fingerprint": FP}, run_id=live_id,
        dataset=dataset_input(ds, digest, samples=40),
    )  # fmt: skip
    grids = tmp_path / "samples"  # the per-step sample grids (rule sample_steps)
    grids.mkdir()
    (grids / "step-000002.png").write_bytes(b"png")
    (grids / ".snakemake_timestamp").touch()  # Snakemake's, in every directory output
    kw["artifact_dirs"] = {"samples": str(grids)}
    assert log_run(out_json=tmp_path / "a.json", **kw) == live_id
    assert log_run(out_json=tmp_path / "b.json", **kw) == live_id  # idempotent
    assert steps(uri, live_id) == [1, 2, 3, 4, 5]
    inputs = c.get_run(live_id).inputs.dataset_inputs
    assert len(inputs) == 1
    d = inputs[0].dataset
    assert (d.name, d.digest, d.source_type) == ("demo", digest[:32], "local")
    assert json.loads(d.source)["uri"] == os.path.abspath("data/demo")
    assert json.loads(d.profile) == {"buckets": True, "resolution": 64, "samples": 40, "shards": 4}
    tags = {x.key: x.value for x in inputs[0].tags}
    assert tags == {"mlflow.data.context": "training", "lorapipe.dataset_manifest_hash": digest}
    assert Path(tmp_path / "a.json").exists()
    assert [a.path for a in c.list_artifacts(live_id, "samples")] == ["samples/step-000002.png"]


def test_log_run_and_live_tracker_open_one_run_through_open_run(tmp_path, monkeypatch):
    """Both writers open their MLflow run with `mlflow_store.open_run`, and for one fingerprint
    they end on one run, whichever comes first: the track rule of a run trained without a store
    creates it, a rerun of training continues it (found by fingerprint), the track rule again
    (no run id) finds it too. Each adds only what the run lacks."""
    monkeypatch.chdir(tmp_path)  # the store's artifact root is ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    opened: list[tuple[str, bool]] = []  # (run id, found rather than created), in call order
    real = mlflow_store.open_run

    def spy(*args, **kw):
        run = real(*args, **kw)
        opened.append((run.run_id, run.existing is not None))
        return run

    monkeypatch.setattr(tracking, "open_run", spy)
    monkeypatch.setattr(live_tracking, "open_run", spy)
    metrics = tmp_path / "metrics.jsonl"

    def track(last_step: int) -> str:
        metrics.write_text("".join(json.dumps(record(i)) + "\n" for i in range(1, last_step + 1)))
        return log_run(
            run_name="demo", experiment="live-test", uri=uri, config=CONFIG, metrics_jsonl=metrics,
            artifacts=[], tags={"lorapipe.fingerprint": FP, "lorapipe.code": "c0de"},
            out_json=tmp_path / "run.json",
        )  # fmt: skip

    run_id = track(3)
    t = tracker(uri)
    t.start(backlog=[record(i) for i in range(1, 4)], resumed_step=3)  # steps 1..3: logged
    for i in range(4, 7):
        t.log(record(i))
    assert t.close("FINISHED") == run_id
    assert track(6) == run_id
    assert opened == [(run_id, False), (run_id, True), (run_id, True)]
    c = client(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("live-test").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["lorapipe.fingerprint"] == FP
    assert run.data.tags["lorapipe.resumed_at_step"] == "3"
    assert run.data.params["run.lora_rank"] == "4"
    assert steps(uri, run_id) == list(range(1, 7))  # each step once
