"""Where runs are tracked, and what happens when the tracking server cannot be reached."""

from __future__ import annotations

import http.server
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import free_port
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from pipeline.tracking import SpooledClient, resolve_tracking_uri


def test_default_is_a_local_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert resolve_tracking_uri(None, tmp_path) == "sqlite:////elsewhere/m.db", "the environment, when none is given"
    assert resolve_tracking_uri("sqlite:////given.db", tmp_path) == "sqlite:////given.db", "the given one wins"


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"MLflow tracking server {uri} is unreachable"):
        resolve_tracking_uri(uri, tmp_path)
    assert time.perf_counter() - start < 10


class BrokenApiServer:
    """A real HTTP server on 127.0.0.1 that answers ``/health`` with 200 and every other path with ``api_status``
    (500: a tracking server whose backend store fails; 404: one whose API answers, if not this call) and ``body``."""

    def __init__(self, api_status: int, body: bytes = b"Internal error: database is locked") -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                self.send_response(200 if self.path == "/health" else api_status)
                self.end_headers()
                self.wfile.write(b"OK" if self.path == "/health" else body)

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_server_whose_api_fails_is_refused_at_once_naming_it(tmp_path):
    """``/health`` answers but the REST API gives HTTP 500: refused in seconds with the server's first line, not
    after MLflow's retries; negative control: an API that answers (404 here) passes the check."""
    broken, answering = BrokenApiServer(500), BrokenApiServer(404)
    try:
        start = time.perf_counter()
        with pytest.raises(ConnectionError) as info:
            resolve_tracking_uri(broken.uri, tmp_path)
        assert time.perf_counter() - start < 10
        message = str(info.value)
        assert f"MLflow tracking server {broken.uri} is up but its API fails (HTTP 500" in message
        assert "database is locked" in message and "--tracking_uri" in message
        assert resolve_tracking_uri(answering.uri, tmp_path) == answering.uri
    finally:
        broken.close()
        answering.close()


class FlakyStore:
    """A stand-in for MlflowClient whose server is down while ``down`` is set (a requests ConnectionError, as
    MLflow raises it) and that records what reached it."""

    tracking_uri = "sqlite:///unused.db"  # not HTTP: no health probe

    def __init__(self):
        self.down, self.received = False, []

    def _receive(self, *entry):
        if self.down:
            raise MlflowException("API request failed") from requests.exceptions.ConnectionError("refused")
        self.received.append(entry)

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._receive("batch", [(m.key, m.step) for m in metrics], [(p.key, p.value) for p in params])

    def log_artifact(self, run_id, local_path, artifact_path=None):
        self._receive("artifact", Path(local_path).name, Path(local_path).read_text())

    def set_terminated(self, run_id, status=None, end_time=None):
        self._receive("terminated", status)


def test_a_server_that_fails_with_5xx_in_the_middle_of_a_run_is_an_outage_and_a_4xx_is_not(tmp_path, monkeypatch):
    """A tracking server whose API starts failing with HTTP 5xx during a run (a locked or full store: MLflow's JSON
    error, or a proxy's plain page) is treated as an outage: the write is spooled, the run goes on. Negative control:
    a 4xx rejects the write itself and is raised, not spooled."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as bounded_http() sets it in a run
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    internal = json.dumps({"error_code": "INTERNAL_ERROR", "message": "database is locked"}).encode()
    rejected = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad metric"}).encode()
    servers = {  # 500 and 503 come back as MLflow's RetryError, 507 as the server's own error (not retried by MLflow)
        "json 500": BrokenApiServer(500, internal),
        "plain 503": BrokenApiServer(503, b"<html>Service Unavailable</html>"),
        "json 507": BrokenApiServer(507, json.dumps({"error_code": "INTERNAL_ERROR", "message": "disk full"}).encode()),
        "plain 507": BrokenApiServer(507, b"Insufficient Storage"),
        "json 400": BrokenApiServer(400, rejected),
    }
    try:
        for name, server in servers.items():
            client = SpooledClient(MlflowClient(server.uri), tmp_path / name / "tracking_spool", retry_s=3600)
            if name == "json 400":
                with pytest.raises(MlflowException, match="bad metric"):
                    client.log_batch("r", metrics=[Metric("loss", 1.0, 0, 1)])
                assert client.pending == 0, "a rejected write is not kept for later"
            else:
                client.log_batch("r", metrics=[Metric("loss", 1.0, 0, 1)])
                client.log_param("r", "lr", "0.001")  # the next write waits in the spool too, in order
                assert client.pending == 2, name
    finally:
        for server in servers.values():
            server.close()


def sqlite_error(database: Path, statement: str, locked: bool) -> sqlite3.OperationalError:
    """The error SQLite raises for ``statement`` on ``database`` (while another connection holds an exclusive lock on
    it if ``locked``), as MLflow's store raises it (inside an ``MlflowException``), without MLflow's 20 s busy wait."""
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("CREATE TABLE IF NOT EXISTS runs (id TEXT)")
    if locked:
        holder.execute("BEGIN EXCLUSIVE")
    try:
        sqlite3.connect(database, timeout=0).execute(statement)
    except sqlite3.OperationalError as error:
        return error
    finally:
        holder.close()
    raise AssertionError(f"{statement} did not fail")


def test_a_locked_local_store_is_an_outage_and_a_broken_one_is_not(tmp_path):
    """A local SQLite store that another process keeps locked (two trainings on one store on a loaded machine) is
    treated as an outage, so the write is spooled and the training goes on; negative control: a store whose schema
    is wrong (no such table) is an error of the store itself, raised."""
    from pipeline.tracking.spool import is_unreachable

    def as_mlflow_raises(error):
        try:
            raise MlflowException(str(error)) from error
        except MlflowException as wrapped:
            return wrapped

    locked = sqlite_error(tmp_path / "s.db", "INSERT INTO runs VALUES ('a')", locked=True)
    assert "database is locked" in str(locked)
    assert is_unreachable(as_mlflow_raises(locked))
    broken = sqlite_error(tmp_path / "s.db", "SELECT * FROM no_such_table", locked=False)
    assert not is_unreachable(as_mlflow_raises(broken))


def test_spooled_writes_keep_their_order_and_content(tmp_path):
    store = FlakyStore()
    client = SpooledClient(store, tmp_path / "tracking_spool", retry_s=0)
    client.log_batch("r", metrics=[Metric("loss", 1.0, 0, 1)])
    store.down = True
    client.log_batch("r", metrics=[Metric("loss", 0.9, 0, 2)])
    figure = tmp_path / "figure.txt"
    figure.write_text("epoch 2")
    client.log_artifact("r", figure)
    figure.write_text("epoch 3")  # the run rewrites the file later: the spool keeps the version it logged
    client.log_param("r", "note", "x")
    assert client.pending == 3 and store.received == [("batch", [("loss", 1)], [])]
    store.down = False
    client.set_terminated("r")  # the server is back: the spool first, in order, then this write
    assert store.received == [
        ("batch", [("loss", 1)], []),
        ("batch", [("loss", 2)], []),
        ("artifact", "figure.txt", "epoch 2"),
        ("batch", [], [("note", "x")]),
        ("terminated", "FINISHED"),
    ]
    assert client.pending == 0 and not (tmp_path / "tracking_spool" / "spool.jsonl").exists()
    # an error that is not an outage (a rejected write) is raised, not spooled
    store.log_batch = lambda *a, **k: (_ for _ in ()).throw(MlflowException("INVALID_PARAMETER_VALUE"))
    with pytest.raises(MlflowException, match="INVALID_PARAMETER_VALUE"):
        client.log_batch("r", metrics=[Metric("loss", float("nan"), 0, 3)])
    assert client.pending == 0


def test_a_write_torn_by_a_crash_loses_itself_only(tmp_path):
    """A crash in the middle of an append leaves half a line: the writes before and after it still go through, in
    order, and sync tells an empty spool file from a failure."""
    from pipeline.tracking.spool import sync

    store = FlakyStore()
    client = SpooledClient(store, tmp_path / "run" / "tracking_spool", retry_s=0)
    store.down = True
    client.log_batch("r", metrics=[Metric("loss", 1.0, 0, 1)])
    with open(client.spool, "a") as handle:  # the torn write: no end of line
        handle.write('{"op": "log_batch", "run_id": "r", "metrics": [["loss", 0.9')
    client.log_batch("r", metrics=[Metric("loss", 0.8, 0, 3)])  # the resumed run appends after it
    assert client.pending == 2
    store.down = False
    assert client.flush() and store.received == [("batch", [("loss", 1)], []), ("batch", [("loss", 3)], [])]
    empty = tmp_path / "other" / "tracking_spool" / "spool.jsonl"
    empty.parent.mkdir(parents=True)
    empty.write_text("")
    assert sync(tmp_path / "other") == {str(empty): 0} and not empty.exists()


def test_resume_continues_its_own_run_when_another_training_has_the_same_name(tmp_path, monkeypatch):
    """Two trainings A and B of one name on one store, both killed (runs left RUNNING), then both resumed: each
    continues the run recorded next to its own checkpoints. The race is forced: B's run is the newest RUNNING run of
    that name when A resumes, which is what a search by name picks."""
    from ignite.engine import Engine
    from mlflow import MlflowClient

    from pipeline.tracking import MLflowRunHandler

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlruns.db"

    def started(name: str, resume: bool, commit: str = "c0") -> str:
        handler = MLflowRunHandler(
            tracking_uri=uri,
            experiment_name="shared",
            run_name="cevae",
            resume=resume,
            run_info_path=tmp_path / name / "mlflow_run.json",
            experiment_param={"git_commit": commit, "epochs": 2},
        )
        handler.start(Engine(lambda engine, batch: None))
        return handler.cur_run.info.run_id

    first = {name: started(name, resume=False) for name in ("A", "B")}  # both killed: left RUNNING
    assert first["A"] != first["B"]
    for name in ("A", "B"):
        assert started(name, resume=True) == first[name], f"{name} resumed into its own run"
    client = MlflowClient(uri)
    client.set_terminated(first["A"], status="KILLED")
    assert started("A", resume=True) == first["A"] and client.get_run(first["A"]).info.status == "RUNNING"
    assert started("C", resume=True) not in first.values(), "no record: a new run, not another training's"
    # the code changed between the kill and the resume: the run keeps its first commit, the new one is a tag
    assert started("A", resume=True, commit="c1") == first["A"]
    run = client.get_run(first["A"])
    assert run.data.params["git_commit"] == "c0" and run.data.tags["resumed.git_commit"] == "c1"
    assert "resumed.epochs" not in run.data.tags, "unchanged values are not repeated"
    client.set_terminated(first["B"], status="FINISHED")  # B completed; trained further with more epochs
    extended = started("B", resume=True)
    assert extended != first["B"] and client.get_run(extended).data.tags["cevae.previous_run_id"] == first["B"]


def test_two_runs_logging_one_datalist_at_once_both_land(tmp_path, monkeypatch):
    """MLflow's SQL store looks for a dataset, then inserts it: two runs logging the same datalist at once on one
    SQLite store both found none and the second insert failed (``UNIQUE constraint failed``; seen in CI as a failed
    training). Race forced: each thread waits after its look-up until the other has looked too (or 2 s). Under
    ``log_datalist``'s store lock the second looks only after the first inserted: both land, one dataset row."""
    from mlflow import MlflowClient
    from mlflow.store.tracking.dbmodels.models import SqlDataset
    from sqlalchemy.orm import Query

    from pipeline.tracking import log_datalist

    datalist = tmp_path / "data" / "datalist.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    uri = f"sqlite:///{tmp_path}/store.db"
    setup = MlflowClient(uri)
    experiment = setup.create_experiment("cevae")
    run_ids = [setup.create_run(experiment).info.run_id for _ in range(2)]
    looked_up = threading.Barrier(2)
    real_all = Query.all

    def all_then_wait(query):
        rows = real_all(query)
        if query.column_descriptions[0]["entity"] is SqlDataset:
            try:
                looked_up.wait(timeout=2)
            except threading.BrokenBarrierError:  # the other thread waits for the lock: it cannot look now
                pass
        return rows

    monkeypatch.setattr(Query, "all", all_then_wait)
    errors = []

    def log(run_id):
        try:
            log_datalist(MlflowClient(uri), run_id, datalist, "training")
        except Exception as err:  # noqa: BLE001 - the assertion below shows it
            errors.append(err)

    threads = [threading.Thread(target=log, args=(run_id,)) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    monkeypatch.undo()
    for run_id in run_ids:
        (dataset,) = setup.get_run(run_id).inputs.dataset_inputs
        assert dataset.dataset.name == "data/datalist.json"
    with sqlite3.connect(tmp_path / "store.db") as db:
        assert db.execute("select count(*) from datasets").fetchone() == (1,)


@pytest.mark.parametrize(
    "pragma, reason, stores",
    [
        ("PRAGMA query_only = ON", "attempt to write a readonly database", ("broken.db", "new.db")),
        ("PRAGMA max_page_count = 1", "database or disk is full", ("new.db",)),  # no page to spare: a new store
    ],
)
def test_a_read_only_or_full_store_stops_a_run_at_its_start_in_one_line_and_later_writes_are_spooled(
    tmp_path, pragma, reason, stores
):
    """A SQLite store that cannot be written (read-only: SQLite's ``query_only``; full: a page limit, SQLite's own
    SQLITE_FULL), set on every connection the process opens: the creation of a new store and the first write of a
    new run are one ``ConnectionError`` line naming the store and the fix (the command line prints it, exit 2), not
    MLflow's traceback; a run that loses its store later keeps its writes in the spool. Negative control: the same
    calls on a store without the pragma succeed."""
    from ignite.engine import Engine as Trainer
    from mlflow import MlflowClient
    from mlflow.entities import Param
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from pipeline.bundle_support import _user_error
    from pipeline.tracking import MLflowRunHandler, StoreUnavailable
    from pipeline.tracking.spool import SPOOL_FILENAME, read_spool

    healthy = tmp_path / "healthy.db"
    client = MlflowClient(f"sqlite:///{healthy}")
    run_id = client.create_run(client.create_experiment("cevae")).info.run_id
    broken = tmp_path / "broken.db"
    broken.write_bytes(healthy.read_bytes())  # a copy: its connections are opened with the pragma below

    def restrict(connection, _record):
        cursor = connection.cursor()
        cursor.execute(pragma)
        cursor.close()

    trainer = Trainer(lambda engine, batch: None)
    event.listen(Engine, "connect", restrict)
    try:
        for name in stores:
            uri = f"sqlite:///{tmp_path / name}"
            with pytest.raises(StoreUnavailable) as info:
                MLflowRunHandler(tracking_uri=uri, experiment_name="cevae", run_name="a").start(trainer)
            line = str(info.value)
            assert line.startswith(f"MLflow tracking store {uri} cannot be used (") and reason in line, line
            assert "\n" not in line and "--tracking_uri" in line
            wrapped = RuntimeError("Failed to evaluate")  # as MONAI's bundle runner wraps it
            wrapped.__cause__ = info.value
            assert _user_error(wrapped) is info.value, "the command line shows it as one line"
        spooled = SpooledClient(MlflowClient(f"sqlite:///{broken}"), tmp_path / "tracking_spool", retry_s=3600)
        spooled.log_batch(run_id, params=[Param("note", "x" * 5000)])  # needs new pages: spooled, not raised
    finally:
        event.remove(Engine, "connect", restrict)
    (entry,) = read_spool(tmp_path / "tracking_spool" / SPOOL_FILENAME)
    assert entry["op"] == "log_batch" and entry["params"] == [["note", "x" * 5000]]
    handler = MLflowRunHandler(tracking_uri=f"sqlite:///{tmp_path / 'other.db'}", experiment_name="cevae", run_name="a")
    handler.start(trainer)  # negative control: without the pragma the same calls work
    assert handler.client.get_run(handler.cur_run.info.run_id).info.run_name == "a"
