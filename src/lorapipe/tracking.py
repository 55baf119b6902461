"""MLflow tracking: one MLflow run per lorapipe run, named after it.

Params are the resolved config flattened; metrics come from metrics.jsonl with their steps;
artifacts are the LoRA files, config, sample grid and loss plot; tags carry the fingerprints and the
git commit. By default the store is MLflow's own default, ``sqlite:///mlflow.db`` in the workflow
folder, so plain ``mlflow ui`` there shows the runs. MLFLOW_TRACKING_URI wins over the config key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .io import atomic_write_text


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

    Returns:
        The MLflow run id (also written to ``out_json`` with the URI and experiment id).
    """
    import mlflow
    from mlflow.entities import Metric

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    fp = tags.get("lorapipe.fingerprint", "")
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`lorapipe.fingerprint` = '{fp}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        have = {m.step for m in client.get_metric_history(run_id, "loss")}
    else:
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        have = set()
        params = flatten(config)
        items = list(params.items())
        from mlflow.entities import Param

        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in items[i : i + 100]])
    batch = []
    with open(metrics_jsonl, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            m = json.loads(line)
            if m["step"] in have:
                continue
            for k, v in m.items():
                if k in ("step", "skipped", "time") or not isinstance(v, int | float):
                    continue
                batch.append(Metric(k, float(v), int(m.get("time", 0) * 1000), int(m["step"])))
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000])
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    for a in artifacts:
        if Path(a).exists():
            client.log_artifact(run_id, a)
    client.set_terminated(run_id, status="FINISHED")
    atomic_write_text(
        out_json,
        json.dumps({"run_id": run_id, "experiment_id": exp_id, "tracking_uri": uri}, indent=1),
    )
    return run_id
