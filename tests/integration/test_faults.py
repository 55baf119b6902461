"""Faults, with the real workflow: a second Snakemake on the same folder, kill -9 of the whole run
at seeded points across stages, and damaged cached files (flipped bytes).

The kill -9 machinery is bench/chaos.py's (the long chaos run lives there); here three kill
points, one early, one middle, one late stage, keep the file within a few minutes.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import chaos  # noqa: E402

pytestmark = pytest.mark.slow

SEED = 7
LORA = ("results/runs/r1/pytorch_lora_weights.safetensors", "results/runs/r1/r1.safetensors")
LATENTS = "results/mine/latents/tiny-sd-64-float32"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The reference run (12 images, 2 shards, one LoRA run). While it runs, a second Snakemake
    is started on the same folder; its result is kept for the lock test."""
    root = tmp_path_factory.mktemp("faults")
    code = chaos.copy_workflow(root / "code")
    data = chaos.make_data(root / "data", images=12)
    cfg = chaos.config(2)
    work = chaos.make_workdir(root / "clean", data, cfg)
    first = chaos.start(code, work)
    assert first.wait_for_rule(None, timeout=300), first.output[-4000:]
    second = chaos.snakemake(code, work)
    ref = chaos.finish_clean(first, work)
    return {"root": root, "code": code, "data": data, "cfg": cfg, "work": work, "ref": ref,
            "second": second, "first_output": first.output}


def test_second_invocation_is_refused_and_the_first_finishes(clean):
    second = clean["second"]
    text = second.stdout + second.stderr
    assert second.returncode != 0
    # Snakemake refuses it with its lock, or, when it plans while the first run's jobs are
    # writing, with those jobs' outputs as incomplete (before it tries the lock): either way it
    # starts nothing (below)
    locked = "LockException" in text and "Directory cannot be locked" in text
    assert locked or "IncompleteFilesException" in text, text[-3000:]
    assert not chaos.JOB_START.search(second.stdout), "the refused run must not start a job"
    # the first one finished (finish_clean checks its exit status) with every output in place
    ref = clean["ref"]["hashes"]
    for name in (*LORA, "results/runs/r1/samples.png", "results/mine/manifest.jsonl"):
        assert name in ref
    assert (clean["work"] / "results/runs/r1/mlflow.json").stat().st_size > 0
    assert not chaos.leftover_temps(clean["work"])


def test_kill9_at_three_points_then_documented_recovery_gives_identical_outputs(clean, tmp_path):
    """kill -9 of the process group early, mid and late; `snakemake --unlock` then
    `--rerun-incomplete` each time: every compared output has the clean run's sha256 (LoRA files,
    kohya file, samples.png, shard/latent tars and checksums, manifests, captions, tiny model),
    no temporary file is left, and a dry run afterwards has nothing to do."""
    # `track` is a kill point too: MLflow's sqlite store is created beside mlflow.db and linked
    # into place when complete (tracking.ensure_sqlite_store), so a kill there breaks no rerun
    points = chaos.draw_points(3, SEED, clean["ref"], spread=True)
    if "track" not in {p.rule for p in points}:  # (seed 7 draws it; keep it if the DAG changes)
        longest = max(clean["ref"]["durations"]["track"])  # while it runs: it is the last job
        points[-1] = chaos.Point("track", round(min(points[-1].delay, 0.6 * longest), 2))
    work = chaos.make_workdir(tmp_path / "w", clean["data"], clean["cfg"])
    report = chaos.chaos_round(clean["code"], work, points, clean["ref"], rule_timeout=300)
    detail = {k: v for k, v in report.items() if k != "error"}
    assert report["final_rc"] == 0, report.get("error", "")[-4000:]
    assert len(report["kills"]) >= 2, detail
    # right after a kill, a plain rerun is refused: the lock, or first the incomplete files
    assert report["refused_with"] in ("LockException", "IncompleteFilesException"), detail
    assert report["differ"] == [] and report["extra"] == [], detail
    assert report["compared"] == len(clean["ref"]["hashes"]) > 30
    assert report["temps"] == [], detail
    assert report["dry_run_clean"], detail


def flip(path: Path, keep_mtime: bool) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    with open(path, "r+b") as fh:
        fh.write(data)
    if keep_mtime:  # bit rot: content changed, mtime not
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(path, ns=(st.st_atime_ns, max(st.st_mtime_ns, path.stat().st_mtime_ns) + 10**9))


def test_damaged_cache_files_are_never_trained_on_and_get_rebuilt(clean, tmp_path):
    """1. Bit rot (mtime kept) in a latent shard: training refuses it, naming the file, and
    deletes it. 2. Flipped bytes (mtime changed) in a captions jsonl and an image shard tar: the
    next invocation rebuilds them and the deleted latent shard. Training is redone from scratch
    (no checkpoints); shards, latents and the LoRA files equal the clean run's."""
    code, ref = clean["code"], clean["ref"]["hashes"]
    work = tmp_path / "w"
    shutil.copytree(clean["work"], work, symlinks=True)
    shutil.rmtree(work / "results" / "checkpoints")

    rotten = work / LATENTS / "00000.tar"
    flip(rotten, keep_mtime=True)
    assert "Nothing to be done" in chaos.snakemake(code, work, "-n", *LORA).stdout
    out = chaos.snakemake(code, work, "--forcerun", "train", *LORA)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert f"CorruptFileError: {LATENTS}/00000.tar: corrupted" in text, text[-4000:]
    assert "rerun snakemake to rebuild it" in text
    assert not rotten.exists() and not (work / LORA[0]).exists()

    # (the latent tar of shard 1 goes through the same check: unit-tested in test_io.py)
    damaged = ["results/mine/captions/00000.jsonl", "results/mine/shards/00001.tar"]
    for rel in damaged:
        flip(work / rel, keep_mtime=False)
    out = chaos.snakemake(code, work, *LORA)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    for rel in damaged:
        assert f"lorapipe: {rel}: changed after it was written" in text
    now = chaos.output_hashes(work)
    assert {k: now[k] for k in ref if k.startswith("results/mine/")} == {
        k: v for k, v in ref.items() if k.startswith("results/mine/")
    }
    assert [now[k] for k in LORA] == [ref[k] for k in LORA]
    # rebuilt once: the damage records keep the params stable, nothing is left to do
    assert "Nothing to be done" in chaos.snakemake(code, work, "-n", *LORA).stdout
