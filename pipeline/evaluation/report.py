"""The evaluation's tables: pooled pixel curves (``curves.json``) and the per-subject results (``per_subject.csv``)."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.evaluation.segmentation import segment_subject
from pipeline.evaluation.subjects import ScoredSubject
from pipeline.io import atomic_write_text
from pipeline.metrics import ThresholdCurve, dice, lesion_detection
from pipeline.scoring import SCORE_NAMES, ScoreOptions

__all__ = ["CURVE_POINTS", "pixel_curves", "write_per_subject"]

CURVE_POINTS = 201  # grid of the FPR / recall axis in curves.json


def write_per_subject(
    subjects: Sequence[ScoredSubject],
    results: dict,
    configs: Mapping[str, ScoreOptions],
    quantile: str,
    path: Path,
) -> None:
    """``per_subject.csv``: one row per subject, its lesion load, and per option set and score its own pixel AUROC and
    AUPRC, its Dice at the calibrated threshold (held-out subjects only) and at the healthy ``quantile``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = [(c, s) for c in configs for s in SCORE_NAMES]
    writer.writerow(
        ["subject", "calibration", "slices", "brain_voxels", "lesion_voxels", "lesions", "mean_neg_elbo"]
        + [f"{m}_{c}_{s}" for c, s in columns for m in ("auroc", "auprc", "dice_split", f"dice_healthy_q{quantile}")]
    )
    for s in subjects:
        row = [
            s.name,
            s.name in results["calibration_subjects"],
            s.label.shape[-1],
            int(s.brain.sum()),
            int(s.label.sum()),
            lesion_detection(s.label, s.label)["lesions"],
            float(s.slice_terms["neg_elbo"].mean()),
        ]
        for c, k in columns:
            curve = ThresholdCurve.from_scores(s.voxels[c][k], s.lesion_voxels)
            threshold = results[c]["dice_healthy"][k][quantile]["threshold"]
            row += [
                curve.auroc(),
                curve.average_precision(),
                results[c]["dice_split"][k]["per_subject"].get(s.name, ""),
                dice(segment_subject(s, c, k, threshold, configs[c]), s.label),
            ]
        writer.writerow(row)
    atomic_write_text(buffer.getvalue(), path)


def pixel_curves(subjects: Sequence[ScoredSubject], configs: Mapping[str, ScoreOptions]) -> dict:
    """Pooled pixel curves (the content of ``curves.json``): ``fpr`` and ``recall`` grids, and per option set and
    score the exact ``auroc`` / ``auprc`` with ``tpr`` and ``precision`` on those grids. One sort per curve and
    one curve in memory at a time; the metrics, the JSON and the figure all use these."""
    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    labels = np.concatenate([s.lesion_voxels for s in subjects])
    out: dict = {"fpr": grid.tolist(), "recall": grid.tolist()}
    for config in configs:
        for score in SCORE_NAMES:
            curve = ThresholdCurve.from_scores(np.concatenate([s.voxels[config][score] for s in subjects]), labels)
            out.setdefault(config, {})[score] = {
                "auroc": curve.auroc(),
                "auprc": curve.average_precision(),
                "tpr": np.round(curve.tpr_at(grid), 5).tolist(),
                "precision": np.round(curve.precision_at(grid), 5).tolist(),
            }
    return out
