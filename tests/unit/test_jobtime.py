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
    assert set(rec) == {"started", "interpreter", "imports", "model", "work", "heavy"}
    assert rec["imports"] > 0 and rec["interpreter"] >= 0
    assert 0.2 <= rec["model"] < 1.0 and 0.1 <= rec["work"] < 1.0
    assert rec["heavy"] == []
    assert not (tmp_path / "job.log").exists()  # the log is the job's own; only the json here
