"""lorapipe.jobtime: a job's phases (#17), written beside its log at exit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_phases_are_written_beside_the_log_at_exit(tmp_path):
    log = tmp_path / "job.log"
    prog = textwrap.dedent(f"""
        import time
        from lorapipe.jobtime import phase, start
        start({str(log)!r})
        import decimal, fractions  # timed as imports
        with phase("model"):
            time.sleep(0.2)
        time.sleep(0.1)
    """)
    subprocess.run([sys.executable, "-c", prog], check=True)
    rec = json.loads((tmp_path / "job.log.times.json").read_text())
    assert set(rec) == {"started", "interpreter", "imports", "model", "work", "heavy", "warm",
                        "slowest_imports", "cpu_s", "max_rss_mb"}  # fmt: skip
    assert 0 < rec["cpu_s"] < 5 and 1 < rec["max_rss_mb"] < 2000
    assert rec["warm"] is False
    assert {name for name, _ in rec["slowest_imports"]} == {"decimal", "fractions"}
    assert rec["imports"] > 0 and rec["interpreter"] >= 0
    assert 0.2 <= rec["model"] < 1.0 and 0.1 <= rec["work"] < 1.0
    assert rec["heavy"] == []
    assert not (tmp_path / "job.log").exists()  # the log is the job's own; only the json here


def test_process_start_is_when_the_process_started(tmp_path):
    """Not boot time in whole seconds plus ticks (``btime`` would put it up to 1 s early): the
    start of a process spawned now, read half a second later, is now."""
    import time

    prog = ("import time; time.sleep(0.5); from lorapipe.jobtime import process_start; "
            "print(process_start())")
    before = time.time()
    out = subprocess.run([sys.executable, "-c", prog], check=True, capture_output=True, text=True)
    started = float(out.stdout)
    assert before - 0.05 <= started <= before + 0.4, started - before


def test_a_warm_workers_job_counts_from_its_client_process():
    env = {"LORAPIPE_WARM_CHILD": "1", "LORAPIPE_JOB_START": "1234.5"}
    prog = "from lorapipe.jobtime import process_start; print(process_start())"
    import os

    out = subprocess.run([sys.executable, "-c", prog], env={**os.environ, **env}, check=True,
                         capture_output=True, text=True)  # fmt: skip
    assert float(out.stdout) == 1234.5
