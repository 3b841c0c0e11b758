"""Shared fixtures: synthetic NIfTI volumes and the real scans in ../shared/data (skipped when absent)."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# `make test` runs the suite in TEST_WORKERS pytest-xdist workers (2, the cores of CI's machine): each worker, and every
# interpreter it starts, uses one thread (torch's default of one per core would put n workers x n threads on n cores)
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# a test's ``record_property(CI_LOG, text)``: printed at the end of the run, in the CI log (a pytest-xdist worker's own
# output does not reach the terminal; its reports, with their properties, do)
CI_LOG = "ci_log"


def pytest_terminal_summary(terminalreporter) -> None:
    for report in terminalreporter.stats.get("passed", []):
        for name, text in getattr(report, "user_properties", []):
            if name == CI_LOG:
                terminalreporter.write_line(f"\n{text}")


def pytest_collection_modifyitems(items) -> None:
    """The files with the most slow end-to-end tests first, the others after in their order (a stable sort: each file's
    tests stay together and in order). `make test` hands whole files to its workers; a long file started last would
    leave one worker alone at the end."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


def input_error(exc: BaseException):
    """The :class:`InputError` behind ``exc`` (MONAI wraps transform errors in ``RuntimeError``), or None."""
    from pipeline.errors import InputError

    while exc is not None and not isinstance(exc, InputError):
        exc = exc.__cause__
    return exc


def script_main(name: str):
    """The ``main(argv)`` function of ``scripts/<name>.py``, imported (``scripts`` is a package)."""
    return importlib.import_module(f"scripts.{name}").main


def brain_phantom(shape=(48, 56, 40), seed=0, lesion=True):
    """A skull-stripped ellipsoid 'brain' with smooth structure and an optional bright lesion, in RAS voxel order.

    Returns ``(image, brainmask, label)`` arrays (label all-zero when ``lesion`` is False).
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = ((grid / np.array([0.8, 0.9, 0.85])[:, None, None, None]) ** 2).sum(0) <= 1
    structure = 300 + 80 * np.sin(4 * grid[0]) * np.cos(3 * grid[1]) + 40 * grid[2] + rng.normal(0, 5, shape)
    label = (((grid - np.array([0.3, 0.2, 0.1])[:, None, None, None]) / 0.18) ** 2).sum(0) <= 1
    label &= brain & lesion
    image = np.where(brain, structure + 400 * label, 0).astype(np.float32)
    return image, brain.astype(np.uint8), label.astype(np.uint8)


def save_nifti(array, path, affine=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), path)
    return str(path)


@pytest.fixture
def phantom_files(tmp_path):
    """Files of one phantom subject in RAS: dict with image, brainmask, label paths."""
    image, mask, label = brain_phantom()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return {
        "image": save_nifti(image, tmp_path / "image.nii.gz", affine),
        "brainmask": save_nifti(mask, tmp_path / "mask.nii.gz", affine),
        "label": save_nifti(label, tmp_path / "label.nii.gz", affine),
    }


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real scans not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A tiny demo data set (3 healthy training subjects, 4 test subjects, one of each lesion kind)."""
    from pipeline.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("tiny_demo"), n_train=3, n_test=4, seed=0)


@pytest.fixture(scope="session")
def two_test_subjects(tiny_demo, tmp_path_factory):
    """A datalist with the first two of ``tiny_demo``'s test subjects only, for evaluations whose figures do not
    depend on the test set's size (each test subject costs an evaluation about 3 s)."""
    from pipeline.data.datalist import load_datalist, write_datalist

    folder = tmp_path_factory.mktemp("two_test_subjects")
    return write_datalist({"test": load_datalist(tiny_demo, "test")[:2]}, folder / "two_test_subjects.json")


TRAIN_EPOCHS = 8


@pytest.fixture(scope="session")
def evaluated_run(tiny_demo, tmp_path_factory):
    """A tiny ceVAE trained ``TRAIN_EPOCHS`` epochs on ``tiny_demo`` and evaluated on its test subjects:
    ``(output_dir, metrics)``; the checkpoint and its ``threshold.json`` are in ``output_dir/checkpoints``."""
    import json

    from bundle_helpers import run_bundle

    out = tmp_path_factory.mktemp("evaluated")
    run_bundle(out, tiny_demo, epochs=TRAIN_EPOCHS, tracking_uri=None)  # the shared run is tracked (its own store)
    run_bundle(out, tiny_demo, ("train.json", "evaluate.json"), tracking_uri=None)
    return out, json.loads((out / "metrics.json").read_text())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# a tracking server only: MLflow 3's server otherwise starts a job runner and 7 huey consumer processes (GenAI jobs,
# trace roll-ups), over 10 s of CPU (ps) on a 2-core machine at every start, taken from the tests running beside it
SERVER_ENV = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite store and served artifacts in ``folder``) that can be stopped
    and started again on the same port and store, as a tracking server that goes down and comes back. It stops as a
    crash stops it: SIGKILL to its process group (the server and its workers; a graceful stop takes ~3 s)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout_s: float = 90.0) -> None:
        log = open(self.folder / "server.log", "a")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.folder}/server.db",
                "--artifacts-destination",
                str(self.folder / "server_artifacts"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=SERVER_ENV,
            start_new_session=True,  # its own process group, which stop() ends
        )
        self.wait_until_up(timeout_s)

    def wait_until_up(self, timeout_s: float = 90.0) -> None:
        """Wait for the server started in ``self.process`` to answer on ``/health``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.folder / "server.log"
                    pytest.fail(f"mlflow server did not start:\n{log.read_text()[-2000:] if log.is_file() else ''}")
                time.sleep(0.3)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None


class Outage:
    """A TCP proxy on 127.0.0.1 in front of ``server`` (a running :class:`MlflowServer`) that goes down and comes
    back as a crashed server does, without restarting the server (each start costs a fresh MLflow import):
    :meth:`down` closes the port and resets every open connection (clients get "connection refused"), :meth:`up`
    listens on the same port again and forwards to the server."""

    def __init__(self, server: MlflowServer) -> None:
        self.target = ("127.0.0.1", server.port)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._listener = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        self._listener.settimeout(0.1)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset
                    sock.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except OSError:  # the 0.1 s timeout (socket.timeout), or the listener closed by down()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
