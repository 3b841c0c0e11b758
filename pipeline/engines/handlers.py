"""Small Ignite handlers used by the bundle's trainer (attachable objects, as MONAI handlers are)."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ignite.engine import Engine, Events
from ignite.handlers import TerminateOnNan
from torch.optim import Optimizer

from pipeline.anomaly_map import AnomalyMap
from pipeline.calibration import LabelFreeCalibration
from pipeline.data.slices import BrainSliceDataset
from pipeline.errors import InputError
from pipeline.healthy import mean_brain_check

__all__ = [
    "CopyMetrics",
    "HealthyCalibration",
    "RecordLearningRate",
    "StopOnNonFiniteLoss",
    "TrainingStopped",
    "raise_if_stopped",
]

logger = logging.getLogger(__name__)


class TrainingStopped(InputError):
    """A training that stopped before its last epoch (a non-finite loss): the run failed; the message says why and
    what to do (exit status 2 under ``monai.bundle run``, like every error the user can fix)."""


CHECK_METRICS = ("rec_mse", "mean_brain_mse", "rec_vs_mean_brain", "active_units", "kl_per_dim")


class CopyMetrics:
    """Copy another engine's ``state.metrics`` (e.g. the validator's) into this engine's at epoch end.

    Attach it to the trainer after the ``ValidationHandler`` and before the MLflow handler, so that one run
    logs training and validation metrics per epoch.
    """

    def __init__(self, source: Engine) -> None:
        self.source = source

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.metrics.update(getattr(self.source.state, "metrics", {}) or {})


class StopOnNonFiniteLoss:
    """Ignite's ``TerminateOnNan`` on the ``loss`` of each iteration: training stops at the first NaN/Inf loss, and
    ``engine.state.stop_reason`` says where (:func:`raise_if_stopped` turns it into the run's error).

    With :class:`~pipeline.engines.checkpoint.AtomicCheckpointSaver` the last good checkpoint stays on disk.
    """

    def __init__(self, key: str = "loss") -> None:
        self.terminate = TerminateOnNan(output_transform=lambda output: output[key])

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.terminate(engine)
        if engine.should_terminate:
            engine.state.stop_reason = (
                f"the training loss is not finite at epoch {engine.state.epoch}, iteration {engine.state.iteration}"
            )


def raise_if_stopped(engine: Engine, checkpoint_dir: str | os.PathLike) -> None:
    """After ``engine.run()``: a training that a handler stopped early (``engine.state.stop_reason``) is a failed
    run; raise :class:`TrainingStopped` in one line, naming the reason, the last good checkpoint and the fix."""
    reason = getattr(engine.state, "stop_reason", None)
    if reason is None:
        return
    last = Path(checkpoint_dir) / "last.pt"
    kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written"
    raise TrainingStopped(
        f"training stopped: {reason}; {kept}. Lower --lr or check the training data, then run again "
        "(--resume True continues from the last good checkpoint, --overwrite True starts anew)."
    )


class RecordLearningRate:
    """Put the optimizer's learning rate into ``engine.state.metrics["lr"]`` at each epoch end, so that the
    epoch-level loggers (MLflow, stats) record it with the other metrics. With several parameter groups the
    metrics are ``lr``, ``lr_1``, ``lr_2``, ..."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            engine.state.metrics["lr" if i == 0 else f"lr_{i}"] = float(group["lr"])


class HealthyCalibration:
    """At the end of training, score the healthy validation subjects with the **selected** checkpoint and write the
    ``healthy`` section of its ``threshold.json`` (:func:`pipeline.healthy.healthy_thresholds`), with the label-free
    operating point chosen on synthetic lesions in the same subjects and every candidate's Dice under
    ``healthy.synthetic`` (:func:`pipeline.calibration.synthetic_lesion_search`) and the mean-brain check of the
    decoder (:func:`pipeline.healthy.mean_brain_check`) under ``healthy.validation``.

    Runs when the last epoch completes (so also at the end of a resumed run), after the checkpoint saver, on a copy
    of ``model`` loaded from ``checkpoint``; puts ``healthy_<check>`` and
    ``healthy_threshold/<option set>/<score>/q<quantile>``, ``synthetic_dice/<option set>/<score>`` and
    ``operating_point/{synthetic_dice,quantile,threshold,min_component_size}`` into ``engine.state.metrics`` for the
    epoch loggers
    (attach it before the MLflow handler).

    Args:
        checkpoint: the selected ``model.pt``.
        model: the :class:`~pipeline.anomaly_map.AnomalyMap` of the trained network and loss, with the option sets to
            compute thresholds for (copied, never changed).
        data: the healthy validation entries; transform: the training's volume chain.
        calibration: the :class:`~pipeline.calibration.LabelFreeCalibration` (its healthy quantiles, synthetic lesions).
        train_slices, validation_slices: the training and validation slices, for the mean-brain check (skipped
            when either is None).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        model: AnomalyMap,
        data: Sequence[dict],
        transform: Callable,
        calibration: LabelFreeCalibration | None = None,
        train_slices: BrainSliceDataset | None = None,
        validation_slices: BrainSliceDataset | None = None,
    ) -> None:
        self.checkpoint, self.model, self.data, self.transform = checkpoint, model, list(data), transform
        self.calibration = LabelFreeCalibration() if calibration is None else calibration
        self.train_slices, self.validation_slices = train_slices, validation_slices

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_completed(self, engine: Engine) -> None:
        if engine.state.epoch == engine.state.max_epochs:
            engine.state.metrics.update(self.calibrate())

    def calibrate(self) -> dict[str, float]:
        """Compute, write and return the flat metrics (see the class docstring)."""
        model = copy.deepcopy(self.model).load(self.checkpoint, reference="none")
        healthy, fitted = self.calibration(model, self.data, self.transform)
        if self.train_slices is not None and self.validation_slices is not None:
            healthy["validation"] = mean_brain_check(
                model.network, self.train_slices, self.validation_slices, device=model.device
            )
        model.record(fitted, healthy=healthy)
        point = model.operating_point
        check = healthy.get("validation", {})
        metrics = {f"healthy_{k}": float(check[k]) for k in CHECK_METRICS if k in check}
        for config, per_score in healthy["thresholds"].items():
            for score, values in per_score.items():
                metrics.update({f"healthy_threshold/{config}/{score}/q{q}": v for q, v in values.items()})
                metrics[f"synthetic_dice/{config}/{score}"] = healthy["synthetic"]["dice"][config][score]
        for key in ("synthetic_dice", "quantile", "threshold", "min_component_size"):
            metrics[f"operating_point/{key}"] = float(getattr(point, key))
        logger.info("label-free operating point chosen on synthetic lesions: %s", point.describe())
        logger.info(
            "healthy calibration of %s on %d validation subjects: thresholds written; reconstruction MSE "
            "%.4g vs %.4g for the mean brain, %s active latent units",
            self.checkpoint,
            len(self.data),
            check.get("rec_mse", float("nan")),
            check.get("mean_brain_mse", float("nan")),
            check.get("active_units", "?"),
        )
        return metrics
