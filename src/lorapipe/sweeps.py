"""Sweeps you can rank: which runs a sweep made, and its table of runs × swept settings × results.

A sweep (``sweeps.<name>`` in the config: a table, one row per run) expands into ordinary runs
(`config.expand_sweeps`). ``snakemake sweep_<name>`` trains and tracks them all, then writes
``results/sweeps/<name>/runs.csv`` and ``runs.html`` (`write_table`): one row per run, ranked by
its best validation loss (by its training loss, mean of the last 10 % of steps, for runs
without validation), with the swept settings, final and best losses, the best step, speed, the
MLflow run id and the paths of its files. Every MLflow run of a sweep has the tag
``lorapipe.sweep`` (filter ``tags.lorapipe.sweep = '<name>'`` in the UI).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .io import atomic_write_text

# Result columns after the run name and the swept settings.
RESULT_COLUMNS = (
    "best_val_loss", "best_step", "steps", "best_is_last", "final_val_loss", "final_loss",
    "loss_last10pct", "images_per_s", "wall_s", "train_images", "validation_images",
    "mlflow_run_id",
)  # fmt: skip
PATH_COLUMNS = ("best", "lora", "kohya", "loss_png", "samples_png", "metrics")


def sweep_runs(config: Mapping[str, Any], workdir: str | os.PathLike = ".") -> dict:
    """``{sweep: [(run name, {swept setting: value})]}`` in table order (config loaded)."""
    from .config import _sweep_rows

    out = {}
    for name, sw in (config.get("sweeps") or {}).items():
        rows = _sweep_rows(name, Path(workdir) / sw["table"])
        out[name] = [(run, values) for _line, run, values in rows]
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _tail_mean(metrics_jsonl: Path) -> float | None:
    """Training loss, mean of the last 10 % of steps (a less noisy final loss)."""
    if not metrics_jsonl.is_file():
        return None
    losses = [json.loads(x)["loss"] for x in metrics_jsonl.read_text().splitlines() if x.strip()]
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail) if tail else None


def run_row(run: str, values: Mapping[str, Any], results: str | os.PathLike = "results") -> dict:
    """One run's row: its swept values, what its train_summary.json and metrics say, its files."""
    d = Path(results) / "runs" / run
    s = _read_json(d / "train_summary.json")
    row: dict[str, Any] = {"run": run, **values}
    best = s.get("best_step")
    row.update(
        best_val_loss=s.get("best_val_loss"),
        best_step=best,
        steps=s.get("steps"),
        best_is_last=None if best is None else best == s.get("steps"),
        final_val_loss=s.get("val_loss"),
        final_loss=s.get("final_loss"),
        loss_last10pct=_tail_mean(d / "metrics.jsonl"),
        images_per_s=s.get("images_per_s_steady"),
        wall_s=s.get("wall_s"),
        train_images=s.get("train_images", s.get("samples")),
        validation_images=s.get("validation_images"),
        mlflow_run_id=_read_json(d / "mlflow.json").get("run_id") or s.get("mlflow_run_id"),
    )
    files = {
        "best": d / "best", "lora": d / "pytorch_lora_weights.safetensors",
        "kohya": d / f"{run}.safetensors", "loss_png": d / "loss.png",
        "samples_png": d / "samples.png", "metrics": d / "metrics.jsonl",
    }  # fmt: skip
    row.update({k: str(p) if p.exists() else None for k, p in files.items()})
    return row


def _rank_key(row: Mapping[str, Any]) -> tuple:
    """Best validation loss first (runs without one after), then the training loss's tail."""
    def num(v):
        return v if isinstance(v, int | float) and math.isfinite(v) else math.inf

    return (num(row.get("best_val_loss")), num(row.get("loss_last10pct")), row["run"])


def table(rows: Sequence[dict], swept: Sequence[str]) -> tuple[list[str], list[dict]]:
    """(columns, rows ranked best first, each with its ``rank``)."""
    ranked = sorted(rows, key=_rank_key)
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return ["rank", "run", *swept, *RESULT_COLUMNS, *PATH_COLUMNS], ranked


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def to_csv(columns: Sequence[str], rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    return buf.getvalue()


_SORT_JS = """
for (const th of document.querySelectorAll('th')) th.onclick = () => {
  const t = th.closest('table'), i = [...th.parentNode.children].indexOf(th);
  const up = th.dataset.dir !== 'asc'; th.dataset.dir = up ? 'asc' : 'desc';
  const key = r => { const c = r.children[i].dataset.v ?? r.children[i].textContent;
    const n = parseFloat(c); return c === '' ? null : (isNaN(n) ? c : n); };
  const rows = [...t.tBodies[0].rows].sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
  for (const r of rows) t.tBodies[0].appendChild(r);
};
"""


def to_html(name: str, columns: Sequence[str], rows: Sequence[dict], here: str) -> str:
    """A small page: the table, sortable by a click on a column; paths link relative to
    ``here`` (the page's folder)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            text = html.escape(_cell(v))
            if c in PATH_COLUMNS and v:
                href = html.escape(os.path.relpath(os.path.abspath(v), here))
                text = f'<a href="{href}">{html.escape(Path(v).name)}</a>'
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    title = html.escape(f"sweep {name}")
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>"
        "body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "th{cursor:pointer;background:#eee}</style></head><body>"
        f"<h1>{title}</h1><p>{len(rows)} runs, best validation loss first. Click a column to "
        "sort by it.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body)
        + f"\n</tbody></table><script>{_SORT_JS}</script></body></html>\n"
    )


def write_table(name: str, runs: Sequence[tuple[str, Mapping]], out_csv: str | os.PathLike,
                out_html: str | os.PathLike, results: str | os.PathLike = "results") -> list:
    """Write sweep ``name``'s table (CSV and HTML) from its runs' files; returns the rows."""
    swept = list(dict.fromkeys(k for _, values in runs for k in values))
    columns, rows = table([run_row(r, v, results) for r, v in runs], swept)
    atomic_write_text(out_csv, to_csv(columns, rows))
    here = os.path.dirname(os.path.abspath(out_html))
    atomic_write_text(out_html, to_html(name, columns, rows, here))
    return rows
