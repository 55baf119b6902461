"""The MLflow store of a workflow and the one way to open the MLflow run of a lorapipe run.

Where the store is (`tracking_uri`), creating a sqlite store atomically (`ensure_sqlite_store`),
the experiment (`open_experiment`), and `open_run`: find the run of a fingerprint (or create it)
and mark it running. Both writers go through `open_run`: the track rule's `tracking.log_run`
(a finished run) and the train stage's `live_tracking.LiveTracker` (metrics while it trains), so
they always end on the same MLflow run. What is logged into the run is theirs.

By default the store is MLflow's own default, ``sqlite:///mlflow.db`` in the workflow folder, so
plain ``mlflow ui`` there shows the runs. MLFLOW_TRACKING_URI wins over the config key.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import glob_escape

log = logging.getLogger(__name__)

# MLflow 3.17's limit (mlflow.utils.validation): longer tag values are truncated server-side with
# a warning.
MAX_TAG_VAL = 8000
FINGERPRINT_TAG = "lorapipe.fingerprint"


def tracking_uri(configured: str | None, workdir: str | os.PathLike = ".") -> str:
    """The store's URI: MLFLOW_TRACKING_URI (when set and not empty), else ``configured``, else
    ``sqlite:///<workdir>/mlflow.db`` (absolute)."""
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
    store URIs are left to MLflow. Returns True when this call created the store. After the
    first, a new store is a copy of a kept template (`_from_template`): no MLflow import.
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
        root = os.path.abspath("./mlruns")
        if not _from_template(tmp, root):
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = SqlAlchemyStore(tmp_uri, "./mlruns")
            store.engine.dispose()  # close the connections: the file is complete on disk
            getattr(SqlAlchemyStore, "_engine_map", {}).pop(tmp_uri, None)
            _save_template(tmp, root)
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


# -- New stores from a template --------------------------------------------------------------
#
# Creating a store is importing MLflow (~1.8 s) and running its ~30 migrations (~1 s): 3-5 s of
# a cold run_config job, on every fresh workflow folder (#17). The store MLflow makes is the
# same every time but for its Default experiment's artifact location (``<cwd>/mlruns/0``) and
# times, so the first one made with a given MLflow, SQLAlchemy, alembic and SQLite is kept under
# ``$LORAPIPE_CACHE/mlflow-store/`` and later ones are a copy with those three fields set as
# MLflow would set them (tests/unit/test_tracking.py compares both ways, table by table).


def _template_paths() -> tuple[Path, Path]:
    import sqlite3
    from importlib import metadata

    from .fingerprint import cache_root

    try:
        key = "-".join(
            f"{d}{metadata.version(d)}" for d in ("mlflow", "sqlalchemy", "alembic")
        ) + f"-sqlite{sqlite3.sqlite_version}"
    except metadata.PackageNotFoundError:
        key = "unversioned"
    folder = cache_root() / "mlflow-store"
    return folder / f"{key}.db", folder / f"{key}.json"


def _from_template(tmp: Path, root: str) -> bool:
    """Write the store at ``tmp`` as a copy of the kept template; False (and no ``tmp``) when
    there is none or it cannot be used."""
    import json
    import shutil
    import sqlite3

    template, meta = _template_paths()
    try:
        kept_root = json.loads(meta.read_text())["root"]
        shutil.copyfile(template, tmp)
        con = sqlite3.connect(tmp)
        try:
            row = con.execute(
                "SELECT artifact_location FROM experiments WHERE experiment_id = 0"
            ).fetchone()
            if row is None or not row[0].startswith(kept_root):
                raise ValueError(f"{template}: not a template of this kind")
            now = int(time.time() * 1000)
            con.execute(
                "UPDATE experiments SET artifact_location = ?, creation_time = ?, "
                "last_update_time = ? WHERE experiment_id = 0",
                (root + row[0][len(kept_root) :], now, now),
            )
            con.commit()
        finally:
            con.close()
        return True
    except (OSError, ValueError, KeyError, TypeError, sqlite3.Error):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        return False


def _save_template(tmp: Path, root: str) -> None:
    """Keep the store MLflow just made at ``tmp`` (nothing written to it yet) as the template;
    atomically, and never failing the caller."""
    import json
    import shutil

    from .io import atomic_write_text

    template, meta = _template_paths()
    part = template.with_name(f".{template.name}.{os.getpid()}")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp, part)
        os.replace(part, template)
        atomic_write_text(meta, json.dumps({"root": root}))
    except OSError:
        with contextlib.suppress(OSError):
            part.unlink()


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


@dataclass
class OpenedRun:
    """An MLflow run that `open_run` found or created and marked running."""

    client: Any  # the MlflowClient of the store
    experiment_id: str
    run_id: str
    existing: Any | None  # the run found, as it was before it was opened; None when created

    @property
    def logged_params(self) -> dict[str, str]:
        """The params the run had when it was opened (none for a run just created)."""
        return dict(self.existing.data.params) if self.existing is not None else {}

    def logged_steps(self, keys=None) -> set[tuple[str, int]]:
        """The ``(metric, step)`` points the run has of ``keys`` (default: every metric it had
        when it was opened); none for a run just created."""
        if self.existing is None:
            return set()
        keys = self.existing.data.metrics if keys is None else keys
        return {(k, m.step) for k in keys for m in self.client.get_metric_history(self.run_id, k)}


def open_run(
    uri: str,
    experiment: str,
    run_name: str,
    fingerprint: str,
    tags: dict[str, str],
    *,
    run_id: str | None = None,
    status_if_failed: str | None = None,
) -> OpenedRun:
    """Open the MLflow run of a lorapipe run: find it (`find_run`) or create it, and mark it
    running. The one way both writers (`tracking.log_run`, `live_tracking.LiveTracker`) reach
    their run, so that they always end on the same one for one fingerprint.

    Creates the sqlite store (`ensure_sqlite_store`) and the experiment when missing. A new run
    gets ``tags`` at creation, so that a run interrupted later is still found by its fingerprint
    tag (``tags`` should carry it); a run found is marked RUNNING, then its tags are set again.

    Args:
        fingerprint: what the run is found by (the ``lorapipe.fingerprint`` tag).
        run_id: the run to use when it exists in this store with this fingerprint (else the run
            is found by fingerprint, with a warning).
        status_if_failed: the status (FAILED) given to a found run when setting its tags fails
            after it was marked RUNNING; None leaves it RUNNING.
    """
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    ensure_sqlite_store(uri)
    client = MlflowClient(tracking_uri=uri)
    exp_id = open_experiment(client, experiment, uri)
    found = find_run(client, exp_id, fingerprint, run_id)
    if run_id and found is not None and found.info.run_id != run_id:
        log.warning(
            "MLflow run %s (named in the run's files) is not in %s; logging to run %s instead",
            run_id,
            uri,
            found.info.run_id,
        )
    tag_list = [RunTag(k, str(v)[:MAX_TAG_VAL]) for k, v in tags.items()]
    if found is None:
        run_id = client.create_run(
            exp_id, run_name=run_name, tags={t.key: t.value for t in tag_list}
        ).info.run_id
        return OpenedRun(client, exp_id, run_id, None)
    # A rerun (after a crash, or of a finished run) continues the same MLflow run.
    run_id = found.info.run_id
    client.update_run(run_id, status="RUNNING")
    try:
        for i in range(0, len(tag_list), 100):
            client.log_batch(run_id, tags=tag_list[i : i + 100])
    except BaseException:
        if status_if_failed:
            with contextlib.suppress(Exception):  # keep the original error, not a second one
                client.set_terminated(run_id, status=status_if_failed)
        raise
    return OpenedRun(client, exp_id, run_id, found)
