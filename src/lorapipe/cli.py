"""Command line: ``lorapipe info``, ``lorapipe compare RUN_A RUN_B`` and
``lorapipe check-config FILE...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _info(_args) -> int:
    from .fingerprint import versions
    from .images import pil_identity

    v = versions("torch", "diffusers", "transformers", "peft", "mlflow", "snakemake", "webdataset")
    print(
        f"imaging: {pil_identity()}"
        + ("" if "simd" in pil_identity() else "  (pillow-simd not active)")
    )
    for k, ver in v.items():
        print(f"{k}: {ver}")
    try:
        import torch

        print(
            f"cuda: {torch.cuda.is_available()}"
            + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
        )
    except ImportError:
        print("cuda: torch not installed")
    return 0


def check_config(files: list[str], workdir: str = ".", check_files: bool = True) -> int:
    """Check config files as the workflow will, before it starts: each file strictly (a YAML
    syntax error or a duplicate key names the file and the line, which Snakemake's own message
    does not), then the merged config (keys, values, constraints between keys, paths, sweeps).

    Returns:
        0 when the config is valid (printing a summary), 1 otherwise (printing the problems).
    """
    from .config import ConfigError, load_config, load_yaml

    try:
        cfg = load_yaml(*files)
        load_config(cfg, workdir=workdir, check_files=check_files)
    except ConfigError as e:
        print(f"lorapipe check-config: {e}", file=sys.stderr)
        return 1
    print(
        f"ok: {len(cfg['datasets'])} dataset(s), {len(cfg['base_models'])} base model(s), "
        f"{len(cfg['runs'])} run(s)"
    )
    return 0


def _load_run(results: Path, name: str) -> dict:
    import yaml

    run_dir = results / "runs" / name
    cfg = run_dir / "config.yaml"
    if not cfg.exists():
        raise SystemExit(f"lorapipe compare: no run {name!r} ({cfg} not found)")
    doc = yaml.safe_load(cfg.read_text())
    out = {"config": doc, "metrics": [], "summary": {}}
    if (run_dir / "metrics.jsonl").exists():
        out["metrics"] = [
            json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x
        ]
    if (run_dir / "train_summary.json").exists():
        out["summary"] = json.loads((run_dir / "train_summary.json").read_text())
    return out


def _validation_lines(sa: dict, sb: dict) -> list[str]:
    """Final and best validation loss and the best step of two runs (train_summary.json)."""
    def val(s, key):
        v = s.get(key)
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    rows = (("final val loss", "val_loss"), ("best val loss", "best_val_loss"),
            ("best step", "best_step"))  # fmt: skip
    return [f"{label:32} {val(sa, k):>20} {val(sb, k):>20}" for label, k in rows]


def compare_runs(results: Path, a: str, b: str) -> str:
    """A short text report: settings that differ, final loss, steps and time of two runs."""
    from .tracking import flatten

    ra, rb = _load_run(results, a), _load_run(results, b)
    fa = flatten({k: v for k, v in ra["config"].items() if k not in ("git",)})
    fb = flatten({k: v for k, v in rb["config"].items() if k not in ("git",)})
    lines = [f"{'':32} {a:>20} {b:>20}"]
    skip = ("run.name", "fingerprints.")
    for k in sorted(set(fa) | set(fb)):
        if k.startswith(skip) and k != "fingerprints.run":
            continue
        va, vb = fa.get(k, "-"), fb.get(k, "-")
        if va != vb:
            lines.append(f"{k:32} {va[:20]:>20} {vb[:20]:>20}")

    def last(r, key):
        return f"{r['metrics'][-1][key]:.4f}" if r["metrics"] else "-"

    def tail_mean(r):
        m = r["metrics"][-max(1, len(r["metrics"]) // 10) :]
        return f"{sum(x['loss'] for x in m) / len(m):.4f}" if m else "-"

    lines.append(f"{'final loss':32} {last(ra, 'loss'):>20} {last(rb, 'loss'):>20}")
    lines.append(f"{'loss, mean of last 10%':32} {tail_mean(ra):>20} {tail_mean(rb):>20}")
    lines += _validation_lines(ra["summary"], rb["summary"])
    def fmt(v) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    for key in ("steps", "wall_s", "images_per_s_steady"):
        va, vb = ra["summary"].get(key, "-"), rb["summary"].get(key, "-")
        lines.append(f"{key:32} {fmt(va):>20} {fmt(vb):>20}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lorapipe", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="which imaging library, torch, CUDA are active")
    cmp = sub.add_parser("compare", help="compare two runs (settings that differ, loss, time)")
    cmp.add_argument("run_a")
    cmp.add_argument("run_b")
    cmp.add_argument("--results", default="results", type=Path)
    chk = sub.add_parser(
        "check-config", help="check config files (as with --configfile A B ...) before a run"
    )
    chk.add_argument("files", nargs="+", help="config files, in --configfile order")
    chk.add_argument("--workdir", default=".", help="folder the workflow runs in (paths)")
    chk.add_argument("--no-files", action="store_true", help="do not check paths on disk")
    args = ap.parse_args(argv)
    if args.cmd == "info":
        return _info(args)
    if args.cmd == "check-config":
        return check_config(args.files, args.workdir, not args.no_files)
    print(compare_runs(args.results, args.run_a, args.run_b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
