"""What a training run records next to its checkpoints for the stages after it: the executed config
(``config.json``), from which evaluation, inference, the MLflow model and the export take the architecture and the
scoring settings."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import read_json

__all__ = ["EVALUATION_KEYS", "EXECUTED_CONFIG", "SCORING_KEYS", "training_config"]

EXECUTED_CONFIG = "config.json"  # the training's executed config, next to its checkpoints
# the settings a checkpoint must be scored with (preprocessing, network, likelihood, slice score) ...
SCORING_KEYS = (
    "image_size",
    "normalization",
    "reconstruction",
    "sigma",
    "kl_weight",
    "z_dim",
    "channels",
    "norm",
    "context_slices",
)
EVALUATION_KEYS = (*SCORING_KEYS, "min_brain_fraction", "border_slices")  # ... and evaluated on (the slice selection)


def training_config(checkpoint: str | os.PathLike) -> dict:
    """The executed config of the training run that wrote ``checkpoint`` (``config.json`` next to it), or ``{}`` for
    a checkpoint from elsewhere. Inference takes its scoring settings from it."""
    path = Path(checkpoint).parent / EXECUTED_CONFIG
    if not path.is_file():
        return {}
    return read_json(
        path,
        "restore it from the run's MLflow artifacts or delete it and pass every setting explicitly.",
        what="the training config",
    )
