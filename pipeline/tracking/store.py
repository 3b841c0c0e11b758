"""Where MLflow runs go: the tracking store (a local SQLite file, or a server), its one-line failures, and what is
written to it under its lock so that concurrent runs on one store all land.

Every run is tracked without extra flags: ``--tracking_uri`` if given, else ``MLFLOW_TRACKING_URI``, else a SQLite
store ``<output_dir>/mlruns.db`` (MLflow 3 rejects the plain file store); ``--tracking_uri none`` tracks nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from monai.utils import path_to_sqlite_uri, path_to_uri

from pipeline.errors import find_cause
from pipeline.io import file_lock, file_sha256

__all__ = [
    "TRACKING_OFF",
    "StoreUnavailable",
    "artifact_location",
    "check_tracking_server",
    "datalist_fingerprint",
    "experiment_id",
    "log_datalist",
    "resolve_tracking_uri",
    "store_errors",
    "store_lock",
    "tracking_off",
]


TRACKING_OFF = "none"  # --tracking_uri none: no MLflow run, no store, nothing logged


def tracking_off(uri: str | None) -> bool:
    """Whether ``uri`` (``--tracking_uri``) turns MLflow off: :data:`TRACKING_OFF`, in any case."""
    return isinstance(uri, str) and uri.strip().lower() == TRACKING_OFF


def resolve_tracking_uri(uri: str | None, output_dir: str | os.PathLike, timeout_s: float = 5.0) -> str:
    """``uri`` (given on the command line), else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<output_dir>/mlruns.db``:
    an explicit URI wins over the environment, as with MLflow's own clients (``MlflowClient(tracking_uri=...)``).

    An HTTP(S) tracking server is contacted first (its ``/health`` endpoint, ``timeout_s``): an unreachable one
    fails within seconds with a ``ConnectionError`` naming the URI, instead of MLflow's minutes of retries.
    """
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        if chosen.startswith(("http://", "https://")):
            check_tracking_server(chosen, timeout_s)
        return chosen
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return path_to_sqlite_uri(str(Path(output_dir).resolve() / "mlruns.db"))


@contextmanager
def store_lock(uri: str | None):
    """Hold an exclusive lock on the folder of a SQLite tracking store (no-op for other stores; no lock file).

    MLflow creates and migrates a SQLite store's schema, and creates experiments, without coordination between
    processes: two runs starting at once on a new store fail. Store set-up and experiment creation are done under
    this lock, so that concurrent runs on one store all land.
    """
    folder = _sqlite_folder(uri)
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder):
        yield


def _sqlite_folder(uri: str | None) -> Path | None:
    """The folder of a local SQLite store's database file; None for other stores."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :]).parent


def artifact_location(uri: str | None) -> str | None:
    """Where a new experiment's artifacts go: for a local SQLite store, ``mlruns/`` next to its database (as MONAI's
    ``MLFlowHandler`` does), so that store and artifacts move, and are deleted, together; otherwise MLflow's choice
    (a server's artifact root). MLflow's own default for SQLite is ``./mlruns`` of whatever the working folder is."""
    folder = _sqlite_folder(uri)
    return None if folder is None else path_to_uri(folder / "mlruns")


def experiment_id(client, name: str) -> str:
    """Id of the MLflow experiment ``name``, created if missing (under :func:`store_lock`, so concurrent runs agree;
    artifacts at :func:`artifact_location`)."""
    with store_lock(client.tracking_uri):
        experiment = client.get_experiment_by_name(name)
        if experiment:
            return experiment.experiment_id
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri))


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Raise ``ConnectionError`` (naming ``uri`` and the fix) unless the MLflow server answers within ``timeout_s``,
    on ``/health`` and on its REST API (a search for one experiment): a server whose API fails (HTTP 5xx, e.g. its
    backend store is locked, full or gone) is refused at once, instead of after MLflow's minutes of retries."""
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout_s):
            pass
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConnectionError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it, or fix --tracking_uri / "
            "MLFLOW_TRACKING_URI, or unset both to track into the local store <output_dir>/mlruns.db."
        ) from err
    try:
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout=timeout_s):
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:  # the API answered (an older server's method or path rules): it works
            return
        detail = err.read(300).decode(errors="replace").strip().splitlines()
        raise ConnectionError(
            f"MLflow tracking server {uri} is up but its API fails (HTTP {err.code}"
            f"{': ' + detail[0] if detail else ''}); see the server's log (its backend store may be locked, full "
            "or read-only), or track elsewhere with --tracking_uri (none: no tracking)."
        ) from err
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(
            f"MLflow tracking server {uri} answers /health but not its API ({getattr(err, 'reason', err)}); see the "
            "server's log, or track elsewhere with --tracking_uri (none: no tracking)."
        ) from err


def datalist_fingerprint(path: str | os.PathLike) -> str:
    """First 16 hex digits of the SHA-256 of the datalist file: runs on the same list share it."""
    return file_sha256(path)[:16]


def log_datalist(client, run_id: str, datalist: str | os.PathLike, context: str) -> None:
    """Log ``datalist`` as a dataset input of the run ``run_id`` (its "Datasets" on the run page), under
    :func:`store_lock`: MLflow's SQL store looks for the dataset and inserts it if missing without coordination
    between processes, so two runs logging one datalist at once on a SQLite store fail (``UNIQUE constraint failed:
    datasets``). A server's store is the server's to serialise (such a failure there is a 5xx: spooled, retried)."""
    with store_lock(client.tracking_uri):
        client.log_inputs(run_id, [_datalist_input(datalist, context)])


def _datalist_input(datalist: str | os.PathLike, context: str) -> DatasetInput:
    """``datalist`` as an MLflow dataset input: named by its folder and file, with the fingerprint of
    :func:`datalist_fingerprint` as digest and ``context`` (``training``, ``evaluation``)."""
    path = Path(datalist).resolve()
    dataset = Dataset(
        name=f"{path.parent.name}/{path.name}",
        digest=datalist_fingerprint(path),
        source_type="local",
        source=json.dumps({"uri": str(path)}),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


class StoreUnavailable(ConnectionError):
    """A local SQLite tracking store that cannot be used when a run starts: on a full or read-only disk, damaged, or
    locked by another process for longer than MLflow waits (20 s). A ``ConnectionError``, as an unreachable server is:
    the command line shows it as one line (exit 2)."""


@contextmanager
def store_errors(uri: str | None):
    """Turn a SQLite store's failure inside the block into :class:`StoreUnavailable`, one line naming the store and
    the fix. Used where a run first writes to its store (creating it, its experiment and run), so that a store that
    cannot be used stops the run before any work; later writes of a run that lose the store are spooled instead
    (:mod:`pipeline.tracking.spool`: MLflow reports them as ``TEMPORARILY_UNAVAILABLE``), and nothing is lost."""
    try:
        yield
    except Exception as err:
        cause = find_cause(err, sqlite3.Error)
        if cause is None:
            raise
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise StoreUnavailable(
            f"MLflow tracking store {uri} cannot be used ({reason}); free disk space or make the store writable, or "
            "track elsewhere with --tracking_uri (none: no tracking)."
        ) from err
