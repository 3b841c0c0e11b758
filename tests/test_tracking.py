"""Where runs are tracked, and what happens when the tracking server cannot be reached."""

from __future__ import annotations

import socket
import time

import pytest

from pipeline.tracking import resolve_tracking_uri


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_default_is_a_local_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert resolve_tracking_uri("sqlite:////given.db", tmp_path) == "sqlite:////elsewhere/m.db"


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"MLflow tracking server {uri} is unreachable"):
        resolve_tracking_uri(uri, tmp_path)
    assert time.perf_counter() - start < 10
