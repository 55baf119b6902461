"""MLflow tracking of a finished lorapipe run (the track rule): one MLflow run per lorapipe run,
named after it, opened through `mlflow_store.open_run` like the live metrics of the train stage
(`live_tracking`), so both end on the same run.

Params are the resolved config flattened; metrics come from metrics.jsonl with their steps;
artifacts are the LoRA files, config, sample grid and loss plot; tags carry the fingerprints and the
git commit. Here too are the conversions both writers share: config to params (`flatten`,
`new_params`), metrics.jsonl records to metric points (`metric_points`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path

from .io import atomic_write_text
from .mlflow_store import FINGERPRINT_TAG, OpenedRun, open_run

log = logging.getLogger(__name__)

# MLflow 3.17's limits (mlflow.utils.validation): longer values are truncated server-side with a
# warning, longer keys and other characters are rejected.
MAX_PARAM_VAL, MAX_KEY = 6000, 250
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")
# Fields of a metrics.jsonl line that are not metrics.
SKIP_METRICS = frozenset({"step", "skipped", "time"})


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}``; lists become JSON strings."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple) else str(v)
    return out


def _key(k: str) -> str:
    """An MLflow-valid param/metric key: allowed characters only, at most 250 of them."""
    return _BAD_KEY_CHARS.sub("_", k)[:MAX_KEY]


def metric_points(m: dict, now_ms: int) -> tuple[list[tuple[str, int, float, int]], int]:
    """The MLflow points of one metrics.jsonl record: ``[(key, step, value, timestamp_ms)]``.

    Numbers only (bools and strings are not metrics). Non-finite values become NaN, which MLflow
    stores as NaN (±inf would be clamped to ±1.8e308 and flatten every chart). Returns the points
    and how many values were non-finite. Raises KeyError/ValueError/TypeError without a step.
    """
    step = int(m["step"])
    t = m.get("time")
    ts = int(t * 1000) if isinstance(t, int | float) and math.isfinite(t) else now_ms
    out, nonfinite = [], 0
    for k, v in m.items():
        if k in SKIP_METRICS or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        v = float(v)
        if not math.isfinite(v):
            nonfinite += 1
            v = math.nan
        out.append((_key(k), step, v, ts))
    return out, nonfinite


def read_metrics(metrics_jsonl: str | os.PathLike) -> tuple[dict[tuple[str, int], tuple], int]:
    """``{(key, step): (value, timestamp_ms)}`` from metrics.jsonl (the last line of a step wins).

    See `metric_points` for what counts as a metric. Returns the metrics and how many values
    were non-finite.
    """
    now = int(time.time() * 1000)
    out: dict[tuple[str, int], tuple] = {}
    nonfinite = 0
    with open(metrics_jsonl, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                points, bad = metric_points(json.loads(line), now)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{metrics_jsonl}:{n}: not a metrics line ({e!r})") from e
            nonfinite += bad
            for k, step, v, ts in points:
                out[(k, step)] = (v, ts)
    return out, nonfinite


def new_params(config: dict, logged: dict[str, str], run_id: str) -> list[tuple[str, str]]:
    """Flattened ``config`` params not logged yet; a changed value keeps the logged one (MLflow
    params are immutable) with a warning."""
    params = {_key(k): v[:MAX_PARAM_VAL] for k, v in flatten(config).items()}
    changed = sorted(k for k, v in params.items() if logged.get(k, v) != v)
    if changed:
        log.warning(
            "MLflow run %s: params changed, keeping the logged values: %s",
            run_id,
            ", ".join(changed),
        )
    return [(k, v) for k, v in params.items() if k not in logged]


def dataset_input(dataset: dict, manifest_digest: str, samples: int | None = None):
    """The run's dataset as an MLflow dataset input: metadata only (name, source folder, the
    manifest's sha256 as digest), no data is uploaded."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile = {"samples": samples, "shards": dataset.get("shards")}
    profile.update({k: dataset[k] for k in ("resolution", "buckets") if k in dataset})
    return DatasetInput(
        dataset=Dataset(
            name=str(dataset["name"])[:500],
            digest=manifest_digest[:32],  # MLflow's limit is 36 characters
            source_type="local",
            source=json.dumps({"uri": os.path.abspath(dataset["path"])}),
            profile=json.dumps(profile, sort_keys=True),
        ),
        tags=[
            InputTag("mlflow.data.context", "training"),
            InputTag("lorapipe.dataset_manifest_hash", manifest_digest),
        ],
    )


def log_new_params(run: OpenedRun, config: dict) -> None:
    """Log the params of ``config`` that ``run`` has not logged yet (`new_params`), 100 a call
    (MLflow's limit)."""
    from mlflow.entities import Param

    new = [Param(k, v) for k, v in new_params(config, run.logged_params, run.run_id)]
    for i in range(0, len(new), 100):
        run.client.log_batch(run.run_id, params=new[i : i + 100])


def _log_metrics(run: OpenedRun, metrics_jsonl: str | os.PathLike) -> None:
    """The (metric, step) points of metrics.jsonl that ``run`` does not have yet, 1000 a call."""
    from mlflow.entities import Metric

    points, nonfinite = read_metrics(metrics_jsonl)
    if nonfinite:
        log.warning("%s: %d non-finite metric values, logged as NaN", metrics_jsonl, nonfinite)
    have = run.logged_steps({k for k, _ in points})
    batch = [
        Metric(k, v, ts, step) for (k, step), (v, ts) in points.items() if (k, step) not in have
    ]
    for i in range(0, len(batch), 1000):
        run.client.log_batch(run.run_id, metrics=batch[i : i + 1000])


def _log_record(run: OpenedRun, record: dict) -> None:
    """One metrics record's points (`metric_points`) that ``run`` does not have yet."""
    from mlflow.entities import Metric

    points, _ = metric_points(record, int(time.time() * 1000))
    have = run.logged_steps({k for k, *_ in points})
    new = [Metric(k, v, ts, s) for k, s, v, ts in points if (k, s) not in have]
    if new:
        run.client.log_batch(run.run_id, metrics=new)


def _log_artifacts(
    run: OpenedRun, artifacts: list[str], artifact_dirs: dict[str, str] | None
) -> None:
    """The ``artifacts`` files, then each folder's files (not hidden ones) under its artifact
    path; missing ones are skipped with a warning."""
    for a in artifacts:
        if Path(a).exists():
            run.client.log_artifact(run.run_id, a)
        else:
            log.warning("MLflow run %s: artifact %s does not exist, not logged", run.run_id, a)
    for name, folder in (artifact_dirs or {}).items():
        if not Path(folder).is_dir():
            log.warning("MLflow run %s: folder %s does not exist, not logged", run.run_id, folder)
            continue
        for f in sorted(Path(folder).iterdir()):  # not hidden ones (.snakemake_timestamp)
            if f.is_file() and not f.name.startswith("."):
                run.client.log_artifact(run.run_id, str(f), artifact_path=name)


def log_run(
    *,
    run_name: str,
    experiment: str,
    uri: str,
    config: dict,
    metrics_jsonl: str | os.PathLike,
    artifacts: list[str],
    tags: dict[str, str],
    out_json: str | os.PathLike,
    run_id: str | None = None,
    dataset=None,
    artifact_dirs: dict[str, str] | None = None,
    summary_metrics: tuple[dict[str, float], int] | None = None,
) -> str:
    """Log one finished run; reuse the MLflow run of the same fingerprint if one exists.

    Idempotent: on reuse only params and (metric, step) points not logged yet are added, so a
    re-run (or a longer metrics.jsonl after a resume, or one that live tracking partly sent) never
    duplicates points. The run ends FINISHED, or FAILED when logging fails.

    Args:
        tags: the run's tags; ``lorapipe.fingerprint`` among them finds the run (`open_run`).
        run_id: the MLflow run the train stage logged to (recorded in the exported files); used
            when it exists in this store with this fingerprint, else the run is found by
            fingerprint (or created).
        dataset: an MLflow ``DatasetInput`` (see `dataset_input`), logged once per run.
        artifact_dirs: ``{artifact path: local folder}``: each folder's files (not hidden ones)
            logged under that path (``{"samples": ".../samples"}``: the per-step sample grids).
        summary_metrics: ``({name: value}, step)``: metrics of the whole run (``best_step``,
            ``best_val_loss``), logged once at that step (the last one).

    Returns:
        The MLflow run id (also written to ``out_json`` with the URI and experiment id).
    """
    fingerprint = tags.get(FINGERPRINT_TAG, "")
    run = open_run(
        uri, experiment, run_name, fingerprint, tags, run_id=run_id, status_if_failed="FAILED"
    )
    try:
        log_new_params(run, config)
        if dataset is not None:
            run.client.log_inputs(run.run_id, datasets=[dataset])  # the store de-duplicates
        _log_metrics(run, metrics_jsonl)
        if summary_metrics:
            _log_record(run, {**summary_metrics[0], "step": summary_metrics[1]})
        _log_artifacts(run, artifacts, artifact_dirs)
    except BaseException:
        with contextlib.suppress(Exception):  # keep the original error, not a second one
            run.client.set_terminated(run.run_id, status="FAILED")
        raise
    run.client.set_terminated(run.run_id, status="FINISHED")
    atomic_write_text(
        out_json,
        json.dumps(
            {"run_id": run.run_id, "experiment_id": run.experiment_id, "tracking_uri": uri},
            indent=1,
        ),
    )
    return run.run_id
