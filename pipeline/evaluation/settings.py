"""What an evaluation is told, as small frozen objects that :class:`~pipeline.evaluation.AnomalyEvaluation` takes
whole (the bundle builds them in ``configs/evaluate.json``): the labelled test data, how results are computed and
reported, and the segmentation inference makes by default."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import file_sha256
from pipeline.operating_point import DEFAULT_OPTION_SET, DEFAULT_QUANTILE, DEFAULT_SCORE
from pipeline.thresholds import quantile_key

__all__ = ["DefaultSegmentation", "LabelledSet", "Reporting"]


@dataclass(frozen=True)
class LabelledSet:
    """The labelled test data: the ``key`` entries of ``datalist`` (``image``, ``label``, optionally ``brainmask``).

    Args:
        datalist: the datalist JSON.
        key: its list of test entries.
        name: the test set's name in MLflow (metric prefix and artifact sub-folder) and in ``threshold.json``.
        label_groups: optional ``{group: [label values]}``; adds ``pixel_auroc_<group>`` / ``pixel_auprc_<group>``.
        min_slice_pixels: annotated pixels above which a slice counts as anomalous.
    """

    datalist: Path
    key: str = "test"
    name: str = "eval"
    label_groups: Mapping[str, Sequence[int]] = field(default_factory=dict)
    min_slice_pixels: int = 20

    def __post_init__(self) -> None:
        groups = dict(self.label_groups or {})
        for text in (self.name, *groups):
            if not text or "/" in text:
                raise ValueError(f"evaluation and label group names must be non-empty without '/', got {text!r}.")
        object.__setattr__(self, "datalist", Path(os.fspath(self.datalist)))
        object.__setattr__(self, "label_groups", {g: [int(v) for v in values] for g, values in groups.items()})

    def identity(self) -> str:
        """The test set's identity: SHA-256 of the datalist file and its key."""
        return f"{file_sha256(self.datalist)}#{self.key}"


@dataclass(frozen=True)
class Reporting:
    """How results are computed and shown: the subject split of the Dice threshold (``calibration_fraction`` of the
    subjects calibrate it, seeded), ``n_bootstrap`` resamples of the intervals (same seed), ``n_panels`` subjects
    drawn in ``panels.png``."""

    calibration_fraction: float = 0.2
    n_bootstrap: int = 1000
    n_panels: int = 8
    seed: int = 0


@dataclass(frozen=True)
class DefaultSegmentation:
    """The segmentation inference makes by default (without an operating point): ``score`` of ``option_set`` at the
    healthy ``quantile``; reported for lesion detection and shown in the panels."""

    option_set: str = DEFAULT_OPTION_SET
    score: str = DEFAULT_SCORE
    quantile: float = DEFAULT_QUANTILE

    def to_dict(self) -> dict:
        """``{"option_set", "score", "quantile"}`` with the quantile as ``threshold.json`` keys it (e.g. ``"0.99"``)."""
        return {"option_set": self.option_set, "score": self.score, "quantile": quantile_key(self.quantile)}
