"""``threshold.json`` next to a checkpoint: the segmentation thresholds of one trained model, bound to it.

::

    {
      "checkpoint_sha256": "<SHA-256 of the model.pt they were computed with>",
      "options": {option set: ScoreOptions as a dict},
      "healthy": {                           # written at the end of training (no labels)
        "quantiles": [0.95, 0.98, 0.99, 0.995, 0.999], "subjects": [...], "n_voxels": N,
        "thresholds": {option set: {score: {"0.99": value, ...}}},
        "validation": {"rec_mse": ..., "mean_brain_mse": ..., "active_units": ..., ...}
      },
      "calibrated": {                        # written by each labelled evaluation, under its test-set name
        name: {"datalist": ..., "subjects": [...], "thresholds": {option set: {score: value}}}
      }
    }

A file made for another checkpoint (its hash differs) is refused when read, and replaced when written: a threshold
is never applied to a model it was not computed for. Updates are read-modify-write under a file lock, so two
evaluations of one checkpoint keep both their sections.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.errors import InputError, read_json
from pipeline.io import atomic_write_json, file_lock, file_sha256

__all__ = [
    "THRESHOLD_FILENAME",
    "checkpoint_sha256",
    "quantile_key",
    "read_thresholds",
    "select_threshold",
    "threshold_path",
    "update_thresholds",
]

logger = logging.getLogger(__name__)

THRESHOLD_FILENAME = "threshold.json"


def checkpoint_sha256(checkpoint: str | os.PathLike) -> str:
    """SHA-256 (hex) of a checkpoint file's content."""
    return file_sha256(checkpoint)


def threshold_path(checkpoint: str | os.PathLike) -> Path:
    return Path(checkpoint).parent / THRESHOLD_FILENAME


def quantile_key(quantile: float) -> str:
    """The key of a healthy quantile in ``threshold.json`` (``0.99`` -> ``"0.99"``)."""
    return f"{float(quantile):g}"


def _load(path: Path) -> dict:
    return read_json(
        path,
        "delete it and re-run the bundle's 'evaluating' (which recomputes the healthy thresholds) or pass --threshold.",
    )


def read_thresholds(checkpoint: str | os.PathLike, digest: str | None = None) -> dict:
    """The content of ``threshold.json`` next to ``checkpoint``; raises :class:`InputError` if it is missing or was
    computed for another checkpoint. ``digest``: the checkpoint's SHA-256 when the caller has it already."""
    path = threshold_path(checkpoint)
    if not path.is_file():
        raise InputError(
            f"no segmentation thresholds for {checkpoint}: {path} does not exist (training writes it "
            "from the healthy validation subjects); re-run the bundle's 'evaluating' with the training "
            "datalist to compute it, or pass --threshold VALUE."
        )
    content = _load(path)
    if content.get("checkpoint_sha256") != (digest or checkpoint_sha256(checkpoint)):
        raise InputError(
            f"{path} was computed for another checkpoint than {checkpoint} (its SHA-256 differs): the "
            "model was retrained or replaced. Re-run the bundle's 'evaluating' with the training "
            "datalist to recompute it, or pass --threshold VALUE."
        )
    return content


def update_thresholds(
    checkpoint: str | os.PathLike, options: dict, expected_sha256: str | None = None, **sections: dict
) -> dict:
    """Merge ``sections`` (``healthy=...`` replaces that section; ``calibrated=...`` adds or replaces entries by
    test-set name) into ``threshold.json`` next to ``checkpoint``, atomically and under a lock; returns the file's
    new content. An existing file made for another checkpoint is replaced, with a warning. ``expected_sha256``: the
    hash of the weights the sections were computed with; if ``checkpoint`` no longer has it (replaced by another
    training meanwhile), nothing is written and an :class:`InputError` says so."""
    path = threshold_path(checkpoint)
    digest = checkpoint_sha256(checkpoint)
    if expected_sha256 is not None and digest != expected_sha256:
        raise InputError(
            f"{checkpoint} changed while it was being scored (another training replaced it?): results computed with "
            f"the earlier weights were not written into {path}; re-run on the current checkpoint."
        )
    with file_lock(path.parent):  # the folder itself: no lock file left beside the checkpoint
        content = _load(path) if path.is_file() else {}
        if content and content.get("checkpoint_sha256") != digest:
            logger.warning("%s was computed for another checkpoint; replacing it", path)
            content = {}
        content["checkpoint_sha256"] = digest
        content["options"] = {**content.get("options", {}), **options}
        for name, section in sections.items():
            if name == "calibrated":
                content["calibrated"] = {**content.get("calibrated", {}), **section}
            else:
                content[name] = section
        atomic_write_json(content, path)
    return content


def select_threshold(
    content: dict, option_set: str, score: str, quantile: float | None = None, calibration: str | None = None
) -> tuple[float, str]:
    """``(threshold, where it comes from)`` of ``option_set``/``score`` in a ``threshold.json`` content: the healthy
    ``quantile``, or with ``calibration`` the threshold that the labelled evaluation of that name calibrated."""
    if calibration is not None:
        found = content.get("calibrated", {})
        if calibration not in found:
            raise InputError(
                f"no labelled calibration named {calibration!r} for this checkpoint (have: "
                f"{sorted(found) or 'none'}); run the bundle's 'evaluating' with --eval_name "
                f"{calibration}, or drop --calibration to use the healthy-data threshold."
            )
        return float(found[calibration]["thresholds"][option_set][score]), f"calibrated on {calibration!r}"
    healthy = content.get("healthy")
    if healthy is None:
        raise InputError(
            "the thresholds file has no 'healthy' section; re-run the bundle's 'evaluating' with the "
            "training datalist to compute it, or pass --threshold VALUE."
        )
    thresholds = healthy["thresholds"][option_set][score]
    key = quantile_key(quantile)
    if key not in thresholds:
        raise InputError(
            f"no healthy threshold at quantile {key} (have {sorted(thresholds, key=float)}); choose one "
            "of them with --healthy_quantile, or pass --threshold VALUE."
        )
    return float(thresholds[key]), f"healthy quantile {key}"
