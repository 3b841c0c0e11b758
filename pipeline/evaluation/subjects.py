"""What evaluation keeps of each scored test subject (compact brain-voxel arrays), and the pooled Dice over
subjects."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.scoring import on_volume

__all__ = ["ScoredSubject", "pooled_dice", "segmentation_counts"]


class ScoredSubject:
    """Compact per-subject results: brain-voxel scores per option set and score, labels, slice terms."""

    def __init__(self, name: str, brain: np.ndarray, label: np.ndarray, classes: np.ndarray | None = None) -> None:
        self.name, self.brain, self.label = name, brain, label
        self.lesion_voxels = label[brain]
        self.classes = classes  # original label values of the brain voxels, for label_groups
        self.voxels: dict[str, dict[str, np.ndarray]] = {}
        self.slice_means: dict[str, dict[str, np.ndarray]] = {}
        self.slice_terms: dict[str, np.ndarray] = {}
        self.scored_slices: list[int] = []  # the slices training would use: slice-level metrics

    def volume(self, config: str, score: str) -> np.ndarray:
        return on_volume(self.voxels[config][score].astype(np.float32, copy=False), self.brain)


def segmentation_counts(segmentations: Sequence[np.ndarray], subjects: Sequence[ScoredSubject]) -> np.ndarray:
    """``(n_subjects, 3)``: true positives, segmented voxels, lesion voxels of each subject."""
    return np.array(
        [[int((g & s.label).sum()), int(g.sum()), int(s.label.sum())] for g, s in zip(segmentations, subjects)],
        dtype=np.int64,
    ).reshape(-1, 3)


def pooled_dice(counts: np.ndarray) -> float:
    tp, segmented, lesion = counts.sum(axis=0)
    return 1.0 if segmented + lesion == 0 else 2.0 * tp / (segmented + lesion)
