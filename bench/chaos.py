"""Chaos run: kill -9 the whole Snakemake run at seeded points across stages, recover, compare.

    python bench/chaos.py --points 20 --seed 0          # ~3 kill points per full pipeline run
    python bench/chaos.py --points 6 --per-round 3 --images 12 --shards 3 --keep

First a clean run (the reference); then rounds, each a fresh workflow folder driven to completion
through ``--per-round`` kill points, taken in pipeline order. A kill point is a rule (drawn from
those the clean run ran) and a delay (from 0 to that rule's longest clean job, +0.5 s): once a job
of the rule runs, after the delay, the whole process group is SIGKILLed (Snakemake and every
job). A point whose rule has nothing left to run in that invocation is counted as missed.
Recovery is the documented one (README, "When things go wrong"):

    snakemake --unlock
    snakemake --cores 2 --rerun-incomplete

A round passes when a plain rerun right after its first kill is refused (LockException, or
IncompleteFilesException when a killed job's outputs are marked incomplete), its last invocation
exits 0, every compared output has the clean run's sha256, no temporary file is left outside
results/checkpoints/, and a dry run then has nothing to do.
Compared: every file under results/ except checkpoints/, cache/scan/ (stamps hold mtimes) and a
run's mlflow.json, metrics.jsonl and train_summary.json (MLflow run ids, timings); captions jsonl
without their "source" field (a rebuilt one says "cache" where the first said "template"), and a
run's safetensors without the lorapipe_mlflow_run_id metadata (a new MLflow store, a new run id);
files whose raw bytes differ are listed too ("differ_raw"). Results go to bench/out/chaos.json;
the exit status is 1 if any round failed.

The functions here are also used by tests/integration/test_faults.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# One copy of the workflow-copying helpers: the integration tests' (tests/integration/wf.py).
sys.path.insert(0, str(REPO / "tests" / "integration"))
from wf import COPY, SNAKEMAKE, copy_workflow, small_config  # noqa: E402, F401

EXCLUDE = (
    re.compile(r"^results/checkpoints/"),
    re.compile(r"^results/cache/scan/"),
    re.compile(r"^results/runs/[^/]+/(mlflow\.json|metrics\.jsonl|train_summary\.json)$"),
    re.compile(r"\.damaged$"),
    re.compile(r"\.tmp$"),
    re.compile(r"^results/[^/]+/captions/\d+\.jsonl\.sha256$"),  # see CAPTIONS
)
# A captions jsonl records each caption's source, and a rebuilt one says "cache" where the first
# said "template": compared without that field (the captions themselves must be identical).
CAPTIONS = re.compile(r"^results/[^/]+/captions/\d+\.jsonl$")
JOB_START = re.compile(r"^(?:local)?rule (\S+):$")
JOB_DONE = re.compile(r"^Finished jobid: (\d+) \(Rule: (\S+)\)")


def config(images_shards: int = 3) -> dict:
    """A one-run workflow config on the tiny model, like the integration tests'."""
    return small_config("chaos", shards=images_shards)


def make_workdir(work: Path, data: Path, cfg: dict) -> Path:
    """A workflow folder with a copy of ``data`` (same bytes and mtimes) and ``cfg``."""
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    shutil.copytree(data, work / "data" / "mine")
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return work


def make_data(dest: Path, images: int = 12, seed: int = 3) -> Path:
    sys.path.insert(0, str(REPO / "src"))
    from lorapipe.demo import make_demo_dataset

    make_demo_dataset(dest, images=images, seed=seed)
    return dest


def command(code: Path, work: Path, *args: str) -> list[str]:
    return [
        SNAKEMAKE,
        "--snakefile",
        str(code / "Snakefile"),
        "--directory",
        str(work),
        "--configfile",
        str(work / "cfg.yaml"),
        "--cores",
        "2",
        *args,
    ]


def environment(work: Path) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    env.pop("PYTHONPATH", None)
    return env


@dataclass
class Run:
    """A Snakemake invocation in its own process group, its output read line by line."""

    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    started: list[tuple[float, str]] = field(default_factory=list)  # (time, rule)
    finished: list[tuple[float, str]] = field(default_factory=list)
    planned: dict[str, int] | None = None  # Snakemake's "Job stats" table, once printed
    t0: float = field(default_factory=time.monotonic)
    changed: threading.Condition = field(default_factory=threading.Condition)
    reader: threading.Thread | None = None

    def _read(self) -> None:
        stats: dict[str, int] | None = None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            now = time.monotonic() - self.t0
            with self.changed:
                self.lines.append(line)
                if m := JOB_START.match(line):
                    self.started.append((now, m.group(1)))
                elif m := JOB_DONE.match(line):
                    self.finished.append((now, m.group(2)))
                elif line == "Job stats:" and self.planned is None:
                    stats = {}
                elif stats is not None:
                    parts = line.split()
                    if parts and parts[0] == "total":
                        self.planned, stats = stats, None
                    elif len(parts) == 2 and parts[1].isdigit():
                        stats[parts[0]] = int(parts[1])
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def _count(self, rule: str) -> tuple[int, int]:
        return (sum(r == rule for _, r in self.started), sum(r == rule for _, r in self.finished))

    def running(self) -> list[str]:
        """Rules of the jobs started but not finished (by count per rule)."""
        rules = {r for _, r in self.started}
        return sorted(r for r in rules for _ in range(self._count(r)[0] - self._count(r)[1]))

    def wait_for_rule(self, rule: str | None, timeout: float) -> bool:
        """Block until a job of ``rule`` (any job: None) is running (True), or until it cannot
        be: the rule has no job left to run in this invocation, the run ended, the time is out
        (False)."""
        end = time.monotonic() + timeout
        with self.changed:
            while True:
                if rule is None:
                    if self.started:
                        return True
                else:
                    n_started, n_done = self._count(rule)
                    if n_started > n_done:
                        return True
                    if self.planned is not None and n_started >= self.planned.get(rule, 0):
                        return False  # none planned, or all done already
                left = end - time.monotonic()
                if left <= 0 or not self.reader.is_alive():  # timed out, or the run ended
                    return False
                self.changed.wait(min(left, 0.5))

    def kill(self) -> None:
        """SIGKILL the whole process group: Snakemake and every job it started."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait()

    def wait(self, timeout: float | None = None) -> int:
        rc = self.proc.wait(timeout)
        self.reader.join(timeout=10)
        return rc


def start(code: Path, work: Path, *args: str) -> Run:
    proc = subprocess.Popen(
        command(code, work, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment(work),
        start_new_session=True,
    )
    run = Run(proc)
    run.reader = threading.Thread(target=run._read, daemon=True)
    run.reader.start()
    return run


def snakemake(code: Path, work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(code, work, *args), capture_output=True, text=True, env=environment(work)
    )


# Metadata of an exported LoRA that a retrained run legitimately writes anew: the MLflow run id,
# the training session's times (kohya's and ModelSpec's) and sd-scripts' legacy hash, which
# covers a slice of the file's bytes, header included.
VOLATILE_METADATA = ("lorapipe_mlflow_run_id", "ss_training_started_at",
                     "ss_training_finished_at", "modelspec.date", "sshs_legacy_hash")  # fmt: skip


def _without_run_id(data: bytes) -> bytes:
    """A safetensors file without its `VOLATILE_METADATA` (tensors untouched)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    for key in VOLATILE_METADATA:
        header.get("__metadata__", {}).pop(key, None)
    return json.dumps(header, sort_keys=True).encode() + data[8 + n :]


def output_hashes(work: Path, raw: bool = False) -> dict[str, str]:
    """sha256 of every compared file under ``work/results`` (see EXCLUDE).

    Unless ``raw``: captions jsonl without their "source" field (see CAPTIONS), and a run's
    safetensors without the ``lorapipe_mlflow_run_id`` metadata train.py writes into them (a new
    MLflow store gives a new run id: the only bytes that differ between clean runs in two
    folders).
    """
    out = {}
    for p in sorted((work / "results").rglob("*")):
        rel = p.relative_to(work).as_posix()
        if not p.is_file() or any(x.search(rel) for x in EXCLUDE):
            continue
        data = p.read_bytes()
        if raw:
            pass
        elif CAPTIONS.search(rel):
            rows = [json.loads(x) for x in data.splitlines() if x.strip()]
            data = json.dumps(
                [{k: v for k, v in r.items() if k != "source"} for r in rows], sort_keys=True
            ).encode()
        elif rel.startswith("results/runs/") and rel.endswith(".safetensors"):
            data = _without_run_id(data)
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def leftover_temps(work: Path) -> list[str]:
    """Temporary files of atomic writes left anywhere under results/, and temporary MLflow
    stores (tracking.ensure_sqlite_store) left beside mlflow.db."""
    temps = [*(work / "results").rglob("*.tmp"), *work.glob(".mlflow.db.*.creating*")]
    return sorted(p.relative_to(work).as_posix() for p in temps)


def finish_clean(run: Run, work: Path) -> dict:
    """Wait for an uninterrupted run; its hashes, job durations per rule and rule order."""
    rc = run.wait()
    if rc != 0:
        raise RuntimeError(f"clean run failed ({rc}):\n{run.output[-6000:]}")
    durations: dict[str, list[float]] = {}
    pending: dict[str, list[float]] = {}
    for t, r in run.started:
        pending.setdefault(r, []).append(t)
    for t, r in run.finished:
        durations.setdefault(r, []).append(t - pending[r].pop(0))
    return {
        "seconds": time.monotonic() - run.t0,
        "hashes": output_hashes(work),
        "raw_hashes": output_hashes(work, raw=True),
        "durations": durations,
        "order": list(dict.fromkeys(r for _, r in run.started)),
    }


def clean_run(code: Path, work: Path) -> dict:
    """The reference: one uninterrupted run (see :func:`finish_clean`)."""
    return finish_clean(start(code, work), work)


@dataclass
class Point:
    rule: str
    delay: float


def draw_points(
    n: int, seed: int, clean: dict, spread: bool = False, exclude: tuple[str, ...] = ()
) -> list[Point]:
    """``n`` kill points: a rule the clean run ran (not the no-op ``all``) and a delay from 0 to
    that rule's longest clean job duration (+0.5 s, to land just after it too; for the last rule
    at most 0.6 of it, since Snakemake exits right after its last job).

    Rules (less ``exclude``) are drawn uniformly; with ``spread``, one from each of ``n``
    consecutive slices of the pipeline order (early, middle and late stages for n = 3).
    """
    rng = random.Random(seed)
    rules = [r for r in clean["order"] if r != "all" and r not in exclude]
    if spread:
        cuts = [round(i * len(rules) / n) for i in range(n + 1)]
        picks = [
            rng.choice(rules[a:b] or rules[max(a - 1, 0) : a + 1])
            for a, b in zip(cuts, cuts[1:], strict=False)
        ]
    else:
        picks = [rng.choice(rules) for _ in range(n)]
    last = [r for r in clean["order"] if r != "all"][-1]

    def delay(rule: str) -> float:
        longest = max(clean["durations"][rule])
        # After the last job Snakemake exits at once (#17): "just after it" would be after the run
        return rng.uniform(0, 0.6 * longest) if rule == last else rng.uniform(0, longest + 0.5)

    return [Point(rule, round(delay(rule), 2)) for rule in picks]


def chaos_round(
    code: Path, work: Path, points: list[Point], clean: dict, rule_timeout: float = 600
) -> dict:
    """Drive a fresh workflow folder to completion through ``points`` (in pipeline order)."""
    order = {r: i for i, r in enumerate(clean["order"])}
    points = sorted(points, key=lambda p: order[p.rule])
    report: dict = {"kills": [], "missed": [], "refused_with": None}
    run = start(code, work)
    for pt in points:
        if not run.wait_for_rule(pt.rule, rule_timeout):  # nothing of it left to run: skip
            report["missed"].append({"rule": pt.rule, "delay": pt.delay})
            continue
        time.sleep(pt.delay)
        running = run.running()
        if run.proc.poll() is not None:  # it finished during the delay: nothing to kill
            report["missed"].append({"rule": pt.rule, "delay": pt.delay})
            continue
        run.kill()
        t = round(time.monotonic() - run.t0, 1)
        report["kills"].append({"rule": pt.rule, "delay": pt.delay, "running": running, "t": t})
        if len(report["kills"]) == 1:  # a plain rerun is refused (the lock, incomplete files)
            again = snakemake(code, work)
            text = again.stdout + again.stderr
            found = re.findall(r"(LockException|IncompleteFilesException)", text)
            report["refused_with"] = found[0] if again.returncode != 0 and found else None
        unlock = snakemake(code, work, "--unlock")
        if unlock.returncode != 0:
            report.update(final_rc=unlock.returncode, error=unlock.stderr[-4000:])
            return report
        run = start(code, work, "--rerun-incomplete")
    report["final_rc"] = run.wait()
    if report["final_rc"] != 0:
        report["error"] = run.output[-4000:]
        return report
    hashes = output_hashes(work)
    ref = clean["hashes"]
    report["differ"] = sorted(k for k in ref if hashes.get(k) != ref[k])
    raw, ref_raw = output_hashes(work, raw=True), clean.get("raw_hashes", {})
    report["differ_raw"] = sorted(k for k in ref_raw if raw.get(k) != ref_raw[k])
    report["extra"] = sorted(set(hashes) - set(ref))
    report["compared"] = len(ref)
    report["temps"] = leftover_temps(work)
    dry = snakemake(code, work, "-n")
    report["dry_run_clean"] = "Nothing to be done" in dry.stdout + dry.stderr
    return report


def round_ok(r: dict) -> bool:
    return (
        (r.get("refused_with") is not None or not r.get("kills"))
        and r.get("final_rc") == 0
        and not r.get("differ")
        and not r.get("extra")
        and not [t for t in r.get("temps", []) if not t.startswith("results/checkpoints/")]
        and r.get("dry_run_clean", False)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=20, help="kill points in all (default 20)")
    ap.add_argument("--per-round", type=int, default=3, help="kill points per pipeline run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--keep", action="store_true", help="keep the workflow folders")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "chaos.json")
    args = ap.parse_args(argv)

    base = args.workdir or Path(tempfile.mkdtemp(prefix="lorapipe-chaos-"))
    base.mkdir(parents=True, exist_ok=True)
    code = copy_workflow(base / "code")
    data = make_data(base / "data", images=args.images)
    cfg = config(args.shards)
    t0 = time.monotonic()
    print(f"clean run in {base / 'clean'} …", flush=True)
    clean = clean_run(code, make_workdir(base / "clean", data, cfg))
    print(f"  {clean['seconds']:.0f} s, {len(clean['hashes'])} outputs compared", flush=True)
    points = draw_points(args.points, args.seed, clean)
    rounds = []
    for k in range(0, len(points), args.per_round):
        chunk = points[k : k + args.per_round]
        work = make_workdir(base / f"round{k // args.per_round:02d}", data, cfg)
        t = time.monotonic()
        r = chaos_round(code, work, chunk, clean)
        r.update(seconds=round(time.monotonic() - t, 1), ok=round_ok(r))
        rounds.append(r)
        kills = ", ".join(f"{x['rule']}+{x['delay']}s" for x in r["kills"]) or "none"
        print(
            f"round {len(rounds)}: kills [{kills}] missed {len(r['missed'])} → "
            f"{'OK' if r['ok'] else 'FAILED'} ({r['seconds']:.0f} s)",
            flush=True,
        )
        if not r["ok"]:
            print(json.dumps({k: v for k, v in r.items() if k != "error"}, indent=1))
            print(r.get("error", ""))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = {
        "seed": args.seed,
        "points": len(points),
        "kills": sum(len(r["kills"]) for r in rounds),
        "missed": sum(len(r["missed"]) for r in rounds),
        "rounds": len(rounds),
        "recovered": sum(r.get("final_rc") == 0 for r in rounds),
        "identical": sum(r.get("final_rc") == 0 and not r.get("differ") for r in rounds),
        "ok": sum(r["ok"] for r in rounds),
        "refused_after_kill": sum(bool(r.get("refused_with")) for r in rounds),
        "killed_while_running": sorted(
            {job for r in rounds for x in r["kills"] for job in x["running"]}
        ),
        "clean_seconds": round(clean["seconds"], 1),
        "total_seconds": round(time.monotonic() - t0, 1),
        "outputs_compared": len(clean["hashes"]),
        "rounds_detail": [{k: v for k, v in r.items() if k != "error"} for r in rounds],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds_detail"}, indent=1))
    if not args.keep and args.workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if summary["ok"] == summary["rounds"] else 1


if __name__ == "__main__":
    sys.exit(main())
