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
