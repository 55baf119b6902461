"""log_run against a real `mlflow server` (sqlite store, proxied artifacts), checked over REST."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from lorapipe.tracking import log_run

pytestmark = pytest.mark.slow

FP = "ab" * 32
CONFIG = {
    "run": {"name": "demo", "lora_rank": 4, "lora_alpha": 8.0, "target_modules": ["to_q", "to_k"]},
    "dataset": {"resolution": 64, "buckets": True},
    "base_model": {"path": "results/models/tiny-sd"},
}
T0 = 1_760_000_000.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base: str, path: str, **query) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server --workers 1` on a free port; SIGTERM (then its own group) on teardown."""
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # Tracking only: no job runner / huey consumers (they add processes and ~12 s to shutdown).
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = [
        str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
        "--artifacts-destination", str(d / "artifacts"),
    ]  # fmt: skip
    log = open(d / "server.log", "wb")  # noqa: SIM115 (closed in teardown)
    proc = subprocess.Popen(
        cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        import mlflow  # noqa: F401  (warm the client import while the server starts)

        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited {proc.returncode}: {log_tail(d)}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 90 s: {log_tail(d)}")
            time.sleep(0.5)
        yield {"base": base, "dir": d}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: the server and its workers
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # any worker that outlived the parent
        log.close()


def log_tail(d: Path) -> str:
    return (d / "server.log").read_text(errors="replace")[-2000:]


def metrics_line(i: int, loss: float | None = None) -> str:
    m = {
        "step": i, "epoch": 1, "loss": 1.0 / i if loss is None else loss, "lr": 1e-3 * i,
        "images_per_s": 10.0 + i, "data_wait": 0.01, "skipped": False, "time": T0 + i,
    }  # fmt: skip
    return json.dumps(m) + "\n"


def call(server, tmp: Path, lines: int, fp: str = FP, extra: str = "") -> str:
    metrics = tmp / "metrics.jsonl"
    metrics.write_text("".join(metrics_line(i) for i in range(1, lines + 1)) + extra)
    (tmp / "config.yaml").write_text("run: demo\n")
    (tmp / "notes.txt").write_text("hello\n")
    return log_run(
        run_name="demo",
        experiment="lorapipe-test",
        uri=server["base"],
        config=CONFIG,
        metrics_jsonl=metrics,
        artifacts=[str(tmp / "config.yaml"), str(tmp / "notes.txt"), str(tmp / "missing.png")],
        tags={"lorapipe.fingerprint": fp, "lorapipe.git_commit": "abc123"},
        out_json=tmp / "mlflow.json",
    )


def history(server, run_id: str, key: str) -> list[dict]:
    got = get(server["base"], "metrics/get-history", run_id=run_id, metric_key=key)
    return sorted(got.get("metrics", []), key=lambda m: m["step"])


def test_log_run_then_reuse(server, tmp_path):
    run_id = call(server, tmp_path, 5)
    assert json.loads((tmp_path / "mlflow.json").read_text())["run_id"] == run_id

    run = get(server["base"], "runs/get", run_id=run_id)["run"]
    assert run["info"]["run_name"] == "demo"
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["run.lora_rank"] == "4"
    assert params["run.lora_alpha"] == "8.0"
    assert json.loads(params["run.target_modules"]) == ["to_q", "to_k"]
    assert params["dataset.buckets"] == "True"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["lorapipe.fingerprint"] == FP
    assert tags["lorapipe.git_commit"] == "abc123"

    loss = history(server, run_id, "loss")
    assert [m["step"] for m in loss] == [1, 2, 3, 4, 5]
    assert [m["value"] for m in loss] == pytest.approx([1.0 / i for i in range(1, 6)])
    assert [m["timestamp"] for m in loss] == [int((T0 + i) * 1000) for i in range(1, 6)]
    assert [m["step"] for m in history(server, run_id, "lr")] == [1, 2, 3, 4, 5]
    assert history(server, run_id, "skipped") == []  # not a metric

    files = get(server["base"], "artifacts/list", run_id=run_id).get("files", [])
    assert sorted(f["path"] for f in files) == ["config.yaml", "notes.txt"]

    # Same fingerprint, one more line (a resumed run): same MLflow run, no duplicate points.
    assert call(server, tmp_path, 6) == run_id
    loss = history(server, run_id, "loss")
    assert [m["step"] for m in loss] == [1, 2, 3, 4, 5, 6]
    assert loss[-1]["value"] == pytest.approx(1.0 / 6)
    assert len(history(server, run_id, "images_per_s")) == 6
    run = get(server["base"], "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert len(run["data"]["params"]) == len(params)


def test_nonfinite_loss_is_logged_as_nan(server, tmp_path):
    bad = metrics_line(3, loss=math.nan) + metrics_line(4, loss=math.inf)
    run_id = call(server, tmp_path, 2, fp="cd" * 32, extra=bad)
    (tmp_path / "other").mkdir()
    assert run_id != call(server, tmp_path / "other", 0, fp="ef" * 32)  # another fingerprint
    loss = history(server, run_id, "loss")
    assert [m["step"] for m in loss] == [1, 2, 3, 4]
    assert [m["value"] for m in loss[2:]] == ["NaN", "NaN"]  # not clamped to 1.8e308
    assert get(server["base"], "runs/get", run_id=run_id)["run"]["info"]["status"] == "FINISHED"


def post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def test_partly_logged_run_is_completed_without_duplicates(server, tmp_path, monkeypatch):
    run_id = call(server, tmp_path, 2, fp="12" * 32)
    # An interrupted earlier attempt got loss for step 3 in, but not lr.
    point = {"key": "loss", "value": 1.0 / 3, "timestamp": int((T0 + 3) * 1000), "step": 3}
    post(server["base"], "runs/log-batch", {"run_id": run_id, "metrics": [point]})
    # A param that is not in the fingerprint changed: logged values are kept, no crash.
    monkeypatch.setitem(CONFIG, "dataset", {"resolution": 64, "buckets": False})
    assert call(server, tmp_path, 3, fp="12" * 32) == run_id
    assert [m["step"] for m in history(server, run_id, "loss")] == [1, 2, 3]
    assert [m["step"] for m in history(server, run_id, "lr")] == [1, 2, 3]
    run = get(server["base"], "runs/get", run_id=run_id)["run"]
    assert {p["key"]: p["value"] for p in run["data"]["params"]}["dataset.buckets"] == "True"
    assert run["info"]["status"] == "FINISHED"


def test_live_tracker_over_http_then_log_run_completes_it(server, tmp_path):
    """The train stage's live metrics over REST; the track rule then finds that run and adds only
    what is missing."""
    from lorapipe.live_tracking import LiveTracker

    fp = "34" * 32
    t = LiveTracker(server["base"], "lorapipe-test", "demo", fp, params=CONFIG, every_s=0.2)
    t.start()
    for i in range(1, 4):
        t.log(json.loads(metrics_line(i)))
    assert t.flush(30)
    run_id = t.run_id
    assert [m["step"] for m in history(server, run_id, "loss")] == [1, 2, 3]
    assert get(server["base"], "runs/get", run_id=run_id)["run"]["info"]["status"] == "RUNNING"
    assert t.close("FINISHED") == run_id
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    # metrics.jsonl has two steps the live tracker never sent (e.g. a lost connection)
    assert call(server, tmp_path, 5, fp=fp) == run_id
    assert [m["step"] for m in history(server, run_id, "loss")] == [1, 2, 3, 4, 5]
    run = get(server["base"], "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert {p["key"]: p["value"] for p in run["data"]["params"]}["run.lora_rank"] == "4"
