"""Atomic checkpoints of a training run, and the RNG state that makes a resumed run continue exactly.

MONAI's ``CheckpointSaver`` writes with ``atomic=False``; a crash during a save could leave a truncated
``model.pt``. :class:`AtomicCheckpointSaver` writes every file under a temporary name and renames it
(:func:`pipeline.io.atomic_path`), never saves non-finite weights, and keeps fixed names:

* ``last.pt``: ``{"model", "loss", "optimizer", "trainer", "rng", "validator"}`` after every ``save_interval``
  epochs (for ``--resume`` with MONAI's ``CheckpointLoader``, which loads with ``weights_only=True``); after the
  last epoch only at ``COMPLETED``, once every end-of-training handler (the healthy calibration) has run, so that a
  run killed before then resumes from the epoch before and repeats the last one exactly;
* ``model.pt``: ``{"model", "loss"}`` of the best validation epoch (the last epoch when there is no validator).
  ``loss`` is the loss's state (its likelihood ``sigma``, calibrated during training), which scoring needs to
  compute the same ELBO as training; :func:`pipeline.weights.load_trained` restores both.

During training the saver copies the state at the end of an epoch and writes it in a background thread while the
next epoch runs (:class:`BackgroundWriter`; the copy takes ~10 ms, the write of a 60 MB ``last.pt`` ~90 ms of a
~1.8 s demo epoch). The last epoch's files are written before any end-of-training handler reads them, a failed
write is raised in the training thread at the next save (or at the end), and the process never exits before a
started write has finished. Files are serialised in memory first, so the same weights give the same bytes (and the
same SHA-256) whatever the temporary file's name.
"""

from __future__ import annotations

import copy
import io
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch
from ignite.engine import Engine, Events

from pipeline.io import atomic_path

__all__ = [
    "AtomicCheckpointSaver",
    "BackgroundWriter",
    "BestMetric",
    "RNGState",
    "save_checkpoint",
]


class Stateful(Protocol):
    """What a checkpoint holds: a module, an optimizer, an engine or a handler (``state_dict`` / ``load_state_dict``)."""

    def state_dict(self) -> Any:
        """The state to save."""


logger = logging.getLogger(__name__)


class RNGState:
    """``state_dict``/``load_state_dict`` of torch's global RNGs (CPU and, where present, CUDA).

    Every random draw of training (shuffling, reparameterisation, context-encoding noise) comes from them.
    """

    def state_dict(self) -> dict[str, object]:
        state: dict[str, object] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class BestMetric:
    """``state_dict``/``load_state_dict`` of a validator's best key metric and its epoch: a resumed run then keeps
    the interrupted run's checkpoint selection instead of taking its first epoch as the best."""

    def __init__(self, validator: Engine) -> None:
        self.validator = validator

    def state_dict(self) -> dict[str, float]:
        return {
            "best_metric": float(self.validator.state.best_metric),
            "best_metric_epoch": int(self.validator.state.best_metric_epoch),
        }

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.validator.state.best_metric = float(state["best_metric"])
        self.validator.state.best_metric_epoch = int(state["best_metric_epoch"])


def save_checkpoint(objects: Mapping[str, Stateful], path: str | os.PathLike) -> Path:
    """``torch.save({name: obj.state_dict()})`` to ``path`` atomically."""
    return write_state({name: obj.state_dict() for name, obj in objects.items()}, path)


def write_state(state: Mapping[str, object], path: str | os.PathLike) -> Path:
    """``torch.save(state)`` to ``path`` atomically, serialised in memory first: a file path would put the
    temporary file's name into the archive, so that identical weights would not give identical files."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return Path(path)


class BackgroundWriter:
    """Runs writes in order in one background thread. :meth:`wait` waits for all those submitted so far, then raises
    the first error (e.g. :class:`~pipeline.io.WriteError`) in the calling thread. The thread is not a daemon: the
    interpreter waits for submitted writes before it exits."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: list[Future] = []

    def submit(self, write: Callable[..., object], *args: object) -> None:
        self._pending.append(self._pool.submit(write, *args))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        errors = [error for error in (future.exception() for future in pending) if error is not None]
        if errors:
            raise errors[0]


def _finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


class AtomicCheckpointSaver:
    """Save ``last.pt`` and the best ``model.pt`` of a trainer (see the module docstring).

    Args:
        save_dir: checkpoint folder.
        network, optimizer: what to save (``network`` may be DDP-wrapped; its inner module is saved).
        loss_function: the loss, whose state (the likelihood ``sigma``) is saved with the network.
        validator: the evaluator whose key metric picks the best epoch (None: the last epoch is the best).
        save_interval: epochs between ``last.pt`` saves.

    Attach it to the trainer **after** the ``ValidationHandler`` so that the best epoch is known when it runs.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: torch.nn.Module | None = None,
        validator: Engine | None = None,
        save_interval: int = 1,
        last_filename: str = "last.pt",
        best_filename: str = "model.pt",
    ) -> None:
        self.save_dir = Path(save_dir)
        self.network = getattr(network, "module", network)
        self.optimizer = optimizer
        self.weights = (
            {"model": self.network} if loss_function is None else {"model": self.network, "loss": loss_function}
        )
        self.validator = validator
        self.save_interval = save_interval
        self.last_path = self.save_dir / last_filename
        self.best_path = self.save_dir / best_filename
        self.last_saved_epoch: int | None = None
        self.writer = BackgroundWriter()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.TERMINATE, self.terminated)

    def _save(self, objects: Mapping[str, Stateful], path: Path) -> None:
        """Copy the state of ``objects`` now and write it to ``path`` in the background."""
        self.writer.submit(write_state, copy.deepcopy({name: obj.state_dict() for name, obj in objects.items()}), path)

    def epoch_completed(self, engine: Engine) -> None:
        self.writer.wait()  # the previous epoch's files (long done: an epoch takes seconds)
        epoch = engine.state.epoch
        if not _finite(self.network):
            logger.error(
                "epoch %d: weights are not finite; not saved (last good checkpoint: %s, epoch %s)",
                epoch,
                self.last_path,
                self.last_saved_epoch,
            )
            return
        if self.validator is None or self.validator.state.best_metric_epoch == epoch:
            self._save(self.weights, self.best_path)
        if epoch % self.save_interval == 0 and epoch < engine.state.max_epochs:
            self.save_last(engine)
        if epoch == engine.state.max_epochs:  # end-of-training handlers read model.pt next
            self.writer.wait()

    def completed(self, engine: Engine) -> None:
        if engine.state.epoch == engine.state.max_epochs and _finite(self.network):
            self.save_last(engine)
        self.writer.wait()

    def save_last(self, engine: Engine) -> None:
        best = {} if self.validator is None else {"validator": BestMetric(self.validator)}
        self._save(
            {**self.weights, "optimizer": self.optimizer, "trainer": engine, "rng": RNGState(), **best}, self.last_path
        )
        self.last_saved_epoch = engine.state.epoch

    def terminated(self, engine: Engine) -> None:
        self.writer.wait()
        logger.error(
            "training stopped early (%s); the last good checkpoint is %s (epoch %s)",
            getattr(engine.state, "stop_reason", f"at epoch {engine.state.epoch}, iteration {engine.state.iteration}"),
            self.last_path,
            self.last_saved_epoch,
        )
