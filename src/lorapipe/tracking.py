"""MLflow tracking: one MLflow run per lorapipe run, named after it.

Params are the resolved config flattened; metrics come from metrics.jsonl with their steps;
artifacts are the LoRA files, config, sample grid and loss plot; tags carry the fingerprints and the
git commit. By default the store is MLflow's own default, ``sqlite:///mlflow.db`` in the workflow
folder, so plain ``mlflow ui`` there shows the runs. MLFLOW_TRACKING_URI wins over the config key.
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

log = logging.getLogger(__name__)

# MLflow 3.17's limits (mlflow.utils.validation): longer values are truncated server-side with a
# warning, longer keys and other characters are rejected.
MAX_PARAM_VAL, MAX_TAG_VAL, MAX_KEY = 6000, 8000, 250
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")
# Fields of a metrics.jsonl line that are not metrics.
SKIP_METRICS = frozenset({"step", "skipped", "time"})


def tracking_uri(configured: str | None, workdir: str | os.PathLike = ".") -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


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


def read_metrics(metrics_jsonl: str | os.PathLike) -> tuple[dict[tuple[str, int], tuple], int]:
    """``{(key, step): (value, timestamp_ms)}`` from metrics.jsonl (the last line of a step wins).

    Numbers only (bools and strings are not metrics). Non-finite values become NaN, which MLflow
    stores as NaN (±inf would be clamped to ±1.8e308 and flatten every chart). Returns the
    metrics and how many values were non-finite.
    """
    now = int(time.time() * 1000)
    out: dict[tuple[str, int], tuple] = {}
    nonfinite = 0
    with open(metrics_jsonl, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                m = json.loads(line)
                step = int(m["step"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{metrics_jsonl}:{n}: not a metrics line ({e!r})") from e
            t = m.get("time")
            ts = int(t * 1000) if isinstance(t, int | float) and math.isfinite(t) else now
            for k, v in m.items():
                if k in SKIP_METRICS or isinstance(v, bool) or not isinstance(v, int | float):
                    continue
                v = float(v)
                if not math.isfinite(v):
                    nonfinite += 1
                    v = math.nan
                out[(_key(k), step)] = (v, ts)
    return out, nonfinite


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
) -> str:
    """Log one finished run; reuse the MLflow run of the same fingerprint if one exists.

    Idempotent: on reuse only params and (metric, step) points not logged yet are added, so a
    re-run (or a longer metrics.jsonl after a resume) never duplicates points.

    Returns:
        The MLflow run id (also written to ``out_json`` with the URI and experiment id).
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise RuntimeError(
            f"MLflow experiment {experiment!r} at {uri} is deleted: restore it "
            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or use another name"
        )
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    fp = tags.get("lorapipe.fingerprint", "")
    found = []
    if fp:
        quoted = fp.replace("'", "")  # fingerprints are hex; never let one break the filter
        found = client.search_runs(
            [exp_id],
            filter_string=f"tags.`lorapipe.fingerprint` = '{quoted}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
    tag_list = [RunTag(k, str(v)[:MAX_TAG_VAL]) for k, v in tags.items()]
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        logged_params = found[0].data.params
    else:
        # Tags (the fingerprint) at creation: a run interrupted later is still found and reused.
        run_id = client.create_run(
            exp_id, run_name=run_name, tags={t.key: t.value for t in tag_list}
        ).info.run_id
        logged_params = {}
    try:
        params = {_key(k): v[:MAX_PARAM_VAL] for k, v in flatten(config).items()}
        changed = sorted(k for k, v in params.items() if logged_params.get(k, v) != v)
        if changed:
            log.warning(
                "MLflow run %s: params changed, keeping the logged values: %s",
                run_id,
                ", ".join(changed),
            )
        new = [Param(k, v) for k, v in params.items() if k not in logged_params]
        for i in range(0, len(new), 100):
            client.log_batch(run_id, params=new[i : i + 100])
        for i in range(0, len(tag_list) if found else 0, 100):
            client.log_batch(run_id, tags=tag_list[i : i + 100])

        points, nonfinite = read_metrics(metrics_jsonl)
        if nonfinite:
            log.warning("%s: %d non-finite metric values, logged as NaN", metrics_jsonl, nonfinite)
        have = set()
        if found:
            for key in {k for k, _ in points}:
                have |= {(key, m.step) for m in client.get_metric_history(run_id, key)}
        batch = [
            Metric(k, v, ts, step) for (k, step), (v, ts) in points.items() if (k, step) not in have
        ]
        for i in range(0, len(batch), 1000):
            client.log_batch(run_id, metrics=batch[i : i + 1000])
        for a in artifacts:
            if Path(a).exists():
                client.log_artifact(run_id, a)
            else:
                log.warning("MLflow run %s: artifact %s does not exist, not logged", run_id, a)
    except BaseException:
        with contextlib.suppress(Exception):  # keep the original error, not a second one
            client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    atomic_write_text(
        out_json,
        json.dumps({"run_id": run_id, "experiment_id": exp_id, "tracking_uri": uri}, indent=1),
    )
    return run_id
