"""MLflow writes that survive a tracking-server outage: nothing logged is lost, and training never waits for it.

:class:`SpooledClient` wraps an ``MlflowClient``. Its writes (``log_batch``, ``log_param``, ``set_tag``,
``log_artifact``, ``log_model``, ``set_terminated``) go to the server with a short timeout and no retry loop
(:func:`bounded_http`); when the server cannot be reached, the write is appended to a spool in the output folder
(``tracking_spool/spool.jsonl``, one JSON line per write, artifacts copied beside it), the log says so once, and
later writes go straight to the spool. At a later write, at most every ``retry_s`` seconds, one health probe of a
few seconds checks whether the server is back; if it is, the spool is sent in order, then the write. What is still
spooled when the run ends is sent by ``python scripts/sync_tracking.py OUTPUT_DIR`` (:func:`sync`). Reads are
passed to the wrapped client unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from contextlib import nullcontext
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

from pipeline.io import atomic_write_text, file_lock
from pipeline.tracking.model import COMPANION_FILES, ModelLogging

__all__ = ["SPOOL_DIRNAME", "SpooledClient", "bounded_http", "is_unreachable", "report_pending", "sync"]

logger = logging.getLogger(__name__)

SPOOL_DIRNAME = "tracking_spool"
SPOOL_FILENAME = "spool.jsonl"
HTTP_TIMEOUT_S, PROBE_TIMEOUT_S = "10", 3.0


def bounded_http() -> None:
    """Make MLflow's HTTP requests of this process fail within seconds instead of retrying for minutes (its defaults:
    7 retries with exponential backoff, 120 s timeouts); explicit settings in the environment are kept."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)


def is_unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or its cause chain) says the tracking server could not be reached or is unavailable: no
    connection, a timeout, or an answer with an HTTP 5xx status (the server's own failure, e.g. a locked or full
    backend store: worth retrying, unlike a 4xx that rejects the write itself). MLflow's HTTP adapter turns the
    statuses it deems transient (408, 429, 500, 502-504) into a ``RetryError`` once its retries are spent. A local
    SQLite store that another process keeps locked past MLflow's 20 s busy timeout (``database is locked``, e.g.
    several trainings writing to one store on a loaded machine) is unavailable in the same sense."""
    import sqlite3

    import requests

    while err is not None:
        if _server_error(err):
            return True
        if isinstance(err, sqlite3.OperationalError) and "database is locked" in str(err):
            return True
        if isinstance(
            err,
            (
                requests.exceptions.ConnectionError,
                requests.exceptions.Timeout,
                requests.exceptions.RetryError,
                ConnectionError,
                TimeoutError,
                urllib.error.URLError,
            ),
        ):
            return True
        if getattr(err, "error_code", None) == "TEMPORARILY_UNAVAILABLE":
            return True
        err = err.__cause__ or err.__context__
    return False


def _server_error(err: BaseException) -> bool:
    """Whether ``err`` is the server's answer with an HTTP 5xx status: MLflow raises a ``RestException`` for an
    error body in JSON, and an ``MlflowException`` that names the status otherwise (a proxy's page, plain text).
    Errors the client raises itself are neither."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(err, RestException):  # pytype cannot see MLflow's classes (it reads them as Any): no narrowing
        return err.get_http_status_code() >= 500  # pytype: disable=attribute-error
    return isinstance(err, MlflowException) and re.search(r"failed with error code 5\d\d\b", str(err)) is not None


def _server_answers(uri: str) -> bool:
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S):
            return True
    except (urllib.error.URLError, OSError):
        return False


class SpooledClient:
    """An ``MlflowClient`` whose writes are spooled to ``spool_dir`` while the server is unreachable (see the module
    docstring). ``retry_s``: seconds between probes of an unreachable server."""

    def __init__(self, client, spool_dir: str | os.PathLike, retry_s: float = 30.0) -> None:
        bounded_http()
        self.client, self.spool_dir, self.retry_s = client, Path(spool_dir), retry_s
        self.spool = self.spool_dir / SPOOL_FILENAME
        self._offline_since: float | None = None
        self._next_probe = 0.0

    def __getattr__(self, name: str):  # reads and everything not spooled: the wrapped client
        return getattr(self.client, name)

    # ------------------------------------------------------------------------------------------ writes
    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), synchronous=None) -> None:
        self._write(
            {
                "op": "log_batch",
                "run_id": run_id,
                "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                "params": [[p.key, p.value] for p in params],
                "tags": [[t.key, t.value] for t in tags],
            }
        )

    def log_param(self, run_id: str, key: str, value) -> None:
        self.log_batch(run_id, params=[Param(key, str(value))])

    def set_tag(self, run_id: str, key: str, value) -> None:
        self.log_batch(run_id, tags=[RunTag(key, str(value))])

    def log_artifact(self, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._write(
            {"op": "log_artifact", "run_id": run_id, "local_path": str(local_path), "artifact_path": artifact_path}
        )

    def log_inputs(self, run_id: str, datasets: list[DatasetInput]) -> None:
        self._write(
            {
                "op": "log_inputs",
                "run_id": run_id,
                "datasets": [
                    {
                        "dataset": [i.dataset.name, i.dataset.digest, i.dataset.source_type, i.dataset.source],
                        "tags": [[t.key, t.value] for t in i.tags],
                    }
                    for i in datasets
                ],
            }
        )

    def log_model(self, run_id: str, model_logging) -> None:
        """Log the trained model (:class:`~pipeline.tracking.model.ModelLogging`); spooled with a copy of its
        checkpoint, ``config.json`` and ``threshold.json``."""
        self._write(
            {
                "op": "log_model",
                "run_id": run_id,
                "checkpoint": str(model_logging.checkpoint),
                "registered_name": model_logging.registered_name,
                "alias": model_logging.alias,
            }
        )

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        self._write(
            {
                "op": "set_terminated",
                "run_id": run_id,
                "status": status or "FINISHED",
                "end_time": end_time or int(time.time() * 1000),
            }
        )

    # ------------------------------------------------------------------------------------------ spool
    @property
    def pending(self) -> int:
        """Writes waiting in the spool."""
        return len(self._entries())

    def _entries(self) -> list[dict]:
        return read_spool(self.spool)

    def _send(self, entry: dict) -> None:
        op = entry["op"]
        if op == "log_batch":
            self.client.log_batch(
                entry["run_id"],
                metrics=[Metric(*m) for m in entry["metrics"]],
                params=[Param(*p) for p in entry["params"]],
                tags=[RunTag(*t) for t in entry["tags"]],
            )
        elif op == "log_artifact":
            self.client.log_artifact(entry["run_id"], entry["local_path"], entry["artifact_path"])
        elif op == "set_terminated":
            self.client.set_terminated(entry["run_id"], entry["status"], entry["end_time"])
        elif op == "log_inputs":
            datasets = [
                DatasetInput(Dataset(*d["dataset"]), [InputTag(*t) for t in d["tags"]]) for d in entry["datasets"]
            ]
            self.client.log_inputs(entry["run_id"], datasets)
        elif op == "log_model":
            logging_ = ModelLogging(entry["checkpoint"], entry["registered_name"], entry.get("alias"))
            logging_(self.client.tracking_uri, entry["run_id"])
        else:
            raise ValueError(f"unknown spooled operation {op!r} in {self.spool}")

    def _append(self, entry: dict) -> None:
        with file_lock(self.spool_dir / ".lock"):
            kept = self.spool_dir / "artifacts" / f"{len(self._entries()):06d}"
            if entry["op"] == "log_artifact":  # keep the file as it is now: the run may overwrite it later
                kept.mkdir(parents=True, exist_ok=True)
                shutil.copy2(entry["local_path"], kept)
                entry = {**entry, "local_path": str(kept / Path(entry["local_path"]).name)}
            elif entry["op"] == "log_model":  # the weights and what the model needs beside them, as they are now
                kept.mkdir(parents=True, exist_ok=True)
                checkpoint = Path(entry["checkpoint"])
                for source in (checkpoint, *(checkpoint.parent / name for name in COMPANION_FILES)):
                    shutil.copy2(source, kept)
                entry = {**entry, "checkpoint": str(kept / checkpoint.name)}
            torn = self.spool.is_file() and not self.spool.read_bytes().endswith(b"\n")
            with open(self.spool, "a") as handle:  # after a torn last line, on a line of its own
                handle.write(("\n" if torn else "") + json.dumps({**entry, "tracking_uri": self.client.tracking_uri}))
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())

    def _went_offline(self) -> None:
        if self._offline_since is None:
            self._offline_since = time.monotonic()
            logger.warning(
                "MLflow tracking server %s is unreachable; the run goes on and what it logs is kept in %s, "
                "sent when the server is back (or run: python scripts/sync_tracking.py %s)",
                self.client.tracking_uri,
                self.spool,
                self.spool_dir.parent,
            )
        self._next_probe = time.monotonic() + self.retry_s

    def flush(self) -> bool:
        """Send the spool in order if the server answers; True when nothing is left in it. Errors other than an
        unreachable server (a rejected write) propagate and leave the spool as it was."""
        with file_lock(self.spool_dir / ".lock") if self.spool_dir.is_dir() else nullcontext():
            entries = self._entries()
            if not entries:
                return True
            if not _server_answers(self.client.tracking_uri):
                return False
            for sent, entry in enumerate(entries):
                try:
                    self._send(entry)
                except Exception as err:
                    if not is_unreachable(err):
                        raise
                    atomic_write_text("".join(json.dumps(e) + "\n" for e in entries[sent:]), self.spool)
                    return False
            self.spool.unlink()
            shutil.rmtree(self.spool_dir / "artifacts", ignore_errors=True)
        if self._offline_since is not None:
            logger.warning(
                "MLflow tracking server %s is back: sent the %d writes kept in %s",
                self.client.tracking_uri,
                len(entries),
                self.spool,
            )
        self._offline_since = None
        return True

    def _write(self, entry: dict) -> None:
        if self._offline_since is not None or self.spool.is_file():  # earlier writes wait: keep the order
            if time.monotonic() < self._next_probe or not self.flush():
                self._went_offline()
                self._append(entry)
                return
        try:
            self._send(entry)
        except Exception as err:
            if not is_unreachable(err):
                raise
            self._went_offline()
            self._append(entry)


def read_spool(path: Path) -> list[dict]:
    """The writes kept in the spool file ``path``, in order. Each was appended with one ``write`` and an ``fsync``,
    so a line that is not valid JSON can only be a write that a crash tore: it is skipped with a warning naming the
    file and line (that one write is lost; it never reached the server), not a block on every later write."""
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s line %d is a write torn by a crash; skipped", path, number)
    return entries


def sync(folder: str | os.PathLike) -> dict[str, int]:
    """Send every spool under ``folder`` (training and evaluation output folders) to the tracking server its entries
    name; returns ``{spool: writes still pending}`` (0 when all went through)."""
    from mlflow import MlflowClient

    bounded_http()
    left = {}
    for spool in sorted(Path(folder).rglob(f"{SPOOL_DIRNAME}/{SPOOL_FILENAME}")):
        entries = read_spool(spool)
        if not entries:  # nothing that can be sent: an empty file, or only a torn write
            spool.unlink()
            left[str(spool)] = 0
            continue
        client = SpooledClient(MlflowClient(entries[0]["tracking_uri"]), spool.parent)
        client.flush()
        left[str(spool)] = client.pending
    return left


def report_pending(client: SpooledClient, what: str) -> None:
    """At the end of a run: one last attempt to send the spool, and one line if writes are still kept."""
    if isinstance(client, SpooledClient) and not client.flush():
        logger.warning(
            "%s: %d writes to MLflow (%s) could not be sent and are kept in %s; send them with: python "
            "scripts/sync_tracking.py %s",
            what,
            client.pending,
            client.client.tracking_uri,
            client.spool,
            client.spool_dir.parent,
        )
