"""Snakemake itself: an edit to a module restales the rules whose scripts reach it (issue #11)."""

from __future__ import annotations

from pathlib import Path

from wf import copy_workflow, planned_jobs, small_config, snakemake, write_config

from lorapipe.fingerprint import OUTPUT_NEUTRAL, script_modules

RUN_STAGES = {"run_config", "train", "sample", "track"}


def _fake_model(root: Path) -> None:
    """A diffusers-shaped folder of placeholder files: run_config hashes it, never loads it."""
    (root / "model_index.json").parent.mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (root / part).mkdir()
        (root / part / "config.json").write_text(f'{{"part": "{part}"}}')


def test_fingerprint_edit_replans_run_config_and_downstream_not_the_manifest(tmp_path):
    """And an edit to an output-neutral module (where a job runs, how it is timed or logged)
    replans nothing."""
    from lorapipe.demo import make_demo_dataset

    code = copy_workflow(tmp_path / "code")
    work = tmp_path / "work"
    make_demo_dataset(work / "data" / "mine", images=4, seed=0)
    _fake_model(work / "models" / "fake")
    cfg = small_config(shards=1, runs={"r1": {"dataset": "mine", "base_model": "fake"}})
    cfg["base_models"] = {"fake": {"path": "models/fake"}}
    write_config(work / "cfg.yaml", cfg)
    target = "results/runs/r1/config.yaml"
    snakemake(work, target, code=code)  # manifest, merge_manifest, run_config: no torch
    assert planned_jobs(work, code, target) == {}
    before = planned_jobs(work, code)  # the rest of the workflow was never built
    assert RUN_STAGES - {"run_config"} <= set(before) and "run_config" not in before

    for rel in OUTPUT_NEUTRAL:  # run_config reaches each; none shapes what it writes
        assert f"lorapipe/{rel}" in script_modules(code / "scripts" / "run_config.py")
        with open(code / "src" / "lorapipe" / rel, "a") as fh:
            fh.write("\n# an edit\n")
    assert planned_jobs(work, code, target) == {}

    edited = code / "src" / "lorapipe" / "fingerprint.py"
    with open(edited, "a") as fh:
        fh.write("\n# an edit\n")
    after = planned_jobs(work, code)
    reaches = {
        rule: "lorapipe/fingerprint.py" in script_modules(code / "scripts" / f"{rule}.py")
        for rule in ("manifest", "merge_manifest", "run_config")
    }
    assert reaches["run_config"] and not reaches["manifest"]  # the import graph says so
    for rule, stale in reaches.items():
        assert (rule in after) == stale, (rule, after)
    assert RUN_STAGES <= set(after)
