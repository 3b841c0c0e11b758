"""An output folder belongs to one run at a time, and what a run wrote there is never replaced without being asked.

* :func:`claim` takes an exclusive ``fcntl`` lock on ``<folder>/.cevae.lock`` for the life of the run (released by
  :func:`release`, or by the operating system when the process ends, crash or kill included) and records the
  holder (process, host, command, start time) in it: a second run on the same folder stops at once with one line
  naming the holder, instead of interleaving checkpoints, metrics and MLflow runs with the first. An evaluation
  also claims the training folder it reads, shared: other evaluations may read it, a training (its ``--overwrite``)
  may not replace the checkpoint under it.
* :func:`prepare_training_dir` / :func:`prepare_evaluation_dir`: a folder that holds a trained run (or an
  evaluation) is refused unless the run continues it (``--resume True``) or replaces it (``--overwrite True``,
  which deletes the files listed in :data:`TRAINING_OUTPUTS` / :data:`EVALUATION_OUTPUTS` first; the MLflow store
  keeps the replaced run's history).
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import TextIO

from pipeline.errors import InputError
from pipeline.io import make_output_folder

__all__ = [
    "EVALUATION_OUTPUTS",
    "LOCK_FILENAME",
    "METRICS_FILENAME",
    "TRAINING_OUTPUTS",
    "claim",
    "delete_outputs",
    "prepare_evaluation_dir",
    "prepare_training_dir",
    "release",
]

logger = logging.getLogger(__name__)

LOCK_FILENAME = ".cevae.lock"
METRICS_FILENAME = "metrics.json"  # an evaluation's figures, which also mark a folder as holding one
EVALUATION_OUTPUTS = (METRICS_FILENAME, "per_subject.csv", "curves.json", "roc_pr.png", "panels.png")
TRAINING_OUTPUTS = ("checkpoints", "reconstructions.png", *EVALUATION_OUTPUTS)  # all derived from the checkpoint

_held: dict[Path, tuple[TextIO, int, bool]] = {}  # folder -> (open lock file, claims by this process, exclusive)


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return "another process"
    return (
        f"process {info.get('pid')} of {info.get('user')} on {info.get('host')} since {info.get('started')}: "
        f"{info.get('command')}"
    )


def claim(folder: str | os.PathLike, what: str = "run", shared: bool = False) -> Path:
    """Lock ``folder`` (created if missing) for this process; raises :class:`InputError` naming the holder if another
    process holds it. ``shared``: a reader's claim (an evaluation reading a training's checkpoint): readers share
    the folder, and no exclusive claim (a training, its ``--overwrite``) is granted while one reads. Claims by the
    same process nest (each needs its :func:`release`); an exclusive claim of a folder this process reads upgrades
    its lock, refused while another process reads it too."""
    folder = Path(folder).resolve()
    if folder in _held:
        handle, count, exclusive = _held[folder]
        if not (shared or exclusive):
            _lock(handle, folder, what, fcntl.LOCK_EX, fallback=fcntl.LOCK_SH)
            _record_holder(handle)
        _held[folder] = (handle, count + 1, exclusive or not shared)
        return folder
    if shared and not folder.is_dir():  # nothing there to protect (the reader will not find its input)
        return folder
    make_output_folder(folder)
    handle = open(folder / LOCK_FILENAME, "a+")
    try:
        _lock(handle, folder, what, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    except InputError:
        handle.close()
        raise
    if not shared or not (folder / LOCK_FILENAME).stat().st_size:  # readers: the first one is named
        _record_holder(handle)
    _held[folder] = (handle, 1, not shared)
    return folder


def _lock(handle: TextIO, folder: Path, what: str, mode: int, fallback: int | None = None) -> None:
    """``flock`` ``handle`` in ``mode`` without waiting, or raise :class:`InputError` naming the holder. ``fallback``:
    the lock held before (an upgrade, which Linux may not do atomically), taken again after a refusal."""
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        if fallback is not None:
            fcntl.flock(handle, fallback)
        raise InputError(
            f"{folder} is in use by {_holder(folder / LOCK_FILENAME)}; wait for that {what} to end, or choose "
            "another output folder."
        ) from None


def _record_holder(handle: TextIO) -> None:
    """Write who holds the lock into the lock file (named by a refused claim)."""
    handle.seek(0)
    handle.truncate()
    handle.write(
        json.dumps(
            {
                "pid": os.getpid(),
                "user": getpass.getuser(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv),
            }
        )
    )
    handle.flush()


def release(folder: str | os.PathLike) -> None:
    """Undo one :func:`claim` of ``folder`` by this process; the last one unlocks it."""
    folder = Path(folder).resolve()
    if folder not in _held:
        return
    handle, count, exclusive = _held.pop(folder)
    if count > 1:
        _held[folder] = (handle, count - 1, exclusive)
        return
    if exclusive:  # a reader leaves the holder record to the other readers
        handle.seek(0)
        handle.truncate()
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def delete_outputs(folder: Path, names: tuple[str, ...]) -> list[str]:
    """Delete the files or folders ``names`` of ``folder`` that exist; returns the names deleted."""
    deleted = []
    for name in names:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        deleted.append(name)
    return deleted


def prepare_training_dir(output_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> Path:
    """Claim ``output_dir`` for a training run and refuse to replace a trained run in it silently.

    Temporary files of saves that a kill interrupted are removed first. A folder whose ``checkpoints/`` holds
    ``model.pt`` or ``last.pt`` is a trained run: ``resume`` continues it,
    ``overwrite`` deletes :data:`TRAINING_OUTPUTS` (checkpoints with their thresholds and config, the reconstruction
    figure, evaluation outputs: all derived from the replaced weights) and starts over; neither raises
    :class:`InputError`. Returns the folder.
    """
    if resume and overwrite:
        raise InputError(
            "--resume True continues the run in the output folder and --overwrite True replaces it: "
            "pass only one of them."
        )
    folder = claim(output_dir, "training")
    for stale in sorted((folder / "checkpoints").glob(".*.tmp*")):  # of a killed save; no other run writes here
        stale.unlink()
        logger.warning("removed %s, the temporary file of an interrupted save", stale)
    trained = [
        folder / "checkpoints" / name for name in ("model.pt", "last.pt") if (folder / "checkpoints" / name).is_file()
    ]
    if not trained or resume:
        return folder
    if not overwrite:
        release(folder)
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(trained[0].stat().st_mtime))
        raise InputError(
            f"{folder} holds a trained run ({trained[0]}, {stamp}); continue it with --resume True, "
            f"replace it with --overwrite True (deletes {', '.join(TRAINING_OUTPUTS)}), or choose another "
            "--output_dir."
        )
    logger.warning("--overwrite: deleted %s from %s", ", ".join(delete_outputs(folder, TRAINING_OUTPUTS)), folder)
    return folder


def drop_resume_state(ckpt_dir: str | os.PathLike, keep: bool = False) -> None:
    """After a completed training: delete ``last.pt`` (optimizer, trainer and RNG state, about 3x ``model.pt``), which
    only a resume needs, unless ``keep`` (``--keep_last True``: to train the run further with ``--resume``)."""
    last = Path(ckpt_dir) / "last.pt"
    if keep or not last.is_file():
        return
    last.unlink()
    logger.info("training completed: removed %s, kept only to resume (--keep_last True keeps it)", last)


def prepare_evaluation_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Claim ``output_dir`` for an evaluation and refuse to replace another evaluation's results in it silently
    (``overwrite`` deletes :data:`EVALUATION_OUTPUTS` first). Returns the folder."""
    folder = claim(output_dir, "evaluation")
    if not (folder / METRICS_FILENAME).is_file():
        return folder
    if not overwrite:
        release(folder)
        raise InputError(
            f"{folder} holds the results of an evaluation ({folder / 'metrics.json'}); replace them with "
            f"--overwrite True (deletes {', '.join(EVALUATION_OUTPUTS)}), or choose another "
            "--eval_output_dir."
        )
    logger.warning("--overwrite: deleted %s from %s", ", ".join(delete_outputs(folder, EVALUATION_OUTPUTS)), folder)
    return folder
