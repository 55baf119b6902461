"""Snakemake's main process exits when the run is over (lorapipe.snakemake_hooks, #17): a real
Snakemake run of a two-job workflow, with the hooks as the project's Snakefile uses them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

SNAKEFILE = textwrap.dedent(
    """
    import atexit, gc, json, sys, threading
    sys.path.insert(0, {src!r})
    from lorapipe.snakemake_hooks import cancel_scheduler_timers, freeze_at_exit

    # Registered before freeze_at_exit, so it runs after it (atexit is last in, first out).
    atexit.register(lambda: open("frozen.json", "w").write(json.dumps(gc.get_freeze_count())))
    freeze_at_exit()

    rule all:
        input: "b"

    rule a:
        output: "a"
        shell: "touch {{output}}"

    rule b:
        input: "a"
        output: "b"
        shell: "touch {{output}}"

    def timers():
        return [t for t in threading.enumerate()
                if isinstance(t, threading.Timer) and not t.finished.is_set()]

    onsuccess:
        pending = timers()
        cancelled = cancel_scheduler_timers()
        for t in pending:
            t.join(5)
        left = [t for t in pending if t.is_alive()]
        open("timers.json", "w").write(json.dumps(
            {{"pending": len(pending), "cancelled": cancelled, "left": len(left)}}))
    """
)


def test_the_scheduler_timers_are_cancelled_and_the_collector_frozen_at_exit(tmp_path):
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(src=str(SRC)))
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "-q"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "b").exists()
    timers = json.loads((tmp_path / "timers.json").read_text())
    # Without the cancel, these timers hold the exit for up to the rate limiter's 1 s.
    assert timers["pending"] >= 1, timers
    assert timers["cancelled"] == timers["pending"] and timers["left"] == 0, timers
    assert json.loads((tmp_path / "frozen.json").read_text()) > 10_000


PARSE_PROBE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {src!r})
    from lorapipe.snakemake_hooks import will_run_jobs_here

    if workflow.is_main_process:
        with open("probe.jsonl", "a") as f:
            f.write(json.dumps(will_run_jobs_here()) + "\\n")

    rule all:
        output: "out"
        shell: "touch {{output}}"
    """
)


def test_a_plain_local_run_is_told_apart_from_other_invocations_while_parsing(tmp_path):
    """The warm worker starts while the Snakefile is parsed only when jobs will run here: a
    plain run, not a dry run, a summary, --lint or an unlock."""
    (tmp_path / "Snakefile").write_text(PARSE_PROBE.format(src=str(SRC)))
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    for extra in (["-n"], ["--summary"], ["--lint"], ["--unlock"], ["-np"], []):
        subprocess.run(
            [sys.executable, "-m", "snakemake", "--cores", "1", "-q", *extra],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    seen = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert seen == [False, False, False, False, False, True]
    assert (tmp_path / "out").exists()


PARAMS_PROBE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {src!r})
    from lorapipe.snakemake_hooks import probe_params_without_importing

    if config.get("hook", True):
        probe_params_without_importing()
    if config.get("table"):
        import pandas as pd
        TABLE = pd.DataFrame({{"a": [1, 2]}})
    else:
        TABLE = None

    rule all:
        input: "out.json"

    rule job:
        output: "out.json"
        params: value=config.get("value", 1), table=TABLE
        script: "job.py"

    onsuccess:
        with open("main.json", "w") as f:
            json.dump(sorted(m for m in ("pandas", "polars", "numpy") if m in sys.modules), f)
    """
)
PARAMS_JOB = """
import json
table = snakemake.params.table
with open(snakemake.output[0], "w") as f:
    json.dump({"value": snakemake.params.value, "table": type(table).__name__,
               "rows": None if table is None else len(table)}, f)
"""


def test_params_are_probed_without_importing_pandas_and_still_trigger_reruns(tmp_path):
    """pandas is installed (MLflow needs it) and Snakemake imported it in every invocation to
    ask whether a params value is a DataFrame; with the hook it is not imported, a changed
    param still reruns its job and an unchanged one does not, and a Snakefile that does use
    a DataFrame param still hands it to the script."""
    import importlib.util

    assert importlib.util.find_spec("pandas") is not None  # else this test proves nothing
    (tmp_path / "Snakefile").write_text(PARAMS_PROBE.format(src=str(SRC)))
    (tmp_path / "job.py").write_text(PARAMS_JOB)
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}

    def snakemake(*config):
        (tmp_path / "main.json").unlink(missing_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "snakemake", "--cores", "1", "-q", "--config", *config],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out = json.loads((tmp_path / "out.json").read_text())
        main = (tmp_path / "main.json")
        return out, json.loads(main.read_text()) if main.exists() else None

    out, imported = snakemake("value=1")
    assert out == {"value": 1, "table": "NoneType", "rows": None}
    assert "pandas" not in imported and "polars" not in imported, imported  # (numpy: yte's)
    stamp = (tmp_path / "out.json").stat().st_mtime_ns
    snakemake("value=1")
    assert (tmp_path / "out.json").stat().st_mtime_ns == stamp  # unchanged params: nothing ran
    out, imported = snakemake("value=2")
    assert out["value"] == 2 and "pandas" not in imported  # a changed param reruns the job
    # Without the hook the same run imports pandas: what the hook saves.
    (tmp_path / "out.json").unlink()
    out, imported = snakemake("value=2", "hook=False")
    assert "pandas" in imported and out["value"] == 2
    # A Snakefile that uses pandas: its DataFrame reaches the script as a DataFrame.
    out, imported = snakemake("value=2", "table=True")
    assert out == {"value": 2, "table": "DataFrame", "rows": 2} and "pandas" in imported


def test_the_wrapped_probes_are_this_snakemakes():
    """Snakemake (pinned) still has both probes: a version that renamed them would leave the
    plan importing pandas again without failing anything else."""
    from snakemake import iocontainers, persistence  # noqa: F401

    from lorapipe.snakemake_hooks import probe_params_without_importing

    names = ["iocontainers.Snakemake._safely_store_params",
             "persistence.PersistenceBase._serialize_param"]  # fmt: skip
    assert probe_params_without_importing() == names
    assert probe_params_without_importing() == names  # idempotent
    assert getattr(iocontainers.Snakemake._safely_store_params, "_lorapipe_probe", False)
