"""Small Ignite handlers used by the bundle's trainer (attachable objects, as MONAI handlers are)."""

from __future__ import annotations

from ignite.engine import Engine, Events
from ignite.handlers import TerminateOnNan
from torch.optim import Optimizer

__all__ = ["CopyMetrics", "RecordLearningRate", "StopOnNonFiniteLoss"]


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
    """Ignite's ``TerminateOnNan`` on the ``loss`` of each iteration: training stops at the first NaN/Inf loss.

    With :class:`~pipeline.engines.checkpoint.AtomicCheckpointSaver` the last good checkpoint stays on disk.
    """

    def __init__(self, key: str = "loss") -> None:
        self.terminate = TerminateOnNan(output_transform=lambda output: output[key])

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.terminate)


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
