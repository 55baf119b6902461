"""The warm worker in the real workflow (#17): the same run with `warm_worker` on (the default)
and off gives the same bytes; with it on, the model stages' jobs ran in the worker (their
``times.json`` say so and the worker's log names them) and imported next to nothing; with it
off there is no worker; with `warm_worker_idle_minutes: 0` the worker exits with the run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import chaos  # noqa: E402

pytestmark = pytest.mark.slow

MODEL_RULES = ("tiny_model", "encode", "train", "sample_base", "sample")  # they wait for the worker


def job_times(work: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in sorted((work / "logs").rglob("*.times.json")):
        rule = f.relative_to(work / "logs").parts[0]
        out.setdefault(rule, []).append(json.loads(f.read_text()))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm-wf")
    code = chaos.copy_workflow(root / "code")
    data = chaos.make_data(root / "data", images=8)
    out = {}
    for name, on in (("warm", True), ("cold", False)):
        cfg = {**chaos.config(2), "warm_worker": on, "warm_worker_idle_minutes": 0}
        work = chaos.make_workdir(root / name, data, cfg)
        proc = chaos.snakemake(code, work)
        assert proc.returncode == 0, proc.stderr[-6000:]
        out[name] = work
    return out


def test_warm_and_cold_runs_give_the_same_bytes(runs):
    warm, cold = (chaos.output_hashes(runs[k]) for k in ("warm", "cold"))
    assert warm == cold
    assert any(k.endswith("r1.safetensors") for k in warm) and len(warm) > 30


def server_log(work: Path) -> Path:
    line = (work / "logs" / "warm_worker.log").read_text()
    return Path(line.rsplit("its log: ", 1)[1].strip())


def test_the_model_stages_ran_in_the_worker_and_imported_nothing_heavy(runs):
    times = job_times(runs["warm"])
    log = server_log(runs["warm"]).read_text()
    assert "preloaded all in" in log
    for rule in MODEL_RULES:
        assert times[rule] and all(t["warm"] for t in times[rule]), (rule, times.get(rule))
        assert f"job {rule}.py" in log, rule
        assert all(t["imports"] < 1.0 for t in times[rule]), (rule, times[rule])
    assert not any(t["warm"] for t in times["manifest"])  # light stages are not handed over


def test_with_warm_worker_false_every_job_imports_for_itself(runs):
    times = job_times(runs["cold"])
    assert not (runs["cold"] / "logs" / "warm_worker.log").exists()
    assert not any(t["warm"] for ts in times.values() for t in ts)
    assert all("torch" in t["heavy"] for t in times["train"])


def test_with_no_idle_time_the_worker_exits_with_the_run(runs):
    log = server_log(runs["warm"])
    deadline = time.monotonic() + 10
    while not log.read_text().rstrip().endswith("no Snakemake and no job for 0 s"):
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)
