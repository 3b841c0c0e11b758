"""Segmentation metrics over scored test subjects (:class:`~pipeline.evaluation.subjects.ScoredSubject`): the
segmentation of a map at a threshold, its pooled Dice beside the whole-brain baseline, the best Dice threshold, and
lesion-level detection. Pure functions of the subjects and an option set's :class:`~pipeline.scoring.ScoreOptions`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.evaluation.subjects import ScoredSubject, pooled_dice, segmentation_counts
from pipeline.metrics import best_dice_threshold, lesion_detection, segmented_fraction_grid
from pipeline.scoring import ScoreOptions, segment

__all__ = [
    "HALF_BRAIN",
    "counts_at",
    "detection_of",
    "dice_entry_of",
    "dice_search",
    "segment_subject",
]

GRID_POINTS, REFINE_POINTS = 48, 24  # Dice threshold search when connected components make Dice non-monotone
HALF_BRAIN = 0.5  # a segmentation covering more of the brain than this is flagged


def segment_subject(
    subject: ScoredSubject, config: str, score: str, threshold: float, options: ScoreOptions
) -> np.ndarray:
    """The segmentation of ``subject``'s ``config``/``score`` map at ``threshold`` (:func:`pipeline.scoring.segment`)."""
    return segment(subject.volume(config, score), subject.brain, threshold, options)


def counts_at(
    subjects: Sequence[ScoredSubject], config: str, score: str, threshold: float, options: ScoreOptions
) -> np.ndarray:
    """:func:`~pipeline.evaluation.subjects.segmentation_counts` of every subject's segmentation at ``threshold``."""
    return segmentation_counts([segment_subject(s, config, score, threshold, options) for s in subjects], subjects)


def dice_search(
    subjects: Sequence[ScoredSubject], config: str, score: str, options: ScoreOptions
) -> tuple[float, float]:
    """Best ``(threshold, pooled Dice)`` over ``subjects``: exact over every distinct threshold without component
    removal; with it (Dice is then not monotone in the threshold), over thresholds that segment a geometric grid
    of brain fractions from 1e-5 to 1, refined around the best (steps of about 2 % in the segmented volume)."""
    voxels = np.concatenate([s.voxels[config][score] for s in subjects])
    if options.min_component_size <= 1:
        return best_dice_threshold(voxels, np.concatenate([s.lesion_voxels for s in subjects]))

    def best_of(fractions: np.ndarray) -> tuple[float, float, float]:
        thresholds = np.unique(np.quantile(voxels, 1.0 - np.clip(fractions, 0.0, 1.0)))
        results = [(float(t), pooled_dice(counts_at(subjects, config, score, float(t), options))) for t in thresholds]
        threshold, value = max(results, key=lambda r: r[1])
        return threshold, value, float((voxels >= threshold).mean())

    grid = segmented_fraction_grid(GRID_POINTS, smallest=min(1e-5, 1.0 / voxels.size))
    threshold, value, fraction = best_of(grid)
    step = grid[1] / grid[0]
    refined = best_of(np.geomspace(max(fraction / step, grid[0]), min(fraction * step, 1.0), REFINE_POINTS))
    return (threshold, value) if value >= refined[1] else refined[:2]


def dice_entry_of(counts: np.ndarray, subjects: Sequence[ScoredSubject], threshold: float, whole_brain: float) -> dict:
    """Pooled Dice of :func:`segmentation_counts` ``counts`` at ``threshold``, with its whole-brain baseline and the
    share of the brain it segments."""
    fraction = float(counts[:, 1].sum() / max(sum(int(s.brain.sum()) for s in subjects), 1))
    return {
        "threshold": float(threshold),
        "dice": pooled_dice(counts) if len(subjects) else float("nan"),
        "whole_brain": whole_brain,
        "brain_fraction": fraction,
        "covers_over_half_brain": bool(fraction > HALF_BRAIN),
    }


def detection_of(found: Sequence[np.ndarray], subjects: Sequence[ScoredSubject], threshold: float) -> dict:
    """Lesion-level counts of the segmentations ``found`` (one per subject) at ``threshold``, pooled."""
    counted = [lesion_detection(f, s.label) for f, s in zip(found, subjects)]
    lesions, detected = sum(c["lesions"] for c in counted), sum(c["detected"] for c in counted)
    false_positives, n = sum(c["false_positives"] for c in counted), len(subjects)
    return {
        "threshold": float(threshold),
        "subjects": n,
        "lesions": lesions,
        "detected": detected,
        "recall": detected / lesions if lesions else float("nan"),
        "false_positive_components": false_positives,
        "fp_per_volume": false_positives / n if n else float("nan"),
    }
