"""Detection and segmentation metrics of anomaly scores: exact, memory-lean, and checked against sklearn.

Pixel-level metrics take **compact arrays** of the brain voxels only (scores ``float32``, labels ``bool``): voxels
outside the brain are excluded, not counted as easy negatives. One sort gives every threshold's true and false
positives, hence the exact AUROC and average precision (sklearn's definitions, ties handled the same way) and the
exact best Dice, with no bisection. 16 M brain voxels (100 volumes at 64x64) need about 0.5 GB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "ThresholdCurve",
    "best_dice_threshold",
    "dice",
    "remove_small_components",
    "slice_labels",
    "split_calibration",
]


@dataclass
class ThresholdCurve:
    """True/false positives at every distinct score threshold (``score >= threshold``), highest first."""

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray
    positives: int
    negatives: int

    @classmethod
    def from_scores(cls, scores: np.ndarray, labels: np.ndarray) -> ThresholdCurve:
        scores = np.asarray(scores, dtype=np.float32).ravel()
        labels = np.asarray(labels, dtype=bool).ravel()
        if scores.shape != labels.shape:
            raise ValueError(f"scores and labels differ in size: {scores.shape} vs {labels.shape}.")
        if not np.isfinite(scores).all():
            raise ValueError("scores contain NaN or Inf.")
        order = np.argsort(scores, kind="stable")[::-1]
        sorted_scores, sorted_labels = scores[order], labels[order]
        del order
        last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
        tps = np.cumsum(sorted_labels, dtype=np.int64)[last_of_value]
        fps = (last_of_value + 1) - tps
        return cls(sorted_scores[last_of_value], tps, fps, int(labels.sum()), int(labels.size - labels.sum()))

    def auroc(self) -> float:
        """Area under the ROC curve (NaN if only one class is present)."""
        if self.positives == 0 or self.negatives == 0:
            return float("nan")
        tpr = np.r_[0.0, self.tps / self.positives]
        fpr = np.r_[0.0, self.fps / self.negatives]
        return float(np.trapezoid(tpr, fpr))

    def average_precision(self) -> float:
        """Average precision ``sum_n (R_n - R_{n-1}) P_n`` (sklearn's definition; NaN without positives)."""
        if self.positives == 0:
            return float("nan")
        precision = self.tps / (self.tps + self.fps)
        recall = np.r_[0.0, self.tps / self.positives]
        return float(np.sum(np.diff(recall) * precision))

    def dice(self) -> np.ndarray:
        """Dice of the segmentation ``score >= threshold`` at every threshold."""
        denominator = self.tps + self.fps + self.positives
        return np.where(denominator > 0, 2.0 * self.tps / np.maximum(denominator, 1), 1.0)

    def tpr_at(self, fpr: np.ndarray) -> np.ndarray:
        """True positive rate at the false positive rates ``fpr`` (the ROC curve, linearly interpolated)."""
        rates = np.r_[0.0, self.fps / max(self.negatives, 1)], np.r_[0.0, self.tps / max(self.positives, 1)]
        return np.interp(fpr, *rates)

    def precision_at(self, recall: np.ndarray) -> np.ndarray:
        """Precision at the recalls ``recall`` (the PR curve, linearly interpolated)."""
        return np.interp(recall, self.tps / max(self.positives, 1), self.tps / np.maximum(self.tps + self.fps, 1))


def best_dice_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(threshold, dice)`` maximising the Dice of ``score >= threshold`` over **every** distinct score."""
    curve = ThresholdCurve.from_scores(scores, labels)
    values = curve.dice()
    best = int(np.argmax(values))
    return float(curve.thresholds[best]), float(values[best])


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary arrays (1.0 when both are empty)."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    total = int(prediction.sum() + truth.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & truth).sum()) / total


def remove_small_components(segmentation: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 3D connected components (26-connectivity) with fewer than ``min_size`` voxels."""
    if min_size <= 1 or not segmentation.any():
        return segmentation
    components, n = ndimage.label(segmentation, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[components]


def slice_labels(label_volume: np.ndarray, min_pixels: int = 20) -> np.ndarray:
    """Per axial slice of ``(H, W, D)``: 0 (no annotated pixel), 1 (more than ``min_pixels``), -1 (in between:
    excluded from slice-level metrics)."""
    counts = np.asarray(label_volume).reshape(-1, label_volume.shape[-1]).sum(axis=0)
    return np.where(counts == 0, 0, np.where(counts > min_pixels, 1, -1))


def split_calibration(subjects: Sequence[str], fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split subject ids into ``(calibration, test)``: ``round(fraction * n)`` (at least 1) subjects calibrate the
    threshold, the others report Dice. Deterministic for a seed and independent of the input order; a subject is
    always wholly on one side."""
    ordered = sorted(set(subjects))
    if len(ordered) < 2:
        raise ValueError("the threshold split needs at least 2 test subjects.")
    n_cal = min(max(round(fraction * len(ordered)), 1), len(ordered) - 1)
    picked = set(np.random.default_rng(seed).choice(len(ordered), n_cal, replace=False).tolist())
    return [s for i, s in enumerate(ordered) if i in picked], [s for i, s in enumerate(ordered) if i not in picked]
