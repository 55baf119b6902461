"""MLflow tracking: one MLflow run per lorapipe run, named after it.

Params are the resolved config flattened; metrics come from metrics.jsonl with their steps;
artifacts are the LoRA files, config, sample grid and loss plot; tags carry the fingerprints and the
git commit. By default the store is MLflow's own default, ``sqlite:///mlflow.db`` in the workflow
folder, so plain ``mlflow ui`` there shows the runs. MLFLOW_TRACKING_URI wins over the config key.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import socket
import threading
import time
from pathlib import Path

from .io import atomic_write_text, glob_escape

log = logging.getLogger(__name__)

# MLflow 3.17's limits (mlflow.utils.validation): longer values are truncated server-side with a
# warning, longer keys and other characters are rejected.
MAX_PARAM_VAL, MAX_TAG_VAL, MAX_KEY = 6000, 8000, 250
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")
# Fields of a metrics.jsonl line that are not metrics.
SKIP_METRICS = frozenset({"step", "skipped", "time"})
FINGERPRINT_TAG = "lorapipe.fingerprint"


def tracking_uri(configured: str | None, workdir: str | os.PathLike = ".") -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative or absolute); None for other stores
    and in-memory databases."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


_CREATING = ".creating"


def _creating_name(db: Path) -> Path:
    return db.with_name(f".{db.name}.{socket.gethostname()}-{os.getpid()}{_CREATING}")


def _remove_stale_creations(db: Path, max_age_s: float = 3600.0) -> int:
    """Delete the temporary stores (and their SQLite journals) that a killed `ensure_sqlite_store`
    left beside ``db``: those of a dead process on this host, and any older than ``max_age_s``
    (another host's; creating a store takes seconds). Returns how many files were removed."""
    host, n = socket.gethostname(), 0
    for tmp in db.parent.glob(f".{glob_escape(db.name)}.*{_CREATING}*"):
        owner = tmp.name[len(db.name) + 2 :].split(_CREATING, 1)[0]  # "<host>-<pid>"
        who, _, pid = owner.rpartition("-")
        dead = False
        if who == host and pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                dead = True
            except PermissionError:
                pass
        try:
            if dead or time.time() - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
                n += 1
        except FileNotFoundError:
            pass
    return n


def ensure_sqlite_store(uri: str) -> bool:
    """Create the sqlite MLflow store of ``uri`` atomically if it does not exist yet.

    MLflow creates a missing sqlite store in place, running ~30 schema migrations that are not
    one transaction: a process killed meanwhile leaves a half-migrated ``mlflow.db`` that every
    later job fails on ("duplicate column name"). Here MLflow builds the store in a temporary
    file beside it (``.mlflow.db.<host>-<pid>.creating``), which is hard-linked to the final name
    only once complete: a kill leaves no store (the next call starts over and removes the
    leftover) or a complete one. When two processes race, the first link wins and the other
    uses it. An existing database is used as it is (an empty file counts as missing). Other
    store URIs are left to MLflow. Returns True when this call created the store.
    """
    db = sqlite_file(uri)
    if db is None:
        return False
    db = db.absolute()
    try:
        if db.stat().st_size > 0:
            return False
        empty = True
    except FileNotFoundError:
        empty = False
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    removed = _remove_stale_creations(db)
    if removed:
        log.info("removed %d leftover temporary MLflow store file(s) beside %s", removed, db)
    tmp = _creating_name(db)
    tmp.unlink(missing_ok=True)
    tmp_uri = f"sqlite:///{tmp}"
    try:
        # The artifact root is MLflow's own default (./mlruns): the Default experiment the store
        # creates gets the location it would get from a store created in place.
        store = SqlAlchemyStore(tmp_uri, "./mlruns")
        store.engine.dispose()  # close the connections: the file is complete on disk
        getattr(SqlAlchemyStore, "_engine_map", {}).pop(tmp_uri, None)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        try:
            if empty:
                if db.stat().st_size > 0:  # filled meanwhile by another process
                    return False
                os.replace(tmp, db)
            else:
                os.link(tmp, db)
        except FileExistsError:
            return False  # another process linked its complete store first
        except OSError as e:  # a filesystem without hard links
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                raise
            os.replace(tmp, db)
        with contextlib.suppress(OSError):
            fd = os.open(db.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        log.info("created MLflow store %s", db)
        return True
    finally:
        for leftover in db.parent.glob(f"{glob_escape(tmp.name)}*"):  # + SQLite journals
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


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


def open_experiment(client, experiment: str, uri: str) -> str:
    """The id of ``experiment`` (created when missing); a deleted one is an error that says how
    to restore it."""
    exp = client.get_experiment_by_name(experiment)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise RuntimeError(
            f"MLflow experiment {experiment!r} at {uri} is deleted: restore it "
            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or use another name"
        )
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(experiment)
    except Exception:  # another job created it meanwhile (RESOURCE_ALREADY_EXISTS)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(client, exp_id: str, fingerprint: str, run_id: str | None = None):
    """The MLflow run of a lorapipe run: ``run_id`` when it exists and carries this fingerprint,
    else the oldest run tagged ``lorapipe.fingerprint`` = ``fingerprint``; None if there is none."""
    if run_id:
        with contextlib.suppress(Exception):  # unknown id (e.g. another store): search instead
            run = client.get_run(run_id)
            if (
                run.data.tags.get(FINGERPRINT_TAG) == fingerprint
                and run.info.experiment_id == exp_id
                and run.info.lifecycle_stage == "active"
            ):
                return run
    if not fingerprint:
        return None
    quoted = fingerprint.replace("'", "")  # fingerprints are hex; never let one break the filter
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{FINGERPRINT_TAG}` = '{quoted}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return found[0] if found else None


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
) -> str:
    """Log one finished run; reuse the MLflow run of the same fingerprint if one exists.

    Idempotent: on reuse only params and (metric, step) points not logged yet are added, so a
    re-run (or a longer metrics.jsonl after a resume, or one that live tracking partly sent) never
    duplicates points.

    Args:
        run_id: the MLflow run the train stage logged to (recorded in the exported files); used
            when it exists in this store with this fingerprint, else the run is found by
            fingerprint (or created).
        dataset: an MLflow ``DatasetInput`` (see `dataset_input`), logged once per run.
        artifact_dirs: ``{artifact path: local folder}``: each folder's files (not hidden ones)
            logged under that path (``{"samples": ".../samples"}``: the per-step sample grids).

    Returns:
        The MLflow run id (also written to ``out_json`` with the URI and experiment id).
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    ensure_sqlite_store(uri)
    client = MlflowClient(tracking_uri=uri)
    exp_id = open_experiment(client, experiment, uri)
    found = find_run(client, exp_id, tags.get(FINGERPRINT_TAG, ""), run_id)
    if run_id and found is not None and found.info.run_id != run_id:
        log.warning(
            "MLflow run %s (named in the run's files) is not in %s; logging to run %s instead",
            run_id,
            uri,
            found.info.run_id,
        )
    tag_list = [RunTag(k, str(v)[:MAX_TAG_VAL]) for k, v in tags.items()]
    if found:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        logged_params = found.data.params
    else:
        # Tags (the fingerprint) at creation: a run interrupted later is still found and reused.
        run_id = client.create_run(
            exp_id, run_name=run_name, tags={t.key: t.value for t in tag_list}
        ).info.run_id
        logged_params = {}
    try:
        new = [Param(k, v) for k, v in new_params(config, logged_params, run_id)]
        for i in range(0, len(new), 100):
            client.log_batch(run_id, params=new[i : i + 100])
        for i in range(0, len(tag_list) if found else 0, 100):
            client.log_batch(run_id, tags=tag_list[i : i + 100])
        if dataset is not None:
            client.log_inputs(run_id, datasets=[dataset])  # the store de-duplicates inputs

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
        for name, folder in (artifact_dirs or {}).items():
            if not Path(folder).is_dir():
                log.warning("MLflow run %s: folder %s does not exist, not logged", run_id, folder)
                continue
            for f in sorted(Path(folder).iterdir()):  # not hidden ones (.snakemake_timestamp)
                if f.is_file() and not f.name.startswith("."):
                    client.log_artifact(run_id, str(f), artifact_path=name)
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


# MLflow's HTTP client retries a failed request 7 times with exponential back-off (minutes) and
# waits 120 s for an answer. A training process must not stall on that: the live tracker fails
# fast and retries on its own schedule. A user's own setting of these variables wins.
_FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class LiveTracker:
    """Metrics of a training run sent to MLflow while it trains, from a background thread.

    The training loop only appends each step's record (`log`, microseconds); a daemon thread
    creates or resumes the MLflow run of the run's fingerprint (the one the track rule later
    completes) and sends batches every ``every_steps`` steps or ``every_s`` seconds. Any MLflow
    error (store unreachable, database locked, server error) is logged and retried later with a
    growing back-off; metrics.jsonl stays the record, and the track rule sends whatever is still
    missing (it de-duplicates per metric and step). So tracking never stops or slows training.

    Points already in the run (a resumed run re-sends its restored history, or recomputes steps
    an earlier attempt logged before it was killed) are skipped per (metric, step).
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        fingerprint: str,
        *,
        tags: dict[str, str] | None = None,
        params: dict | None = None,
        every_steps: int = 20,
        every_s: float = 10.0,
        close_timeout_s: float = 30.0,
        max_backoff_s: float = 300.0,
    ):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.fingerprint = fingerprint
        self.tags = {FINGERPRINT_TAG: fingerprint, **(tags or {})}
        self.params = params or {}
        self.every_steps, self.every_s = max(1, every_steps), every_s
        self.close_timeout_s, self.max_backoff_s = close_timeout_s, max_backoff_s
        self.run_id: str | None = None  # known once the worker has reached the store
        self.failures = 0  # consecutive failed attempts
        self._cond = threading.Condition()
        self._pending: list[dict] = []
        self._client = None
        self._have: set[tuple[str, int]] = set()
        self._resumed_step = 0
        self._last_send = time.monotonic()
        self._next_try = 0.0
        self._flush_req = self._flush_done = self._attempts = 0
        self._progress = 0
        self._closing: str | None = None
        self._thread: threading.Thread | None = None
        self._env_set: list[str] = []

    # -- called by the training loop ------------------------------------------------------------
    def start(self, backlog: list[dict] = (), resumed_step: int = 0, wait_s: float = 10.0) -> None:
        """Start the worker; ``backlog`` (the restored metrics of a resumed run) is sent first.

        Waits up to ``wait_s`` for the first attempt to reach the store, so that a healthy store
        has the run (and `run_id` is known) from the first step on.
        """
        try:
            # Imported here, in the training thread, before the worker starts: two threads
            # importing overlapping packages at once can deadlock on import locks.
            import mlflow.entities  # noqa: F401
            from mlflow.tracking import MlflowClient  # noqa: F401

            if not self.uri.startswith(("http:", "https:", "databricks")):
                import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        except ImportError as e:
            log.warning("MLflow live tracking off: %s", e)
            return
        for k, v in _FAST_FAIL_ENV.items():
            if k not in os.environ:
                os.environ[k] = v
                self._env_set.append(k)
        self._resumed_step = resumed_step
        self._pending = list(backlog)
        self._thread = threading.Thread(target=self._loop, name="mlflow-live", daemon=True)
        self._thread.start()
        with self._cond:
            self._cond.wait_for(lambda: self._attempts > 0, timeout=wait_s)

    def log(self, record: dict) -> None:
        """Queue one step's metrics (a metrics.jsonl record)."""
        if self._thread is None:
            return
        with self._cond:
            self._pending.append(record)
            if len(self._pending) >= self.every_steps:
                self._cond.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Send what is queued now (ignoring back-off) and wait for the attempt; True when
        nothing is left unsent."""
        if self._thread is None:
            return False
        with self._cond:
            self._flush_req += 1
            want = self._flush_req
            self._cond.notify()
            self._cond.wait_for(
                lambda: self._flush_done >= want or not self._thread.is_alive(),
                timeout=self.close_timeout_s if timeout is None else timeout,
            )
            return self._flush_done >= want and not self._pending

    def close(self, status: str = "FINISHED") -> str | None:
        """Send the rest, set the run's status (FINISHED, FAILED, KILLED), stop the worker.

        Waits at most ``close_timeout_s``; whatever was not sent stays in metrics.jsonl for the
        track rule. Returns the MLflow run id, or None if the store was never reached.
        """
        if self._thread is None:
            return None
        with self._cond:
            self._closing = status
            self._cond.notify()
        self._thread.join(self.close_timeout_s)
        if self._thread.is_alive():
            log.warning(
                "MLflow (%s): no answer within %.0f s; leaving it (metrics.jsonl has every step, "
                "the track rule sends them)",
                self.uri,
                self.close_timeout_s,
            )
        for k in self._env_set:
            os.environ.pop(k, None)
        self._env_set = []
        return self.run_id

    # -- the worker thread ----------------------------------------------------------------------
    def _due(self, now: float) -> bool:
        if now < self._next_try:
            return False
        if self._client is None:
            return True  # reach the store (create the run) as soon as possible
        return bool(self._pending) and (
            len(self._pending) >= self.every_steps or now - self._last_send >= self.every_s
        )

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._closing
                    or self._flush_req > self._flush_done
                    or self._due(time.monotonic())
                ):
                    if self._client is not None and not self._pending:
                        self._cond.wait(timeout=self.every_s)  # log() or close() wakes us
                        continue
                    wake = max(self._next_try, self._last_send + self.every_s)
                    self._cond.wait(timeout=max(0.05, wake - time.monotonic()))
                closing, req = self._closing, self._flush_req
                batch, self._pending = self._pending, []
            sent = self._attempt(batch)
            with self._cond:
                self._pending[:0] = batch[sent:]
                self._flush_done = req
                self._cond.notify_all()
            if closing:
                self._finish(closing)
                return

    def _attempt(self, batch: list[dict]) -> int:
        """Reach the store if needed and send ``batch``; returns how many records were sent."""
        self._progress = 0
        self._attempts += 1
        try:
            if self._client is None:
                self._connect()
            self._send(batch)
        except Exception as e:  # never let tracking take training down
            self.failures += 1
            delay = min(self.max_backoff_s, self.every_s * 2 ** (self.failures - 1))
            self._next_try = time.monotonic() + delay
            # The first failure is a warning; repeats (with a growing delay) only info.
            log.log(
                logging.WARNING if self.failures == 1 else logging.INFO,
                "MLflow (%s) failed: %s: %s; %d step(s) kept, next try in %.1f s (metrics.jsonl "
                "has every step; the track rule sends what is missing)",
                self.uri,
                type(e).__name__,
                str(e)[:300],
                len(batch) - self._progress,
                delay,
            )
            return self._progress
        if self.failures:
            log.info("MLflow (%s) reachable again after %d failure(s)", self.uri, self.failures)
        self.failures = 0
        self._next_try = 0.0
        self._last_send = time.monotonic()
        return len(batch)

    def _connect(self) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        ensure_sqlite_store(self.uri)
        client = MlflowClient(tracking_uri=self.uri)
        exp_id = open_experiment(client, self.experiment, self.uri)
        run = find_run(client, exp_id, self.fingerprint)
        if run is None:
            run_id = client.create_run(
                exp_id,
                run_name=self.run_name,
                tags={k: str(v)[:MAX_TAG_VAL] for k, v in self.tags.items()},
            ).info.run_id
            have, logged = set(), {}
        else:
            # A rerun (after a crash, or of a finished run) continues the same MLflow run.
            run_id = run.info.run_id
            client.update_run(run_id, status="RUNNING")
            have = {
                (key, m.step)
                for key in run.data.metrics
                for m in client.get_metric_history(run_id, key)
            }
            logged = run.data.params
            tags = [RunTag(k, str(v)[:MAX_TAG_VAL]) for k, v in self.tags.items()]
            if self._resumed_step:
                tags.append(RunTag("lorapipe.resumed_at_step", str(self._resumed_step)))
            client.log_batch(run_id, tags=tags)
        new = [Param(k, v) for k, v in new_params(self.params, logged, run_id)]
        for i in range(0, len(new), 100):
            client.log_batch(run_id, params=new[i : i + 100])
        self._client, self.run_id, self._have = client, run_id, have
        log.info(
            "MLflow run %s (%s, experiment %s): live metrics", run_id, self.uri, self.experiment
        )

    def _send(self, batch: list[dict]) -> None:
        """log_batch in chunks of whole records (MLflow takes at most 1000 metrics a call);
        ``self._progress`` counts the records sent, so a failure midway re-sends none twice."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        chunk: list = []
        for i, record in enumerate(batch):
            points, _ = metric_points(record, now)
            new = [Metric(k, v, ts, s) for k, s, v, ts in points if (k, s) not in self._have]
            if chunk and len(chunk) + len(new) > 1000:
                self._client.log_batch(self.run_id, metrics=chunk)
                self._progress, chunk = i, []
            chunk += new
        if chunk:
            self._client.log_batch(self.run_id, metrics=chunk)
        self._progress = len(batch)

    def _finish(self, status: str) -> None:
        if self._client is None:
            return
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as e:
            log.warning("MLflow run %s: could not set status %s: %s", self.run_id, status, e)
