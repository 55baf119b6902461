"""Live MLflow metrics of a training run (the train stage), sent from a background thread.

The run is opened through `mlflow_store.open_run`, like the track rule's `tracking.log_run` that
later completes it: both end on the MLflow run of the run's fingerprint.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from .mlflow_store import FINGERPRINT_TAG, open_run
from .tracking import log_new_params, metric_points

log = logging.getLogger(__name__)

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
        self._flush_req = self._flush_done = 0
        self._tried = False  # an attempt has ended (set with the condition held, then notified)
        self._progress = 0
        self._closing: str | None = None
        self._thread: threading.Thread | None = None
        self._env_set: list[str] = []

    # -- called by the training loop ------------------------------------------------------------
    def start(self, backlog: list[dict] = (), resumed_step: int = 0, wait_s: float = 0.0) -> None:
        """Start the worker; ``backlog`` (the restored metrics of a resumed run) is sent first.

        Waits up to ``wait_s`` (default: not at all) for the first attempt to reach the store:
        training goes on while the worker opens the run (0.25 s of a sqlite store, #17). What
        needs the run id waits for that attempt with `reached`.
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
        if wait_s > 0:
            self.reached(wait_s)

    def reached(self, timeout: float = 10.0) -> bool:
        """Wait up to ``timeout`` for the worker's first attempt to reach the store to end (the
        exported files name the MLflow run: `run_id`); whether the store was reached."""
        if self._thread is None:
            return False
        with self._cond:
            self._cond.wait_for(
                lambda: self._tried or not self._thread.is_alive(), timeout=timeout
            )
        return self.run_id is not None

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
                self._tried = True
                self._cond.notify_all()
            if closing:
                self._finish(closing)
                return

    def _attempt(self, batch: list[dict]) -> int:
        """Reach the store if needed and send ``batch``; returns how many records were sent."""
        self._progress = 0
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
        """Open the run of the fingerprint (`open_run`), add the params it lacks, and learn
        which points it has."""
        from mlflow.entities import RunTag

        run = open_run(self.uri, self.experiment, self.run_name, self.fingerprint, self.tags)
        if run.existing is not None and self._resumed_step:
            tag = RunTag("lorapipe.resumed_at_step", str(self._resumed_step))
            run.client.log_batch(run.run_id, tags=[tag])
        log_new_params(run, self.params)
        self._client, self.run_id, self._have = run.client, run.run_id, run.logged_steps()
        log.info(
            "MLflow run %s (%s, experiment %s): live metrics", run.run_id, self.uri, self.experiment
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
